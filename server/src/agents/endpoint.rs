//! The QUIC endpoint for agents: accepts connections, runs the hello/welcome handshake
//! (version negotiation and authentication) on the first stream, then serves each
//! further bidirectional stream as one request (`docs/protocol.md`).

use std::sync::Arc;
use std::time::Duration;

use lifeboat_shared::protocol;
use lifeboat_shared::wire::{self, Auth, Enrolled, ErrorCode, Hello, MAX_CONTROL_FRAME_BYTES, Welcome};

use super::Agents;
use crate::auth::{self, AuthError};
use crate::session::Session;

/// Application close codes on the QUIC connection.
pub const CLOSE_OK: u32 = 0;
pub const CLOSE_REFUSED: u32 = 1;
pub const CLOSE_PROTOCOL: u32 = 2;
pub const CLOSE_SHUTDOWN: u32 = 3;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often buffers of abandoned runs are flushed and dropped.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Accepts connections until `stop` resolves, then closes the endpoint.
pub async fn serve(endpoint: quinn::Endpoint, hub: Arc<Agents>, stop: impl Future<Output = ()>) {
    let accept = async {
        while let Some(incoming) = endpoint.accept().await {
            let hub = hub.clone();
            tokio::spawn(async move {
                match incoming.await {
                    Ok(conn) => connection(hub, conn).await,
                    Err(e) => tracing::debug!(error = %e, "QUIC handshake failed"),
                }
            });
        }
    };
    let sweep = async {
        let mut every = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            every.tick().await;
            hub.ingest.sweep().await;
        }
    };
    tokio::select! {
        () = accept => {}
        () = sweep => {}
        () = stop => {}
    }
    endpoint.close(CLOSE_SHUTDOWN.into(), b"server shutting down");
}

async fn connection(hub: Arc<Agents>, conn: quinn::Connection) {
    hub.app.metrics.quic_connections.inc();
    let remote = conn.remote_address();
    match handshake(&hub, &conn).await {
        Ok(session) => {
            tracing::debug!(agent.id = %session.agent, tenant.id = %session.tenant, %remote, "agent connected");
            loop {
                match conn.accept_bi().await {
                    Ok((send, recv)) => {
                        let hub = hub.clone();
                        tokio::spawn(async move {
                            let mut send = send;
                            hub.serve_stream(session, recv, &mut send).await;
                            let _ = send.finish();
                        });
                    }
                    Err(e) => {
                        let stats = conn.stats();
                        tracing::debug!(
                            agent.id = %session.agent,
                            reason = %e,
                            quic.udp_rx.datagrams = stats.udp_rx.datagrams,
                            quic.udp_rx.ios = stats.udp_rx.ios,
                            quic.udp_rx.bytes = stats.udp_rx.bytes,
                            quic.udp_tx.datagrams = stats.udp_tx.datagrams,
                            quic.path.mtu = stats.path.current_mtu,
                            quic.path.lost_packets = stats.path.lost_packets,
                            "agent disconnected"
                        );
                        break;
                    }
                }
            }
        }
        Err((code, message)) => {
            tracing::info!(%remote, ?code, %message, "refused an agent connection");
        }
    }
    hub.app.metrics.quic_connections.dec();
}

/// Reads the hello, answers with a welcome; on refusal closes the connection.
async fn handshake(hub: &Agents, conn: &quinn::Connection) -> Result<Session, (ErrorCode, String)> {
    let (mut send, mut recv) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok(streams)) => streams,
        Ok(Err(e)) => return Err((ErrorCode::Malformed, format!("no hello stream: {e}"))),
        Err(_) => {
            conn.close(CLOSE_PROTOCOL.into(), b"no hello");
            return Err((ErrorCode::Malformed, "no hello within 10 s".into()));
        }
    };
    let outcome = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        wire::expect_frame::<Hello, _>(&mut recv, MAX_CONTROL_FRAME_BYTES),
    )
    .await
    {
        Ok(Ok(hello)) => welcome(hub, hello).await,
        Ok(Err(e)) => Err((e.code(), format!("bad hello: {e}"))),
        Err(_) => Err((ErrorCode::Malformed, "no hello within 10 s".into())),
    };
    let reply = match &outcome {
        Ok((_, welcome)) => welcome.clone(),
        Err((code, message)) => Welcome::Refused { code: *code, message: message.clone() },
    };
    let written = wire::write_frame(&mut send, &reply).await;
    let _ = send.finish();
    match outcome {
        Ok((session, _)) if written.is_ok() => Ok(session),
        Ok(_) => Err((ErrorCode::Internal, "could not send the welcome".into())),
        Err(refusal) => {
            // Let the agent read the refusal before the connection goes.
            let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
            conn.close(CLOSE_REFUSED.into(), refusal.1.as_bytes());
            Err(refusal)
        }
    }
}

async fn welcome(hub: &Agents, hello: Hello) -> Result<(Session, Welcome), (ErrorCode, String)> {
    let version = protocol::negotiate_hello(&hello)?;
    let refuse = |e: AuthError| {
        if matches!(e, AuthError::Refused { .. }) {
            (e.code(), e.to_string())
        } else {
            tracing::error!(error = %e, "authenticating an agent");
            (ErrorCode::Internal, "authentication failed on the server; retry later".into())
        }
    };
    let mut client = hub.app.db.get().await.map_err(|e| {
        tracing::error!(error = %e, "getting a database connection");
        (ErrorCode::Internal, "the server cannot reach its database; retry later".to_string())
    })?;
    let (agent, tenant, enrolled) = match hello.auth {
        Auth::Enroll { token_secret, hostname, agent_version } => {
            let (agent, tenant, refresh) =
                auth::enroll(&mut client, &token_secret, &hostname, &agent_version).await.map_err(refuse)?;
            let keys = hub.app.tenant_keys(tenant).await.map_err(|e| {
                tracing::error!(error = %e, "loading tenant keys");
                (ErrorCode::Internal, "loading the tenant's keys failed on the server; retry later".to_string())
            })?;
            tracing::info!(agent.id = %agent, tenant.id = %tenant, agent.hostname = %hostname, "enrolled an agent");
            let enrolled =
                Enrolled { refresh_secret: refresh.to_vec(), id_key: *keys.id.expose(), data_key: keys.data_bytes() };
            (agent, tenant, Some(enrolled))
        }
        Auth::Access { token } => {
            let (agent, tenant) = hub.app.signer.verify(&token).map_err(refuse)?;
            auth::check_agent(&client, agent, tenant).await.map_err(refuse)?;
            (agent, tenant, None)
        }
        Auth::Refresh { agent, secret } => {
            let tenant = auth::refresh(&client, agent, &secret).await.map_err(refuse)?;
            (agent, tenant, None)
        }
    };
    let access_token = hub.app.signer.issue(agent, tenant).map_err(refuse)?;
    let welcome = Welcome::Accepted {
        version,
        agent,
        tenant,
        access_token,
        access_expires_in_seconds: auth::ACCESS_TTL.as_secs() as u32,
        enrolled,
    };
    Ok((Session { agent, tenant }, welcome))
}
