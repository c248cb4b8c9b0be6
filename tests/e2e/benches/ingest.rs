//! Benchmark: server ingest of new data over loopback QUIC into local-disk storage, with
//! 1 and 4 concurrent clients. Blobs are sealed before the clock starts, so this measures
//! the server's side: receive, decrypt + re-hash every chunk, write packs, index, commit.
//!
//! Run: `cargo bench -p lifeboat-e2e --bench ingest` (needs PostgreSQL; results in
//! docs/performance.md). Target: ≥ 300 MB/s on the 2-core reference machine.

use std::time::Instant;

use lifeboat_e2e::{enrol, open_run, server_config};
use lifeboat_server::serve;
use lifeboat_server::store::tenants;
use lifeboat_shared::chunk::seal_chunk;
use lifeboat_shared::ids::ChunkId;
use lifeboat_shared::manifest::{ChunkRef, DeviceInfo, FileEntry, Manifest};
use lifeboat_test_support as testing;

const TOTAL_BYTES: usize = 1 << 30;
const CHUNK_BYTES: usize = 512 * 1024;
const BATCH: usize = 32;

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        println!("server ingest over loopback QUIC into local disk, {} MiB of new data per run", TOTAL_BYTES >> 20);
        for clients in [1usize, 4] {
            let mbps = run(clients).await?;
            println!("{clients} client(s): {mbps:>6.0} MB/s");
        }
        anyhow::Ok(())
    })
}

async fn run(clients: usize) -> anyhow::Result<f64> {
    let db = testing::test_db().await.ok_or_else(|| anyhow::anyhow!("PostgreSQL is needed"))?;
    let dir = tempfile::tempdir()?;
    let server = serve::start(server_config(&db.url, &dir.path().join("data"))).await?;
    let mut pg = db.client().await;
    let tenant = tenants::create(&mut pg, &server.app.master, "bench").await?.id;

    // Enrol the clients and seal their data before timing.
    let mut jobs = Vec::new();
    for c in 0..clients {
        let (client, keys) = enrol(&server, &pg, tenant, &format!("bench-{c}")).await?;
        let (ids, data) = (&keys.id, &keys.data);
        let udid = format!("{:08X}-{:016X}", 0x8030 + c, 1000 + c);
        let device = DeviceInfo {
            udid: udid.parse()?,
            name: format!("bench {c}"),
            product_type: "iPhone15,2".into(),
            ios_version: "17.5".into(),
        };
        let (run, snapshot) = open_run(&client, &device).await?;
        let per_client = TOTAL_BYTES / clients / CHUNK_BYTES;
        let mut blobs: Vec<(ChunkId, Vec<u8>)> = Vec::with_capacity(per_client);
        let mut refs = Vec::with_capacity(per_client);
        for i in 0..per_client {
            let mut plain = vec![0u8; CHUNK_BYTES];
            blake3::Hasher::new().update(&[c as u8]).update(&(i as u64).to_le_bytes()).finalize_xof().fill(&mut plain);
            let id = ids.chunk_id(&plain);
            let mut nonce = [0u8; 12];
            nonce[..8].copy_from_slice(&(i as u64).to_le_bytes());
            blobs.push((id, seal_chunk(data, &id, &plain, nonce)));
            refs.push(ChunkRef { id, length: CHUNK_BYTES as u32 });
        }
        let size = (refs.len() * CHUNK_BYTES) as u64;
        let manifest = Manifest {
            snapshot,
            device,
            created_unix_ms: 0,
            files: vec![FileEntry {
                path: "data".into(),
                size,
                mode: 0o644,
                mtime_unix_seconds: 0,
                chunks: refs,
                ios_key: None,
            }],
        };
        let sealed = manifest.seal(data, [9; 12])?;
        // Batches moved (not copied) out of the list before the clock starts.
        let mut blobs = blobs.into_iter();
        let batches: Vec<Vec<(ChunkId, Vec<u8>)>> =
            std::iter::from_fn(|| Some(blobs.by_ref().take(BATCH).collect::<Vec<_>>()).filter(|b| !b.is_empty()))
                .collect();
        jobs.push((client, run, snapshot, batches, sealed));
    }

    let start = Instant::now();
    let mut tasks = Vec::new();
    for (client, run, snapshot, blobs, sealed) in jobs {
        tasks.push(tokio::spawn(async move {
            // Four streams in flight per client at all times, as the agent uploads.
            let client = std::sync::Arc::new(client);
            let mut uploads = tokio::task::JoinSet::new();
            for batch in blobs {
                if uploads.len() == 4
                    && let Some(done) = uploads.join_next().await
                {
                    done??;
                }
                let client = client.clone();
                uploads.spawn(async move { client.put_chunks(run, batch).await.map(drop) });
            }
            while let Some(done) = uploads.join_next().await {
                done??;
            }
            client.commit(run, snapshot, &sealed).await?;
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = start.elapsed().as_secs_f64();
    server.stop().await?;
    Ok(TOTAL_BYTES as f64 / secs / 1e6)
}
