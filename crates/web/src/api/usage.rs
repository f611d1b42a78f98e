//! Usage (`GET /hub/api/users/<name>/usage`, `GET /hub/api/usage`) and the
//! Prometheus metrics (`GET /hub/metrics`); the hub decides who may see what.

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use berth_hub::usage::UserUsage;
use serde::Deserialize;

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiCaller, MaybeUser, PeerIp};
use crate::SharedHub;

#[derive(Deserialize, Default)]
pub(super) struct UsageParams {
    periods: Option<String>,
}

/// `?periods=N`: the current period and the N-1 before it (1 to 24; 3 by default).
fn periods(p: &UsageParams) -> ApiResult<u32> {
    match p.periods.as_deref() {
        None | Some("") => Ok(3),
        Some(s) => s.parse::<u32>().ok().filter(|n| (1..=berth_hub::usage::MAX_PERIODS).contains(n)).ok_or_else(|| {
            ApiError::bad_request(format!(
                "periods must be a whole number from 1 to {}, not {s:?}",
                berth_hub::usage::MAX_PERIODS
            ))
        }),
    }
}

pub(super) async fn user_usage(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    Path(name): Path<String>,
    Query(p): Query<UsageParams>,
) -> ApiResult<Json<UserUsage>> {
    let n = periods(&p)?;
    Ok(Json(hub.servers.usage.view(&c, &name, n, berth_store::now_ms()).await?))
}

pub(super) async fn all_usage(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    Query(p): Query<UsageParams>,
) -> ApiResult<Json<Vec<UserUsage>>> {
    let n = periods(&p)?;
    Ok(Json(hub.servers.usage.view_all(&c, n, berth_store::now_ms()).await?))
}

/// `GET /hub/metrics`: with `read:metrics`, or from an allowed address.
pub async fn metrics(
    State(hub): State<SharedHub>,
    MaybeUser(auth): MaybeUser,
    PeerIp(ip): PeerIp,
) -> ApiResult<Response> {
    let text = hub.metrics(auth.caller.as_ref(), ip, berth_store::now_ms()).await?;
    let mut r = text.into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    Ok(r)
}
