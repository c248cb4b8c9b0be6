//! The server's layout holds: PostgreSQL SQL only in `store/` (and the platform's
//! migrations, database creation and ping), no file much over 600 lines, and subsystems
//! that import only downwards — so the map in ARCHITECTURE.md stays true.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Each subsystem's tier: a module may import its own tier or lower ones, never higher.
const TIERS: &[(&str, u8)] = &[
    ("platform", 0),
    ("config", 0),
    ("keys", 0),
    ("store", 1),
    ("objects", 1),
    ("ios", 1),
    ("auth", 2),
    ("escrow", 2),
    ("audit", 2),
    ("session", 2),
    ("app", 3),
    ("users", 3),
    ("ingest", 4),
    ("restore", 4),
    ("agents", 5),
    ("jobs", 5),
    ("http", 5),
    ("console", 5),
    ("serve", 6),
    ("admin", 6),
];

fn sources() -> Vec<(String, PathBuf)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push((p.strip_prefix(&root).unwrap().to_string_lossy().into_owned(), p));
            }
        }
    }
    out.sort();
    out
}

fn subsystem(rel: &str) -> &str {
    rel.split('/').next().unwrap().trim_end_matches(".rs")
}

fn name(s: &str) -> String {
    s.trim_start().chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect()
}

/// The subsystems a file names through `crate::…`, nested braces included
/// (`crate::{store::{self, x}, restore}` names `store` and `restore`).
fn imports(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        let Some(group) = rest.strip_prefix('{') else {
            out.push(name(rest));
            continue;
        };
        // The first name of each top-level item of the group.
        let (mut depth, mut start) = (0usize, 0usize);
        for (j, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    out.push(name(&group[start..j]));
                    break;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    out.push(name(&group[start..j]));
                    start = j + 1;
                }
                _ => {}
            }
        }
    }
    out.retain(|n| !n.is_empty());
    out
}

#[test]
fn the_import_scanner_sees_nested_groups() {
    let text = "use crate::{store::{self, x}, restore};\nuse crate::app::App;\nlet y = crate::jobs::run;";
    assert_eq!(imports(text), ["store", "restore", "app", "jobs"]);
}

#[test]
fn subsystems_import_only_downwards() {
    let tiers: BTreeMap<&str, u8> = TIERS.iter().copied().collect();
    let mut wrong = Vec::new();
    for (rel, path) in sources() {
        let from = subsystem(&rel);
        if matches!(from, "lib" | "main") {
            continue;
        }
        let Some(&tier) = tiers.get(from) else {
            wrong.push(format!("{rel}: subsystem {from} has no tier in this test (and no place in ARCHITECTURE.md?)"));
            continue;
        };
        for to in imports(&std::fs::read_to_string(&path).unwrap()) {
            match tiers.get(to.as_str()) {
                Some(&t) if t > tier => wrong.push(format!("{rel}: {from} (tier {tier}) imports {to} (tier {t})")),
                Some(_) => {}
                None => wrong.push(format!("{rel}: imports crate::{to}, which has no tier")),
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn sql_lives_in_the_store() {
    let calls = [
        ".query(",
        ".query_one(",
        ".query_opt(",
        ".query_raw(",
        ".query_typed(",
        ".simple_query(",
        ".execute(",
        ".execute_raw(",
        ".batch_execute(",
        ".transaction()",
        ".build_transaction()",
        ".prepare(",
        ".copy_in(",
        ".copy_out(",
    ];
    let mut outside = Vec::new();
    for (rel, path) in sources() {
        if rel.starts_with("store/") || rel == "platform/db.rs" || rel.starts_with("ios/") {
            continue;
        }
        for (n, line) in std::fs::read_to_string(&path).unwrap().lines().enumerate() {
            if calls.iter().any(|c| line.contains(c)) {
                outside.push(format!("{rel}:{}: {}", n + 1, line.trim()));
            }
        }
    }
    assert!(outside.is_empty(), "SQL outside store/:\n{}", outside.join("\n"));
}

#[test]
fn no_source_file_is_two_things() {
    let long: Vec<String> = sources()
        .into_iter()
        .map(|(rel, path)| (rel, std::fs::read_to_string(path).unwrap().lines().count()))
        .filter(|(_, n)| *n > 650)
        .map(|(rel, n)| format!("{rel}: {n} lines"))
        .collect();
    assert!(long.is_empty(), "{}", long.join("\n"));
}
