//! Failed-login lock-out, as a pure function of the account's counters.
//!
//! After `attempts` failures the account waits `window` before the next try;
//! a failure after the wait locks it again at once; a success resets it.
//! Failures older than the window are forgotten. Attempts during a lock
//! neither count nor extend it.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockoutPolicy {
    /// Failures before the lock; 0 turns lock-out off.
    pub attempts: u32,
    pub window: Duration,
}

impl Default for LockoutPolicy {
    fn default() -> Self {
        LockoutPolicy { attempts: 5, window: Duration::from_secs(600) }
    }
}

/// What to write back after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lockout {
    pub failed: i64,
    pub locked_until: Option<i64>,
}

impl LockoutPolicy {
    /// `Some(until_ms)` while the account is locked at `now_ms`.
    pub fn locked_until(&self, locked_until: Option<i64>, now_ms: i64) -> Option<i64> {
        if self.attempts == 0 {
            return None;
        }
        locked_until.filter(|until| *until > now_ms)
    }

    /// The counters after one more failure at `now_ms`.
    pub fn after_failure(&self, failed: i64, last_failed: Option<i64>, now_ms: i64) -> Lockout {
        let window_ms = self.window.as_millis() as i64;
        let stale = last_failed.is_none_or(|t| now_ms - t > window_ms);
        // A lock that has run out leaves the count at the limit, so one more
        // failure locks again; forgetting happens only after a quiet window.
        let failed = if stale && failed < self.attempts as i64 { 1 } else { failed + 1 };
        let locked_until = (self.attempts > 0 && failed >= self.attempts as i64).then_some(now_ms + window_ms);
        Lockout { failed, locked_until }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> LockoutPolicy {
        LockoutPolicy { attempts: 3, window: Duration::from_secs(10) }
    }

    #[test]
    fn locks_after_n_failures() {
        let p = policy();
        let mut state = Lockout { failed: 0, locked_until: None };
        let mut last = None;
        for i in 0..3 {
            assert_eq!(p.locked_until(state.locked_until, i * 1000), None);
            state = p.after_failure(state.failed, last, i * 1000);
            last = Some(i * 1000);
        }
        assert_eq!(state, Lockout { failed: 3, locked_until: Some(12_000) });
        assert_eq!(p.locked_until(state.locked_until, 5_000), Some(12_000));
        assert_eq!(p.locked_until(state.locked_until, 12_001), None);
        // One failure after the lock runs out locks again at once.
        let again = p.after_failure(state.failed, last, 12_500);
        assert_eq!(again.locked_until, Some(22_500));
    }

    #[test]
    fn old_failures_are_forgotten() {
        let p = policy();
        let s = p.after_failure(2, Some(0), 60_000);
        assert_eq!(s, Lockout { failed: 1, locked_until: None });
    }

    #[test]
    fn zero_attempts_disables() {
        let p = LockoutPolicy { attempts: 0, ..policy() };
        let s = p.after_failure(100, Some(0), 1);
        assert_eq!(s.locked_until, None);
        assert_eq!(p.locked_until(Some(i64::MAX), 0), None);
    }
}
