//! The virtual iPhone's databases against the readers forensic tools use: every
//! `attributedBody` of its sms.db decodes with pytypedstream (iLEAPP's decoder) to the
//! message's text.

use std::io::{Read as _, Write as _};

use virtual_iphone::content::{Content, FileKey, HOSTILE_MESSAGE, Profile, attributed_body};

use crate::host_tool;

const DECODE: &str = r#"
import sys, typedstream
for line in sys.stdin:
    obj = typedstream.unarchive_from_data(bytes.fromhex(line.strip()))
    print(obj.contents[0].value.value.encode("unicode_escape").decode("ascii"))
"#;

fn python() -> Option<String> {
    let python = std::env::var("BACKUP_DECRYPT_PYTHON").unwrap_or_else(|_| "python3".into());
    let found = std::process::Command::new(&python).args(["-c", "import typedstream"]).output();
    if found.is_ok_and(|o| o.status.success()) {
        return Some(python);
    }
    host_tool("pytypedstream (python module typedstream)");
    None
}

fn decode(python: &str, blobs: &[Vec<u8>]) -> Vec<String> {
    let mut child = std::process::Command::new(python)
        .args(["-c", DECODE])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for b in blobs {
        writeln!(stdin, "{}", b.iter().map(|x| format!("{x:02x}")).collect::<String>()).unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect()
}

fn escaped(s: &str) -> String {
    // Python's unicode_escape, for the characters these texts hold.
    s.chars()
        .map(|c| match c {
            '\\' => "\\\\".to_owned(),
            '\n' => "\\n".to_owned(),
            c if c.is_ascii() => c.to_string(),
            c if (c as u32) < 0x100 => format!("\\x{:02x}", c as u32),
            c if (c as u32) < 0x10000 => format!("\\u{:04x}", c as u32),
            c => format!("\\U{:08x}", c as u32),
        })
        .collect()
}

#[test]
fn attributed_bodies_decode_with_pytypedstream() {
    let Some(python) = python() else { return };
    let long = "a long message ".repeat(20);
    let texts = ["ok", HOSTILE_MESSAGE, "ünïcödé ✓ and 😀", long.as_str()];
    let blobs: Vec<Vec<u8>> = texts.iter().map(|t| attributed_body(t)).collect();
    let expected: Vec<String> = texts.iter().map(|t| escaped(t)).collect();
    assert_eq!(decode(&python, &blobs), expected);

    // And every one a generated phone's sms.db holds, each to its message's text.
    let c = Content::generate(7, Profile::Tiny).unwrap();
    let blobs_dir = tempfile::tempdir().unwrap();
    let mut bytes = Vec::new();
    c.open(blobs_dir.path(), &FileKey::new("HomeDomain", "Library/SMS/sms.db"))
        .unwrap()
        .read_to_end(&mut bytes)
        .unwrap();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &bytes).unwrap();
    let db = rusqlite::Connection::open(file.path()).unwrap();
    let bodies: Vec<Vec<u8>> = db
        .prepare("SELECT attributedBody FROM message WHERE attributedBody IS NOT NULL ORDER BY ROWID")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let without_text: i64 = db.query_row("SELECT count(*) FROM message WHERE text IS NULL", [], |r| r.get(0)).unwrap();
    assert!(!bodies.is_empty());
    assert_eq!(bodies.len() as i64, without_text, "a body in attributedBody has no text");
    let decoded = decode(&python, &bodies);
    assert_eq!(decoded.len(), bodies.len());
    assert!(decoded.iter().all(|t| !t.is_empty()));
}
