//! Background jobs. Each has the shape `async fn run(hub, shutdown)` and is
//! owned by the server's task tracker.

use std::time::Duration;

use berth_store::now_ms;
use berth_web::SharedHub;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub fn spawn_all(tasks: &TaskTracker, hub: SharedHub, shutdown: CancellationToken) {
    tasks.spawn(flush_activity(hub.clone(), shutdown.clone()).instrument(tracing::info_span!("job", name = "activity")));
    tasks.spawn(expire_tokens(hub, shutdown).instrument(tracing::info_span!("job", name = "token-expiry")));
}

/// Writes last-used times collected in memory every few seconds.
async fn flush_activity(hub: SharedHub, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = hub.activity.flush(&hub.store).await {
            tracing::warn!(error = %e, "could not write activity times");
        }
    }
}

/// Deletes expired tokens and OAuth codes.
async fn expire_tokens(hub: SharedHub, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match hub.store.delete_expired_tokens(now_ms()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(count = n, "deleted expired tokens"),
            Err(e) => tracing::warn!(error = %e, "could not delete expired tokens"),
        }
    }
}
