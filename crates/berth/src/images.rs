//! `berth images check`: the image-update check, now, through the same hub
//! code as the schedule and the admin's button (see `berth_hub::updates`).

use anyhow::Context;
use berth_server::Config;
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub(crate) enum ImagesCommand {
    /// Ask each image's registry for its current digest and act on it by
    /// the template's policy (`images.policy`); prints one line per image.
    Check {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) async fn run(command: ImagesCommand, config: &Config) -> anyhow::Result<()> {
    match command {
        ImagesCommand::Check { json } => {
            let hub = berth_server::offline_hub(config).await.context("preparing the hub")?;
            let checks = hub.servers.check_images("berth images check").await.context("checking images")?;
            // Templates rebuilt on an updated base: their builds end first.
            let longest = hub.servers.cfg.build_timeout_seconds;
            if !hub.servers.drain(longest).await {
                eprintln!("berth images check: a rebuild did not end within {} s", longest.as_secs());
            }
            hub.store.close().await;
            if json {
                let list: Vec<serde_json::Value> = checks
                    .iter()
                    .map(|c| {
                        serde_json::json!({
                            "template": c.template, "image": c.image, "status": c.status,
                            "local_digest": c.local_digest, "remote_digest": c.remote_digest, "message": c.message,
                        })
                    })
                    .collect();
                out!("{}", serde_json::Value::Array(list));
            } else if checks.is_empty() {
                out!("no images to check");
            } else {
                for c in &checks {
                    out!("{}\t{}\t{}\t{}", c.template, c.image, c.status, c.message);
                }
            }
            if checks.iter().any(|c| c.status == "failed") {
                anyhow::bail!("some checks failed (see above; no server was touched)");
            }
            Ok(())
        }
    }
}
