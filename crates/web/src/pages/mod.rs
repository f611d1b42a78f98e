//! The hub's pages, server-rendered. Pages act with the browser's session
//! and go through the hub's rules, which check the caller's scopes.

pub mod admin;
pub mod apps;
pub mod console;
pub mod home;
pub mod images;
pub mod keys;
pub mod login;
pub mod queue;
pub mod servers;
pub mod setup;
pub mod tokens;

use crate::error::ApiError;

/// A hub refusal as a page.
pub(crate) fn page(e: berth_hub::HubError) -> ApiError {
    ApiError::from(e).page()
}

/// "the name…" → "The name…", for messages that open a sentence.
pub(crate) fn upper_first(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}
