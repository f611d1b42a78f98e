//! `berth templates …`: the catalog on the command line.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use berth_catalog::{check, render, Catalog, Problem};
use clap::Subcommand;

#[derive(Subcommand)]
pub(crate) enum TemplatesCommand {
    /// List the templates, grouped by category.
    List {
        /// A catalog directory instead of the one built into berth.
        #[arg(long)]
        catalog: Option<PathBuf>,
    },
    /// Show one template: its spec and what it renders to.
    Show {
        id: String,
        #[arg(long)]
        catalog: Option<PathBuf>,
    },
    /// Enforce the two-port rules; prints `file:line: message` per violation.
    Check {
        /// Catalog directory (default: the catalog built into berth).
        dir: Option<PathBuf>,
    },
    /// Write each template's Dockerfile, docker-compose.yml, start.sh and sshd_config.
    Render {
        /// Catalog directory (default: ./templates).
        dir: Option<PathBuf>,
    },
    /// Build the hub's images of templates (as a first start would), with
    /// each build's steps; images already built are left as they are.
    Build {
        /// Template ids.
        ids: Vec<String>,
        /// Every template of the catalog.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        catalog: Option<PathBuf>,
    },
    /// Which templates have their hub image built: tag, size, age, the
    /// containers made from it.
    Images {
        #[arg(long)]
        catalog: Option<PathBuf>,
    },
    /// Remove hub template images no template of the catalog builds any more
    /// (an older hash, a template since removed). Images a container still
    /// uses are kept and named.
    Prune {
        /// Only these templates' images (ids of the catalog or of templates
        /// since removed); default every template's.
        ids: Vec<String>,
        /// Also remove the current images nothing uses (the next start
        /// rebuilds them).
        #[arg(long)]
        all: bool,
        /// Print what would be removed and remove nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        catalog: Option<PathBuf>,
    },
    /// Print the catalog as template_config.json.
    Export {
        #[arg(long, default_value = "json")]
        format: String,
        #[arg(long)]
        catalog: Option<PathBuf>,
    },
}

fn problems_text(p: &[Problem]) -> String {
    p.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n")
}

/// The catalog in `dir`, or the built-in one.
pub(crate) fn open(dir: Option<&Path>) -> anyhow::Result<Catalog> {
    match dir {
        Some(d) => Catalog::load(d).map_err(|p| anyhow!("{}", problems_text(&p))),
        None => Catalog::builtin().map_err(|p| anyhow!("the built-in catalog is damaged:\n{}", problems_text(&p))),
    }
}

pub(crate) async fn run(cmd: TemplatesCommand) -> anyhow::Result<()> {
    match cmd {
        TemplatesCommand::Build { ids, all, catalog } => build(&open(catalog.as_deref())?, &ids, all).await,
        TemplatesCommand::Images { catalog } => images(&open(catalog.as_deref())?).await,
        TemplatesCommand::Prune { ids, all, dry_run, catalog } => {
            prune(&open(catalog.as_deref())?, &ids, all, dry_run).await
        }
        TemplatesCommand::List { catalog } => {
            let c = open(catalog.as_deref())?;
            let mut ts: Vec<_> = c.templates.iter().map(|l| &l.template).collect();
            ts.sort_by(|a, b| (&a.category, &a.id).cmp(&(&b.category, &b.id)));
            let mut category = "";
            for t in ts {
                if t.category != category {
                    category = &t.category;
                    out!("{category}:");
                }
                let app = t.app.as_ref().map_or("ssh only".to_string(), |a| {
                    let modes: Vec<&str> = a.routing.iter().map(|m| m.as_str()).collect();
                    format!("app on {} ({})", a.port.get_ref(), modes.join(", "))
                });
                out!("  {:<22} {:<40} {:>16}  {app}", t.id, t.name, t.estimated_size);
            }
            Ok(())
        }
        TemplatesCommand::Show { id, catalog } => {
            let c = open(catalog.as_deref())?;
            let l = c.get(&id).ok_or_else(|| unknown(&c, &id))?;
            out!("# {}", l.path.display());
            outp!("{}", l.text);
            for (name, text) in render::render(&l.template) {
                out!("\n# {name}\n{text}");
            }
            Ok(())
        }
        TemplatesCommand::Check { dir } => {
            let c = open(dir.as_deref())?;
            let problems = check::check(&c);
            if problems.is_empty() {
                out!("{} templates, no violations", c.templates.len());
                Ok(())
            } else {
                eprintln!("{}", problems_text(&problems));
                bail!("{} violation(s) of the template rules", problems.len())
            }
        }
        TemplatesCommand::Render { dir } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from("templates"));
            let c = open(Some(&dir))?;
            let written = render::write_all(&c, &dir).with_context(|| format!("writing into {}", dir.display()))?;
            for p in &written {
                out!("wrote {}", p.display());
            }
            out!("{} templates rendered, {} file(s) changed", c.templates.len(), written.len());
            Ok(())
        }
        TemplatesCommand::Export { format, catalog } => {
            if format != "json" {
                bail!("unknown format {format:?}; the only format is json");
            }
            let c = open(catalog.as_deref())?;
            out!("{}", serde_json::to_string_pretty(&c.config())?);
            Ok(())
        }
    }
}

pub(crate) fn unknown(c: &Catalog, id: &str) -> anyhow::Error {
    let ids: Vec<&str> = c.templates.iter().map(|t| t.template.id.as_str()).collect();
    anyhow!("no template {id:?}; the catalog has: {}", ids.join(", "))
}

async fn build(c: &Catalog, ids: &[String], all: bool) -> anyhow::Result<()> {
    use berth_spawner_docker::single::Engine;
    let chosen: Vec<&berth_catalog::Template> = if all {
        c.templates.iter().map(|l| &l.template).collect()
    } else {
        if ids.is_empty() {
            bail!("name the templates to build, or --all");
        }
        ids.iter()
            .map(|id| c.get(id).map(|l| &l.template).ok_or_else(|| anyhow!("no template {id:?} in the catalog")))
            .collect::<anyhow::Result<_>>()?
    };
    let engine = Engine::connect().await?;
    let mut failed = Vec::new();
    for t in chosen {
        let ht = t.hub_template();
        let started = std::time::Instant::now();
        let built = engine
            .build_template(&ht.image, &ht.build, |s| {
                eprintln!("{}: [{}/{}] {}", t.id, s.done, s.total, s.text.trim());
            })
            .await;
        match built {
            Ok(true) => out!("built {} in {:.0} s", ht.image, started.elapsed().as_secs_f64()),
            Ok(false) => out!("{} is built already", ht.image),
            Err(e) => {
                out!("{}: {e}", t.id);
                failed.push(t.id.clone());
            }
        }
    }
    if !failed.is_empty() {
        bail!("{} template(s) did not build: {}", failed.len(), failed.join(", "));
    }
    Ok(())
}

async fn images(c: &Catalog) -> anyhow::Result<()> {
    let engine = berth_spawner_docker::single::Engine::connect().await?;
    let have = engine.template_images().await?;
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    out!("{:<22} {:<6} {:<46} {:>9} {:<8} IN USE BY", "TEMPLATE", "BUILT", "IMAGE", "SIZE", "AGE");
    for l in &c.templates {
        let image = l.template.hub_template().image;
        match have.iter().find(|i| i.tag == image) {
            Some(i) => {
                let users = engine.containers_using(&image).await?;
                out!(
                    "{:<22} {:<6} {:<46} {:>6} MB {:<8} {}",
                    l.template.id,
                    "yes",
                    image,
                    i.size_bytes / 1_000_000,
                    age(now - i.created),
                    if users.is_empty() { "-".to_string() } else { users.join(", ") }
                )
            }
            None => out!("{:<22} {:<6} {:<46} {:>9} {:<8} -", l.template.id, "no", image, "-", "-"),
        }
    }
    let current: Vec<String> = c.templates.iter().map(|l| l.template.hub_template().image).collect();
    let stale: Vec<_> = have.iter().filter(|i| !current.contains(&i.tag)).collect();
    if !stale.is_empty() {
        out!("\nolder images no template builds any more (`berth templates prune` removes them):");
        for i in stale {
            let users = engine.containers_using(&i.tag).await?;
            out!(
                "  {:<54} {:>6} MB {:<8} {}",
                i.tag,
                i.size_bytes / 1_000_000,
                age(now - i.created),
                if users.is_empty() { "-".to_string() } else { users.join(", ") }
            );
        }
    }
    Ok(())
}

async fn prune(c: &Catalog, ids: &[String], all: bool, dry_run: bool) -> anyhow::Result<()> {
    let engine = berth_spawner_docker::single::Engine::connect().await?;
    let current: Vec<String> = c.templates.iter().map(|l| l.template.hub_template().image).collect();
    let (mut removed, mut freed, mut kept) = (0usize, 0i64, 0usize);
    for i in engine.template_images().await? {
        let chosen = ids.is_empty() || ids.iter().any(|id| i.tag.starts_with(&format!("berth-template-{id}:")));
        if !chosen || (current.contains(&i.tag) && !all) {
            continue;
        }
        let users = engine.containers_using(&i.tag).await?;
        if !users.is_empty() {
            out!("kept {}: in use by {}", i.tag, users.join(", "));
            kept += 1;
            continue;
        }
        if dry_run {
            out!("would remove {} ({} MB)", i.tag, i.size_bytes / 1_000_000);
        } else if let Err(e) = engine.remove_template_image(&i.tag).await {
            // The engine refuses while a container made from another name of
            // the same image uses it.
            out!("kept {}: {e}", i.tag);
            kept += 1;
            continue;
        } else {
            out!("removed {} ({} MB)", i.tag, i.size_bytes / 1_000_000);
        }
        removed += 1;
        freed += i.size_bytes;
    }
    let verb = if dry_run { "would remove" } else { "removed" };
    out!("{verb} {removed} image(s), {} MB; {kept} kept in use", freed / 1_000_000);
    Ok(())
}

fn age(secs: i64) -> String {
    match secs.max(0) {
        s if s < 3600 => format!("{} min", s / 60),
        s if s < 86_400 => format!("{} h", s / 3600),
        s => format!("{} days", s / 86_400),
    }
}
