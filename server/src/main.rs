//! The `lifeboat-server` command: `serve` runs the server; operator subcommands join as
//! they land. Configuration: file + `LIFEBOAT_*` environment + flags (see `--help`).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use lifeboat_server::admin::{AdminDb, audit_operator, credentials, with_db};
use lifeboat_server::config::{self, Config, Overrides};
use lifeboat_server::platform::telemetry;
use lifeboat_server::store::tenants;
use lifeboat_server::{keys, serve};

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
    /// Create agent enrolment tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Manage enrolled agents.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Manage HTTP API users.
    #[command(subcommand)]
    User(UserCommand),
    /// The audit log: check its hash chain.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Per-device secrets: the escrowed iOS backup password.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Restore-test snapshots now: rebuild each from storage as a restore would and check
    /// the iPhone backup in it. Exits non-zero if any fails.
    Verify {
        /// Only this tenant's snapshots [default: every tenant's].
        #[arg(long)]
        tenant: Option<String>,
        /// One snapshot.
        #[arg(long, conflicts_with_all = ["device", "all"])]
        snapshot: Option<lifeboat_shared::ids::SnapshotId>,
        /// The newest snapshot of one device.
        #[arg(long, conflicts_with = "all")]
        device: Option<String>,
        /// The newest snapshot of every device (of the tenant, or of all tenants).
        #[arg(long)]
        all: bool,
        /// Print the results as JSON (one object per snapshot, one per line).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Create a user and print its API credential (shown once; use it as
    /// `Authorization: Bearer <credential>`). With --password or --password-file it is
    /// also a console user, who signs in at /login with its name and password.
    Create {
        #[arg(long)]
        tenant: String,
        #[arg(long, value_enum)]
        role: lifeboat_server::users::Role,
        /// Who or what uses it, for the audit trail; a console user signs in with it
        /// (unique across tenants).
        #[arg(long, default_value = "api")]
        name: String,
        /// A console user: prompt for its password (at least 12 characters).
        #[arg(long, conflicts_with = "password_file")]
        password: bool,
        /// A console user whose password is the first line of FILE (`-` for stdin).
        #[arg(long, value_name = "FILE")]
        password_file: Option<std::path::PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List API users (never their credentials, which are not stored).
    List {
        /// Only this tenant's users [default: every tenant's].
        #[arg(long)]
        tenant: Option<String>,
        /// Print the result as JSON (an array).
        #[arg(long)]
        json: bool,
    },
    /// Revoke an API user: its credential gets 401 from the next request on.
    Revoke {
        id: uuid::Uuid,
        /// Only if the user belongs to this tenant.
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Recompute a tenant's audit chain: every event's hash from its contents and the
    /// event before. Exits non-zero naming the first event altered, removed or reordered.
    Verify {
        #[arg(long)]
        tenant: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DeviceCommand {
    /// Print a device's escrowed iOS backup password on stdout's last line (audited as a
    /// reveal by the operator); with --set, escrow the password read from stdin's first
    /// line instead (a password the phone already has).
    BackupPassword {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        udid: String,
        /// Read a new password from stdin and escrow it.
        #[arg(long)]
        set: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Print an enrolment token for `lifeboat-agent enroll`. It carries the server's
    /// address (quic.advertise) and certificate fingerprint, and enrols one agent, or up
    /// to --uses agents (one token for an MDM rollout to many workstations).
    Create {
        /// Tenant the agents will belong to.
        #[arg(long)]
        tenant: String,
        /// How many agents the token may enrol.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=lifeboat_server::auth::MAX_TOKEN_USES as i64))]
        uses: u32,
        /// How long the token stays valid: a number with s, m, h or d.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        expires: std::time::Duration,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List a tenant's enrolment tokens: uses left, expiry, state (never the secret).
    List {
        #[arg(long)]
        tenant: String,
        /// Print the result as JSON (an array).
        #[arg(long)]
        json: bool,
    },
    /// Revoke an enrolment token: it enrols no more agents (those it enrolled stay).
    Revoke {
        id: uuid::Uuid,
        /// Only if the token belongs to this tenant.
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum AgentCommand {
    /// List enrolled agents: workstation, version, last seen, revoked.
    List {
        /// Only this tenant's agents [default: every tenant's].
        #[arg(long)]
        tenant: Option<String>,
        /// Print the result as JSON (an array).
        #[arg(long)]
        json: bool,
    },
    /// Revoke an agent: it is refused from its next connection on.
    Revoke { id: lifeboat_shared::ids::AgentId },
}

/// A console user's password: prompted for (twice) with `--password`, or the first line of
/// `--password-file` (`-`: stdin). `None` for an API-only user.
fn read_password(prompt: bool, file: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    use anyhow::Context as _;
    let first_line = |text: String| text.lines().next().unwrap_or_default().to_owned();
    let password = match (prompt, file) {
        (false, None) => return Ok(None),
        (_, Some(path)) if path == std::path::Path::new("-") => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).context("reading the password from stdin")?;
            first_line(line)
        }
        (_, Some(path)) => first_line(
            std::fs::read_to_string(path).with_context(|| format!("reading the password file {}", path.display()))?,
        ),
        (true, None) => {
            let a = rpassword::prompt_password("console password: ").context("prompting for a password")?;
            let b = rpassword::prompt_password("again: ").context("prompting for a password")?;
            anyhow::ensure!(a == b, "the two passwords differ");
            a
        }
    };
    let min = lifeboat_server::users::MIN_PASSWORD;
    anyhow::ensure!(password.chars().count() >= min, "a console password must be at least {min} characters");
    Ok(Some(password))
}

/// `90s`, `30m`, `24h`, `7d`.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration like 30m, 24h or 7d"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("{s:?} is not a duration like 30m, 24h or 7d")),
    };
    if secs == 0 || secs > 365 * 86400 {
        return Err(format!("{s:?}: a token must expire within 1 s to 365 d"));
    }
    Ok(std::time::Duration::from_secs(secs))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Encryption {
    Required,
    Off,
}

#[derive(Debug, Subcommand)]
enum TenantCommand {
    /// Create a tenant with fresh keys: lowercase letters, digits, '.', '_' or '-'.
    Create {
        name: String,
        /// Backup encryption: `required` (agents turn it on, with an escrowed password,
        /// before backing a phone up) or `off` (phones are backed up as they are).
        #[arg(long, value_enum, default_value_t = Encryption::Required)]
        encryption: Encryption,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Set a tenant's backup encryption policy.
    Encryption { name: String, policy: Encryption },
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
        Command::Token(TokenCommand::Create { tenant, uses, expires, json }) => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(token_create(&config, &tenant, uses, expires, json))
        }
        Command::Token(TokenCommand::List { tenant, json }) => {
            with_db(&config, async |db| credentials::token_list(db, tenant, json).await)
        }
        Command::Token(TokenCommand::Revoke { id, tenant }) => {
            with_db(&config, async |db| credentials::token_revoke(db, id, tenant).await)
        }
        Command::User(UserCommand::List { tenant, json }) => {
            with_db(&config, async |db| credentials::user_list(db, tenant, json).await)
        }
        Command::User(UserCommand::Revoke { id, tenant }) => {
            with_db(&config, async |db| credentials::user_revoke(db, id, tenant).await)
        }
        Command::Agent(AgentCommand::List { tenant, json }) => {
            with_db(&config, async |db| credentials::agent_list(db, tenant, json).await)
        }
        Command::User(UserCommand::Create { tenant, role, name, password, password_file, json }) => {
            let password = read_password(password, password_file.as_deref())?;
            with_db(&config, async |db| {
                let t = tenants::by_name(db, &tenant).await?;
                let (id, credential) =
                    lifeboat_server::users::create(db, t.id, &name, role, password.as_deref()).await?;
                let console = password.is_some();
                let detail = serde_json::json!({ "user": id, "name": name, "role": role.as_str(), "console": console });
                audit_operator(db, t.id, "user.create", detail).await?;
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"id": id, "credential": credential, "role": role.as_str(), "console": console})
                    );
                } else {
                    println!("{credential}");
                    eprintln!(
                        "API credential for user {name} ({id}), role {}, tenant {tenant}: shown once, keep it secret",
                        role.as_str()
                    );
                    if console {
                        eprintln!("{name} can sign in to the console at /login with the password given");
                    }
                }
                Ok(())
            })
        }
        Command::Audit(AuditCommand::Verify { tenant, json }) => with_db(&config, async |db| {
            let t = tenants::by_name(db, &tenant).await?;
            match lifeboat_server::audit::verify(db, t.id).await {
                Ok(v) if json => println!("{}", serde_json::json!({"tenant": tenant, "ok": true, "chain": v})),
                Ok(v) => println!(
                    "audit log of tenant {tenant}: {} events, chain intact (events {} to {}), head {}",
                    v.events,
                    v.first_seq.unwrap_or(0),
                    v.last_seq.unwrap_or(0),
                    v.head.as_deref().unwrap_or("-")
                ),
                Err(lifeboat_server::audit::VerifyError::Broken(b)) => {
                    if json {
                        println!("{}", serde_json::json!({"tenant": tenant, "ok": false, "broken": b}));
                    }
                    anyhow::bail!("the audit log of tenant {tenant} is broken at {b}");
                }
                Err(e) => return Err(e.into()),
            }
            Ok(())
        }),
        Command::Device(DeviceCommand::BackupPassword { tenant, udid, set, json }) => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(backup_password(&config, &tenant, &udid, set, json))
        }
        Command::Verify { tenant, snapshot, device, all, json } => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(verify(&config, tenant.as_deref(), snapshot, device, all, json))
        }
        Command::Agent(AgentCommand::Revoke { id }) => {
            with_db(&config, async |db| credentials::agent_revoke(db, id).await)
        }
        Command::Serve => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(async {
                let mut signals = serve::ShutdownSignal::install()?;
                let running = serve::start(config).await?;
                signals.recv().await;
                tracing::info!("shutting down");
                running.stop().await
            })
        }
    }
}

async fn tenant(config: &Config, cmd: TenantCommand) -> anyhow::Result<()> {
    let master = keys::load_master(config)?;
    let mut db = AdminDb::open(config).await?;
    let result = match cmd {
        TenantCommand::Create { name, encryption, json } => {
            async {
                let required = encryption == Encryption::Required;
                let t = tenants::create_with_policy(&mut db.client, &master, &name, required).await?;
                let policy = if required { "required" } else { "off" };
                if json {
                    println!("{}", serde_json::json!({"id": t.id, "name": t.name, "backup_encryption": policy}));
                } else {
                    println!("created tenant {} ({}), backup encryption {policy}", t.name, t.id);
                }
                Ok(())
            }
            .await
        }
        TenantCommand::Encryption { name, policy } => {
            tenants::set_encryption(&db.client, &name, policy == Encryption::Required).await.map(|()| {
                println!(
                    "tenant {name}: backup encryption {}",
                    if policy == Encryption::Required { "required" } else { "off" }
                );
            })
        }
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

async fn backup_password(config: &Config, tenant: &str, udid: &str, set: bool, json: bool) -> anyhow::Result<()> {
    use lifeboat_server::escrow::{self, Actor, Escrowed};
    use lifeboat_shared::Secret;
    enum Done {
        Set(String, bool),
        Revealed(Escrowed),
    }
    let new = if set {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        let line = line.strip_suffix('\n').unwrap_or(&line);
        Some(Secret::new(line.strip_suffix('\r').unwrap_or(line).to_string()))
    } else {
        None
    };
    if let Some(p) = &new {
        escrow::validate(p.expose())?;
    }
    let master = keys::load_master(config)?;
    let mut db = AdminDb::open(config).await?;
    let result = async {
        let t = tenants::by_name(&db.client, tenant).await?;
        let keys = tenants::keys(&db.client, &master, t.id).await?;
        anyhow::Ok(match &new {
            Some(p) => {
                // Checked against the phone's keybag first: a wrong password is refused, nothing stored.
                let checked = escrow::check(&db.client, &keys, udid, p).await?;
                let set_at = escrow::set(&mut db.client, &keys, udid, p, Actor::Operator).await?;
                Done::Set(set_at, matches!(checked, escrow::Checked::Verified { .. }))
            }
            None => Done::Revealed(escrow::reveal(&mut db.client, &keys, udid, Actor::Operator).await?),
        })
    }
    .await;
    db.close().await;
    match result? {
        Done::Set(set_at, verified) if json => {
            println!("{}", serde_json::json!({"udid": udid, "source": "admin", "set_at": set_at, "verified": verified}))
        }
        Done::Set(set_at, verified) => eprintln!(
            "escrowed the backup password of {udid} (tenant {tenant}) at {set_at}{}",
            if verified {
                "; it unlocks the phone's backup keybag"
            } else {
                "; no backup of the phone has been seen to check it against: the next backup does"
            }
        ),
        Done::Revealed(e) if json => println!(
            "{}",
            serde_json::json!({"udid": udid, "password": e.password.expose(), "source": e.source, "set_at": e.set_at})
        ),
        Done::Revealed(e) => {
            eprintln!(
                "backup password of {udid} (tenant {tenant}), escrowed by {} at {}; this reveal is audited",
                e.source, e.set_at
            );
            println!("{}", e.password.expose());
        }
    }
    Ok(())
}

async fn token_create(
    config: &Config,
    tenant: &str,
    uses: u32,
    expires: std::time::Duration,
    json: bool,
) -> anyhow::Result<()> {
    lifeboat_server::platform::tls::install_default_provider();
    let identity = lifeboat_server::platform::tls::Identity::for_config(config)?;
    let db = AdminDb::open(config).await?;
    let result = async {
        let t = tenants::by_name(&db.client, tenant).await?;
        let (id, token) = lifeboat_server::auth::create_multi_use_token(
            &db.client,
            t.id,
            expires,
            uses,
            config.quic_advertise.clone(),
            identity.fingerprint,
        )
        .await?;
        audit_operator(
            &db.client,
            t.id,
            "enrollment-token.create",
            serde_json::json!({ "token": id, "uses": uses, "expires_in_seconds": expires.as_secs() }),
        )
        .await?;
        anyhow::Ok((t, id, token))
    }
    .await;
    db.close().await;
    let (t, id, token) = result?;
    if json {
        println!(
            "{}",
            serde_json::json!({"token": token.encode(), "id": id, "tenant": t.name, "server": token.server, "uses": uses, "expires_in_seconds": expires.as_secs()})
        );
    } else {
        println!("{}", token.encode());
        let who = if uses == 1 {
            "one-time enrolment token".to_string()
        } else {
            format!("enrolment token for {uses} agents")
        };
        eprintln!(
            "{who} ({id}) for tenant {} at {}, valid for {} s: run `lifeboat-agent enroll <token>` on the workstation{}",
            t.name,
            token.server,
            expires.as_secs(),
            if uses == 1 { "" } else { "s; `token revoke` stops it early" }
        );
    }
    Ok(())
}

async fn verify(
    config: &Config,
    tenant: Option<&str>,
    snapshot: Option<lifeboat_shared::ids::SnapshotId>,
    device: Option<String>,
    all: bool,
    json: bool,
) -> anyhow::Result<()> {
    use lifeboat_server::restore::verify;
    anyhow::ensure!(
        snapshot.is_some() || device.is_some() || all,
        "say what to verify: --snapshot ID, --device UDID or --all"
    );
    let master = keys::load_master(config)?;
    let op = lifeboat_server::objects::operator(&config.storage)?;
    // Beside a running server's own scratch files, in a directory of this command's.
    let scratch = lifeboat_server::ios::Scratch::for_command(&config.data_dir, "verify")?;
    let db = AdminDb::open(config).await?;
    let result = async {
        let only = credentials::tenant_filter(&db.client, tenant).await?;
        // The newest matching snapshot of each device, in every tenant unless one is named.
        let rows =
            lifeboat_server::store::snapshots::newest_matching(&db.client, only, snapshot, device.as_deref()).await?;
        anyhow::ensure!(!rows.is_empty(), "no snapshot matches");
        let total: i64 = rows.iter().map(|r| r.2).sum();
        let mut keys_of = std::collections::HashMap::new();
        let bar = if json {
            indicatif::ProgressBar::hidden()
        } else {
            indicatif::ProgressBar::new(total as u64).with_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} verifying {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )?
                .progress_chars("=> "),
            )
        };
        let mut failed = 0;
        for &(tenant, id, _) in &rows {
            if let std::collections::hash_map::Entry::Vacant(e) = keys_of.entry(tenant) {
                e.insert(std::sync::Arc::new(tenants::keys(&db.client, &master, tenant).await?));
            }
            let keys = &keys_of[&tenant];
            bar.set_message(id.to_string());
            let started = std::time::SystemTime::now();
            let report = verify::verify_snapshot(&db.client, &op, keys, &scratch, id, |n| bar.inc(n)).await?;
            verify::record(&db.client, tenant, &report, started).await?;
            if !report.passed {
                failed += 1;
            }
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                bar.suspend(|| {
                    let c = report.counts;
                    let n = |v: Option<i64>| v.map_or("-".to_string(), |v| v.to_string());
                    println!(
                        "{} {id}: {} files, {} bytes in {:.1} s; messages {}, contacts {}, photos {}",
                        if report.passed { "PASSED" } else { "FAILED" },
                        report.files_checked,
                        report.bytes_checked,
                        report.seconds,
                        n(c.messages),
                        n(c.contacts),
                        n(c.photos)
                    );
                    for p in &report.problems {
                        println!("  {p}");
                    }
                });
            }
        }
        bar.finish_and_clear();
        anyhow::ensure!(failed == 0, "{failed} of {} snapshots failed their restore test", rows.len());
        Ok(())
    }
    .await;
    db.close().await;
    result
}
