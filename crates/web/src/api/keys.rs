//! A user's SSH public keys: list, add (`{"key": "ssh-ed25519 AAAA…"}`),
//! remove by fingerprint or id. Scopes `read:ssh-keys` and `ssh-keys`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use berth_store::SshKey;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiResult;
use crate::extract::{ApiCaller, JsonBody};
use crate::model::iso;
use crate::SharedHub;

pub(crate) fn key_model(k: &SshKey) -> Value {
    json!({
        "id": k.id,
        "fingerprint": k.fingerprint,
        "algorithm": k.algorithm,
        "key": k.public_key,
        "comment": k.comment,
        "created": iso(k.created),
        "last_used": k.last_used.map(iso),
    })
}

pub(super) async fn list(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let keys = hub.list_keys(&c, &name).await?;
    Ok(Json(Value::Array(keys.iter().map(key_model).collect())))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PostKey {
    key: String,
}

pub(super) async fn add(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<PostKey>,
) -> ApiResult<Response> {
    let key = hub.add_key(&c, &name, &body.key).await?;
    Ok((StatusCode::CREATED, Json(key_model(&key))).into_response())
}

pub(super) async fn remove(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    Path((name, which)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    hub.remove_key(&c, &name, &which).await?;
    Ok(StatusCode::NO_CONTENT)
}
