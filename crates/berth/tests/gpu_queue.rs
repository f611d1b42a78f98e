//! Issue 13, item 3: the GPU queue, on the real berth binary with the local
//! spawner running the real `jupyterhub-singleuser`. The hub has one GPU
//! (`gpu.devices`, an id and no device: the local spawner hands it over as
//! `CUDA_VISIBLE_DEVICES`), so whoever holds it makes the next start wait.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test
mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const PW: &str = "queue-pass-42x";
const GPU: &str = "GPU-q0";

fn queue_berth(extra: &[(&str, &str)]) -> Berth {
    let cmd = singleuser_cmd();
    let mut env = vec![
        ("BERTH_LOCAL_CMD", cmd.as_str()),
        ("BERTH_START_TIMEOUT", "120"),
        ("BERTH_GPU_DEVICES", GPU),
        ("BERTH_GPU_SAMPLER", "off"),
    ];
    env.extend_from_slice(extra);
    Berth::start_with(&env, &[])
}

async fn json_of(b: &Browser, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    let mut rb = b.api(method, path);
    if let Some(body) = body {
        rb = rb.json(&body);
    }
    let r = rb.send().await.unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// POSTs a start asking for `gpus`; the status and body.
async fn start(b: &Browser, user: &str, gpus: u64) -> (StatusCode, Value) {
    json_of(b, Method::POST, &format!("/hub/api/users/{user}/server"), Some(json!({ "gpus": gpus }))).await
}

/// Starts `user`'s server with the GPU and waits until it runs.
async fn start_holding(b: &Berth, u: &Browser, user: &str) {
    let (status, body) = start(u, user, 1).await;
    assert!(status == StatusCode::CREATED || status == StatusCode::ACCEPTED, "{user}: {status} {body}");
    let last = wait_progress(u, &format!("/hub/api/users/{user}/server/progress")).await;
    assert_eq!(last["ready"], true, "{user}'s server did not start: {last}\n{}", b.log());
}

/// A progress stream read in the background: every event as it comes.
struct Stream {
    events: Arc<Mutex<Vec<Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Stream {
    async fn open(b: &Browser, user: &str) -> Stream {
        let r = b.api(Method::GET, &format!("/hub/api/users/{user}/server/progress")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let task = tokio::spawn(async move {
            let mut body = r.bytes_stream();
            let mut buf = String::new();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
            while let Ok(Some(Ok(chunk))) = tokio::time::timeout_at(deadline, body.next()).await {
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(i) = buf.find("\n\n") {
                    let frame: String = buf.drain(..i + 2).collect();
                    for line in frame.lines() {
                        if let Some(d) = line.strip_prefix("data:") {
                            sink.lock().unwrap().push(serde_json::from_str::<Value>(d.trim()).unwrap());
                        }
                    }
                }
            }
        });
        Stream { events, task }
    }

    fn messages(&self) -> Vec<String> {
        self.events.lock().unwrap().iter().map(|e| e["message"].as_str().unwrap_or("").to_string()).collect()
    }

    fn last(&self) -> Value {
        self.events.lock().unwrap().last().cloned().unwrap_or(Value::Null)
    }

    /// Waits (up to `secs`) until the latest event's message contains `what`.
    async fn says(&self, what: &str, secs: u64) {
        let start = std::time::Instant::now();
        loop {
            if self.last()["message"].as_str().is_some_and(|m| m.contains(what)) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(secs),
                "the progress stream never said {what:?}; it said {:?}",
                self.messages()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for the final event and returns it.
    async fn end(mut self, secs: u64) -> Value {
        let _ = tokio::time::timeout(Duration::from_secs(secs), &mut self.task).await;
        self.last()
    }
}

/// The queue as (user/server, position) pairs, as `b` sees it, and its length.
async fn queue(b: &Browser) -> (Vec<(String, u64)>, u64, Value) {
    let (status, v) = json_of(b, Method::GET, "/hub/api/gpus/queue", None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let entries = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let who = format!("{}/{}", e["user"].as_str().unwrap(), e["server"].as_str().unwrap());
            (who, e["position"].as_u64().unwrap())
        })
        .collect();
    (entries, v["length"].as_u64().unwrap(), v)
}

fn place(who: &str, pos: u64) -> (String, u64) {
    (format!("{who}/"), pos)
}

/// The default server's model from the REST API, as `b` sees `user`.
async fn server_model(b: &Browser, user: &str) -> Value {
    let (status, u) = json_of(b, Method::GET, &format!("/hub/api/users/{user}"), None).await;
    assert_eq!(status, StatusCode::OK, "{u}");
    u["servers"][""].clone()
}

async fn holders(admin: &Browser) -> Vec<String> {
    let (_, v) = json_of(admin, Method::GET, "/hub/api/gpus", None).await;
    v["gpus"][0]["holders"].as_array().unwrap().iter().map(|h| h.as_str().unwrap().to_string()).collect()
}

#[tokio::test]
async fn a_freed_gpu_goes_to_the_first_in_line_and_the_rest_move_up() {
    let b = queue_berth(&[]);
    let (admin, alice) = admin_and_user(&b, "alice", PW).await;
    let bob = authorized_user(&b, &admin, "bob", PW).await;
    let carol = authorized_user(&b, &admin, "carol", PW).await;
    start_holding(&b, &alice, "alice").await;
    assert_eq!(holders(&admin).await, ["alice"]);

    // bob's start is accepted as a pending spawn and waits, first in line.
    let (status, body) = start(&bob, "bob", 1).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let bob_stream = Stream::open(&bob, "bob").await;
    bob_stream.says("waiting for a GPU: position 1 of 1", 10).await;
    let model = server_model(&bob, "bob").await;
    assert_eq!((&model["pending"], &model["ready"]), (&json!("spawn"), &json!(false)), "{model}");
    // carol's waits behind him; a second start of hers is the same pending spawn.
    assert_eq!(start(&carol, "carol", 1).await.0, StatusCode::ACCEPTED);
    let carol_stream = Stream::open(&carol, "carol").await;
    carol_stream.says("waiting for a GPU: position 2 of 2", 10).await;
    let (status, body) = start(&carol, "carol", 1).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["message"].as_str().unwrap().contains("pending spawn"), "{body}");
    // A start asking for more GPUs than the hub has never queues.
    let dave = authorized_user(&b, &admin, "dave", PW).await;
    let (status, body) = start(&dave, "dave", 2).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["message"], "2 GPUs asked for, but this hub has only 1");

    // bob sees his own place and the length, never carol's name.
    let (entries, length, raw) = queue(&bob).await;
    assert_eq!((entries, length), (vec![place("bob", 1)], 2), "{raw}");
    assert_eq!(raw["entries_visible"], false);
    assert!(!raw.to_string().contains("carol"), "{raw}");
    let (entries, length, raw) = queue(&admin).await;
    assert_eq!((entries, length), (vec![place("bob", 1), place("carol", 2)], 2), "{raw}");
    assert_eq!(raw["when_full"], "queue");
    // ... and cannot call hers off, by either door.
    let (status, _) = json_of(&bob, Method::DELETE, "/hub/api/gpus/queue/carol", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = json_of(&bob, Method::DELETE, "/hub/api/users/carol/server", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let r = bob.submit("/hub/home", "/hub/stop/carol", &[]).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // Nor move anything: that is the admins'.
    let (status, _) = json_of(&bob, Method::PATCH, "/hub/api/gpus/queue/bob", Some(json!({"position": 1}))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(queue(&admin).await.1, 2, "nothing changed");
    // His home page says where he waits, with a Cancel button.
    let (_, home) = bob.get_text("/hub/home").await;
    assert!(home.contains(r#"id="queue-">waiting for a GPU: position 1 of 2</span>"#), "{home}");
    assert!(home.contains(r#"id="cancel-""#), "{home}");
    // The start page counts those waiting.
    assert!(home.contains("2 start(s) wait for GPUs"), "{home}");

    // alice stops: bob starts by himself, with the GPU; carol moves up.
    let (status, _) = json_of(&alice, Method::DELETE, "/hub/api/users/alice/server", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let ready = bob_stream.end(120).await;
    assert_eq!(ready["ready"], true, "bob's server started: {ready}\n{}", b.log());
    // It is his Jupyter server: he logs in to it through the hub and it answers.
    oauth_login(&bob, "bob").await;
    assert_eq!(bob.get("/user/bob/api/status").await.status(), StatusCode::OK);
    assert_eq!(holders(&admin).await, ["bob"]);
    carol_stream.says("waiting for a GPU: position 1 of 1", 10).await;
    assert_eq!(queue(&admin).await.0, vec![place("carol", 1)]);

    // carol cancels from her pending page's Cancel button.
    let (_, pending) = carol.get_text("/hub/spawn-pending/carol").await;
    assert!(pending.contains("waiting for a GPU: position 1 of 1"), "{pending}");
    assert!(pending.contains(r#"action="/hub/stop/carol""#) && pending.contains(r#"id="cancel""#), "{pending}");
    let r = carol.submit("/hub/spawn-pending/carol", "/hub/stop/carol", &[]).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER, "{}", r.status());
    let last = carol_stream.end(10).await;
    assert_eq!(last["failed"], true, "{last}");
    assert_eq!(last["message"], "Start cancelled while waiting for a GPU");
    let (status, u) = json_of(&carol, Method::GET, "/hub/api/users/carol", None).await;
    assert_eq!((status, &u["servers"]), (StatusCode::OK, &json!({})), "nothing of hers is active: {u}");
    assert_eq!(queue(&admin).await.1, 0);
    assert_eq!(holders(&admin).await, ["bob"], "cancelling touched no allocation");

    // Bad input: cancelling or moving what is not queued, an out-of-range place.
    let (status, body) = json_of(&carol, Method::DELETE, "/hub/api/gpus/queue/carol", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["message"], "carol is not waiting for a GPU");
    let (status, body) =
        json_of(&admin, Method::PATCH, "/hub/api/gpus/queue/carol", Some(json!({"position": 1}))).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(start(&carol, "carol", 1).await.0, StatusCode::ACCEPTED, "carol queues again");
    for (position, why) in [(json!(2), "past the end"), (json!(0), "before the start"), (json!(-3), "negative")] {
        let (status, body) =
            json_of(&admin, Method::PATCH, "/hub/api/gpus/queue/carol", Some(json!({ "position": position }))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{why}: {body}");
        assert!(body["message"].as_str().unwrap().contains("outside the GPU queue (1 to 1)"), "{body}");
    }
    let (status, _) = json_of(&admin, Method::PATCH, "/hub/api/gpus/queue/carol", Some(json!({"pos": 1}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // An admin may cancel anyone's.
    let (status, _) = json_of(&admin, Method::DELETE, "/hub/api/gpus/queue/carol", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(queue(&admin).await.1, 0);
    json_of(&bob, Method::DELETE, "/hub/api/users/bob/server", None).await;
}

#[tokio::test]
async fn admins_reorder_the_queue_and_it_survives_a_restart() {
    let mut b = queue_berth(&[]);
    let (admin, alice) = admin_and_user(&b, "alice", PW).await;
    let bob = authorized_user(&b, &admin, "bob", PW).await;
    let carol = authorized_user(&b, &admin, "carol", PW).await;
    let dave = authorized_user(&b, &admin, "dave", PW).await;
    let erin = authorized_user(&b, &admin, "erin", PW).await;
    start_holding(&b, &alice, "alice").await;
    for u in [(&bob, "bob"), (&carol, "carol"), (&dave, "dave"), (&erin, "erin")] {
        assert_eq!(start(u.0, u.1, 1).await.0, StatusCode::ACCEPTED, "{}", u.1);
    }
    let order = vec![place("bob", 1), place("carol", 2), place("dave", 3), place("erin", 4)];
    assert_eq!(queue(&admin).await.0, order);
    let dave_stream = Stream::open(&dave, "dave").await;
    dave_stream.says("position 3 of 4", 10).await;

    // The admin page lists them in order, linked from the Users page.
    let (_, users) = admin.get_text("/hub/authorize").await;
    assert!(users.contains(r#"href="/hub/admin/gpu-queue" id="gpu-queue-link">GPU queue (4 waiting)"#), "{users}");
    let (status, page) = admin.get_text("/hub/admin/gpu-queue").await;
    assert_eq!(status, StatusCode::OK);
    let rows: Vec<&str> = page.split(r#"<tr id="q-"#).skip(1).map(|r| r.split('"').next().unwrap()).collect();
    assert_eq!(rows, ["bob", "carol", "dave", "erin"], "{page}");
    let (status, _) = bob.get_text("/hub/admin/gpu-queue").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "the page is the admins'");
    // Move dave to the front through the page; his stream follows.
    let r = admin
        .submit("/hub/admin/gpu-queue", "/hub/admin/gpu-queue/dave", &[("action", "move"), ("position", "1")])
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    dave_stream.says("waiting for a GPU: position 1 of 4", 10).await;
    let order = vec![place("dave", 1), place("bob", 2), place("carol", 3), place("erin", 4)];
    assert_eq!(queue(&admin).await.0, order);
    // A bad position through the page is a page that says so.
    let r = admin
        .submit("/hub/admin/gpu-queue", "/hub/admin/gpu-queue/bob", &[("action", "move"), ("position", "9")])
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.text().await.unwrap().contains("position 9 is outside the GPU queue (1 to 4)"));
    // And through the API: erin to 2.
    let (status, v) = json_of(&admin, Method::PATCH, "/hub/api/gpus/queue/erin", Some(json!({"position": 2}))).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let order = vec![place("dave", 1), place("erin", 2), place("bob", 3), place("carol", 4)];
    assert_eq!(queue(&admin).await.0, order);
    // A queued user unauthorized meanwhile leaves the queue.
    let r = admin.submit("/hub/authorize", "/hub/authorize/carol", &[("action", "unauthorize")]).await;
    assert!(r.status().is_redirection());
    let order = vec![place("dave", 1), place("erin", 2), place("bob", 3)];
    assert_eq!(queue(&admin).await.0, order);

    // berth dies and comes back: the queue is as it was, still pending.
    drop(dave_stream);
    b.kill9_and_restart();
    let again = |u: &Browser| Browser { base: b.url.clone(), ..u.clone() };
    let (admin, alice, bob, dave) = (again(&admin), again(&alice), again(&bob), again(&dave));
    assert_eq!(queue(&admin).await.0, order, "{}", b.log());
    let model = server_model(&bob, "bob").await;
    assert_eq!(model["pending"], "spawn", "still a pending spawn, not failed: {model}");
    let bob_stream = Stream::open(&bob, "bob").await;
    bob_stream.says("waiting for a GPU: position 3 of 3", 10).await;
    let dave_stream = Stream::open(&dave, "dave").await;
    dave_stream.says("waiting for a GPU: position 1 of 3", 10).await;
    assert_eq!(holders(&admin).await, ["alice"], "alice's server was re-adopted with its GPU");

    // alice stops: the first in line after the restart (dave) starts.
    let (status, _) = json_of(&alice, Method::DELETE, "/hub/api/users/alice/server", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let ready = dave_stream.end(120).await;
    assert_eq!(ready["ready"], true, "dave's server started by itself: {ready}\n{}", b.log());
    assert_eq!(holders(&admin).await, ["dave"]);
    bob_stream.says("waiting for a GPU: position 2 of 2", 10).await;
    // Deleting a queued user takes their entry with them.
    let (status, _) = json_of(&admin, Method::DELETE, "/hub/api/users/erin", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(queue(&admin).await.0, vec![place("bob", 1)]);
    bob_stream.says("waiting for a GPU: position 1 of 1", 10).await;
    json_of(&dave, Method::DELETE, "/hub/api/users/dave/server", None).await;
    assert_eq!(bob_stream.end(120).await["ready"], true, "{}", b.log());
    json_of(&bob, Method::DELETE, "/hub/api/users/bob/server", None).await;
}

#[tokio::test]
async fn with_refuse_a_start_without_free_gpus_fails_with_the_shortage() {
    let b = queue_berth(&[("BERTH_GPU_WHEN_FULL", "refuse")]);
    let (admin, alice) = admin_and_user(&b, "alice", PW).await;
    let bob = authorized_user(&b, &admin, "bob", PW).await;
    start_holding(&b, &alice, "alice").await;
    let (status, body) = start(&bob, "bob", 1).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(
        body["message"], "not enough free GPUs: 1 wanted, 0 of 1 free; try again when a server stops",
        "a user is told the shortage, not who holds the GPU"
    );
    let (_, v) = json_of(&bob, Method::GET, "/hub/api/gpus/queue", None).await;
    assert_eq!((&v["when_full"], &v["length"]), (&json!("refuse"), &json!(0)), "{v}");
    let (_, u) = json_of(&bob, Method::GET, "/hub/api/users/bob", None).await;
    assert_eq!(u["servers"], json!({}), "nothing pending: {u}");
    // A start without GPUs is not affected.
    let (status, _) = start(&bob, "bob", 0).await;
    assert!(status == StatusCode::CREATED || status == StatusCode::ACCEPTED, "{status}");
    json_of(&alice, Method::DELETE, "/hub/api/users/alice/server", None).await;
    json_of(&bob, Method::DELETE, "/hub/api/users/bob/server", None).await;
}

#[test]
fn an_unknown_when_full_is_a_configuration_error() {
    let (code, _, err) = run_cli(&["config", "check"], None, None);
    assert_eq!(code, 0, "the defaults are valid: {err}");
    let out = std::process::Command::new(BIN)
        .args(["config", "check"])
        .env("BERTH_GPU_WHEN_FULL", "wait")
        .env_remove("BERTH_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("gpu.when_full") && err.contains("\"wait\" is not queue or refuse"), "{err}");
}
