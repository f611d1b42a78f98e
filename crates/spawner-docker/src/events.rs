//! The engine's event stream, watched for berth's containers that die, so
//! the hub removes their routes at once.

use std::collections::HashMap;
use std::time::Duration;

use bollard::query_parameters::EventsOptions;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::{DockerSpawner, LABEL_MANAGED, LABEL_SERVER, LABEL_USER};

impl DockerSpawner {
    /// Until `exits` closes: `(user, server)` for each of berth's containers
    /// that dies, stops or is destroyed. Reconnects when the engine goes away.
    pub(crate) async fn watch_container_exits(&self, exits: mpsc::UnboundedSender<(String, String)>) {
        let mut backoff = Duration::from_secs(1);
        while !exits.is_closed() {
            let Ok(docker) = self.client() else {
                tokio::time::sleep(backoff).await;
                continue;
            };
            let filters = HashMap::from([
                ("type".to_string(), vec!["container".to_string()]),
                ("event".to_string(), vec!["die".to_string(), "destroy".to_string()]),
                ("label".to_string(), vec![format!("{LABEL_MANAGED}=true")]),
            ]);
            let mut events = docker.events(Some(EventsOptions { filters: Some(filters), ..Default::default() }));
            loop {
                tokio::select! {
                    _ = exits.closed() => return,
                    ev = events.next() => match ev {
                        Some(Ok(ev)) => {
                            backoff = Duration::from_secs(1);
                            let labels = ev.actor.and_then(|a| a.attributes).unwrap_or_default();
                            if let Some(user) = labels.get(LABEL_USER) {
                                let server = labels.get(LABEL_SERVER).cloned().unwrap_or_default();
                                let _ = exits.send((user.clone(), server));
                            }
                        }
                        Some(Err(e)) => {
                            tracing::debug!(error = %e, "the engine's event stream failed; reconnecting");
                            break;
                        }
                        None => break,
                    },
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }
}
