//! Start progress: typed events that serialise to JupyterHub's event shape
//! (`{"progress": N, "message": …}`, the last one with `"ready": true` and
//! the URL, or `"failed": true`), kept per server and replayed to late
//! subscribers (the progress stream, the spawn-pending page, the SSH
//! gateway).

use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::broadcast;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProgressEvent {
    pub progress: u8,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub html_message: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub ready: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub failed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Set on a cull warning (after the start's final event): when the
    /// server will be stopped, unix ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cull_at_ms: Option<i64>,
}

impl ProgressEvent {
    pub fn step(progress: u8, message: impl Into<String>) -> ProgressEvent {
        ProgressEvent {
            progress: progress.min(100),
            message: message.into(),
            html_message: None,
            ready: false,
            failed: false,
            url: None,
            cull_at_ms: None,
        }
    }

    /// The culler's warning, sent to a running server's progress log.
    pub fn cull_warning(message: &str, cull_at_ms: i64) -> ProgressEvent {
        ProgressEvent { cull_at_ms: Some(cull_at_ms), ..ProgressEvent::step(100, message) }
    }

    pub fn ready(url: &str) -> ProgressEvent {
        ProgressEvent {
            progress: 100,
            message: format!("Server ready at {url}"),
            html_message: Some(format!("Server ready at <a href=\"{url}\">{url}</a>")),
            ready: true,
            failed: false,
            url: Some(url.to_string()),
            cull_at_ms: None,
        }
    }

    pub fn failed(reason: &str) -> ProgressEvent {
        ProgressEvent { failed: true, ..ProgressEvent::step(100, format!("Spawn failed: {reason}")) }
    }

    /// The last event of a start that was called off before it ran (a
    /// queued start cancelled): final, as a failure is, with its own words.
    pub fn cancelled(message: &str) -> ProgressEvent {
        ProgressEvent { failed: true, ..ProgressEvent::step(100, message) }
    }

    /// The last event of a start.
    pub fn is_final(&self) -> bool {
        self.ready || self.failed
    }

    /// `[ 50%] message`, for terminals.
    pub fn line(&self) -> String {
        format!("[{:>3}%] {}", self.progress, self.message)
    }
}

/// One start's events so far, and a channel for the ones to come.
pub struct ProgressLog {
    events: Mutex<Vec<ProgressEvent>>,
    tx: broadcast::Sender<ProgressEvent>,
}

impl ProgressLog {
    pub fn new() -> Arc<ProgressLog> {
        // Small: the buffer is allocated whole and kept as long as the server
        // runs (its log is), and a start sends about ten events; a watcher
        // that falls behind skips what it missed (the final event is kept).
        let (tx, _) = broadcast::channel(16);
        Arc::new(ProgressLog { events: Mutex::new(Vec::new()), tx })
    }

    pub fn push(&self, ev: ProgressEvent) {
        if let Ok(mut e) = self.events.lock() {
            e.push(ev.clone());
        }
        let _ = self.tx.send(ev);
    }

    /// Whether the final event was pushed.
    pub fn is_finished(&self) -> bool {
        self.events.lock().map(|e| e.iter().any(ProgressEvent::is_final)).unwrap_or(true)
    }

    /// Every event so far, then each new one, ending after the final event.
    pub fn watch(&self) -> ProgressWatch {
        let rx = self.tx.subscribe();
        let past: Vec<ProgressEvent> = self.events.lock().map(|e| e.clone()).unwrap_or_default();
        let done = past.iter().any(ProgressEvent::is_final);
        ProgressWatch { past: past.into(), rx: (!done).then_some(rx), done }
    }
}

/// A reader of one [`ProgressLog`].
pub struct ProgressWatch {
    past: std::collections::VecDeque<ProgressEvent>,
    rx: Option<broadcast::Receiver<ProgressEvent>>,
    done: bool,
}

impl ProgressWatch {
    /// The next event; `None` after the final one (or when the log is dropped).
    pub async fn next(&mut self) -> Option<ProgressEvent> {
        if let Some(ev) = self.past.pop_front() {
            return Some(ev);
        }
        if self.done {
            return None;
        }
        let rx = self.rx.as_mut()?;
        loop {
            match rx.recv().await {
                Ok(ev) => {
                    self.done = ev.is_final();
                    return Some(ev);
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn events_serialise_in_jupyterhubs_shape() {
        let cases = [
            (ProgressEvent::step(10, "Spawning server..."), r#"{"progress":10,"message":"Spawning server..."}"#),
            (ProgressEvent::failed("boom"), r#"{"progress":100,"message":"Spawn failed: boom","failed":true}"#),
            (
                ProgressEvent::ready("/user/a/"),
                r#"{"progress":100,"message":"Server ready at /user/a/","html_message":"Server ready at <a href=\"/user/a/\">/user/a/</a>","ready":true,"url":"/user/a/"}"#,
            ),
        ];
        for (ev, want) in cases {
            assert_eq!(serde_json::to_string(&ev).unwrap(), want);
        }
        assert_eq!(ProgressEvent::step(250, "x").progress, 100);
    }

    #[tokio::test]
    async fn late_watchers_replay_and_stop_after_the_final_event() {
        let log = ProgressLog::new();
        log.push(ProgressEvent::step(0, "requested"));
        let mut early = log.watch();
        log.push(ProgressEvent::ready("/user/a/"));
        log.push(ProgressEvent::step(5, "after the end"));
        let mut seen = Vec::new();
        while let Some(ev) = early.next().await {
            seen.push(ev.message);
        }
        assert_eq!(seen, ["requested", "Server ready at /user/a/"]);
        let mut late = log.watch();
        let mut n = 0;
        while late.next().await.is_some() {
            n += 1;
        }
        assert_eq!(n, 3, "a late watcher replays everything recorded and does not wait");
    }
}
