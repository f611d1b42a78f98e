//! Log-in: password checks on a few dedicated hashing threads, lock-out
//! (unknown names lock and cost the same as real ones), re-hashing of
//! imported hashes, and new sessions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use berth_auth::{SessionCookie, Signer, Verified};
use berth_core::UserName;
use berth_store::{now_ms, Store, User};

use crate::error::{HubError, HubResult};

/// Failed log-ins of a name that does not exist: (count, last failure, locked until).
type UnknownFailures = (i64, Option<i64>, Option<i64>);

/// What a log-in attempt comes to.
#[derive(Debug)]
pub enum LoginOutcome {
    Ok(User),
    Invalid,
    /// Right password, but an admin has not authorized the account yet.
    Pending(String),
    Locked {
        until: i64,
    },
}

/// A new session: the cookie values a front end sets.
pub struct NewSession {
    pub cookie_value: String,
    pub public_id: String,
    pub xsrf: String,
}

pub struct Login {
    auth: berth_auth::Config,
    store: Store,
    hashers: HashPool,
    unknown_failures: Mutex<HashMap<String, UnknownFailures>>,
}

impl Login {
    pub fn new(auth: berth_auth::Config, store: Store) -> Login {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        Login {
            auth,
            store,
            hashers: HashPool::new(cores.saturating_sub(1).max(1)),
            unknown_failures: Mutex::new(HashMap::new()),
        }
    }

    /// Hashes a password off the async runtime.
    pub async fn hash_password(&self, password: String) -> HubResult<String> {
        let cost = self.auth.hash_cost();
        self.hashers.run(move || berth_auth::password::hash(&password, cost)).await
    }

    /// Verifies a password off the async runtime; a `None` hash spends the same time.
    pub async fn verify_password(&self, stored: Option<String>, password: String) -> HubResult<Verified> {
        let cost = self.auth.hash_cost();
        self.hashers
            .run(move || match stored {
                Some(h) => berth_auth::password::verify(&h, &password, cost),
                None => {
                    berth_auth::password::verify_dummy(&password, cost);
                    Verified::Wrong
                }
            })
            .await
    }

    /// Checks a log-in, counting failures toward the lock-out.
    pub async fn check(&self, raw_name: &str, password: String) -> HubResult<LoginOutcome> {
        let now = now_ms();
        let policy = self.auth.lockout();
        let name = UserName::normalize(raw_name).ok();
        let user = match &name {
            Some(n) => self.store.get_user_uncached(n.as_str()).await?,
            None => None,
        };
        let Some(user) = user else {
            // Unknown names cost the same time and lock out the same way.
            let key = raw_name.trim().to_lowercase();
            let prior = self.unknown_failures.lock().ok().and_then(|m| m.get(&key).copied());
            if let Some(until) = policy.locked_until(prior.and_then(|p| p.2), now) {
                return Ok(LoginOutcome::Locked { until });
            }
            self.verify_password(None, password).await?;
            let (failed, last) = prior.map(|p| (p.0, p.1)).unwrap_or((0, None));
            let next = policy.after_failure(failed, last, now);
            if let Ok(mut m) = self.unknown_failures.lock() {
                if m.len() > 10_000 {
                    m.clear();
                }
                m.insert(key, (next.failed, Some(now), next.locked_until));
            }
            return Ok(LoginOutcome::Invalid);
        };
        if let Some(until) = policy.locked_until(user.locked_until, now) {
            return Ok(LoginOutcome::Locked { until });
        }
        let verdict = self.verify_password(user.password_hash.clone(), password.clone()).await?;
        if !verdict.ok() {
            let next = policy.after_failure(user.failed_logins, user.last_failed_login, now);
            self.store.record_login_failure(&user.name, next.failed, now, next.locked_until).await?;
            if next.locked_until.is_some() {
                tracing::warn!(user = %user.name, failures = next.failed, "account locked after failed log-ins");
            }
            return Ok(LoginOutcome::Invalid);
        }
        if !user.authorized {
            return Ok(LoginOutcome::Pending(user.name));
        }
        if verdict == Verified::OkRehash {
            let hash = self.hash_password(password).await?;
            self.store.rehash_password(&user.name, &hash).await?;
            tracing::info!(user = %user.name, "re-hashed an imported or outdated password hash with argon2id");
        }
        self.store.record_login_success(&user.name, now).await?;
        Ok(LoginOutcome::Ok(user))
    }

    /// Starts a session for `user`.
    pub async fn start_session(&self, signer: &Signer, user: &str) -> HubResult<NewSession> {
        let sc = SessionCookie::new(signer);
        self.store.create_session(&sc.id_hash, &sc.public_id, user).await?;
        let xsrf = signer.xsrf_token(&format!("s:{}", sc.public_id), now_ms());
        Ok(NewSession { cookie_value: sc.cookie_value, public_id: sc.public_id, xsrf })
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// A few dedicated threads for password hashing: fewer than the cores, so a
/// log-in storm leaves a core for everything else; few and long-lived, so
/// their 19 MiB working memory is reused instead of piling up per thread.
struct HashPool {
    tx: Mutex<std::sync::mpsc::Sender<Job>>,
}

impl HashPool {
    fn new(threads: usize) -> HashPool {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new().name(format!("berth-hash-{i}")).spawn(move || loop {
                let job = match rx.lock() {
                    Ok(r) => r.recv_timeout(std::time::Duration::from_secs(10)),
                    Err(_) => return,
                };
                match job {
                    Ok(job) => job(),
                    // Idle: give the working memory back until the next log-in.
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => berth_auth::password::release_memory(),
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a password hashing thread");
            }
        }
        HashPool { tx: Mutex::new(tx) }
    }

    async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> HubResult<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.tx
            .lock()
            .map_err(|_| HubError::internal("hashing pool poisoned"))?
            .send(job)
            .map_err(|_| HubError::internal("no password hashing thread is running"))?;
        rx.await.map_err(|_| HubError::internal("a password hashing thread failed"))
    }
}
