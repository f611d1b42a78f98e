//! What the gateway asks of the hub, as a trait of its own: the server
//! crate implements it over `berth-hub`, tests can implement it over
//! anything. Like russh's handler, every method rejects by default, so an
//! implementation grants only what it means to.

use std::sync::Arc;

use berth_spawner::{BoxFuture, Spawner};
use serde_json::Value;
use tokio::sync::mpsc;

/// A key accepted for a log-in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLogin {
    pub key_id: String,
    pub fingerprint: String,
}

/// One finished SSH session, for the audit trail.
#[derive(Debug, Clone)]
pub struct SessionRecord {
    pub user: String,
    pub server: String,
    pub peer: String,
    pub seconds: f64,
    pub bytes_to_client: u64,
    pub bytes_from_client: u64,
    pub fingerprint: String,
}

pub trait Upstream: Send + Sync + 'static {
    /// Whether `user` may log in with the key of `fingerprint` (`SHA256:…`).
    /// Asked on every attempt, so a removed key or account is refused at once.
    fn authenticate<'a>(&'a self, _user: &'a str, _fingerprint: &'a str) -> BoxFuture<'a, Option<KeyLogin>> {
        Box::pin(async { None })
    }

    /// The spawner state of `user`'s server `server` once it runs — starting
    /// it first when that is allowed — with progress lines for the terminal
    /// sent to `progress`; or the message to show instead.
    fn ensure_running<'a>(
        &'a self,
        user: &'a str,
        _server: &'a str,
        _progress: mpsc::UnboundedSender<String>,
    ) -> BoxFuture<'a, Result<Value, String>> {
        Box::pin(async move { Err(format!("{user}'s environment cannot be reached over SSH here")) })
    }

    /// The spawner that runs the sessions' processes and forwards.
    fn spawner(&self) -> Option<Arc<dyn Spawner>> {
        None
    }

    /// A key was used to log in.
    fn key_used<'a>(&'a self, _key_id: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    /// A connection logged in to `user`'s server `server` (counted by the
    /// hub: an open session keeps the server from being culled).
    fn session_opened(&self, _user: &str, _server: &str) {}

    /// That connection closed (called once for each `session_opened`).
    fn session_closed(&self, _user: &str, _server: &str) {}

    /// A session ended.
    fn session_ended(&self, _record: SessionRecord) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}
