//! Image moves (`images.policy = when-idle`): a server running on an image
//! that a check updated is recreated on the new image once it is idle, and
//! put back on the previous image when the new one fails its readiness
//! check. A busy server is never interrupted: it waits for its next idle
//! spell (or its owner's own restart, which runs the new image anyway).
//!
//! A move is recorded in the store before anything is touched, phase by
//! phase (`waiting` → `moving` → `rolling-back` → gone), so one cut off by
//! a restart of berth is taken up again at start-up: `moving` is run again
//! from the stop (the server ends on the new image, or rolled back),
//! `rolling-back` is finished. Either way the server ends with a container.
//!
//! "Idle" is what the culler reads ([`Servers::signals`]): no web traffic,
//! no busy kernel and no newer kernel activity, no open SSH session, no GPU
//! in use — for `images.idle_seconds`. A signal that cannot be read is not
//! idleness. A server holding GPUs is not moved while starts wait in the
//! GPU queue (its GPUs would go to the first in line).

use std::sync::Arc;
use std::time::Duration;

use berth_core::{AppProtocol, ServerId, ServerState};
use berth_store::{now_ms, ImageMove, Server};

use super::{Servers, Settled, UserOptions};
use crate::cull::human;
use crate::updates::runs_template;

/// How a start made by a move ended.
enum Outcome {
    Ready,
    Failed(String),
    /// Someone (the owner, an admin) stopped it meanwhile.
    Stopped,
    /// Not stopped, or its start refused (the user's account, a start of
    /// their own meanwhile): nothing to say about the image.
    NotStarted(String),
}

/// Takes a server out of [`Servers::moving`] when its move ends.
struct Moving {
    servers: Arc<Servers>,
    id: ServerId,
}

impl Drop for Moving {
    fn drop(&mut self) {
        if let Ok(mut m) = self.servers.moving.lock() {
            m.remove(&self.id);
        }
    }
}

impl Servers {
    /// One round of the image-moves job: the owners' notices refreshed,
    /// moves of servers that stopped (or restarted on the new image)
    /// dropped, idle servers moved, moves cut off by a restart taken up.
    pub async fn run_image_moves(self: &Arc<Self>) {
        let moves = match self.store.image_moves().await {
            Ok(m) => m,
            Err(e) => return tracing::warn!(error = %e, "image moves skipped: they could not be read"),
        };
        self.refresh_update_notices().await;
        if moves.is_empty() {
            return;
        }
        let allocations = match self.store.gpu_allocations().await {
            Ok(a) => a,
            Err(e) => return tracing::warn!(error = %e, "image moves skipped: the GPU allocations could not be read"),
        };
        let now = now_ms();
        for m in moves {
            let Ok(id) = ServerId::parse(&m.user, &m.server) else {
                let _ = self.store.delete_image_move(&m.user, &m.server).await;
                continue;
            };
            if self.moving.lock().map(|s| s.contains(&id)).unwrap_or(true) {
                continue;
            }
            let record = match self.store.get_server(&m.user, &m.server).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(server = %id, error = %e, "image move skipped: the server could not be read");
                    continue;
                }
            };
            if m.phase != "waiting" {
                // Cut off by a restart of berth: taken up where it stood.
                self.launch_move(id, m, record, true);
                continue;
            }
            let Some(record) = record.filter(|r| r.state == ServerState::Running) else {
                // Stopped meanwhile: its next start runs the new image.
                let _ = self.store.delete_image_move(&m.user, &m.server).await;
                continue;
            };
            if record.started.unwrap_or(0) > m.created {
                // Started again since the update: it runs the new image.
                let _ = self.store.delete_image_move(&m.user, &m.server).await;
                continue;
            }
            let devices: Vec<String> = allocations
                .iter()
                .filter(|(_, u, s)| *u == record.user && *s == record.name)
                .map(|(d, _, _)| d.clone())
                .collect();
            if !devices.is_empty() && self.queue_len() > 0 {
                tracing::debug!(server = %id, "image move waits: starts wait for GPUs");
                continue;
            }
            let options = UserOptions::from_record(&record.user_options);
            let template = options.template.clone().unwrap_or_else(|| record.template.clone());
            let jupyter = self.templates.lookup(&template).is_none_or(|t| t.protocol == AppProtocol::Jupyter);
            let signals = self.signals(&id, &record, &devices, 0, jupyter, now).await;
            if !signals.idle_for(self.updates.idle(), now) {
                tracing::debug!(server = %id, active = ?signals.active, unknown = ?signals.unknown, "image move waits: the server is not idle");
                continue;
            }
            self.launch_move(id, m, Some(record), false);
        }
    }

    /// Runs one move in the background (tracked: shutdown waits for it).
    fn launch_move(self: &Arc<Self>, id: ServerId, m: ImageMove, record: Option<Server>, resumed: bool) {
        let first = self.moving.lock().map(|mut s| s.insert(id.clone())).unwrap_or(false);
        if !first {
            return;
        }
        let guard = Moving { servers: self.clone(), id: id.clone() };
        let me = self.clone();
        let span = tracing::info_span!("image-move", server = %id);
        self.track(
            async move {
                let _guard = guard;
                me.move_server(&id, m, record, resumed).await;
                me.refresh_update_notices().await;
            },
            span,
        );
    }

    /// Recreates the server on the new image; back on the previous one
    /// when the new one does not become ready.
    async fn move_server(self: &Arc<Self>, id: &ServerId, m: ImageMove, record: Option<Server>, resumed: bool) {
        let (user, server) = (id.user(), id.server());
        let Some(record) = record else {
            let _ = self.store.delete_image_move(user, server).await;
            return;
        };
        let mut options = UserOptions::from_record(&record.user_options);
        // The mode is chosen again, as for any start of a stopped server.
        options.routing = None;
        options.extra.clear();
        let subject = id.to_string();
        let mut why = m.detail.clone();
        if m.phase != "rolling-back" {
            if let Err(e) = self.store.set_image_move_phase(user, server, "moving", "").await {
                return tracing::error!(server = %id, error = %e, "image move not started: it could not be recorded");
            }
            let detail = if resumed {
                format!(
                    "berth restarted during the move of {subject} to {} ({}); recreating it again",
                    m.image, m.digest
                )
            } else {
                format!(
                    "recreating {subject} on {} ({}): idle for at least {}",
                    m.image,
                    m.digest,
                    human(self.updates.idle())
                )
            };
            tracing::info!(server = %id, image = %m.image, digest = %m.digest, resumed, "moving a server to an updated image");
            let _ = self.store.add_event("berth", "image-move", &subject, &detail).await;
            match self.recreate(id, options.clone(), "recreated on an updated image").await {
                Outcome::Ready => {
                    let detail = format!("{subject} runs {} ({}) now", m.image, m.digest);
                    tracing::info!(server = %id, "moved to the updated image");
                    let _ = self.store.add_event("berth", "image-moved", &subject, &detail).await;
                    let _ = self.store.delete_image_move(user, server).await;
                    return;
                }
                Outcome::Stopped => {
                    let detail =
                        format!("{subject} was stopped during its move to {}; its next start runs it", m.image);
                    let _ = self.store.add_event("berth", "image-move-ended", &subject, &detail).await;
                    let _ = self.store.delete_image_move(user, server).await;
                    return;
                }
                Outcome::NotStarted(e) => {
                    let detail = format!("the move of {subject} to {} was given up: {e}", m.image);
                    tracing::warn!(server = %id, %detail, "image move given up");
                    let _ = self.store.add_event("berth", "image-move-failed", &subject, &detail).await;
                    let _ = self.store.delete_image_move(user, server).await;
                    return;
                }
                Outcome::Failed(e) => why = e,
            }
            if let Err(e) = self.store.set_image_move_phase(user, server, "rolling-back", &why).await {
                tracing::error!(server = %id, error = %e, "could not record the rollback; going on with it");
            }
        }
        // Back on the previous image: the tag is pointed at it again, so
        // this and every later start runs it until the tag moves on.
        tracing::warn!(server = %id, image = %m.image, reason = %why, "the updated image failed; rolling back");
        if let Err(e) = self.spawner.restore_image(&m.image, &m.previous).await {
            let detail = format!(
                "{} ({}) failed on {subject}: {why}; the previous image could not be restored: {e}",
                m.image, m.digest
            );
            let _ = self.store.add_event("berth", "image-rollback-failed", &subject, &detail).await;
            let _ = self.store.delete_image_move(user, server).await;
            return;
        }
        let detail = format!(
            "{} ({}) failed on {subject}: {why}; {subject} was put back on the previous image",
            m.image, m.digest
        );
        self.reject_update(&m, &detail).await;
        match self.recreate(id, options, "put back on the previous image").await {
            Outcome::Ready | Outcome::Stopped => {
                tracing::info!(server = %id, "rolled back to the previous image");
                let _ = self.store.add_event("berth", "image-rolled-back", &subject, &detail).await;
            }
            Outcome::Failed(e) | Outcome::NotStarted(e) => {
                let detail = format!("{detail}, which failed too: {e}");
                tracing::error!(server = %id, %detail, "the rollback failed");
                let _ = self.store.add_event("berth", "image-rollback-failed", &subject, &detail).await;
            }
        }
        let _ = self.store.delete_image_move(user, server).await;
    }

    /// The update of `m`'s template is known to fail: its check says so
    /// (and is not applied again until the tag moves on), and the moves of
    /// other servers to it are called off.
    async fn reject_update(&self, m: &ImageMove, detail: &str) {
        if let Ok(checks) = self.store.image_checks().await {
            if let Some(mut c) = checks.into_iter().find(|c| c.template == m.template) {
                c.status = "rolled-back".into();
                c.checked = now_ms();
                c.local_digest = String::new();
                c.message = format!("rolled back: {detail}; not applied again until the tag moves on");
                let _ = self.store.set_image_check(&c).await;
            }
        }
        if let Ok(moves) = self.store.image_moves().await {
            for other in moves.iter().filter(|o| o.template == m.template && (o.user != m.user || o.server != m.server))
            {
                if other.phase == "waiting" {
                    let _ = self.store.delete_image_move(&other.user, &other.server).await;
                }
            }
        }
        let _ = self.store.add_event("berth", "image-update-rejected", &m.template, detail).await;
    }

    /// Stops the server (volumes kept) and starts it again with the same
    /// options, waiting for it to be ready or to fail.
    async fn recreate(self: &Arc<Self>, id: &ServerId, options: UserOptions, reason: &str) -> Outcome {
        match self.store.get_server(id.user(), id.server()).await {
            Ok(Some(r)) if r.state == ServerState::Running => {
                if let Err(e) = self.stop_because(id, reason).await {
                    return Outcome::NotStarted(format!("it could not be stopped: {e}"));
                }
            }
            Ok(Some(r)) if r.state != ServerState::Stopped => {
                if let Err(e) = self.stop_now(id, reason).await {
                    return Outcome::NotStarted(format!("it could not be stopped: {e}"));
                }
            }
            Ok(_) => {}
            Err(e) => return Outcome::NotStarted(format!("its record could not be read: {e}")),
        }
        if let Err(e) = self.start_as(id, options, true).await {
            return Outcome::NotStarted(format!("the start was refused: {e}"));
        }
        let deadline = tokio::time::Instant::now() + self.cfg.longest_start() + Duration::from_secs(60);
        match self.wait_settled(id, deadline, None).await {
            Ok(Settled::Running { .. }) => Outcome::Ready,
            Ok(Settled::Stopped { error: Some(e) }) => Outcome::Failed(e),
            Ok(Settled::Stopped { error: None }) => Outcome::Stopped,
            Ok(Settled::Pending) => Outcome::Failed("it was not ready in time".into()),
            Err(e) => Outcome::NotStarted(format!("its state could not be read: {e}")),
        }
    }

    /// Recomputes what owners are told about updates of their servers'
    /// images, from the last checks and the moves.
    pub(crate) async fn refresh_update_notices(&self) {
        let (Ok(checks), Ok(servers), Ok(moves)) =
            (self.store.image_checks().await, self.store.list_servers(None).await, self.store.image_moves().await)
        else {
            return;
        };
        let mut out = std::collections::HashMap::new();
        for s in servers.iter().filter(|s| s.state == ServerState::Running) {
            let started = s.started.unwrap_or(0);
            let check = checks.iter().find(|c| {
                runs_template(s, &c.template)
                    && c.checked > started
                    && matches!(c.status.as_str(), "available" | "updated")
            });
            let Some(c) = check else { continue };
            let moving = moves.iter().any(|m| m.user == s.user && m.server == s.name);
            let text = match (c.status.as_str(), moving) {
                ("available", _) => format!(
                    "An update of its image ({}) is available; it keeps running on the current one until an admin applies the update.",
                    c.image
                ),
                (_, true) => format!(
                    "Its image ({}) was updated: berth restarts it on the new image once it has been idle for {} (files in your volumes are kept). Stop and start it yourself to move sooner.",
                    c.image,
                    human(self.updates.idle())
                ),
                _ => format!(
                    "Its image ({}) was updated: it runs the previous version until you stop and start it (files in your volumes are kept).",
                    c.image
                ),
            };
            out.entry(s.user.clone()).or_insert_with(Vec::new).push((s.name.clone(), text));
        }
        for list in out.values_mut() {
            list.sort();
        }
        if let Ok(mut n) = self.notices.lock() {
            *n = out;
        }
    }

    /// What `user` is told about updates of their running servers' images,
    /// by server name.
    pub fn update_notices_of(&self, user: &str) -> Vec<(String, String)> {
        self.notices.lock().ok().and_then(|n| n.get(user).cloned()).unwrap_or_default()
    }
}
