//! The agent's side of the wire protocol: a QUIC connection to the server that pins the
//! server's certificate fingerprint, authenticates in the hello, and runs one request per
//! bidirectional stream. What each answer must look like is `lifeboat_shared::protocol`'s
//! state machine; this module only moves frames between it and QUIC streams.
//! Never here: keys, files or devices; nothing else in the agent talks to the server.

use std::net::SocketAddr;
use std::sync::Arc;

use lifeboat_shared::ids::{ChunkId, RunId, SnapshotId};
use lifeboat_shared::protocol::{self, Answer, Next, ProtocolError, Step};
use lifeboat_shared::wire::{
    self, ALPN, Auth, BYTES_PART, Data, ErrorCode, MAX_CONTROL_FRAME_BYTES, MAX_DATA_FRAME_BYTES, Request, Response,
    Welcome,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the server at {addr}: {message}")]
    Connect { addr: String, message: String },
    #[error("the server refused: {message} ({code:?})")]
    Refused { code: ErrorCode, message: String },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error(transparent)]
    Frame(#[from] wire::FrameError),
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
}

impl ClientError {
    /// The server's refusal code, if this is a refusal.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl From<ProtocolError> for ClientError {
    fn from(e: ProtocolError) -> Self {
        match e {
            ProtocolError::Refused { code, message } => Self::Refused { code, message },
            ProtocolError::Violation(what) => Self::Protocol(what),
        }
    }
}

/// Reads `req`'s answer from `recv` through the protocol's state machine, handing each
/// streamed part to `part`; returns the answer's response.
async fn read_answer(
    recv: &mut quinn::RecvStream,
    req: &Request,
    mut part: impl FnMut(Step),
) -> Result<Response, ClientError> {
    let mut answer = Answer::to(req);
    while let Some(next) = answer.next() {
        let step = match next {
            Next::Response => answer.on_response(wire::expect_frame(recv, MAX_CONTROL_FRAME_BYTES).await?)?,
            Next::Data => answer.on_data(wire::expect_frame(recv, MAX_DATA_FRAME_BYTES).await?)?,
        };
        match step {
            Step::Done(r) => return Ok(r),
            Step::More => {}
            other => part(other),
        }
    }
    Err(ClientError::Protocol("the answer ended without a response".into()))
}

/// Accepts exactly one server certificate: the one whose SHA-256 the enrolment token
/// named. TLS 1.3 handshake signatures are still verified with it.
#[derive(Debug)]
struct PinnedCert {
    fingerprint: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let d = ring::digest::digest(&ring::digest::SHA256, end_entity.as_ref());
        if d.as_ref() == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("server certificate does not match the pinned fingerprint".into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// What the server said when it accepted the connection.
pub use lifeboat_shared::protocol::Accepted;

/// A QUIC connection to `server` that checks its certificate against `fingerprint`, before
/// any hello (tests use it to send what a well-behaved agent would not).
pub async fn connect_raw(
    server: &str,
    fingerprint: [u8; 32],
) -> Result<(quinn::Endpoint, quinn::Connection), ClientError> {
    let connect_err = |message: String| ClientError::Connect { addr: server.to_string(), message };
    let addr: SocketAddr = tokio::net::lookup_host(server)
        .await
        .map_err(|e| connect_err(e.to_string()))?
        .next()
        .ok_or_else(|| connect_err("no address".into()))?;
    let bind: SocketAddr = if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
        .parse()
        .map_err(|e: std::net::AddrParseError| connect_err(e.to_string()))?;
    let mut endpoint = quic_endpoint(bind).map_err(|e| connect_err(e.to_string()))?;
    endpoint.set_default_client_config(client_config(fingerprint)?);
    let conn = endpoint
        .connect(addr, "lifeboat")
        .map_err(|e| connect_err(e.to_string()))?
        .await
        .map_err(|e| connect_err(e.to_string()))?;
    Ok((endpoint, conn))
}

/// An authenticated connection to a Lifeboat server. Clones share the connection.
#[derive(Debug, Clone)]
pub struct Client {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    pub accepted: Accepted,
}

/// Largest UDP payload path-MTU discovery probes for, as on the server (its
/// `MTU_UPPER_BOUND`, which says why not 8,952): jumbo frames where the path carries them,
/// 1,452 bytes or so where it does not.
const MTU_UPPER_BOUND: u16 = 6_500;

/// Socket buffers asked of the kernel, each way (Linux grants at most twice
/// `net.core.rmem_max`): a restore downloads up to the server's 4 MiB in flight, and the
/// agent's tasks may be busy when it arrives.
const UDP_BUFFER_BYTES: usize = 4 << 20;

/// The most the agent has in flight, unacknowledged. The server's socket buffer must hold
/// it: what does not fit while the server's receiving task is off the CPU for a moment is
/// dropped, and QUIC halves its congestion window for each loss. With a 64 MiB window the
/// congestion window alone bounded what was in flight, and on loopback it grew to 10-15
/// MB: hundreds of drops per backup here. The server asks for 32 MiB of buffer and warns
/// at start when it got less than 8 MiB (`net.core.rmem_max` under 4 MiB: many systems
/// default to 208 KiB; docs/operations.md). On a long path this caps one agent at 4 MiB
/// per round trip, 84 MB/s at 50 ms: more than a workstation's uplink.
const SEND_WINDOW_BYTES: u64 = 4 * 1024 * 1024;
/// The least time [`Client::close`] gives its close to go out.
const CLOSE_WAIT_MIN: std::time::Duration = std::time::Duration::from_millis(10);

/// A client endpoint on `bind` that accepts datagrams up to [`MTU_UPPER_BOUND`]. quinn's
/// default, 1,472, is also what it tells the server it may send, and the server's
/// path-MTU discovery stops there.
fn quic_endpoint(bind: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(bind)?;
    let state = quinn::udp::UdpSocketState::new((&socket).into())?;
    // Best effort: the kernel caps both at net.core.{r,w}mem_max.
    let _ = state.set_recv_buffer_size((&socket).into(), UDP_BUFFER_BYTES);
    let _ = state.set_send_buffer_size((&socket).into(), UDP_BUFFER_BYTES);
    let mut config = quinn::EndpointConfig::default();
    config.max_udp_payload_size(MTU_UPPER_BOUND).map_err(std::io::Error::other)?;
    quinn::Endpoint::new(config, None, socket, Arc::new(quinn::TokioRuntime))
}

fn client_config(fingerprint: [u8; 32]) -> Result<quinn::ClientConfig, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedCert { fingerprint, provider: provider.clone() });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Protocol(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| ClientError::Protocol(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // Path-MTU discovery up to the bound the server uses too.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_UPPER_BOUND);
    transport
        .mtu_discovery_config(Some(mtu))
        .stream_receive_window((16u32 * 1024 * 1024).into())
        .receive_window((64u32 * 1024 * 1024).into())
        .send_window(SEND_WINDOW_BYTES)
        .keep_alive_interval(Some(std::time::Duration::from_secs(10)));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

impl Client {
    /// Connects to `server` (`host:port`), checks its certificate against `fingerprint`,
    /// and authenticates with `auth`.
    pub async fn connect(server: &str, fingerprint: [u8; 32], auth: Auth) -> Result<Self, ClientError> {
        let (endpoint, conn) = connect_raw(server, fingerprint).await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        let hello = protocol::hello(auth);
        wire::write_frame(&mut send, &hello).await?;
        let _ = send.finish();
        let welcome: Welcome = wire::expect_frame(&mut recv, MAX_CONTROL_FRAME_BYTES).await?;
        let accepted = protocol::on_welcome(&hello.versions, welcome)?;
        Ok(Self { endpoint, conn, accepted })
    }

    /// Bytes this connection has put on the wire (UDP payloads), for transfer accounting.
    pub fn bytes_sent(&self) -> u64 {
        self.conn.stats().udp_tx.bytes
    }

    /// The connection's QUIC counters: path MTU, losses, datagrams and system calls.
    pub fn quic_stats(&self) -> quinn::ConnectionStats {
        self.conn.stats()
    }

    /// Sends one request and reads its response.
    pub async fn request(&self, req: &Request) -> Result<Response, ClientError> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        wire::write_frame(&mut send, req).await?;
        let _ = send.finish();
        read_answer(&mut recv, req, |_| {}).await
    }

    /// Uploads blobs on one stream.
    pub async fn put_chunks(&self, run: RunId, blobs: Vec<(ChunkId, Vec<u8>)>) -> Result<Response, ClientError> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        let req = Request::PutChunks { run };
        wire::write_frame(&mut send, &req).await?;
        for (id, blob) in blobs {
            // The frame's header, then the blob handed to QUIC as it is: no copy into a
            // message buffer, none into QUIC's send buffer.
            wire::write_all(&mut send, &wire::blob_frame_header(&id, blob.len())).await?;
            send.write_chunk(bytes::Bytes::from(blob)).await.map_err(|e| wire::FrameError::Io(e.into()))?;
        }
        wire::write_frame(&mut send, &Data::End).await?;
        let _ = send.finish();
        read_answer(&mut recv, &req, |_| {}).await
    }

    /// Commits a run's snapshot with its sealed manifest.
    pub async fn commit(&self, run: RunId, snapshot: SnapshotId, sealed: &[u8]) -> Result<Response, ClientError> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        let req = Request::Commit { run, snapshot };
        wire::write_frame(&mut send, &req).await?;
        for part in sealed.chunks(BYTES_PART) {
            wire::write_frame(&mut send, &Data::Bytes(part.to_vec())).await?;
        }
        wire::write_frame(&mut send, &Data::End).await?;
        let _ = send.finish();
        read_answer(&mut recv, &req, |_| {}).await
    }

    /// A snapshot's sealed manifest.
    pub async fn get_manifest(&self, snapshot: SnapshotId) -> Result<Vec<u8>, ClientError> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        let req = Request::GetManifest { snapshot };
        wire::write_frame(&mut send, &req).await?;
        let _ = send.finish();
        let mut out = Vec::new();
        read_answer(&mut recv, &req, |step| {
            if let Step::Bytes(part) = step {
                out.extend_from_slice(&part);
            }
        })
        .await?;
        Ok(out)
    }

    /// Blobs of the given chunks (not yet verified: the caller opens and verifies them).
    pub async fn get_chunks(&self, ids: &[ChunkId]) -> Result<Vec<(ChunkId, Vec<u8>)>, ClientError> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        let req = Request::GetChunks { ids: ids.to_vec() };
        wire::write_frame(&mut send, &req).await?;
        let _ = send.finish();
        let mut out = Vec::with_capacity(ids.len());
        read_answer(&mut recv, &req, |step| {
            if let Step::Blob(id, blob) = step {
                out.push((id, blob));
            }
        })
        .await?;
        Ok(out)
    }

    /// Closes the connection. Every request has had its answer by then, so what is left is
    /// for the server to learn of the close: the agent waits a few round trips for that
    /// (at least [`CLOSE_WAIT_MIN`]), not the whole draining period (three probe timeouts,
    /// ~90 ms even on loopback), which matters only if the close is lost — the server then
    /// lets the connection time out.
    pub async fn close(self) {
        let stats = self.quic_stats();
        tracing::debug!(
            quic.udp_tx.datagrams = stats.udp_tx.datagrams,
            quic.udp_tx.ios = stats.udp_tx.ios,
            quic.udp_tx.bytes = stats.udp_tx.bytes,
            quic.udp_rx.datagrams = stats.udp_rx.datagrams,
            quic.udp_rx.ios = stats.udp_rx.ios,
            quic.path.mtu = stats.path.current_mtu,
            quic.path.rtt_us = stats.path.rtt.as_micros() as u64,
            quic.path.cwnd = stats.path.cwnd,
            quic.path.lost_packets = stats.path.lost_packets,
            quic.path.congestion_events = stats.path.congestion_events,
            "QUIC connection closing"
        );
        self.conn.close(0u32.into(), b"bye");
        let wait = (stats.path.rtt * 3).max(CLOSE_WAIT_MIN);
        let _ = tokio::time::timeout(wait, self.endpoint.wait_idle()).await;
    }
}
