//! A stand-in `nvidia-smi` for tests without a GPU: it prints what the real
//! tool prints for the sampler's two queries (`--format=csv,noheader,nounits`),
//! reading its lines from files the test writes (and rewrites, to change the
//! readings while berth runs).

use std::path::{Path, PathBuf};
use std::process::Command;

pub(crate) const GPU0: &str = "GPU-5b2c7e0e-3f1d-2a4b-9c8e-1d2f3a4b5c6d";
pub(crate) const GPU1: &str = "GPU-77aa01b2-c3d4-e5f6-a7b8-c9d0e1f2a3b4";
pub(crate) const GPU2: &str = "GPU-0c0c0c0c-1d1d-2e2e-3f3f-404040404040";

/// The stand-in: answers exactly the two queries berth makes (anything else
/// fails, so a changed query is caught), from `gpus.csv` and `apps.csv`
/// next to it; with `fail` next to it, fails as the real tool does when the
/// driver is gone.
pub(crate) const STANDIN: &str = r#"#!/bin/sh
dir=$(dirname "$0")
if [ -e "$dir/fail" ]; then
  echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that the latest NVIDIA driver is installed and running."
  exit 9
fi
case "$1 $2" in
  "--query-gpu=index,uuid,name,utilization.gpu,memory.used,memory.total,temperature.gpu,power.draw --format=csv,noheader,nounits")
    cat "$dir/gpus.csv" ;;
  "--query-compute-apps=gpu_uuid,pid,used_memory --format=csv,noheader,nounits")
    cat "$dir/apps.csv" ;;
  *) echo "stand-in nvidia-smi: unexpected arguments: $*" >&2; exit 2 ;;
esac
"#;

pub(crate) struct Standin {
    dir: tempfile::TempDir,
}

impl Standin {
    pub(crate) fn new(gpus: &str, apps: &str) -> Standin {
        let dir = tempfile::tempdir().unwrap();
        let s = Standin { dir };
        s.install();
        s.write(gpus, apps);
        s
    }

    pub(crate) fn script(&self) -> PathBuf {
        self.dir.path().join("nvidia-smi")
    }

    pub(crate) fn install(&self) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(self.script(), STANDIN).unwrap();
        std::fs::set_permissions(self.script(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    pub(crate) fn write(&self, gpus: &str, apps: &str) {
        // Written aside and renamed, so the stand-in never prints half a file.
        for (name, text) in [("gpus.csv", gpus), ("apps.csv", apps)] {
            let tmp = self.dir.path().join(format!(".{name}"));
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, self.dir.path().join(name)).unwrap();
        }
    }

    /// `PATH` with the stand-in first.
    pub(crate) fn path(&self) -> String {
        format!("{}:{}", self.dir.path().display(), std::env::var("PATH").unwrap_or_default())
    }

    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Three GPUs as the real query prints them; the third cannot report power.
pub(crate) fn three_gpus(util0: u32) -> String {
    format!(
        "0, {GPU0}, NVIDIA A100-SXM4-80GB, {util0}, 40536, 81920, 61, 312.45\n\
         1, {GPU1}, NVIDIA A100-SXM4-80GB, 0, 1101, 81920, 33, 58.02\n\
         2, {GPU2}, Tesla T4, 3, 0, 15360, 40, [N/A]\n"
    )
}

/// The host PID of a container's first process.
pub(crate) fn host_pid(container: &str) -> u32 {
    let out = Command::new("docker").args(["inspect", "-f", "{{.State.Pid}}", container]).output().unwrap();
    assert!(out.status.success(), "docker inspect {container}");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}
