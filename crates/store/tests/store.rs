//! The store's behaviour, run against SQLite and against PostgreSQL.
//!
//! PostgreSQL comes from `BERTH_TEST_POSTGRES_URL`, which the project's test
//! command (`scripts/test`) sets after starting a throw-away cluster. Without
//! it the PostgreSQL half fails and says so: it is never silently skipped.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test
use berth_core::ServerState;
use berth_store::*;

async fn sqlite() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_in_dir(dir.path()).await.unwrap();
    (store, dir)
}

/// A fresh database on the test PostgreSQL server, dropped at the end.
async fn postgres() -> (Store, PgDb) {
    let base = std::env::var("BERTH_TEST_POSTGRES_URL")
        .expect("BERTH_TEST_POSTGRES_URL is not set: run the tests through scripts/test, which starts PostgreSQL");
    let name = format!("berth_test_{}_{}", std::process::id(), rand_suffix());
    let admin = Store::raw_connect(&base).await;
    admin.execute_raw(&format!("CREATE DATABASE {name}")).await;
    let url = format!("{}/{}", base.trim_end_matches('/'), name);
    let store = Store::open(&url).await.unwrap();
    (store, PgDb { base, name })
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
        + std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64
}

struct PgDb {
    base: String,
    name: String,
}

impl PgDb {
    async fn drop_db(self, store: Store) {
        store.close().await;
        let admin = Store::raw_connect(&self.base).await;
        admin.execute_raw(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).await;
    }
}

/// A connection to the server's maintenance database, for CREATE/DROP DATABASE.
trait RawConnect {
    async fn raw_connect(url: &str) -> RawPg;
}
impl RawConnect for Store {
    async fn raw_connect(url: &str) -> RawPg {
        sqlx::any::install_default_drivers();
        RawPg(sqlx::AnyPool::connect(url).await.expect("connect to the test PostgreSQL server"))
    }
}
struct RawPg(sqlx::AnyPool);
impl RawPg {
    async fn execute_raw(&self, sql: &str) {
        sqlx::query(sql).execute(&self.0).await.unwrap();
    }
}

macro_rules! both {
    ($name:ident, $body:ident) => {
        mod $name {
            use super::*;
            #[tokio::test]
            async fn sqlite() {
                let (store, _dir) = super::sqlite().await;
                $body(&store).await;
            }
            #[tokio::test]
            async fn postgres() {
                let (store, db) = super::postgres().await;
                $body(&store).await;
                db.drop_db(store).await;
            }
        }
    };
}

fn new_user(name: &str) -> NewUser {
    NewUser { name: name.into(), admin: false, authorized: false, password_hash: Some("$argon2id$x".into()) }
}

async fn users_crud(s: &Store) {
    let u = s.create_user(&new_user("alice")).await.unwrap();
    assert_eq!(u.name, "alice");
    assert!(!u.authorized && !u.admin);
    assert!(matches!(s.create_user(&new_user("alice")).await, Err(StoreError::Conflict { .. })));
    s.set_authorized("alice", true).await.unwrap();
    s.set_admin("alice", true).await.unwrap();
    let u = s.get_user("alice").await.unwrap().unwrap();
    assert!(u.authorized && u.admin);
    assert!(matches!(s.set_admin("nobody", true).await, Err(StoreError::NotFound { .. })));
    s.rename_user("alice", "alicia").await.unwrap();
    assert!(s.get_user("alice").await.unwrap().is_none());
    s.delete_user("alicia").await.unwrap();
    assert!(matches!(s.delete_user("alicia").await, Err(StoreError::NotFound { .. })));
}
both!(users_crud_, users_crud);

async fn listing(s: &Store) {
    for i in 0..25 {
        s.create_user(&new_user(&format!("u{i:02}"))).await.unwrap();
    }
    s.create_user(&new_user("zed")).await.unwrap();
    let (page, total) = s.list_users(&UserQuery { offset: 10, limit: 5, ..Default::default() }).await.unwrap();
    assert_eq!(total, 26);
    assert_eq!(page.iter().map(|u| u.name.as_str()).collect::<Vec<_>>(), ["u10", "u11", "u12", "u13", "u14"]);
    let (page, total) =
        s.list_users(&UserQuery { name_prefix: Some("u1".into()), limit: 100, ..Default::default() }).await.unwrap();
    assert_eq!(total, 10);
    assert_eq!(page.len(), 10);
    let (_, total) = s.list_users(&UserQuery { name_prefix: Some("%".into()), ..Default::default() }).await.unwrap();
    assert_eq!(total, 0);

    let mut srv = Server::new("zed", "");
    srv.state = ServerState::Running;
    s.put_server(&srv).await.unwrap();
    let (ready, _) = s.list_users(&UserQuery { state: StateFilter::Ready, ..Default::default() }).await.unwrap();
    assert_eq!(ready.iter().map(|u| u.name.as_str()).collect::<Vec<_>>(), ["zed"]);
    let (_, inactive) = s.list_users(&UserQuery { state: StateFilter::Inactive, ..Default::default() }).await.unwrap();
    assert_eq!(inactive, 25);
}
both!(listing_, listing);

async fn sessions_and_passwords(s: &Store) {
    s.create_user(&new_user("bob")).await.unwrap();
    s.create_session("h1", "p1", "bob").await.unwrap();
    s.create_session("h2", "p2", "bob").await.unwrap();
    let (sess, user) = s.get_session("h1").await.unwrap().unwrap();
    assert_eq!((sess.public_id.as_str(), user.name.as_str()), ("p1", "bob"));
    // A password change keeps the session that made it and revokes the rest.
    s.set_password("bob", "$argon2id$new", Some("h1")).await.unwrap();
    assert!(s.get_session("h1").await.unwrap().is_some());
    assert!(s.get_session("h2").await.unwrap().is_none());
    s.revoke_session("h1").await.unwrap();
    assert!(s.get_session("h1").await.unwrap().is_none());
    // Lock-out bookkeeping.
    s.record_login_failure("bob", 5, 1000, Some(2000)).await.unwrap();
    let u = s.get_user("bob").await.unwrap().unwrap();
    assert_eq!((u.failed_logins, u.locked_until), (5, Some(2000)));
    s.record_login_success("bob", 3000).await.unwrap();
    let u = s.get_user("bob").await.unwrap().unwrap();
    assert_eq!((u.failed_logins, u.locked_until, u.last_activity), (0, None, Some(3000)));
    // Deleting the user takes the sessions with it.
    s.create_session("h3", "p3", "bob").await.unwrap();
    s.delete_user("bob").await.unwrap();
    assert!(s.get_session("h3").await.unwrap().is_none());
}
both!(sessions_, sessions_and_passwords);

async fn tokens(s: &Store) {
    s.create_user(&new_user("carol")).await.unwrap();
    let t = s
        .create_token(&NewToken {
            hash: "abc".into(),
            user: "carol".into(),
            kind: TokenKind::Api,
            server: None,
            scopes: vec!["read:users".into()],
            note: "ci".into(),
            expires_at: Some(10),
            session_id: None,
            oauth_client: None,
        })
        .await
        .unwrap();
    let (found, owner) = s.find_token("abc").await.unwrap().unwrap();
    assert_eq!((found.id.as_str(), owner.name.as_str()), (t.id.as_str(), "carol"));
    assert_eq!(found.scopes, vec!["read:users".to_string()]);
    assert!(found.is_expired(11) && !found.is_expired(9));
    assert_eq!(s.list_tokens("carol").await.unwrap().len(), 1);
    s.touch_tokens(&[(t.id.clone(), 77)]).await.unwrap();
    assert_eq!(s.get_token("carol", &t.id).await.unwrap().unwrap().last_activity, Some(77));
    assert_eq!(s.delete_expired_tokens(11).await.unwrap(), 1);
    assert!(s.find_token("abc").await.unwrap().is_none());
}
both!(tokens_, tokens);

async fn servers_and_oauth(s: &Store) {
    s.create_user(&new_user("dan")).await.unwrap();
    let mut srv = Server::new("dan", "lab");
    srv.state = ServerState::Starting;
    srv.spawner_state = r#"{"pid":1}"#.into();
    s.put_server(&srv).await.unwrap();
    srv.state = ServerState::Running;
    s.put_server(&srv).await.unwrap();
    assert_eq!(s.get_server("dan", "lab").await.unwrap().unwrap(), srv);
    assert_eq!(s.count_active_servers().await.unwrap(), 1);
    s.touch_servers(&[("dan".into(), "lab".into(), 500)]).await.unwrap();
    s.touch_servers(&[("dan".into(), "lab".into(), 400)]).await.unwrap();
    assert_eq!(s.get_server("dan", "lab").await.unwrap().unwrap().last_activity, Some(500));
    assert_eq!(s.servers_of(&["dan".into()]).await.unwrap().len(), 1);

    let client = OAuthClient {
        id: "jupyterhub-user-dan-lab".into(),
        secret_hash: "h".into(),
        redirect_uri: "/user/dan/lab/oauth_callback".into(),
        user: "dan".into(),
        server: "lab".into(),
    };
    s.put_oauth_client(&client).await.unwrap();
    let code = OAuthCode {
        code_hash: "c1".into(),
        client_id: client.id.clone(),
        user: "dan".into(),
        session_id: None,
        redirect_uri: client.redirect_uri.clone(),
        code_challenge: Some("x".into()),
        scopes: vec!["access:servers!server=dan/lab".into()],
        expires_at: i64::MAX,
    };
    s.put_oauth_code(&code).await.unwrap();
    assert!(s.take_oauth_code("c1").await.unwrap().is_some());
    assert!(s.take_oauth_code("c1").await.unwrap().is_none(), "codes are single-use");
    s.delete_oauth_client(&client.id).await.unwrap();
    assert!(s.get_oauth_client(&client.id).await.unwrap().is_none());
    s.add_event("dan", "start", "dan/lab", "").await.unwrap();
    assert_eq!(s.recent_events(10).await.unwrap().len(), 1);
}
both!(servers_, servers_and_oauth);

async fn image_checks(s: &Store) {
    use berth_store::ImageCheck;
    assert!(s.image_checks().await.unwrap().is_empty());
    let mut c = ImageCheck {
        template: "lab".into(),
        image: "127.0.0.1:5000/lab:stable".into(),
        checked: 1,
        status: "available".into(),
        local_digest: "sha256:aa".into(),
        remote_digest: "sha256:bb".into(),
        message: "an update is available".into(),
    };
    s.set_image_check(&c).await.unwrap();
    c.status = "updated".into();
    c.local_digest = "sha256:bb".into();
    c.checked = 2;
    s.set_image_check(&c).await.unwrap();
    assert_eq!(s.image_checks().await.unwrap(), vec![c], "the second check replaces the first");
}
both!(image_checks_, image_checks);

async fn image_moves(s: &Store) {
    use berth_store::ImageMove;
    s.create_user(&new_user("fay")).await.unwrap();
    assert!(s.image_moves().await.unwrap().is_empty());
    let mut m = ImageMove {
        user: "fay".into(),
        server: "".into(),
        template: "lab".into(),
        image: "127.0.0.1:5000/lab:stable".into(),
        previous: "127.0.0.1:5000/lab:berth-previous".into(),
        digest: "sha256:bb".into(),
        phase: "waiting".into(),
        detail: String::new(),
        created: 5,
    };
    s.put_image_move(&m).await.unwrap();
    m.digest = "sha256:cc".into();
    s.put_image_move(&m).await.unwrap();
    s.set_image_move_phase("fay", "", "rolling-back", "never ready").await.unwrap();
    m.phase = "rolling-back".into();
    m.detail = "never ready".into();
    assert_eq!(s.image_moves().await.unwrap(), vec![m], "one move per server, the latest");
    s.delete_image_move("fay", "").await.unwrap();
    assert!(s.image_moves().await.unwrap().is_empty());
    s.put_image_move(&ImageMove { phase: "waiting".into(), ..s_move("fay") }).await.unwrap();
    s.delete_user("fay").await.unwrap();
    assert!(s.image_moves().await.unwrap().is_empty(), "a deleted user's moves go with it");
}
both!(image_moves_, image_moves);

fn s_move(user: &str) -> berth_store::ImageMove {
    berth_store::ImageMove {
        user: user.into(),
        server: "x".into(),
        template: "t".into(),
        image: "i:1".into(),
        previous: "i:berth-previous".into(),
        digest: "sha256:dd".into(),
        phase: String::new(),
        detail: String::new(),
        created: 0,
    }
}

#[tokio::test]
async fn sqlite_is_wal_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open_in_dir(dir.path()).await.unwrap();
        s.create_user(&new_user("erin")).await.unwrap();
        s.close().await;
    }
    assert!(dir.path().join("berth.sqlite-wal").exists() || dir.path().join("berth.sqlite").exists());
    let s = Store::open_in_dir(dir.path()).await.unwrap();
    assert_eq!(s.schema_version().await.unwrap(), 13, "every migration, through 13 (image moves), applied once");
    assert!(s.get_user("erin").await.unwrap().is_some());
    let mode: String = s.journal_mode().await.unwrap();
    assert_eq!(mode, "wal");
}

#[tokio::test]
async fn corrupt_sqlite_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("berth.sqlite"), vec![0x42u8; 8192]).unwrap();
    let err = Store::open_in_dir(dir.path()).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("berth.sqlite"), "{err}");
}

#[tokio::test]
async fn another_process_writes_are_seen() {
    // Two stores on one file stand for the hub and `berth user ...`.
    let dir = tempfile::tempdir().unwrap();
    let hub = Store::open_in_dir(dir.path()).await.unwrap();
    let cli = Store::open_in_dir(dir.path()).await.unwrap();
    hub.create_user(&new_user("fay")).await.unwrap();
    assert!(!hub.get_user("fay").await.unwrap().unwrap().authorized);
    cli.set_authorized("fay", true).await.unwrap();
    cli.create_user(&new_user("gus")).await.unwrap();
    let start = std::time::Instant::now();
    loop {
        let fay = hub.get_user("fay").await.unwrap().unwrap();
        let gus = hub.get_user("gus").await.unwrap();
        if fay.authorized && gus.is_some() {
            break;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(3), "the hub never saw the CLI's writes");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    cli.delete_user("gus").await.unwrap();
    let start = std::time::Instant::now();
    while hub.get_user("gus").await.unwrap().is_some() {
        assert!(start.elapsed() < std::time::Duration::from_secs(3), "the hub never saw the deletion");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn gpus(s: &Store) {
    s.create_user(&new_user("hal")).await.unwrap();
    s.add_gpu_allocations("hal", "", &["GPU-0".into(), "GPU-1".into()]).await.unwrap();
    assert!(s.add_gpu_allocations("hal", "", &["GPU-0".into()]).await.is_err(), "one device once per server");
    assert_eq!(s.gpu_allocations().await.unwrap().len(), 2);
    s.set_gpu_shared("GPU-3", true).await.unwrap();
    s.set_gpu_shared("GPU-3", true).await.unwrap();
    assert_eq!(s.shared_gpus().await.unwrap(), vec!["GPU-3".to_string()]);
    s.set_gpu_shared("GPU-3", false).await.unwrap();
    assert!(s.shared_gpus().await.unwrap().is_empty());
    assert_eq!(s.free_gpus("hal", "").await.unwrap(), 2);
    s.add_gpu_allocations("hal", "lab", &["GPU-2".into()]).await.unwrap();
    s.delete_user("hal").await.unwrap();
    assert!(s.gpu_allocations().await.unwrap().is_empty(), "allocations go with the user");
}
both!(gpus_, gpus);

async fn gpu_queue(s: &Store) {
    for u in ["qa", "qb", "qc"] {
        s.create_user(&new_user(u)).await.unwrap();
        s.put_server(&Server::new(u, "")).await.unwrap();
    }
    s.put_server(&Server::new("qa", "lab")).await.unwrap();
    assert!(s.enqueue_gpus("qa", "nope", 1, 1).await.is_err(), "an entry needs its server record");
    s.enqueue_gpus("qb", "", 2, 10).await.unwrap();
    s.enqueue_gpus("qa", "", 1, 20).await.unwrap();
    s.enqueue_gpus("qc", "", 1, 30).await.unwrap();
    s.enqueue_gpus("qa", "lab", 1, 40).await.unwrap();
    assert!(matches!(s.enqueue_gpus("qa", "", 1, 50).await, Err(StoreError::Conflict { .. })), "once per server");
    let order =
        |q: Vec<QueueEntry>| q.into_iter().map(|e| format!("{}/{}:{}", e.user, e.server, e.gpus)).collect::<Vec<_>>();
    assert_eq!(order(s.gpu_queue().await.unwrap()), ["qb/:2", "qa/:1", "qc/:1", "qa/lab:1"], "first come first");
    s.reorder_gpu_queue(&[("qc".into(), "".into()), ("ghost".into(), "".into())]).await.unwrap();
    assert_eq!(
        order(s.gpu_queue().await.unwrap()),
        ["qc/:1", "qb/:2", "qa/:1", "qa/lab:1"],
        "the rest keep their order"
    );
    s.enqueue_gpus("qa", "lab", 1, 60).await.unwrap_err();
    assert!(s.dequeue_gpus("qb", "").await.unwrap());
    assert!(!s.dequeue_gpus("qb", "").await.unwrap(), "not queued twice");
    s.put_server(&Server::new("qb", "")).await.unwrap();
    s.enqueue_gpus("qb", "", 1, 70).await.unwrap();
    assert_eq!(
        order(s.gpu_queue().await.unwrap()).last().unwrap(),
        "qb/:1",
        "a new entry goes last, after a reorder too"
    );
    s.delete_server("qa", "lab").await.unwrap();
    s.delete_user("qc").await.unwrap();
    assert_eq!(order(s.gpu_queue().await.unwrap()), ["qa/:1", "qb/:1"], "entries go with their server and user");
    s.rename_user("qa", "qz").await.unwrap();
    assert_eq!(s.gpu_queue().await.unwrap()[0].user, "qz", "and follow a rename");
}
both!(gpu_queue_, gpu_queue);

async fn ssh_keys(s: &Store) {
    s.create_user(&new_user("kay")).await.unwrap();
    s.create_user(&new_user("lee")).await.unwrap();
    let key = |user: &str, fp: &str| NewSshKey {
        user: user.into(),
        fingerprint: fp.into(),
        algorithm: "ssh-ed25519".into(),
        public_key: format!("ssh-ed25519 {fp}"),
        comment: "laptop".into(),
    };
    let k = s.add_ssh_key(&key("kay", "SHA256:aaa")).await.unwrap();
    assert!(matches!(s.add_ssh_key(&key("lee", "SHA256:aaa")).await, Err(StoreError::Conflict { .. })));
    s.add_ssh_key(&key("kay", "SHA256:bbb")).await.unwrap();
    assert_eq!(s.list_ssh_keys("kay").await.unwrap().len(), 2);
    assert_eq!(s.find_ssh_key("kay", "SHA256:aaa").await.unwrap().unwrap().id, k.id);
    assert!(s.find_ssh_key("lee", "SHA256:aaa").await.unwrap().is_none(), "a key belongs to its owner only");
    s.touch_ssh_key(&k.id).await.unwrap();
    assert!(s.find_ssh_key("kay", "SHA256:aaa").await.unwrap().unwrap().last_used.is_some());
    s.delete_ssh_key("kay", &k.id).await.unwrap();
    s.delete_ssh_key("kay", "SHA256:bbb").await.unwrap();
    assert!(matches!(s.delete_ssh_key("kay", "SHA256:bbb").await, Err(StoreError::NotFound { .. })));
    s.add_ssh_key(&key("lee", "SHA256:ccc")).await.unwrap();
    s.add_event("lee", "ssh-session", "lee", "{}").await.unwrap();
    s.add_event("lee", "ssh-session", "lee", "{}").await.unwrap();
    assert_eq!(s.count_events_by_subject("ssh-session").await.unwrap().get("lee"), Some(&2));
    s.delete_user("lee").await.unwrap();
    assert!(s.list_ssh_keys("lee").await.unwrap().is_empty(), "keys go with the user");
}
both!(ssh_keys_, ssh_keys);

async fn user_limits(s: &Store) {
    s.create_user(&new_user("lim")).await.unwrap();
    assert_eq!(s.user_limits("lim").await.unwrap(), UserLimits::default());
    let l = UserLimits {
        max_named_servers: Some(1),
        templates: Some(vec!["comfyui".into()]),
        gpu_hours_per_period: Some(0.0003),
    };
    s.set_user_limits("lim", &l).await.unwrap();
    assert_eq!(s.user_limits("lim").await.unwrap(), l);
    assert_eq!(s.gpu_hour_limits().await.unwrap().get("lim"), Some(&0.0003));
    s.set_user_limits("lim", &UserLimits::default()).await.unwrap();
    assert_eq!(s.user_limits("lim").await.unwrap(), UserLimits::default());
    assert!(s.gpu_hour_limits().await.unwrap().is_empty());
    assert!(matches!(s.set_user_limits("ghost", &l).await, Err(StoreError::NotFound { .. })));
    s.delete_user("lim").await.unwrap();
}
both!(user_limits_, user_limits);

/// The usage ledger: GPU intervals open and close with their allocation;
/// server intervals with the start and stop; nothing is counted twice; a
/// crash's leftovers are set right by `reconcile_usage`.
async fn usage_ledger(s: &Store) {
    s.create_user(&new_user("uma")).await.unwrap();
    let all = |s: &Store| {
        let s = s.clone();
        async move { s.usage_intervals(Some("uma"), 0, i64::MAX).await.unwrap() }
    };
    s.add_gpu_allocations("uma", "", &["GPU-0".into(), "GPU-1".into()]).await.unwrap();
    let open = all(s).await;
    assert_eq!(open.len(), 2, "{open:?}");
    assert!(open.iter().all(|i| i.kind == UsageKind::Gpu && i.ended.is_none()));
    let started = open[0].started;
    assert!(s.add_gpu_allocations("uma", "", &["GPU-0".into()]).await.is_err());
    assert_eq!(all(s).await.len(), 2, "a refused allocation opens nothing");
    assert_eq!(s.free_gpus_at("uma", "", started + 5_000).await.unwrap(), 2);
    let closed = all(s).await;
    assert!(closed.iter().all(|i| i.ended == Some(started + 5_000)), "{closed:?}");
    // A close before the start (a clock that went back) never makes time negative.
    s.add_gpu_allocations("uma", "lab", &["GPU-2".into()]).await.unwrap();
    s.free_gpus_at("uma", "lab", 0).await.unwrap();
    let lab: Vec<UsageInterval> = all(s).await.into_iter().filter(|i| i.server == "lab").collect();
    assert_eq!(lab.len(), 1);
    assert_eq!(lab[0].ended, Some(lab[0].started));

    // Server intervals: one open at a time, whatever is asked.
    s.open_server_usage("uma", "", 1_000).await.unwrap();
    s.open_server_usage("uma", "", 2_000).await.unwrap();
    let servers = |v: Vec<UsageInterval>| v.into_iter().filter(|i| i.kind == UsageKind::Server).collect::<Vec<_>>();
    assert_eq!(servers(all(s).await).len(), 1, "a second open of the same server is no second interval");
    // Overlap queries: what ends before `from` or starts at/after `to` is left out.
    assert_eq!(servers(s.usage_intervals(Some("uma"), 0, 1_000).await.unwrap()).len(), 0);
    assert_eq!(servers(s.usage_intervals(Some("uma"), 0, 1_001).await.unwrap()).len(), 1);
    assert_eq!(s.close_server_usage("uma", "", 4_000).await.unwrap(), 1);
    assert_eq!(s.close_server_usage("uma", "", 9_000).await.unwrap(), 0, "closed once");
    assert_eq!(servers(s.usage_intervals(Some("uma"), 4_000, 10_000).await.unwrap()).len(), 0);

    // After a crash: the server record says stopped but its interval is
    // open (the close was lost), and another server runs with no interval.
    s.open_server_usage("uma", "old", 10_000).await.unwrap();
    let mut running = Server::new("uma", "new");
    running.state = ServerState::Running;
    running.started = Some(20_000);
    s.put_server(&running).await.unwrap();
    assert_eq!(s.reconcile_usage(30_000, 40_000).await.unwrap(), (1, 1));
    let v = servers(all(s).await);
    let old = v.iter().find(|i| i.server == "old").unwrap();
    assert_eq!(old.ended, Some(30_000), "closed at the last heartbeat, not at the restart");
    let new = v.iter().find(|i| i.server == "new").unwrap();
    assert_eq!((new.started, new.ended), (20_000, None), "opened where the server started");
    assert_eq!(s.reconcile_usage(30_000, 40_000).await.unwrap(), (0, 0), "a second pass changes nothing");
    // Stopped again and restarted: a reopened interval never overlaps the last one.
    s.close_server_usage("uma", "new", 25_000).await.unwrap();
    assert_eq!(s.reconcile_usage(30_000, 40_000).await.unwrap(), (0, 1));
    let again: Vec<UsageInterval> = servers(all(s).await).into_iter().filter(|i| i.server == "new").collect();
    assert_eq!(again.len(), 2);
    assert_eq!(again[1].started, 25_000, "{again:?}");
    // A start waiting in the GPU queue is starting but runs nothing yet: no server-hours.
    let mut waiting = Server::new("uma", "queued");
    waiting.state = ServerState::Starting;
    waiting.started = Some(26_000);
    s.put_server(&waiting).await.unwrap();
    s.enqueue_gpus("uma", "queued", 1, 26_000).await.unwrap();
    assert_eq!(s.reconcile_usage(30_000, 40_000).await.unwrap(), (0, 0), "nothing opened for a waiting start");

    assert_eq!(s.usage_heartbeat().await.unwrap(), None);
    s.set_usage_heartbeat(7).await.unwrap();
    s.set_usage_heartbeat(8).await.unwrap();
    assert_eq!(s.usage_heartbeat().await.unwrap(), Some(8));
    s.add_event("cli", "cull", "uma", "idle").await.unwrap();
    s.add_event("cli", "cull", "uma", "idle").await.unwrap();
    s.add_event("cli", "cull", "uma", "max-age").await.unwrap();
    let mut culls = s.count_events_by_detail("cull").await.unwrap();
    culls.sort();
    assert_eq!(culls, vec![("idle".to_string(), 2), ("max-age".to_string(), 1)]);
    s.delete_user("uma").await.unwrap();
    assert!(s.usage_intervals(None, 0, i64::MAX).await.unwrap().is_empty(), "usage goes with the user");
}
both!(usage_ledger_, usage_ledger);

async fn adopted_volumes(s: &Store) {
    let u = s.create_user(&new_user("mig")).await.unwrap();
    let other = s.create_user(&new_user("mog")).await.unwrap();
    let vol = |name: &str, account: Option<&str>, role: &str| AdoptedVolume {
        volume: name.into(),
        account_id: account.map(str::to_string),
        role: role.into(),
        mount_point: "/home".into(),
        driver: "local".into(),
        options: String::new(),
        source: "jupyterhub:/x.sqlite".into(),
        adopted: 0,
    };
    let home = vol("jupyterlab-mig_home", Some(&u.account_id), "home");
    assert!(s.adopt_volume(&home).await.unwrap(), "new");
    assert!(!s.adopt_volume(&home).await.unwrap(), "the same again: nothing to do");
    // One volume serves one role of one account; one volume per role.
    let taken = vol("jupyterlab-mig_home", Some(&other.account_id), "home");
    assert!(matches!(s.adopt_volume(&taken).await, Err(StoreError::Conflict { .. })));
    let second = vol("elsewhere_home", Some(&u.account_id), "home");
    assert!(matches!(s.adopt_volume(&second).await, Err(StoreError::Conflict { .. })));
    let ghost = vol("ghost_home", Some("1nobody"), "home");
    assert!(matches!(s.adopt_volume(&ghost).await, Err(StoreError::NotFound { .. })));
    let shared = vol("jupyterhub_shared", None, "shared");
    assert!(s.adopt_volume(&shared).await.unwrap());
    assert!(!s.adopt_volume(&shared).await.unwrap());
    assert!(matches!(s.adopt_volume(&vol("other_shared", None, "shared")).await, Err(StoreError::Conflict { .. })));
    let start: Vec<String> =
        s.adopted_volumes_for_start(&u.account_id).await.unwrap().into_iter().map(|v| v.volume).collect();
    assert_eq!(start, ["jupyterlab-mig_home", "jupyterhub_shared"]);
    let start: Vec<String> =
        s.adopted_volumes_for_start(&other.account_id).await.unwrap().into_iter().map(|v| v.volume).collect();
    assert_eq!(start, ["jupyterhub_shared"], "the shared volume is everyone's");
    // Where an account came from.
    s.record_import(&u.account_id, "jupyterhub:/x.sqlite", "Mig").await.unwrap();
    s.record_import(&u.account_id, "jupyterhub:/x.sqlite", "Mig").await.unwrap();
    assert_eq!(s.import_source(&u.account_id).await.unwrap(), Some(("jupyterhub:/x.sqlite".into(), "Mig".into())));
    assert_eq!(s.import_source(&other.account_id).await.unwrap(), None);
    // The records go with the account; the shared one stays.
    s.delete_user("mig").await.unwrap();
    assert_eq!(s.adopted_volume("jupyterlab-mig_home").await.unwrap(), None);
    assert_eq!(s.import_source(&u.account_id).await.unwrap(), None);
    assert_eq!(s.list_adopted_volumes().await.unwrap().len(), 1);
    s.delete_user("mog").await.unwrap();
}
both!(adopted_volumes_, adopted_volumes);

async fn event_log(s: &Store) {
    s.add_event("root", "user-authorize", "ann", "").await.unwrap();
    s.add_event("ann", "start", "ann/lab", "").await.unwrap();
    s.add_event("ann", "start", "annex", "").await.unwrap();
    s.add_event("bob", "start", "bob", "").await.unwrap();
    s.add_event("root", "session-revoke", "bob", "s1").await.unwrap();
    let q = |f: fn(&mut EventQuery)| {
        let mut q = EventQuery { limit: 100, ..Default::default() };
        f(&mut q);
        q
    };
    let (all, total) = s.query_events(&q(|_| {})).await.unwrap();
    assert_eq!((all.len(), total), (5, 5));
    assert!(all.windows(2).all(|w| w[0].at >= w[1].at), "newest first");
    // A user's events: by them or about them and their servers, not a name that starts alike.
    let (ann, n) = s.query_events(&q(|q| q.user = Some("ann".into()))).await.unwrap();
    assert_eq!(n, 3);
    assert!(ann.iter().all(|e| e.subject != "annex" || e.actor == "ann"));
    let (ex, _) = s.query_events(&q(|q| q.user = Some("annex".into()))).await.unwrap();
    assert_eq!(ex.len(), 1, "annex's own start only");
    let (starts, n) = s.query_events(&q(|q| q.kind = Some("start".into()))).await.unwrap();
    assert_eq!(n, 3);
    assert!(starts.iter().all(|e| e.kind == "start"));
    let (both, _) =
        s.query_events(&q(|q| (q.user, q.kind) = (Some("bob".into()), Some("session-revoke".into())))).await.unwrap();
    assert_eq!(both.len(), 1);
    assert_eq!((both[0].actor.as_str(), both[0].detail.as_str()), ("root", "s1"));
    // Time: nothing before the epoch's first second, everything before the far future.
    assert_eq!(s.query_events(&q(|q| q.until = Some(1000))).await.unwrap().1, 0);
    assert_eq!(s.query_events(&q(|q| q.since = Some(1000))).await.unwrap().1, 5);
    // Pages cover the log once, without overlap.
    let mut seen = Vec::new();
    for offset in [0, 2, 4] {
        let (page, total) = s.query_events(&EventQuery { offset, limit: 2, ..Default::default() }).await.unwrap();
        assert_eq!(total, 5);
        seen.extend(page.into_iter().map(|e| e.id));
    }
    let mut ids = seen.clone();
    ids.dedup();
    assert_eq!((seen.len(), ids.len()), (5, 5));
}
both!(event_log_, event_log);

async fn session_listing(s: &Store) {
    for n in ["cat", "dog"] {
        s.create_user(&new_user(n)).await.unwrap();
    }
    s.create_session("h1", "p1", "cat").await.unwrap();
    s.create_session("h2", "p2", "cat").await.unwrap();
    s.create_session("h3", "p3", "dog").await.unwrap();
    assert_eq!(s.list_sessions(None, 0).await.unwrap().len(), 3);
    assert_eq!(s.list_sessions(Some("cat"), 0).await.unwrap().len(), 2);
    assert!(s.list_sessions(None, now_ms() + 60_000).await.unwrap().is_empty(), "older sessions are not live");
    assert!(!s.revoke_session_of("dog", "p1").await.unwrap(), "a session is revoked only as its owner's");
    assert!(s.get_session("h1").await.unwrap().is_some());
    assert!(s.revoke_session_of("cat", "p1").await.unwrap());
    assert!(s.get_session("h1").await.unwrap().is_none());
    assert!(!s.revoke_session_of("cat", "p1").await.unwrap(), "once");
    let left: Vec<String> = s.list_sessions(None, 0).await.unwrap().into_iter().map(|x| x.public_id).collect();
    assert_eq!(left.len(), 2);
    assert!(!left.contains(&"p1".to_string()));
}
both!(session_listing_, session_listing);
