//! The `berth` binary: command line, logging, exit codes. Everything else
//! lives in the library crates; `berth_server::App` wires them together.
#![forbid(unsafe_code)]

/// `println!` for what the CLI prints: when the reader has gone away (a
/// pipe into `head`), berth stops quietly instead of panicking.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($t)*) {
            $crate::stdout_failed(e);
        }
    }};
}

/// `print!`, the same way.
macro_rules! outp {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = write!(std::io::stdout().lock(), $($t)*) {
            $crate::stdout_failed(e);
        }
    }};
}

mod gpus;
mod images;
mod migrate;
mod templates;
mod up;
mod users;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use berth_server::{App, Config, ConfigError, Sources, StartError};
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// Exit code for an invalid configuration or command line (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "berth",
    version,
    about = "A multi-user ML workstation in one binary: hub, proxy, spawners and SSH gateway."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone, Default)]
struct Common {
    /// TOML configuration file.
    #[arg(long, env = "BERTH_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Directory for berth's state (default ./berth-data).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Database URL (default: SQLite in the data directory).
    #[arg(long, global = true)]
    database_url: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the hub, the proxy and everything else on one port.
    Serve {
        #[command(flatten)]
        common: Common,
        /// Address and port to listen on (default 0.0.0.0:27015).
        #[arg(long)]
        bind: Option<String>,
        /// Where servers run: auto, local or docker.
        #[arg(long)]
        spawner: Option<String>,
        /// TLS on the same port: auto (generated certificate authority) or off.
        #[arg(long)]
        tls: Option<String>,
        /// PEM certificate chain to serve (with --tls-key).
        #[arg(long)]
        tls_cert: Option<String>,
        /// PEM private key for --tls-cert.
        #[arg(long)]
        tls_key: Option<String>,
        /// Address and port of the SSH gateway (default 0.0.0.0:2222), or off.
        #[arg(long)]
        ssh_bind: Option<String>,
    },
    /// Check or print the configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
        #[command(flatten)]
        common: Common,
    },
    /// Check the machine: Docker engine, network, volumes, GPUs, ports.
    Doctor {
        #[command(flatten)]
        common: Common,
    },
    /// The template catalog: list, show, check, render, export, build, images.
    Templates {
        #[command(subcommand)]
        command: templates::TemplatesCommand,
    },
    /// Single-tenant mode: build and run one template with SSH on 4444 and its app on 27015.
    Up(up::UpArgs),
    /// Stop and remove what `berth up <id>` started (its /app volume is kept).
    Down {
        id: String,
        /// Also remove the /app volume.
        #[arg(long)]
        volumes: bool,
    },
    /// List what `berth up` started.
    Ps,
    /// Move an existing deployment to berth: accounts and every user's data
    /// (works while berth runs; running it twice changes nothing).
    Migrate {
        #[command(subcommand)]
        command: migrate::MigrateCommand,
        #[command(flatten)]
        common: Common,
    },
    /// Image updates: check each image's registry now and act by policy.
    Images {
        #[command(subcommand)]
        command: images::ImagesCommand,
        #[command(flatten)]
        common: Common,
    },
    /// Read the GPUs once through the sampler (NVML or nvidia-smi) and print them.
    Gpus {
        #[command(subcommand)]
        command: gpus::GpusCommand,
        #[command(flatten)]
        common: Common,
    },
    /// Manage accounts from the command line (works while berth runs).
    User {
        #[command(subcommand)]
        command: users::UserCommand,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Load the configuration from every layer and report the first problem.
    Check,
    /// Print a complete configuration file with every default.
    Defaults,
    /// Print the configuration reference (Markdown).
    Reference,
}

/// Errors sorted by the exit code they deserve.
enum Failure {
    Config(String),
    Runtime(anyhow::Error),
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure::Config(e.to_string())
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Runtime(e)
    }
}

impl From<StartError> for Failure {
    fn from(e: StartError) -> Self {
        Failure::Runtime(e.into())
    }
}

fn load_config(common: &Common, extra: &[(&str, Option<String>)]) -> Result<Config, ConfigError> {
    let mut sources = Sources::from_process_env();
    sources.file = common.config.clone();
    let mut flags: Vec<(String, String)> = Vec::new();
    if let Some(d) = &common.data_dir {
        flags.push(("data_dir".into(), d.display().to_string()));
    }
    if let Some(u) = &common.database_url {
        flags.push(("database_url".into(), u.clone()));
    }
    for (k, v) in extra {
        if let Some(v) = v {
            flags.push(((*k).to_string(), v.clone()));
        }
    }
    sources.flags = flags;
    Config::load(&sources)
}

fn init_logging(filter: &str) -> Result<(), Failure> {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_string());
    let env_filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .map_err(|e| Failure::Config(format!("invalid value for `log`: {e}")))?;
    tracing_subscriber::fmt().with_env_filter(env_filter).with_writer(std::io::stderr).with_target(false).init();
    Ok(())
}

async fn shutdown_signal(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown requested");
    token.cancel();
}

struct ServeFlags {
    bind: Option<String>,
    spawner: Option<String>,
    tls: Option<String>,
    tls_cert: Option<String>,
    tls_key: Option<String>,
    ssh_bind: Option<String>,
}

async fn serve(common: Common, f: ServeFlags) -> Result<(), Failure> {
    let config = load_config(
        &common,
        &[
            ("bind", f.bind),
            ("spawner.kind", f.spawner),
            ("tls.mode", f.tls),
            ("tls.cert", f.tls_cert),
            ("tls.key", f.tls_key),
            ("ssh.bind", f.ssh_bind),
        ],
    )?;
    init_logging(&config.log)?;
    let app = App::build(config).await?;
    let listener = app.bind().await?;
    let token = CancellationToken::new();
    tokio::spawn(shutdown_signal(token.clone()));
    app.serve(listener, token).await?;
    Ok(())
}

async fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Serve { common, bind, spawner, tls, tls_cert, tls_key, ssh_bind } => {
            serve(common, ServeFlags { bind, spawner, tls, tls_cert, tls_key, ssh_bind }).await
        }
        Command::Config { command, common } => match command {
            ConfigCommand::Check => {
                let c = load_config(&common, &[])?;
                out!(
                    "configuration OK: listening on {}, data in {}, database {}",
                    c.bind,
                    c.data_dir.display(),
                    redact(&c.database_url())
                );
                Ok(())
            }
            ConfigCommand::Defaults => {
                outp!("{}", Config::defaults_toml());
                Ok(())
            }
            ConfigCommand::Reference => {
                outp!("{}", Config::reference_markdown());
                Ok(())
            }
        },
        Command::Doctor { common } => {
            let config = load_config(&common, &[])?;
            init_logging("error")?;
            let ok = berth_server::doctor::run(&config).await;
            if ok {
                Ok(())
            } else {
                Err(Failure::Runtime(anyhow::anyhow!("some checks failed; see the lines marked FIX")))
            }
        }
        Command::Templates { command } => templates::run(command).await.map_err(Failure::Runtime),
        Command::Up(args) => up::up(args).await.map_err(Failure::Runtime),
        Command::Down { id, volumes } => up::down(&id, volumes).await.map_err(Failure::Runtime),
        Command::Ps => up::ps().await.map_err(Failure::Runtime),
        Command::Images { command, common } => {
            let config = load_config(&common, &[])?;
            init_logging("warn")?;
            images::run(command, &config).await.map_err(Failure::Runtime)
        }
        Command::Gpus { command, common } => {
            let config = load_config(&common, &[])?;
            init_logging("warn")?;
            gpus::run(command, &config.gpu).await.map_err(Failure::Runtime)
        }
        Command::Migrate { command, common } => {
            let config = load_config(&common, &[])?;
            init_logging("warn")?;
            migrate::run(command, &config).await.map_err(Failure::Runtime)
        }
        Command::User { command, common } => {
            let config = load_config(&common, &[])?;
            init_logging("warn")?;
            let store = berth_server::open_store(&config).await.context("opening the database")?;
            let result = users::run(command, &config, &store).await;
            store.close().await;
            result.map_err(Failure::Runtime)
        }
    }
}

fn redact(url: &str) -> String {
    match url.split_once("://").and_then(|(s, rest)| rest.split_once('@').map(|(cred, host)| (s, cred, host))) {
        Some((s, cred, host)) => {
            let user = cred.split(':').next().unwrap_or("");
            format!("{s}://{user}:***@{host}")
        }
        None => url.to_string(),
    }
}

/// Standard output cannot be written: a closed pipe ends berth with the
/// status a shell gives a command ended by SIGPIPE; anything else is said.
fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(141);
    }
    eprintln!("berth: cannot write to standard output: {e}");
    std::process::exit(1);
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_CONFIG } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("berth").build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("berth: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(m)) => {
            eprintln!("berth: {m}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("berth: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
