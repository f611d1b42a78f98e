//! Prometheus metrics (`GET /hub/metrics`): JupyterHub's metric names where
//! JupyterHub has them (`jupyterhub_total_users`, `_running_servers`,
//! `_active_users{period}`, `_server_spawn_duration_seconds{status,reason}`),
//! and berth's own: proxied requests, the GPUs (utilisation and memory per
//! GPU, labelled with who holds it), the GPU queue, culls by reason.
//!
//! Who may read them: a caller with `read:metrics` (admins hold it), or
//! anyone connecting from an address in `metrics.allowed_addresses` (the
//! peer address the listener saw, never a header). Counters the hot paths
//! bump are atomics ([`Counters`]); everything else is read at scrape time.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use berth_core::net::Cidr;
use berth_core::{ServerState, Target};
use serde::{Deserialize, Serialize};

use crate::error::{HubError, HubResult};
use crate::identity::Caller;
use crate::telemetry::SampleState;
use crate::Hub;

/// The `[metrics]` section of berth's configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Addresses or CIDR ranges that may read `/hub/metrics` without a
    /// credential (a Prometheus server on the same network).
    pub allowed_addresses: Vec<String>,
}

impl MetricsConfig {
    /// The allow list, or the first entry that is not an address or range.
    pub fn parse(&self) -> Result<Vec<Cidr>, String> {
        self.allowed_addresses.iter().map(|a| a.parse::<Cidr>()).collect()
    }
}

/// JupyterHub's spawn-duration buckets, in seconds (`+Inf` is implied).
const SPAWN_BUCKETS: [f64; 12] = [0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 180.0, 300.0, 600.0];

/// How a start ended, as JupyterHub labels its spawn histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpawnOutcome {
    Success,
    Failure,
    /// Refused: too many starts at once.
    Throttled,
    /// Refused: the hub runs its maximum of servers.
    TooManyUsers,
    /// Refused: the server is starting already.
    AlreadyPending,
}

impl SpawnOutcome {
    const ALL: [SpawnOutcome; 5] = [
        SpawnOutcome::Success,
        SpawnOutcome::Failure,
        SpawnOutcome::Throttled,
        SpawnOutcome::TooManyUsers,
        SpawnOutcome::AlreadyPending,
    ];

    fn labels(self) -> (&'static str, &'static str) {
        match self {
            SpawnOutcome::Success => ("success", ""),
            SpawnOutcome::Failure => ("failure", ""),
            SpawnOutcome::Throttled => ("failure", "throttled"),
            SpawnOutcome::TooManyUsers => ("failure", "too-many-users"),
            SpawnOutcome::AlreadyPending => ("failure", "already-pending"),
        }
    }

    /// The outcome of a start that `admit` refused, when JupyterHub names it.
    pub fn of_refusal(e: &HubError) -> Option<SpawnOutcome> {
        match e {
            HubError::TooManyStarting { .. } => Some(SpawnOutcome::Throttled),
            HubError::HubFull { .. } => Some(SpawnOutcome::TooManyUsers),
            HubError::PendingSpawn { .. } => Some(SpawnOutcome::AlreadyPending),
            _ => None,
        }
    }
}

#[derive(Default)]
struct Histogram {
    /// Observations per bucket (not cumulative); the last is beyond 600 s.
    buckets: [AtomicU64; SPAWN_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
    count: AtomicU64,
}

/// What the request and start paths count, without locks.
#[derive(Default)]
pub struct Counters {
    proxied: AtomicU64,
    spawns: [Histogram; SpawnOutcome::ALL.len()],
}

impl Counters {
    /// One request forwarded to a user's server.
    pub fn proxied(&self) {
        self.proxied.fetch_add(1, Ordering::Relaxed);
    }

    /// A start that ended (or was refused) after `took`.
    pub fn spawn(&self, outcome: SpawnOutcome, took: Duration) {
        let Some(i) = SpawnOutcome::ALL.iter().position(|o| *o == outcome) else { return };
        let h = &self.spawns[i];
        let secs = took.as_secs_f64();
        let b = SPAWN_BUCKETS.iter().position(|le| secs <= *le).unwrap_or(SPAWN_BUCKETS.len());
        h.buckets[b].fetch_add(1, Ordering::Relaxed);
        h.sum_micros.fetch_add(took.as_micros().min(u128::from(u64::MAX)) as u64, Ordering::Relaxed);
        h.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// Escapes a label value as the text format requires (`\`, `"`, newline).
pub fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// The text format, written family by family.
#[derive(Default)]
struct Text(String);

impl Text {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape_label(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {}", number(value));
    }
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

/// The reason code of a `cull` event: its detail's first word (`idle`,
/// `max-age`, …), so free text after it cannot multiply the series.
pub fn cull_reason(detail: &str) -> String {
    let word: String = detail
        .trim()
        .split(|c: char| c.is_whitespace() || matches!(c, ':' | ';' | ',' | '('))
        .next()
        .unwrap_or("")
        .chars()
        .take(32)
        .collect::<String>()
        .to_ascii_lowercase();
    if word.is_empty() {
        "unknown".into()
    } else {
        word
    }
}

/// One number out of a GPU's reading, for one metric family.
type ReadingOf = fn(&berth_core::gpu_smi::GpuReading) -> Option<f64>;

impl Hub {
    /// Whether `caller` (or, without one, the peer address) may read the metrics.
    pub fn may_read_metrics(&self, caller: Option<&Caller>, peer: Option<IpAddr>) -> HubResult<()> {
        if caller.is_some_and(|c| c.allows("read:metrics", Target::Hub)) {
            return Ok(());
        }
        if peer.is_some_and(|ip| self.metrics_allowed.iter().any(|n| n.contains(ip))) {
            return Ok(());
        }
        Err(HubError::missing_scope("read:metrics"))
    }

    /// The metrics in Prometheus' text format, for a caller allowed to read them.
    pub async fn metrics(&self, caller: Option<&Caller>, peer: Option<IpAddr>, now_ms: i64) -> HubResult<String> {
        self.may_read_metrics(caller, peer)?;
        let mut t = Text::default();

        let (users, total) =
            self.store.list_users(&berth_store::UserQuery { limit: i64::MAX, ..Default::default() }).await?;
        t.family("jupyterhub_total_users", "gauge", "Total number of users");
        t.sample("jupyterhub_total_users", &[], total as f64);
        t.family("jupyterhub_active_users", "gauge", "Number of users who were active in the given time period");
        for (period, days) in [("24h", 1), ("7d", 7), ("30d", 30)] {
            let since = now_ms - days * 86_400_000;
            let n = users.iter().filter(|u| u.last_activity.is_some_and(|a| a >= since)).count();
            t.sample("jupyterhub_active_users", &[("period", period)], n as f64);
        }
        let servers = self.store.list_servers(None).await?;
        t.family("jupyterhub_running_servers", "gauge", "The number of user servers currently running");
        let running = servers.iter().filter(|s| s.state == ServerState::Running).count();
        t.sample("jupyterhub_running_servers", &[], running as f64);

        let counters = &self.servers.counters;
        let name = "jupyterhub_server_spawn_duration_seconds";
        t.family(name, "histogram", "Time taken for server spawning operation");
        for (o, h) in SpawnOutcome::ALL.iter().zip(counters.spawns.iter()) {
            let (status, reason) = o.labels();
            let mut cumulative = 0u64;
            for (i, b) in h.buckets.iter().enumerate() {
                cumulative += b.load(Ordering::Relaxed);
                let le = SPAWN_BUCKETS.get(i).map(|v| number(*v)).unwrap_or_else(|| "+Inf".into());
                t.sample(
                    &format!("{name}_bucket"),
                    &[("status", status), ("reason", reason), ("le", &le)],
                    cumulative as f64,
                );
            }
            let labels = [("status", status), ("reason", reason)];
            t.sample(&format!("{name}_sum"), &labels, h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6);
            t.sample(&format!("{name}_count"), &labels, h.count.load(Ordering::Relaxed) as f64);
        }

        t.family(
            "berth_proxied_requests_total",
            "counter",
            "Requests the proxy forwarded to users' servers since berth started",
        );
        t.sample("berth_proxied_requests_total", &[], counters.proxied.load(Ordering::Relaxed) as f64);

        self.gpu_metrics(&mut t, now_ms).await?;

        let queue_len = self.servers.queue_len();
        t.family("berth_gpu_queue_length", "gauge", "Starts waiting in the GPU queue");
        t.sample("berth_gpu_queue_length", &[], queue_len as f64);

        let mut culls: BTreeMap<String, i64> = BTreeMap::new();
        for (detail, n) in self.store.count_events_by_detail("cull").await? {
            *culls.entry(cull_reason(&detail)).or_default() += n;
        }
        t.family("berth_culls_total", "counter", "Servers culled, by reason (from the event log)");
        for (reason, n) in &culls {
            t.sample("berth_culls_total", &[("reason", reason)], *n as f64);
        }
        Ok(t.0)
    }

    async fn gpu_metrics(&self, t: &mut Text, now_ms: i64) -> HubResult<()> {
        let gpus = &self.servers.gpus;
        let inventory = gpus.inventory();
        let allocations = self.store.gpu_allocations().await?;
        let snap = gpus.telemetry.snapshot(now_ms);
        let fresh = snap.state == SampleState::Ok;
        let held = inventory.iter().filter(|g| allocations.iter().any(|(d, _, _)| *d == g.id)).count();
        t.family("berth_gpus", "gauge", "GPUs in the inventory, free or held");
        t.sample("berth_gpus", &[("state", "free")], (inventory.len() - held) as f64);
        t.sample("berth_gpus", &[("state", "held")], held as f64);
        t.family(
            "berth_gpu_sampler_up",
            "gauge",
            "1 when the latest GPU sample is fresh; 0 when utilisation is unknown",
        );
        t.sample("berth_gpu_sampler_up", &[], if fresh { 1.0 } else { 0.0 });

        // One series per GPU; a shared GPU names its holders joined by commas.
        let mut rows = Vec::new();
        for g in &inventory {
            let mut users = Vec::new();
            let mut servers = Vec::new();
            for (_, u, s) in allocations.iter().filter(|(d, _, _)| *d == g.id) {
                users.push(u.as_str());
                servers.push(s.as_str());
            }
            let reading = if fresh { snap.gpu(&g.id) } else { None };
            let model = match reading {
                Some(r) if g.name == "configured" => r.name.clone(),
                _ => g.name.clone(),
            };
            rows.push((g.id.clone(), model, users.join(","), servers.join(","), reading.cloned()));
        }
        let families: [(&str, &str, ReadingOf); 3] = [
            ("berth_gpu_utilization_ratio", "GPU utilisation (0 to 1) from the latest sample", |r| {
                r.utilization_percent.map(|u| f64::from(u) / 100.0)
            }),
            ("berth_gpu_memory_used_bytes", "GPU memory in use", |r| r.memory_used_mib.map(|m| m as f64 * 1_048_576.0)),
            ("berth_gpu_memory_total_bytes", "GPU memory in all", |r| {
                r.memory_total_mib.map(|m| m as f64 * 1_048_576.0)
            }),
        ];
        for (name, help, value) in families {
            t.family(name, "gauge", help);
            for (id, model, user, server, reading) in &rows {
                if let Some(v) = reading.as_ref().and_then(value) {
                    t.sample(name, &[("gpu", id), ("name", model), ("user", user), ("server", server)], v);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn label_values_cannot_break_the_format() {
        assert_eq!(escape_label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label("x\ny"), "x\\ny");
        let mut t = Text::default();
        t.sample("m", &[("l", "}\"\n# HELP evil")], 1.0);
        assert_eq!(t.0, "m{l=\"}\\\"\\n# HELP evil\"} 1\n");
        assert_eq!(t.0.lines().count(), 1);
    }

    #[test]
    fn spawn_durations_land_in_jupyterhubs_buckets() {
        let c = Counters::default();
        c.spawn(SpawnOutcome::Success, Duration::from_millis(400));
        c.spawn(SpawnOutcome::Success, Duration::from_secs(3));
        c.spawn(SpawnOutcome::Success, Duration::from_secs(900));
        let h = &c.spawns[0];
        let counts: Vec<u64> = h.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        assert_eq!(counts[0], 1, "0.4 s ≤ 0.5");
        assert_eq!(counts[3], 1, "3 s ≤ 5");
        assert_eq!(counts[12], 1, "900 s only in +Inf");
        assert_eq!(h.count.load(Ordering::Relaxed), 3);
        assert_eq!(h.sum_micros.load(Ordering::Relaxed), 903_400_000);
    }

    #[test]
    fn refusals_are_labelled_as_jupyterhub_does() {
        let cases = [
            (HubError::TooManyStarting { limit: 2 }, Some(("failure", "throttled"))),
            (HubError::HubFull { limit: 9 }, Some(("failure", "too-many-users"))),
            (HubError::PendingSpawn { server: "a".into() }, Some(("failure", "already-pending"))),
            (HubError::GpusOff, None),
        ];
        for (e, want) in cases {
            assert_eq!(SpawnOutcome::of_refusal(&e).map(|o| o.labels()), want, "{e}");
        }
    }

    #[test]
    fn cull_reasons_are_codes() {
        let cases = [
            ("idle", "idle"),
            ("idle: no activity for 3600 s", "idle"),
            ("max-age 86400 s", "max-age"),
            ("", "unknown"),
            ("  GPU-idle, below 5 %", "gpu-idle"),
        ];
        for (detail, want) in cases {
            assert_eq!(cull_reason(detail), want, "{detail:?}");
        }
    }

    #[test]
    fn the_allow_list_parses_or_names_the_bad_entry() {
        let ok = MetricsConfig { allowed_addresses: vec!["127.0.0.1".into(), "10.0.0.0/8".into()] };
        assert_eq!(ok.parse().unwrap().len(), 2);
        let bad = MetricsConfig { allowed_addresses: vec!["10.0.0.0/8".into(), "prometheus".into()] };
        assert!(bad.parse().unwrap_err().contains("prometheus"));
    }
}
