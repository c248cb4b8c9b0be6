//! TLS on the HTTP listener (`--http-tls-cert-file`, `--http-tls-key-file`): the
//! operator's certificate chain and key, PEM, read at start — a bad pair stops the start
//! with the file named — and again on SIGHUP, when a bad pair is logged and the serving
//! one kept. Handshakes run beside the accept loop, each under a deadline, so a client
//! that stalls in its handshake holds up no one else.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;

use super::tls::{TlsError, provider};

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The certificate the HTTP listener presents, replaced by [`Self::reload`].
#[derive(Debug)]
pub struct ReloadableCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadableCert {
    /// Reads the pair, or says which file is wrong.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Self, TlsError> {
        let key = read_pair(cert_file, key_file)?;
        Ok(Self { cert_file: cert_file.into(), key_file: key_file.into(), current: RwLock::new(Arc::new(key)) })
    }

    /// Reads the files again; on success the next handshakes present the new
    /// certificate, on failure the current one stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let key = read_pair(&self.cert_file, &self.key_file)?;
        *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(key);
        Ok(())
    }

    /// The certificate (leaf first) being presented.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).cert.clone()
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone())
    }
}

fn read_pair(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, TlsError> {
    let read = |p: &Path| std::fs::read(p).map_err(|cause| TlsError::Io { path: p.to_path_buf(), cause });
    let bad = |p: &Path, what: String| TlsError::Config(format!("{}: {what}", p.display()));
    let chain = CertificateDer::pem_slice_iter(&read(cert_file)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(cert_file, e.to_string()))?;
    if chain.is_empty() {
        return Err(bad(cert_file, "no PEM certificate in it".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(&read(key_file)?).map_err(|e| bad(key_file, e.to_string()))?;
    let signing = provider().key_provider.load_private_key(key).map_err(|e| bad(key_file, e.to_string()))?;
    let key = CertifiedKey::new(chain, signing);
    key.keys_match().map_err(|e| bad(key_file, format!("does not match the certificate: {e}")))?;
    Ok(key)
}

/// The rustls configuration of the HTTP listener: TLS 1.2 and 1.3 on ring, HTTP/1.1.
pub fn server_config(cert: Arc<ReloadableCert>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A TCP listener whose connections come out of their TLS handshake, for `axum::serve`.
#[derive(Debug)]
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    accepting: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    pub fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let accepting = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: wait rather than spin.
                        tracing::warn!(error = %e, "accepting an HTTPS connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(peer = %peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(peer = %peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { ready, local, accepting })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept loop only ends with the listener.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Reloads `cert` on every SIGHUP until the task is aborted.
pub fn reload_on_sighup(cert: Arc<ReloadableCert>) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match cert.reload() {
                Ok(()) => tracing::info!(
                    tls.cert = %cert.cert_file.display(),
                    "SIGHUP: the HTTP listener presents the certificate read again"
                ),
                Err(e) => tracing::error!(
                    error = %e,
                    "SIGHUP: the HTTP certificate could not be read again; the one in use stays"
                ),
            }
        }
    }))
}

/// The address of the peer of an HTTP connection, plain or TLS, for handlers that record
/// it (`ConnectInfo<ClientAddr>`; the console's audit log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

impl<'a> axum::extract::connect_info::Connected<axum::serve::IncomingStream<'a, TlsListener>> for ClientAddr {
    fn connect_info(stream: axum::serve::IncomingStream<'a, TlsListener>) -> Self {
        Self(*stream.remote_addr())
    }
}

impl<'a> axum::extract::connect_info::Connected<axum::serve::IncomingStream<'a, TcpListener>> for ClientAddr {
    fn connect_info(stream: axum::serve::IncomingStream<'a, TcpListener>) -> Self {
        Self(*stream.remote_addr())
    }
}
