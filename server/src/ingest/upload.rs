//! Uploads: which chunks the server lacks, and chunk blobs streamed in — each verified
//! (decrypted, decompressed, re-hashed) before it joins the run's next pack.

use futures_io::AsyncRead;
use lifeboat_shared::chunk::open_and_verify_into;
use lifeboat_shared::ids::{ChunkId, RunId};
use lifeboat_shared::protocol;
use lifeboat_shared::wire::{
    self, DataRef, ErrorCode, FrameError, MAX_DATA_FRAME_BYTES, MAX_IDS_PER_REQUEST, Response,
};

use super::Ingest;
use crate::session::{Rejection, Session};
use crate::store;

/// Blobs up to this size are verified on the stream's own task (microseconds); larger
/// ones on the blocking pool (see `put_chunks`).
const VERIFY_INLINE_MAX_BYTES: usize = 128 * 1024;

impl Ingest {
    pub async fn missing_chunks(&self, s: Session, run: RunId, ids: Vec<ChunkId>) -> Result<Vec<ChunkId>, Rejection> {
        if ids.len() > MAX_IDS_PER_REQUEST {
            return Err(Rejection::new(ErrorCode::TooLarge, format!("at most {MAX_IDS_PER_REQUEST} ids per request")));
        }
        let client = self.app.db.get().await?;
        self.check_run(&client, s, run).await?;
        let present = store::chunks::indexed(&client, s.tenant, &ids)
            .await
            .map_err(|e| Rejection::internal("looking up chunks", e))?;
        let buf = self.buffer(run, s.tenant);
        let buf = buf.lock().await;
        Ok(buf.chunks.missing(ids, &present))
    }

    pub async fn put_chunks<R: AsyncRead + Unpin>(
        &self,
        s: Session,
        run: RunId,
        recv: &mut R,
    ) -> Result<Response, Rejection> {
        {
            let client = self.app.db.get().await?;
            self.check_run(&client, s, run).await?;
        }
        let keys = self.app.tenant_keys(s.tenant).await.map_err(|e| Rejection::internal("loading tenant keys", e))?;
        let metrics = &self.app.metrics;
        let buf = self.buffer(run, s.tenant);
        let (mut chunks, mut new_chunks, mut new_bytes) = (0u32, 0u32, 0u64);
        // One frame buffer and one plaintext buffer for the whole stream: no allocation
        // (and no fresh pages to fault in and zero) per chunk.
        let (mut frame, mut plain) = (Vec::new(), Vec::new());
        loop {
            let len =
                wire::read_frame_into(recv, MAX_DATA_FRAME_BYTES, &mut frame).await?.ok_or(FrameError::Truncated)?;
            let frame_ref = wire::decode_borrowed::<DataRef<'_>>(&frame[..len])?;
            match protocol::put_chunks_frame(frame_ref).map_err(|(code, m)| Rejection::new(code, m))? {
                None => break,
                Some((id, blob)) => {
                    chunks += 1;
                    metrics.ingest_received_bytes.inc_by(blob.len() as u64);
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
                        metrics.ingest_rejected_chunks.inc();
                        tracing::warn!(agent.id = %s.agent, run.id = %run, chunk.id = %id, error = %e, "refused a chunk");
                        return Err(Rejection::new(ErrorCode::ChunkMismatch, format!("chunk {id} refused: {e}")));
                    }
                    let full = {
                        let mut b = buf.lock().await;
                        if b.chunks.add(id, blob, plain.len() as u32) {
                            new_chunks += 1;
                            new_bytes += blob.len() as u64;
                        }
                        b.chunks.pack_len() >= self.pack_target_bytes
                    };
                    if full {
                        self.start_flush(&buf, false).await?;
                    }
                }
            }
        }
        Ok(Response::Stored { chunks, new_chunks, new_bytes })
    }
}
