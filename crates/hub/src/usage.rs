//! Usage accounting: GPU-hours and server-hours per user per period
//! (`usage.period`: a UTC calendar month, an ISO week from Monday, or a UTC
//! day), summed from the store's ledger of intervals (`berth_store::usage`),
//! with open intervals counted up to now; and the optional GPU-hour quota
//! (`usage.gpu_hours_per_period`, or the user's own limit), enforced when a
//! start asks for GPUs.
//!
//! The arithmetic is pure ([`Period::bounds`], [`sum_ms`]) and tested on
//! recorded intervals; reads and the quota check go through [`Usage`].

use berth_core::Target;
use berth_store::{Store, UsageInterval, UsageKind};
use serde::{Deserialize, Serialize};
use time::{Date, Duration as TimeDuration, Month, OffsetDateTime, Time};

use crate::error::{HubError, HubResult};
use crate::identity::Caller;

/// The `[usage]` section of berth's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsageConfig {
    /// `month` (the default), `week` (from Monday) or `day`, in UTC.
    pub period: String,
    /// GPU-hours each user may use per period; 0 means unlimited. A user's
    /// own limit (`PUT /hub/api/users/<name>/limits`) takes its place.
    pub gpu_hours_per_period: f64,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig { period: "month".into(), gpu_hours_per_period: 0.0 }
    }
}

/// How usage is grouped in time; every boundary is midnight UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Day,
    Week,
    Month,
}

const MS_PER_HOUR: f64 = 3_600_000.0;

impl Period {
    pub fn parse(s: &str) -> Option<Period> {
        match s.trim().to_ascii_lowercase().as_str() {
            "day" => Some(Period::Day),
            "week" => Some(Period::Week),
            "month" => Some(Period::Month),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }

    /// "this month", "this week", "today".
    pub fn this(self) -> &'static str {
        match self {
            Period::Day => "today",
            Period::Week => "this week",
            Period::Month => "this month",
        }
    }

    /// `[start, end)` in unix milliseconds of the period `back` periods
    /// before the one that holds `now_ms` (0: the current one).
    pub fn bounds(self, now_ms: i64, back: u32) -> (i64, i64) {
        let now = OffsetDateTime::from_unix_timestamp_nanos(i128::from(now_ms) * 1_000_000)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let today = now.date();
        let (start, end) = match self {
            Period::Day => {
                let s = today - TimeDuration::days(i64::from(back));
                (s, s + TimeDuration::days(1))
            }
            Period::Week => {
                let monday = today - TimeDuration::days(i64::from(today.weekday().number_days_from_monday()));
                let s = monday - TimeDuration::weeks(i64::from(back));
                (s, s + TimeDuration::weeks(1))
            }
            Period::Month => {
                let months = i64::from(today.year()) * 12 + i64::from(today.month() as u8) - 1 - i64::from(back);
                (first_of(months), first_of(months + 1))
            }
        };
        (midnight_ms(start), midnight_ms(end))
    }
}

/// The first day of the month numbered `year * 12 + month0`.
fn first_of(months: i64) -> Date {
    let year = months.div_euclid(12) as i32;
    let month = Month::try_from((months.rem_euclid(12) + 1) as u8).unwrap_or(Month::January);
    Date::from_calendar_date(year, month, 1).unwrap_or(Date::MIN)
}

fn midnight_ms(d: Date) -> i64 {
    (d.with_time(Time::MIDNIGHT).assume_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// `2027-01-01T00:00:00Z`.
pub fn iso_utc(ms: i64) -> String {
    let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// `2027-01-01 00:00 UTC`, as messages say it.
pub fn when_utc(ms: i64) -> String {
    let iso = iso_utc(ms);
    format!("{} UTC", iso.get(..16).unwrap_or(&iso).replace('T', " "))
}

/// Milliseconds of `kind` the intervals cover within `[from, to)`, open
/// intervals counting up to `now`. Intervals of several GPUs add up (two
/// GPUs for an hour are two GPU-hours).
pub fn sum_ms(intervals: &[UsageInterval], kind: UsageKind, from: i64, to: i64, now: i64) -> i64 {
    intervals
        .iter()
        .filter(|i| i.kind == kind)
        .map(|i| {
            let end = i.ended.unwrap_or(now).min(to).min(now.max(i.started));
            let start = i.started.max(from);
            (end - start).max(0)
        })
        .sum()
}

/// Hours as messages show them: at most four decimals, no trailing zeros
/// (`10`, `0.0003`, `2.5`).
pub fn hours_text(h: f64) -> String {
    let s = format!("{:.4}", (h * 10_000.0).round() / 10_000.0);
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.to_string()
    }
}

/// One period's usage.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeriodUsage {
    /// `2026-12-01T00:00:00Z`
    pub start: String,
    /// The first instant after the period.
    pub end: String,
    pub start_ms: i64,
    pub end_ms: i64,
    pub current: bool,
    pub gpu_hours: f64,
    pub server_hours: f64,
}

/// A user's quota in the current period.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuotaView {
    pub gpu_hours: f64,
    pub used_gpu_hours: f64,
    pub left_gpu_hours: f64,
    /// When the next period starts.
    pub renews: String,
    pub renews_ms: i64,
    /// `user` (the user's own limit) or `hub` (`usage.gpu_hours_per_period`).
    pub source: &'static str,
}

/// A user's usage, current period first (`GET /hub/api/users/<name>/usage`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UserUsage {
    pub user: String,
    pub period: Period,
    /// `None`: unlimited.
    pub quota: Option<QuotaView>,
    pub periods: Vec<PeriodUsage>,
}

/// Most periods one answer covers.
pub const MAX_PERIODS: u32 = 24;

pub struct Usage {
    pub cfg: UsageConfig,
    pub period: Period,
    store: Store,
}

impl Usage {
    pub fn new(cfg: UsageConfig, store: Store) -> Usage {
        let period = Period::parse(&cfg.period).unwrap_or(Period::Month);
        Usage { cfg, period, store }
    }

    /// The GPU-hour quota that applies to `user` and where it comes from;
    /// `None` when unlimited.
    pub async fn quota_of(&self, user: &str) -> HubResult<Option<(f64, &'static str)>> {
        Ok(self.effective(self.store.user_limits(user).await?.gpu_hours_per_period))
    }

    /// The quota given the user's own limit (`None`: the hub's).
    fn effective(&self, own: Option<f64>) -> Option<(f64, &'static str)> {
        let (q, source) = match own {
            Some(q) => (q, "user"),
            None => (self.cfg.gpu_hours_per_period, "hub"),
        };
        (q.is_finite() && q > 0.0).then_some((q, source))
    }

    /// `user`'s usage in the current period and the `periods - 1` before it,
    /// from `intervals` (which must cover them).
    fn summarise(&self, user: &str, intervals: &[UsageInterval], periods: u32, now: i64) -> Vec<PeriodUsage> {
        let mine: Vec<UsageInterval> = intervals.iter().filter(|i| i.user == user).cloned().collect();
        (0..periods.clamp(1, MAX_PERIODS))
            .map(|back| {
                let (from, to) = self.period.bounds(now, back);
                PeriodUsage {
                    start: iso_utc(from),
                    end: iso_utc(to),
                    start_ms: from,
                    end_ms: to,
                    current: back == 0,
                    gpu_hours: sum_ms(&mine, UsageKind::Gpu, from, to, now) as f64 / MS_PER_HOUR,
                    server_hours: sum_ms(&mine, UsageKind::Server, from, to, now) as f64 / MS_PER_HOUR,
                }
            })
            .collect()
    }

    fn quota_view(&self, quota: Option<(f64, &'static str)>, current: &PeriodUsage) -> Option<QuotaView> {
        quota.map(|(q, source)| QuotaView {
            gpu_hours: q,
            used_gpu_hours: current.gpu_hours,
            left_gpu_hours: (q - current.gpu_hours).max(0.0),
            renews: current.end.clone(),
            renews_ms: current.end_ms,
            source,
        })
    }

    async fn of_user(&self, user: &str, periods: u32, now: i64) -> HubResult<UserUsage> {
        let periods = periods.clamp(1, MAX_PERIODS);
        let (from, _) = self.period.bounds(now, periods - 1);
        let (_, to) = self.period.bounds(now, 0);
        let intervals = self.store.usage_intervals(Some(user), from, to).await?;
        let list = self.summarise(user, &intervals, periods, now);
        let quota = self.quota_of(user).await?;
        let quota = list.first().and_then(|c| self.quota_view(quota, c));
        Ok(UserUsage { user: user.to_string(), period: self.period, quota, periods: list })
    }

    /// `user`'s usage as `caller` may see it: their own, or with `read:users` on them.
    pub async fn view(&self, caller: &Caller, user: &str, periods: u32, now: i64) -> HubResult<UserUsage> {
        caller.require("read:users", Target::User(user))?;
        if self.store.get_user(user).await?.is_none() {
            return Err(HubError::NoSuchUser { user: user.into() });
        }
        self.of_user(user, periods, now).await
    }

    /// Every user's usage (`read:users` on the whole hub: admins).
    pub async fn view_all(&self, caller: &Caller, periods: u32, now: i64) -> HubResult<Vec<UserUsage>> {
        caller.require("read:users", Target::Hub)?;
        self.all(periods, now).await
    }

    /// Every user's usage, for the admin page and the metrics.
    pub async fn all(&self, periods: u32, now: i64) -> HubResult<Vec<UserUsage>> {
        let periods = periods.clamp(1, MAX_PERIODS);
        let (from, _) = self.period.bounds(now, periods - 1);
        let (_, to) = self.period.bounds(now, 0);
        let intervals = self.store.usage_intervals(None, from, to).await?;
        let (users, _) =
            self.store.list_users(&berth_store::UserQuery { limit: i64::MAX, ..Default::default() }).await?;
        let own = self.store.gpu_hour_limits().await?;
        let mut out = Vec::with_capacity(users.len());
        for u in users {
            let list = self.summarise(&u.name, &intervals, periods, now);
            let quota = self.effective(own.get(&u.name).copied());
            let quota = list.first().and_then(|c| self.quota_view(quota, c));
            out.push(UserUsage { user: u.name, period: self.period, quota, periods: list });
        }
        Ok(out)
    }

    /// Sets `user`'s own GPU-hour limit (`None`: the hub's; 0: unlimited),
    /// keeping their other limits; `admin:users` on them.
    pub async fn set_user_quota(&self, caller: &Caller, user: &str, hours: Option<f64>) -> HubResult<()> {
        caller.require("admin:users", Target::User(user))?;
        if let Some(h) = hours {
            if !h.is_finite() || h < 0.0 {
                return Err(HubError::BadQuota { hours: h.to_string() });
            }
        }
        if self.store.get_user(user).await?.is_none() {
            return Err(HubError::NoSuchUser { user: user.into() });
        }
        let mut limits = self.store.user_limits(user).await?;
        limits.gpu_hours_per_period = hours;
        self.store.set_user_limits(user, &limits).await?;
        let detail =
            hours.map(|h| format!("gpu_hours_per_period={h}")).unwrap_or_else(|| "gpu_hours_per_period=hub".into());
        let _ = self.store.add_event(caller.name(), "limits", user, &detail).await;
        Ok(())
    }

    /// Refuses a start that asks for GPUs when `user` has used their
    /// quota for this period, saying what was used, what is left and when
    /// it renews.
    pub async fn check_quota(&self, user: &str, now: i64) -> HubResult<()> {
        let Some((quota, _)) = self.quota_of(user).await? else { return Ok(()) };
        let (from, to) = self.period.bounds(now, 0);
        let intervals = self.store.usage_intervals(Some(user), from, to).await?;
        let used = sum_ms(&intervals, UsageKind::Gpu, from, to, now) as f64 / MS_PER_HOUR;
        if used >= quota {
            return Err(HubError::GpuQuota {
                user: user.to_string(),
                used_hours: used,
                quota_hours: quota,
                period: self.period,
                renews_ms: to,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Unix milliseconds of a UTC date and time.
    fn at(y: i32, m: u8, d: u8, h: u8, min: u8) -> i64 {
        let date = Date::from_calendar_date(y, Month::try_from(m).unwrap(), d).unwrap();
        let t = Time::from_hms(h, min, 0).unwrap();
        (date.with_time(t).assume_utc().unix_timestamp_nanos() / 1_000_000) as i64
    }

    const H: i64 = 3_600_000;

    fn gpu(start: i64, end: Option<i64>, device: &str) -> UsageInterval {
        UsageInterval {
            user: "alice".into(),
            server: String::new(),
            kind: UsageKind::Gpu,
            device: device.into(),
            started: start,
            ended: end,
        }
    }

    #[test]
    fn periods_have_utc_calendar_boundaries() {
        let now = at(2026, 12, 2, 15, 30); // a Wednesday
        let cases: &[(Period, u32, (i64, i64))] = &[
            (Period::Month, 0, (at(2026, 12, 1, 0, 0), at(2027, 1, 1, 0, 0))),
            (Period::Month, 1, (at(2026, 11, 1, 0, 0), at(2026, 12, 1, 0, 0))),
            (Period::Month, 12, (at(2025, 12, 1, 0, 0), at(2026, 1, 1, 0, 0))),
            (Period::Month, 13, (at(2025, 11, 1, 0, 0), at(2025, 12, 1, 0, 0))),
            (Period::Week, 0, (at(2026, 11, 30, 0, 0), at(2026, 12, 7, 0, 0))),
            (Period::Week, 1, (at(2026, 11, 23, 0, 0), at(2026, 11, 30, 0, 0))),
            (Period::Day, 0, (at(2026, 12, 2, 0, 0), at(2026, 12, 3, 0, 0))),
            (Period::Day, 2, (at(2026, 11, 30, 0, 0), at(2026, 12, 1, 0, 0))),
        ];
        for (p, back, want) in cases {
            assert_eq!(p.bounds(now, *back), *want, "{p:?} back {back}");
        }
        // A Monday at midnight starts its own week; February of a leap year ends on the 29th.
        assert_eq!(Period::Week.bounds(at(2026, 11, 30, 0, 0), 0).0, at(2026, 11, 30, 0, 0));
        assert_eq!(Period::Month.bounds(at(2028, 2, 29, 23, 59), 0), (at(2028, 2, 1, 0, 0), at(2028, 3, 1, 0, 0)));
        assert_eq!(Period::Week.bounds(at(2026, 12, 6, 23, 59), 0).0, at(2026, 11, 30, 0, 0), "Sunday ends the week");
    }

    #[test]
    fn recorded_intervals_sum_within_the_period() {
        let (from, to) = (at(2026, 12, 1, 0, 0), at(2027, 1, 1, 0, 0));
        let now = at(2026, 12, 2, 12, 0);
        let cases: &[(&str, Vec<UsageInterval>, i64)] = &[
            ("nothing", vec![], 0),
            ("one closed hour", vec![gpu(at(2026, 12, 1, 9, 0), Some(at(2026, 12, 1, 10, 0)), "g0")], H),
            (
                "two GPUs at once add up",
                vec![
                    gpu(at(2026, 12, 1, 9, 0), Some(at(2026, 12, 1, 10, 0)), "g0"),
                    gpu(at(2026, 12, 1, 9, 0), Some(at(2026, 12, 1, 10, 0)), "g1"),
                ],
                2 * H,
            ),
            (
                "begun last month: only this month's part",
                vec![gpu(at(2026, 11, 30, 22, 0), Some(at(2026, 12, 1, 1, 0)), "g0")],
                H,
            ),
            ("open: counts up to now", vec![gpu(at(2026, 12, 2, 10, 0), None, "g0")], 2 * H),
            ("open since last month", vec![gpu(at(2026, 11, 30, 0, 0), None, "g0")], 36 * H),
            ("ended before the period", vec![gpu(at(2026, 11, 3, 0, 0), Some(at(2026, 11, 4, 0, 0)), "g0")], 0),
            ("empty interval", vec![gpu(at(2026, 12, 1, 9, 0), Some(at(2026, 12, 1, 9, 0)), "g0")], 0),
            ("a start in the future (clock skew) counts nothing", vec![gpu(now + H, None, "g0")], 0),
        ];
        for (what, intervals, want) in cases {
            assert_eq!(sum_ms(intervals, UsageKind::Gpu, from, to, now), *want, "{what}");
        }
        let mut server = gpu(at(2026, 12, 1, 9, 0), Some(at(2026, 12, 1, 12, 0)), "");
        server.kind = UsageKind::Server;
        assert_eq!(sum_ms(&[server.clone()], UsageKind::Gpu, from, to, now), 0, "server time is no GPU time");
        assert_eq!(sum_ms(&[server], UsageKind::Server, from, to, now), 3 * H);
        // A past period: open intervals count up to its end, not to now.
        let (pf, pt) = (at(2026, 11, 1, 0, 0), at(2026, 12, 1, 0, 0));
        assert_eq!(sum_ms(&[gpu(at(2026, 11, 30, 23, 0), None, "g0")], UsageKind::Gpu, pf, pt, now), H);
    }

    #[test]
    fn hours_are_shown_briefly() {
        let cases: &[(f64, &str)] =
            &[(10.0, "10"), (0.0003, "0.0003"), (0.00034, "0.0003"), (2.5, "2.5"), (0.0, "0"), (9.99996, "10")];
        for (h, want) in cases {
            assert_eq!(hours_text(*h), *want, "{h}");
        }
        assert_eq!(when_utc(at(2027, 1, 1, 0, 0)), "2027-01-01 00:00 UTC");
        assert_eq!(iso_utc(at(2026, 12, 1, 0, 0)), "2026-12-01T00:00:00Z");
    }

    #[test]
    fn the_quota_message_says_used_left_and_renewal() {
        let e = HubError::GpuQuota {
            user: "alice".into(),
            used_hours: 10.0,
            quota_hours: 10.0,
            period: Period::Month,
            renews_ms: at(2027, 1, 1, 0, 0),
        };
        assert_eq!(
            e.to_string(),
            "alice has used 10.0 of 10 GPU-hours this month; 0 left; renews 2027-01-01 00:00 UTC"
        );
        let e = HubError::GpuQuota {
            user: "bob".into(),
            used_hours: 0.00031,
            quota_hours: 0.0003,
            period: Period::Day,
            renews_ms: at(2026, 12, 3, 0, 0),
        };
        assert_eq!(e.to_string(), "bob has used 0.0003 of 0.0003 GPU-hours today; 0 left; renews 2026-12-03 00:00 UTC");
    }
}
