//! The server lifecycle in-process: a temporary SQLite store, the
//! failure-mode spawners, and a paused clock, so timeouts of minutes run in
//! milliseconds and nothing waits on a sleep.
//!
//! The clock is paused once the store is open. SQLite answers from a thread
//! of its own, which a paused runtime cannot see: while a query runs, the
//! clock would jump straight to the next timer — the connection pool's
//! acquire time-out when nothing nearer is pending. A ticker every virtual
//! millisecond keeps each jump small, and the pool's time-out is set beyond
//! every deadline here.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::Duration;

use berth_core::{ServerId, ServerState};
use berth_hub::activity::Activity;
use berth_hub::gpus::{Gpu, GpuConfig, Gpus};
use berth_hub::servers::Config;
use berth_hub::templates::{Templates, TemplatesConfig};
use berth_hub::{HubError, Servers, Settled, UserOptions};
use berth_proxy::RouteTable;
use berth_spawner::fake::{Failing, NeverReady, Scripted};
use berth_spawner::Spawner;
use berth_store::{NewUser, Server, Store, TokenKind};
use tokio::time::Instant;

struct World {
    store: Store,
    servers: Arc<Servers>,
    _dir: tempfile::TempDir,
}

async fn world(spawner: Arc<dyn Spawner>, cfg: Config, gpus: &[&str]) -> World {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("berth.sqlite").display());
    let store = Store::open_with_acquire_timeout(&url, Duration::from_secs(10 * 365 * 24 * 3600)).await.unwrap();
    for name in ["alice", "bob"] {
        let u = NewUser { name: name.into(), admin: false, authorized: true, password_hash: None };
        store.create_user(&u).await.unwrap();
    }
    let g = Gpus::new(GpuConfig { mode: 1, ..GpuConfig::default() }, store.clone());
    g.set_inventory(gpus.iter().map(|id| Gpu { id: id.to_string(), name: "test".into() }).collect());
    let servers = Servers::new(
        cfg,
        store.clone(),
        spawner,
        Arc::new(RouteTable::new()),
        Arc::new(Activity::default()),
        "/",
        g,
        Templates::new(TemplatesConfig::default(), Vec::new()),
    );
    tokio::time::pause();
    tokio::spawn(async {
        loop {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    World { store, servers: Arc::new(servers), _dir: dir }
}

fn id(user: &str, server: &str) -> ServerId {
    ServerId::parse(user, server).unwrap()
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(24 * 3600)
}

#[tokio::test]
async fn a_failed_start_frees_its_gpus_and_tokens() {
    let w = world(Arc::new(Failing("the image cannot be pulled".into())), Config::default(), &["GPU-0", "GPU-1"]).await;
    let alice = id("alice", "");
    w.servers.start(&alice, UserOptions { gpus: Some(2), ..Default::default() }).await.unwrap();
    let settled = w.servers.wait_settled(&alice, far(), None).await.unwrap();
    let Settled::Stopped { error: Some(e) } = settled else { panic!("{settled:?}") };
    assert!(e.contains("the image cannot be pulled"), "{e}");
    assert!(w.store.gpu_allocations().await.unwrap().is_empty(), "GPUs are free again");
    let tokens = w.store.list_tokens("alice").await.unwrap();
    assert!(tokens.iter().all(|t| t.kind != TokenKind::Server), "the server's token is revoked: {tokens:?}");
    assert!(w.store.get_oauth_client(&alice.client_id()).await.unwrap().is_none(), "its OAuth client is gone");
    // The GPUs can be had again: bob's start gets both.
    let bob = id("bob", "");
    w.servers.start(&bob, UserOptions { gpus: Some(2), ..Default::default() }).await.unwrap();
    let record = w.store.get_server("alice", "").await.unwrap().unwrap();
    assert_eq!(record.state, ServerState::Stopped);
}

#[tokio::test]
async fn a_start_that_never_answers_ends_stopped_at_its_timeout_with_the_reason() {
    let cfg = Config { start_timeout_seconds: Duration::from_secs(90), ..Config::default() };
    let w = world(Arc::new(NeverReady::default()), cfg, &["GPU-0"]).await;
    let alice = id("alice", "lab");
    let t0 = Instant::now();
    w.servers.start(&alice, UserOptions { gpus: Some(1), ..Default::default() }).await.unwrap();
    // Before the timeout it is still starting …
    let early = w.servers.wait_settled(&alice, t0 + Duration::from_secs(60), None).await.unwrap();
    assert_eq!(early, Settled::Pending);
    assert_eq!(w.store.gpu_allocations().await.unwrap().len(), 1, "held while starting");
    // … and at the timeout it is stopped, saying why.
    let settled = w.servers.wait_settled(&alice, far(), None).await.unwrap();
    let Settled::Stopped { error: Some(e) } = settled else { panic!("{settled:?}") };
    assert!(e.contains("did not answer") && e.contains("within 90 s"), "{e}");
    let waited = Instant::now() - t0;
    // The clock is paused: while the store's blocking I/O runs, it jumps to
    // the next timer, so past the deadline it may run on by a few polls (seen:
    // 126 s on a loaded machine); a start left to run would wait for `far()`.
    assert!(waited >= Duration::from_secs(89) && waited < Duration::from_secs(180), "{waited:?}");
    assert!(w.store.gpu_allocations().await.unwrap().is_empty());
    let events = w.store.recent_events(10).await.unwrap();
    assert!(events.iter().any(|e| e.kind == "start-failed" && e.detail.contains("did not answer")), "{events:?}");
}

#[tokio::test]
async fn the_named_server_limit_names_the_servers_that_count() {
    let cfg = Config { max_named_servers: 2, ..Config::default() };
    let w = world(Arc::new(NeverReady::default()), cfg, &[]).await;
    for name in ["a", "b"] {
        w.servers.start(&id("alice", name), UserOptions::default()).await.unwrap();
    }
    let refused = w.servers.start(&id("alice", "c"), UserOptions::default()).await.unwrap_err();
    match &refused {
        HubError::NamedServerLimit { limit, running, .. } => {
            assert_eq!((*limit, running.clone()), (2, vec!["a".to_string(), "b".to_string()]));
        }
        other => panic!("{other:?}"),
    }
    assert!(refused.to_string().contains("(a, b; the limit is 2)"), "{refused}");
    // The default server does not count, and bob has his own limit.
    w.servers.start(&id("alice", ""), UserOptions::default()).await.unwrap();
    w.servers.start(&id("bob", "a"), UserOptions::default()).await.unwrap();
}

#[tokio::test]
async fn reconcile_adopts_what_runs_and_marks_what_vanished() {
    let w = world(Arc::new(Scripted), Config::default(), &["GPU-0", "GPU-1"]).await;
    // As a berth killed with -9 left them: two running servers holding a GPU each.
    for (user, alive) in [("alice", true), ("bob", false)] {
        let mut s = Server::new(user, "");
        s.state = ServerState::Running;
        s.spawner_state = serde_json::json!({"alive": alive, "target": "http://127.0.0.1:9"}).to_string();
        s.url = Some(format!("/user/{user}/"));
        w.store.put_server(&s).await.unwrap();
        let gpu = if alive { "GPU-0" } else { "GPU-1" };
        w.store.add_gpu_allocations(user, "", &[gpu.to_string()]).await.unwrap();
    }
    let (adopted, vanished) = w.servers.reconcile().await.unwrap();
    assert_eq!((adopted, vanished), (1, 1));
    let route = w.servers.routes.lookup("/user/alice/lab").expect("alice's route is back");
    assert_eq!((route.user.as_str(), route.target.as_str()), ("alice", "http://127.0.0.1:9"));
    assert!(w.servers.routes.lookup("/user/bob/").is_none());
    let bob = w.store.get_server("bob", "").await.unwrap().unwrap();
    assert_eq!(bob.state, ServerState::Stopped);
    let why = bob.last_error.unwrap_or_default();
    assert!(why.contains("stopped while berth was not running") && why.contains("its process is gone"), "{why}");
    let held = w.store.gpu_allocations().await.unwrap();
    assert_eq!(held, vec![("GPU-0".to_string(), "alice".to_string(), String::new())], "bob's GPU is free");
    assert_eq!(w.store.get_server("alice", "").await.unwrap().unwrap().state, ServerState::Running);
}
