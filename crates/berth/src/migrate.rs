//! `berth migrate jupyterhub`: moves a JupyterHub + DockerSpawner +
//! NativeAuthenticator deployment to berth. Accounts come from the hub's
//! database (NativeAuthenticator's `users_info`, bcrypt hashes kept until
//! each user's next log-in); each user's Docker volumes are adopted in
//! place: berth records which volume serves their home, workspace and cache
//! (and which one is shared), and its containers mount those. Nothing of the
//! old deployment is copied, renamed, changed or deleted, so going back is
//! starting it again.
//!
//! Planned first, printed, then applied (unless `--dry-run`), then printed
//! again. Running it twice does nothing the second time.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use berth_core::UserName;
use berth_spawner::DataRole;
use berth_spawner_docker::{own_volume, DockerSpawner, VolumeInfo};
use berth_store::{AdoptedVolume, NewUser, Store, StoreError};
use clap::{Args, Subcommand};
use serde::Serialize;
use sqlx::Row;

#[derive(Subcommand)]
pub(crate) enum MigrateCommand {
    /// From JupyterHub with DockerSpawner and NativeAuthenticator: accounts
    /// from its database, each user's volumes adopted in place.
    Jupyterhub(JupyterhubArgs),
}

#[derive(Args, Clone)]
pub(crate) struct JupyterhubArgs {
    /// JupyterHub's database (`jupyterhub.sqlite`; in the seed deployment
    /// it is in the `jupyterhub_data` volume, under `/data`). Only read.
    #[arg(long)]
    pub db: PathBuf,
    /// Say what would be done; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report as JSON (`{"before": …, "after": …}`).
    #[arg(long)]
    pub json: bool,
    /// Name of each user's home volume; `{username}` is the user's name as
    /// DockerSpawner escapes it. Empty: none adopted.
    #[arg(long, default_value = "jupyterlab-{username}_home")]
    pub home_volume: String,
    #[arg(long, default_value = "jupyterlab-{username}_workspace")]
    pub workspace_volume: String,
    #[arg(long, default_value = "jupyterlab-{username}_cache")]
    pub cache_volume: String,
    /// Where the home volume is mounted in berth's containers.
    #[arg(long, default_value = "/home")]
    pub home_mount: String,
    #[arg(long, default_value = "/home/lab/workspace")]
    pub workspace_mount: String,
    #[arg(long, default_value = "/home/lab/.cache")]
    pub cache_mount: String,
    /// The volume every server mounts (may be CIFS; adopted with its
    /// driver and options). Empty: none adopted.
    #[arg(long, default_value = "jupyterhub_shared")]
    pub shared_volume: String,
    #[arg(long, default_value = "/mnt/shared")]
    pub shared_mount: String,
    /// Also switch users who already have berth volumes of their own
    /// (`berth-<account>-home` …) to the old deployment's; those stay, unmounted.
    #[arg(long)]
    pub switch_existing: bool,
    /// An admin besides the hub's own admins (default: $JUPYTERHUB_ADMIN, as
    /// the seed deployment's `.env` sets it).
    #[arg(long, env = "JUPYTERHUB_ADMIN")]
    pub admin: Option<String>,
}

/// One account of the source hub, as NativeAuthenticator stores it.
#[derive(Debug, Clone)]
pub(crate) struct SourceAccount {
    pub name: String,
    pub hash: String,
    pub authorized: bool,
    pub admin: bool,
}

/// Reads NativeAuthenticator's `users_info` (and the hub's `users` for the
/// admin flags) from a JupyterHub database, read-only.
pub(crate) async fn read_nativeauth(path: &Path) -> Result<Vec<SourceAccount>> {
    use sqlx::sqlite::SqliteConnectOptions;
    use sqlx::{ConnectOptions, Connection};
    if !path.is_file() {
        bail!("{} is not a file (expected JupyterHub's jupyterhub.sqlite)", path.display());
    }
    let opts = SqliteConnectOptions::new().filename(path).read_only(true).create_if_missing(false);
    let mut conn = opts.connect().await.with_context(|| format!("opening {} as a SQLite database", path.display()))?;
    let rows = sqlx::query(
        "SELECT username, password, CAST(COALESCE(is_authorized, 0) AS INTEGER) AS is_authorized FROM users_info ORDER BY id",
    )
    .fetch_all(&mut conn)
    .await
    .with_context(|| {
        format!(
            "reading NativeAuthenticator's users_info table from {} (is it JupyterHub's database, with NativeAuthenticator?)",
            path.display()
        )
    })?;
    let admins: Vec<String> = match sqlx::query("SELECT name FROM users WHERE admin = 1").fetch_all(&mut conn).await {
        Ok(rows) => rows.iter().filter_map(|r| r.try_get::<String, _>("name").ok()).collect(),
        Err(_) => Vec::new(),
    };
    let mut out = Vec::new();
    for r in &rows {
        let name: String = r.try_get("username").context("a users_info row without a username")?;
        let hash = match r.try_get::<Vec<u8>, _>("password") {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(_) => r.try_get::<String, _>("password").unwrap_or_default(),
        };
        let authorized = r.try_get::<i64, _>("is_authorized").map(|v| v != 0).unwrap_or(false);
        let admin = admins.iter().any(|a| a == &name);
        out.push(SourceAccount { name, hash, authorized, admin });
    }
    let _ = conn.close().await;
    Ok(out)
}

/// DockerSpawner's `{username}` in volume names: the name with every byte
/// but ASCII letters and digits escaped as `-XX`, lower-cased.
pub(crate) fn docker_escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() {
            out.push(b as char);
        } else {
            out.push_str(&format!("-{b:02x}"));
        }
    }
    out.to_ascii_lowercase()
}

/// What happens to one source account.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum AccountAction {
    Import,
    Imported,
    AlreadyImported,
    Skip,
}

#[derive(Debug, Clone, Serialize)]
struct AccountLine {
    /// The name in JupyterHub.
    source_name: String,
    /// The name in berth (absent when it cannot be one).
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    action: AccountAction,
    #[serde(skip_serializing_if = "Option::is_none")]
    why: Option<String>,
    authorized: bool,
    admin: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum VolumeAction {
    Adopt,
    Adopted,
    AlreadyAdopted,
    /// The user has berth volumes of their own and `--switch-existing` was not given.
    NotSwitched,
    /// Not adopted (the account was skipped, or the role or volume is taken).
    LeftAlone,
}

#[derive(Debug, Clone, Serialize)]
struct VolumeLine {
    volume: String,
    /// The berth user it serves; absent for the shared volume.
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<String>,
    role: DataRoleName,
    mount_point: String,
    driver: String,
    /// Driver options as recorded (credentials left with the engine).
    #[serde(skip_serializing_if = "String::is_empty")]
    options: String,
    action: VolumeAction,
    #[serde(skip_serializing_if = "Option::is_none")]
    why: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DataRoleName(DataRole);

impl Serialize for DataRoleName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.0.as_str())
    }
}

#[derive(Debug, Clone, Serialize, Default)]
struct Counts {
    imported: usize,
    already_imported: usize,
    skipped: usize,
    volumes_adopted: usize,
    volumes_already_adopted: usize,
    volumes_not_adopted: usize,
    volumes_without_user: usize,
}

#[derive(Debug, Clone, Serialize)]
struct Report {
    source: String,
    dry_run: bool,
    /// Whether there is (before) or was (after) anything to do.
    nothing_to_do: bool,
    accounts: Vec<AccountLine>,
    volumes: Vec<VolumeLine>,
    /// Volumes named like a user's that match no account in the source: left alone.
    volumes_without_user: Vec<String>,
    notes: Vec<String>,
    counts: Counts,
    /// `berth user import-nativeauth`: no volumes looked at.
    #[serde(skip)]
    accounts_only: bool,
}

impl Report {
    fn finish(&mut self) {
        let c = &mut self.counts;
        *c = Counts::default();
        for a in &self.accounts {
            match a.action {
                AccountAction::Import | AccountAction::Imported => c.imported += 1,
                AccountAction::AlreadyImported => c.already_imported += 1,
                AccountAction::Skip => c.skipped += 1,
            }
        }
        for v in &self.volumes {
            match v.action {
                VolumeAction::Adopt | VolumeAction::Adopted => c.volumes_adopted += 1,
                VolumeAction::AlreadyAdopted => c.volumes_already_adopted += 1,
                VolumeAction::NotSwitched | VolumeAction::LeftAlone => c.volumes_not_adopted += 1,
            }
        }
        c.volumes_without_user = self.volumes_without_user.len();
    }

    fn has_work(&self) -> bool {
        self.accounts.iter().any(|a| a.action == AccountAction::Import)
            || self.volumes.iter().any(|v| v.action == VolumeAction::Adopt)
    }
}

/// The volume name patterns and mount points, by role.
struct Layout {
    user_roles: Vec<(DataRole, String, String)>,
    shared: Option<(String, String)>,
    /// berth's own shared volume (`docker.shared_volume`), which an adopted one replaces.
    berth_shared: String,
}

impl Layout {
    fn from_args(a: &JupyterhubArgs, berth_shared: &str) -> Result<Layout> {
        let mut user_roles = Vec::new();
        for (role, pattern, mount) in [
            (DataRole::Home, &a.home_volume, &a.home_mount),
            (DataRole::Workspace, &a.workspace_volume, &a.workspace_mount),
            (DataRole::Cache, &a.cache_volume, &a.cache_mount),
        ] {
            if pattern.is_empty() {
                continue;
            }
            if pattern.matches("{username}").count() != 1 {
                bail!("--{role}-volume {pattern:?} must contain {{username}} once");
            }
            if !mount.starts_with('/') {
                bail!("--{role}-mount {mount:?} must be an absolute path");
            }
            user_roles.push((role, pattern.clone(), mount.clone()));
        }
        if !a.shared_mount.starts_with('/') {
            bail!("--shared-mount {:?} must be an absolute path", a.shared_mount);
        }
        let shared = (!a.shared_volume.is_empty()).then(|| (a.shared_volume.clone(), a.shared_mount.clone()));
        Ok(Layout { user_roles, shared, berth_shared: berth_shared.to_string() })
    }

    /// The escaped user a volume name belongs to, for any role's pattern.
    fn owner_of(&self, volume: &str) -> Option<String> {
        self.user_roles.iter().find_map(|(_, pattern, _)| {
            let (pre, post) = pattern.split_once("{username}")?;
            let mid = volume.strip_prefix(pre)?.strip_suffix(post)?;
            (!mid.is_empty()).then(|| mid.to_string())
        })
    }
}

/// Driver options as `key=value;key=value`, without credentials (the `o`
/// option's `password=`/`pass=` items and any `*password*` key): the engine
/// keeps them with the volume, and berth never stores a secret in clear.
fn options_without_credentials(opts: &[(String, String)]) -> String {
    let secret = |k: &str| {
        let k = k.to_ascii_lowercase();
        k.contains("password") || k == "pass" || k.contains("secret")
    };
    opts.iter()
        .filter(|(k, _)| !secret(k))
        .map(|(k, v)| {
            if k == "o" {
                let kept: Vec<&str> =
                    v.split(',').filter(|item| !secret(item.split('=').next().unwrap_or(""))).collect();
                format!("{k}={}", kept.join(","))
            } else {
                format!("{k}={v}")
            }
        })
        .collect::<Vec<_>>()
        .join(";")
}

pub(crate) async fn run(cmd: MigrateCommand, config: &berth_server::Config) -> Result<()> {
    match cmd {
        MigrateCommand::Jupyterhub(args) => migrate(args, config, Mode::Full).await,
    }
}

/// `berth user import-nativeauth DB`: the same migration, accounts only.
pub(crate) async fn import_nativeauth(db: PathBuf, config: &berth_server::Config) -> Result<()> {
    let args = JupyterhubArgs {
        db,
        dry_run: false,
        json: false,
        home_volume: String::new(),
        workspace_volume: String::new(),
        cache_volume: String::new(),
        home_mount: "/".into(),
        workspace_mount: "/".into(),
        cache_mount: "/".into(),
        shared_volume: String::new(),
        shared_mount: "/".into(),
        switch_existing: false,
        admin: None,
    };
    migrate(args, config, Mode::AccountsOnly).await
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Full,
    AccountsOnly,
}

async fn migrate(args: JupyterhubArgs, config: &berth_server::Config, mode: Mode) -> Result<()> {
    let started = std::time::Instant::now();
    let layout = Layout::from_args(&args, &config.docker.shared_volume)?;
    // The source first: a wrong path must not leave a berth data directory behind.
    let accounts = read_nativeauth(&args.db).await?;
    let source = format!("jupyterhub:{}", args.db.canonicalize().unwrap_or_else(|_| args.db.clone()).display());
    let volumes = if mode == Mode::AccountsOnly {
        Vec::new()
    } else {
        let docker =
            DockerSpawner::connect(config.docker.clone(), &config.hub.base_url).map_err(|e| anyhow::anyhow!("{e}"))?;
        docker.list_volumes().await.map_err(|e| {
            anyhow::anyhow!("listing the Docker engine's volumes (the engine the old deployment ran on): {e}")
        })?
    };
    // A dry run on a data directory without a database plans against an
    // empty berth and creates nothing.
    let sqlite_missing = config.database_url.is_empty() && !config.data_dir.join("berth.sqlite").exists();
    let store = if args.dry_run && sqlite_missing {
        None
    } else {
        Some(berth_server::open_store(config).await.context("opening berth's database")?)
    };
    let extra_admin = args.admin.clone().filter(|a| !a.is_empty());
    let planned = plan(&args, &layout, &source, &accounts, extra_admin.as_deref(), &volumes, store.as_ref()).await;
    let mut report = match planned {
        Ok(r) => r,
        Err(e) => {
            if let Some(s) = &store {
                s.close().await;
            }
            return Err(e);
        }
    };
    report.finish();
    let before = report.clone();
    if !args.json && mode == Mode::Full {
        print_report("Plan", &before);
    }
    let mut after = None;
    let mut failure = None;
    if let Some(store) = store.as_ref().filter(|_| !args.dry_run && before.has_work()) {
        let mut done = before.clone();
        match apply(store, &mut done, &accounts, &source).await {
            Ok(()) => {
                done.finish();
                let kind = if mode == Mode::Full { "migrate-jupyterhub" } else { "import-nativeauth" };
                let detail =
                    format!("{} imported, {} volumes adopted", done.counts.imported, done.counts.volumes_adopted);
                let _ = store.add_event("cli", kind, &source, &detail).await;
                after = Some(done);
            }
            Err(e) => failure = Some(e),
        }
    }
    if let Some(s) = &store {
        s.close().await;
    }
    if let Some(e) = failure {
        return Err(e.context("the migration stopped part-way; running it again finishes it"));
    }
    let elapsed = started.elapsed();
    if args.json {
        let doc = serde_json::json!({
            "before": before,
            "after": after,
            "elapsed_ms": elapsed.as_millis() as u64,
        });
        out!("{}", serde_json::to_string_pretty(&doc)?);
    } else if mode == Mode::AccountsOnly {
        let r = after.as_ref().unwrap_or(&before);
        print_report("Result", r);
        out!("{} account(s) imported, {} skipped", r.counts.imported, r.counts.skipped);
    } else if let Some(done) = &after {
        print_report("Result", done);
        out!("done in {:.2} s", elapsed.as_secs_f64());
    } else if args.dry_run && before.has_work() {
        out!("dry run: nothing was written");
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn plan(
    args: &JupyterhubArgs,
    layout: &Layout,
    source: &str,
    accounts: &[SourceAccount],
    extra_admin: Option<&str>,
    volumes: &[VolumeInfo],
    store: Option<&Store>,
) -> Result<Report> {
    let by_name: BTreeMap<&str, &VolumeInfo> = volumes.iter().map(|v| (v.name.as_str(), v)).collect();
    let mut report = Report {
        source: source.to_string(),
        dry_run: args.dry_run,
        nothing_to_do: false,
        accounts: Vec::new(),
        volumes: Vec::new(),
        volumes_without_user: Vec::new(),
        notes: Vec::new(),
        counts: Counts::default(),
        accounts_only: layout.user_roles.is_empty() && layout.shared.is_none(),
    };
    let mut taken: BTreeMap<String, String> = BTreeMap::new();
    // Escaped source names: volumes named for anyone else have no user.
    let mut known: BTreeSet<String> = BTreeSet::new();
    for acc in accounts {
        known.insert(docker_escape(&acc.name));
        known.insert(acc.name.clone());
        let admin = acc.admin || extra_admin.is_some_and(|a| a == acc.name);
        let mut line = AccountLine {
            source_name: acc.name.clone(),
            name: None,
            action: AccountAction::Skip,
            why: None,
            authorized: acc.authorized,
            admin,
        };
        let name = match UserName::normalize(&acc.name) {
            Ok(n) => n,
            Err(e) => {
                line.why = Some(format!("berth cannot take the name: {e}"));
                report.accounts.push(line);
                continue;
            }
        };
        line.name = Some(name.to_string());
        if let Some(first) = taken.get(name.as_str()) {
            line.why = Some(format!("a duplicate: {first:?} in the same database is also {name} in berth"));
            report.accounts.push(line);
            continue;
        }
        taken.insert(name.to_string(), acc.name.clone());
        if !acc.hash.starts_with("$2") {
            line.why = Some("the stored password is not a bcrypt hash".into());
            report.accounts.push(line);
            continue;
        }
        let existing = match store {
            Some(s) => s.get_user_uncached(name.as_str()).await?,
            None => None,
        };
        let account_id = match &existing {
            None => {
                line.action = AccountAction::Import;
                None
            }
            Some(u) => {
                let from_here = match store {
                    Some(s) => {
                        s.import_source(&u.account_id).await?.is_some_and(|(src, n)| src == source && n == acc.name)
                    }
                    None => false,
                };
                // Imported before this record existed (import-nativeauth, or
                // a run stopped half-way) still has the very same hash,
                // unless the user logged in since.
                if from_here || u.password_hash.as_deref() == Some(acc.hash.as_str()) {
                    line.action = AccountAction::AlreadyImported;
                    Some(u.account_id.clone())
                } else {
                    line.why = Some(format!(
                        "a duplicate: berth has an account {name} already, not imported from this database"
                    ));
                    None
                }
            }
        };
        let skipped = line.action == AccountAction::Skip;
        let skip_why = line.why.clone();
        report.accounts.push(line);

        // This user's volumes.
        let escaped = docker_escape(&acc.name);
        let mut found = Vec::new();
        for (role, pattern, mount) in &layout.user_roles {
            let candidates = [pattern.replace("{username}", &escaped), pattern.replace("{username}", &acc.name)];
            if let Some(v) = candidates.iter().find_map(|c| by_name.get(c.as_str())) {
                found.push((*role, *v, mount.clone()));
            }
        }
        if found.is_empty() {
            continue;
        }
        // Berth volumes of its own: not switched silently.
        let own: Vec<String> = match &account_id {
            Some(id) => [DataRole::Home, DataRole::Workspace, DataRole::Cache]
                .into_iter()
                .map(|r| own_volume(id, r))
                .filter(|v| by_name.contains_key(v.as_str()))
                .collect(),
            None => Vec::new(),
        };
        let adopted_here: Vec<AdoptedVolume> = match (&account_id, store) {
            (Some(id), Some(s)) => s.adopted_volumes_of(id).await?,
            _ => Vec::new(),
        };
        let running = match (&existing, store) {
            (Some(u), Some(s)) => s.count_active_servers_of(&u.name).await? > 0,
            _ => false,
        };
        for (role, v, mount) in found {
            let mut vl = VolumeLine {
                volume: v.name.clone(),
                user: Some(name.to_string()),
                role: DataRoleName(role),
                mount_point: mount,
                driver: v.driver.clone(),
                options: options_without_credentials(&v.options),
                action: VolumeAction::Adopt,
                why: None,
            };
            let recorded = match store {
                Some(s) => s.adopted_volume(&v.name).await?,
                None => None,
            };
            if skipped {
                vl.action = VolumeAction::LeftAlone;
                vl.why = Some(format!("the account was skipped ({})", skip_why.clone().unwrap_or_default()));
            } else if let Some(r) = &recorded {
                if r.account_id == account_id && r.role == role.as_str() {
                    vl.action = VolumeAction::AlreadyAdopted;
                } else {
                    vl.action = VolumeAction::LeftAlone;
                    vl.why = Some(format!("already adopted as the {} volume of another account", r.role));
                }
            } else if let Some(h) = adopted_here.iter().find(|a| a.role == role.as_str()) {
                vl.action = VolumeAction::LeftAlone;
                vl.why = Some(format!("{name}'s {role} is served by {} already", h.volume));
            } else if !own.is_empty() && !args.switch_existing {
                vl.action = VolumeAction::NotSwitched;
                vl.why = Some(format!(
                    "{name} has berth volumes of their own ({}); run again with --switch-existing to mount the old ones instead (berth's stay, unmounted)",
                    own.join(", ")
                ));
            } else if running {
                vl.why = Some("a server of theirs runs: it mounts this volume from its next start".into());
            }
            report.volumes.push(vl);
        }
    }

    // The shared volume.
    if let Some((shared, mount)) = &layout.shared {
        match by_name.get(shared.as_str()) {
            None => report.notes.push(format!("no shared volume {shared} on this engine; none adopted")),
            Some(v) => {
                let mut vl = VolumeLine {
                    volume: v.name.clone(),
                    user: None,
                    role: DataRoleName(DataRole::Shared),
                    mount_point: mount.clone(),
                    driver: v.driver.clone(),
                    options: options_without_credentials(&v.options),
                    action: VolumeAction::Adopt,
                    why: None,
                };
                let current = match store {
                    Some(s) => s.shared_adopted_volume().await?,
                    None => None,
                };
                let recorded = match store {
                    Some(s) => s.adopted_volume(&v.name).await?,
                    None => None,
                };
                match (current, recorded) {
                    (Some(c), _) if c.volume == v.name => vl.action = VolumeAction::AlreadyAdopted,
                    (Some(c), _) => {
                        vl.action = VolumeAction::LeftAlone;
                        vl.why = Some(format!("{} is adopted as the shared volume already", c.volume));
                    }
                    (None, Some(r)) => {
                        vl.action = VolumeAction::LeftAlone;
                        vl.why = Some(format!("already adopted as a {} volume", r.role));
                    }
                    (None, None) => {
                        vl.why = Some(if layout.berth_shared.is_empty() {
                            "every server mounts it".to_string()
                        } else {
                            format!(
                                "every server mounts it, in place of docker.shared_volume ({})",
                                layout.berth_shared
                            )
                        });
                    }
                }
                report.volumes.push(vl);
            }
        }
    }

    // Volumes named like a user's that belong to nobody in the source.
    for v in volumes {
        if let Some(owner) = layout.owner_of(&v.name) {
            if !known.contains(&owner) {
                report.volumes_without_user.push(v.name.clone());
            }
        }
    }
    report.nothing_to_do = !report.has_work();
    Ok(report)
}

async fn apply(store: &Store, report: &mut Report, accounts: &[SourceAccount], source: &str) -> Result<()> {
    let by_source: BTreeMap<&str, &SourceAccount> = accounts.iter().map(|a| (a.name.as_str(), a)).collect();
    // Accounts first: volumes name them by account id.
    let mut ids: BTreeMap<String, String> = BTreeMap::new();
    for line in report.accounts.iter_mut() {
        let Some(name) = line.name.clone() else { continue };
        match line.action {
            AccountAction::Import => {
                let Some(acc) = by_source.get(line.source_name.as_str()) else { continue };
                let new = NewUser {
                    name: name.clone(),
                    admin: line.admin,
                    authorized: line.authorized,
                    password_hash: Some(acc.hash.clone()),
                };
                match store.create_user(&new).await {
                    Ok(u) => {
                        store.record_import(&u.account_id, source, &acc.name).await?;
                        ids.insert(name, u.account_id);
                        line.action = AccountAction::Imported;
                    }
                    // Someone took the name meanwhile (berth serves while this runs).
                    Err(StoreError::Conflict { .. }) => {
                        line.action = AccountAction::Skip;
                        line.why = Some(format!("a duplicate: an account {name} was made in berth meanwhile"));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            AccountAction::AlreadyImported => {
                if let Some(u) = store.get_user_uncached(&name).await? {
                    store.record_import(&u.account_id, source, &line.source_name).await?;
                    ids.insert(name, u.account_id);
                }
            }
            _ => {}
        }
    }
    for v in report.volumes.iter_mut().filter(|v| v.action == VolumeAction::Adopt) {
        let account_id = match &v.user {
            Some(u) => match ids.get(u) {
                Some(id) => Some(id.clone()),
                None => {
                    v.action = VolumeAction::LeftAlone;
                    v.why = Some("the account was not imported".into());
                    continue;
                }
            },
            None => None,
        };
        let rec = AdoptedVolume {
            volume: v.volume.clone(),
            account_id,
            role: v.role.0.as_str().to_string(),
            mount_point: v.mount_point.clone(),
            driver: v.driver.clone(),
            options: v.options.clone(),
            source: source.to_string(),
            adopted: 0,
        };
        match store.adopt_volume(&rec).await {
            Ok(true) => v.action = VolumeAction::Adopted,
            Ok(false) => v.action = VolumeAction::AlreadyAdopted,
            Err(StoreError::Conflict { what }) => {
                v.action = VolumeAction::LeftAlone;
                v.why = Some(format!("{what} is recorded already"));
            }
            Err(e) => return Err(e.into()),
        }
    }
    report.dry_run = false;
    report.nothing_to_do = !report.accounts.iter().any(|a| a.action == AccountAction::Imported)
        && !report.volumes.iter().any(|v| v.action == VolumeAction::Adopted);
    Ok(())
}

fn print_report(title: &str, r: &Report) {
    out!("{title}: migrating from {}{}", r.source, if r.dry_run { " (dry run)" } else { "" });
    out!("  accounts:");
    if r.accounts.is_empty() {
        out!("    (none in the source)");
    }
    for a in &r.accounts {
        let name = a.name.clone().unwrap_or_else(|| format!("{:?}", a.source_name));
        let flags =
            format!("{}{}", if a.authorized { "" } else { " (pending)" }, if a.admin { " (admin)" } else { "" });
        match a.action {
            AccountAction::Import => out!("    import {name}{flags}"),
            AccountAction::Imported => out!("    imported {name}{flags}"),
            AccountAction::AlreadyImported => out!("    already imported {name}"),
            AccountAction::Skip => out!("    skipped {name}: {}", a.why.clone().unwrap_or_default()),
        }
    }
    if r.accounts_only {
        return;
    }
    out!("  volumes:");
    if r.volumes.is_empty() {
        out!("    (none found)");
    }
    for v in &r.volumes {
        let whose = match &v.user {
            Some(u) => format!("{u}'s {}", v.role.0),
            None => "the shared volume".to_string(),
        };
        let driver = if v.driver == "local" && v.options.is_empty() {
            String::new()
        } else {
            format!(
                " [driver {}{}]",
                v.driver,
                if v.options.is_empty() { String::new() } else { format!(", {}", v.options) }
            )
        };
        let why = v.why.clone().map(|w| format!(": {w}")).unwrap_or_default();
        let verb = match v.action {
            VolumeAction::Adopt => "adopt",
            VolumeAction::Adopted => "adopted",
            VolumeAction::AlreadyAdopted => "already adopted",
            VolumeAction::NotSwitched => "not switched",
            VolumeAction::LeftAlone => "left alone",
        };
        out!("    {verb} {} as {whose} at {}{driver}{why}", v.volume, v.mount_point);
    }
    if !r.volumes_without_user.is_empty() {
        out!("  volumes with no matching user (left alone):");
        for v in &r.volumes_without_user {
            out!("    {v}");
        }
    }
    for n in &r.notes {
        out!("  note: {n}");
    }
    let c = &r.counts;
    out!(
        "  {} account(s) {}, {} already imported, {} skipped; {} volume(s) {}, {} already adopted, {} not adopted, {} with no matching user",
        c.imported,
        if title == "Plan" { "to import" } else { "imported" },
        c.already_imported,
        c.skipped,
        c.volumes_adopted,
        if title == "Plan" { "to adopt" } else { "adopted" },
        c.volumes_already_adopted,
        c.volumes_not_adopted,
        c.volumes_without_user
    );
    if title == "Plan" && r.nothing_to_do {
        out!("nothing to do");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_as_dockerspawner() {
        for (name, want) in [("alice", "alice"), ("al-ice", "al-2dice"), ("user.name", "user-2ename"), ("Bob", "bob")] {
            assert_eq!(docker_escape(name), want, "{name}");
        }
    }

    #[test]
    fn credentials_are_left_out() {
        let opts = vec![
            ("device".to_string(), "//srv/share".to_string()),
            ("o".to_string(), "username=u,password=p,uid=1000".to_string()),
            ("type".to_string(), "cifs".to_string()),
        ];
        assert_eq!(options_without_credentials(&opts), "device=//srv/share;o=username=u,uid=1000;type=cifs");
    }

    #[test]
    fn volumes_map_back_to_their_user() {
        let l = Layout {
            user_roles: vec![
                (DataRole::Home, "jupyterlab-{username}_home".into(), "/home".into()),
                (DataRole::Cache, "jupyterlab-{username}_cache".into(), "/c".into()),
            ],
            shared: None,
            berth_shared: String::new(),
        };
        assert_eq!(l.owner_of("jupyterlab-al-2dice_home").as_deref(), Some("al-2dice"));
        assert_eq!(l.owner_of("jupyterlab-x_cache").as_deref(), Some("x"));
        assert_eq!(l.owner_of("jupyterlab-_home"), None);
        assert_eq!(l.owner_of("jupyterhub_shared"), None);
    }
}
