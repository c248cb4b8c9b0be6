//! What an authenticated agent can ask of the server: register devices, report their
//! state, open backup runs under a lease, find out which chunks are missing, upload
//! chunks, commit a snapshot, end a run, and fetch snapshots back for restore.
//!
//! Invariants:
//! - Every query is scoped to the session's tenant; an agent reaches only its tenant's
//!   devices, runs, snapshots and chunks, and only its own runs.
//! - A new chunk is decrypted and re-hashed before anything of it is stored; a chunk
//!   whose content does not match its id is refused.
//! - Write order: pack object durable → pack and chunk rows; manifest object durable →
//!   one transaction that inserts the snapshot and marks the run succeeded. A crash at
//!   any point leaves at most unreferenced objects, never a visible partial snapshot.
//!   (Chunk rows are written as packs are flushed, not at commit, so an interrupted run
//!   resumes without re-sending what reached a durable pack.)

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_io::{AsyncRead, AsyncWrite};
use lifeboat_shared::chunk::open_and_verify_into;
use lifeboat_shared::ids::{AgentId, ChunkId, PackId, RestoreJobId, RunId, SnapshotId, TenantId, Udid};
use lifeboat_shared::manifest::{DeviceInfo, Manifest};
use lifeboat_shared::pack::PackBuilder;
use lifeboat_shared::wire::{
    self, BYTES_PART, Data, DataRef, DeviceState, ErrorCode, FrameError, MAX_CONTROL_FRAME_BYTES, MAX_DATA_FRAME_BYTES,
    MAX_IDS_PER_REQUEST, Request, Response, RestoreEnd, RunEnd,
};

use crate::chunkstore::{self, ChunkStoreError};
use crate::keys::{MasterKey, TenantKeys};
use crate::metrics::Metrics;
use crate::{storage, tenants};

/// Largest sealed manifest accepted in a commit.
pub const MAX_SEALED_MANIFEST_BYTES: usize = 256 * 1024 * 1024;

/// An authenticated agent connection.
#[derive(Debug, Clone, Copy)]
pub struct Session {
    pub agent: AgentId,
    pub tenant: TenantId,
}

/// A refusal sent to the agent as [`Response::Error`].
#[derive(Debug)]
pub struct Rejection {
    pub code: ErrorCode,
    pub message: String,
}

impl Rejection {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    /// A server-side failure: logged here with its cause, reported to the agent without it.
    fn internal(what: &str, e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "{what}");
        Self::new(ErrorCode::Internal, format!("{what} failed on the server; retry later"))
    }
}

impl From<tokio_postgres::Error> for Rejection {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::internal("a database query", e)
    }
}

impl From<deadpool_postgres::PoolError> for Rejection {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Self::internal("getting a database connection", e)
    }
}

impl From<FrameError> for Rejection {
    fn from(e: FrameError) -> Self {
        Self::new(e.code(), e.to_string())
    }
}

type Reply = Result<(), Rejection>;

/// Chunks of one run that are verified but not yet in a durable, indexed pack.
#[derive(Debug)]
struct RunBuffer {
    tenant: TenantId,
    pack: PackBuilder,
    /// Everything not yet indexed: in `pack`, or in a pack being flushed.
    pending: HashSet<ChunkId>,
    plain_len: HashMap<ChunkId, u32>,
    uploaded_plain_bytes: u64,
    /// Full packs being written and indexed in the background.
    in_flight: Vec<tokio::task::JoinHandle<Reply>>,
    /// One permit per pack write that may run at once.
    slots: Arc<tokio::sync::Semaphore>,
}

/// Full packs of one run written in the background at once (each holds ~32 MiB in
/// memory): uploads run ahead of storage by that much.
const PACK_WRITES_PER_RUN: usize = 3;

/// Blobs up to this size are verified on the stream's own task (microseconds); larger
/// ones on the blocking pool (see `put_chunks`).
const VERIFY_INLINE_MAX_BYTES: usize = 128 * 1024;

/// Spare pack buffers kept for reuse while runs are uploading (each ~37 MiB).
const SPARE_PACK_BUFFERS: usize = 4;

/// Buffers of written packs, kept for the next packs: a fresh ~37 MiB buffer per pack
/// is ~9,500 fresh pages for the kernel to fault in and zero. Emptied by the first sweep
/// that finds no run buffered, so an idle server does not hold them.
#[derive(Debug, Default)]
struct PackBuffers(Mutex<Vec<Vec<u8>>>);

impl PackBuffers {
    fn take(&self, capacity: usize) -> Vec<u8> {
        lock(&self.0).pop().filter(|b| b.capacity() >= capacity).unwrap_or_else(|| Vec::with_capacity(capacity))
    }

    fn give(&self, buf: Vec<u8>) {
        let mut spare = lock(&self.0);
        if spare.len() < SPARE_PACK_BUFFERS {
            spare.push(buf);
        }
    }

    fn clear(&self) {
        lock(&self.0).clear();
    }
}

/// A finished pack's bytes on their way to storage: the buffer returns to the spares
/// when storage drops it.
struct PooledPack {
    buf: Vec<u8>,
    spares: Arc<PackBuffers>,
}

impl AsRef<[u8]> for PooledPack {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for PooledPack {
    fn drop(&mut self) {
        self.spares.give(std::mem::take(&mut self.buf));
    }
}

/// The default policy: back up a device once a day.
pub const DEFAULT_BACKUP_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// Shared state of all agent connections of this server process.
#[derive(Debug)]
pub struct Hub {
    pub db: deadpool_postgres::Pool,
    pub storage: opendal::Operator,
    pub master: Arc<MasterKey>,
    pub signer: crate::auth::Signer,
    pub metrics: Arc<Metrics>,
    pub pack_target_bytes: usize,
    pub lease: Duration,
    /// The backup policy agents ask for: a device is due when its last successful backup
    /// is older than this.
    pub backup_interval: Duration,
    /// The storage directory when storage is the local disk: written packs are dropped
    /// from the page cache ([`storage::drop_cached`]).
    pub local_root: Option<std::path::PathBuf>,
    runs: Mutex<HashMap<RunId, Arc<tokio::sync::Mutex<RunBuffer>>>>,
    keys: Mutex<HashMap<TenantId, Arc<TenantKeys>>>,
    pack_buffers: Arc<PackBuffers>,
    /// Chunk verifications on the blocking pool at once: one per core. Each stream of each
    /// connection may have one waiting; more running than cores would only crowd out the
    /// task that reads the QUIC socket.
    verify_slots: Arc<tokio::sync::Semaphore>,
}

/// A row of `backup_runs` this session may use.
struct RunRow {
    udid: String,
    snapshot: SnapshotId,
}

fn valid_reason(r: &str) -> bool {
    (1..=64).contains(&r.len()) && r.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks leaves plain maps in a consistent state.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Hub {
    pub fn new(
        db: deadpool_postgres::Pool,
        storage: opendal::Operator,
        master: Arc<MasterKey>,
        signer: crate::auth::Signer,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            db,
            storage,
            master,
            signer,
            metrics,
            pack_target_bytes: 32 * 1024 * 1024,
            lease: Duration::from_secs(600),
            backup_interval: DEFAULT_BACKUP_INTERVAL,
            local_root: None,
            runs: Mutex::new(HashMap::new()),
            keys: Mutex::new(HashMap::new()),
            pack_buffers: Arc::default(),
            verify_slots: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            )),
        }
    }

    pub async fn tenant_keys(&self, tenant: TenantId) -> Result<Arc<TenantKeys>, Rejection> {
        if let Some(k) = lock(&self.keys).get(&tenant) {
            return Ok(k.clone());
        }
        let client = self.db.get().await?;
        let keys = Arc::new(
            tenants::keys(&client, &self.master, tenant)
                .await
                .map_err(|e| Rejection::internal("loading tenant keys", e))?,
        );
        lock(&self.keys).insert(tenant, keys.clone());
        Ok(keys)
    }

    /// Serves one request stream: reads the request, answers it. Refusals become
    /// [`Response::Error`]; the stream is finished either way.
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
        match req {
            Request::RegisterDevice { device, serial_number } => {
                self.register_device(s, &device, serial_number).await?;
                ok(send).await
            }
            Request::ReportState { udid, state, message } => {
                self.report_state(s, &udid, state, message).await?;
                ok(send).await
            }
            Request::OpenRun { udid, resume } => {
                let resp = self.open_run(s, &udid, resume).await?;
                respond(send, &resp).await
            }
            Request::MissingChunks { run, ids } => {
                let missing = self.missing_chunks(s, run, ids).await?;
                respond(send, &Response::Missing { ids: missing }).await
            }
            Request::PutChunks { run } => {
                let resp = self.put_chunks(s, run, recv).await?;
                respond(send, &resp).await
            }
            Request::Commit { run, snapshot } => {
                let resp = self.commit(s, run, snapshot, recv).await?;
                respond(send, &resp).await
            }
            Request::EndRun { run, end } => {
                self.end_run(s, run, end).await?;
                ok(send).await
            }
            Request::LatestSnapshot { udid } => {
                let resp = self.latest_snapshot(s, &udid).await?;
                respond(send, &resp).await
            }
            Request::GetManifest { snapshot } => self.get_manifest(s, snapshot, send).await,
            Request::GetChunks { ids } => self.get_chunks(s, ids, send).await,
            Request::GetPolicy => {
                respond(send, &Response::Policy { backup_interval_seconds: self.backup_interval.as_secs() }).await
            }
            Request::NextRestore { udid } => {
                let resp = self.next_restore(s, &udid).await?;
                respond(send, &resp).await
            }
            Request::EndRestore { job, end } => {
                self.end_restore(s, job, end).await?;
                ok(send).await
            }
        }
    }

    async fn register_device(&self, s: Session, d: &DeviceInfo, serial: Option<String>) -> Reply {
        let client = self.db.get().await?;
        client
            .execute(
                "INSERT INTO devices (tenant_id, udid, name, product_type, ios_version, serial_number, last_agent_id) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (tenant_id, udid) DO UPDATE SET name = EXCLUDED.name, product_type = EXCLUDED.product_type, \
                 ios_version = EXCLUDED.ios_version, serial_number = COALESCE(EXCLUDED.serial_number, devices.serial_number), \
                 last_agent_id = EXCLUDED.last_agent_id, last_seen_at = now()",
                &[&s.tenant.0, &d.udid.as_str(), &d.name, &d.product_type, &d.ios_version, &serial, &s.agent.0],
            )
            .await?;
        Ok(())
    }

    async fn report_state(&self, s: Session, udid: &Udid, state: DeviceState, message: Option<String>) -> Reply {
        let client = self.db.get().await?;
        let n = client
            .execute(
                "UPDATE devices SET state_changed_at = CASE WHEN state <> $3 THEN now() ELSE state_changed_at END, \
                 state = $3, last_seen_at = now(), last_agent_id = $4 WHERE tenant_id = $1 AND udid = $2",
                &[&s.tenant.0, &udid.as_str(), &state.as_str(), &s.agent.0],
            )
            .await?;
        if n == 0 {
            return Err(Rejection::new(ErrorCode::NotFound, format!("device {udid} is not registered")));
        }
        if let Some(m) = message {
            tracing::info!(device.udid = %udid, device.state = state.as_str(), message = %m, "device state");
        }
        Ok(())
    }

    async fn open_run(&self, s: Session, udid: &Udid, resume: Option<RunId>) -> Result<Response, Rejection> {
        let lease = self.lease.as_secs_f64();
        let lease_seconds = self.lease.as_secs() as u32;
        let mut client = self.db.get().await?;
        if let Some(run) = resume {
            let row = self.check_run(&client, s, run).await?;
            if row.udid != udid.as_str() {
                return Err(Rejection::new(ErrorCode::Forbidden, format!("run {run} is not for device {udid}")));
            }
            return Ok(Response::RunOpened { run, snapshot: row.snapshot, lease_seconds });
        }
        let tx = client.transaction().await?;
        let current = tx
            .query_opt(
                "SELECT id, agent_id, lease_expires_at < now() FROM backup_runs \
                 WHERE tenant_id = $1 AND udid = $2 AND status = 'running' FOR UPDATE",
                &[&s.tenant.0, &udid.as_str()],
            )
            .await?;
        if let Some(row) = current {
            let (old, holder, expired): (uuid::Uuid, uuid::Uuid, bool) = (row.get(0), row.get(1), row.get(2));
            let reason = if expired {
                "lease-expired"
            } else if holder == s.agent.0 {
                "superseded"
            } else {
                return Err(Rejection::new(
                    ErrorCode::LeaseHeld,
                    format!("device {udid} is being backed up by another agent (run {old})"),
                ));
            };
            tx.execute(
                "UPDATE backup_runs SET status = 'failed', reason = $3, message = 'a new run replaced it', \
                 finished_at = now() WHERE tenant_id = $1 AND id = $2",
                &[&s.tenant.0, &old, &reason],
            )
            .await?;
            self.metrics.backup_runs.with_label_values(&["failed", reason]).inc();
            self.discard_buffer(RunId(old)).await;
        }
        let row = match tx
            .query_one(
                "INSERT INTO backup_runs (tenant_id, udid, agent_id, lease_expires_at) \
                 VALUES ($1, $2, $3, now() + make_interval(secs => $4)) RETURNING id, snapshot_id",
                &[&s.tenant.0, &udid.as_str(), &s.agent.0, &lease],
            )
            .await
        {
            Ok(row) => row,
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION) => {
                return Err(Rejection::new(ErrorCode::NotFound, format!("device {udid} is not registered")));
            }
            Err(e) => return Err(e.into()),
        };
        tx.commit().await?;
        Ok(Response::RunOpened { run: RunId(row.get(0)), snapshot: SnapshotId(row.get(1)), lease_seconds })
    }

    /// The run, if it is this agent's, of this tenant, and still running; renews its lease.
    async fn check_run(&self, client: &tokio_postgres::Client, s: Session, run: RunId) -> Result<RunRow, Rejection> {
        let row = client
            .query_opt(
                "UPDATE backup_runs SET lease_expires_at = greatest(lease_expires_at, now() + make_interval(secs => $3)) \
                 WHERE tenant_id = $1 AND id = $2 RETURNING agent_id, status, udid, snapshot_id",
                &[&s.tenant.0, &run.0, &self.lease.as_secs_f64()],
            )
            .await?
            .ok_or_else(|| Rejection::new(ErrorCode::NotFound, format!("no run {run}")))?;
        let agent: uuid::Uuid = row.get(0);
        let status: String = row.get(1);
        if agent != s.agent.0 {
            return Err(Rejection::new(ErrorCode::Forbidden, format!("run {run} belongs to another agent")));
        }
        if status != "running" {
            return Err(Rejection::new(ErrorCode::LeaseLost, format!("run {run} is {status}")));
        }
        Ok(RunRow { udid: row.get(2), snapshot: SnapshotId(row.get(3)) })
    }

    fn buffer(&self, run: RunId, tenant: TenantId) -> Arc<tokio::sync::Mutex<RunBuffer>> {
        lock(&self.runs)
            .entry(run)
            .or_insert_with(|| {
                Arc::new(tokio::sync::Mutex::new(RunBuffer {
                    tenant,
                    pack: self.full_size_pack(),
                    pending: HashSet::new(),
                    plain_len: HashMap::new(),
                    uploaded_plain_bytes: 0,
                    in_flight: Vec::new(),
                    slots: Arc::new(tokio::sync::Semaphore::new(PACK_WRITES_PER_RUN)),
                }))
            })
            .clone()
    }

    /// A pack builder with room for a full pack (the target, one maximal blob past it,
    /// and the index), in a spare buffer where there is one.
    fn full_size_pack(&self) -> PackBuilder {
        let capacity = self.pack_target_bytes + lifeboat_shared::format::MAX_BLOB_BYTES + 1024 * 1024;
        PackBuilder::with_buffer(self.pack_buffers.take(capacity))
    }

    /// Flushes and drops the buffers of runs that ended or whose lease expired (an agent
    /// that died mid-upload): their verified chunks reach storage and the memory is freed.
    pub async fn sweep(&self) {
        let runs: Vec<uuid::Uuid> = lock(&self.runs).keys().map(|r| r.0).collect();
        if runs.is_empty() {
            self.pack_buffers.clear();
            return;
        }
        let stale: Vec<uuid::Uuid> = match self.db.get().await {
            Ok(client) => match client
                .query(
                    "SELECT id FROM backup_runs WHERE id = ANY($1) AND (status <> 'running' OR lease_expires_at < now())",
                    &[&runs],
                )
                .await
            {
                Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
                Err(e) => {
                    tracing::warn!(error = %e, "sweeping run buffers");
                    return;
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "sweeping run buffers");
                return;
            }
        };
        for run in stale {
            self.discard_buffer(RunId(run)).await;
        }
    }

    /// Runs currently holding a buffer (tests and diagnostics).
    pub fn buffered_runs(&self) -> usize {
        lock(&self.runs).len()
    }

    async fn discard_buffer(&self, run: RunId) {
        let buf = lock(&self.runs).remove(&run);
        if let Some(buf) = buf
            && let Err(r) = self.flush(&buf).await
        {
            tracing::warn!(run.id = %run, error = %r.message, "flushing a replaced run's chunks");
        }
    }

    async fn missing_chunks(&self, s: Session, run: RunId, ids: Vec<ChunkId>) -> Result<Vec<ChunkId>, Rejection> {
        if ids.len() > MAX_IDS_PER_REQUEST {
            return Err(Rejection::new(ErrorCode::TooLarge, format!("at most {MAX_IDS_PER_REQUEST} ids per request")));
        }
        let client = self.db.get().await?;
        self.check_run(&client, s, run).await?;
        let present = chunkstore::indexed(&client, s.tenant, &ids)
            .await
            .map_err(|e| Rejection::internal("looking up chunks", e))?;
        let buf = self.buffer(run, s.tenant);
        let buf = buf.lock().await;
        let mut seen = HashSet::new();
        Ok(ids
            .into_iter()
            .filter(|id| !present.contains(id) && !buf.pending.contains(id) && seen.insert(*id))
            .collect())
    }

    async fn put_chunks<R: AsyncRead + Unpin>(
        &self,
        s: Session,
        run: RunId,
        recv: &mut R,
    ) -> Result<Response, Rejection> {
        {
            let client = self.db.get().await?;
            self.check_run(&client, s, run).await?;
        }
        let keys = self.tenant_keys(s.tenant).await?;
        let buf = self.buffer(run, s.tenant);
        let (mut chunks, mut new_chunks, mut new_bytes) = (0u32, 0u32, 0u64);
        // One frame buffer and one plaintext buffer for the whole stream: no allocation
        // (and no fresh pages to fault in and zero) per chunk.
        let (mut frame, mut plain) = (Vec::new(), Vec::new());
        loop {
            let len =
                wire::read_frame_into(recv, MAX_DATA_FRAME_BYTES, &mut frame).await?.ok_or(FrameError::Truncated)?;
            match wire::decode_borrowed::<DataRef<'_>>(&frame[..len])? {
                DataRef::End => break,
                DataRef::Blob { id, blob } => {
                    chunks += 1;
                    self.metrics.ingest_received_bytes.inc_by(blob.len() as u64);
                    // Where the blob lies in `frame`: the frame moves to the blocking pool
                    // and back below.
                    let at = blob.as_ptr() as usize - frame.as_ptr() as usize;
                    let range = at..at + blob.len();
                    let verified = if blob.len() <= VERIFY_INLINE_MAX_BYTES {
                        open_and_verify_into(&keys.data, &keys.id, &id, blob, &mut plain)
                    } else {
                        // Milliseconds of work: on the blocking pool, so that this task
                        // does not hold a runtime worker meanwhile. The QUIC endpoint's
                        // socket is read by a task on the same workers, and a socket not
                        // read for a few milliseconds at this rate overflows: the
                        // datagrams are dropped, and the agent takes it for congestion.
                        let slot = self
                            .verify_slots
                            .clone()
                            .acquire_owned()
                            .await
                            .map_err(|e| Rejection::internal("waiting to verify a chunk", e))?;
                        let (f, p, k, r) =
                            (std::mem::take(&mut frame), std::mem::take(&mut plain), keys.clone(), range.clone());
                        let (f, p, verified) = tokio::task::spawn_blocking(move || {
                            let _slot = slot;
                            let mut p = p;
                            let verified = open_and_verify_into(&k.data, &k.id, &id, &f[r], &mut p);
                            (f, p, verified)
                        })
                        .await
                        .map_err(|e| Rejection::internal("verifying a chunk", e))?;
                        (frame, plain) = (f, p);
                        verified
                    };
                    let blob = &frame[range];
                    if let Err(e) = verified {
                        self.metrics.ingest_rejected_chunks.inc();
                        tracing::warn!(agent.id = %s.agent, run.id = %run, chunk.id = %id, error = %e, "refused a chunk");
                        return Err(Rejection::new(ErrorCode::ChunkMismatch, format!("chunk {id} refused: {e}")));
                    }
                    let full = {
                        let mut b = buf.lock().await;
                        if b.pending.insert(id) {
                            b.pack.push(id, blob);
                            b.plain_len.insert(id, plain.len() as u32);
                            b.uploaded_plain_bytes += plain.len() as u64;
                            new_chunks += 1;
                            new_bytes += blob.len() as u64;
                        }
                        b.pack.len() >= self.pack_target_bytes
                    };
                    if full {
                        self.start_flush(&buf, false).await?;
                    }
                }
                DataRef::Bytes(_) => return Err(Rejection::new(ErrorCode::Malformed, "expected chunk blobs")),
            }
        }
        Ok(Response::Stored { chunks, new_chunks, new_bytes })
    }

    /// Hands the buffer's pack (if any) to a background task that writes it to storage and
    /// then indexes it, so the upload stream that filled it reads on. At most
    /// [`PACK_WRITES_PER_RUN`] such tasks run per run: beyond that the stream waits for a
    /// slot (and the pack keeps filling meanwhile).
    /// Without `force`, a pack another stream already handed over (while this one waited
    /// for a slot) is not handed over again half-empty.
    async fn start_flush(&self, buf: &Arc<tokio::sync::Mutex<RunBuffer>>, force: bool) -> Reply {
        let slots = buf.lock().await.slots.clone();
        let permit =
            slots.acquire_owned().await.map_err(|e| Rejection::internal("waiting for a pack write slot", e))?;
        let mut b = buf.lock().await;
        if b.pack.is_empty() || (!force && b.pack.len() < self.pack_target_bytes) {
            return Ok(());
        }
        // A forced flush ends the run's uploads (commit, or a run given up): the next
        // pack, if any, does not get a full-size buffer.
        let fresh = if force { PackBuilder::new() } else { self.full_size_pack() };
        let pack = std::mem::replace(&mut b.pack, fresh);
        let lens: Vec<u32> = pack.entries().iter().map(|e| b.plain_len.get(&e.id).copied().unwrap_or(0)).collect();
        let job = PackJob {
            storage: self.storage.clone(),
            db: self.db.clone(),
            metrics: self.metrics.clone(),
            buf: buf.clone(),
            tenant: b.tenant,
            spares: self.pack_buffers.clone(),
            local_root: self.local_root.clone(),
        };
        b.in_flight.push(tokio::spawn(async move {
            let result = job.run(pack, lens).await;
            drop(permit);
            result
        }));
        Ok(())
    }

    /// Writes and indexes everything the buffer holds and waits for all its background
    /// writes: afterwards every chunk the run uploaded is durable and indexed, or the first
    /// failure is returned (and the chunks that failed are missing again).
    async fn flush(&self, buf: &Arc<tokio::sync::Mutex<RunBuffer>>) -> Reply {
        let started = self.start_flush(buf, true).await;
        let handles: Vec<_> = std::mem::take(&mut buf.lock().await.in_flight);
        let mut first = started;
        for handle in handles {
            if let Err(e) = joined(handle.await) {
                first = first.and(Err(e));
            }
        }
        first
    }

    async fn commit<R: AsyncRead + Unpin>(
        &self,
        s: Session,
        run: RunId,
        snapshot: SnapshotId,
        recv: &mut R,
    ) -> Result<Response, Rejection> {
        let row = {
            let client = self.db.get().await?;
            self.check_run(&client, s, run).await?
        };
        if row.snapshot != snapshot {
            return Err(Rejection::new(ErrorCode::Malformed, format!("run {run} commits snapshot {}", row.snapshot)));
        }
        let sealed = read_bytes(recv, MAX_SEALED_MANIFEST_BYTES).await?;
        let started = std::time::Instant::now();
        let buf = self.buffer(run, s.tenant);
        // The run's last pack is written while the manifest is opened (decrypted,
        // decompressed, decoded: tens of milliseconds for 50,000 files, on the blocking pool).
        let opening = async {
            let keys = self.tenant_keys(s.tenant).await?;
            tokio::task::spawn_blocking(move || Manifest::open(&keys.data, &snapshot, &sealed).map(|m| (m, sealed)))
                .await
                .map_err(|e| Rejection::internal("opening a manifest", e))?
                .map_err(|e| Rejection::new(ErrorCode::Malformed, format!("manifest refused: {e}")))
        };
        let (flushed, opened) = tokio::join!(self.flush(&buf), opening);
        flushed?;
        let (manifest, sealed) = opened?;
        if manifest.device.udid.as_str() != row.udid {
            return Err(Rejection::new(ErrorCode::Malformed, "manifest is for another device than the run"));
        }
        let opened = started.elapsed();
        let ids: Vec<ChunkId> = {
            let mut set = HashSet::new();
            manifest.files.iter().flat_map(|f| f.chunks.iter().map(|c| c.id)).filter(|id| set.insert(*id)).collect()
        };
        let chunks = ids.len();
        let (missing, first_missing) = self.unindexed(s.tenant, ids).await?;
        let checked = started.elapsed();
        if let Some(first) = first_missing {
            return Err(Rejection::new(
                ErrorCode::MissingChunks,
                format!(
                    "{missing} chunks the manifest references are not stored (first: {first}); upload them and commit again"
                ),
            ));
        }

        let path = storage::manifest_path(&s.tenant, &snapshot);
        let sealed_len = sealed.len() as u64;
        self.storage.write(&path, sealed).await.map_err(|e| Rejection::internal("writing a manifest to storage", e))?;
        self.metrics.ingest_stored_bytes.inc_by(sealed_len);
        let stored = started.elapsed();

        let files = manifest.files.len() as i64;
        let logical = manifest.logical_bytes() as i64;
        let mut client = self.db.get().await?;
        let tx = client.transaction().await?;
        let updated = tx
            .execute(
                "UPDATE backup_runs SET status = 'succeeded', finished_at = now(), files_total = $4, bytes_total = $5 \
                 WHERE tenant_id = $1 AND id = $2 AND agent_id = $3 AND status = 'running'",
                &[&s.tenant.0, &run.0, &s.agent.0, &files, &logical],
            )
            .await?;
        if updated != 1 {
            return Err(Rejection::new(ErrorCode::LeaseLost, format!("run {run} is no longer running")));
        }
        tx.execute(
            "INSERT INTO snapshots (tenant_id, id, udid, run_id, manifest_key, ios_version, product_type, file_count, logical_bytes) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            &[
                &s.tenant.0,
                &snapshot.0,
                &row.udid,
                &run.0,
                &path,
                &manifest.device.ios_version,
                &manifest.device.product_type,
                &files,
                &logical,
            ],
        )
        .await?;
        tx.commit().await?;

        let uploaded = lock(&self.runs).remove(&run);
        let uploaded = match uploaded {
            Some(b) => b.lock().await.uploaded_plain_bytes,
            None => 0,
        };
        self.metrics.ingest_deduplicated_bytes.inc_by((logical as u64).saturating_sub(uploaded));
        self.metrics.backup_runs.with_label_values(&["succeeded", ""]).inc();
        tracing::info!(agent.id = %s.agent, run.id = %run, snapshot.id = %snapshot, device.udid = %row.udid,
            files, logical_bytes = logical, "committed snapshot");
        tracing::debug!(run.id = %run, chunks, flush_and_open_ms = opened.as_millis() as u64,
            check_ms = (checked - opened).as_millis() as u64, store_ms = (stored - checked).as_millis() as u64,
            record_ms = (started.elapsed() - stored).as_millis() as u64, "commit timings");
        Ok(Response::Committed { snapshot, files: files as u64, logical_bytes: logical as u64 })
    }

    /// How many of `ids` (distinct) the chunk index lacks, and the first of them. Looked up
    /// in batches, two at a time on their own connections; a batch is counted first, and
    /// only one that comes up short is listed.
    async fn unindexed(&self, tenant: TenantId, ids: Vec<ChunkId>) -> Result<(usize, Option<ChunkId>), Rejection> {
        const LANES: usize = 2;
        let ids = Arc::new(ids);
        let per_lane = ids.len().div_ceil(MAX_IDS_PER_REQUEST).div_ceil(LANES) * MAX_IDS_PER_REQUEST;
        let mut lanes = tokio::task::JoinSet::new();
        for lane in 0..LANES {
            let (db, ids) = (self.db.clone(), ids.clone());
            lanes.spawn(async move {
                let lookup = async {
                    let start = (lane * per_lane).min(ids.len());
                    let end = (start + per_lane).min(ids.len());
                    let mut missing: Vec<ChunkId> = Vec::new();
                    if start == end {
                        return Ok(missing);
                    }
                    let client = db.get().await?;
                    for batch in ids[start..end].chunks(MAX_IDS_PER_REQUEST) {
                        let found = chunkstore::count_indexed(&client, tenant, batch)
                            .await
                            .map_err(|e| Rejection::internal("looking up chunks", e))?;
                        if found == batch.len() {
                            continue;
                        }
                        let present = chunkstore::indexed(&client, tenant, batch)
                            .await
                            .map_err(|e| Rejection::internal("looking up chunks", e))?;
                        missing.extend(batch.iter().filter(|id| !present.contains(id)));
                    }
                    Ok::<_, Rejection>(missing)
                };
                (lane, lookup.await)
            });
        }
        // Lanes in order, so the first one missing is the first in the manifest's order.
        let mut found: Vec<(usize, Vec<ChunkId>)> = Vec::new();
        while let Some(r) = lanes.join_next().await {
            let (lane, missing) = r.map_err(|e| Rejection::internal("looking up chunks", e))?;
            found.push((lane, missing?));
        }
        found.sort_by_key(|(lane, _)| *lane);
        let missing: usize = found.iter().map(|(_, m)| m.len()).sum();
        Ok((missing, found.iter().find_map(|(_, m)| m.first().copied())))
    }

    async fn end_run(&self, s: Session, run: RunId, end: RunEnd) -> Reply {
        let (status, reason, message) = match &end {
            RunEnd::Failed { reason, message } => ("failed", reason.as_str(), message.as_str()),
            RunEnd::Cancelled { reason } => ("cancelled", reason.as_str(), ""),
        };
        if !valid_reason(reason) || message.len() > 4096 {
            return Err(Rejection::new(ErrorCode::Malformed, "reason must be a code like device-disconnected"));
        }
        {
            let client = self.db.get().await?;
            self.check_run(&client, s, run).await?;
        }
        // Chunks this run already verified stay useful for the next run of the device.
        let buf = lock(&self.runs).remove(&run);
        if let Some(buf) = buf {
            self.flush(&buf).await?;
        }
        let client = self.db.get().await?;
        client
            .execute(
                "UPDATE backup_runs SET status = $4, reason = $5, message = nullif($6, ''), finished_at = now() \
                 WHERE tenant_id = $1 AND id = $2 AND agent_id = $3 AND status = 'running'",
                &[&s.tenant.0, &run.0, &s.agent.0, &status, &reason, &message],
            )
            .await?;
        self.metrics.backup_runs.with_label_values(&[status, reason]).inc();
        tracing::info!(agent.id = %s.agent, run.id = %run, run.status = status, run.reason = reason, "run ended");
        Ok(())
    }

    /// Claims the oldest queued restore job for the device, for this agent.
    async fn next_restore(&self, s: Session, udid: &Udid) -> Result<Response, Rejection> {
        let client = self.db.get().await?;
        let row = client
            .query_opt(
                "UPDATE restore_jobs SET status = 'running', agent_id = $3, started_at = now()                  WHERE tenant_id = $1 AND id = (SELECT id FROM restore_jobs WHERE tenant_id = $1 AND target_udid = $2                  AND status = 'queued' ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED)                  RETURNING id, snapshot_id",
                &[&s.tenant.0, &udid.as_str(), &s.agent.0],
            )
            .await?;
        Ok(match row {
            Some(row) => {
                let (job, snapshot) = (RestoreJobId(row.get(0)), SnapshotId(row.get(1)));
                tracing::info!(agent.id = %s.agent, restore.id = %job, snapshot.id = %snapshot, device.udid = %udid, "restore job claimed");
                Response::RestoreJob { job, snapshot }
            }
            None => Response::Ok,
        })
    }

    async fn end_restore(&self, s: Session, job: RestoreJobId, end: RestoreEnd) -> Reply {
        let (status, reason, message) = match &end {
            RestoreEnd::Succeeded => ("succeeded", None, None),
            RestoreEnd::Failed { reason, message } => ("failed", Some(reason.as_str()), Some(message.as_str())),
        };
        if reason.is_some_and(|r| !valid_reason(r)) || message.is_some_and(|m| m.len() > 4096) {
            return Err(Rejection::new(ErrorCode::Malformed, "reason must be a code like device-disconnected"));
        }
        let client = self.db.get().await?;
        let n = client
            .execute(
                "UPDATE restore_jobs SET status = $4, reason = $5, message = $6, finished_at = now()                  WHERE tenant_id = $1 AND id = $2 AND agent_id = $3 AND status = 'running'",
                &[&s.tenant.0, &job.0, &s.agent.0, &status, &reason, &message],
            )
            .await?;
        if n == 0 {
            return Err(Rejection::new(
                ErrorCode::NotFound,
                format!("restore job {job} is not running for this agent"),
            ));
        }
        tracing::info!(agent.id = %s.agent, restore.id = %job, restore.status = status, restore.reason = reason, "restore job ended");
        Ok(())
    }

    async fn latest_snapshot(&self, s: Session, udid: &Udid) -> Result<Response, Rejection> {
        let client = self.db.get().await?;
        let row = client
            .query_opt(
                "SELECT s.id, coalesce(d.name, ''), coalesce(s.product_type, ''), coalesce(s.ios_version, ''), \
                 (extract(epoch FROM s.committed_at) * 1000)::bigint \
                 FROM snapshots s JOIN devices d ON d.tenant_id = s.tenant_id AND d.udid = s.udid \
                 WHERE s.tenant_id = $1 AND s.udid = $2 ORDER BY s.committed_at DESC LIMIT 1",
                &[&s.tenant.0, &udid.as_str()],
            )
            .await?
            .ok_or_else(|| Rejection::new(ErrorCode::NotFound, format!("device {udid} has no snapshot")))?;
        Ok(Response::Snapshot {
            snapshot: SnapshotId(row.get(0)),
            device: DeviceInfo {
                udid: udid.clone(),
                name: row.get(1),
                product_type: row.get(2),
                ios_version: row.get(3),
            },
            created_unix_ms: row.get(4),
        })
    }

    async fn get_manifest<W: AsyncWrite + Unpin>(&self, s: Session, snapshot: SnapshotId, send: &mut W) -> Reply {
        let client = self.db.get().await?;
        let key: String = client
            .query_opt(
                "SELECT manifest_key FROM snapshots WHERE tenant_id = $1 AND id = $2",
                &[&s.tenant.0, &snapshot.0],
            )
            .await?
            .ok_or_else(|| Rejection::new(ErrorCode::NotFound, format!("no snapshot {snapshot}")))?
            .get(0);
        drop(client);
        let bytes = self.storage.read(&key).await.map_err(|e| Rejection::internal("reading a manifest", e))?.to_vec();
        respond(send, &Response::Manifest { snapshot, bytes: bytes.len() as u64 }).await?;
        for part in bytes.chunks(BYTES_PART) {
            wire::write_frame(send, &Data::Bytes(part.to_vec())).await?;
        }
        wire::write_frame(send, &Data::End).await?;
        Ok(())
    }

    async fn get_chunks<W: AsyncWrite + Unpin>(&self, s: Session, ids: Vec<ChunkId>, send: &mut W) -> Reply {
        if ids.len() > MAX_IDS_PER_REQUEST {
            return Err(Rejection::new(ErrorCode::TooLarge, format!("at most {MAX_IDS_PER_REQUEST} ids per request")));
        }
        let client = self.db.get().await?;
        let locations = match chunkstore::locate(&client, s.tenant, &ids).await {
            Ok(l) => l,
            Err(e @ ChunkStoreError::Missing { .. }) => return Err(Rejection::new(ErrorCode::NotFound, e.to_string())),
            Err(e) => return Err(Rejection::internal("locating chunks", e)),
        };
        drop(client);
        respond(send, &Response::Ok).await?;
        for group in chunkstore::read_groups(&locations) {
            let blobs = chunkstore::read_group(&self.storage, s.tenant, group)
                .await
                .map_err(|e| Rejection::internal("reading a pack", e))?;
            for (id, blob) in blobs {
                wire::write_frame(send, &Data::Blob { id, blob }).await?;
            }
        }
        wire::write_frame(send, &Data::End).await?;
        Ok(())
    }
}

async fn respond<W: AsyncWrite + Unpin>(send: &mut W, r: &Response) -> Reply {
    wire::write_frame(send, r).await.map_err(Into::into)
}

async fn ok<W: AsyncWrite + Unpin>(send: &mut W) -> Reply {
    respond(send, &Response::Ok).await
}

/// Reads [`Data::Bytes`] parts until [`Data::End`], at most `max` bytes in all.
pub async fn read_bytes<R: AsyncRead + Unpin>(recv: &mut R, max: usize) -> Result<Vec<u8>, Rejection> {
    let mut out = Vec::new();
    loop {
        match wire::expect_frame::<Data, _>(recv, MAX_DATA_FRAME_BYTES).await? {
            Data::End => return Ok(out),
            Data::Bytes(part) => {
                if out.len() + part.len() > max {
                    return Err(Rejection::new(ErrorCode::TooLarge, format!("more than {max} bytes")));
                }
                out.extend_from_slice(&part);
            }
            Data::Blob { .. } => return Err(Rejection::new(ErrorCode::Malformed, "expected bytes, got a chunk")),
        }
    }
}

fn joined(r: Result<Reply, tokio::task::JoinError>) -> Reply {
    r.unwrap_or_else(|e| Err(Rejection::internal("writing a pack", e)))
}

/// One full pack on its way to storage and the chunk index, with what it needs to get there.
struct PackJob {
    storage: opendal::Operator,
    db: deadpool_postgres::Pool,
    metrics: Arc<Metrics>,
    buf: Arc<tokio::sync::Mutex<RunBuffer>>,
    tenant: TenantId,
    spares: Arc<PackBuffers>,
    local_root: Option<std::path::PathBuf>,
}

impl PackJob {
    /// Writes the pack, then indexes it (a crash between the two leaves an unreferenced
    /// pack, never an index entry without its bytes). Its chunks stop being pending either
    /// way: indexed, or missing again so the agent re-sends them.
    async fn run(self, pack: PackBuilder, lens: Vec<u32>) -> Reply {
        // Hashing 32 MiB takes milliseconds: off the runtime's workers, like chunk
        // verification in `put_chunks`.
        let ids: Vec<ChunkId> = pack.entries().iter().map(|e| e.id).collect();
        let sealed = tokio::task::spawn_blocking(move || pack.finish()).await;
        let Ok((pack_id, bytes, entries)) = sealed else {
            // Only a panic gets here: its chunks are missing again, as after a failed write.
            self.release(&ids).await;
            return Err(Rejection::internal("sealing a pack", "the sealing task failed"));
        };
        let size = bytes.len() as i64;
        let result = async {
            let bytes = bytes::Bytes::from_owner(PooledPack { buf: bytes, spares: self.spares.clone() });
            let path = storage::pack_path(&self.tenant, &pack_id);
            self.storage.write(&path, bytes).await.map_err(|e| Rejection::internal("writing a pack to storage", e))?;
            self.metrics.ingest_stored_bytes.inc_by(size as u64);
            if let Some(root) = &self.local_root {
                // Only a cache hint: a pack that stays cached is no harm.
                let path = root.join(&path);
                let _ = tokio::task::spawn_blocking(move || {
                    if let Err(e) = storage::drop_cached(&path) {
                        tracing::debug!(path = %path.display(), error = %e, "a written pack stays in the page cache");
                    }
                })
                .await;
            }
            index_pack(&self.db, self.tenant, pack_id, size, &entries, &lens).await
        }
        .await;
        self.release(&ids).await;
        result
    }

    /// The chunks of this pack stop being pending: indexed now, or missing again.
    async fn release(&self, ids: &[ChunkId]) {
        let mut b = self.buf.lock().await;
        for id in ids {
            b.pending.remove(id);
            b.plain_len.remove(id);
        }
    }
}

async fn index_pack(
    db: &deadpool_postgres::Pool,
    tenant: TenantId,
    pack: PackId,
    size: i64,
    entries: &[lifeboat_shared::pack::PackEntry],
    plain_lens: &[u32],
) -> Reply {
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    tx.execute(
        "INSERT INTO packs (tenant_id, id, size_bytes, blob_count) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        &[&tenant.0, &&pack.0[..], &size, &(entries.len() as i32)],
    )
    .await?;
    let ids: Vec<&[u8]> = entries.iter().map(|e| &e.id.0[..]).collect();
    let offsets: Vec<i64> = entries.iter().map(|e| e.offset as i64).collect();
    let lengths: Vec<i32> = entries.iter().map(|e| e.length as i32).collect();
    let plains: Vec<i32> = plain_lens.iter().map(|l| *l as i32).collect();
    tx.execute(
        "INSERT INTO chunks (tenant_id, id, pack_id, offset_bytes, length_bytes, plain_bytes) \
         SELECT $1, u.id, $2, u.off, u.len, u.plain FROM unnest($3::bytea[], $4::bigint[], $5::int[], $6::int[]) \
         AS u(id, off, len, plain) ON CONFLICT DO NOTHING",
        &[&tenant.0, &&pack.0[..], &ids, &offsets, &lengths, &plains],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}
