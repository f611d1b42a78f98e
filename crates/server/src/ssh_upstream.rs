//! The SSH gateway's view of the hub: `berth_ssh::Upstream` implemented
//! over `berth-hub` — keys checked by the hub's rules, servers started and
//! waited for by the hub's lifecycle (the same `wait_settled` as the REST
//! API), sessions recorded as events.

use std::sync::Arc;
use std::time::Duration;

use berth_core::{ServerId, ServerState};
use berth_hub::{HubError, ProgressEvent, Settled};
use berth_spawner::{BoxFuture, Spawner};
use berth_ssh::{KeyLogin, SessionRecord, Upstream};
use berth_web::SharedHub;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// How long a connection waits for a server to start.
const START_WAIT: Duration = Duration::from_secs(600);

pub(crate) struct HubUpstream {
    pub(crate) hub: SharedHub,
    /// Start a stopped server when its user connects (`ssh.auto_start`).
    pub(crate) auto_start: bool,
}

impl HubUpstream {
    fn home(&self) -> String {
        format!("{}home", self.hub.hub_prefix())
    }

    async fn running(&self, id: &ServerId, progress: mpsc::UnboundedSender<String>) -> Result<Value, String> {
        let servers = &self.hub.servers;
        let deadline = Instant::now() + START_WAIT;
        let (tx, mut rx) = mpsc::unbounded_channel::<ProgressEvent>();
        let lines = {
            let progress = progress.clone();
            tokio::spawn(async move {
                while let Some(ev) = rx.recv().await {
                    let _ = progress.send(format!("berth: {}", ev.line()));
                }
            })
        };
        let mut started_here = false;
        let result = loop {
            let state = servers.state_of(id).await.map_err(|e| e.to_string())?;
            match state {
                Some((ServerState::Running, s)) => break Ok(s.value().clone()),
                Some((ServerState::Stopping, _)) => {
                    // Let the stop finish, then start it again.
                    servers.wait_settled(id, deadline, None).await.map_err(|e| e.to_string())?;
                    if Instant::now() >= deadline {
                        break Err(format!("{id} did not stop in time"));
                    }
                    continue;
                }
                Some((ServerState::Starting, _)) => {}
                Some((ServerState::Stopped, _)) | None => {
                    if started_here {
                        break Err(format!("{id} did not start; see {}", self.home()));
                    }
                    if !self.auto_start {
                        break Err(format!("{id} is not running; start it at {}, then connect again", self.home()));
                    }
                    let _ = progress.send(format!("berth: starting {id} …"));
                    let options = servers.implicit_options(id).await.map_err(|e| e.to_string())?;
                    match servers.start(id, options).await {
                        Ok(()) | Err(HubError::AlreadyRunning { .. }) | Err(HubError::PendingSpawn { .. }) => {}
                        Err(e) => break Err(format!("cannot start {id}: {e}")),
                    }
                    started_here = true;
                }
            }
            match servers.wait_settled(id, deadline, Some(&tx)).await.map_err(|e| e.to_string())? {
                Settled::Running { state, .. } => break Ok(state.value().clone()),
                Settled::Stopped { error: Some(e) } if started_here => break Err(format!("{id} failed to start: {e}")),
                Settled::Stopped { .. } => {}
                Settled::Pending => break Err(format!("{id} did not become ready in time")),
            }
        };
        drop(tx);
        let _ = lines.await;
        result
    }
}

impl Upstream for HubUpstream {
    fn authenticate<'a>(&'a self, user: &'a str, fingerprint: &'a str) -> BoxFuture<'a, Option<KeyLogin>> {
        Box::pin(async move {
            match self.hub.ssh_login(user, fingerprint).await {
                Ok(k) => k.map(|k| KeyLogin { key_id: k.key_id, fingerprint: k.fingerprint }),
                Err(e) => {
                    tracing::warn!(error = %e, "SSH log-in check failed");
                    None
                }
            }
        })
    }

    fn ensure_running<'a>(
        &'a self,
        user: &'a str,
        server: &'a str,
        progress: mpsc::UnboundedSender<String>,
    ) -> BoxFuture<'a, Result<Value, String>> {
        Box::pin(async move {
            let id = ServerId::parse(user, server).map_err(|e| e.to_string())?;
            self.running(&id, progress).await
        })
    }

    fn spawner(&self) -> Option<Arc<dyn Spawner>> {
        Some(self.hub.servers.spawner())
    }

    fn key_used<'a>(&'a self, key_id: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let _ = self.hub.store.touch_ssh_key(key_id).await;
        })
    }

    fn session_opened(&self, user: &str, server: &str) {
        self.hub.servers.culler.ssh_opened(user, server);
    }

    fn session_closed(&self, user: &str, server: &str) {
        self.hub.servers.culler.ssh_closed(user, server);
        // The idle window starts when the session ends.
        self.hub.activity.server(user, server, berth_store::now_ms());
    }

    fn session_ended(&self, r: SessionRecord) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let detail = json!({
                "server": r.server, "peer": r.peer, "seconds": r.seconds,
                "bytes_to_client": r.bytes_to_client, "bytes_from_client": r.bytes_from_client, "key": r.fingerprint,
            })
            .to_string();
            let _ = self.hub.store.add_event(&r.user, "ssh-session", &r.user, &detail).await;
        })
    }
}
