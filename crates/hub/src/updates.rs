//! Image updates in place of Watchtower, safe by default: a check (on a
//! schedule, from `berth images check`, or the admin's templates page) asks
//! each image's registry for the digest its tag has now and compares it
//! with the engine's copy. What happens then is the template's policy (or
//! the global one): `notify` (the default) records that an update is
//! available and tells the admins and the owners of running servers on it
//! in the event log; `next-start` also pulls the tag anew, keeping the
//! engine's previous copy as `<repo>:berth-previous`, so the next start
//! runs the new image while running servers keep theirs; `when-idle` pulls
//! the same way and records a *move* for each running server on it, which
//! the hub carries out once that server is idle (see
//! [`crate::servers::moves`]: recreated on the new image, put back on the
//! previous one when it fails its readiness check). A check that fails (no
//! answer, 401, no manifest for this platform) is recorded and is an
//! event; no server is touched. An update that was rolled back is not
//! applied again until its tag moves on to another digest.
//!
//! A catalog template whose base changed is set aside (kept as its
//! previous image) and rebuilt on the new base right after the check, in
//! the background (a start meanwhile waits for that build; `berth images
//! check` waits for it before it exits).

use std::collections::HashMap;
use std::time::Duration;

use berth_spawner::RegistryImage;
use berth_store::ImageCheck;
use serde::{Deserialize, Serialize};

use crate::error::HubResult;
use crate::servers::Servers;

/// The key under which `docker.image` (what default servers run when it is
/// set) is checked.
pub const DOCKER_IMAGE: &str = "docker.image";

/// The `[images]` section of berth's configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ImagesConfig {
    /// What a check does when an image changed: `notify`, `next-start` or `when-idle`.
    pub policy: String,
    /// Per template, `id=policy` (`docker.image=…` for `docker.image`).
    pub template_policies: Vec<String>,
    /// When the daily check runs, `HH:MM` in UTC; empty: no scheduled check.
    pub check_at: String,
    /// `when-idle`: how long a server shows no sign of use before it is
    /// recreated on the updated image.
    #[serde(with = "berth_core::serde_secs")]
    pub idle_seconds: Duration,
}

impl Default for ImagesConfig {
    fn default() -> Self {
        ImagesConfig {
            policy: "notify".into(),
            template_policies: Vec::new(),
            check_at: "00:00".into(),
            idle_seconds: Duration::from_secs(1800),
        }
    }
}

/// What a check does about a changed image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Notify,
    NextStart,
    WhenIdle,
}

impl Policy {
    pub fn parse(s: &str) -> Result<Policy, String> {
        match s.trim() {
            "notify" => Ok(Policy::Notify),
            "next-start" => Ok(Policy::NextStart),
            "when-idle" => Ok(Policy::WhenIdle),
            other => Err(format!("{other:?} is not a policy (`notify`, `next-start` or `when-idle`)")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Notify => "notify",
            Policy::NextStart => "next-start",
            Policy::WhenIdle => "when-idle",
        }
    }
}

/// The `[images]` section, read.
#[derive(Debug, Clone)]
pub struct Updates {
    global: Policy,
    per_template: HashMap<String, Policy>,
    /// Minutes after midnight UTC of the daily check.
    at: Option<u32>,
    /// `docker.image`, when set.
    docker_image: String,
    /// `when-idle`: the idle time before a move.
    idle: Duration,
    /// One check at a time.
    running: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl Default for Updates {
    fn default() -> Self {
        Updates {
            global: Policy::Notify,
            per_template: HashMap::new(),
            at: None,
            docker_image: String::new(),
            idle: ImagesConfig::default().idle_seconds,
            running: Default::default(),
        }
    }
}

impl Updates {
    /// Reads `cfg`; the error names what is wrong (the key is the caller's).
    pub fn new(cfg: &ImagesConfig, docker_image: &str) -> Result<Updates, (&'static str, String)> {
        let global = Policy::parse(&cfg.policy).map_err(|m| ("images.policy", m))?;
        let mut per_template = HashMap::new();
        for entry in cfg.template_policies.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            let (id, p) = entry
                .split_once('=')
                .ok_or(("images.template_policies", format!("{entry:?} is not `template=policy`")))?;
            let p = Policy::parse(p).map_err(|m| ("images.template_policies", format!("{entry:?}: {m}")))?;
            per_template.insert(id.trim().to_string(), p);
        }
        let at = parse_at(&cfg.check_at).map_err(|m| ("images.check_at", m))?;
        Ok(Updates {
            global,
            per_template,
            at,
            docker_image: docker_image.to_string(),
            idle: cfg.idle_seconds,
            running: Default::default(),
        })
    }

    /// `when-idle`: how long a server must have shown no sign of use.
    pub fn idle(&self) -> Duration {
        self.idle
    }

    pub fn policy(&self, template: &str) -> Policy {
        self.per_template.get(template).copied().unwrap_or(self.global)
    }

    /// Whether a scheduled check runs.
    pub fn scheduled(&self) -> bool {
        self.at.is_some()
    }

    /// Time from `now_ms` (unix ms) until the next scheduled check.
    pub fn until_next(&self, now_ms: i64) -> Option<Duration> {
        let at = i64::from(self.at?) * 60_000;
        let day = 86_400_000;
        let today = now_ms.rem_euclid(day);
        let wait = if at > today { at - today } else { day - today + at };
        Some(Duration::from_millis(wait.max(1) as u64))
    }
}

/// `HH:MM` → minutes after midnight; empty → none.
fn parse_at(s: &str) -> Result<Option<u32>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    let bad = || format!("{s:?} is not a time `HH:MM` (UTC), or empty for no scheduled check");
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 23 || m > 59 {
        return Err(bad());
    }
    Ok(Some(h * 60 + m))
}

/// The image a catalog template's Dockerfile starts `FROM`.
fn base_of(build: &[(String, String)]) -> Option<String> {
    let (_, dockerfile) = build.iter().find(|(p, _)| p == "Dockerfile")?;
    dockerfile.lines().map(str::trim).find_map(|l| {
        let rest = l.strip_prefix("FROM ").or_else(|| l.strip_prefix("from "))?;
        rest.split_whitespace().find(|w| !w.starts_with("--")).map(str::to_string)
    })
}

/// Where the previous copy of `image` is kept.
pub fn previous_tag(image: &str) -> String {
    let slash = image.rfind('/').map(|i| i + 1).unwrap_or(0);
    let repo = match image[slash..].rfind(':') {
        Some(i) => &image[..slash + i],
        None => image,
    };
    format!("{repo}:berth-previous")
}

/// One thing a check looks at.
struct Target {
    template: String,
    image: String,
    /// For a catalog template built from `image` (its base): the
    /// template's own image.
    built: Option<String>,
}

impl Target {
    /// The image its servers run.
    fn runs(&self) -> &str {
        self.built.as_deref().unwrap_or(&self.image)
    }
}

/// Whether `s` runs `template` (`docker.image`: a server of no template
/// that named no image of its own).
pub(crate) fn runs_template(s: &berth_store::Server, template: &str) -> bool {
    if template == DOCKER_IMAGE {
        s.template.is_empty() && crate::servers::UserOptions::from_record(&s.user_options).image.is_none()
    } else {
        s.template == template
    }
}

impl Servers {
    /// What to check: `docker.image` when set, then every template's image
    /// (or, for one built from the catalog, its base).
    fn update_targets(&self) -> Vec<Target> {
        let mut out = Vec::new();
        if !self.updates.docker_image.is_empty() {
            out.push(Target { template: DOCKER_IMAGE.into(), image: self.updates.docker_image.clone(), built: None });
        }
        let mut list: Vec<&berth_core::HubTemplate> = self.templates.templates().iter().collect();
        if let Some(d) = self.templates.default_template() {
            if !list.iter().any(|t| t.id == d.id) {
                list.insert(0, d);
            }
        }
        for t in list {
            if t.build.is_empty() {
                out.push(Target { template: t.id.clone(), image: t.image.clone(), built: None });
            } else if let Some(base) = base_of(&t.build) {
                out.push(Target { template: t.id.clone(), image: base, built: Some(t.image.clone()) });
            }
        }
        out
    }

    /// The last check of each template, as recorded.
    pub async fn image_checks(&self) -> HubResult<Vec<ImageCheck>> {
        Ok(self.store.image_checks().await?)
    }

    /// [`Servers::check_images`] asked for by `caller` (the templates page's
    /// button): admins only (`admin:servers`).
    pub async fn check_images_for(
        self: &std::sync::Arc<Self>,
        caller: &crate::identity::Caller,
    ) -> HubResult<Vec<ImageCheck>> {
        caller.require("admin:servers", berth_core::Target::Hub)?;
        self.check_images(caller.name()).await
    }

    /// Checks every image in use against its registry and acts on each by
    /// its policy; `actor` (an admin, or `berth` for the schedule) is named
    /// in the events. One check at a time: a second waits for the first.
    pub async fn check_images(self: &std::sync::Arc<Self>, actor: &str) -> HubResult<Vec<ImageCheck>> {
        let running = self.updates.running.clone();
        let _one = running.lock().await;
        let servers = self.store.list_servers(None).await?;
        let earlier: HashMap<String, ImageCheck> =
            self.store.image_checks().await?.into_iter().map(|c| (c.template.clone(), c)).collect();
        let mut out = Vec::new();
        // An image two templates share is asked for once, and pulled once.
        let mut asked: HashMap<String, Result<RegistryImage, String>> = HashMap::new();
        let mut pulled: HashMap<String, Result<String, String>> = HashMap::new();
        let mut rebuild = Vec::new();
        for t in self.update_targets() {
            let mut c = ImageCheck {
                template: t.template.clone(),
                image: t.image.clone(),
                checked: berth_store::now_ms(),
                status: String::new(),
                local_digest: String::new(),
                remote_digest: String::new(),
                message: String::new(),
            };
            let subject = &t.template;
            if !asked.contains_key(&t.image) {
                let r = self.spawner.registry_image(&t.image).await.map_err(|e| e.to_string());
                asked.insert(t.image.clone(), r);
            }
            let answer = asked.get(&t.image).cloned().unwrap_or_else(|| Err("not asked".into()));
            match answer {
                Err(e) => {
                    c.status = "failed".into();
                    c.message = format!("no server touched: {e}");
                    tracing::warn!(template = %t.template, image = %t.image, error = %e, "image check failed");
                    let _ = self.store.add_event(actor, "image-check-failed", subject, &c.message).await;
                }
                Ok(r) if r.current() => {
                    c.status = "current".into();
                    c.local_digest = r.local_digest.unwrap_or_default();
                    c.remote_digest = r.remote_digest;
                    c.message = "up to date".into();
                }
                Ok(r) => {
                    c.local_digest = r.local_digest.clone().unwrap_or_default();
                    c.remote_digest = r.remote_digest.clone();
                    let policy = self.updates.policy(&t.template);
                    let was = r.local_digest.as_deref().unwrap_or("nothing");
                    let rejected = earlier
                        .get(&t.template)
                        .filter(|e| e.status == "rolled-back" && e.remote_digest == r.remote_digest);
                    if let Some(e) = rejected {
                        // Known to fail: not applied again until the tag moves on.
                        c.status = "rolled-back".into();
                        c.message = e.message.clone();
                    } else if policy == Policy::Notify {
                        c.status = "available".into();
                        c.message = format!(
                            "an update is available: {}{} is {} in its registry, {was} here",
                            if t.built.is_some() { "its base " } else { "" },
                            t.image,
                            r.remote_digest
                        );
                        let _ = self.store.add_event(actor, "image-update-available", subject, &c.message).await;
                        self.tell_owners(&servers, &t.template, &c.message).await;
                    } else {
                        let previous = previous_tag(&t.image);
                        if !pulled.contains_key(&t.image) {
                            let r = self.spawner.update_image(&t.image, &previous).await.map_err(|e| e.to_string());
                            pulled.insert(t.image.clone(), r);
                        }
                        let pull = pulled.get(&t.image).cloned().unwrap_or_else(|| Err("not pulled".into()));
                        let updated = match pull {
                            // A template built on the base is set aside (kept
                            // as its previous image) so its next start
                            // builds it on the new base.
                            Ok(now) => match &t.built {
                                Some(own) => self
                                    .spawner
                                    .set_aside_image(own, &previous_tag(own))
                                    .await
                                    .map(|()| now)
                                    .map_err(|e| e.to_string()),
                                None => Ok(now),
                            },
                            Err(e) => Err(e),
                        };
                        match updated {
                            Ok(now) => {
                                c.status = "updated".into();
                                c.local_digest = now.clone();
                                c.message = match &t.built {
                                    Some(own) => format!(
                                        "updated its base {} to {now} (was {was}; kept as {previous}); {own} is kept as {} and rebuilt on the new base now (a start meanwhile waits for the build); running servers keep theirs",
                                        t.image,
                                        previous_tag(own)
                                    ),
                                    None => format!(
                                        "updated {} to {now} (was {was}; kept as {previous}); the next start runs it, running servers keep theirs",
                                        t.image
                                    ),
                                };
                                if policy == Policy::WhenIdle {
                                    let moves = self.record_moves(&servers, &t, &now).await;
                                    c.message = format!(
                                        "{}; {moves} running on it {} recreated on it once idle for {} (a busy server is never interrupted)",
                                        c.message.trim_end_matches("; running servers keep theirs"),
                                        if moves == 1 { "is" } else { "are" },
                                        crate::cull::human(self.updates.idle()),
                                    );
                                }
                                tracing::info!(template = %t.template, image = %t.image, digest = %now, "image updated");
                                if t.built.is_some() {
                                    rebuild.push(t.template.clone());
                                }
                                let _ = self.store.add_event(actor, "image-updated", subject, &c.message).await;
                                self.tell_owners(&servers, &t.template, &c.message).await;
                            }
                            Err(e) => {
                                c.status = "failed".into();
                                c.message = format!("an update is available but pulling it failed: {e}");
                                tracing::warn!(template = %t.template, image = %t.image, error = %e, "image update failed");
                                let _ = self.store.add_event(actor, "image-update-failed", subject, &c.message).await;
                            }
                        }
                    }
                }
            }
            self.store.set_image_check(&c).await?;
            out.push(c);
        }
        self.refresh_update_notices().await;
        for id in rebuild {
            let me = self.clone();
            let span = tracing::info_span!("rebuild", template = %id);
            self.track(
                async move {
                    let state = me.build_template_image(&id).await;
                    tracing::info!(template = %id, ?state, "rebuilt on the updated base");
                },
                span,
            );
        }
        Ok(out)
    }

    /// `when-idle`: a move for each running server on `t`, waiting for it
    /// to be idle; how many.
    async fn record_moves(&self, servers: &[berth_store::Server], t: &Target, digest: &str) -> usize {
        let now = berth_store::now_ms();
        let mut n = 0;
        for s in servers.iter().filter(|s| s.state == berth_core::ServerState::Running && runs_template(s, &t.template))
        {
            let m = berth_store::ImageMove {
                user: s.user.clone(),
                server: s.name.clone(),
                template: t.template.clone(),
                image: t.runs().to_string(),
                previous: previous_tag(t.runs()),
                digest: digest.to_string(),
                phase: "waiting".into(),
                detail: String::new(),
                created: now,
            };
            match self.store.put_image_move(&m).await {
                Ok(()) => n += 1,
                Err(e) => {
                    tracing::error!(user = %s.user, server = %s.name, error = %e, "could not record an image move")
                }
            }
        }
        n
    }

    /// An event for each owner of a running server on `template`.
    async fn tell_owners(&self, servers: &[berth_store::Server], template: &str, message: &str) {
        let on = |s: &&berth_store::Server| {
            matches!(s.state, berth_core::ServerState::Running | berth_core::ServerState::Starting)
                && runs_template(s, template)
        };
        for s in servers.iter().filter(on) {
            let server = if s.name.is_empty() { s.user.clone() } else { format!("{}/{}", s.user, s.name) };
            let _ = self.store.add_event(&s.user, "image-update-available", &server, message).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies() {
        let cfg = ImagesConfig {
            policy: "notify".into(),
            template_policies: vec!["lab=next-start".into(), " ".into()],
            check_at: "00:00".into(),
            ..Default::default()
        };
        let u = Updates::new(&cfg, "").unwrap();
        assert_eq!(u.policy("lab"), Policy::NextStart);
        assert_eq!(u.policy("other"), Policy::Notify);
        let idle = ImagesConfig { policy: "when-idle".into(), ..Default::default() };
        assert_eq!(Updates::new(&idle, "").unwrap().policy("lab"), Policy::WhenIdle);
        for (policy, templates, at, key) in [
            ("sometimes", vec![], "00:00", "images.policy"),
            ("notify", vec!["lab"], "00:00", "images.template_policies"),
            ("notify", vec!["lab=never"], "00:00", "images.template_policies"),
            ("notify", vec![], "24:00", "images.check_at"),
            ("notify", vec![], "noon", "images.check_at"),
        ] {
            let cfg = ImagesConfig {
                policy: policy.into(),
                template_policies: templates.into_iter().map(String::from).collect(),
                check_at: at.into(),
                ..Default::default()
            };
            assert_eq!(Updates::new(&cfg, "").map(|_| ()).unwrap_err().0, key, "{policy} {at}");
        }
    }

    #[test]
    fn schedule() {
        let u = Updates::new(&ImagesConfig::default(), "").unwrap();
        let day = 86_400_000i64;
        // 23:00 UTC → one hour to midnight; exactly midnight → a whole day.
        assert_eq!(u.until_next(10 * day + 23 * 3_600_000), Some(Duration::from_secs(3600)));
        assert_eq!(u.until_next(10 * day), Some(Duration::from_secs(86_400)));
        let at = Updates::new(&ImagesConfig { check_at: "03:30".into(), ..Default::default() }, "").unwrap();
        assert_eq!(at.until_next(10 * day + 3_600_000), Some(Duration::from_secs(9000)));
        let off = Updates::new(&ImagesConfig { check_at: String::new(), ..Default::default() }, "").unwrap();
        assert!(!off.scheduled() && off.until_next(0).is_none());
    }

    #[test]
    fn bases_and_previous_tags() {
        let b = vec![(
            "Dockerfile".to_string(),
            "# x\nFROM --platform=linux/amd64 127.0.0.1:5000/base:1 AS b\nRUN x\n".to_string(),
        )];
        assert_eq!(base_of(&b).as_deref(), Some("127.0.0.1:5000/base:1"));
        assert_eq!(base_of(&[]), None);
        assert_eq!(previous_tag("127.0.0.1:5000/x/y:stable"), "127.0.0.1:5000/x/y:berth-previous");
        assert_eq!(previous_tag("127.0.0.1:5000/x"), "127.0.0.1:5000/x:berth-previous");
        assert_eq!(previous_tag("ubuntu:22.04"), "ubuntu:berth-previous");
    }
}
