//! The REST API under `<base>hub/api`, in JupyterHub's shapes.

mod console;
mod keys;
mod oauth;
mod queue;
mod servers;

pub(crate) use servers::SLOW;
mod tokens;
mod usage;
mod users;

pub use usage::metrics;

use axum::http::Uri;
use axum::routing::{delete, get, patch, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::SharedHub;

pub fn router() -> Router<SharedHub> {
    Router::new()
        .route("/", get(version))
        .route("/user", get(users::whoami))
        .route("/users", get(users::list_users).post(users::create_users))
        .route(
            "/users/{name}",
            get(users::get_user).post(users::create_user).patch(users::patch_user).delete(users::delete_user),
        )
        .route("/users/{name}/tokens", get(tokens::list_tokens).post(tokens::post_token))
        .route("/users/{name}/tokens/{id}", get(tokens::get_token).delete(tokens::delete_token))
        .route("/users/{name}/keys", get(keys::list).post(keys::add))
        .route("/users/{name}/keys/{key}", delete(keys::remove))
        .route("/users/{name}/limits", get(users::get_limits).put(users::put_limits))
        .route("/users/{name}/usage", get(usage::user_usage))
        .route("/usage", get(usage::all_usage))
        .route("/users/{name}/server", post(servers::start).delete(servers::stop))
        .route("/users/{name}/server/progress", get(servers::progress))
        .route("/users/{name}/server/extend", post(servers::extend))
        .route("/users/{name}/servers/{server}", post(servers::start).delete(servers::stop))
        .route("/users/{name}/servers/{server}/progress", get(servers::progress))
        .route("/users/{name}/servers/{server}/extend", post(servers::extend))
        .route("/users/{name}/activity", post(servers::activity))
        .route("/gpus", get(servers::gpus))
        .route("/gpus/queue", get(queue::list))
        .route("/gpus/queue/{name}", patch(queue::move_entry).delete(queue::cancel))
        .route("/gpus/queue/{name}/{server}", patch(queue::move_entry).delete(queue::cancel))
        .route("/events", get(console::events))
        .route(
            "/announcement",
            get(console::get_announcement).put(console::put_announcement).delete(console::delete_announcement),
        )
        .route("/oauth2/authorize", get(oauth::authorize).post(oauth::authorize_consented))
        .route("/oauth2/token", post(oauth::token))
        .fallback(not_found)
}

pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(format!("no such page: {}", uri.path()))
}

pub async fn version() -> Json<Value> {
    Json(json!({"version": berth_core::JUPYTERHUB_API_VERSION, "berth": berth_core::VERSION}))
}

/// The user called `name`, or 404.
async fn existing_user(hub: &SharedHub, name: &str) -> crate::ApiResult<berth_store::User> {
    hub.store.get_user(name).await?.ok_or_else(|| ApiError::not_found(format!("No such user: {name}")))
}
