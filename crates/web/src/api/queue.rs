//! The GPU queue: `GET /hub/api/gpus/queue` (its length for everyone,
//! every entry with `read:gpus`, else the caller's own), and per entry
//! (`/gpus/queue/<user>[/<server>]`) `PATCH {"position": N}` to move it
//! (`admin:servers`) and `DELETE` to call it off (whoever may stop that
//! server). The rules are the hub's.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use berth_hub::servers::queue::QueueView;
use serde::Deserialize;

use crate::error::ApiResult;
use crate::extract::{ApiCaller, JsonBody, ServerPath};
use crate::SharedHub;

pub(super) async fn list(State(hub): State<SharedHub>, ApiCaller(c): ApiCaller) -> ApiResult<Json<QueueView>> {
    Ok(Json(hub.servers.queue_view(&c).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MoveBody {
    /// 1 is first in line.
    position: i64,
}

pub(super) async fn move_entry(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    ServerPath(id): ServerPath,
    JsonBody(body): JsonBody<MoveBody>,
) -> ApiResult<Json<QueueView>> {
    let position = usize::try_from(body.position).unwrap_or(0);
    hub.servers.move_queued(&c, &id, position).await?;
    Ok(Json(hub.servers.queue_view(&c).await?))
}

pub(super) async fn cancel(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    ServerPath(id): ServerPath,
) -> ApiResult<StatusCode> {
    hub.servers.cancel_queued_by(&c, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
