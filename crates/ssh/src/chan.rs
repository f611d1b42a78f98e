//! What a connection and the tasks running its channels' processes share:
//! who logged in, a channel's process control and terminal size, and the
//! bytes moved.

use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, OnceLock};

use berth_spawner::exec::ExecControl;

/// Who logged in, and to which server.
#[derive(Debug, Clone)]
pub(crate) struct Login {
    pub(crate) user: String,
    pub(crate) server: String,
    pub(crate) key_id: String,
    pub(crate) fingerprint: String,
}

impl Login {
    pub(crate) fn describe(&self) -> String {
        if self.server.is_empty() {
            self.user.clone()
        } else {
            format!("{}/{}", self.user, self.server)
        }
    }
}

/// What a channel shares with the task running its process.
#[derive(Default)]
pub(crate) struct ChanShared {
    pub(crate) control: OnceLock<Box<dyn ExecControl>>,
    /// The latest terminal size, applied once the process runs.
    pub(crate) size: Mutex<Option<(u16, u16)>>,
}

/// Bytes moved, for the audit line.
#[derive(Default)]
pub(crate) struct Traffic {
    pub(crate) to_client: AtomicU64,
    pub(crate) from_client: AtomicU64,
}
