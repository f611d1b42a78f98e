//! Domain types shared by every berth crate: validated user and server names,
//! the server lifecycle state machine, and JupyterHub-style scopes.
//!
//! This crate must not depend on IO, tokio, SQL or HTTP: everything here is
//! plain data and pure functions, tested with tables.
#![forbid(unsafe_code)]

pub mod gpu;
pub mod gpu_smi;
pub mod names;
pub mod net;
pub mod scopes;
pub mod state;
pub mod template;

pub use names::{NameError, ServerId, ServerName, UserName};
pub use scopes::{Scope, ScopeSet, Target};
pub use state::{ServerState, Transition, TransitionError};
pub use template::{AppProtocol, GpuRange, HubTemplate, RoutingMode};

/// The JupyterHub REST API version berth implements. Clients such as
/// `jupyterhub-idle-culler` and `jupyterhub-singleuser` compare against it.
pub const JUPYTERHUB_API_VERSION: &str = "6.1.1";

/// berth's own version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Serde for `Duration` fields written as whole seconds in configuration.
pub mod serde_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs(u64::deserialize(d)?))
    }
}
