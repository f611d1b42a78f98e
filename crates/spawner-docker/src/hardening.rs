//! What keeps a server's container from reaching beyond itself: the
//! capabilities it runs without, no new privileges, its process and memory
//! limits, and no GPU unless it holds one.

use crate::config::Config;

/// `SecurityOpt` of every server container: setuid binaries and file
/// capabilities cannot raise a process's privileges.
pub(crate) const SECURITY_OPT: &[&str] = &["no-new-privileges:true"];

/// Capabilities a notebook server does not need. Images that start as root
/// and switch to a user keep what that takes (CHOWN, DAC_OVERRIDE, FOWNER,
/// FSETID, KILL, SETGID, SETUID, SETPCAP).
pub(crate) const CAP_DROP: &[&str] = &[
    // Raw sockets: ping, ARP and packet spoofing on the network.
    "NET_RAW",
    "MKNOD",
    "AUDIT_WRITE",
    "SYS_CHROOT",
    "SETFCAP",
    "NET_BIND_SERVICE",
];

const MIB: u64 = 1024 * 1024;

/// `NVIDIA_VISIBLE_DEVICES` for a server holding `gpus`: their ids, or
/// `void` (the NVIDIA runtime then mounts no GPU, whatever the image's
/// environment or the engine's default runtime says).
pub(crate) fn visible_devices(gpus: &[String]) -> String {
    if gpus.is_empty() {
        "void".to_string()
    } else {
        gpus.join(",")
    }
}

/// `PidsLimit`: the configured limit, none for 0.
pub(crate) fn pids_limit(cfg: &Config) -> Option<i64> {
    (cfg.pids_limit > 0).then(|| i64::try_from(cfg.pids_limit).unwrap_or(i64::MAX))
}

/// The memory limit in bytes: `mem_limit_mib` when positive; otherwise none
/// when `mem_unlimited`, else three quarters of the host's memory rounded
/// down to a MiB (none when that is unknown).
pub(crate) fn memory_limit(cfg: &Config, host_bytes: Option<u64>) -> Option<i64> {
    let bytes = if cfg.mem_limit_mib > 0 {
        cfg.mem_limit_mib.saturating_mul(MIB)
    } else if cfg.mem_unlimited {
        return None;
    } else {
        // Whole MiB, as the engine's other limits are given.
        host_bytes? / 4 * 3 / MIB * MIB
    };
    Some(i64::try_from(bytes).unwrap_or(i64::MAX))
}

/// `MemTotal` of a `/proc/meminfo`, in bytes.
pub(crate) fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line.split_whitespace().skip(1);
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => n.checked_mul(1024),
        Some(_) => None,
    }
}

/// The host's memory in bytes, read once; unreadable is logged, once.
pub(crate) fn host_memory() -> Option<u64> {
    static HOST: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *HOST.get_or_init(|| {
        let read = std::fs::read_to_string("/proc/meminfo");
        let total = read.as_deref().ok().and_then(parse_mem_total);
        if total.is_none() {
            let why = match &read {
                Err(e) => e.to_string(),
                Ok(_) => "no MemTotal line".to_string(),
            };
            tracing::warn!(
                error = %why,
                "cannot read the host's memory from /proc/meminfo: server containers run without a memory limit; \
                 set docker.mem_limit_mib to give them one"
            );
        }
        total
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory() {
        let gib = 1024 * 1024 * 1024;
        let cfg = |mib, unlimited| Config { mem_limit_mib: mib, mem_unlimited: unlimited, ..Config::default() };
        // 0: three quarters of the host's memory.
        assert_eq!(memory_limit(&cfg(0, false), Some(8 * gib)), Some(6 * gib as i64));
        // Unknown host memory: no limit rather than a guess.
        assert_eq!(memory_limit(&cfg(0, false), None), None);
        // Explicitly none.
        assert_eq!(memory_limit(&cfg(0, true), Some(8 * gib)), None);
        // A positive value as given, whatever else is set.
        assert_eq!(memory_limit(&cfg(512, false), Some(8 * gib)), Some(512 * 1024 * 1024));
        assert_eq!(memory_limit(&cfg(512, true), None), Some(512 * 1024 * 1024));
        assert_eq!(memory_limit(&cfg(u64::MAX, false), None), Some(i64::MAX));
        assert_eq!(memory_limit(&cfg(0, false), Some(24683584 * 1024)), Some(18078 * 1024 * 1024));
    }

    #[test]
    fn meminfo() {
        let text = "MemTotal:       24683584 kB\nMemFree:        19354664 kB\n";
        assert_eq!(parse_mem_total(text), Some(24683584 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: lots\n"), None);
        assert_eq!(parse_mem_total("MemTotal: 3 MB\n"), None);
        assert!(host_memory().is_some_and(|b| b > 0), "this machine has a /proc/meminfo");
    }

    #[test]
    fn pids_and_gpus() {
        assert_eq!(pids_limit(&Config::default()), Some(4096));
        assert_eq!(pids_limit(&Config { pids_limit: 0, ..Config::default() }), None);
        assert_eq!(visible_devices(&[]), "void");
        assert_eq!(visible_devices(&["GPU-1".into(), "GPU-3".into()]), "GPU-1,GPU-3");
    }
}
