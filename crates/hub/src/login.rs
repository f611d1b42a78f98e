//! Log-in: password checks on a few dedicated hashing threads (their queue
//! bounded: past it, "busy, try again"), lock-out, re-hashing of imported
//! hashes, and new sessions.
//!
//! Lock-out is counted per account *and source address*: a stranger who
//! guesses the admin's password from their own address locks only that
//! pair, so the admin still logs in from theirs. Each address is throttled
//! across all accounts (and unknown names, which lock and cost the same as
//! real ones), and an account locks everywhere only after ten times the
//! attempts — the bound on a guessing attack spread over many addresses.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use berth_auth::{SessionCookie, Signer, Verified};
use berth_core::UserName;
use berth_store::{now_ms, Store, User};

use crate::error::{HubError, HubResult};

/// Failed log-ins: (count, last failure, locked until).
type Failures = (i64, Option<i64>, Option<i64>);

/// Failed log-ins one address may make, over all accounts, in the lock-out window.
const PER_ADDRESS: u32 = 30;
/// An account locks for every address after this many times the attempts.
const ACCOUNT_WIDE_FACTOR: u32 = 10;
/// Password checks that may wait for a hashing thread.
const QUEUE: usize = 64;

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
    /// Unknown names, by (name, address).
    unknown_failures: Mutex<HashMap<(String, String), Failures>>,
    /// Every failure of an address, whatever the account.
    address_failures: Mutex<HashMap<String, Failures>>,
}

impl Login {
    pub fn new(auth: berth_auth::Config, store: Store) -> Login {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        Login {
            auth,
            store,
            hashers: HashPool::new(cores.saturating_sub(1).max(1), QUEUE),
            unknown_failures: Mutex::new(HashMap::new()),
            address_failures: Mutex::new(HashMap::new()),
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

    /// Checks a log-in from `addr`, counting failures toward the lock-outs.
    pub async fn check(&self, raw_name: &str, password: String, addr: &str) -> HubResult<LoginOutcome> {
        let now = now_ms();
        let policy = self.auth.lockout();
        let per_address = berth_auth::LockoutPolicy { attempts: PER_ADDRESS, window: policy.window };
        let wide = berth_auth::LockoutPolicy {
            attempts: policy.attempts.saturating_mul(ACCOUNT_WIDE_FACTOR),
            window: policy.window,
        };
        let from_here = self.address_failures.lock().ok().and_then(|m| m.get(addr).copied());
        if policy.attempts > 0 {
            if let Some(until) = per_address.locked_until(from_here.and_then(|f| f.2), now) {
                return Ok(LoginOutcome::Locked { until });
            }
        }
        let name = UserName::normalize(raw_name).ok();
        let user = match &name {
            Some(n) => self.store.get_user_uncached(n.as_str()).await?,
            None => None,
        };
        let Some(user) = user else {
            // Unknown names cost the same time and lock out the same way.
            let key = (raw_name.trim().to_lowercase(), addr.to_string());
            let prior = self.unknown_failures.lock().ok().and_then(|m| m.get(&key).copied());
            if let Some(until) = policy.locked_until(prior.and_then(|p| p.2), now) {
                return Ok(LoginOutcome::Locked { until });
            }
            self.verify_password(None, password).await?;
            let next = policy.after_failure(prior.map_or(0, |p| p.0), prior.and_then(|p| p.1), now);
            if let Ok(mut m) = self.unknown_failures.lock() {
                if m.len() > 10_000 {
                    m.clear();
                }
                m.insert(key, (next.failed, Some(now), next.locked_until));
            }
            self.address_failed(addr, &per_address, now);
            return Ok(LoginOutcome::Invalid);
        };
        let pair = self.store.login_failures(&user.name, addr).await?;
        let locked = policy.locked_until(pair.and_then(|p| p.2), now).or(wide.locked_until(user.locked_until, now));
        if let Some(until) = locked {
            return Ok(LoginOutcome::Locked { until });
        }
        let verdict = self.verify_password(user.password_hash.clone(), password.clone()).await?;
        if !verdict.ok() {
            let next = policy.after_failure(pair.map_or(0, |p| p.0), pair.map(|p| p.1), now);
            self.store.record_address_failure(&user.name, addr, next.failed, now, next.locked_until).await?;
            let all = wide.after_failure(user.failed_logins, user.last_failed_login, now);
            self.store.record_login_failure(&user.name, all.failed, now, all.locked_until).await?;
            if next.locked_until.is_some() || all.locked_until.is_some() {
                tracing::warn!(user = %user.name, %addr, failures = next.failed, "account locked after failed log-ins");
            }
            self.address_failed(addr, &per_address, now);
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
        self.store.clear_address_failures(&user.name, addr).await?;
        Ok(LoginOutcome::Ok(user))
    }

    fn address_failed(&self, addr: &str, policy: &berth_auth::LockoutPolicy, now: i64) {
        if let Ok(mut m) = self.address_failures.lock() {
            if m.len() > 100_000 {
                m.clear();
            }
            let prior = m.get(addr).copied();
            let next = policy.after_failure(prior.map_or(0, |p| p.0), prior.and_then(|p| p.1), now);
            m.insert(addr.to_string(), (next.failed, Some(now), next.locked_until));
        }
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
    /// Jobs queued or running, and how many may be.
    waiting: Arc<std::sync::atomic::AtomicUsize>,
    max_waiting: usize,
}

impl HashPool {
    fn new(threads: usize, max_waiting: usize) -> HashPool {
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
        HashPool { tx: Mutex::new(tx), waiting: Arc::default(), max_waiting: max_waiting.max(threads) }
    }

    async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> HubResult<T> {
        use std::sync::atomic::Ordering;
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(HubError::Busy503);
        }
        // Counted down when the job ends, or is dropped unrun.
        struct Waiting(Arc<std::sync::atomic::AtomicUsize>);
        impl Drop for Waiting {
            fn drop(&mut self) {
                self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            }
        }
        let waiting = Waiting(self.waiting.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _waiting = waiting;
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_hash_queue_is_bounded_and_says_busy() {
        let pool = Arc::new(HashPool::new(1, 2));
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = Arc::new(Mutex::new(release_rx));
        // Two jobs fill the queue (one runs, one waits) …
        let mut held = Vec::new();
        for _ in 0..2 {
            let (pool, rx) = (pool.clone(), release_rx.clone());
            held.push(tokio::spawn(async move {
                pool.run(move || {
                    let _ = rx.lock().map(|r| r.recv());
                })
                .await
            }));
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while pool.waiting.load(std::sync::atomic::Ordering::Acquire) < 2 {
            assert!(std::time::Instant::now() < deadline, "the jobs never queued");
            tokio::task::yield_now().await;
        }
        // … so a third is refused at once, with a message to try again.
        let refused = pool.run(|| ()).await;
        assert!(matches!(refused, Err(HubError::Busy503)), "{refused:?}");
        for _ in 0..2 {
            release_tx.send(()).unwrap();
        }
        for h in held {
            h.await.unwrap().unwrap();
        }
        assert!(pool.run(|| 7).await.unwrap() == 7, "free again once they finished");
    }
}
