//! Issue 14, items 1 and 2: the admin console (every server, sessions, the
//! event log with its API and exports) and the announcement, against the
//! real berth binary (and the real `jupyterhub-singleuser` for servers).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test
mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const ALICE_PW: &str = "alice-pass-42x";
const BOB_PW: &str = "bob-pass-42x-long";

/// The `<tr data-server="…">` row of the servers page, or "".
fn server_row(page: &str, id: &str) -> String {
    let marker = format!(r#"<tr data-server="{id}">"#);
    page.find(&marker).map(|i| page[i..].split("</tr>").next().unwrap_or("").to_string()).unwrap_or_default()
}

/// Events of the API, with a query string.
async fn events(b: &Browser, query: &str) -> (StatusCode, Value) {
    let r = b.api(Method::GET, &format!("/hub/api/events{query}")).send().await.unwrap();
    let s = r.status();
    (s, r.json().await.unwrap_or(Value::Null))
}

fn items(v: &Value) -> Vec<Value> {
    v["items"].as_array().cloned().unwrap_or_default()
}

async fn server_ready(b: &Browser, user: &str) -> bool {
    let v: Value = b.api(Method::GET, &format!("/hub/api/users/{user}")).send().await.unwrap().json().await.unwrap();
    v["servers"][""]["ready"] == true
}

async fn server_gone(b: &Browser, user: &str) -> bool {
    let v: Value = b.api(Method::GET, &format!("/hub/api/users/{user}")).send().await.unwrap().json().await.unwrap();
    v["servers"].get("").is_none()
}

#[tokio::test]
async fn the_servers_console_lists_stops_and_starts_a_real_server() {
    let cmd = singleuser_cmd();
    let b = Berth::start_with(&[("BERTH_LOCAL_CMD", cmd.as_str()), ("BERTH_START_TIMEOUT", "120")], &[]);
    let (admin, alice) = admin_and_user(&b, "alice", ALICE_PW).await;
    let r = alice.api(Method::POST, "/hub/api/users/alice/server").json(&json!({})).send().await.unwrap();
    assert!(r.status().is_success(), "alice's start: {}", r.status());
    let ready = wait_progress(&alice, "/hub/api/users/alice/server/progress").await;
    assert_eq!(ready["ready"], true, "{ready}\n{}", b.log());

    // The admin sees her running server, with what it runs and since when.
    let (status, page) = admin.get_text("/hub/admin/servers").await;
    assert_eq!(status, StatusCode::OK);
    let row = server_row(&page, "alice/");
    assert!(row.contains(r#"<span class="badge ok">running</span>"#), "{row}");
    let today = &berth_iso_now()[..10];
    assert!(row.contains(today), "since today: {row}");
    assert!(row.contains(r#"href="/hub/logs/alice""#) && row.contains(r#"href="/user/alice/""#), "log and open: {row}");
    assert!(row.contains(r#"value="stop""#) && !row.contains(r#"value="start""#), "{row}");
    // alice is no admin: the console is not hers.
    assert_eq!(alice.get("/hub/admin/servers").await.status(), StatusCode::FORBIDDEN);
    let r = alice
        .submit("/hub/home", "/hub/admin/servers", &[("user", "admin"), ("server", ""), ("action", "start")])
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "alice may not start the admin's server");

    // The log link shows what the real server printed.
    let (status, log) = admin.get_text("/hub/logs/alice").await;
    assert_eq!(status, StatusCode::OK);
    assert!(log.contains("Jupyter"), "the server's own output: {}", &log[..log.len().min(2000)]);

    // Stop from the console: the server goes, and the event names the admin.
    let r = admin
        .submit("/hub/admin/servers", "/hub/admin/servers", &[("user", "alice"), ("server", ""), ("action", "stop")])
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER, "stop: {}", r.status());
    assert!(r.headers()["location"].to_str().unwrap().starts_with("/hub/admin/servers?msg="));
    eventually("alice's server stopped", Duration::from_secs(60), || server_gone(&alice, "alice")).await;
    assert_eq!(alice.get("/user/alice/api/status").await.status().as_u16(), 424, "nothing answers any more");
    let (_, page) = admin.get_text("/hub/admin/servers").await;
    let row = server_row(&page, "alice/");
    assert!(row.contains(r#"<span class="badge">stopped</span>"#) && row.contains(r#"value="start""#), "{row}");
    let (_, v) = events(&admin, "?kind=admin-server-stop").await;
    let stops = items(&v);
    assert_eq!(stops.len(), 1, "{v}");
    assert_eq!((stops[0]["actor"].as_str(), stops[0]["subject"].as_str()), (Some("admin"), Some("alice")));

    // Start from the console: the same server runs again, started by the admin.
    let r = admin
        .submit("/hub/admin/servers", "/hub/admin/servers", &[("user", "alice"), ("server", ""), ("action", "start")])
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER, "start: {}", r.status());
    eventually("alice's server running again", Duration::from_secs(120), || server_ready(&alice, "alice")).await;
    let (_, v) = events(&admin, "?kind=admin-server-start&user=alice").await;
    assert_eq!(items(&v).len(), 1, "{v}");
    assert_eq!(items(&v)[0]["actor"], "admin");
    // Her own start and stop are hers, not admin events.
    let (_, v) = events(&admin, "?user=alice&kind=start").await;
    assert!(items(&v).iter().all(|e| e["actor"] == "alice"), "{v}");
    // A bad form is a clear refusal that changes nothing.
    let r = admin
        .submit("/hub/admin/servers", "/hub/admin/servers", &[("user", "alice"), ("server", ""), ("action", "reboot")])
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r =
        admin.submit("/hub/admin/servers", "/hub/admin/servers", &[("user", "Not A Name"), ("action", "stop")]).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(server_ready(&alice, "alice").await);
    let r = alice.api(Method::DELETE, "/hub/api/users/alice/server").send().await.unwrap();
    assert!(r.status().is_success());
}

/// Now, as the hub writes times (RFC 3339, UTC).
fn berth_iso_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let days = secs.div_euclid(86_400);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T")
}

#[tokio::test]
async fn revoking_a_session_logs_that_browser_out() {
    let b = Berth::start();
    let (admin, alice) = admin_and_user(&b, "alice", ALICE_PW).await;
    let alice_too = Browser::new(&b.url);
    alice_too.login_ok("alice", ALICE_PW).await;
    let first = alice.cookie("/hub/", "jupyterhub-session-id").expect("alice's session id");
    let second = alice_too.cookie("/hub/", "jupyterhub-session-id").expect("her other session id");
    assert_ne!(first, second);

    let (status, page) = admin.get_text("/hub/admin/sessions?user=alice").await;
    assert_eq!(status, StatusCode::OK);
    for id in [&first, &second] {
        assert!(page.contains(&format!(r#"data-session="{id}" data-user="alice""#)), "{id} listed:\n{page}");
    }
    assert!(!page.contains(r#"data-user="admin""#), "the filter shows alice's only");
    let (_, all) = admin.get_text("/hub/admin/sessions").await;
    assert!(all.contains(r#"data-user="admin""#) && all.contains("this one"), "everyone's, the admin's own marked");

    // alice may neither see nor revoke sessions.
    assert_eq!(alice.get("/hub/admin/sessions").await.status(), StatusCode::FORBIDDEN);
    let admins = admin.cookie("/hub/", "jupyterhub-session-id").unwrap();
    let r = alice.submit("/hub/home", "/hub/admin/sessions/revoke", &[("user", "admin"), ("session", &admins)]).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(admin.get("/hub/api/user").await.status(), StatusCode::OK, "the admin's session lives on");

    let r = admin
        .submit("/hub/admin/sessions", "/hub/admin/sessions/revoke", &[("user", "alice"), ("session", &first)])
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER, "{}", r.status());
    // That browser's cookie no longer works; her other browser's does.
    assert_eq!(alice.get("/hub/api/user").await.status(), StatusCode::FORBIDDEN);
    let r = alice.get("/hub/home").await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert!(r.headers()["location"].to_str().unwrap().starts_with("/hub/login"));
    assert_eq!(alice_too.get("/hub/api/user").await.status(), StatusCode::OK);
    let (_, page) = admin.get_text("/hub/admin/sessions?user=alice").await;
    assert!(
        !page.contains(&format!(r#"data-session="{first}""#)) && page.contains(&format!(r#"data-session="{second}""#))
    );
    // Once: a second revoke finds nothing; a session is revoked only as its owner's.
    let r = admin
        .submit("/hub/admin/sessions", "/hub/admin/sessions/revoke", &[("user", "alice"), ("session", &first)])
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = admin
        .submit("/hub/admin/sessions", "/hub/admin/sessions/revoke", &[("user", "admin"), ("session", &second)])
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(alice_too.get("/hub/api/user").await.status(), StatusCode::OK);

    let (_, v) = events(&admin, "?kind=session-revoke").await;
    let revokes = items(&v);
    assert_eq!(revokes.len(), 1, "{v}");
    assert_eq!(
        (revokes[0]["actor"].as_str(), revokes[0]["subject"].as_str(), revokes[0]["detail"].as_str()),
        (Some("admin"), Some("alice"), Some(first.as_str()))
    );
}

async fn token(b: &Browser, user: &str, scopes: &[&str]) -> (StatusCode, String) {
    let r = b
        .api(Method::POST, &format!("/hub/api/users/{user}/tokens"))
        .json(&json!({"scopes": scopes, "note": "console test"}))
        .send()
        .await
        .unwrap();
    let s = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    (s, v["token"].as_str().unwrap_or_default().to_string())
}

async fn events_with_token(base: &str, token: &str) -> StatusCode {
    api_client()
        .get(format!("{base}/hub/api/events"))
        .header("Authorization", format!("token {token}"))
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test]
async fn the_events_api_pages_filters_and_checks_scopes() {
    let b = Berth::start();
    let admin = b.first_admin().await;
    let bob = authorized_user(&b, &admin, "bob", BOB_PW).await;
    let _carol = authorized_user(&b, &admin, "carol", BOB_PW).await;

    let (status, all) = events(&admin, "?limit=1000").await;
    assert_eq!(status, StatusCode::OK, "{all}");
    let all = items(&all);
    let total = all.len();
    assert!(total >= 5, "setup, two sign-ups, two approvals: {all:?}");
    // RFC 3339 with the fraction's trailing zeros dropped: pad it to compare.
    let ats: Vec<String> = all
        .iter()
        .map(|e| {
            let t = e["at"].as_str().unwrap().trim_end_matches('Z');
            let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
            format!("{whole}.{frac:0<9}")
        })
        .collect();
    assert!(ats.windows(2).all(|w| w[0] >= w[1]), "newest first: {ats:?}");

    // Paging with `next` covers the log exactly once.
    let (_, mut page) = events(&admin, "?limit=2").await;
    assert_eq!(page["_pagination"]["total"], total);
    let mut seen = Vec::new();
    for _ in 0..50 {
        seen.extend(items(&page).iter().map(|e| e["id"].as_str().unwrap().to_string()));
        let Some(next) = page["_pagination"]["next"]["url"].as_str() else { break };
        let r = admin.api(Method::GET, next).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{next}");
        page = r.json().await.unwrap();
    }
    assert!(page["_pagination"]["next"].is_null(), "the last page says so: {page}");
    let want: Vec<String> = all.iter().map(|e| e["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(seen, want);

    // Filters: by kind, by user (who did it, or whom it concerns), by time.
    let (_, v) = events(&admin, "?kind=user-authorize").await;
    let subjects: HashSet<String> = items(&v).iter().map(|e| e["subject"].as_str().unwrap().to_string()).collect();
    assert_eq!(subjects, HashSet::from(["bob".to_string(), "carol".to_string()]));
    assert!(items(&v).iter().all(|e| e["kind"] == "user-authorize" && e["actor"] == "admin"));
    let (_, v) = events(&admin, "?user=bob").await;
    let bobs = items(&v);
    assert!(bobs.iter().any(|e| e["kind"] == "signup") && bobs.iter().any(|e| e["kind"] == "user-authorize"), "{v}");
    assert!(bobs.iter().all(|e| e["actor"] == "bob" || e["subject"] == "bob"), "{v}");
    let (_, v) = events(&admin, "?user=bob&kind=signup").await;
    assert_eq!(items(&v).len(), 1);
    let (_, v) = events(&admin, "?since=2999-01-01").await;
    assert_eq!(v["_pagination"]["total"], 0);
    let (_, v) = events(&admin, "?until=2000-01-01T00:00:00Z").await;
    assert_eq!(v["_pagination"]["total"], 0);
    let (_, v) = events(&admin, "?since=2000-01-01&until=2999-12-31").await;
    assert_eq!(v["_pagination"]["total"], total);

    // Bad filters are 400s that say what is wrong.
    for (q, says) in [
        ("?limit=0", "limit must be between"),
        ("?limit=ten", "limit must be a whole number"),
        ("?offset=-1", "offset must not be negative"),
        ("?since=yesterday", "since \"yesterday\" is not a time"),
        ("?user=Bob%20Smith", "user"),
        ("?since=2030-01-02&until=2030-01-01", "not before its end"),
    ] {
        let (status, v) = events(&admin, q).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{q}: {v}");
        assert!(v["message"].as_str().unwrap_or_default().contains(says), "{q}: {v}");
    }

    // Scope: admins hold read:events; a user does not, nor a token without it.
    let (status, _) = events(&bob, "").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        api_client().get(format!("{}/hub/api/events", b.url)).send().await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    let (s, narrow) = token(&admin, "admin", &["read:users"]).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(events_with_token(&b.url, &narrow).await, StatusCode::FORBIDDEN);
    let (s, reader) = token(&admin, "admin", &["read:events"]).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(events_with_token(&b.url, &reader).await, StatusCode::OK);
    let (s, _) = token(&bob, "bob", &["read:events"]).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "bob cannot give himself read:events");
    // No scopes asked: all of bob's own.
    let (s, bobs_all) = token(&bob, "bob", &[]).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(events_with_token(&b.url, &bobs_all).await, StatusCode::FORBIDDEN);
    // The page is the admins' too.
    assert_eq!(bob.get("/hub/admin/events").await.status(), StatusCode::FORBIDDEN);
    let (status, page) = admin.get_text("/hub/admin/events?kind=user-authorize").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page.matches(r#"<tr class="event" data-kind="user-authorize">"#).count(), 2, "{page}");
}

/// Parses RFC 4180 CSV (quoted fields, doubled quotes, CRLF records).
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => record.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
            }
            (false, c) => field.push(c),
        }
    }
    assert!(!quoted && field.is_empty() && record.is_empty(), "the CSV ends with a complete record");
    records
}

#[tokio::test]
async fn events_export_as_csv_and_json_with_hostile_text_kept_inert() {
    let b = Berth::start();
    let (admin, alice) = admin_and_user(&b, "alice", ALICE_PW).await;
    let hostile = "=HYPERLINK(\"http://127.0.0.1:9/x\",\"click\"), \"quoted\"\nsecond line";
    let r = admin.api(Method::PUT, "/hub/api/announcement").json(&json!({"message": hostile})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let r = admin.get("/hub/admin/events/export?format=csv").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "text/csv; charset=utf-8");
    assert!(r.headers()["content-disposition"].to_str().unwrap().starts_with("attachment"));
    let text = r.text().await.unwrap();
    let records = parse_csv(&text);
    assert_eq!(records[0], ["at", "actor", "kind", "subject", "detail"]);
    assert!(records.iter().all(|r| r.len() == 5), "five fields each: {records:?}");
    let (_, api) = events(&admin, "?limit=1000").await;
    assert_eq!(records.len() - 1, items(&api).len(), "every event, once");
    let set: Vec<&Vec<String>> = records.iter().filter(|r| r[2] == "announcement-set").collect();
    assert_eq!(set.len(), 1);
    assert_eq!(set[0][1], "admin");
    assert_eq!(set[0][4], format!("'{hostile}"), "the formula is text, quotes and the newline survive");
    // Every field a spreadsheet could run is defused.
    for r in &records[1..] {
        for f in r {
            assert!(!f.starts_with(['=', '+', '-', '@']), "{f:?} would be a formula");
        }
    }

    // Filters apply to exports; JSON keeps the text exactly.
    let r = admin.get("/hub/admin/events/export?format=json&kind=announcement-set").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/json");
    let v: Value = r.json().await.unwrap();
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 1, "{v}");
    assert_eq!((list[0]["actor"].as_str(), list[0]["detail"].as_str()), (Some("admin"), Some(hostile)));
    let r = admin.get("/hub/admin/events/export?format=csv&user=alice").await;
    let records = parse_csv(&r.text().await.unwrap());
    assert!(records.len() > 1 && records[1..].iter().all(|r| r[1] == "alice" || r[3] == "alice"), "{records:?}");

    assert_eq!(admin.get("/hub/admin/events/export?format=xlsx").await.status(), StatusCode::BAD_REQUEST);
    assert_eq!(alice.get("/hub/admin/events/export?format=csv").await.status(), StatusCode::FORBIDDEN);
    assert_eq!(alice.get("/hub/admin/events/export?format=json").await.status(), StatusCode::FORBIDDEN);
}

/// The announcement banner of a page, or None.
fn banner(page: &str) -> Option<String> {
    let start = page.find(r#"id="announcement" role="status">"#)? + r#"id="announcement" role="status">"#.len();
    let end = page[start..].find("</div>")?;
    Some(page[start..start + end].to_string())
}

async fn announcement_json(b: &Browser) -> Value {
    let r = b.api(Method::GET, "/hub/api/announcement").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    r.json::<Value>().await.unwrap()["announcement"].clone()
}

#[tokio::test]
async fn announcements_show_escaped_on_every_page_expire_and_clear() {
    let b = Berth::start();
    let (admin, alice) = admin_and_user(&b, "alice", ALICE_PW).await;
    let anonymous = Browser::new(&b.url);
    let message = r#"<script>alert("x")</script> Maintenance & restart at 18:00"#;
    let r = admin.api(Method::PUT, "/hub/api/announcement").json(&json!({"message": message})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["announcement"]["message"], message);
    assert!(v["announcement"]["expires_at"].is_null());

    let escaped = "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; Maintenance &amp; restart at 18:00";
    for (who, path) in [
        (&alice, "/hub/home"),
        (&alice, "/hub/token"),
        (&alice, "/hub/keys"),
        (&admin, "/hub/authorize"),
        (&anonymous, "/hub/login"),
    ] {
        let (status, page) = who.get_text(path).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(banner(&page).as_deref(), Some(escaped), "{path}: {page}");
        assert!(!page.contains("<script>alert"), "{path} runs no script of the admin's");
    }
    // The API gives it to anyone logged in; who set it only to admins.
    let a = announcement_json(&alice).await;
    assert_eq!(a["message"], message);
    assert!(a.get("set_by").is_none(), "{a}");
    assert_eq!(announcement_json(&admin).await["set_by"], "admin");
    assert_eq!(anonymous.get("/hub/api/announcement").await.status(), StatusCode::FORBIDDEN);

    // alice may not set or clear it; bad input is refused and loses nothing.
    let r = alice.api(Method::PUT, "/hub/api/announcement").json(&json!({"message": "mine"})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        alice.api(Method::DELETE, "/hub/api/announcement").send().await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    for (body, says) in [
        (json!({"message": "   "}), "empty"),
        (json!({"message": "x", "expires_in": -5}), "positive"),
        (json!({"message": "x", "expires_at": "2000-01-01T00:00:00Z"}), "passed"),
        (json!({"message": "x", "expires_at": "tomorrow"}), "RFC 3339"),
        (json!({"message": "x", "expires_in": 60, "expires_at": "2999-01-01T00:00:00Z"}), "not both"),
        (json!({"message": "x", "colour": "red"}), "unknown field"),
        (json!({"message": "x".repeat(2001)}), "at most 2000"),
        (json!({"message": "bell\u{7}"}), "control"),
    ] {
        let r = admin.api(Method::PUT, "/hub/api/announcement").json(&body).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{body}");
        let v: Value = r.json().await.unwrap();
        assert!(v["message"].as_str().unwrap_or_default().contains(says), "{body}: {v}");
    }
    assert_eq!(announcement_json(&alice).await["message"], message, "still the one set");

    // Cleared: gone from the pages and the API.
    assert_eq!(
        admin.api(Method::DELETE, "/hub/api/announcement").send().await.unwrap().status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(banner(&alice.get_text("/hub/home").await.1), None);
    assert!(announcement_json(&alice).await.is_null());

    // With an expiry: shown, then gone by itself.
    let r = admin
        .api(Method::PUT, "/hub/api/announcement")
        .json(&json!({"message": "brief", "expires_in": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.json::<Value>().await.unwrap()["announcement"]["expires_at"].is_string());
    assert_eq!(banner(&alice.get_text("/hub/home").await.1).as_deref(), Some("brief"));
    eventually("the announcement expired", Duration::from_secs(20), || async {
        banner(&alice.get_text("/hub/home").await.1).is_none()
    })
    .await;
    assert!(announcement_json(&alice).await.is_null());

    // The admin's page does the same with its form.
    let r = admin
        .submit(
            "/hub/admin/announcement",
            "/hub/admin/announcement",
            &[("action", "set"), ("message", "from the form"), ("expires_in_hours", "2")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(banner(&alice.get_text("/hub/home").await.1).as_deref(), Some("from the form"));
    let (_, page) = admin.get_text("/hub/admin/announcement").await;
    assert!(page.contains("set by admin") && page.contains("until 20"), "{page}");
    let r = admin
        .submit(
            "/hub/admin/announcement",
            "/hub/admin/announcement",
            &[("action", "set"), ("message", "x"), ("expires_in_hours", "soon")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(alice.get("/hub/admin/announcement").await.status(), StatusCode::FORBIDDEN);
    let r = admin.submit("/hub/admin/announcement", "/hub/admin/announcement", &[("action", "clear")]).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(banner(&alice.get_text("/hub/home").await.1), None);

    // Each change is an event naming the admin.
    let (_, v) = events(&admin, "?user=admin").await;
    let kinds: Vec<String> = items(&v)
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .filter(|k| k.starts_with("announcement-"))
        .collect();
    assert_eq!(
        kinds,
        ["announcement-clear", "announcement-set", "announcement-set", "announcement-clear", "announcement-set"],
        "{v}"
    );
}
