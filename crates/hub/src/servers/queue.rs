//! The GPU queue: a start that asks for more GPUs than are free waits in
//! line (`gpu.when_full = "queue"`) instead of failing, and starts by itself
//! when it is first and GPUs are free.
//!
//! The store's `gpu_queue` table is the queue (it survives a restart; the
//! CLI's changes are seen at the next read). A waiting server's record is
//! `starting` with no spawner state, so the REST API shows a pending spawn
//! and another start of it is refused as one. Every change to the queue and
//! every allocation made for it happens under one lock (`Servers::queue`),
//! taken before the GPUs' own, so a freed GPU goes to one start only.
//!
//! Order is strict first come, first served: nobody behind the head starts
//! before it, even when the GPUs free would fit them (that would let a
//! start that asks for many GPUs wait for ever). Admins reorder the queue
//! to let someone go first.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use berth_core::{ServerId, ServerState, Target, Transition};
use berth_store::{now_ms, QueueEntry, Server};
use serde::Serialize;

use super::{Admission, Claim, Servers, SpawnerState, UserOptions};
use crate::error::{HubError, HubResult};
use crate::identity::Caller;
use crate::progress::{ProgressEvent, ProgressLog};

/// What each waiting start was last told (its position, the queue's
/// length), so a progress event goes out only when its place changes.
#[derive(Default)]
pub(crate) struct Announced(HashMap<ServerId, (usize, usize)>);

/// "waiting for a GPU: position 2 of 3"
pub fn waiting_text(position: usize, of: usize, gpus: u32) -> String {
    format!("waiting for {}: position {position} of {of}", super::gpu_words(gpus as usize))
}

/// Why a move in the queue is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MoveError {
    NotQueued,
    OutOfRange { len: usize },
}

/// `order` with `key` moved to `position` (1 is first in line); the others
/// keep their relative order.
pub fn move_to<K: PartialEq + Clone>(order: &[K], key: &K, position: usize) -> Result<Vec<K>, MoveError> {
    let Some(from) = order.iter().position(|k| k == key) else { return Err(MoveError::NotQueued) };
    if position == 0 || position > order.len() {
        return Err(MoveError::OutOfRange { len: order.len() });
    }
    let mut next = order.to_vec();
    let k = next.remove(from);
    next.insert(position - 1, k);
    Ok(next)
}

/// One waiting start as a caller sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueEntryView {
    /// 1 is first in line.
    pub position: usize,
    pub user: String,
    /// "" for the default server.
    pub server: String,
    pub gpus: u32,
    /// Unix milliseconds when it joined the queue.
    pub queued_at_ms: i64,
}

/// The queue as one caller sees it (`GET /hub/api/gpus/queue`, the pages):
/// its length for everyone; every entry with `read:gpus`, else the
/// caller's own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueView {
    /// `queue` or `refuse` (`gpu.when_full`).
    pub when_full: String,
    pub length: usize,
    /// Whether others' entries are listed (`read:gpus`).
    pub entries_visible: bool,
    pub entries: Vec<QueueEntryView>,
}

/// What the head of the queue can do now.
enum Head {
    /// Not enough GPUs free: everyone waits.
    Wait,
    /// It left the queue without starting (gone, cancelled, refused).
    Gone,
    /// It has its GPUs.
    Start(Box<Admission>),
}

impl Servers {
    /// How many starts wait for GPUs (as last read; for metrics).
    pub fn queue_len(&self) -> usize {
        self.queue_len.load(Ordering::Relaxed)
    }

    /// Where `id` waits: (position, length), or `None` when it does not.
    pub async fn queue_place(&self, id: &ServerId) -> HubResult<Option<(usize, usize)>> {
        let entries = self.store.gpu_queue().await?;
        Ok(entries.iter().position(|e| e.user == id.user() && e.server == id.server()).map(|i| (i + 1, entries.len())))
    }

    /// The queue as `caller` may see it.
    pub async fn queue_view(&self, caller: &Caller) -> HubResult<QueueView> {
        let all = caller.allows("read:gpus", Target::Hub);
        let entries = self.store.gpu_queue().await?;
        self.queue_len.store(entries.len(), Ordering::Relaxed);
        let length = entries.len();
        let entries = entries
            .into_iter()
            .enumerate()
            .filter(|(_, e)| all || e.user == caller.name())
            .map(|(i, e)| QueueEntryView {
                position: i + 1,
                user: e.user,
                server: e.server,
                gpus: e.gpus,
                queued_at_ms: e.queued,
            })
            .collect();
        Ok(QueueView { when_full: self.gpus.cfg.when_full.clone(), length, entries_visible: all, entries })
    }

    /// Calls off a waiting start, for a caller who may stop that server
    /// (its owner, or anyone with `servers` / `delete:servers` on it).
    pub async fn cancel_queued_by(self: &Arc<Self>, caller: &Caller, id: &ServerId) -> HubResult<()> {
        let target = Target::Server { user: id.user(), server: id.server() };
        if !(caller.allows("servers", target) || caller.allows("delete:servers", target)) {
            return Err(HubError::missing_scope("delete:servers"));
        }
        if self.cancel_queued(id, caller.name()).await? {
            Ok(())
        } else {
            Err(HubError::NotQueued { server: id.to_string() })
        }
    }

    /// Moves a waiting start to `position` (1 is first in line); admins
    /// only (`admin:servers`).
    pub async fn move_queued(self: &Arc<Self>, caller: &Caller, id: &ServerId, position: usize) -> HubResult<()> {
        caller.require("admin:servers", Target::Hub)?;
        {
            let mut announced = self.queue.lock().await;
            let entries = self.store.gpu_queue().await?;
            let order: Vec<(String, String)> = entries.iter().map(|e| (e.user.clone(), e.server.clone())).collect();
            let key = (id.user().to_string(), id.server().to_string());
            let next = move_to(&order, &key, position).map_err(|e| match e {
                MoveError::NotQueued => HubError::NotQueued { server: id.to_string() },
                MoveError::OutOfRange { len } => HubError::QueuePosition { position, len },
            })?;
            self.store.reorder_gpu_queue(&next).await?;
            let _ = self.store.add_event(caller.name(), "queue-move", &id.to_string(), &position.to_string()).await;
            tracing::info!(server = %id, position, by = %caller.name(), "moved in the GPU queue");
            let entries = self.store.gpu_queue().await?;
            self.announce(&mut announced, &entries);
        }
        // A new head may fit in what is free.
        self.dispatch_queue().await;
        Ok(())
    }

    /// Step 1's GPUs: `Some(ids)` to start now, `None` when the start was
    /// put in the queue (its record is then starting). A start that asks
    /// for GPUs while others wait goes behind them, even when some are
    /// free: first come, first served.
    pub(super) async fn take_or_queue(
        &self,
        id: &ServerId,
        want: usize,
        mut record: Server,
        options: &UserOptions,
        owner_id: &str,
    ) -> HubResult<Option<Vec<String>>> {
        if want == 0 {
            return Ok(Some(Vec::new()));
        }
        self.gpus.check_request(want)?;
        let mut announced = self.queue.lock().await;
        let queues = self.gpus.queues();
        if !queues || self.store.gpu_queue().await?.is_empty() {
            let on = self.spawner.data_node(owner_id).await;
            match self.gpus.allocate(id, want, on).await {
                Ok(ids) => return Ok(Some(ids)),
                Err(HubError::NoGpus { .. }) if queues => {}
                Err(e) => return Err(e),
            }
        }
        let now = now_ms();
        record.last_error = None;
        record.started = Some(now);
        record.last_activity = None;
        record.url = None;
        record.spawner_state = "{}".into();
        record.user_options = options.to_record();
        if let Some(t) = &options.template {
            record.template = t.clone();
        }
        self.transition(&mut record, Transition::Start).await?;
        if let Err(e) = self.store.enqueue_gpus(id.user(), id.server(), want as u32, now).await {
            record.last_error = Some(format!("could not join the GPU queue: {e}"));
            let _ = self.transition(&mut record, Transition::Fail).await;
            return Err(e.into());
        }
        let log = ProgressLog::new();
        log.push(ProgressEvent::step(0, "Server requested"));
        if let Ok(mut m) = self.progress.lock() {
            m.insert(id.clone(), log);
        }
        let _ = self.store.add_event(id.user(), "queued", &id.to_string(), &want.to_string()).await;
        let entries = self.store.gpu_queue().await?;
        tracing::info!(server = %id, gpus = want, waiting = entries.len(), "start waits for GPUs");
        self.announce(&mut announced, &entries);
        Ok(None)
    }

    /// Hands free GPUs to the queue: while the first in line fits, it
    /// leaves the queue and starts. Called when GPUs are freed, when the
    /// queue changes, after start-up and on every poll.
    pub async fn dispatch_queue(self: &Arc<Self>) {
        if self.queue_paused.load(Ordering::SeqCst) {
            return;
        }
        let mut announced = self.queue.lock().await;
        // Each round removes the head or ends; the bound is a backstop.
        for _ in 0..10_000 {
            let entries = match self.store.gpu_queue().await {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(error = %e, "could not read the GPU queue");
                    return;
                }
            };
            let Some(head) = entries.first() else {
                self.announce(&mut announced, &entries);
                return;
            };
            match self.try_head(head).await {
                Head::Wait => {
                    self.announce(&mut announced, &entries);
                    return;
                }
                Head::Gone => {}
                Head::Start(a) => {
                    let (id, record) = (a.id.clone(), a.record.clone());
                    tracing::info!(server = %id, gpus = ?a.gpus, "GPUs free: a queued start begins");
                    if let Err(e) = self.plan_and_launch(*a).await {
                        self.gpus.free(&id).await;
                        self.fail_waiting(&id, record, &format!("could not start: {e}")).await;
                    }
                }
            }
        }
    }

    /// Whether the first in line can start now, and its GPUs when it can.
    async fn try_head(self: &Arc<Self>, head: &QueueEntry) -> Head {
        let (user, server) = (head.user.as_str(), head.server.as_str());
        let leave = || async {
            if let Err(e) = self.store.dequeue_gpus(user, server).await {
                tracing::error!(user, server, error = %e, "could not take an entry out of the GPU queue");
            }
        };
        let Ok(id) = ServerId::parse(user, server) else {
            leave().await;
            return Head::Gone;
        };
        let record = match self.store.get_server(user, server).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(server = %id, error = %e, "could not read a queued server");
                return Head::Wait;
            }
        };
        // A record that is no longer a waiting start (stopped or started by
        // another berth process, say): the entry is stale.
        let Some(record) = record
            .filter(|r| r.state == ServerState::Starting && !SpawnerState::from_record(&r.spawner_state).is_started())
        else {
            tracing::warn!(server = %id, "dropped a stale GPU queue entry");
            leave().await;
            return Head::Gone;
        };
        let owner = match self.store.get_user_uncached(user).await {
            Ok(Some(o)) if o.authorized => o,
            Ok(o) => {
                leave().await;
                let why = if o.is_some() { "is no longer authorized" } else { "no longer exists" };
                self.fail_waiting(&id, record, &format!("{user} {why}")).await;
                return Head::Gone;
            }
            Err(e) => {
                tracing::error!(server = %id, error = %e, "could not read a queued server's owner");
                return Head::Wait;
            }
        };
        // The inventory may have shrunk (fewer GPUs at this start-up).
        if let Err(e) = self.gpus.check_request(head.gpus as usize) {
            leave().await;
            self.fail_waiting(&id, record, &e.to_string()).await;
            return Head::Gone;
        }
        let on = self.spawner.data_node(&owner.account_id).await;
        match self.gpus.allocate(&id, head.gpus as usize, on).await {
            Ok(gpus) => {
                if let Err(e) = self.store.dequeue_gpus(user, server).await {
                    tracing::error!(server = %id, error = %e, "could not take an entry out of the GPU queue");
                    self.gpus.free(&id).await;
                    return Head::Wait;
                }
                let claimed = self.busy.lock().map(|mut b| b.insert(id.clone())).unwrap_or(false);
                let claim = claimed.then(|| Claim { servers: self.clone(), id: id.clone() });
                Head::Start(Box::new(Admission {
                    options: UserOptions::from_record(&record.user_options),
                    owner_id: owner.account_id,
                    gpus,
                    permit: None,
                    claim,
                    log: self.progress_log(&id).filter(|l| !l.is_finished()),
                    record,
                    id,
                }))
            }
            Err(HubError::NoGpus { .. }) => Head::Wait,
            Err(HubError::Store(e)) => {
                tracing::error!(server = %id, error = %e, "could not allocate GPUs for the queue");
                Head::Wait
            }
            Err(e) => {
                leave().await;
                self.fail_waiting(&id, record, &e.to_string()).await;
                Head::Gone
            }
        }
    }

    /// Takes `id` out of the queue and stops its record; whether it was
    /// waiting. `by` names who called it off (for the event), if known.
    pub(super) async fn cancel_queued(self: &Arc<Self>, id: &ServerId, by: &str) -> HubResult<bool> {
        {
            let mut announced = self.queue.lock().await;
            if !self.store.dequeue_gpus(id.user(), id.server()).await? {
                return Ok(false);
            }
            if let Some(mut r) = self.store.get_server(id.user(), id.server()).await? {
                if r.state == ServerState::Starting {
                    self.transition(&mut r, Transition::Stop).await?;
                    self.transition(&mut r, Transition::Stopped).await?;
                }
            }
            let by = if by.is_empty() { id.user() } else { by };
            let _ = self.store.add_event(by, "queue-cancel", &id.to_string(), "").await;
            tracing::info!(server = %id, by, "start waiting for GPUs cancelled");
            if let Some(log) = self.progress_log(id) {
                log.push(ProgressEvent::cancelled("Start cancelled while waiting for a GPU"));
            }
            let entries = self.store.gpu_queue().await?;
            self.announce(&mut announced, &entries);
        }
        // The head may have gone: the next may fit.
        self.dispatch_queue().await;
        Ok(true)
    }

    /// A waiting start that cannot go on: stopped with `reason`, an event,
    /// the final progress event.
    async fn fail_waiting(&self, id: &ServerId, mut record: Server, reason: &str) {
        record.last_error = Some(reason.to_string());
        if let Err(e) = self.transition(&mut record, Transition::Fail).await {
            tracing::error!(server = %id, error = %e, "could not record a failed queued start");
        }
        let _ = self.store.add_event(id.user(), "start-failed", &id.to_string(), reason).await;
        if let Some(log) = self.progress_log(id) {
            log.push(ProgressEvent::failed(reason));
        }
        tracing::warn!(server = %id, %reason, "a start waiting for GPUs failed");
    }

    /// Tells each waiting start its place when it changed (a progress
    /// event), and remembers the queue's length.
    fn announce(&self, announced: &mut Announced, entries: &[QueueEntry]) {
        let len = entries.len();
        self.queue_len.store(len, Ordering::Relaxed);
        let mut now = HashMap::with_capacity(len);
        for (i, e) in entries.iter().enumerate() {
            let Ok(id) = ServerId::parse(&e.user, &e.server) else { continue };
            let place = (i + 1, len);
            if announced.0.get(&id) != Some(&place) {
                self.waiting_log(&id).push(ProgressEvent::step(5, waiting_text(place.0, place.1, e.gpus)));
            }
            now.insert(id, place);
        }
        announced.0 = now;
    }

    /// The progress log of a waiting start, made when there is none (after
    /// a restart) or the last one has ended.
    fn waiting_log(&self, id: &ServerId) -> Arc<ProgressLog> {
        let Ok(mut m) = self.progress.lock() else { return ProgressLog::new() };
        if let Some(log) = m.get(id).filter(|l| !l.is_finished()) {
            return log.clone();
        }
        let log = ProgressLog::new();
        log.push(ProgressEvent::step(0, "Server requested"));
        m.insert(id.clone(), log.clone());
        log
    }

    /// At start-up (from `reconcile`): a record left starting that waits in
    /// the queue stays waiting. Returns whether `record` is one.
    pub(super) async fn restore_queued(&self, id: &ServerId, record: &Server, queued: &[QueueEntry]) -> bool {
        if record.state != ServerState::Starting
            || SpawnerState::from_record(&record.spawner_state).is_started()
            || !queued.iter().any(|e| e.user == id.user() && e.server == id.server())
        {
            return false;
        }
        if !self.gpus.queues() {
            if let Err(e) = self.store.dequeue_gpus(id.user(), id.server()).await {
                tracing::error!(server = %id, error = %e, "could not take an entry out of the GPU queue");
            }
            self.fail_waiting(
                id,
                record.clone(),
                "it waited for a GPU, and this hub now refuses starts when GPUs are taken (gpu.when_full = refuse)",
            )
            .await;
            return true;
        }
        // A waiting start holds no GPUs; any left from a hand-over that
        // berth did not finish go back.
        self.gpus.free(id).await;
        tracing::info!(server = %id, "a start waiting for GPUs keeps its place");
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_keep_the_others_in_order() {
        let q = ["a", "b", "c", "d"];
        type Case<'a> = (&'a str, usize, Result<Vec<&'a str>, MoveError>);
        let cases: &[Case<'_>] = &[
            ("c", 1, Ok(vec!["c", "a", "b", "d"])),
            ("a", 4, Ok(vec!["b", "c", "d", "a"])),
            ("b", 2, Ok(vec!["a", "b", "c", "d"])),
            ("d", 2, Ok(vec!["a", "d", "b", "c"])),
            ("b", 0, Err(MoveError::OutOfRange { len: 4 })),
            ("b", 5, Err(MoveError::OutOfRange { len: 4 })),
            ("x", 1, Err(MoveError::NotQueued)),
        ];
        for (key, pos, want) in cases {
            assert_eq!(&move_to(&q, key, *pos), want, "move {key} to {pos}");
        }
        assert_eq!(move_to::<&str>(&[], &"a", 1), Err(MoveError::NotQueued));
    }

    #[test]
    fn the_waiting_message_names_the_place_and_the_gpus() {
        assert_eq!(waiting_text(2, 3, 1), "waiting for a GPU: position 2 of 3");
        assert_eq!(waiting_text(1, 1, 4), "waiting for 4 GPUs: position 1 of 1");
    }
}
