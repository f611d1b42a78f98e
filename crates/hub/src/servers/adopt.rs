//! Checks and re-adoption: a running server found dead is torn down as
//! vanished; at start-up what still runs is adopted and its routes restored,
//! and starts that waited for GPUs keep their place in the queue.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use berth_core::{ServerId, ServerState, Transition};
use berth_spawner::{Started, Status};
use berth_store::now_ms;
use tracing::Instrument;

use super::{Ending, Servers, SpawnerState, UserOptions};
use crate::error::HubResult;

impl Servers {
    /// Checks one server now: a running one whose process or container is
    /// gone is torn down as vanished.
    pub async fn check(self: &Arc<Self>, id: &ServerId) {
        if self.busy.lock().map(|b| b.contains(id)).unwrap_or(true) {
            return;
        }
        let Ok(Some(record)) = self.store.get_server(id.user(), id.server()).await else { return };
        if record.state != ServerState::Running {
            return;
        }
        let state = SpawnerState::from_record(&record.spawner_state);
        match self.spawner.poll(state.value()).await {
            Ok(Status::Exited(why)) => self.teardown(id, record, Ending::Vanished, &why).await,
            Ok(Status::Moved { started, why }) => self.moved(id, record, started, &why).await,
            _ => {}
        }
    }

    /// A running server the spawner found running somewhere else (a Swarm
    /// task moved to another node): its new state is saved, its route goes
    /// to where it answers now, and an event says what happened.
    async fn moved(self: &Arc<Self>, id: &ServerId, mut record: berth_store::Server, started: Started, why: &str) {
        record.spawner_state = started.state.to_string();
        if let Err(e) = self.store.put_server(&record).await {
            tracing::error!(server = %id, error = %e, "could not record where the moved server runs");
            return;
        }
        let mode = UserOptions::from_record(&record.user_options).routing_mode();
        let (route, _) = self.route_for(id, mode, started.target.clone());
        self.routes.insert(route);
        let _ = self.store.add_event(id.user(), "server-moved", &id.to_string(), why).await;
        tracing::warn!(server = %id, target = %started.target, why, "the server runs somewhere else now; its route follows");
    }

    /// [`Servers::check`] in the background, at most one at a time per
    /// server (the proxy calls this when a server refuses connections).
    pub fn check_soon(self: &Arc<Self>, id: ServerId) {
        let first = self.checking.lock().map(|mut c| c.insert(id.clone())).unwrap_or(false);
        if !first {
            return;
        }
        let me = self.clone();
        let span = tracing::info_span!("check", server = %id);
        self.tasks.spawn(
            async move {
                me.check(&id).await;
                if let Ok(mut c) = me.checking.lock() {
                    c.remove(&id);
                }
            }
            .instrument(span),
        );
    }

    /// At start-up, before the listener accepts: re-adopt what still runs,
    /// restore its routes, mark what vanished as stopped, and keep the
    /// starts that wait for GPUs waiting, in their order (GPUs are handed
    /// to them once all this is done). Returns (adopted, vanished).
    pub async fn reconcile(self: &Arc<Self>) -> HubResult<(usize, usize)> {
        self.queue_paused.store(true, Ordering::SeqCst);
        let result = self.reconcile_paused().await;
        self.queue_paused.store(false, Ordering::SeqCst);
        self.dispatch_queue().await;
        result
    }

    async fn reconcile_paused(self: &Arc<Self>) -> HubResult<(usize, usize)> {
        let (mut adopted, mut vanished, mut waiting) = (0, 0, 0);
        let queued = self.store.gpu_queue().await?;
        // What ran unseen while berth was down is counted up to the last
        // time berth was alive, never to now.
        let now = now_ms();
        let alive = self.store.usage_heartbeat().await?.unwrap_or(now).min(now);
        for mut record in self.store.list_servers(None).await? {
            if record.state == ServerState::Stopped {
                continue;
            }
            let Ok(id) = ServerId::parse(&record.user, &record.name) else { continue };
            if self.restore_queued(&id, &record, &queued).await {
                waiting += 1;
                continue;
            }
            let state = SpawnerState::from_record(&record.spawner_state);
            let status = if state.is_started() {
                self.spawner.poll(state.value()).await.unwrap_or_else(|e| Status::Exited(e.to_string()))
            } else {
                Status::Exited("it had not started when berth stopped".into())
            };
            // Moved while berth was away: save where it runs now.
            let (status, state) = match status {
                Status::Moved { started, why } => {
                    record.spawner_state = started.state.to_string();
                    if let Err(e) = self.store.put_server(&record).await {
                        tracing::error!(server = %id, error = %e, "could not record where the moved server runs");
                    }
                    let _ = self.store.add_event(id.user(), "server-moved", &id.to_string(), &why).await;
                    (Status::Running, SpawnerState::from_record(&record.spawner_state))
                }
                other => (other, state),
            };
            match (status, self.spawner.target(state.value())) {
                (Status::Running, Some(target)) if record.state != ServerState::Stopping => {
                    let mode = UserOptions::from_record(&record.user_options).routing_mode();
                    let (route, url) = self.route_for(&id, mode, target);
                    self.routes.insert(route);
                    if record.state == ServerState::Starting {
                        record.url = Some(url);
                        let _ = self.transition(&mut record, Transition::Ready).await;
                    }
                    tracing::info!(server = %id, "re-adopted a running server");
                    adopted += 1;
                }
                // (A move was turned into running above.)
                (Status::Running | Status::Moved { .. }, _) => {
                    // It was stopping: finish the job.
                    self.teardown(&id, record, Ending::Stop, "").await;
                    vanished += 1;
                }
                (Status::Exited(why), _) => {
                    let reason = format!("stopped while berth was not running: {why}");
                    self.teardown_at(&id, record, Ending::Vanished, &reason, alive).await;
                    vanished += 1;
                }
            }
        }
        match self.store.reconcile_usage(alive, now).await {
            Ok((0, 0)) => {}
            Ok((closed, opened)) => tracing::info!(closed, opened, "usage ledger reconciled with the records"),
            Err(e) => tracing::error!(error = %e, "could not reconcile the usage ledger"),
        }
        if let Err(e) = self.store.set_usage_heartbeat(now).await {
            tracing::warn!(error = %e, "could not write the usage heartbeat");
        }
        // Containers labelled as berth's that no active record claims are
        // reported, never deleted: they may hold someone's work.
        let active: HashSet<(String, String)> = self
            .store
            .list_servers(None)
            .await?
            .into_iter()
            .filter(|s| s.state.is_active())
            .map(|s| (s.user, s.name))
            .collect();
        for (user, server, handle) in self.spawner.list_managed().await {
            if !active.contains(&(user.clone(), server.clone())) {
                tracing::warn!(
                    user = %user, server = %server, handle = %handle,
                    "found a server berth started but has no record of; left as it is (remove it by hand if it is not needed)"
                );
            }
        }
        if waiting > 0 {
            tracing::info!(waiting, "starts waiting for GPUs restored");
        }
        Ok((adopted, vanished))
    }

    /// One round of the poll job: running servers that died are marked
    /// stopped, and the GPU queue is offered what is free (a safety net: a
    /// change made by another berth process, such as the CLI's).
    pub async fn poll_all(self: &Arc<Self>) {
        let Ok(records) = self.store.list_servers(None).await else { return };
        for r in records.into_iter().filter(|r| r.state == ServerState::Running) {
            if let Ok(id) = ServerId::parse(&r.user, &r.name) {
                self.check(&id).await;
            }
        }
        self.dispatch_queue().await;
    }
}
