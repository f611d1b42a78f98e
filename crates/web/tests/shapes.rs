//! The REST API's JupyterHub shapes, through the router alone (no network):
//! the user model, the server model, the token model, and error JSON, as
//! `../shared/jupyterhub-protocol.md` records JupyterHub sending them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use berth_core::ServerState;
use berth_hub::activity::Activity;
use berth_hub::gpus::{GpuConfig, Gpus};
use berth_hub::templates::{Templates, TemplatesConfig};
use berth_hub::{Hub, Servers};
use berth_proxy::RouteTable;
use berth_spawner::fake::NeverReady;
use berth_store::{NewToken, NewUser, Server, Store, TokenKind};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

const ADMIN_TOKEN: &str = "0123456789abcdef0123456789abcdef";

struct Api {
    router: axum::Router,
    _dir: tempfile::TempDir,
}

async fn api() -> Api {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_in_dir(dir.path()).await.unwrap();
    let admin = NewUser { name: "root".into(), admin: true, authorized: true, password_hash: None };
    store.create_user(&admin).await.unwrap();
    let bob = NewUser { name: "bob".into(), admin: false, authorized: true, password_hash: None };
    store.create_user(&bob).await.unwrap();
    store
        .create_token(&NewToken {
            hash: berth_auth::hash_token(ADMIN_TOKEN),
            user: "root".into(),
            kind: TokenKind::Api,
            server: None,
            scopes: vec!["inherit".into()],
            note: "test".into(),
            expires_at: None,
            session_id: None,
            oauth_client: None,
        })
        .await
        .unwrap();
    let mut s = Server::new("bob", "");
    s.state = ServerState::Running;
    s.started = Some(1_700_000_000_000);
    s.url = Some("/user/bob/".into());
    s.spawner_state = r#"{"pid":24664}"#.into();
    s.user_options = "{}".into();
    store.put_server(&s).await.unwrap();
    let activity = Arc::new(Activity::default());
    let servers = Servers::new(
        Default::default(),
        store.clone(),
        Arc::new(NeverReady::default()),
        Arc::new(RouteTable::new()),
        activity.clone(),
        "/",
        Gpus::new(GpuConfig::default(), store.clone()),
        Templates::new(TemplatesConfig::default(), Vec::new()),
    );
    let secret = berth_auth::new_signing_key();
    let hub = Hub::new(Default::default(), Default::default(), store, &secret, Arc::new(servers), activity);
    Api { router: berth_web::router(Arc::new(hub)), _dir: dir }
}

impl Api {
    async fn call(&self, method: &str, path: &str, token: Option<&str>, body: &str) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("token {t}"));
        }
        let resp = self.router.clone().oneshot(req.body(Body::from(body.to_string())).unwrap()).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or_else(|_| json!(String::from_utf8_lossy(&bytes))))
    }
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn the_user_and_server_models_have_jupyterhubs_fields() {
    let a = api().await;
    let (status, user) = a.call("GET", "/hub/api/users/bob", Some(ADMIN_TOKEN), "").await;
    assert_eq!(status, StatusCode::OK, "{user}");
    // JupyterHub's fields, and berth's `authorized` (NativeAuthenticator's approval).
    let want = [
        "kind",
        "name",
        "admin",
        "groups",
        "roles",
        "created",
        "last_activity",
        "server",
        "pending",
        "servers",
        "auth_state",
        "user_info",
        "authorized",
    ];
    assert_eq!(keys(&user), set(&want), "{user}");
    assert_eq!((&user["kind"], &user["name"], &user["admin"]), (&json!("user"), &json!("bob"), &json!(false)));
    assert_eq!(
        (&user["server"], &user["pending"], &user["roles"]),
        (&json!("/user/bob/"), &Value::Null, &json!(["user"]))
    );
    let server = &user["servers"][""];
    // JupyterHub's fields, and berth's `template`, `last_error` and `berth`.
    let want = [
        "name",
        "display_name",
        "full_name",
        "last_activity",
        "started",
        "pending",
        "ready",
        "stopped",
        "url",
        "user_options",
        "progress_url",
        "full_url",
        "full_progress_url",
        "state",
        "template",
        "last_error",
        "berth",
    ];
    assert_eq!(keys(server), set(&want), "{server}");
    assert_eq!(server["berth"], json!({"cull": null}), "not watched: culling is off");
    assert_eq!(server["full_name"], "bob/");
    assert_eq!((&server["ready"], &server["stopped"]), (&json!(true), &json!(false)));
    assert_eq!(server["progress_url"], "/hub/api/users/bob/server/progress");
    assert_eq!(server["started"], "2023-11-14T22:13:20Z");
    assert_eq!(server["state"], json!({"pid": 24664}), "admins see the spawner state");
    let (_, list) = a.call("GET", "/hub/api/users", Some(ADMIN_TOKEN), "").await;
    let names: Vec<&str> = list.as_array().unwrap().iter().map(|u| u["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["bob", "root"]);
    let (_, me) = a.call("GET", "/hub/api/user", Some(ADMIN_TOKEN), "").await;
    assert_eq!((&me["name"], &me["kind"], &me["session_id"]), (&json!("root"), &json!("user"), &Value::Null));
    assert!(me["token_id"].is_string() && me["scopes"].as_array().is_some_and(|s| !s.is_empty()), "{me}");
}

#[tokio::test]
async fn the_token_model_has_jupyterhubs_fields() {
    let a = api().await;
    let (status, t) = a.call("POST", "/hub/api/users/bob/tokens", Some(ADMIN_TOKEN), r#"{"note":"ci"}"#).await;
    assert_eq!(status, StatusCode::CREATED, "{t}");
    let want = [
        "user",
        "id",
        "kind",
        "roles",
        "scopes",
        "created",
        "last_activity",
        "expires_at",
        "note",
        "session_id",
        "oauth_client",
        "token",
    ];
    assert_eq!(keys(&t), set(&want), "{t}");
    assert_eq!((&t["user"], &t["kind"], &t["note"]), (&json!("bob"), &json!("api_token"), &json!("ci")));
    assert_eq!((&t["oauth_client"], &t["expires_at"]), (&json!("JupyterHub"), &Value::Null));
    assert_eq!(t["token"].as_str().map(str::len), Some(32), "{t}");
    // The secret works, and is not shown again.
    let (status, me) = a.call("GET", "/hub/api/user", t["token"].as_str(), "").await;
    assert_eq!((status, &me["name"]), (StatusCode::OK, &json!("bob")));
    let (_, listed) = a.call("GET", "/hub/api/users/bob/tokens", Some(ADMIN_TOKEN), "").await;
    let first = &listed["api_tokens"][0];
    assert_eq!(first["id"], t["id"]);
    assert!(first.get("token").is_none(), "{first}");
}

#[tokio::test]
async fn errors_are_jupyterhubs_json() {
    let a = api().await;
    // (method, path, token, body) -> (status, message contains)
    let cases = [
        ("GET", "/hub/api/users/nobody", Some(ADMIN_TOKEN), "", 404, "No such user: nobody"),
        ("GET", "/hub/api/users", None, "", 403, "Missing or invalid credentials"),
        ("GET", "/hub/api/users", Some("not-a-token"), "", 403, "Missing or invalid credentials"),
        ("POST", "/hub/api/users/bob/tokens", Some(ADMIN_TOKEN), "{not json", 400, "invalid JSON body"),
        ("POST", "/hub/api/users/bob/server", Some(ADMIN_TOKEN), "[1]", 400, "JSON object"),
        ("POST", "/hub/api/users/bob/servers/Bad%20Name", Some(ADMIN_TOKEN), "{}", 400, ""),
        ("POST", "/hub/api/users", Some(ADMIN_TOKEN), r#"{"usernames":["bob"]}"#, 409, "All 1 users already exist"),
        ("DELETE", "/hub/api/users/root", Some(ADMIN_TOKEN), "", 400, "Cannot delete yourself!"),
        ("GET", "/hub/api/no-such-endpoint", Some(ADMIN_TOKEN), "", 404, "no such page"),
    ];
    for (method, path, token, body, status, message) in cases {
        let (got, v) = a.call(method, path, token, body).await;
        assert_eq!(got.as_u16(), status, "{method} {path}: {v}");
        assert_eq!(keys(&v), set(&["status", "message"]), "{method} {path}: {v}");
        assert_eq!(v["status"], status, "{v}");
        let m = v["message"].as_str().unwrap_or_default();
        assert!(m.contains(message), "{method} {path}: {m:?} lacks {message:?}");
    }
    // Bob's own token may not act as an admin.
    let (_, t) = a.call("POST", "/hub/api/users/bob/tokens", Some(ADMIN_TOKEN), "{}").await;
    let (status, v) = a.call("POST", "/hub/api/users", t["token"].as_str(), r#"{"usernames":["eve"]}"#).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    assert!(v["message"].as_str().unwrap_or_default().contains("requires any of [admin:users]"), "{v}");
}
