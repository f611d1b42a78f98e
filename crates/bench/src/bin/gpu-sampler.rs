//! The GPU sampler's cost (bench/gpu_sampler.sh): takes `--samples` samples
//! through berth's own `Telemetry::sample` — the source's read, parsing,
//! attribution of every process (host PID → `/proc/<pid>/cgroup` →
//! container → server) — and prints the CPU time per sample (this process,
//! and the children it ran: the `nvidia-smi` stand-in) and the resident
//! memory after the first tenth, at half and at the end, as one JSON line.
//!
//! `gpu-sampler --source nvidia-smi|nvml --program PATH|--library PATH
//!  --container ID --samples N`: the stand-in `nvidia-smi` or NVML library
//! the script prepared; `ID` is the container the reported processes run in
//! (it is listed as alice's server, as the Docker spawner would list it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_hub::nvml::NvmlSource;
use berth_hub::telemetry::{GpuSource, NvidiaSmi, SampleState, Telemetry};
use berth_spawner::{BoxFuture, ProgressTx, SpawnError, SpawnSpec, Spawner, Started, Status, StopGrace};

/// Lists one container as alice's server; starts nothing.
struct Listed(String);

impl Spawner for Listed {
    fn kind(&self) -> &'static str {
        "bench"
    }
    fn start(&self, _spec: SpawnSpec, _p: ProgressTx) -> BoxFuture<'_, Result<Started, SpawnError>> {
        Box::pin(async { Err(SpawnError::Failed("the bench spawner starts nothing".into())) })
    }
    fn stop<'a>(&'a self, _s: &'a serde_json::Value, _g: StopGrace) -> BoxFuture<'a, Result<(), SpawnError>> {
        Box::pin(async { Ok(()) })
    }
    fn poll<'a>(&'a self, _s: &'a serde_json::Value) -> BoxFuture<'a, Result<Status, SpawnError>> {
        Box::pin(async { Ok(Status::Running) })
    }
    fn list_managed(&self) -> BoxFuture<'_, Vec<(String, String, String)>> {
        let id = self.0.clone();
        Box::pin(async move { vec![("alice".to_string(), String::new(), id)] })
    }
}

/// (CPU of this process, CPU of its waited-for children), in clock ticks.
fn cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    // utime, stime, cutime, cstime are fields 14–17 (1-based), 12–15 here.
    let get = |i: usize| f.get(i).copied().unwrap_or(0);
    (get(11) + get(12), get(13) + get(14))
}

fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|x| x.parse().ok()).unwrap_or(0);
    pages * 4
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let source = arg(&args, "--source").unwrap_or_else(|| "nvidia-smi".into());
    let samples: u64 = arg(&args, "--samples").and_then(|s| s.parse().ok()).unwrap_or(1000).clamp(10, 1_000_000);
    let container = arg(&args, "--container").unwrap_or_default();
    let src: Arc<dyn GpuSource> = match source.as_str() {
        "nvml" => match NvmlSource::load(&arg(&args, "--library").unwrap_or_default()) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                eprintln!("gpu-sampler: {e}");
                std::process::exit(1);
            }
        },
        _ => Arc::new(NvidiaSmi::new(
            arg(&args, "--program").unwrap_or_else(|| "nvidia-smi".into()),
            Duration::from_secs(10),
        )),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gpu-sampler: {e}");
            std::process::exit(1);
        }
    };
    rt.block_on(async move {
        let telemetry = Telemetry::new(Some(src), Duration::from_secs(5), 5);
        let spawner = Listed(container);
        let warm = samples / 10;
        let (mut cpu0, mut child0, mut rss_warm, mut rss_half) = (0, 0, 0, 0);
        let mut start = Instant::now();
        for i in 0..samples {
            if i == warm {
                (cpu0, child0) = cpu_ticks();
                rss_warm = rss_kib();
                start = Instant::now();
            }
            if i == samples / 2 {
                rss_half = rss_kib();
            }
            telemetry.sample(&spawner, i as i64 * 5000).await;
        }
        let wall = start.elapsed();
        let (cpu1, child1) = cpu_ticks();
        let n = (samples - warm) as f64;
        let tick_ms = 1000.0 / 100.0; // USER_HZ is 100 on Linux
        let snap = telemetry.snapshot(samples as i64 * 5000);
        if snap.state != SampleState::Ok {
            eprintln!("gpu-sampler: the last sample is not ok: {:?}", snap.state);
            std::process::exit(1);
        }
        let attributed = snap.processes.iter().filter(|p| p.owner.is_some()).count();
        println!(
            "{{\"source\": \"{source}\", \"samples\": {samples}, \"gpus\": {}, \"processes\": {}, \"attributed\": {attributed}, \
             \"cpu_ms_per_sample\": {:.3}, \"child_cpu_ms_per_sample\": {:.3}, \"wall_ms_per_sample\": {:.3}, \
             \"rss_kib_after_tenth\": {rss_warm}, \"rss_kib_at_half\": {rss_half}, \"rss_kib_at_end\": {}}}",
            snap.gpus.len(),
            snap.processes.len(),
            (cpu1 - cpu0) as f64 * tick_ms / n,
            (child1 - child0) as f64 * tick_ms / n,
            wall.as_secs_f64() * 1000.0 / n,
            rss_kib(),
        );
    });
}
