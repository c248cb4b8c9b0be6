//! An iPhone backup's own databases read for people: Contacts (AddressBook.sqlitedb),
//! Messages (sms.db, with `attributedBody` bodies decoded), Call history
//! (CallHistory.storedata) and the camera roll (Photos.sqlite). Queries follow the public readers (iLEAPP, MVT); dates count
//! from 2001-01-01 UTC, in seconds or (newer sms.db) nanoseconds. A column a given iOS
//! version lacks reads as empty, never as an error that hides the rest.

use std::collections::HashMap;

use rusqlite::{Connection, OptionalExtension as _};
use serde::Serialize;

use super::APPLE_EPOCH;

/// A labelled value: a phone number or an e-mail address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Labelled {
    pub label: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Contact {
    /// `ABPerson.ROWID`.
    pub id: i64,
    pub first: Option<String>,
    pub middle: Option<String>,
    pub last: Option<String>,
    pub organization: Option<String>,
    pub job_title: Option<String>,
    pub note: Option<String>,
    pub phones: Vec<Labelled>,
    pub emails: Vec<Labelled>,
    pub addresses: Vec<Labelled>,
}

impl Contact {
    /// The name a phone shows: first middle last, else the organisation, else the first
    /// phone or e-mail.
    pub fn display_name(&self) -> String {
        let name: Vec<&str> = [&self.first, &self.middle, &self.last]
            .iter()
            .filter_map(|p| p.as_deref())
            .filter(|p| !p.is_empty())
            .collect();
        if !name.is_empty() {
            return name.join(" ");
        }
        self.organization
            .clone()
            .or_else(|| self.phones.first().map(|p| p.value.clone()))
            .or_else(|| self.emails.first().map(|e| e.value.clone()))
            .unwrap_or_else(|| "(no name)".into())
    }
}

/// `_$!<Mobile>!$_` → `Mobile`; custom labels stay as they are.
fn label_text(raw: Option<String>) -> String {
    match raw {
        Some(l) => l.strip_prefix("_$!<").and_then(|l| l.strip_suffix(">!$_")).map(str::to_owned).unwrap_or(l),
        None => String::new(),
    }
}

/// Contacts, sorted as a phone sorts them (last name, first name).
pub fn contacts(db: &Connection) -> rusqlite::Result<Vec<Contact>> {
    let labels: HashMap<i64, String> = db
        .prepare("SELECT ROWID, value FROM ABMultiValueLabel")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut people: Vec<Contact> = db
        .prepare("SELECT ROWID, First, Middle, Last, Organization, JobTitle, Note FROM ABPerson ORDER BY ROWID")?
        .query_map([], |r| {
            Ok(Contact {
                id: r.get(0)?,
                first: r.get(1)?,
                middle: r.get(2)?,
                last: r.get(3)?,
                organization: r.get(4)?,
                job_title: r.get(5)?,
                note: r.get(6)?,
                phones: vec![],
                emails: vec![],
                addresses: vec![],
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    let index: HashMap<i64, usize> = people.iter().enumerate().map(|(i, p)| (p.id, i)).collect();
    let mut values = db.prepare(
        "SELECT UID, record_id, property, label, value FROM ABMultiValue WHERE property IN (3, 4, 5) \
         ORDER BY record_id, property, identifier, UID",
    )?;
    // Address parts (property 5) live in ABMultiValueEntry, keyed by ABMultiValueEntryKey.
    let has_entries = db
        .query_row("SELECT 1 FROM sqlite_master WHERE name = 'ABMultiValueEntryKey'", [], |_| Ok(()))
        .optional()?
        .is_some();
    /// UID, record_id, property, label, value.
    type ValueRow = (i64, i64, i64, Option<i64>, Option<String>);
    let rows: Vec<ValueRow> = values
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (uid, record, property, label, value) in rows {
        let Some(&i) = index.get(&record) else { continue };
        let label = label_text(label.and_then(|l| labels.get(&l).cloned()));
        let value = match (property, value) {
            (5, _) if has_entries => {
                let parts: Vec<String> = db
                    .prepare(
                        "SELECT e.value FROM ABMultiValueEntry e JOIN ABMultiValueEntryKey k ON k.ROWID = e.key \
                         WHERE e.parent_id = ?1 ORDER BY e.key",
                    )?
                    .query_map([uid], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                parts.join(", ")
            }
            (_, Some(v)) => v,
            (_, None) => continue,
        };
        let entry = Labelled { label, value };
        match property {
            3 => people[i].phones.push(entry),
            4 => people[i].emails.push(entry),
            _ => people[i].addresses.push(entry),
        }
    }
    let key = |c: &Contact| (c.last.clone().unwrap_or_default().to_lowercase(), c.display_name().to_lowercase(), c.id);
    people.sort_by_key(key);
    Ok(people)
}

/// A message thread.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Conversation {
    /// `chat.ROWID`.
    pub id: i64,
    /// The other side: a phone number, an e-mail, or a group's identifier.
    pub identifier: String,
    pub display_name: Option<String>,
    pub service: Option<String>,
    pub messages: usize,
    /// Unix seconds of the newest message.
    pub last_at: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Attachment {
    /// `attachment.ROWID`.
    pub id: i64,
    pub name: String,
    pub mime_type: Option<String>,
    pub size: i64,
    /// Where the file is in the backup: MediaDomain and a path under Library/SMS/Attachments.
    pub domain: String,
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    /// `message.ROWID`.
    pub id: i64,
    pub chat: i64,
    pub from_me: bool,
    /// The sender's handle (`handle.id`) for a received message.
    pub handle: Option<String>,
    /// The body: `text`, or decoded from `attributedBody` when `text` is empty.
    pub text: String,
    pub service: Option<String>,
    /// Unix seconds.
    pub at: f64,
    pub attachments: Vec<Attachment>,
}

/// sms.db dates: seconds since 2001, or nanoseconds on iOS 11 and later.
pub fn apple_time(v: f64) -> f64 {
    let secs = if v.abs() > 1e11 { v / 1e9 } else { v };
    secs + APPLE_EPOCH as f64
}

/// The first NSString of a typedstream-archived NSAttributedString (`attributedBody`):
/// after the class name `NSString`, the `+` type tag, then a length (one byte, or
/// `0x81` + 2 bytes, `0x82` + 4 bytes, little-endian) and that many UTF-8 bytes.
pub fn attributed_body_text(blob: &[u8]) -> Option<String> {
    let at = blob.windows(8).position(|w| w == b"NSString")? + 8;
    let rest = blob.get(at..)?;
    let plus = rest.iter().take(16).position(|&b| b == b'+')? + 1;
    let rest = rest.get(plus..)?;
    let (len, skip): (usize, usize) = match *rest.first()? {
        0x81 => (usize::from(u16::from_le_bytes([*rest.get(1)?, *rest.get(2)?])), 3),
        0x82 => (u32::from_le_bytes(rest.get(1..5)?.try_into().ok()?) as usize, 5),
        b if b < 0x80 => (usize::from(b), 1),
        _ => return None,
    };
    let bytes = rest.get(skip..skip.checked_add(len)?)?;
    String::from_utf8(bytes.to_vec()).ok()
}

/// Every conversation, newest first, and every message by conversation, oldest first.
/// Conversations, and each one's messages by `chat.ROWID`.
pub type Threads = (Vec<Conversation>, HashMap<i64, Vec<Message>>);

pub fn messages(db: &Connection) -> rusqlite::Result<Threads> {
    let mut attachments: HashMap<i64, Vec<Attachment>> = HashMap::new();
    let mut stmt = db.prepare(
        "SELECT j.message_id, a.ROWID, a.filename, a.transfer_name, a.mime_type, a.total_bytes \
         FROM message_attachment_join j JOIN attachment a ON a.ROWID = j.attachment_id ORDER BY a.ROWID",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, Option<String>>(2)?,
            r.get::<_, Option<String>>(3)?,
            r.get::<_, Option<String>>(4)?,
            r.get::<_, Option<i64>>(5)?,
        ))
    })?;
    for row in rows {
        let (message, id, filename, transfer, mime, size) = row?;
        let Some(filename) = filename else { continue };
        // `~/Library/SMS/Attachments/ab/12/<GUID>/IMG.HEIC`, in MediaDomain.
        let path = filename.trim_start_matches("~/").trim_start_matches("/var/mobile/").to_owned();
        let name = transfer.unwrap_or_else(|| path.rsplit('/').next().unwrap_or_default().to_owned());
        attachments.entry(message).or_default().push(Attachment {
            id,
            name,
            mime_type: mime,
            size: size.unwrap_or(0),
            domain: "MediaDomain".into(),
            path,
        });
    }
    let mut by_chat: HashMap<i64, Vec<Message>> = HashMap::new();
    let mut stmt = db.prepare(
        "SELECT m.ROWID, j.chat_id, m.is_from_me, h.id, m.text, m.attributedBody, m.service, m.date \
         FROM message m JOIN chat_message_join j ON j.message_id = m.ROWID \
         LEFT JOIN handle h ON h.ROWID = m.handle_id ORDER BY m.date, m.ROWID",
    )?;
    let rows = stmt.query_map([], |r| {
        let text: Option<String> = r.get(4)?;
        let body: Option<Vec<u8>> = r.get(5)?;
        let id: i64 = r.get(0)?;
        let text = match text.filter(|t| !t.trim_matches('\u{FFFC}').is_empty() || body.is_none()) {
            Some(t) => t,
            None => body.as_deref().and_then(attributed_body_text).unwrap_or_default(),
        };
        Ok(Message {
            id,
            chat: r.get(1)?,
            from_me: r.get::<_, Option<i64>>(2)?.unwrap_or(0) != 0,
            handle: r.get(3)?,
            text: text.replace('\u{FFFC}', "").trim().to_owned(),
            service: r.get(6)?,
            at: apple_time(r.get::<_, Option<f64>>(7)?.unwrap_or(0.0)),
            attachments: vec![],
        })
    })?;
    for row in rows {
        let mut m = row?;
        m.attachments = attachments.remove(&m.id).unwrap_or_default();
        by_chat.entry(m.chat).or_default().push(m);
    }
    let mut chats: Vec<Conversation> = db
        .prepare("SELECT ROWID, chat_identifier, display_name, service_name FROM chat")?
        .query_map([], |r| {
            Ok(Conversation {
                id: r.get(0)?,
                identifier: r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                display_name: r.get::<_, Option<String>>(2)?.filter(|n| !n.is_empty()),
                service: r.get(3)?,
                messages: 0,
                last_at: None,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    for c in &mut chats {
        let list = by_chat.get(&c.id);
        c.messages = list.map_or(0, Vec::len);
        c.last_at = list.and_then(|l| l.last()).map(|m| m.at);
    }
    chats.sort_by(|a, b| b.last_at.partial_cmp(&a.last_at).unwrap_or(std::cmp::Ordering::Equal).then(a.id.cmp(&b.id)));
    Ok((chats, by_chat))
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Call {
    /// `ZCALLRECORD.Z_PK`.
    pub id: i64,
    /// Unix seconds.
    pub at: f64,
    pub duration_secs: f64,
    pub address: String,
    pub name: Option<String>,
    /// `outgoing` or `incoming`.
    pub direction: &'static str,
    pub answered: bool,
    /// `phone`, `FaceTime video`, `FaceTime audio` or `app`.
    pub kind: &'static str,
    pub location: Option<String>,
}

/// The call history, newest first.
pub fn calls(db: &Connection) -> rusqlite::Result<Vec<Call>> {
    let mut stmt = db.prepare(
        "SELECT Z_PK, ZDATE, ZDURATION, ZADDRESS, ZNAME, ZORIGINATED, ZANSWERED, ZCALLTYPE, ZLOCATION \
         FROM ZCALLRECORD ORDER BY ZDATE DESC, Z_PK",
    )?;
    let rows = stmt.query_map([], |r| {
        // ZADDRESS is text on most versions, bytes on some.
        let address = match r.get_ref(3)? {
            rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => {
                String::from_utf8_lossy(t).into_owned()
            }
            _ => String::new(),
        };
        Ok(Call {
            id: r.get(0)?,
            at: r.get::<_, Option<f64>>(1)?.unwrap_or(0.0) + APPLE_EPOCH as f64,
            duration_secs: r.get::<_, Option<f64>>(2)?.unwrap_or(0.0),
            address,
            name: r.get(4)?,
            direction: if r.get::<_, Option<i64>>(5)?.unwrap_or(0) == 1 { "outgoing" } else { "incoming" },
            answered: r.get::<_, Option<i64>>(6)?.unwrap_or(0) != 0,
            kind: match r.get::<_, Option<i64>>(7)?.unwrap_or(1) {
                1 => "phone",
                8 => "FaceTime video",
                16 => "FaceTime audio",
                _ => "app",
            },
            location: r.get(8)?,
        })
    })?;
    rows.collect()
}

/// A picture or video of the camera roll.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Photo {
    /// `ZASSET.Z_PK`.
    pub id: i64,
    /// Where the original is in the backup: CameraRollDomain, `Media/<ZDIRECTORY>/<ZFILENAME>`.
    pub domain: String,
    pub path: String,
    /// The name it had when it was taken or imported (`ZORIGINALFILENAME`), else its file name.
    pub name: String,
    pub uti: Option<String>,
    /// Unix seconds.
    pub taken: f64,
    pub width: i64,
    pub height: i64,
    pub video: bool,
    pub size: Option<i64>,
}

impl Photo {
    /// A format every browser shows as it is (no HEIC, no video).
    pub fn browser_image(&self) -> bool {
        matches!(self.uti.as_deref(), Some("public.jpeg" | "public.png"))
    }
}

/// The camera roll from Photos.sqlite (`ZASSET` on iOS 14 and later, `ZGENERICASSET` before),
/// newest first, without what the user deleted (`ZTRASHEDSTATE`).
pub fn photos(db: &Connection) -> rusqlite::Result<Vec<Photo>> {
    let table =
        if db.query_row("SELECT 1 FROM sqlite_master WHERE name = 'ZASSET'", [], |_| Ok(())).optional()?.is_some() {
            "ZASSET"
        } else {
            "ZGENERICASSET"
        };
    let sql = format!(
        "SELECT a.Z_PK, a.ZDIRECTORY, a.ZFILENAME, a.ZUNIFORMTYPEIDENTIFIER, a.ZDATECREATED, a.ZWIDTH, a.ZHEIGHT, \
         a.ZKIND, x.ZORIGINALFILENAME, x.ZORIGINALFILESIZE FROM {table} a \
         LEFT JOIN ZADDITIONALASSETATTRIBUTES x ON x.Z_PK = a.ZADDITIONALATTRIBUTES \
         WHERE coalesce(a.ZTRASHEDSTATE, 0) = 0 ORDER BY a.ZDATECREATED DESC, a.Z_PK"
    );
    let mut stmt = db.prepare(&sql)?;
    let rows = stmt.query_map([], |r| {
        let dir: Option<String> = r.get(1)?;
        let file: Option<String> = r.get(2)?;
        let file = file.unwrap_or_default();
        let path = match dir.filter(|d| !d.is_empty()) {
            Some(d) => format!("Media/{d}/{file}"),
            None => format!("Media/{file}"),
        };
        Ok(Photo {
            id: r.get(0)?,
            domain: "CameraRollDomain".into(),
            name: r.get::<_, Option<String>>(8)?.filter(|n| !n.is_empty()).unwrap_or_else(|| file.clone()),
            path,
            uti: r.get(3)?,
            taken: r.get::<_, Option<f64>>(4)?.unwrap_or(0.0) + APPLE_EPOCH as f64,
            width: r.get::<_, Option<i64>>(5)?.unwrap_or(0),
            height: r.get::<_, Option<i64>>(6)?.unwrap_or(0),
            video: r.get::<_, Option<i64>>(7)?.unwrap_or(0) == 1,
            size: r.get(9)?,
        })
    })?;
    rows.collect()
}

/// A snapshot's datasets, parsed once.
#[derive(Debug, Default)]
pub struct Datasets {
    pub contacts: Vec<Contact>,
    pub conversations: Vec<Conversation>,
    pub messages: HashMap<i64, Vec<Message>>,
    pub calls: Vec<Call>,
    pub photos: Vec<Photo>,
}

/// The datasets of the snapshots looked at last, at most [`Cache::CAPACITY`]; the oldest
/// looked at goes first.
#[derive(Debug, Default)]
pub struct Cache {
    entries: std::sync::Mutex<std::collections::VecDeque<(CacheKey, std::sync::Arc<Datasets>)>>,
}

/// (tenant, snapshot): a snapshot id never answers for another tenant.
pub type CacheKey = (uuid::Uuid, uuid::Uuid);

impl Cache {
    pub const CAPACITY: usize = 16;

    #[allow(clippy::type_complexity)]
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::VecDeque<((uuid::Uuid, uuid::Uuid), std::sync::Arc<Datasets>)>>
    {
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn get(&self, snapshot: CacheKey) -> Option<std::sync::Arc<Datasets>> {
        let mut e = self.lock();
        let i = e.iter().position(|(id, _)| *id == snapshot)?;
        let hit = e.remove(i)?;
        let d = hit.1.clone();
        e.push_back(hit);
        Some(d)
    }

    pub fn put(&self, snapshot: CacheKey, d: std::sync::Arc<Datasets>) {
        let mut e = self.lock();
        e.retain(|(id, _)| *id != snapshot);
        if e.len() >= Self::CAPACITY {
            e.pop_front();
        }
        e.push_back((snapshot, d));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributed_bodies_decode_short_and_long_and_refuse_garbage() {
        let mut blob = b"\x04\x0bstreamtyped\x81\xe8\x03\x84\x01@\x84\x84\x84\x12NSAttributedString\x00\x84\x84\x08NSObject\x00\x85\x92\x84\x84\x84\x08NSString\x01\x94\x84\x01+".to_vec();
        let mut short = blob.clone();
        short.push(5);
        short.extend_from_slice(b"hello\x86\x84\x02iI\x01\x05");
        assert_eq!(attributed_body_text(&short).as_deref(), Some("hello"));
        let long = "ü".repeat(200);
        blob.push(0x81);
        blob.extend_from_slice(&(long.len() as u16).to_le_bytes());
        blob.extend_from_slice(long.as_bytes());
        assert_eq!(attributed_body_text(&blob).as_deref(), Some(long.as_str()));
        assert_eq!(attributed_body_text(b"NSString\x01+\x7f"), None, "a length past the end");
        assert_eq!(attributed_body_text(b"nothing here"), None);
    }

    #[test]
    fn dates_in_seconds_and_nanoseconds_agree() {
        assert_eq!(apple_time(0.0), 978_307_200.0);
        assert_eq!(apple_time(757_382_400.0), apple_time(757_382_400.0 * 1e9));
    }
}
