//! Benchmark: the agent's per-byte pipeline on one core — chunk (FastCDC), id (keyed
//! BLAKE3), compress (zstd when it helps), seal (AES-256-GCM) — and the server's
//! verification (open + decompress + re-hash). Target: ≥ 500 MB/s on photo-like data.
//!
//! Run: `cargo bench -p lifeboat-shared --bench pipeline` (results in docs/performance.md).

use std::hint::black_box;
use std::time::Instant;

use lifeboat_shared::chunk::{DataKey, IdKey, boundaries, open_and_verify, seal_chunk};

/// Photo-like: incompressible bytes (xorshift), as JPEG/HEIC bodies are.
fn photo_like(len: usize) -> Vec<u8> {
    let mut s = 0x9e37_79b9_7f4a_7c15_u64;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        out.extend_from_slice(&s.to_le_bytes());
    }
    out.truncate(len);
    out[..4].copy_from_slice(&[0xff, 0xd8, 0xff, 0xe1]);
    out
}

/// Database-like: SQLite pages of repetitive records, compressible about 3-5x.
fn database_like(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(
            format!(
                "{i:08}|+1555{:07}|Message number {i} about lunch|2024-05-{:02}\n",
                i * 7919 % 10_000_000,
                i % 28 + 1
            )
            .as_bytes(),
        );
        i += 1;
    }
    out.truncate(len);
    out
}

fn run(name: &str, data: &[u8], rounds: usize) {
    let ids = IdKey::from_bytes([3; 32]);
    let key = DataKey::from_bytes(&[5; 32]);
    let seed = ids.chunker_seed();
    let mut nonce = 0u128;
    let mut blobs = Vec::new();

    let start = Instant::now();
    let mut stored = 0usize;
    for round in 0..rounds {
        for r in boundaries(data, seed) {
            let chunk = &data[r];
            let id = ids.chunk_id(chunk);
            nonce += 1;
            let mut n = [0u8; 12];
            n.copy_from_slice(&nonce.to_le_bytes()[..12]);
            let blob = seal_chunk(&key, &id, chunk, n);
            stored += blob.len();
            if round == 0 {
                blobs.push((id, blob));
            } else {
                black_box(blob);
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let bytes = (data.len() * rounds) as f64;
    println!(
        "{name:<14} seal   {:>7.0} MB/s  ({} chunks/round, stored {:.1}% of input)",
        bytes / secs / 1e6,
        blobs.len(),
        100.0 * stored as f64 / bytes
    );

    let start = Instant::now();
    for _ in 0..rounds {
        for (id, blob) in &blobs {
            black_box(open_and_verify(&key, &ids, id, blob).expect("verifies"));
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!("{name:<14} verify {:>7.0} MB/s", bytes / secs / 1e6);
}

fn main() {
    // `cargo bench` passes --bench; ignore arguments.
    let size = 256 << 20;
    println!("one thread, {} MiB per round, 3 rounds", size >> 20);
    run("photo-like", &photo_like(size), 3);
    run("database-like", &database_like(size), 3);
}
