//! What the console's readers and exports cost on a backed-up virtual iPhone (`medium`:
//! ~2 GB, ~50,000 files, unless `LIFEBOAT_BENCH_PROFILE` says otherwise): the first parse
//! of a snapshot's contacts, messages, calls and photos, a cached read after it, and the
//! whole snapshot streamed as a Finder-backup ZIP (`GET /api/v1/snapshots/{id}/backup.zip`)
//! and the camera roll as one (`photos.zip`), each counted as it arrives and thrown away.
//! `cargo bench -p lifeboat-e2e --bench console`; results in docs/performance.md.

use std::time::Instant;

use lifeboat_e2e::bench::{Rig, expect_mb, timed};
use lifeboat_e2e::{http_get, http_post_json, server_cli};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir_in(std::env::var_os("LIFEBOAT_BENCH_DIR").unwrap_or_else(|| "/tmp".into()))?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = rt.block_on(run(&dir));
    drop(rt);
    result
}

/// GETs `path` and counts the body's bytes as they arrive: (bytes, seconds).
async fn stream(addr: std::net::SocketAddr, path: &str, bearer: &str) -> anyhow::Result<(u64, f64)> {
    let start = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {bearer}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = vec![0u8; 1 << 20];
    let mut head = Vec::new();
    let mut total = 0u64;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        if head.len() < 4096 {
            head.extend_from_slice(&buf[..n.min(4096)]);
        }
        total += n as u64;
    }
    let status = String::from_utf8_lossy(&head[..head.len().min(12)]).into_owned();
    anyhow::ensure!(status.contains(" 200"), "{path}: {status}");
    Ok((total, start.elapsed().as_secs_f64()))
}

async fn run(dir: &tempfile::TempDir) -> anyhow::Result<()> {
    let rig = Rig::start(dir.path(), 1).await?;
    let (udid, phone) = rig.phone(0)?;
    let size_mb = expect_mb(&phone.expect()?);
    let (_, _, _, out) = tokio::task::block_in_place(|| timed(rig.agent(&["backup", "--device", &udid, "--json"])))?;
    let snapshot = serde_json::from_str::<serde_json::Value>(out.lines().last().unwrap_or("{}"))?["snapshot"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no snapshot in {out}"))?
        .to_owned();
    let (ok, cred, err) =
        server_cli(&rig.server.data_dir, &["user", "create", "--tenant", "bench", "--role", "helpdesk"]);
    anyhow::ensure!(ok, "{err}");
    let cred = cred.trim().to_owned();
    let addr = rig.server.http_addr;
    let (code, body) =
        http_post_json(addr, &format!("/api/v1/devices/{udid}/access"), Some(&cred), r#"{"reason": "bench"}"#).await?;
    anyhow::ensure!(code == 201, "{body}");
    println!("console: a `{}` virtual iPhone's snapshot ({size_mb:.0} MB of files)", rig.profile);

    let start = Instant::now();
    let (code, body) = http_get(addr, &format!("/api/v1/snapshots/{snapshot}/contacts"), Some(&cred)).await?;
    anyhow::ensure!(code == 200, "{body}");
    let first = start.elapsed().as_secs_f64();
    let mut cached = Vec::new();
    for what in ["contacts", "messages", "photos", "contacts", "messages", "photos"] {
        let start = Instant::now();
        let (code, body) = http_get(addr, &format!("/api/v1/snapshots/{snapshot}/{what}"), Some(&cred)).await?;
        anyhow::ensure!(code == 200, "{body}");
        cached.push((start.elapsed().as_secs_f64() * 1000.0, body.len()));
    }
    let v: serde_json::Value =
        serde_json::from_str(&http_get(addr, &format!("/api/v1/snapshots/{snapshot}/photos"), Some(&cred)).await?.1)?;
    let photos = v["photos"].as_array().map_or(0, Vec::len);
    println!("first parse (AddressBook, sms.db, CallHistory, Photos.sqlite) + contacts answer: {first:6.2} s");
    let worst = cached.iter().map(|(ms, _)| *ms).fold(0.0, f64::max);
    println!("cached dataset answers (contacts, messages, photos, twice): slowest {worst:.1} ms");

    let (bytes, secs) = stream(addr, &format!("/api/v1/snapshots/{snapshot}/backup.zip"), &cred).await?;
    println!(
        "backup.zip (whole snapshot, streamed): {:.0} MB in {secs:.1} s = {:.0} MB/s",
        bytes as f64 / 1e6,
        bytes as f64 / 1e6 / secs
    );
    let (bytes, secs) = stream(addr, &format!("/api/v1/snapshots/{snapshot}/photos.zip"), &cred).await?;
    println!(
        "photos.zip ({photos} originals, streamed): {:.0} MB in {secs:.1} s = {:.0} MB/s",
        bytes as f64 / 1e6,
        bytes as f64 / 1e6 / secs
    );
    Ok(())
}
