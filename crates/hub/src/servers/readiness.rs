//! Running a plan: the spawner's start with its progress, then the
//! readiness probe until the server answers, exits, or the deadline passes.

use std::sync::Arc;
use std::time::Duration;

use berth_spawner::{Progress, Status};
use berth_store::Server;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Servers, StartPlan};
use crate::progress::{ProgressEvent, ProgressLog};

impl Servers {
    pub(super) async fn spawn_and_wait(
        &self,
        record: &mut Server,
        plan: StartPlan,
        log: &Arc<ProgressLog>,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<String, String> {
        let timeout = self.cfg.start_timeout_seconds.as_secs();
        let (ptx, mut prx) = mpsc::unbounded_channel::<Progress>();
        let fwd_log = log.clone();
        let forwarder = tokio::spawn(async move {
            while let Some(p) = prx.recv().await {
                fwd_log.push(ProgressEvent::step(p.progress.min(99), p.message));
            }
        });
        let stop_forwarding = forwarder.abort_handle();
        log.push(ProgressEvent::step(10, "Spawning server..."));
        let (user, server) = (plan.spec.user.clone(), plan.spec.server.clone());
        // The image first (a template's first start builds it): that takes
        // as long as it takes, up to its own limit; the start timeout counts
        // from when there is an image to run.
        if let Some(image) = plan.spec.image.clone() {
            let limit = self.cfg.build_timeout_seconds;
            // A stop meanwhile ends the wait (the build goes on for the next start).
            let prepared = tokio::select! {
                p = tokio::time::timeout(limit, self.spawner.prepare_image(&image, &plan.spec.build, ptx.clone())) => p,
                _ = stop.cancelled() => Ok(Err(berth_spawner::SpawnError::Failed("stopped".into()))),
            };
            let failed = match prepared {
                Err(_) => Some(format!("{image} was not pulled or built within {} s", limit.as_secs())),
                Ok(Err(e)) => Some(e.to_string()),
                Ok(Ok(_)) => None,
            };
            if let Some(why) = failed {
                // What the pull or build said before it failed is delivered.
                drop(ptx);
                let _ = tokio::time::timeout(Duration::from_millis(200), forwarder).await;
                stop_forwarding.abort();
                return Err(why);
            }
        }
        if stop.is_cancelled() {
            return Err("stopped".into());
        }
        let deadline = Instant::now() + self.cfg.start_timeout_seconds;
        // The spawner's start is not interrupted (it would leave what it
        // made half-recorded); a stop is seen as soon as it returns.
        let started = tokio::time::timeout_at(deadline, self.spawner.start(plan.spec, ptx)).await;
        // Events the spawner sent before returning are still delivered; a
        // spawner that keeps its sender gets no more say after that.
        let _ = tokio::time::timeout(Duration::from_millis(200), forwarder).await;
        stop_forwarding.abort();
        let started = match started {
            Err(_) => return Err(format!("the server did not start within {timeout} s")),
            Ok(Err(e)) => return Err(e.to_string()),
            Ok(Ok(s)) => s,
        };
        record.spawner_state = started.state.to_string();
        if let Err(e) = self.store.put_server(record).await {
            return Err(format!("could not record the server: {e}"));
        }
        if stop.is_cancelled() {
            return Err("stopped".into());
        }
        log.push(ProgressEvent::step(50, "Waiting for the server to answer..."));
        let Some(probe) = plan.probe else {
            // Nothing answers HTTP (an SSH-only environment): running is ready.
            return match self.spawner.poll(&started.state).await {
                Ok(Status::Running) => Ok(started.target),
                Ok(Status::Moved { why, .. }) => Err(format!("the server moved while it started: {why}")),
                Ok(Status::Exited(why)) => Err(why),
                Err(e) => Err(e.to_string()),
            };
        };
        let probe = format!("{}{probe}", started.target);
        let uri: http::Uri = probe.parse().map_err(|e| format!("bad target {probe}: {e}"))?;
        let mut delay = Duration::from_millis(100);
        loop {
            if let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(5), self.http.get(uri.clone())).await {
                if resp.status().as_u16() < 500 {
                    return Ok(started.target);
                }
            }
            match self.spawner.poll(&started.state).await {
                Ok(Status::Exited(why)) => {
                    let tail = self.spawner.logs(&user, &server).await.map(|l| last_lines(&l, 3)).unwrap_or_default();
                    return Err(if tail.is_empty() { why } else { format!("{why}; its last output: {tail}") });
                }
                Ok(Status::Running) => {}
                Ok(Status::Moved { why, .. }) => return Err(format!("the server moved while it started: {why}")),
                Err(e) => return Err(e.to_string()),
            }
            if Instant::now() + delay > deadline {
                return Err(format!("the server did not answer at {probe} within {timeout} s"));
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.cancelled() => return Err("stopped".into()),
            }
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }
}

fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}
