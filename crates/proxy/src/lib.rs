//! The one-port reverse proxy: a route table read without locks (snapshots
//! swapped on change), an HTTP/1.1 forwarder (each downstream
//! connection with an upstream connection of its own, driven in its task), streamed bodies and WebSocket upgrades, and TLS accept on
//! the same port as plain HTTP.
//!
//! Must not know the store or the web framework: the server decides who may
//! pass (its edge admits a request before [`Forwarder::forward`]) and renders
//! the errors this crate classifies.
#![forbid(unsafe_code)]

mod forward;
mod routes;
pub mod tls;

pub use forward::{strip_cookies, Forwarder, ForwarderConfig, Peer, ProxyError, Upstream, UpstreamBody};
pub use routes::{contains_dot_segments, Route, RouteTable};
