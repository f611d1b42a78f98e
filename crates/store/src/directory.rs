//! An in-memory directory of users and servers, so the hub's hottest reads
//! (user lists, single users, server states) cost no database round trip.
//!
//! Coherence: every write through the store bumps `meta.directory_version` and
//! re-reads the rows it touched. A reader checks the version at most every
//! `RECHECK` and reloads everything when another process (the CLI, a second
//! hub) has written since. So a change by another process is seen within
//! `RECHECK`; a change by this process at once.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use berth_core::ServerState;
use sqlx::Row;

use crate::{Result, Server, StateFilter, Store, User, UserQuery};

const RECHECK: Duration = Duration::from_millis(500);

#[derive(Default)]
pub(crate) struct Directory {
    users: BTreeMap<String, User>,
    servers: BTreeMap<(String, String), Server>,
    version: i64,
    checked: Option<Instant>,
    valid: bool,
}

impl Store {
    async fn directory_version(&self) -> Result<i64> {
        let row = sqlx::query("SELECT value FROM meta WHERE key = 'directory_version'").fetch_one(&self.pool).await?;
        Ok(row.try_get("value")?)
    }

    /// Makes sure the directory reflects the database (reloading if needed).
    async fn fresh(&self) -> Result<()> {
        if let Ok(d) = self.dir.read() {
            if d.valid && d.checked.is_some_and(|c| c.elapsed() < RECHECK) {
                return Ok(());
            }
        }
        let v = self.directory_version().await?;
        if let Ok(mut d) = self.dir.write() {
            if d.valid && d.version == v {
                d.checked = Some(Instant::now());
                return Ok(());
            }
        }
        let users = self.list_users_all_db().await?;
        let servers = self.list_servers_db(None).await?;
        if let Ok(mut d) = self.dir.write() {
            d.users = users.into_iter().map(|u| (u.name.clone(), u)).collect();
            d.servers = servers.into_iter().map(|s| ((s.user.clone(), s.name.clone()), s)).collect();
            d.version = v;
            d.checked = Some(Instant::now());
            d.valid = true;
        }
        Ok(())
    }

    async fn list_users_all_db(&self) -> Result<Vec<User>> {
        let rows =
            sqlx::query(&format!("SELECT {} FROM users", crate::records::USER_COLS)).fetch_all(&self.pool).await?;
        rows.iter().map(User::from_row).collect()
    }

    /// Called after a write touching these users (or their servers).
    pub(crate) async fn directory_changed(&self, names: &[&str]) -> Result<()> {
        // One at a time, so this process's versions apply in order and never
        // look like someone else's write.
        let _order = self.dir_writer.lock().await;
        let row = sqlx::query("UPDATE meta SET value = value + 1 WHERE key = 'directory_version' RETURNING value")
            .fetch_one(&self.pool)
            .await?;
        let v: i64 = row.try_get("value")?;
        let mut fresh_rows = Vec::with_capacity(names.len());
        for n in names {
            let user = self.get_user_db(n).await?;
            let servers = self.list_servers_db(Some(n)).await?;
            fresh_rows.push((n.to_string(), user, servers));
        }
        if let Ok(mut d) = self.dir.write() {
            if d.valid && d.version + 1 == v {
                for (name, user, servers) in fresh_rows {
                    d.servers.retain(|(u, _), _| u != &name);
                    match user {
                        Some(u) => {
                            d.users.insert(name, u);
                        }
                        None => {
                            d.users.remove(&name);
                        }
                    }
                    for s in servers {
                        d.servers.insert((s.user.clone(), s.name.clone()), s);
                    }
                }
                d.version = v;
            } else {
                // Someone else wrote in between: reload on the next read.
                d.valid = false;
            }
        }
        Ok(())
    }

    pub async fn get_user(&self, name: &str) -> Result<Option<User>> {
        self.fresh().await?;
        Ok(self.dir.read().ok().and_then(|d| d.users.get(name).cloned()))
    }

    pub async fn count_users(&self) -> Result<i64> {
        self.fresh().await?;
        Ok(self.dir.read().map(|d| d.users.len() as i64).unwrap_or(0))
    }

    /// Users in name order, filtered, with the total before offset/limit.
    pub async fn list_users(&self, q: &UserQuery) -> Result<(Vec<User>, i64)> {
        self.fresh().await?;
        let Ok(d) = self.dir.read() else { return Ok((Vec::new(), 0)) };
        let active =
            |name: &str, ready_only: bool| {
                d.servers
                    .range((name.to_string(), String::new())..)
                    .take_while(|((u, _), _)| u == name)
                    .any(|(_, s)| if ready_only { s.state == ServerState::Running } else { s.state.is_active() })
            };
        let prefix = q.name_prefix.as_deref().unwrap_or("");
        let matches = |u: &User| {
            u.name.starts_with(prefix)
                && q.authorized.is_none_or(|a| u.authorized == a)
                && match q.state {
                    StateFilter::Any => true,
                    StateFilter::Ready => active(&u.name, true),
                    StateFilter::Active => active(&u.name, false),
                    StateFilter::Inactive => !active(&u.name, false),
                }
        };
        let offset = q.offset.max(0) as usize;
        let limit = q.limit.max(0) as usize;
        if prefix.is_empty() && q.authorized.is_none() && q.state == StateFilter::Any {
            // The common case needs no scan: the map knows its size and order.
            let page = d.users.values().skip(offset).take(limit).cloned().collect();
            return Ok((page, d.users.len() as i64));
        }
        let range = d.users.range(prefix.to_string()..).take_while(|(n, _)| n.starts_with(prefix)).map(|(_, u)| u);
        let (mut total, mut page) = (0i64, Vec::with_capacity(limit.min(1000)));
        for u in range.filter(|u| matches(u)) {
            if total as usize >= offset && page.len() < limit {
                page.push(u.clone());
            }
            total += 1;
        }
        Ok((page, total))
    }

    pub async fn get_server(&self, user: &str, name: &str) -> Result<Option<Server>> {
        self.fresh().await?;
        Ok(self.dir.read().ok().and_then(|d| d.servers.get(&(user.to_string(), name.to_string())).cloned()))
    }

    pub async fn list_servers(&self, user: Option<&str>) -> Result<Vec<Server>> {
        self.fresh().await?;
        let Ok(d) = self.dir.read() else { return Ok(Vec::new()) };
        Ok(match user {
            Some(u) => d
                .servers
                .range((u.to_string(), String::new())..)
                .take_while(|((owner, _), _)| owner == u)
                .map(|(_, s)| s.clone())
                .collect(),
            None => d.servers.values().cloned().collect(),
        })
    }

    /// Active servers of many users at once, for list endpoints.
    pub async fn servers_of(&self, users: &[String]) -> Result<Vec<Server>> {
        self.fresh().await?;
        let Ok(d) = self.dir.read() else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for u in users {
            out.extend(
                d.servers
                    .range((u.clone(), String::new())..)
                    .take_while(|((owner, _), _)| owner == u)
                    .filter(|(_, s)| s.state.is_active())
                    .map(|(_, s)| s.clone()),
            );
        }
        Ok(out)
    }

    pub async fn count_active_servers_of(&self, user: &str) -> Result<i64> {
        Ok(self.list_servers(Some(user)).await?.iter().filter(|s| s.state.is_active()).count() as i64)
    }

    pub async fn count_active_servers(&self) -> Result<i64> {
        self.fresh().await?;
        Ok(self.dir.read().map(|d| d.servers.values().filter(|s| s.state.is_active()).count() as i64).unwrap_or(0))
    }
}
