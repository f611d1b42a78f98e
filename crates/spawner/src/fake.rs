//! Failure-mode fakes: spawners that fail, or start something that never
//! answers — things a real single-user server will not do on demand.

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::json;

use crate::{BoxFuture, ProgressTx, SpawnError, SpawnSpec, Spawner, Started, Status, StopGrace};

/// Starts "successfully" but points at a port where nothing listens.
#[derive(Default)]
pub struct NeverReady {
    stopped: Mutex<HashMap<String, bool>>,
}

impl Spawner for NeverReady {
    fn kind(&self) -> &'static str {
        "fake-never-ready"
    }
    fn start(&self, spec: SpawnSpec, _p: ProgressTx) -> BoxFuture<'_, Result<Started, SpawnError>> {
        Box::pin(async move {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let key = format!("{}/{}", spec.user, spec.server);
            if let Ok(mut m) = self.stopped.lock() {
                m.insert(key.clone(), false);
            }
            let target = format!("http://127.0.0.1:{port}");
            Ok(Started { target: target.clone(), state: json!({"key": key, "target": target}) })
        })
    }
    fn stop<'a>(&'a self, state: &'a serde_json::Value, _g: StopGrace) -> BoxFuture<'a, Result<(), SpawnError>> {
        Box::pin(async move {
            if let (Some(k), Ok(mut m)) = (state.get("key").and_then(|k| k.as_str()), self.stopped.lock()) {
                m.insert(k.to_string(), true);
            }
            Ok(())
        })
    }
    fn poll<'a>(&'a self, state: &'a serde_json::Value) -> BoxFuture<'a, Result<Status, SpawnError>> {
        Box::pin(async move {
            let k = state.get("key").and_then(|k| k.as_str()).unwrap_or_default();
            let stopped = self.stopped.lock().ok().and_then(|m| m.get(k).copied()).unwrap_or(true);
            Ok(if stopped { Status::Exited("stopped".into()) } else { Status::Running })
        })
    }
}

/// Fails every start with the given message.
pub struct Failing(pub String);

impl Spawner for Failing {
    fn kind(&self) -> &'static str {
        "fake-failing"
    }
    fn start(&self, _s: SpawnSpec, _p: ProgressTx) -> BoxFuture<'_, Result<Started, SpawnError>> {
        let msg = self.0.clone();
        Box::pin(async move { Err(SpawnError::Failed(msg)) })
    }
    fn stop<'a>(&'a self, _s: &'a serde_json::Value, _g: StopGrace) -> BoxFuture<'a, Result<(), SpawnError>> {
        Box::pin(async { Ok(()) })
    }
    fn poll<'a>(&'a self, _s: &'a serde_json::Value) -> BoxFuture<'a, Result<Status, SpawnError>> {
        Box::pin(async { Ok(Status::Exited("never started".into())) })
    }
}

/// Runs nothing; what it says of a server is what its saved state says:
/// `{"alive": true, "target": …}` is running. For re-adoption tests, where
/// the records are written as an earlier berth left them.
#[derive(Default)]
pub struct Scripted;

impl Spawner for Scripted {
    fn kind(&self) -> &'static str {
        "fake-scripted"
    }
    fn start(&self, spec: SpawnSpec, _p: ProgressTx) -> BoxFuture<'_, Result<Started, SpawnError>> {
        Box::pin(async move {
            Err(SpawnError::Failed(format!("the scripted spawner does not start servers ({})", spec.user)))
        })
    }
    fn stop<'a>(&'a self, _s: &'a serde_json::Value, _g: StopGrace) -> BoxFuture<'a, Result<(), SpawnError>> {
        Box::pin(async { Ok(()) })
    }
    fn poll<'a>(&'a self, state: &'a serde_json::Value) -> BoxFuture<'a, Result<Status, SpawnError>> {
        Box::pin(async move {
            Ok(if state.get("alive").and_then(|a| a.as_bool()).unwrap_or(false) {
                Status::Running
            } else {
                Status::Exited("its process is gone".into())
            })
        })
    }
}
