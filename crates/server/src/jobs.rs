//! Background jobs. Each has the shape `async fn run(hub, shutdown)` and is
//! owned by the server's task tracker.

use std::sync::Arc;
use std::time::Duration;

use berth_proxy::tls::TlsState;

use berth_store::now_ms;
use berth_web::SharedHub;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub(crate) fn spawn_all(tasks: &TaskTracker, hub: SharedHub, tls: Option<Arc<TlsState>>, shutdown: CancellationToken) {
    tasks
        .spawn(flush_activity(hub.clone(), shutdown.clone()).instrument(tracing::info_span!("job", name = "activity")));
    tasks.spawn(
        expire_tokens(hub.clone(), shutdown.clone()).instrument(tracing::info_span!("job", name = "token-expiry")),
    );
    tasks.spawn(poll_servers(hub.clone(), shutdown.clone()).instrument(tracing::info_span!("job", name = "poll")));
    tasks.spawn(
        usage_heartbeat(hub.clone(), shutdown.clone()).instrument(tracing::info_span!("job", name = "usage-heartbeat")),
    );
    if !hub.servers.templates.cfg.prebuild.is_empty() {
        tasks.spawn(prebuild(hub.clone(), shutdown.clone()).instrument(tracing::info_span!("job", name = "prebuild")));
    }
    if hub.servers.gpus.samples() {
        tasks.spawn(
            sample_gpus(hub.clone(), shutdown.clone()).instrument(tracing::info_span!("job", name = "gpu-sampler")),
        );
    }
    if hub.servers.updates.scheduled() && hub.servers.spawner().runs_images() {
        tasks.spawn(
            check_images(hub.clone(), shutdown.clone()).instrument(tracing::info_span!("job", name = "image-updates")),
        );
    }
    if hub.servers.spawner().runs_images() {
        tasks.spawn(
            image_moves(hub.clone(), shutdown.clone()).instrument(tracing::info_span!("job", name = "image-moves")),
        );
    }
    if hub.servers.culler.enabled() {
        tasks.spawn(cull(hub.clone(), shutdown.clone()).instrument(tracing::info_span!("job", name = "cull")));
    }
    tasks.spawn(watch_exits(hub, shutdown.clone()).instrument(tracing::info_span!("job", name = "exits")));
    if let Some(tls) = tls {
        tasks.spawn(reload_tls(tls, shutdown).instrument(tracing::info_span!("job", name = "tls-reload")));
    }
}

/// `templates.prebuild`: makes those templates' images, one after another
/// (a start of the same template meanwhile waits for the build instead of
/// starting a second one), logging each build's steps.
async fn prebuild(hub: SharedHub, shutdown: CancellationToken) {
    for id in hub.servers.templates.cfg.prebuild.clone() {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = hub.servers.build_template_image(&id) => {}
        }
    }
}

/// Samples the GPUs every `gpu.sample_interval_seconds` (the sampler never
/// fails: a failed read makes utilisation unknown until the next one).
async fn sample_gpus(hub: SharedHub, shutdown: CancellationToken) {
    let telemetry = &hub.servers.gpus.telemetry;
    let spawner = hub.servers.spawner();
    every(telemetry.interval(), &shutdown, || telemetry.sample(spawner.as_ref(), now_ms())).await;
}

/// Runs `work` every `period` (a late tick waits, none is made up), until
/// shutdown, which also ends a run under way.
async fn every<F, Fut>(period: Duration, shutdown: &CancellationToken, mut work: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = work() => {}
        }
    }
}

/// The daily image-update check at `images.check_at` (UTC).
async fn check_images(hub: SharedHub, shutdown: CancellationToken) {
    while let Some(wait) = hub.servers.updates.until_next(now_ms()) {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = hub.servers.check_images("berth") => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "the image-update check failed");
                }
            }
        }
    }
}

/// Image moves (`images.policy = when-idle`), at the culler's interval:
/// idle servers recreated on updated images, moves cut off by a restart
/// taken up (the first round runs at once), owners' notices refreshed.
async fn image_moves(hub: SharedHub, shutdown: CancellationToken) {
    every(hub.servers.culler.interval(), &shutdown, || hub.servers.run_image_moves()).await;
}

/// Culls idle servers every `cull.interval_seconds` (see `berth_hub::cull`).
async fn cull(hub: SharedHub, shutdown: CancellationToken) {
    every(hub.servers.culler.interval(), &shutdown, || hub.servers.cull_check()).await;
}

/// Marks servers that died as stopped, with the reason.
async fn poll_servers(hub: SharedHub, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(hub.servers.cfg.poll_interval_seconds.max(Duration::from_secs(1)));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        hub.servers.poll_all().await;
    }
}

/// Servers whose container died are checked at once: their route goes
/// before the address can be given to another container.
async fn watch_exits(hub: SharedHub, shutdown: CancellationToken) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let spawner = hub.servers.spawner();
    let watcher = spawner.watch_exits(tx);
    let consume = async {
        while let Some((user, server)) = rx.recv().await {
            if let Ok(id) = berth_core::ServerId::parse(&user, &server) {
                hub.servers.check(&id).await;
            }
        }
    };
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = async { tokio::join!(watcher, consume) } => {}
    }
}

/// Reloads the operator's certificate when its file changes, or on SIGHUP.
async fn reload_tls(tls: Arc<TlsState>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<()>();
        let force = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => false,
            _ = hangup => true,
        };
        match tls.reload(force) {
            Ok(true) => tracing::info!("reloaded the TLS certificate"),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, "could not reload the TLS certificate; still serving the previous one")
            }
        }
    }
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

/// Says every 30 s that berth is alive (`Store::set_usage_heartbeat`): after
/// a crash, servers found gone are counted up to the last heartbeat.
async fn usage_heartbeat(hub: SharedHub, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = hub.store.set_usage_heartbeat(now_ms()).await {
            tracing::warn!(error = %e, "could not write the usage heartbeat");
        }
    }
}
