//! Parsing what `nvidia-smi` prints for the sampler's two queries, and the
//! container id in a process's `/proc/<pid>/cgroup`. Pure: the hub runs the
//! tool and reads the files.
//!
//! `--format=csv,noheader,nounits` prints one line per GPU (or process),
//! fields separated by `", "`, numbers without units; a field the device
//! cannot report reads `[N/A]`, `[Not Supported]`, `[Unknown Error]` and the
//! like. Such a field is `None`; a line with the wrong number of fields or a
//! field that is neither a number nor such a marker is malformed and skipped
//! (the caller logs it).

use serde::Serialize;

/// `--query-gpu=` fields, in the order the parser expects them.
pub const GPU_QUERY: &str = "index,uuid,name,utilization.gpu,memory.used,memory.total,temperature.gpu,power.draw";
/// `--query-compute-apps=` fields, in the order the parser expects them.
pub const APPS_QUERY: &str = "gpu_uuid,pid,used_memory";

/// One GPU in one sample.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuReading {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    /// Percent of the last sample period a kernel ran.
    pub utilization_percent: Option<u32>,
    pub memory_used_mib: Option<u64>,
    pub memory_total_mib: Option<u64>,
    pub temperature_c: Option<u32>,
    pub power_w: Option<f64>,
}

/// One compute process on one GPU, as the driver sees it (host PID).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AppReading {
    pub gpu_uuid: String,
    pub pid: u32,
    pub memory_mib: Option<u64>,
}

/// A line that did not parse, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    pub line: String,
    pub why: String,
}

fn fields(line: &str, want: usize) -> Result<Vec<&str>, String> {
    let f: Vec<&str> = line.split(',').map(str::trim).collect();
    if f.len() != want {
        return Err(format!("{} fields, expected {want}", f.len()));
    }
    Ok(f)
}

/// `[N/A]`, `[Not Supported]`, `[Unknown Error]`, `[GPU is lost]`, … and
/// `N/A` without brackets (older drivers).
fn unavailable(field: &str) -> bool {
    (field.starts_with('[') && field.ends_with(']')) || field == "N/A"
}

fn number<T: std::str::FromStr>(field: &str, what: &str) -> Result<Option<T>, String> {
    if unavailable(field) {
        return Ok(None);
    }
    field.parse::<T>().map(Some).map_err(|_| format!("{what} is {field:?}, not a number"))
}

fn required<T: std::str::FromStr>(field: &str, what: &str) -> Result<T, String> {
    number(field, what)?.ok_or_else(|| format!("{what} is missing"))
}

fn each_line<T>(text: &str, parse: impl Fn(&str) -> Result<T, String>) -> (Vec<T>, Vec<Malformed>) {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        match parse(line) {
            Ok(v) => good.push(v),
            Err(why) => bad.push(Malformed { line: line.chars().take(200).collect(), why }),
        }
    }
    (good, bad)
}

fn gpu_line(line: &str) -> Result<GpuReading, String> {
    // The name may hold no comma in any product NVIDIA ships; a line that
    // has one more field than expected is malformed rather than guessed at.
    let f = fields(line, 8)?;
    let uuid = f[1];
    if uuid.is_empty() || unavailable(uuid) {
        return Err("no uuid".into());
    }
    Ok(GpuReading {
        index: required(f[0], "index")?,
        uuid: uuid.to_string(),
        name: f[2].to_string(),
        utilization_percent: number(f[3], "utilization.gpu")?,
        memory_used_mib: number(f[4], "memory.used")?,
        memory_total_mib: number(f[5], "memory.total")?,
        temperature_c: number(f[6], "temperature.gpu")?,
        power_w: number::<f64>(f[7], "power.draw")?.filter(|p| p.is_finite()),
    })
}

fn app_line(line: &str) -> Result<AppReading, String> {
    let f = fields(line, 3)?;
    if f[0].is_empty() || unavailable(f[0]) {
        return Err("no gpu_uuid".into());
    }
    Ok(AppReading { gpu_uuid: f[0].to_string(), pid: required(f[1], "pid")?, memory_mib: number(f[2], "used_memory")? })
}

/// Parses `nvidia-smi --query-gpu=GPU_QUERY --format=csv,noheader,nounits`.
pub fn parse_gpus(text: &str) -> (Vec<GpuReading>, Vec<Malformed>) {
    each_line(text, gpu_line)
}

/// Parses `nvidia-smi --query-compute-apps=APPS_QUERY --format=csv,noheader,nounits`.
/// No compute process prints nothing (or, on some drivers, a line saying so,
/// which is skipped as malformed).
pub fn parse_apps(text: &str) -> (Vec<AppReading>, Vec<Malformed>) {
    each_line(text, app_line)
}

/// The Docker container a process runs in, from its `/proc/<pid>/cgroup`:
/// cgroup v1 with the cgroupfs driver (`…:/docker/<id>`), v1 or v2 with the
/// systemd driver (`…/docker-<id>.scope`), v2 with cgroupfs
/// (`0::/docker/<id>`). `None` for a process outside containers.
pub fn container_id_from_cgroup(text: &str) -> Option<String> {
    for line in text.lines().take(64) {
        let path = line.splitn(3, ':').nth(2).unwrap_or("");
        for part in path.split('/').rev() {
            let part = part.strip_suffix(".scope").unwrap_or(part);
            let part = part.strip_prefix("docker-").unwrap_or(part);
            if part.len() == 64 && part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Some(part.to_ascii_lowercase());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two GPUs as the query prints them; the second cannot report its power.
    const TWO: &str =
        "0, GPU-5b2c7e0e-3f1d-2a4b-9c8e-1d2f3a4b5c6d, NVIDIA A100-SXM4-80GB, 87, 40536, 81920, 61, 312.45\n\
                       1, GPU-77aa01b2-c3d4-e5f6-a7b8-c9d0e1f2a3b4, NVIDIA A100-SXM4-80GB, 0, 4, 81920, 33, [N/A]\n";

    #[test]
    fn gpus_parse_with_unavailable_fields() {
        let (g, bad) = parse_gpus(TWO);
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].uuid, "GPU-5b2c7e0e-3f1d-2a4b-9c8e-1d2f3a4b5c6d");
        assert_eq!(g[0].name, "NVIDIA A100-SXM4-80GB");
        assert_eq!(
            (g[0].utilization_percent, g[0].memory_used_mib, g[0].memory_total_mib, g[0].temperature_c),
            (Some(87), Some(40536), Some(81920), Some(61))
        );
        assert_eq!(g[0].power_w, Some(312.45));
        assert_eq!((g[1].index, g[1].power_w), (1, None));
        // A MIG-enabled GPU reports no utilisation.
        let (g, bad) = parse_gpus("2, GPU-abc, NVIDIA A100-PCIE-40GB, [N/A], 13, 40960, 30, 35.10");
        assert!(bad.is_empty());
        assert_eq!(g[0].utilization_percent, None);
    }

    #[test]
    fn malformed_lines_are_skipped_with_the_reason() {
        let text = format!("{TWO}garbage\n0, GPU-x, T4, lots, 1, 2, 3, 4\n, , , , , , ,\n3, GPU-y, T4, 1, 2, 3, 4\n");
        let (g, bad) = parse_gpus(&text);
        assert_eq!(g.len(), 2, "the good lines stay");
        let why: Vec<&str> = bad.iter().map(|b| b.why.as_str()).collect();
        assert_eq!(
            why,
            ["1 fields, expected 8", "utilization.gpu is \"lots\", not a number", "no uuid", "7 fields, expected 8"]
        );
        assert_eq!(parse_gpus("").0, vec![]);
        assert_eq!(parse_gpus("-1, GPU-z, T4, 1, 2, 3, 4, 5").1.len(), 1, "a negative index");
    }

    #[test]
    fn apps_parse() {
        let text = "GPU-5b2c, 4242, 20480\nGPU-5b2c, 4343, [N/A]\nGPU-77aa, notapid, 3\nNo running processes found\n";
        let (a, bad) = parse_apps(text);
        assert_eq!(
            a,
            [
                AppReading { gpu_uuid: "GPU-5b2c".into(), pid: 4242, memory_mib: Some(20480) },
                AppReading { gpu_uuid: "GPU-5b2c".into(), pid: 4343, memory_mib: None },
            ]
        );
        assert_eq!(bad.len(), 2);
    }

    #[test]
    fn container_ids_from_cgroups() {
        let id = "4f1c0a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f";
        let cases = [
            (format!("12:memory:/docker/{id}\n11:pids:/docker/{id}\n"), Some(id)),
            (format!("0::/system.slice/docker-{id}.scope\n"), Some(id)),
            (format!("0::/docker/{id}\n"), Some(id)),
            (format!("1:name=systemd:/docker/{id}/init.scope\n"), Some(id)),
            ("0::/user.slice/user-1000.slice/session-2.scope\n".to_string(), None),
            ("4:memory:/process_api/e8384610fb25e8a269a6797fb6b7e453\n".to_string(), None),
            (String::new(), None),
        ];
        for (text, want) in cases {
            assert_eq!(container_id_from_cgroup(&text).as_deref(), want, "{text}");
        }
    }
}
