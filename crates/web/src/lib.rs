//! berth's web front: the hub's pages (server-rendered), its REST API in
//! JupyterHub's shapes and the OAuth2 endpoints single-user servers log in
//! through — axum only.
//!
//! It must not know SQL, a spawner or GPUs: every rule is `berth-hub`'s, and
//! handlers call it. Requests are authenticated once, by the middleware in
//! [`auth`] (which asks the hub's identity and enforces the XSRF rules);
//! handlers take the resolved caller through the extractors in [`extract`].
#![forbid(unsafe_code)]

pub mod api;
pub mod assets;
pub mod auth;
pub mod cookies;
pub mod error;
pub mod export;
pub mod extract;
pub mod headers;
pub mod html;
pub mod model;
pub mod pages;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{any, get, post};
use axum::Router;

pub use error::{ApiError, ApiResult};

/// What every handler shares: the hub.
pub type SharedHub = Arc<berth_hub::Hub>;

/// The hub's routes, under `<base_url>hub/`, and `<base_url>user/*` for
/// servers the proxy has no route to (they are not running).
pub fn router(hub: SharedHub) -> Router {
    use pages::{admin, apps, console, home, images, keys, login, queue, servers, setup, tokens};
    let max_body = hub.cfg.max_body_bytes as usize;
    let hub_routes = Router::new()
        .route("/", get(login::root))
        .route("/home", get(home::home))
        .route("/setup", get(setup::setup_page).post(setup::setup))
        .route("/signup", get(login::signup_page).post(login::signup))
        .route("/login", get(login::login_page).post(login::login))
        .route("/logout", get(login::logout_page).post(login::logout))
        .route("/change-password", get(login::change_password_page).post(login::change_password))
        .route("/change-password/{name}", get(admin::admin_password_page).post(admin::admin_password))
        .route("/authorize", get(admin::authorize_page))
        .route("/authorize/{name}", post(admin::authorize_action))
        .route("/admin", get(login::admin_redirect))
        .route("/gpus/{id}", post(admin::gpu_action))
        .route("/gpu-quota/{name}", post(admin::gpu_quota_action))
        .route("/admin/servers", get(console::servers_page).post(console::server_action))
        .route("/admin/sessions", get(console::sessions_page))
        .route("/admin/sessions/revoke", post(console::revoke_session))
        .route("/admin/events", get(console::events_page))
        .route("/admin/events/export", get(console::events_export))
        .route("/admin/announcement", get(console::announcement_page).post(console::announcement_action))
        .route("/admin/templates", get(images::templates_page))
        .route("/admin/templates/{id}/build", post(images::build_action))
        .route("/admin/templates/check", post(images::check_action))
        .route("/admin/gpu-queue", get(queue::queue_page))
        .route("/admin/gpu-queue/{user}", post(queue::queue_action))
        .route("/admin/gpu-queue/{user}/{server}", post(queue::queue_action))
        .route("/app-login", get(apps::app_login))
        .route("/keys", get(keys::page_own))
        .route("/keys/{user}", get(keys::page_user).post(keys::page_add))
        .route("/keys/{user}/{id}/delete", post(keys::page_delete))
        .route("/token", get(tokens::token_page).post(tokens::token_create))
        .route("/token/{id}/revoke", post(tokens::token_revoke))
        .route("/spawn", get(servers::spawn_page_own).post(servers::spawn_post_own))
        .route("/spawn/{user}", get(servers::spawn_page).post(servers::spawn_post))
        .route("/spawn/{user}/{server}", get(servers::spawn_page).post(servers::spawn_post))
        .route("/spawn-named", post(servers::spawn_named_form))
        .route("/spawn-template", post(servers::spawn_template_form))
        .route("/spawn-pending/{user}", get(servers::pending))
        .route("/spawn-pending/{user}/{server}", get(servers::pending))
        .route("/stop/{user}", post(servers::stop_post))
        .route("/stop/{user}/{server}", post(servers::stop_post))
        .route("/extend/{user}", post(servers::extend_post))
        .route("/extend/{user}/{server}", post(servers::extend_post))
        .route("/logs/{user}", get(servers::logs))
        .route("/logs/{user}/{server}", get(servers::logs))
        .route("/user/{*rest}", any(servers::hub_user_redirect))
        .route("/user-redirect/{*rest}", get(servers::user_redirect))
        .route("/metrics", get(api::metrics))
        .route("/api/", get(api::version))
        .nest("/api", api::router());
    let base = hub.cfg.base_url.clone();
    let mount = format!("{}hub", base);
    let mut app = Router::new()
        .nest(&mount, hub_routes)
        // `<base>hub/` (what people type, and what JupyterHub answers) as `<base>hub`.
        .route(&format!("{mount}/"), get(login::root))
        // Reached only when the proxy has no route: the server is not running.
        .route(&format!("{base}user/{{*rest}}"), any(servers::not_running));
    if base != "/" {
        // `<base>` alone goes to the hub too.
        app = app.route(&base, get(login::root));
    } else {
        app = app.route("/", get(login::root));
    }
    app.fallback(api::not_found)
        .layer(axum::middleware::from_fn_with_state(hub.clone(), auth::authenticate))
        .layer(DefaultBodyLimit::max(max_body))
        // Static files need no caller: outside the authentication layer.
        .merge(assets::router(hub.hub_prefix()))
        // Outermost: every answer of the router, refusals included.
        .layer(axum::middleware::from_fn_with_state(headers::HubHeaders::for_hub(&hub), headers::hub_headers))
        .with_state(hub)
}
