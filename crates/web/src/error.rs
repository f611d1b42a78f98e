//! The one error type handlers return. `/hub/api/*` answers JSON
//! `{"status": N, "message": "..."}` as JupyterHub does; pages get a small
//! HTML page. Internal errors are logged and never sent. Hub refusals are
//! mapped to status codes in one function, [`status_of`].

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use berth_hub::HubError;

use crate::html;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// Render as a page instead of JSON.
    pub html: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), html: false }
    }
    pub fn bad_request(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, m)
    }
    pub fn forbidden(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, m)
    }
    pub fn not_found(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, m)
    }
    pub fn conflict(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, m)
    }
    /// Logs the cause; the client sees only a generic message.
    pub fn internal(cause: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %cause, "internal error");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error; see the hub's log")
    }
    pub fn page(mut self) -> ApiError {
        self.html = true;
        self
    }

    /// A hub error as `admin` may see it: admins learn who holds the GPUs.
    pub fn for_viewer(e: HubError, admin: bool) -> ApiError {
        let status = status_of(&e);
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            return ApiError::new(status, "internal error; see the hub's log");
        }
        ApiError::new(status, if admin { e.detail() } else { e.to_string() })
    }
}

/// The status code of each refusal.
pub fn status_of(e: &HubError) -> StatusCode {
    use HubError as E;
    match e {
        E::NoSuchUser { .. } | E::NoSuchServer { .. } | E::NoSuchToken { .. } | E::NoSuchKey { .. } => {
            StatusCode::NOT_FOUND
        }
        E::NoSuchGpu { .. } | E::SetupClosed | E::NotQueued { .. } | E::NoSuchSession { .. } => StatusCode::NOT_FOUND,
        E::UserExists { .. } | E::AllUsersExist { .. } | E::KeyExists { .. } => StatusCode::CONFLICT,
        E::NoGpus { .. } | E::GpusExceedInventory { .. } | E::CullNotExtendable { .. } => StatusCode::CONFLICT,
        E::MissingScope { .. } | E::ScopesNotHeld { .. } => StatusCode::FORBIDDEN,
        E::NamedServerLimit { .. } | E::HubFull { .. } | E::TooManyStarting { .. } | E::GpuQuota { .. } => {
            StatusCode::TOO_MANY_REQUESTS
        }
        E::Internal(_) | E::Spawner { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        E::Busy503 => StatusCode::SERVICE_UNAVAILABLE,
        E::Store(s) => match s {
            berth_store::StoreError::NotFound { .. } => StatusCode::NOT_FOUND,
            berth_store::StoreError::Conflict { .. } => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        },
        E::Name(_)
        | E::NotAuthorized { .. }
        | E::SelfAction { .. }
        | E::ServersRunning { .. }
        | E::Password(_)
        | E::PasswordMismatch
        | E::WrongPassword
        | E::AlreadyRunning { .. }
        | E::PendingSpawn { .. }
        | E::PendingStop { .. }
        | E::Busy { .. }
        | E::NotStopped { .. }
        | E::NotRunning { .. }
        | E::StillStopping
        | E::Transition(_)
        | E::TemplateNotAllowed { .. }
        | E::UnknownTemplate { .. }
        | E::GpuCountOutOfRange { .. }
        | E::NeedsHostRouting { .. }
        | E::BadOptions { .. }
        | E::NotIsolated { .. }
        | E::ImageNotAllowed { .. }
        | E::GpusOff
        | E::BadQuota { .. }
        | E::TooManyGpus { .. }
        | E::QueuePosition { .. }
        | E::BadToken(_)
        | E::BadKey(_)
        | E::TooManyKeys { .. }
        | E::OAuth(_)
        | E::BadAnnouncement { .. }
        | E::BadEventFilter { .. } => StatusCode::BAD_REQUEST,
    }
}

impl From<HubError> for ApiError {
    fn from(e: HubError) -> ApiError {
        match e {
            HubError::Store(s) => s.into(),
            HubError::Spawner { message } => {
                ApiError::internal(format!("spawner: {message}"));
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
            }
            other => ApiError::for_viewer(other, false),
        }
    }
}

impl From<berth_store::StoreError> for ApiError {
    fn from(e: berth_store::StoreError) -> ApiError {
        use berth_store::StoreError as E;
        match e {
            E::NotFound { what } => ApiError::not_found(format!("{what} not found")),
            E::Conflict { what } => ApiError::conflict(format!("{what} already exists")),
            other => ApiError::internal(other),
        }
    }
}

impl From<berth_core::NameError> for ApiError {
    fn from(e: berth_core::NameError) -> ApiError {
        ApiError::bad_request(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.html {
            let title = self.status.canonical_reason().unwrap_or("Error");
            let body = format!(
                "<h1>{} {}</h1><div class=\"alert alert-danger\" role=\"alert\"><p>{}</p></div>",
                self.status.as_u16(),
                html::esc(title),
                html::esc(&self.message)
            );
            return (self.status, html::bare_page(title, &body)).into_response();
        }
        let body = serde_json::json!({"status": self.status.as_u16(), "message": self.message});
        (self.status, Json(body)).into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_map_to_jupyterhubs_codes() {
        let cases: Vec<(HubError, u16)> = vec![
            (HubError::NoSuchUser { user: "x".into() }, 404),
            (HubError::UserExists { user: "x".into() }, 409),
            (HubError::missing_scope("admin:users"), 403),
            (HubError::NamedServerLimit { user: "a".into(), limit: 1, running: vec!["x".into()] }, 429),
            (HubError::AlreadyRunning { server: "a".into() }, 400),
            (HubError::Internal("boom".into()), 500),
        ];
        for (e, code) in cases {
            let text = e.to_string();
            let a = ApiError::from(e);
            assert_eq!(a.status.as_u16(), code, "{text}");
            if code == 500 {
                assert!(!a.message.contains("boom"), "internals are not sent: {}", a.message);
            }
        }
    }
}
