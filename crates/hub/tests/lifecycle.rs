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

// ------------------------------------------------------------ the GPU queue

async fn more_users(w: &World, names: &[&str]) {
    for name in names {
        let u = NewUser { name: name.to_string(), admin: false, authorized: true, password_hash: None };
        w.store.create_user(&u).await.unwrap();
    }
}

fn gpus(n: u64) -> UserOptions {
    UserOptions { gpus: Some(n), ..Default::default() }
}

/// Who holds which device, sorted by device.
async fn held(w: &World) -> Vec<(String, String)> {
    w.store.gpu_allocations().await.unwrap().into_iter().map(|(d, u, _)| (d, u)).collect()
}

async fn waiting(w: &World) -> Vec<String> {
    w.store.gpu_queue().await.unwrap().into_iter().map(|e| e.user).collect()
}

#[tokio::test]
async fn two_frees_at_once_hand_each_gpu_to_one_waiting_start() {
    let w = world(Arc::new(NeverReady::default()), Config::default(), &["GPU-0", "GPU-1"]).await;
    more_users(&w, &["carol", "dave"]).await;
    // Servers that never answer hold their GPUs while starting.
    for u in ["alice", "bob"] {
        w.servers.start(&id(u, ""), gpus(1)).await.unwrap();
    }
    for u in ["carol", "dave"] {
        w.servers.start(&id(u, ""), gpus(1)).await.unwrap();
    }
    assert_eq!(waiting(&w).await, ["carol", "dave"]);
    assert_eq!(w.servers.queue_len(), 2);
    let carol = w.store.get_server("carol", "").await.unwrap().unwrap();
    assert_eq!(carol.state, ServerState::Starting, "a waiting start is a pending spawn");

    let wait = Duration::from_secs(30);
    let (alice, bob) = (id("alice", ""), id("bob", ""));
    let (a, b) = tokio::join!(w.servers.stop(&alice, wait), w.servers.stop(&bob, wait));
    assert!(a.unwrap() && b.unwrap());
    let now = held(&w).await;
    let holders: Vec<&str> = now.iter().map(|(_, u)| u.as_str()).collect();
    let devices: Vec<&str> = now.iter().map(|(d, _)| d.as_str()).collect();
    assert_eq!(devices, ["GPU-0", "GPU-1"], "each device once: {now:?}");
    let mut sorted = holders.clone();
    sorted.sort();
    assert_eq!(sorted, ["carol", "dave"], "{now:?}");
    assert!(waiting(&w).await.is_empty());
    assert_eq!(w.servers.queue_len(), 0);
    let log = w.servers.progress_log(&id("dave", "")).unwrap();
    let mut watch = log.watch();
    let mut said = Vec::new();
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(10), watch.next()).await {
        said.push(ev.message);
    }
    assert_eq!(said[..2], ["Server requested", "waiting for a GPU: position 2 of 2"], "{said:?}");
    assert!(said.contains(&"Got a GPU; starting".to_string()), "{said:?}");
}

#[tokio::test]
async fn nobody_jumps_a_head_that_needs_more_than_is_free() {
    let w = world(Arc::new(NeverReady::default()), Config::default(), &["GPU-0", "GPU-1"]).await;
    more_users(&w, &["carol", "dave"]).await;
    for u in ["alice", "bob"] {
        w.servers.start(&id(u, ""), gpus(1)).await.unwrap();
    }
    w.servers.start(&id("carol", ""), gpus(2)).await.unwrap();
    w.servers.start(&id("dave", ""), gpus(1)).await.unwrap();
    let wait = Duration::from_secs(30);
    assert!(w.servers.stop(&id("alice", ""), wait).await.unwrap());
    // One GPU is free: dave would fit, but carol is first and needs two.
    assert_eq!(held(&w).await, [("GPU-1".to_string(), "bob".to_string())]);
    assert_eq!(waiting(&w).await, ["carol", "dave"]);
    // A start that asks for a GPU now goes behind them, though one is free.
    w.servers.start(&id("alice", "again"), gpus(1)).await.unwrap();
    assert_eq!(waiting(&w).await, ["carol", "dave", "alice"]);
    assert_eq!(held(&w).await.len(), 1);
    // A start without GPUs does not wait at all.
    w.servers.start(&id("bob", "cpu"), UserOptions::default()).await.unwrap();
    assert_eq!(waiting(&w).await.len(), 3);
    assert!(w.servers.stop(&id("bob", ""), wait).await.unwrap());
    let now = held(&w).await;
    assert_eq!(now.iter().map(|(_, u)| u.as_str()).collect::<Vec<_>>(), ["carol", "carol"], "{now:?}");
    assert_eq!(waiting(&w).await, ["dave", "alice"]);
}

#[tokio::test]
async fn a_waiting_start_fails_with_the_reason_when_the_inventory_shrinks() {
    let w = world(Arc::new(NeverReady::default()), Config::default(), &["GPU-0", "GPU-1"]).await;
    w.servers.start(&id("alice", ""), gpus(1)).await.unwrap();
    w.servers.start(&id("bob", ""), gpus(2)).await.unwrap();
    assert_eq!(waiting(&w).await, ["bob"]);
    // As after a restart on a machine with one GPU fewer.
    w.servers.gpus.set_inventory(vec![Gpu { id: "GPU-0".into(), name: "test".into() }]);
    assert!(w.servers.stop(&id("alice", ""), Duration::from_secs(30)).await.unwrap());
    let settled = w.servers.wait_settled(&id("bob", ""), far(), None).await.unwrap();
    assert_eq!(settled, Settled::Stopped { error: Some("2 GPUs asked for, but this hub has only 1".into()) });
    assert!(waiting(&w).await.is_empty());
    assert!(held(&w).await.is_empty(), "nothing was allocated for it");
    let events = w.store.recent_events(10).await.unwrap();
    assert!(events.iter().any(|e| e.kind == "start-failed" && e.subject == "bob"), "{events:?}");
}

#[tokio::test]
async fn reconcile_keeps_waiting_starts_waiting_and_then_hands_them_gpus() {
    let w = world(Arc::new(Scripted), Config::default(), &["GPU-0", "GPU-1"]).await;
    more_users(&w, &["carol"]).await;
    // As a berth killed with -9 left them: alice runs on GPU-0; bob waited
    // for two GPUs and carol for one behind him; bob had been handed GPU-1
    // just before berth died, so it is still recorded as his.
    let mut a = Server::new("alice", "");
    a.state = ServerState::Running;
    a.spawner_state = serde_json::json!({"alive": true, "target": "http://127.0.0.1:9"}).to_string();
    w.store.put_server(&a).await.unwrap();
    w.store.add_gpu_allocations("alice", "", &["GPU-0".to_string()]).await.unwrap();
    for (user, want) in [("bob", 2), ("carol", 1)] {
        let mut s = Server::new(user, "");
        s.state = ServerState::Starting;
        s.user_options = serde_json::json!({"gpus": want}).to_string();
        w.store.put_server(&s).await.unwrap();
        w.store.enqueue_gpus(user, "", want, 1).await.unwrap();
    }
    w.store.add_gpu_allocations("bob", "", &["GPU-1".to_string()]).await.unwrap();

    let (adopted, vanished) = w.servers.reconcile().await.unwrap();
    assert_eq!((adopted, vanished), (1, 0), "nothing that waited was marked vanished");
    // bob's stale GPU went back; he still waits (one GPU free, two wanted),
    // and carol behind him.
    assert_eq!(held(&w).await, [("GPU-0".to_string(), "alice".to_string())]);
    assert_eq!(waiting(&w).await, ["bob", "carol"]);
    assert_eq!(w.servers.queue_len(), 2);
    for u in ["bob", "carol"] {
        let r = w.store.get_server(u, "").await.unwrap().unwrap();
        assert_eq!((r.state, r.last_error), (ServerState::Starting, None), "{u}");
    }
    let log = w.servers.progress_log(&id("carol", "")).expect("a progress log for the restored start");
    let mut watch = log.watch();
    let mut said = Vec::new();
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(10), watch.next()).await {
        said.push(ev.message);
    }
    assert_eq!(said, ["Server requested", "waiting for a GPU: position 2 of 2"]);
}

#[tokio::test]
async fn a_stop_during_a_start_ends_it_once_and_a_new_start_keeps_its_gpu() {
    let cfg = Config { start_timeout_seconds: Duration::from_secs(90), ..Config::default() };
    let w = world(Arc::new(NeverReady::default()), cfg, &["GPU-0"]).await;
    let alice = id("alice", "lab");
    w.servers.start(&alice, UserOptions { gpus: Some(1), ..Default::default() }).await.unwrap();
    // The spawner has returned: the start waits for an answer that never comes.
    for i in 0.. {
        let r = w.store.get_server("alice", "lab").await.unwrap().unwrap();
        if r.spawner_state != "{}" {
            break;
        }
        assert!(i < 1000, "the spawner never returned: {r:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(w.servers.stop(&alice, Duration::from_secs(30)).await.unwrap(), "the stop finished");
    let r = w.store.get_server("alice", "lab").await.unwrap().unwrap();
    assert_eq!((r.state, r.last_error.as_deref()), (ServerState::Stopped, None), "a stop, not a failure");
    assert!(w.store.gpu_allocations().await.unwrap().is_empty(), "its GPU is free");
    // Started again at once, it gets the GPU, and nothing of the first start
    // takes it away (the first start's wait would have seen its process gone
    // within a second, and torn the server down a second time).
    w.servers.start(&alice, UserOptions { gpus: Some(1), ..Default::default() }).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(w.store.gpu_allocations().await.unwrap().len(), 1, "the new start holds the GPU");
    assert_eq!(w.store.get_server("alice", "lab").await.unwrap().unwrap().state, ServerState::Starting);
    let events = w.store.recent_events(20).await.unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "stop").count(), 1, "{kinds:?}");
    assert!(!kinds.contains(&"start-failed"), "{kinds:?}");
}
