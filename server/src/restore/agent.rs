//! What an agent reads back: the latest snapshot of a device, a snapshot's sealed
//! manifest, chunk blobs (sent as stored: the agent verifies them), and restore jobs
//! claimed and ended under their lease.

use futures_io::AsyncWrite;
use lifeboat_shared::ids::{ChunkId, RestoreJobId, SnapshotId, Udid};
use lifeboat_shared::manifest::DeviceInfo;
use lifeboat_shared::wire::{self, BYTES_PART, Data, ErrorCode, MAX_IDS_PER_REQUEST, Response, RestoreEnd};

use crate::app::App;
use crate::objects::packs;
use crate::session::{Rejection, Reply, Session, valid_reason};
use crate::store::{self, chunks::IndexError};

async fn respond<W: AsyncWrite + Unpin>(send: &mut W, r: &Response) -> Reply {
    wire::write_frame(send, r).await.map_err(Into::into)
}

pub async fn latest_snapshot(app: &App, s: Session, udid: &Udid) -> Result<Response, Rejection> {
    let client = app.db.get().await?;
    let l = store::snapshots::latest(&client, s.tenant, udid.as_str())
        .await?
        .ok_or_else(|| Rejection::new(ErrorCode::NotFound, format!("device {udid} has no snapshot")))?;
    Ok(Response::Snapshot {
        snapshot: l.id,
        device: DeviceInfo {
            udid: udid.clone(),
            name: l.name,
            product_type: l.product_type,
            ios_version: l.ios_version,
        },
        created_unix_ms: l.committed_unix_ms,
    })
}

pub async fn get_manifest<W: AsyncWrite + Unpin>(app: &App, s: Session, snapshot: SnapshotId, send: &mut W) -> Reply {
    let key = {
        let client = app.db.get().await?;
        store::snapshots::manifest_key(&client, s.tenant, snapshot)
            .await?
            .ok_or_else(|| Rejection::new(ErrorCode::NotFound, format!("no snapshot {snapshot}")))?
    };
    let bytes = app.storage.read(&key).await.map_err(|e| Rejection::internal("reading a manifest", e))?.to_vec();
    respond(send, &Response::Manifest { snapshot, bytes: bytes.len() as u64 }).await?;
    for part in bytes.chunks(BYTES_PART) {
        wire::write_frame(send, &Data::Bytes(part.to_vec())).await?;
    }
    wire::write_frame(send, &Data::End).await?;
    Ok(())
}

pub async fn get_chunks<W: AsyncWrite + Unpin>(app: &App, s: Session, ids: Vec<ChunkId>, send: &mut W) -> Reply {
    if ids.len() > MAX_IDS_PER_REQUEST {
        return Err(Rejection::new(ErrorCode::TooLarge, format!("at most {MAX_IDS_PER_REQUEST} ids per request")));
    }
    let locations = {
        let client = app.db.get().await?;
        match store::chunks::locate(&client, s.tenant, &ids).await {
            Ok(l) => l,
            Err(e @ IndexError::Missing { .. }) => return Err(Rejection::new(ErrorCode::NotFound, e.to_string())),
            Err(e) => return Err(Rejection::internal("locating chunks", e)),
        }
    };
    respond(send, &Response::Ok).await?;
    for group in packs::read_groups(&locations) {
        let blobs = packs::read_group(&app.storage, s.tenant, group)
            .await
            .map_err(|e| Rejection::internal("reading a pack", e))?;
        for (id, blob) in blobs {
            wire::write_frame(send, &Data::Blob { id, blob }).await?;
        }
    }
    wire::write_frame(send, &Data::End).await?;
    Ok(())
}

/// Claims the oldest open restore job for the device, for this agent.
pub async fn next_restore(app: &App, s: Session, udid: &Udid) -> Result<Response, Rejection> {
    let client = app.db.get().await?;
    Ok(match store::restore_jobs::claim_next(&client, s.tenant, s.agent, udid.as_str()).await? {
        Some((job, snapshot)) => {
            tracing::info!(agent.id = %s.agent, restore.id = %job, snapshot.id = %snapshot, device.udid = %udid, "restore job claimed");
            Response::RestoreJob { job, snapshot }
        }
        None => Response::Ok,
    })
}

pub async fn end_restore(app: &App, s: Session, job: RestoreJobId, end: RestoreEnd) -> Reply {
    let (status, reason, message) = match &end {
        RestoreEnd::Succeeded => ("succeeded", None, None),
        RestoreEnd::Failed { reason, message } => ("failed", Some(reason.as_str()), Some(message.as_str())),
    };
    if reason.is_some_and(|r| !valid_reason(r)) || message.is_some_and(|m| m.len() > 4096) {
        return Err(Rejection::new(ErrorCode::Malformed, "reason must be a code like device-disconnected"));
    }
    let client = app.db.get().await?;
    if !store::restore_jobs::end(&client, s.tenant, s.agent, job, status, reason, message).await? {
        return Err(Rejection::new(ErrorCode::NotFound, format!("restore job {job} is not running for this agent")));
    }
    tracing::info!(agent.id = %s.agent, restore.id = %job, restore.status = status, restore.reason = reason, "restore job ended");
    Ok(())
}
