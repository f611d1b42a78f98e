//! What `/proc` tells about a local server: whether the process recorded in
//! its state is still that process, and what is left in its process group.

use std::time::Duration;

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

/// The fields of /proc/<pid>/stat after the command name (which is in
/// parentheses and may contain spaces): state, ppid, pgrp, …
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.get(stat.rfind(')')? + 2..)?;
    Some(after.split_whitespace().map(str::to_string).collect())
}

/// The kernel's start time of a process (field 22 of /proc/<pid>/stat), to
/// tell a re-used pid from ours.
pub(super) fn start_time(pid: u32) -> Option<u64> {
    stat_fields(pid)?.get(19)?.parse().ok()
}

fn is_zombie(pid: u32) -> bool {
    stat_fields(pid).and_then(|f| f.first().map(|s| s == "Z")).unwrap_or(false)
}

/// The real uid a process runs as (the first field of `Uid:` in its status).
pub(super) fn process_uid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().next()?.parse().ok()
}

/// Whether `pid` still runs and is the process recorded: the same start
/// time and, when the state names one, the same account.
pub(super) fn alive(pid: u32, started: Option<u64>, uid: Option<u32>) -> bool {
    if kill(Pid::from_raw(pid as i32), None).is_err() || is_zombie(pid) {
        return false;
    }
    if let (Some(want), Some(runs_as)) = (uid, process_uid(pid)) {
        if want != runs_as {
            return false;
        }
    }
    match (started, start_time(pid)) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    }
}

/// The live processes of process group `pgid`.
pub(super) fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            stat_fields(*pid)
                .is_some_and(|f| f.first().is_some_and(|s| s != "Z") && f.get(2) == Some(&pgid.to_string()))
        })
        .collect()
}

/// After the server's leader exited: terminates what it left in its group
/// (a shell's background job, a kernel), then kills what is still there
/// after `grace`. Call it only right after seeing the leader alive, so the
/// group's id cannot have been reused.
pub(super) async fn end_group(pgid: u32, grace: Duration) {
    if group_members(pgid).is_empty() {
        return;
    }
    let group = Pid::from_raw(pgid as i32);
    let _ = killpg(group, Signal::SIGTERM);
    let deadline = tokio::time::Instant::now() + grace;
    while tokio::time::Instant::now() < deadline {
        if group_members(pgid).is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::warn!(pgid, "processes the server left did not stop in time; killing them");
    let _ = killpg(group, Signal::SIGKILL);
}
