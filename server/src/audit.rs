//! The audit log's hash chain, checked: each tenant's events form one chain in `seq`
//! order, each `hash` the SHA-256 of the event's canonical text, which ends with the
//! previous event's hash (docs/format.md, "Audit chain"). The database writes the chain
//! (migration V12's trigger); this module recomputes it independently, so an altered,
//! removed or reordered row — or an altered trigger — is found and named.

use lifeboat_shared::ids::TenantId;

use crate::store::audit::{self, ChainRow};

/// The first event's `prev_hash`.
pub const GENESIS: [u8; 32] = [0; 32];
const PAGE: i64 = 1000;

/// PostgreSQL's `quote_nullable`: `NULL`, or the text quoted with `'` and `\` doubled
/// (and an `E` prefix when it holds a backslash).
fn quote_nullable(v: Option<&str>) -> String {
    let Some(s) = v else { return "NULL".into() };
    let mut out = String::with_capacity(s.len() + 3);
    if s.contains('\\') {
        out.push('E');
    }
    out.push('\'');
    for c in s.chars() {
        if c == '\'' || c == '\\' {
            out.push(c);
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// The text an event's hash is the SHA-256 of.
pub fn canonical_text(row: &ChainRow) -> String {
    let mut lines =
        vec!["lifeboat-audit-v1".to_owned(), row.seq.to_string(), row.tenant.to_string(), row.at_micros.to_string()];
    lines.extend(row.fields.iter().map(|f| quote_nullable(f.as_deref())));
    lines.push(hex(&row.prev_hash));
    lines.join("\n")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Where the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, thiserror::Error)]
#[error("audit event {seq} (id {id}, {at}): {why}")]
pub struct Broken {
    pub seq: i64,
    pub id: i64,
    pub at: String,
    pub why: String,
}

/// What a verified chain holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Verified {
    pub events: u64,
    /// The first event kept (1 unless older ones expired) and the last.
    pub first_seq: Option<i64>,
    pub last_seq: Option<i64>,
    /// The newest event's hash, hex: record it elsewhere to detect a rewritten chain.
    pub head: Option<String>,
}

/// Checks one page of events following `prev` (seq and hash of the event before, `None`
/// at the start of what is kept).
fn check_page(rows: &[ChainRow], prev: &mut Option<(i64, Vec<u8>)>) -> Result<(), Broken> {
    for row in rows {
        let broken = |why: String| Broken { seq: row.seq, id: row.id, at: row.at.clone(), why };
        match prev {
            Some((seq, hash)) => {
                if row.seq != *seq + 1 {
                    return Err(broken(format!(
                        "follows event {seq}: events {} to {} are missing",
                        *seq + 1,
                        row.seq - 1
                    )));
                }
                if row.prev_hash != *hash {
                    return Err(broken("its link to the event before does not match that event's hash".into()));
                }
            }
            // The oldest event kept: the chain's start, or the first after expired ones.
            None if row.seq == 1 && row.prev_hash != GENESIS => {
                return Err(broken("the first event does not start the chain".into()));
            }
            None => {}
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, canonical_text(row).as_bytes());
        if digest.as_ref() != row.hash.as_slice() {
            return Err(broken("its contents do not match its hash: the row was altered after it was written".into()));
        }
        *prev = Some((row.seq, row.hash.clone()));
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Broken(#[from] Broken),
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
}

/// Walks a tenant's whole chain.
pub async fn verify(client: &impl tokio_postgres::GenericClient, tenant: TenantId) -> Result<Verified, VerifyError> {
    let mut prev = None;
    let (mut events, mut first) = (0u64, None);
    loop {
        let after = prev.as_ref().map_or(0, |(s, _)| *s);
        let rows = audit::chain_page(client, tenant, after, PAGE).await?;
        if rows.is_empty() {
            break;
        }
        first = first.or(rows.first().map(|r| r.seq));
        check_page(&rows, &mut prev)?;
        events += rows.len() as u64;
    }
    Ok(Verified {
        events,
        first_seq: first,
        last_seq: prev.as_ref().map(|(s, _)| *s),
        head: prev.map(|(_, h)| hex(&h)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_is_postgresql_quote_nullable() {
        assert_eq!(quote_nullable(None), "NULL");
        assert_eq!(quote_nullable(Some("")), "''");
        assert_eq!(quote_nullable(Some("it's")), "'it''s'");
        assert_eq!(quote_nullable(Some(r"a\b'")), r"E'a\\b'''");
        assert_eq!(quote_nullable(Some("é\n")), "'é\n'");
    }

    fn row(seq: i64, prev: &[u8]) -> ChainRow {
        let mut r = ChainRow {
            id: seq + 100,
            seq,
            tenant: uuid::Uuid::nil(),
            at_micros: 1_700_000_000_000_000 + seq,
            at: "t".into(),
            fields: Default::default(),
            prev_hash: prev.to_vec(),
            hash: vec![],
        };
        r.fields[0] = Some("operator (CLI)".into());
        r.fields[4] = Some("user.create".into());
        r.hash = ring::digest::digest(&ring::digest::SHA256, canonical_text(&r).as_bytes()).as_ref().to_vec();
        r
    }

    /// The example of docs/format.md, "Audit chain".
    #[test]
    fn the_canonical_text_and_hash_are_pinned() {
        let mut r = ChainRow {
            id: 1,
            seq: 1,
            tenant: uuid::Uuid::nil(),
            at_micros: 1_700_000_000_000_001,
            at: String::new(),
            fields: Default::default(),
            prev_hash: GENESIS.to_vec(),
            hash: vec![],
        };
        r.fields[0] = Some("operator (CLI)".into());
        r.fields[4] = Some("user.create".into());
        r.fields[12] = Some(r#"{"user": "it's"}"#.into());
        let text = canonical_text(&r);
        let doc = include_str!("../../docs/format.md");
        let example = doc.split("## Audit chain").nth(1).and_then(|s| s.split("```\n").nth(1)).unwrap();
        assert_eq!(format!("{text}\n"), example);
        let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
        assert_eq!(hex(digest.as_ref()), "9bbac6217db88baeb9e3a73a1a5b6ab1326e5a4790822721de8a2d973c0a742f");
    }

    #[test]
    fn a_chain_verifies_and_each_kind_of_break_is_named() {
        let a = row(1, &GENESIS);
        let b = row(2, &a.hash);
        let c = row(3, &b.hash);
        let mut prev = None;
        check_page(&[a.clone(), b.clone(), c.clone()], &mut prev).unwrap();
        assert_eq!(prev.unwrap().0, 3);

        let mut altered = b.clone();
        altered.fields[9] = Some("INC-1".into());
        let e = check_page(&[a.clone(), altered, c.clone()], &mut None).unwrap_err();
        assert_eq!((e.seq, e.id), (2, 102));
        assert!(e.why.contains("altered"), "{e}");

        let e = check_page(&[a.clone(), c.clone()], &mut None).unwrap_err();
        assert_eq!(e.to_string(), "audit event 3 (id 103, t): follows event 1: events 2 to 2 are missing");

        // The oldest kept after an expiry starts the walk; a first event must start the chain.
        check_page(&[b.clone(), c], &mut None).unwrap();
        let e = check_page(&[row(1, &[1; 32])], &mut None).unwrap_err();
        assert!(e.why.contains("does not start the chain"));
    }
}
