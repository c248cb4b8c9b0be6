//! A snapshot's datasets for people (contacts, messages, calls, photos): its databases read
//! through the server's read path into private scratch copies, parsed once by
//! `ios::preview` and cached per snapshot; and any one file of it by domain and path.

use std::sync::Arc;

use lifeboat_shared::ids::{SnapshotId, TenantId};
use lifeboat_shared::manifest::Manifest;

use crate::app::App;
use crate::ios::{self, preview::Datasets};
use crate::store;

#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    #[error("no snapshot {0}")]
    NotFound(SnapshotId),
    #[error("{0} is not in this snapshot")]
    NoFile(String),
    #[error("{0}")]
    Read(String),
}

fn read_err(what: &str) -> impl Fn(&dyn std::fmt::Display) -> PreviewError + '_ {
    move |e| PreviewError::Read(format!("{what}: {e}"))
}

pub async fn manifest(app: &App, tenant: TenantId, snapshot: SnapshotId) -> Result<Manifest, PreviewError> {
    let client = app.db.get().await.map_err(|e| read_err("getting a database connection")(&e))?;
    let row = store::snapshots::get(&client, tenant, snapshot)
        .await
        .map_err(|e| read_err("finding the snapshot")(&e))?
        .ok_or(PreviewError::NotFound(snapshot))?;
    let keys = app.tenant_keys(tenant).await.map_err(|e| read_err("loading the tenant's keys")(&e))?;
    crate::restore::read::manifest(&app.storage, &keys, snapshot, &row.manifest_key)
        .await
        .map_err(|e| read_err("opening the manifest")(&e))
}

/// The bytes of the file `domain`/`path` of a snapshot (`None` if it has no such file).
async fn file_bytes(
    app: &App,
    tenant: TenantId,
    manifest: &Manifest,
    domain: &str,
    path: &str,
) -> Result<Option<Vec<u8>>, PreviewError> {
    let stored = ios::backup_path(&ios::file_id(domain, path));
    let Some(entry) = manifest.files.iter().find(|f| f.path == stored) else { return Ok(None) };
    let client = app.db.get().await.map_err(|e| read_err("getting a database connection")(&e))?;
    let keys = app.tenant_keys(tenant).await.map_err(|e| read_err("loading the tenant's keys")(&e))?;
    crate::restore::read::file(&client, &app.storage, &keys, entry).await.map(Some).map_err(|e| read_err(path)(&e))
}

/// A stored file of the snapshot's backup directory by its path (`Manifest.plist`).
pub async fn file_of(app: &App, tenant: TenantId, manifest: &Manifest, path: &str) -> Result<Vec<u8>, PreviewError> {
    let entry = manifest.files.iter().find(|f| f.path == path).ok_or_else(|| PreviewError::NoFile(path.to_owned()))?;
    let client = app.db.get().await.map_err(|e| read_err("getting a database connection")(&e))?;
    let keys = app.tenant_keys(tenant).await.map_err(|e| read_err("loading the tenant's keys")(&e))?;
    crate::restore::read::file(&client, &app.storage, &keys, entry).await.map_err(|e| read_err(path)(&e))
}

/// One file of a snapshot, by the phone's domain and path.
pub async fn file(
    app: &App,
    tenant: TenantId,
    snapshot: SnapshotId,
    domain: &str,
    path: &str,
) -> Result<Vec<u8>, PreviewError> {
    let m = manifest(app, tenant, snapshot).await?;
    file_bytes(app, tenant, &m, domain, path).await?.ok_or_else(|| PreviewError::NoFile(format!("{domain}/{path}")))
}

/// One database's parse.
enum Parsed {
    Contacts(Vec<ios::preview::Contact>),
    Messages(ios::preview::Threads),
    Calls(Vec<ios::preview::Call>),
    Photos(Vec<ios::preview::Photo>),
}

/// The snapshot's contacts, messages, calls and photos, parsed on first use and then
/// cached. A database the snapshot lacks is an empty dataset.
pub async fn datasets(app: &App, tenant: TenantId, snapshot: SnapshotId) -> Result<Arc<Datasets>, PreviewError> {
    if let Some(d) = app.previews.get((tenant.0, snapshot.0)) {
        return Ok(d);
    }
    let m = manifest(app, tenant, snapshot).await?;
    let start = std::time::Instant::now();
    let mut d = Datasets::default();
    let sources = [
        ("HomeDomain", "Library/AddressBook/AddressBook.sqlitedb"),
        ("HomeDomain", "Library/SMS/sms.db"),
        ("HomeDomain", "Library/CallHistoryDB/CallHistory.storedata"),
        ("CameraRollDomain", "Media/PhotoData/Photos.sqlite"),
    ];
    for (i, (domain, path)) in sources.into_iter().enumerate() {
        let Some(bytes) = file_bytes(app, tenant, &m, domain, path).await? else { continue };
        let scratch = app.scratch.clone();
        let parsed = tokio::task::spawn_blocking(move || {
            scratch.with_sqlite(&bytes, |db| match i {
                0 => ios::preview::contacts(db).map(Parsed::Contacts),
                1 => ios::preview::messages(db).map(Parsed::Messages),
                2 => ios::preview::calls(db).map(Parsed::Calls),
                _ => ios::preview::photos(db).map(Parsed::Photos),
            })
        })
        .await
        .map_err(|e| read_err(path)(&e))?
        .map_err(|e| read_err(path)(&e))?;
        match parsed {
            Parsed::Contacts(c) => d.contacts = c,
            Parsed::Messages((conversations, messages)) => (d.conversations, d.messages) = (conversations, messages),
            Parsed::Calls(c) => d.calls = c,
            Parsed::Photos(p) => d.photos = p,
        }
    }
    tracing::info!(
        snapshot.id = %snapshot, contacts = d.contacts.len(), conversations = d.conversations.len(),
        calls = d.calls.len(), photos = d.photos.len(), seconds = start.elapsed().as_secs_f64(), "parsed a snapshot's datasets"
    );
    let d = Arc::new(d);
    app.previews.put((tenant.0, snapshot.0), d.clone());
    Ok(d)
}
