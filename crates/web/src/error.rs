//! The one error type handlers return. `/hub/api/*` answers JSON
//! `{"status": N, "message": "..."}` as JupyterHub does; pages get a small
//! HTML page. Internal errors are logged and never sent.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

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
