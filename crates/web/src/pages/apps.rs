//! `host` routing, the hub's side: `GET /hub/app-login?host=…&next=…`
//! sends a logged-in visitor who may use that app to it, with a single-use
//! code bound to the app's host name.

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use berth_hub::templates::AUTH_PATH;
use serde::Deserialize;

use crate::error::{ApiError, ApiResult};
use crate::extract::PageUser;
use crate::SharedHub;

#[derive(Deserialize)]
pub struct AppLogin {
    host: String,
    #[serde(default)]
    next: String,
}

/// A path on the app host to land on: local, or `/`.
pub fn safe_app_next(next: &str) -> String {
    if next.starts_with('/') && !next.starts_with("//") && !next.contains('\\') {
        next.to_string()
    } else {
        "/".into()
    }
}

pub async fn app_login(State(hub): State<SharedHub>, user: PageUser, Query(q): Query<AppLogin>) -> ApiResult<Response> {
    let apps = &hub.servers.templates;
    let Some(id) = apps.parse_host(&q.host) else {
        return Err(ApiError::bad_request(format!("{:?} is not an app host of this hub", q.host)).page());
    };
    if !user.caller.may_access(&id) {
        return Err(ApiError::forbidden(format!("{} may not access this server", user.caller.name())).page());
    }
    let host = apps.host_for(&id);
    let Some(session) = user.caller.session_public_id() else {
        return Err(ApiError::forbidden("app hosts are reached from a browser session").page());
    };
    let code = apps.issue_code(user.caller.name(), session, &host);
    let next = safe_app_next(&q.next);
    let next = percent_encoding::utf8_percent_encode(&next, percent_encoding::NON_ALPHANUMERIC);
    Ok(Redirect::to(&format!("{}{AUTH_PATH}?code={code}&next={next}", apps.origin_of(&host))).into_response())
}

#[cfg(test)]
mod tests {
    #[test]
    fn app_hosts_land_on_local_paths_only() {
        assert_eq!(super::safe_app_next("//evil.example/"), "/");
        assert_eq!(super::safe_app_next("/ok?x=1"), "/ok?x=1");
        assert_eq!(super::safe_app_next("https://evil.example/"), "/");
    }
}
