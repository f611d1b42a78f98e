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

pub(crate) fn run(cmd: TemplatesCommand) -> anyhow::Result<()> {
    match cmd {
        TemplatesCommand::List { catalog } => {
            let c = open(catalog.as_deref())?;
            let mut ts: Vec<_> = c.templates.iter().map(|l| &l.template).collect();
            ts.sort_by(|a, b| (&a.category, &a.id).cmp(&(&b.category, &b.id)));
            let mut category = "";
            for t in ts {
                if t.category != category {
                    category = &t.category;
                    println!("{category}:");
                }
                let app = t.app.as_ref().map_or("ssh only".to_string(), |a| {
                    let modes: Vec<&str> = a.routing.iter().map(|m| m.as_str()).collect();
                    format!("app on {} ({})", a.port.get_ref(), modes.join(", "))
                });
                println!("  {:<22} {:<40} {:>16}  {app}", t.id, t.name, t.estimated_size);
            }
            Ok(())
        }
        TemplatesCommand::Show { id, catalog } => {
            let c = open(catalog.as_deref())?;
            let l = c.get(&id).ok_or_else(|| unknown(&c, &id))?;
            println!("# {}", l.path.display());
            print!("{}", l.text);
            for (name, text) in render::render(&l.template) {
                println!("\n# {name}\n{text}");
            }
            Ok(())
        }
        TemplatesCommand::Check { dir } => {
            let c = open(dir.as_deref())?;
            let problems = check::check(&c);
            if problems.is_empty() {
                println!("{} templates, no violations", c.templates.len());
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
                println!("wrote {}", p.display());
            }
            println!("{} templates rendered, {} file(s) changed", c.templates.len(), written.len());
            Ok(())
        }
        TemplatesCommand::Export { format, catalog } => {
            if format != "json" {
                bail!("unknown format {format:?}; the only format is json");
            }
            let c = open(catalog.as_deref())?;
            println!("{}", serde_json::to_string_pretty(&c.config())?);
            Ok(())
        }
    }
}

pub(crate) fn unknown(c: &Catalog, id: &str) -> anyhow::Error {
    let ids: Vec<&str> = c.templates.iter().map(|t| t.template.id.as_str()).collect();
    anyhow!("no template {id:?}; the catalog has: {}", ids.join(", "))
}
