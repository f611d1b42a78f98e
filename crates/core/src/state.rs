//! The server lifecycle, as one enum and one function that knows its legal
//! moves.
//!
//! ```text
//! stopped ──start──▶ starting ──ready──▶ running ──stop──▶ stopping ──▶ stopped
//!                       │                   │
//!                       └──fail/timeout─────┴──vanished──▶ stopped (last error kept)
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServerState {
    Stopped,
    Starting,
    Running,
    Stopping,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Start,
    Ready,
    Fail,
    Stop,
    Stopped,
    Vanished,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("the server is {from}; it cannot {what}")]
    Illegal { from: ServerState, what: &'static str },
}

impl ServerState {
    /// The one place that knows which moves are legal.
    pub fn apply(self, t: Transition) -> Result<ServerState, TransitionError> {
        use ServerState::*;
        use Transition as T;
        let next = match (self, t) {
            (Stopped, T::Start) => Starting,
            (Starting, T::Ready) => Running,
            (Starting, T::Fail) => Stopped,
            (Starting | Running, T::Stop) => Stopping,
            (Stopping, T::Stopped) => Stopped,
            (Starting | Running | Stopping, T::Vanished) => Stopped,
            (from, t) => {
                let what = match t {
                    T::Start => "start",
                    T::Ready => "become ready",
                    T::Fail => "fail to start",
                    T::Stop => "stop",
                    T::Stopped => "finish stopping",
                    T::Vanished => "vanish",
                };
                return Err(TransitionError::Illegal { from, what });
            }
        };
        Ok(next)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ServerState::Stopped => "stopped",
            ServerState::Starting => "starting",
            ServerState::Running => "running",
            ServerState::Stopping => "stopping",
        }
    }

    /// "Active" in JupyterHub's sense: pending or ready.
    pub fn is_active(self) -> bool {
        !matches!(self, ServerState::Stopped)
    }

    /// JupyterHub's `pending` field.
    pub fn pending(self) -> Option<&'static str> {
        match self {
            ServerState::Starting => Some("spawn"),
            ServerState::Stopping => Some("stop"),
            _ => None,
        }
    }
}

impl fmt::Display for ServerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ServerState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "stopped" => ServerState::Stopped,
            "starting" => ServerState::Starting,
            "running" => ServerState::Running,
            "stopping" => ServerState::Stopping,
            other => return Err(format!("unknown server state {other:?}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::ServerState::*;
    use super::Transition as T;
    use super::*;

    #[test]
    fn transition_table() {
        let all_states = [Stopped, Starting, Running, Stopping];
        let all_moves = [T::Start, T::Ready, T::Fail, T::Stop, T::Stopped, T::Vanished];
        let legal: &[(ServerState, Transition, ServerState)] = &[
            (Stopped, T::Start, Starting),
            (Starting, T::Ready, Running),
            (Starting, T::Fail, Stopped),
            (Starting, T::Stop, Stopping),
            (Running, T::Stop, Stopping),
            (Stopping, T::Stopped, Stopped),
            (Starting, T::Vanished, Stopped),
            (Running, T::Vanished, Stopped),
            (Stopping, T::Vanished, Stopped),
        ];
        for s in all_states {
            for m in all_moves {
                let expected = legal.iter().find(|(f, t, _)| *f == s && *t == m).map(|(_, _, to)| *to);
                assert_eq!(s.apply(m).ok(), expected, "{s:?} --{m:?}-->");
            }
        }
    }

    #[test]
    fn round_trips_through_text() {
        for s in [Stopped, Starting, Running, Stopping] {
            assert_eq!(s.as_str().parse::<ServerState>().unwrap(), s);
        }
        assert!("exploded".parse::<ServerState>().is_err());
    }
}
