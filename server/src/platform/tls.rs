//! The server's QUIC/TLS identity: a certificate generated at first start (kept in the
//! data directory) whose SHA-256 fingerprint enrolment tokens carry, so agents pin it.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use lifeboat_shared::wire::ALPN;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {cause}")]
    Io { path: PathBuf, cause: std::io::Error },
    #[error("generating the server certificate: {0}")]
    Generate(String),
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The certificate and key, and the fingerprint agents pin.
#[derive(Debug, Clone)]
pub struct Identity {
    pub cert: CertificateDer<'static>,
    key: Arc<PrivatePkcs8KeyDer<'static>>,
    pub fingerprint: [u8; 32],
}

/// SHA-256 of a certificate's DER, as pinned by agents.
pub fn fingerprint(cert: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, cert);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The process-wide rustls crypto provider: ring, for everything that uses rustls.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process default (a no-op if already installed).
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Identity {
    /// Loads `<dir>/cert.der` and `<dir>/key.der`, generating them on first use.
    pub fn load_or_create(dir: &Path) -> Result<Self, TlsError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |cause| TlsError::Io { path, cause }
        };
        let (cert_path, key_path) = (dir.join("cert.der"), dir.join("key.der"));
        if !cert_path.exists() || !key_path.exists() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            let names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string(), hostname()];
            let ck = rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&key_path)
                .map_err(io(&key_path))?;
            f.write_all(&ck.signing_key.serialize_der()).and_then(|()| f.sync_all()).map_err(io(&key_path))?;
            std::fs::write(&cert_path, ck.cert.der()).map_err(io(&cert_path))?;
            tracing::info!(tls.cert = %cert_path.display(), "generated the server's QUIC certificate");
        }
        let cert = CertificateDer::from(std::fs::read(&cert_path).map_err(io(&cert_path))?);
        let key = PrivatePkcs8KeyDer::from(std::fs::read(&key_path).map_err(io(&key_path))?);
        let fingerprint = fingerprint(&cert);
        Ok(Self { cert, key: Arc::new(key), fingerprint })
    }

    /// Loads an operator-provided certificate and PKCS#8 key, PEM or DER.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, TlsError> {
        use rustls::pki_types::pem::PemObject as _;
        let read = |p: &Path| std::fs::read(p).map_err(|cause| TlsError::Io { path: p.to_path_buf(), cause });
        let (cert_bytes, key_bytes) = (read(cert_path)?, read(key_path)?);
        let cert = match CertificateDer::pem_slice_iter(&cert_bytes).next() {
            Some(Ok(c)) => c,
            Some(Err(e)) => return Err(TlsError::Config(format!("{}: {e}", cert_path.display()))),
            None => CertificateDer::from(cert_bytes),
        };
        let key = match PrivatePkcs8KeyDer::from_pem_slice(&key_bytes) {
            Ok(k) => k,
            Err(_) => PrivatePkcs8KeyDer::from(key_bytes),
        };
        let identity = Self { fingerprint: fingerprint(&cert), cert, key: Arc::new(key) };
        // Fail at start, not at the first agent: the pair must make a TLS configuration.
        identity.quic_server_config().map_err(|e| TlsError::Config(format!("{}: {e}", cert_path.display())))?;
        Ok(identity)
    }

    /// The configured identity, or the one generated in `<data-dir>/quic/`.
    pub fn for_config(config: &crate::config::Config) -> Result<Self, TlsError> {
        match &config.quic_cert {
            Some((cert, key)) => Self::load(cert, key),
            None => Self::load_or_create(&config.data_dir.join("quic")),
        }
    }

    /// The QUIC server configuration: TLS 1.3, ALPN `lifeboat/1`, windows sized for bulk upload.
    pub fn quic_server_config(&self) -> Result<quinn::ServerConfig, TlsError> {
        let key = PrivateKeyDer::Pkcs8(self.key.clone_key());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(vec![self.cert.clone()], key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        tls.max_early_data_size = 0;
        let crypto =
            quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(Arc::new(transport()));
        Ok(config)
    }
}

/// Largest UDP payload path-MTU discovery probes for. Where the path carries it (a LAN
/// with jumbo frames, loopback) each packet moves four times the data of a 1,500-byte
/// MTU, and per-packet work is most of QUIC's cost; probing above the path's MTU is
/// harmless (lost probes are not congestion).
///
/// Not jumbo frames' 8,952: quinn sends up to 10 datagrams in one GSO system call, Linux
/// refuses a call of more than 64 KiB with EMSGSIZE, and quinn-udp drops such a batch
/// without a word (quinn issues #2201 and #2189), so every batch of 8,952-byte packets was
/// lost and black-hole detection soon set the MTU to 1,200. 10 × 6,500 = 65,000 fits.
pub const MTU_UPPER_BOUND: u16 = 6_500;

/// Socket buffer asked of the kernel for the QUIC socket, each way. The kernel's usual
/// default (208 KiB) overflows whenever the receiving task is off the CPU for a
/// millisecond at a few hundred MB/s: the datagrams are dropped, and QUIC takes each loss
/// for congestion. Linux grants at most twice `net.core.rmem_max` / `wmem_max` (reported
/// that way too); more than [`UDP_RECV_BUFFER_NEEDED`] helps when many agents upload at once.
pub const UDP_BUFFER_BYTES: usize = 32 << 20;

/// The most either side has in flight, unacknowledged: the server for downloads (here),
/// the agent for uploads (its own `SEND_WINDOW_BYTES`, the same figure; it says why).
pub const SEND_WINDOW_BYTES: u64 = 4 << 20;

/// The receive buffer (as Linux reports it, twice what it holds) that takes one peer's
/// [`SEND_WINDOW_BYTES`] in flight: below it, uploads lose datagrams whenever the server is
/// busy, and the server says so at start.
pub const UDP_RECV_BUFFER_NEEDED: usize = 2 * SEND_WINDOW_BYTES as usize;

/// The server's QUIC endpoint on `listen`: datagrams up to [`MTU_UPPER_BOUND`] accepted
/// (quinn's default, 1,472, is also what it tells the peer it may send, so without it
/// path-MTU discovery stops there whatever its upper bound) and [`UDP_BUFFER_BYTES`] of
/// socket buffer.
pub fn quic_endpoint(listen: std::net::SocketAddr, server: quinn::ServerConfig) -> std::io::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(listen)?;
    let state = quinn::udp::UdpSocketState::new((&socket).into())?;
    // Best effort: a smaller buffer only costs drops under bursts.
    let _ = state.set_recv_buffer_size((&socket).into(), UDP_BUFFER_BYTES);
    let _ = state.set_send_buffer_size((&socket).into(), UDP_BUFFER_BYTES);
    // Linux reports twice what it granted (the other half is its bookkeeping).
    match state.recv_buffer_size((&socket).into()) {
        Ok(granted) if granted < UDP_RECV_BUFFER_NEEDED => tracing::warn!(
            udp.recv_buffer.bytes = granted,
            udp.recv_buffer.needed = UDP_RECV_BUFFER_NEEDED,
            "the kernel gives the QUIC socket too small a receive buffer: uploads will lose datagrams and slow down; \
             set net.core.rmem_max to 16777216 or more (deploy/99-lifeboat-server.conf, docs/operations.md)"
        ),
        Ok(granted) if granted < UDP_BUFFER_BYTES => tracing::info!(
            udp.recv_buffer.bytes = granted,
            udp.recv_buffer.wanted = UDP_BUFFER_BYTES,
            "the kernel limits the QUIC socket's receive buffer; with many agents uploading at once, \
             raise net.core.rmem_max (docs/operations.md)"
        ),
        _ => {}
    }
    let mut config = quinn::EndpointConfig::default();
    config.max_udp_payload_size(MTU_UPPER_BOUND).map_err(std::io::Error::other)?;
    quinn::Endpoint::new(config, Some(server), socket, Arc::new(quinn::TokioRuntime))
}

/// The server's transport parameters: generous receive windows for uploads, at most
/// 4 MiB in flight for downloads, path-MTU discovery up to [`MTU_UPPER_BOUND`], a bounded
/// number of concurrent streams per connection.
pub fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_UPPER_BOUND);
    t.mtu_discovery_config(Some(mtu));
    t.max_concurrent_bidi_streams(64u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window((16u32 * 1024 * 1024).into())
        .receive_window((64u32 * 1024 * 1024).into())
        .send_window(SEND_WINDOW_BYTES)
        .keep_alive_interval(Some(Duration::from_secs(10)));
    if let Ok(idle) = Duration::from_secs(60).try_into() {
        t.max_idle_timeout(Some(idle));
    }
    t
}

fn hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into())
}
