//! The admin console's API: the event log (`GET /events`, paged, scope
//! `read:events`) and the announcement (`GET` for anyone logged in, `PUT`
//! and `DELETE` for admins).

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use berth_core::Target;
use berth_hub::console::Announcement;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult};
use crate::export::{event_json, EventFilter};
use crate::extract::{ApiCaller, JsonBody};
use crate::model::{iso, iso_opt, parse_iso};
use crate::SharedHub;

/// Events per page when the client does not say.
const DEFAULT_LIMIT: i64 = 200;

/// `GET /hub/api/events?user=&kind=&since=&until=&offset=&limit=`: newest
/// first, in JupyterHub's paginated shape (`items`, `_pagination` with the
/// `next` page, or null on the last).
pub(super) async fn events(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    Query(f): Query<EventFilter>,
) -> ApiResult<Json<Value>> {
    c.require("read:events", Target::Hub)?;
    let q = f.query(DEFAULT_LIMIT)?;
    let (events, total) = hub.events(&c, q.clone()).await?;
    let next_offset = q.offset + events.len() as i64;
    let next = (next_offset < total && !events.is_empty()).then(|| {
        json!({
            "offset": next_offset,
            "limit": q.limit,
            "url": format!("{}/events{}", hub.api_prefix(), f.link(&format!("offset={next_offset}&limit={}", q.limit))),
        })
    });
    Ok(Json(json!({
        "items": events.iter().map(event_json).collect::<Vec<_>>(),
        "_pagination": {"offset": q.offset, "limit": q.limit, "total": total, "next": next},
    })))
}

fn announcement_json(a: &Announcement, show_author: bool) -> Value {
    let mut v = json!({"message": a.message, "expires_at": iso_opt(a.expires_at), "set_at": iso(a.set_at)});
    if show_author {
        v["set_by"] = json!(a.set_by);
    }
    v
}

/// `GET /hub/api/announcement`: `{"announcement": {...} | null}`; who set it
/// only to those who may set it.
pub(super) async fn get_announcement(State(hub): State<SharedHub>, ApiCaller(c): ApiCaller) -> ApiResult<Json<Value>> {
    let a = hub.announcement().await?;
    let admin = c.allows("admin:users", Target::Hub);
    Ok(Json(json!({"announcement": a.map(|a| announcement_json(&a, admin))})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AnnouncementBody {
    message: String,
    /// RFC 3339.
    #[serde(default)]
    expires_at: Option<String>,
    /// Seconds from now.
    #[serde(default)]
    expires_in: Option<i64>,
}

/// `PUT /hub/api/announcement` `{"message": "…", "expires_at": "…"}` or
/// `{"message": "…", "expires_in": 3600}`.
pub(super) async fn put_announcement(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    JsonBody(body): JsonBody<AnnouncementBody>,
) -> ApiResult<Json<Value>> {
    c.require("admin:users", Target::Hub)?;
    let expires_at = match (&body.expires_at, body.expires_in) {
        (Some(_), Some(_)) => return Err(ApiError::bad_request("give expires_at or expires_in, not both")),
        (Some(raw), None) => Some(
            parse_iso(raw)
                .ok_or_else(|| ApiError::bad_request(format!("expires_at {raw:?} is not an RFC 3339 time")))?,
        ),
        (None, Some(secs)) if secs <= 0 => return Err(ApiError::bad_request("expires_in must be positive")),
        (None, Some(secs)) => Some(berth_store::now_ms().saturating_add(secs.saturating_mul(1000))),
        (None, None) => None,
    };
    let a = hub.set_announcement(&c, &body.message, expires_at).await?;
    Ok(Json(json!({"announcement": announcement_json(&a, true)})))
}

/// `DELETE /hub/api/announcement`
pub(super) async fn delete_announcement(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
) -> ApiResult<StatusCode> {
    hub.clear_announcement(&c).await?;
    Ok(StatusCode::NO_CONTENT)
}
