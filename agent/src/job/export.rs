//! `lifeboat-agent export`: a snapshot written out as a standard Finder/iTunes backup
//! folder, `DIR/<UDID>/` (Manifest.plist, Manifest.db, Status.plist, Info.plist and
//! `xx/<fileID>`), which Finder, iMazing, `idevicebackup2` and forensic readers open.
//!
//! A snapshot of an encrypted backup is written encrypted, byte for byte what the phone
//! made (each file encrypted again with its own key, `pipeline::transfer::Rebuild`), and
//! opens with the escrowed password; `decrypted` writes the plaintext instead, with a
//! Manifest.plist that says so. Every chunk is verified before a byte is written. The
//! folder is written under a temporary name beside its final one and renamed when
//! complete, so an interrupted export never looks like a finished one.

use std::path::{Path, PathBuf};

use lifeboat_shared::ids::SnapshotId;
use lifeboat_shared::manifest::FileEntry;

use super::{Agent, JobError, snapshot_encryption};
use crate::pipeline::transfer::{self, Rebuild};

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct Exported {
    pub snapshot: SnapshotId,
    pub udid: String,
    /// `DIR/<UDID>`.
    pub dir: PathBuf,
    pub files: usize,
    pub bytes: u64,
    /// The phone encrypted the backup.
    pub encrypted: bool,
    /// The files were written as plaintext (`--decrypted`, or an unencrypted backup).
    pub plaintext: bool,
}

/// Exports `snapshot` into `out/<UDID>`; `progress` hears the total plaintext bytes once,
/// then of each file written.
pub async fn export(
    agent: &Agent,
    snapshot: SnapshotId,
    out: &Path,
    decrypted: bool,
    progress: &(dyn Fn(u64, Option<&FileEntry>) + Sync),
) -> Result<Exported, JobError> {
    let client = agent.connect().await?;
    let manifest = transfer::open_manifest(&client, &agent.keys, snapshot).await?;
    let udid = manifest.device.udid.as_str().to_string();
    let dir = out.join(&udid);
    if std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(JobError::Other(format!(
            "{} exists and is not empty: export into another directory",
            dir.display()
        )));
    }
    let encrypted = manifest.ios_encrypted();
    let ios = if encrypted && !decrypted { snapshot_encryption(agent, &client, &manifest).await? } else { None };
    let rebuild = match &ios {
        Some((_, classes)) => Rebuild::AsThePhoneMadeThem(classes),
        None => Rebuild::Plaintext,
    };
    let partial = out.join(format!(".{udid}.partial-{snapshot}"));
    let _ = std::fs::remove_dir_all(&partial);
    let bytes: u64 = manifest.files.iter().map(|f| f.size).sum();
    progress(bytes, None);
    let written =
        transfer::download_files(&client, &agent.keys, &manifest, &partial, rebuild, &|f| progress(bytes, Some(f)))
            .await;
    client.close().await;
    let finished = written.map_err(JobError::from).and_then(|()| {
        if encrypted && decrypted {
            // Plaintext files under a Manifest.plist that still says encrypted would be
            // refused by every reader: it says what the folder now is.
            let path = partial.join("Manifest.plist");
            let plist = std::fs::read(&path).map_err(|e| JobError::Other(format!("{}: {e}", path.display())))?;
            let plain = lifeboat_shared::ios_backup::plist_without_encryption(&plist)
                .map_err(|e| JobError::Other(format!("the snapshot's {e}")))?;
            std::fs::write(&path, plain).map_err(|e| JobError::Other(format!("{}: {e}", path.display())))?;
        }
        if dir.exists() {
            std::fs::remove_dir(&dir).map_err(|e| JobError::Other(format!("{}: {e}", dir.display())))?;
        }
        std::fs::rename(&partial, &dir).map_err(|e| JobError::Other(format!("{}: {e}", dir.display())))
    });
    if let Err(e) = finished {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(e);
    }
    tracing::info!(snapshot.id = %snapshot, device.udid = %udid, encrypted, decrypted, "snapshot exported");
    Ok(Exported {
        snapshot,
        udid,
        dir,
        files: manifest.files.len(),
        bytes,
        encrypted,
        plaintext: !encrypted || decrypted,
    })
}
