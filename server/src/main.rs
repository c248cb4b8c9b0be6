//! The `lifeboat-server` command: `serve` runs the server; operator subcommands join as
//! they land. Configuration: file + `LIFEBOAT_*` environment + flags (see `--help`).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use lifeboat_server::admin::{self, AdminDb};
use lifeboat_server::config::{self, Config, Overrides};
use lifeboat_server::{serve, telemetry, tenants};

/// Lifeboat server: fleet backup for company iPhones.
///
/// With no configuration at all it keeps everything in ./lifeboat-data: an embedded
/// PostgreSQL (started and stopped with the server), local-disk object storage, and
/// HTTP on 127.0.0.1:8080 (/healthz, /readyz, /metrics).
///
/// Configuration comes from a TOML file (--config, every key shown in
/// deploy/lifeboat-server.example.toml), LIFEBOAT_* environment variables and flags;
/// a flag beats its environment variable, which beats the file.
#[derive(Debug, Parser)]
#[command(name = "lifeboat-server", version, max_term_width = 100)]
struct Cli {
    #[command(flatten)]
    overrides: Overrides,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server until Ctrl-C or SIGTERM.
    Serve,
    /// Print the effective configuration (secrets hidden) and exit.
    Config,
    /// Manage tenants (organisations). Works whether or not the server is running.
    #[command(subcommand)]
    Tenant(TenantCommand),
}

#[derive(Debug, Subcommand)]
enum TenantCommand {
    /// Create a tenant with fresh keys: lowercase letters, digits, '.', '_' or '-'.
    Create {
        name: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List tenants.
    List {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let config = Config::load(&cli.overrides)?;
    telemetry::init(&config.log_level, config.log_format).map_err(anyhow::Error::msg)?;
    for var in config::unknown_env_vars() {
        tracing::warn!(env = %var, "ignoring unknown LIFEBOAT_* environment variable (a typo?)");
    }
    match cli.command {
        Command::Config => {
            println!("{config:#?}");
            Ok(())
        }
        Command::Tenant(cmd) => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(tenant(&config, cmd))
        }
        Command::Serve => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(async {
                let running = serve::start(config).await?;
                serve::shutdown_signal().await;
                tracing::info!("shutting down");
                running.stop().await
            })
        }
    }
}

async fn tenant(config: &Config, cmd: TenantCommand) -> anyhow::Result<()> {
    let master = admin::master_key(config)?;
    let mut db = AdminDb::open(config).await?;
    let result = match cmd {
        TenantCommand::Create { name, json } => tenants::create(&mut db.client, &master, &name).await.map(|t| {
            if json {
                println!("{}", serde_json::json!({"id": t.id, "name": t.name}));
            } else {
                println!("created tenant {} ({})", t.name, t.id);
            }
        }),
        TenantCommand::List { json } => tenants::list(&db.client).await.map(|list| {
            if json {
                println!("{}", serde_json::json!(list));
            } else {
                println!("{:<36}  NAME", "ID");
                for t in list {
                    println!("{}  {}", t.id, t.name);
                }
            }
        }),
    };
    db.close().await;
    Ok(result?)
}
