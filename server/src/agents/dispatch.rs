//! One request stream: read the request, hand it to the subsystem that answers it, write
//! the answer. Refusals become `Response::Error`; the stream is finished either way.

use futures_io::{AsyncRead, AsyncWrite};
use lifeboat_shared::wire::{self, ErrorCode, MAX_CONTROL_FRAME_BYTES, Request, Response};

use super::Agents;
use crate::app::App;
use crate::escrow::{self, Actor, EscrowError};
use crate::keys::TenantKeys;
use crate::restore::agent as restore;
use crate::session::{Rejection, Reply, Session};

async fn respond<W: AsyncWrite + Unpin>(send: &mut W, r: &Response) -> Reply {
    wire::write_frame(send, r).await.map_err(Into::into)
}

async fn ok<W: AsyncWrite + Unpin>(send: &mut W) -> Reply {
    respond(send, &Response::Ok).await
}

impl Agents {
    /// Serves one request stream.
    pub async fn serve_stream<R, W>(&self, s: Session, mut recv: R, mut send: W)
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let result = match wire::expect_frame::<Request, _>(&mut recv, MAX_CONTROL_FRAME_BYTES).await {
            Ok(req) => self.dispatch(s, req, &mut recv, &mut send).await,
            Err(e) => Err(e.into()),
        };
        if let Err(r) = result {
            tracing::debug!(agent.id = %s.agent, code = ?r.code, message = %r.message, "request refused");
            let _ = wire::write_frame(&mut send, &Response::Error { code: r.code, message: r.message }).await;
        }
    }

    async fn dispatch<R, W>(&self, s: Session, req: Request, recv: &mut R, send: &mut W) -> Reply
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let (ingest, app) = (&self.ingest, &*self.app);
        match req {
            Request::RegisterDevice { device, serial_number } => {
                ingest.register_device(s, &device, serial_number).await?;
                ok(send).await
            }
            Request::ReportState { udid, state, message } => {
                ingest.report_state(s, &udid, state, message).await?;
                ok(send).await
            }
            Request::OpenRun { udid, resume } => respond(send, &ingest.open_run(s, &udid, resume).await?).await,
            Request::MissingChunks { run, ids } => {
                let missing = ingest.missing_chunks(s, run, ids).await?;
                respond(send, &Response::Missing { ids: missing }).await
            }
            Request::PutChunks { run } => respond(send, &ingest.put_chunks(s, run, recv).await?).await,
            Request::Commit { run, snapshot } => respond(send, &ingest.commit(s, run, snapshot, recv).await?).await,
            Request::EndRun { run, end } => {
                ingest.end_run(s, run, end).await?;
                ok(send).await
            }
            Request::LatestSnapshot { udid } => respond(send, &restore::latest_snapshot(app, s, &udid).await?).await,
            Request::GetManifest { snapshot } => restore::get_manifest(app, s, snapshot, send).await,
            Request::GetChunks { ids } => restore::get_chunks(app, &self.reads, s, ids, send).await,
            Request::GetPolicy => {
                respond(send, &Response::Policy { backup_interval_seconds: app.backup_interval.as_secs() }).await
            }
            Request::NextRestore { udid } => respond(send, &restore::next_restore(app, s, &udid).await?).await,
            Request::EndRestore { job, end } => {
                restore::end_restore(app, s, job, end).await?;
                ok(send).await
            }
            Request::StartJob { credential, job } => {
                respond(send, &restore::start_job(app, s, &credential, job).await?).await
            }
            Request::GetBackupPassword { udid } => {
                holds_device(app, s, &udid, "GetBackupPassword").await?;
                let password = backup_password(app, s, &udid).await?;
                respond(send, &Response::BackupPassword { password }).await
            }
            Request::GetEncryptionPolicy { udid: _ } => {
                let client = app.db.get().await?;
                let required = crate::store::tenants::encryption_required(&client, s.tenant)
                    .await
                    .map_err(|e| Rejection::internal("reading the encryption policy", e))?;
                respond(send, &Response::EncryptionPolicy { required }).await
            }
            Request::ReportKeybag { udid, keybag } => {
                let keys = tenant_keys(app, s).await?;
                let client = app.db.get().await?;
                escrow::report_keybag(&client, &keys, udid.as_str(), &keybag, s.agent.0).await.map_err(rejection)?;
                ok(send).await
            }
            Request::PutBackupPassword { udid, password } => {
                holds_device(app, s, &udid, "PutBackupPassword").await?;
                let keys = tenant_keys(app, s).await?;
                let mut client = app.db.get().await?;
                escrow::set(&mut client, &keys, udid.as_str(), &password, Actor::Agent(s.agent.0))
                    .await
                    .map_err(rejection)?;
                ok(send).await
            }
        }
    }
}

/// Refuses, as if the device did not exist, a request on a device's backup password from
/// an agent that holds neither its backup lease nor a job on one of its snapshots.
async fn holds_device(app: &App, s: Session, udid: &lifeboat_shared::ids::Udid, request: &'static str) -> Reply {
    let client = app.db.get().await?;
    if crate::store::restore_jobs::holds_device(&client, s.tenant, s.agent, udid.as_str()).await? {
        return Ok(());
    }
    restore::refused(app, s, request, udid);
    Err(Rejection::new(ErrorCode::NotFound, EscrowError::NoDevice(udid.to_string()).to_string()))
}

async fn tenant_keys(app: &App, s: Session) -> Result<std::sync::Arc<TenantKeys>, Rejection> {
    app.tenant_keys(s.tenant).await.map_err(|e| Rejection::internal("opening the tenant's keys", e))
}

fn rejection(e: EscrowError) -> Rejection {
    match e {
        EscrowError::BadPassword(_) | EscrowError::BadKeybag(_) => Rejection::new(ErrorCode::Malformed, e.to_string()),
        EscrowError::NoDevice(_) | EscrowError::NotEscrowed(_) => Rejection::new(ErrorCode::NotFound, e.to_string()),
        e => Rejection::internal("the backup password escrow", e),
    }
}

async fn backup_password(
    app: &App,
    s: Session,
    udid: &lifeboat_shared::ids::Udid,
) -> Result<Option<lifeboat_shared::Secret<String>>, Rejection> {
    let keys = tenant_keys(app, s).await?;
    let client = app.db.get().await?;
    Ok(escrow::for_agent(&client, &keys, udid.as_str()).await.map_err(rejection)?.map(|e| e.password))
}
