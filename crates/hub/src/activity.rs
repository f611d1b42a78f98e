//! Last-used times for tokens and sessions, kept in memory and written in
//! batches, so a busy API does not write the database on every request.

use std::collections::HashMap;
use std::sync::Mutex;

use berth_store::Store;

#[derive(Default)]
pub struct Activity {
    tokens: Mutex<HashMap<String, i64>>,
    sessions: Mutex<HashMap<String, i64>>,
    servers: Mutex<HashMap<(String, String), i64>>,
    users: Mutex<HashMap<String, i64>>,
}

impl Activity {
    pub fn token(&self, id: &str, at: i64) {
        if let Ok(mut m) = self.tokens.lock() {
            m.insert(id.to_string(), at);
        }
    }

    pub fn session(&self, id_hash: &str, at: i64) {
        if let Ok(mut m) = self.sessions.lock() {
            m.insert(id_hash.to_string(), at);
        }
    }

    pub fn user(&self, name: &str, at: i64) {
        if let Ok(mut m) = self.users.lock() {
            let e = m.entry(name.to_string()).or_insert(at);
            if *e < at {
                *e = at;
            }
        }
    }

    pub fn server(&self, user: &str, server: &str, at: i64) {
        if let Ok(mut m) = self.servers.lock() {
            let e = m.entry((user.to_string(), server.to_string())).or_insert(at);
            if *e < at {
                *e = at;
            }
        }
    }

    /// The server's activity collected since the last flush (not yet written).
    pub fn pending_server(&self, user: &str, server: &str) -> Option<i64> {
        self.servers.lock().ok()?.get(&(user.to_string(), server.to_string())).copied()
    }

    /// Writes what was collected since the last flush.
    pub async fn flush(&self, store: &Store) -> Result<(), berth_store::StoreError> {
        let tokens: Vec<(String, i64)> = self.tokens.lock().map(|mut m| m.drain().collect()).unwrap_or_default();
        let sessions: Vec<(String, i64)> = self.sessions.lock().map(|mut m| m.drain().collect()).unwrap_or_default();
        let servers: Vec<(String, String, i64)> =
            self.servers.lock().map(|mut m| m.drain().map(|((u, s), t)| (u, s, t)).collect()).unwrap_or_default();
        let users: Vec<(String, i64)> = self.users.lock().map(|mut m| m.drain().collect()).unwrap_or_default();
        for (u, t) in &users {
            store.touch_user_activity(u, *t).await?;
        }
        store.touch_tokens(&tokens).await?;
        store.touch_sessions(&sessions).await?;
        store.touch_servers(&servers).await?;
        Ok(())
    }
}
