//! API tokens of a user: list, create (never more than the owner holds), get, revoke.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use berth_core::Target;
use berth_hub::tokens::TokenRequest;
use serde::Deserialize;
use serde_json::{json, Value};

use super::existing_user;
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiCaller, JsonBody};
use crate::model::token_model;
use crate::SharedHub;

pub(super) async fn list_tokens(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    c.require("read:tokens", Target::User(&name))?;
    let owner = existing_user(&hub, &name).await?;
    let tokens = hub.store.list_tokens(&name).await?;
    let models: Vec<Value> = tokens.iter().map(|t| token_model(t, &owner)).collect();
    Ok(Json(json!({"api_tokens": models})))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct PostToken {
    #[serde(default)]
    note: Option<String>,
    #[serde(default)]
    expires_in: Option<i64>,
    #[serde(default)]
    scopes: Option<Vec<String>>,
    /// JupyterHub ≤ 2 clients send roles; only the default is understood.
    #[serde(default)]
    roles: Option<Vec<String>>,
}

pub(super) async fn post_token(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<PostToken>,
) -> ApiResult<Response> {
    c.require("tokens", Target::User(&name))?;
    if body.roles.as_ref().is_some_and(|r| !r.is_empty()) {
        return Err(ApiError::bad_request("roles are not supported on tokens; request scopes instead"));
    }
    let owner = existing_user(&hub, &name).await?;
    let note = body.note.unwrap_or_else(|| {
        if c.name() == name {
            "Requested via api".into()
        } else {
            format!("Requested via api by user {}", c.name())
        }
    });
    let (token, secret) =
        hub.create_token(&c, &owner, TokenRequest { note, expires_in: body.expires_in, scopes: body.scopes }).await?;
    let mut m = token_model(&token, &owner);
    m["token"] = json!(secret);
    Ok((StatusCode::CREATED, Json(m)).into_response())
}

pub(super) async fn get_token(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    c.require("read:tokens", Target::User(&name))?;
    let owner = existing_user(&hub, &name).await?;
    let t =
        hub.store.get_token(&name, &id).await?.ok_or_else(|| ApiError::not_found(format!("No such token: {id}")))?;
    Ok(Json(token_model(&t, &owner)))
}

pub(super) async fn delete_token(
    State(hub): State<SharedHub>,
    ApiCaller(c): ApiCaller,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    hub.revoke_token(&c, &name, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
