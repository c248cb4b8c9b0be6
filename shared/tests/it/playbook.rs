//! docs/operations.md's playbook names exactly the device states and reason codes there
//! are, so the help desk's instructions cannot drift from the code.

use std::collections::BTreeSet;

use lifeboat_shared::wire::{DeviceState, REASONS};

/// Every state: a new variant fails to compile here until it is listed (and documented).
fn all_states() -> Vec<DeviceState> {
    let every = |s: DeviceState| match s {
        DeviceState::Idle
        | DeviceState::BackingUp
        | DeviceState::NeedsTrust
        | DeviceState::NeedsPasscode
        | DeviceState::NeedsBackupPassword
        | DeviceState::Failing => s,
    };
    [
        DeviceState::Idle,
        DeviceState::BackingUp,
        DeviceState::NeedsTrust,
        DeviceState::NeedsPasscode,
        DeviceState::NeedsBackupPassword,
        DeviceState::Failing,
    ]
    .into_iter()
    .map(every)
    .collect()
}

/// The first-column codes of the table whose header row starts with `| {first} |`.
fn table(doc: &str, first: &str) -> Vec<String> {
    let mut lines = doc.lines().skip_while(|l| !l.starts_with(&format!("| {first} |"))).skip(2);
    let mut out = Vec::new();
    while let Some(row) = lines.next().filter(|l| l.starts_with("| `")) {
        out.push(row[3..].split('`').next().unwrap().to_string());
    }
    out
}

#[test]
fn the_playbook_lists_every_state_and_reason_and_nothing_else() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md");
    let doc = std::fs::read_to_string(&path).unwrap();
    let section = doc.split("## Playbook:").nth(1).expect("a Playbook section");
    let section = section.split("\n## ").next().unwrap();
    let states: Vec<String> = all_states().into_iter().map(|s| s.as_str().to_string()).collect();
    assert_eq!(table(section, "state"), states);
    let documented: BTreeSet<String> = table(section, "reason").into_iter().collect();
    let known: BTreeSet<String> = REASONS.iter().chain(&["other"]).map(|r| r.to_string()).collect();
    assert_eq!(documented, known);
    assert_eq!(table(section, "reason").len(), known.len(), "a reason listed twice");
}
