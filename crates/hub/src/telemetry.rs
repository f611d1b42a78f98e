//! GPU telemetry: a sample every `gpu.sample_interval_seconds` of each GPU
//! (utilisation, memory, temperature, power) and of each compute process
//! (its memory), the processes attributed to the server whose container runs
//! them (host PID → `/proc/<pid>/cgroup` → container id → the container's
//! `berth.user` / `berth.server` labels, through `Spawner::list_managed`).
//!
//! The driver is read through [`GpuSource`]; the one source today is the
//! `nvidia-smi` CLI (tests put a stand-in on `PATH`). Any failure — no
//! `nvidia-smi`, a time-out, a non-zero exit — makes the sample *unknown*:
//! the last readings are dropped, idle tracking starts over, nothing
//! crashes. Culling must read [`Telemetry::idle_for`], which answers `None`
//! whenever the data is missing or stale, so a GPU is never taken for idle
//! without having been seen idle.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use berth_core::gpu_smi::{self, AppReading, GpuReading, Malformed};
use berth_spawner::{BoxFuture, Spawner};
use serde::Serialize;

/// What one read of the driver returned.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawSample {
    pub gpus: Vec<GpuReading>,
    pub apps: Vec<AppReading>,
}

/// Host PID → `(user, server)` of the container running it.
pub type Owners = HashMap<u32, (String, String)>;

/// Where samples come from.
pub trait GpuSource: Send + Sync {
    /// `nvidia-smi`, shown to admins.
    fn name(&self) -> &'static str;
    /// One sample, or why there is none.
    fn read(&self) -> BoxFuture<'_, Result<RawSample, String>>;
}

/// The `nvidia-smi` CLI, found on `PATH` (or at `program`).
pub struct NvidiaSmi {
    pub program: String,
    /// Each of the two runs is killed after this long.
    pub timeout: Duration,
    /// Malformed lines already logged as warnings (later repeats go to debug).
    logged: Mutex<HashSet<String>>,
}

/// Output beyond this is cut off (8 GPUs and 200 processes print ~20 KiB).
const MAX_OUTPUT: usize = 1 << 20;
/// Distinct malformed lines remembered so each is warned about once.
const MAX_LOGGED: usize = 256;

impl NvidiaSmi {
    pub fn new(program: impl Into<String>, timeout: Duration) -> NvidiaSmi {
        NvidiaSmi { program: program.into(), timeout, logged: Mutex::new(HashSet::new()) }
    }

    async fn run(&self, query: &str) -> Result<String, String> {
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.arg(query).arg("--format=csv,noheader,nounits").stdin(std::process::Stdio::null()).kill_on_drop(true);
        let out = match tokio::time::timeout(self.timeout, cmd.output()).await {
            Err(_) => return Err(format!("{} {query} took longer than {:?}", self.program, self.timeout)),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(format!("no {} on PATH", self.program))
            }
            Ok(Err(e)) => return Err(format!("cannot run {}: {e}", self.program)),
            Ok(Ok(o)) => o,
        };
        if !out.status.success() {
            let mut why: String = String::from_utf8_lossy(&out.stdout).trim().chars().take(200).collect();
            if why.is_empty() {
                why = String::from_utf8_lossy(&out.stderr).trim().chars().take(200).collect();
            }
            return Err(format!("{} {query} failed ({}): {why}", self.program, out.status));
        }
        let mut text = out.stdout;
        text.truncate(MAX_OUTPUT);
        Ok(String::from_utf8_lossy(&text).into_owned())
    }

    fn log_malformed(&self, what: &str, bad: &[Malformed]) {
        for m in bad.iter().take(16) {
            let first = match self.logged.lock() {
                Ok(mut seen) => {
                    if seen.len() >= MAX_LOGGED {
                        seen.clear();
                    }
                    seen.insert(m.line.clone())
                }
                Err(_) => true,
            };
            if first {
                tracing::warn!(query = what, line = %m.line, why = %m.why, "skipped a malformed line from nvidia-smi");
            } else {
                tracing::debug!(query = what, line = %m.line, why = %m.why, "skipped a malformed line from nvidia-smi");
            }
        }
    }
}

impl GpuSource for NvidiaSmi {
    fn name(&self) -> &'static str {
        "nvidia-smi"
    }

    fn read(&self) -> BoxFuture<'_, Result<RawSample, String>> {
        Box::pin(async move {
            let gpu_text = self.run(&format!("--query-gpu={}", gpu_smi::GPU_QUERY)).await?;
            let (gpus, bad) = gpu_smi::parse_gpus(&gpu_text);
            self.log_malformed("gpu", &bad);
            if gpus.is_empty() && !bad.is_empty() {
                return Err("nvidia-smi printed no GPU line that could be read".into());
            }
            let app_text = self.run(&format!("--query-compute-apps={}", gpu_smi::APPS_QUERY)).await?;
            let (apps, bad) = gpu_smi::parse_apps(&app_text);
            self.log_malformed("compute-apps", &bad);
            Ok(RawSample { gpus, apps })
        })
    }
}

/// A compute process, attributed when berth runs its container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Process {
    pub gpu_uuid: String,
    pub pid: u32,
    pub memory_mib: Option<u64>,
    /// `(user, server)`; the default server is `""`.
    pub owner: Option<(String, String)>,
}

/// Whether the latest sample says anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum SampleState {
    /// Sampling is off (`gpu.sampler = off`, GPUs off, or none to sample).
    Off,
    /// No sample yet.
    Pending,
    Ok,
    /// The last attempt failed: utilisation unknown.
    Unknown {
        reason: String,
    },
}

/// The latest sample.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Snapshot {
    /// Unix milliseconds of the sample (0 before the first).
    pub at_ms: i64,
    pub source: &'static str,
    #[serde(flatten)]
    pub state: SampleState,
    pub gpus: Vec<GpuReading>,
    pub processes: Vec<Process>,
}

impl Snapshot {
    fn empty(source: &'static str, state: SampleState) -> Snapshot {
        Snapshot { at_ms: 0, source, state, gpus: Vec::new(), processes: Vec::new() }
    }

    /// The reading of the device berth knows as `id`: by UUID, or by index
    /// for configured ids such as `0`.
    pub fn gpu(&self, id: &str) -> Option<&GpuReading> {
        self.gpus.iter().find(|g| g.uuid == id).or_else(|| self.gpus.iter().find(|g| g.index.to_string() == id))
    }

    /// The processes on the device berth knows as `id`.
    pub fn processes_on<'a>(&'a self, id: &str) -> impl Iterator<Item = &'a Process> + 'a {
        let uuid = self.gpu(id).map(|g| g.uuid.clone()).unwrap_or_else(|| id.to_string());
        self.processes.iter().filter(move |p| p.gpu_uuid == uuid)
    }
}

/// The sampler's state, shared by the job that fills it and everyone who
/// reads it (pages, the API, and — next — culling and metrics).
pub struct Telemetry {
    source: Option<Arc<dyn GpuSource>>,
    interval: Duration,
    idle_below_percent: u32,
    latest: RwLock<Arc<Snapshot>>,
    /// Device UUID → when its current idle run began (unix ms). Absent: busy,
    /// or not seen idle since the data was last missing.
    idle_since: Mutex<HashMap<String, i64>>,
    /// Whether the last attempt failed, so a failure is logged once, not every sample.
    failing: Mutex<Option<String>>,
}

impl Telemetry {
    pub fn new(source: Option<Arc<dyn GpuSource>>, interval: Duration, idle_below_percent: u32) -> Telemetry {
        let name = source.as_ref().map(|s| s.name()).unwrap_or("off");
        let state = if source.is_some() { SampleState::Pending } else { SampleState::Off };
        Telemetry {
            source,
            interval: interval.max(Duration::from_secs(1)),
            idle_below_percent,
            latest: RwLock::new(Arc::new(Snapshot::empty(name, state))),
            idle_since: Mutex::new(HashMap::new()),
            failing: Mutex::new(None),
        }
    }

    pub fn enabled(&self) -> bool {
        self.source.is_some()
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The latest sample; older than three intervals, it reads as unknown.
    pub fn snapshot(&self, now_ms: i64) -> Arc<Snapshot> {
        let s = self
            .latest
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|_| Arc::new(Snapshot::empty("off", SampleState::Off)));
        let stale_after = (self.interval.as_millis() as i64).saturating_mul(3).max(15_000);
        if s.state == SampleState::Ok && now_ms.saturating_sub(s.at_ms) > stale_after {
            let mut stale = Snapshot::empty(
                s.source,
                SampleState::Unknown { reason: format!("no sample for {} s", now_ms.saturating_sub(s.at_ms) / 1000) },
            );
            stale.at_ms = s.at_ms;
            return Arc::new(stale);
        }
        s
    }

    /// How long the device has been seen idle (utilisation below
    /// `gpu.idle_below_percent` in every sample), or `None` when that is not
    /// known: no fresh sample, the utilisation not reported, or busy now.
    pub fn idle_for(&self, id: &str, now_ms: i64) -> Option<Duration> {
        let snap = self.snapshot(now_ms);
        if snap.state != SampleState::Ok {
            return None;
        }
        let uuid = snap.gpu(id)?.uuid.clone();
        let since = *self.idle_since.lock().ok()?.get(&uuid)?;
        Some(Duration::from_millis(u64::try_from(snap.at_ms.saturating_sub(since)).unwrap_or(0)))
    }

    /// Takes one sample: reads the source, attributes the processes through
    /// `spawner`'s containers, and records it. Never fails; a failure makes
    /// the sample unknown.
    pub async fn sample(&self, spawner: &dyn Spawner, now_ms: i64) {
        let Some(source) = &self.source else { return };
        // The source bounds each of its runs; this bounds the whole sample.
        let limit = self.interval.max(Duration::from_secs(10)) * 2;
        let read = match tokio::time::timeout(limit, source.read()).await {
            Ok(r) => r,
            Err(_) => Err(format!("the sample took longer than {limit:?}")),
        };
        let result = match read {
            Ok(raw) => {
                let owners = attribute(spawner, &raw.apps).await;
                Ok((raw, owners))
            }
            Err(e) => Err(e),
        };
        self.record(source.name(), result, now_ms);
    }

    fn record(&self, source: &'static str, result: Result<(RawSample, Owners), String>, now_ms: i64) {
        let snap = match result {
            Ok((raw, owners)) => {
                if let Ok(mut f) = self.failing.lock() {
                    if let Some(was) = f.take() {
                        tracing::info!(previously = %was, "GPU telemetry is back");
                    }
                }
                if let Ok(mut idle) = self.idle_since.lock() {
                    let seen: HashSet<&str> = raw.gpus.iter().map(|g| g.uuid.as_str()).collect();
                    idle.retain(|k, _| seen.contains(k.as_str()));
                    for g in &raw.gpus {
                        match g.utilization_percent {
                            Some(u) if u < self.idle_below_percent => {
                                idle.entry(g.uuid.clone()).or_insert(now_ms);
                            }
                            _ => {
                                idle.remove(&g.uuid);
                            }
                        }
                    }
                }
                let processes = raw
                    .apps
                    .into_iter()
                    .map(|a| Process {
                        owner: owners.get(&a.pid).cloned(),
                        gpu_uuid: a.gpu_uuid,
                        pid: a.pid,
                        memory_mib: a.memory_mib,
                    })
                    .collect();
                Snapshot { at_ms: now_ms, source, state: SampleState::Ok, gpus: raw.gpus, processes }
            }
            Err(reason) => {
                if let Ok(mut f) = self.failing.lock() {
                    if f.as_deref() != Some(reason.as_str()) {
                        tracing::warn!(%reason, "GPU utilisation unknown");
                        *f = Some(reason.clone());
                    }
                }
                // Idleness must be seen again from the start once data returns.
                if let Ok(mut idle) = self.idle_since.lock() {
                    idle.clear();
                }
                let mut s = Snapshot::empty(source, SampleState::Unknown { reason });
                s.at_ms = now_ms;
                s
            }
        };
        if let Ok(mut l) = self.latest.write() {
            *l = Arc::new(snap);
        }
    }
}

/// Maps each process's host PID to the server whose container runs it.
async fn attribute(spawner: &dyn Spawner, apps: &[AppReading]) -> Owners {
    // Every `/proc/<pid>/cgroup` in one blocking task: a hand-off to the
    // blocking pool per file cost more than reading it (200 processes:
    // about 4 ms of CPU a sample, see bench/RESULTS.md).
    let pids: Vec<u32> = apps.iter().take(4096).map(|a| a.pid).collect();
    let by_container = tokio::task::spawn_blocking(move || {
        let mut by_container: HashMap<u32, String> = HashMap::new();
        let mut text = String::new();
        for pid in pids {
            if by_container.contains_key(&pid) {
                continue;
            }
            text.clear();
            let read = std::fs::File::open(format!("/proc/{pid}/cgroup"))
                .and_then(|mut f| std::io::Read::read_to_string(&mut f, &mut text));
            if read.is_ok() {
                if let Some(id) = gpu_smi::container_id_from_cgroup(&text) {
                    by_container.insert(pid, id);
                }
            }
        }
        by_container
    })
    .await
    .unwrap_or_default();
    if by_container.is_empty() {
        return HashMap::new();
    }
    let containers: HashMap<String, (String, String)> =
        spawner.list_managed().await.into_iter().map(|(u, s, id)| (id, (u, s))).collect();
    by_container.into_iter().filter_map(|(pid, c)| Some((pid, containers.get(&c)?.clone()))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(uuid: &str, util: Option<u32>) -> GpuReading {
        GpuReading {
            index: 0,
            uuid: uuid.into(),
            name: "T4".into(),
            utilization_percent: util,
            memory_used_mib: Some(1),
            memory_total_mib: Some(15360),
            temperature_c: Some(40),
            power_w: None,
        }
    }

    fn ok(gpus: Vec<GpuReading>) -> Result<(RawSample, Owners), String> {
        Ok((RawSample { gpus, apps: vec![] }, HashMap::new()))
    }

    #[test]
    fn idle_is_known_only_after_being_seen_and_forgotten_on_missing_data() {
        let t = Telemetry::new(None, Duration::from_secs(5), 5);
        assert_eq!(t.idle_for("GPU-a", 0), None, "no sample");
        t.record("test", ok(vec![gpu("GPU-a", Some(0)), gpu("GPU-b", Some(90))]), 10_000);
        assert_eq!(t.idle_for("GPU-a", 10_000), Some(Duration::ZERO));
        assert_eq!(t.idle_for("GPU-b", 10_000), None, "busy");
        t.record("test", ok(vec![gpu("GPU-a", Some(4)), gpu("GPU-b", Some(90))]), 15_000);
        assert_eq!(t.idle_for("GPU-a", 15_000), Some(Duration::from_secs(5)));
        assert_eq!(t.idle_for("GPU-a", 60_000), None, "stale data is not idleness");
        t.record("test", Err("no nvidia-smi on PATH".into()), 20_000);
        assert_eq!(t.idle_for("GPU-a", 20_000), None, "unknown");
        assert!(matches!(t.snapshot(20_000).state, SampleState::Unknown { .. }));
        t.record("test", ok(vec![gpu("GPU-a", Some(0)), gpu("GPU-b", None)]), 25_000);
        assert_eq!(t.idle_for("GPU-a", 25_000), Some(Duration::ZERO), "the idle run starts again");
        assert_eq!(t.idle_for("GPU-b", 25_000), None, "utilisation not reported");
        assert_eq!(t.idle_for("GPU-c", 25_000), None, "not in the sample");
    }

    #[test]
    fn configured_ids_match_by_index() {
        let mut g = gpu("GPU-a", Some(3));
        g.index = 2;
        let s = Snapshot { at_ms: 1, source: "test", state: SampleState::Ok, gpus: vec![g], processes: vec![] };
        assert_eq!(s.gpu("2").map(|g| g.uuid.as_str()), Some("GPU-a"));
        assert_eq!(s.gpu("GPU-a").map(|g| g.index), Some(2));
        assert!(s.gpu("3").is_none());
    }

    fn script(dir: &std::path::Path, body: &str) -> String {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join("nvidia-smi");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p.display().to_string()
    }

    #[tokio::test]
    async fn the_cli_source_fails_cleanly_and_in_time() {
        let dir = tempfile::tempdir().unwrap();
        let missing = NvidiaSmi::new(dir.path().join("absent").display().to_string(), Duration::from_secs(5));
        assert!(missing.read().await.unwrap_err().starts_with("no "), "a missing program");
        let hangs = NvidiaSmi::new(script(dir.path(), "exec sleep 30"), Duration::from_millis(300));
        let t = std::time::Instant::now();
        let e = hangs.read().await.unwrap_err();
        assert!(e.contains("took longer than") && t.elapsed() < Duration::from_secs(5), "{e}");
        let fails = NvidiaSmi::new(script(dir.path(), "echo 'No devices were found'; exit 6"), Duration::from_secs(5));
        assert!(fails.read().await.unwrap_err().contains("No devices were found"));
        let junk = NvidiaSmi::new(script(dir.path(), "echo junk"), Duration::from_secs(5));
        assert_eq!(junk.read().await.unwrap_err(), "nvidia-smi printed no GPU line that could be read");
        let good = NvidiaSmi::new(
            script(dir.path(), "case \"$1\" in --query-gpu=*) echo '0, GPU-a, T4, 7, 1, 15360, 40, 27.5';; *) echo 'GPU-a, 99, 12';; esac"),
            Duration::from_secs(5),
        );
        let raw = good.read().await.unwrap();
        assert_eq!((raw.gpus.len(), raw.gpus[0].utilization_percent), (1, Some(7)));
        assert_eq!(raw.apps, [AppReading { gpu_uuid: "GPU-a".into(), pid: 99, memory_mib: Some(12) }]);
    }
}
