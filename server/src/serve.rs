//! `lifeboat-server serve`: bring every part up in order, fail early with one clear message,
//! and take everything down again — the embedded PostgreSQL included — on shutdown.
//!
//! Order at start: data directory (created, writable, locked) → HTTP listener bound (a
//! port in use fails before anything heavy starts) → PostgreSQL (embedded or configured)
//! → migrations → storage → serving. Shutdown runs the same list backwards.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::agents::Agents;
use crate::app::App;
use crate::config::{Config, DatabaseConfig, StorageConfig};
use crate::ingest::Ingest;
use crate::ios::Scratch;
use crate::objects;
use crate::platform::datadir::DataDir;
use crate::platform::db::{self, EMBEDDED_DB};
use crate::platform::metrics::Metrics;
use crate::platform::pg::{Cluster, ClusterOptions};
use crate::platform::tls::{self, Identity};
const DB_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A started server. Stop it with [`Running::stop`].
#[derive(Debug)]
pub struct Running {
    pub http_addr: SocketAddr,
    /// The metrics listener's address, when it has one of its own.
    pub metrics_addr: Option<SocketAddr>,
    pub quic_addr: SocketAddr,
    /// SHA-256 of the QUIC certificate, which agents pin.
    pub cert_fingerprint: [u8; 32],
    /// The embedded cluster, when no database URL was configured.
    pub cluster: Option<Arc<Cluster>>,
    pub app: Arc<App>,
    pub agents: Arc<Agents>,
    stop_tx: watch::Sender<bool>,
    http: JoinHandle<std::io::Result<()>>,
    metrics_http: Option<JoinHandle<std::io::Result<()>>>,
    /// Reloads the HTTP certificate on SIGHUP, with TLS on.
    reload: Option<JoinHandle<()>>,
    quic: JoinHandle<()>,
    fleet: JoinHandle<()>,
    pool: deadpool_postgres::Pool,
    data_dir: DataDir,
}

/// Starts everything and returns once the server is serving.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let data_dir = DataDir::open(&config.data_dir)?;
    let listener = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", config.http_listen))?;
    let http_addr = listener.local_addr().context("reading the HTTP listener's address")?;
    let metrics = match config.metrics_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for metrics on {addr}"))?;
            Some((l.local_addr().context("reading the metrics listener's address")?, l))
        }
        None => None,
    };
    tls::install_default_provider();
    let http_tls = match &config.http_tls {
        Some((cert, key)) => Some(Arc::new(crate::platform::https::ReloadableCert::load(cert, key)?)),
        None => None,
    };
    let identity = Identity::for_config(&config)?;
    let endpoint = tls::quic_endpoint(config.quic_listen, identity.quic_server_config()?)
        .with_context(|| format!("cannot listen for QUIC on {}", config.quic_listen))?;
    let master = Arc::new(crate::keys::load_master(&config)?);

    let (pg_config, cluster) = match &config.database {
        DatabaseConfig::Embedded => {
            let opts = ClusterOptions::new(data_dir.path().join("postgres"));
            let cluster = tokio::task::spawn_blocking(move || Cluster::start(&opts))
                .await
                .context("starting the embedded PostgreSQL")?
                .context("starting the embedded PostgreSQL")?;
            let admin = db::connect(&cluster.config("postgres"), DB_CONNECT_TIMEOUT).await?;
            db::ensure_database(&admin, EMBEDDED_DB).await?;
            (cluster.config(EMBEDDED_DB), Some(Arc::new(cluster)))
        }
        DatabaseConfig::External(url) => (db::parse_url(url.expose())?, None),
    };
    let sockets = Sockets { http_addr, listener, http_tls, metrics, endpoint, fingerprint: identity.fingerprint };
    match bring_up(&config, pg_config, sockets, data_dir, cluster.clone(), master).await {
        Ok(running) => Ok(running),
        Err(e) => {
            if let Some(cluster) = cluster {
                stop_cluster(cluster).await;
            }
            Err(e)
        }
    }
}

/// What was bound before the heavy parts started.
struct Sockets {
    http_addr: SocketAddr,
    listener: tokio::net::TcpListener,
    http_tls: Option<Arc<crate::platform::https::ReloadableCert>>,
    metrics: Option<(SocketAddr, tokio::net::TcpListener)>,
    endpoint: quinn::Endpoint,
    fingerprint: [u8; 32],
}

async fn bring_up(
    config: &Config,
    pg_config: tokio_postgres::Config,
    sockets: Sockets,
    data_dir: DataDir,
    cluster: Option<Arc<Cluster>>,
    master: Arc<crate::keys::MasterKey>,
) -> anyhow::Result<Running> {
    let Sockets { http_addr, listener, http_tls, metrics: metrics_listener, endpoint, fingerprint } = sockets;
    let quic_addr = endpoint.local_addr().context("reading the QUIC endpoint's address")?;
    let mut client = db::connect(&pg_config, DB_CONNECT_TIMEOUT).await?;
    let report = db::migrate(&mut client).await?;
    let signer = crate::auth::Signer::load_or_create(&client, &master).await?;
    drop(client);
    let pool = db::pool(pg_config.clone(), config.db_max_connections)?;

    let op = objects::operator(&config.storage)?;
    objects::ping(&op, Duration::from_secs(10)).await.map_err(|e| anyhow::anyhow!("storage is not usable: {e}"))?;

    let metrics = Arc::new(Metrics::new().context("registering metrics")?);
    let scratch = Scratch::in_data_dir(data_dir.path())
        .with_context(|| format!("preparing {}/scratch", data_dir.path().display()))?;
    let mut app = App::new(pool.clone(), op, master, signer, metrics, scratch);
    app.backup_interval = config.backup_interval;
    app.console.secure_cookies = config.http_tls.is_some();
    app.console.stale_after = config.fleet.stale_after;
    let app = Arc::new(app);
    let mut ingest = Ingest::new(app.clone());
    ingest.local_root = objects::local_root(&config.storage);
    let agents = Arc::new(Agents { app: app.clone(), ingest, reads: Default::default() });
    let router = crate::http::router(app.clone(), metrics_listener.is_none());
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    use crate::platform::https;
    let (http, reload) = match &http_tls {
        Some(cert) => {
            let tls = https::TlsListener::new(listener, https::server_config(cert.clone())?)?;
            let reload = https::reload_on_sighup(cert.clone()).context("watching for SIGHUP")?;
            let service = router.into_make_service_with_connect_info::<https::ClientAddr>();
            (tokio::spawn(axum::serve(tls, service).with_graceful_shutdown(stopped()).into_future()), Some(reload))
        }
        None => {
            // The caller's address reaches the audit log of the console.
            let service = router.into_make_service_with_connect_info::<https::ClientAddr>();
            (tokio::spawn(axum::serve(listener, service).with_graceful_shutdown(stopped()).into_future()), None)
        }
    };
    let metrics_addr = metrics_listener.as_ref().map(|(addr, _)| *addr);
    let metrics_http = metrics_listener.map(|(_, l)| {
        let r = crate::http::metrics_router(app.clone());
        tokio::spawn(axum::serve(l, r).with_graceful_shutdown(stopped()).into_future())
    });
    let quic = tokio::spawn(crate::agents::endpoint::serve(endpoint, agents.clone(), stopped()));
    let fleet = {
        let (app, config, stop) = (app.clone(), config.fleet.clone(), stopped());
        tokio::spawn(async move {
            tokio::select! {
                () = crate::jobs::run(app, config) => {}
                () = stop => {}
            }
        })
    };

    let storage = match &config.storage {
        StorageConfig::Fs { root } => format!("fs {}", root.display()),
        StorageConfig::S3(s3) => format!("s3 bucket {} at {}", s3.bucket, s3.endpoint.as_deref().unwrap_or("AWS")),
    };
    tracing::info!(
        http.addr = %http_addr,
        http.tls = http_tls.is_some(),
        metrics.addr = %metrics_addr.unwrap_or(http_addr),
        quic.addr = %quic_addr,
        data_dir = %data_dir.path().display(),
        database = %match &cluster {
            Some(c) => format!("embedded ({})", c.root().display()),
            None => db::describe(&pg_config),
        },
        db.schema_version = report.current.unwrap_or(0),
        storage = %storage,
        "lifeboat-server is ready: http://{http_addr}/readyz, http://{}/metrics",
        metrics_addr.unwrap_or(http_addr)
    );
    Ok(Running {
        http_addr,
        metrics_addr,
        quic_addr,
        cert_fingerprint: fingerprint,
        cluster,
        app,
        agents,
        stop_tx,
        http,
        metrics_http,
        reload,
        quic,
        fleet,
        pool,
        data_dir,
    })
}

impl Running {
    /// The (canonical) data directory the server holds locked.
    pub fn data_dir(&self) -> &std::path::Path {
        self.data_dir.path()
    }

    /// Stops serving, closes the pool and stops the embedded PostgreSQL.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop_tx.send(true);
        let served = self.http.await;
        if let Some(r) = self.reload {
            r.abort();
        }
        if let Some(m) = self.metrics_http {
            let _ = m.await;
        }
        let _ = self.quic.await;
        let _ = self.fleet.await;
        self.pool.close();
        if let Some(cluster) = self.cluster {
            stop_cluster(cluster).await;
        }
        served.context("HTTP server task")?.context("HTTP server")?;
        tracing::info!("lifeboat-server stopped");
        Ok(())
    }
}

async fn stop_cluster(cluster: Arc<Cluster>) {
    let stopped = tokio::task::spawn_blocking(move || match Arc::try_unwrap(cluster) {
        Ok(cluster) => cluster.stop(),
        // Still shared: its last owner's drop stops it.
        Err(_) => Ok(()),
    })
    .await;
    match stopped {
        Ok(Ok(())) => tracing::info!("embedded PostgreSQL stopped"),
        Ok(Err(e)) => tracing::warn!(error = %e, "embedded PostgreSQL did not stop cleanly"),
        Err(e) => tracing::warn!(error = %e, "stopping the embedded PostgreSQL"),
    }
}

/// Ctrl-C (SIGINT) and SIGTERM, caught from the moment it is installed: a signal that
/// arrives while the server is still starting is kept and stops it right after.
#[derive(Debug)]
pub struct ShutdownSignal {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl ShutdownSignal {
    pub fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self { int: signal(SignalKind::interrupt())?, term: signal(SignalKind::terminate())? })
    }

    /// Resolves on the first SIGINT or SIGTERM.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}
