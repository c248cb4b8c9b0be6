//! The commit: the run's last pack flushed while the sealed manifest is opened, every
//! chunk it names checked indexed, the manifest object written, then one transaction
//! that marks the run succeeded and inserts the snapshot. Only then is it visible.

use std::collections::HashSet;
use std::sync::Arc;

use futures_io::AsyncRead;
use lifeboat_shared::ids::{ChunkId, RunId, SnapshotId, TenantId};
use lifeboat_shared::manifest::Manifest;
use lifeboat_shared::protocol;
use lifeboat_shared::wire::{self, Data, ErrorCode, MAX_DATA_FRAME_BYTES, MAX_IDS_PER_REQUEST, Response};

use super::Ingest;
use crate::app::lock;
use crate::objects;
use crate::session::{Rejection, Session};
use crate::store;

/// Largest sealed manifest accepted in a commit.
pub const MAX_SEALED_MANIFEST_BYTES: usize = 256 * 1024 * 1024;

/// Reads [`Data::Bytes`] parts until [`Data::End`], at most `max` bytes in all.
pub async fn read_bytes<R: AsyncRead + Unpin>(recv: &mut R, max: usize) -> Result<Vec<u8>, Rejection> {
    let mut upload = protocol::BytesUpload::new(max);
    while !upload.on_data(wire::expect_frame::<Data, _>(recv, MAX_DATA_FRAME_BYTES).await?).map_err(refused)? {}
    Ok(upload.into_bytes())
}

fn refused((code, message): protocol::Refusal) -> Rejection {
    Rejection::new(code, message)
}

impl Ingest {
    pub async fn commit<R: AsyncRead + Unpin>(
        &self,
        s: Session,
        run: RunId,
        snapshot: SnapshotId,
        recv: &mut R,
    ) -> Result<Response, Rejection> {
        let row = {
            let client = self.app.db.get().await?;
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
            let keys =
                self.app.tenant_keys(s.tenant).await.map_err(|e| Rejection::internal("loading tenant keys", e))?;
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

        let path = objects::manifest_path(&s.tenant, &snapshot);
        let sealed_len = sealed.len() as u64;
        self.app
            .storage
            .write(&path, sealed)
            .await
            .map_err(|e| Rejection::internal("writing a manifest to storage", e))?;
        self.app.metrics.ingest_stored_bytes.inc_by(sealed_len);
        let stored = started.elapsed();

        let files = manifest.files.len() as i64;
        let logical = manifest.logical_bytes() as i64;
        let new = store::runs::NewSnapshot {
            id: snapshot,
            udid: &row.udid,
            manifest_key: &path,
            ios_version: &manifest.device.ios_version,
            product_type: &manifest.device.product_type,
            files,
            logical_bytes: logical,
            ios_encrypted: manifest.ios_encrypted(),
        };
        let mut client = self.app.db.get().await?;
        if !store::runs::commit(&mut client, s.tenant, s.agent, run, &new).await? {
            return Err(Rejection::new(ErrorCode::LeaseLost, format!("run {run} is no longer running")));
        }
        drop(client);

        let uploaded = lock(&self.runs).remove(&run);
        let uploaded = match uploaded {
            Some(b) => b.lock().await.chunks.uploaded_plain_bytes,
            None => 0,
        };
        let metrics = &self.app.metrics;
        metrics.ingest_deduplicated_bytes.inc_by((logical as u64).saturating_sub(uploaded));
        metrics.backup_runs.with_label_values(&["succeeded", ""]).inc();
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
            let (db, ids) = (self.app.db.clone(), ids.clone());
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
                        let found = store::chunks::count_indexed(&client, tenant, batch)
                            .await
                            .map_err(|e| Rejection::internal("looking up chunks", e))?;
                        if found == batch.len() {
                            continue;
                        }
                        let present = store::chunks::indexed(&client, tenant, batch)
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
}
