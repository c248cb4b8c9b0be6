//! What an agent reads back: the latest snapshot of a device, a snapshot's sealed
//! manifest, chunk blobs (sent as stored: the agent verifies them), and restore jobs
//! claimed, started (by a help-desk user at the workstation) and ended under their lease.
//!
//! An agent reads only the snapshots of its running jobs: a manifest or chunks of any
//! other snapshot are refused with the answer a missing one gets (`NotFound`, the same
//! message), logged and counted in `lifeboat_agent_reads_refused_total`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures_io::AsyncWrite;
use lifeboat_shared::Secret;
use lifeboat_shared::ids::{ChunkId, RestoreJobId, SnapshotId, TenantId, Udid};
use lifeboat_shared::manifest::DeviceInfo;
use lifeboat_shared::wire::{
    self, BYTES_PART, Data, ErrorCode, JobRequest, JobSource, MAX_CREDENTIAL_BYTES, MAX_IDS_PER_REQUEST, Response,
    RestoreEnd,
};

use crate::app::App;
use crate::objects::packs;
use crate::session::{Rejection, Reply, Session, valid_reason};
use crate::store::restore_jobs::{Kind, Queued};
use crate::store::{self, chunks::IndexError};
use crate::users::Role;

/// The chunk ids of snapshots being restored, which decide what `GetChunks` serves: read
/// from a snapshot's manifest once, kept for at most [`CHUNK_SETS`] snapshots.
#[derive(Debug, Default)]
pub struct Reads {
    chunk_sets: Mutex<HashMap<(TenantId, SnapshotId), ChunkSet>>,
}

/// The ids of every chunk one snapshot references.
type ChunkSet = Arc<HashSet<ChunkId>>;

/// Snapshots whose chunk sets [`Reads`] keeps (a few MB each at 50,000 files).
const CHUNK_SETS: usize = 32;

impl Reads {
    async fn chunks_of(&self, app: &App, tenant: TenantId, snapshot: SnapshotId) -> Result<ChunkSet, Rejection> {
        if let Some(set) = crate::app::lock(&self.chunk_sets).get(&(tenant, snapshot)) {
            return Ok(set.clone());
        }
        let keys = app.tenant_keys(tenant).await.map_err(|e| Rejection::internal("opening the tenant's keys", e))?;
        let key = {
            let client = app.db.get().await?;
            store::snapshots::manifest_key(&client, tenant, snapshot)
                .await?
                .ok_or_else(|| Rejection::new(ErrorCode::NotFound, format!("no snapshot {snapshot}")))?
        };
        let manifest = super::read::manifest(&app.storage, &keys, snapshot, &key)
            .await
            .map_err(|e| Rejection::internal("opening a manifest", e))?;
        let set: ChunkSet = Arc::new(manifest.files.iter().flat_map(|f| f.chunks.iter().map(|c| c.id)).collect());
        let mut sets = crate::app::lock(&self.chunk_sets);
        if sets.len() >= CHUNK_SETS {
            // Rarely more than a few restores run at once: starting over is enough.
            sets.clear();
        }
        sets.insert((tenant, snapshot), set.clone());
        Ok(set)
    }
}

/// Counts and logs a request for data outside the agent's jobs and leases.
pub fn refused(app: &App, s: Session, request: &'static str, what: &dyn std::fmt::Display) {
    app.metrics.reads_refused.with_label_values(&[request]).inc();
    tracing::warn!(
        agent.id = %s.agent, tenant.id = %s.tenant, request, asked = %what,
        "refused an agent's read outside its jobs and leases"
    );
}

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
        if !store::restore_jobs::readable_snapshots(&client, s.tenant, s.agent).await?.contains(&snapshot) {
            refused(app, s, "GetManifest", &snapshot);
            return Err(Rejection::new(ErrorCode::NotFound, format!("no snapshot {snapshot}")));
        }
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

pub async fn get_chunks<W: AsyncWrite + Unpin>(
    app: &App,
    reads: &Reads,
    s: Session,
    ids: Vec<ChunkId>,
    send: &mut W,
) -> Reply {
    if ids.len() > MAX_IDS_PER_REQUEST {
        return Err(Rejection::new(ErrorCode::TooLarge, format!("at most {MAX_IDS_PER_REQUEST} ids per request")));
    }
    // One pool connection at a time: a chunk set not yet known takes one of its own.
    let readable = {
        let client = app.db.get().await?;
        store::restore_jobs::readable_snapshots(&client, s.tenant, s.agent).await?
    };
    let mut sets = Vec::new();
    for snapshot in readable {
        sets.push(reads.chunks_of(app, s.tenant, snapshot).await?);
    }
    let asked: HashSet<&ChunkId> = ids.iter().collect();
    let outside = asked.iter().filter(|id| !sets.iter().any(|set| set.contains(**id))).count();
    if outside > 0 {
        refused(app, s, "GetChunks", &format_args!("{outside} chunks"));
        let as_missing = IndexError::Missing { missing: outside, asked: asked.len() };
        return Err(Rejection::new(ErrorCode::NotFound, as_missing.to_string()));
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

/// Starts a restore or export for a help-desk user at this agent's workstation: their
/// credential is checked (of this tenant, not revoked, helpdesk or admin), the snapshot
/// found, the job created already claimed by this agent, and the start audited.
pub async fn start_job(
    app: &App,
    s: Session,
    credential: &Secret<String>,
    job: JobRequest,
) -> Result<Response, Rejection> {
    if credential.expose().len() > MAX_CREDENTIAL_BYTES {
        return Err(Rejection::new(
            ErrorCode::Malformed,
            format!("a credential has at most {MAX_CREDENTIAL_BYTES} bytes"),
        ));
    }
    let mut client = app.db.get().await?;
    let caller = crate::users::authenticate(&client, credential.expose())
        .await
        .map_err(|e| Rejection::internal("checking the credential", e))?
        .filter(|c| c.tenant == s.tenant)
        .ok_or_else(|| {
            Rejection::new(
                ErrorCode::BadCredential,
                "the help-desk credential is unknown, revoked or of another tenant",
            )
        })?;
    if caller.role < Role::Helpdesk {
        return Err(Rejection::new(
            ErrorCode::Forbidden,
            format!(
                "user {} is a {}: restores and exports need the helpdesk or admin role",
                caller.user,
                caller.role.as_str()
            ),
        ));
    }
    let (kind, source) = match &job {
        JobRequest::Restore { target, source } => (Kind::Restore { target: target.as_str() }, source),
        JobRequest::Export { source } => (Kind::Export, source),
    };
    let (snapshot, source_udid) = match source {
        JobSource::Snapshot(id) => store::snapshots::get(&client, s.tenant, *id)
            .await?
            .map(|row| (*id, row.udid))
            .ok_or_else(|| Rejection::new(ErrorCode::NotFound, format!("no snapshot {id}")))?,
        JobSource::LatestOf(udid) => store::snapshots::newest_of(&client, s.tenant, udid.as_str())
            .await?
            .map(|id| (id, udid.to_string()))
            .ok_or_else(|| Rejection::new(ErrorCode::NotFound, format!("device {udid} has no snapshot")))?,
    };
    let id = match store::restore_jobs::start(&mut client, s.tenant, s.agent, snapshot, kind, caller.user).await? {
        Queued::Job(id) => RestoreJobId(id),
        Queued::Busy => {
            return Err(Rejection::new(
                ErrorCode::LeaseHeld,
                "the iPhone already has a restore job queued or running; wait for it or end it first",
            ));
        }
    };
    let (action, target) = match kind {
        Kind::Restore { target } => ("restore.start", Some(target)),
        Kind::Export => ("export.start", None),
    };
    let actor = format!("user {}", caller.user);
    let event = store::audit::Event {
        actor_user: Some(caller.user),
        actor_agent: Some(s.agent.0),
        role: Some(caller.role.as_str()),
        udid: Some(&source_udid),
        snapshot: Some(snapshot.0),
        detail: serde_json::json!({ "job": id.0, "snapshot": snapshot.0, "target": target, "at_agent": s.agent.0 }),
        ..store::audit::Event::new(s.tenant, &actor, action)
    };
    store::audit::record(&**client, &event).await?;
    tracing::info!(
        agent.id = %s.agent, user.id = %caller.user, restore.id = %id, snapshot.id = %snapshot, action,
        "job started at a workstation"
    );
    Ok(Response::RestoreJob { job: id, snapshot })
}
