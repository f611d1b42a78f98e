//! The one wait for a start or stop to settle, and the state of a server.

use berth_core::{ServerId, ServerState};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Servers, Settled, SpawnerState};
use crate::error::HubResult;
use crate::progress::ProgressEvent;

impl Servers {
    /// Waits until `id` is running or stopped, or `deadline` passes. With
    /// `progress`, every event of the current start (the ones so far, then
    /// each new one) is sent there as well; the wait ends early when that
    /// receiver goes away.
    pub async fn wait_settled(
        &self,
        id: &ServerId,
        deadline: Instant,
        progress: Option<&mpsc::UnboundedSender<ProgressEvent>>,
    ) -> HubResult<Settled> {
        let mut followed = false;
        loop {
            if !followed {
                if let Some(log) = self.progress_log(id) {
                    followed = true;
                    let mut watch = log.watch();
                    while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, watch.next()).await {
                        if let Some(tx) = progress {
                            if tx.send(ev).is_err() {
                                return Ok(Settled::Pending);
                            }
                        }
                    }
                }
            }
            let record = self.store.get_server(id.user(), id.server()).await?;
            match record {
                None => return Ok(Settled::Stopped { error: None }),
                Some(r) if r.state == ServerState::Running => {
                    return Ok(Settled::Running { url: r.url, state: SpawnerState::from_record(&r.spawner_state) })
                }
                Some(r) if r.state == ServerState::Stopped => return Ok(Settled::Stopped { error: r.last_error }),
                Some(_) => {}
            }
            if Instant::now() >= deadline || progress.is_some_and(|tx| tx.is_closed()) {
                return Ok(Settled::Pending);
            }
            tokio::time::sleep(Duration::from_millis(100).min(deadline.saturating_duration_since(Instant::now())))
                .await;
        }
    }

    /// The server's lifecycle state and saved spawner state (`None` when it has no record).
    pub async fn state_of(&self, id: &ServerId) -> HubResult<Option<(ServerState, SpawnerState)>> {
        Ok(self
            .store
            .get_server(id.user(), id.server())
            .await?
            .map(|r| (r.state, SpawnerState::from_record(&r.spawner_state))))
    }
}
