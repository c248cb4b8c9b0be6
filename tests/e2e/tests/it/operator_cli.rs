//! The operator subcommands, with the server stopped (they start the embedded PostgreSQL
//! themselves) and with it running (they use its PostgreSQL).

use lifeboat_e2e::server_cli as cli;
use lifeboat_e2e::{ServerProcess, have_postgres, tempdir};

#[test]
fn tenants_are_created_and_listed_with_or_without_a_running_server() {
    if !have_postgres() {
        return;
    }
    let dir = tempdir();
    let data = dir.path().join("data");

    let (ok, out, err) = cli(&data, &["tenant", "create", "acme", "--json"]);
    assert!(ok, "{err}");
    let created: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(created["name"], "acme");
    assert!(err.contains("generated a new master key: BACK IT UP"), "{err}");
    assert!(data.join("master.key").exists());
    assert!(lifeboat_e2e::postgres_processes_under(&data).is_empty(), "the command left PostgreSQL running");

    let (ok, _, err) = cli(&data, &["tenant", "create", "acme"]);
    assert!(!ok);
    assert!(err.contains("error: tenant \"acme\" already exists"), "{err}");

    let server = ServerProcess::start(&data, &[]).unwrap();
    let (ok, out, err) = cli(&data, &["tenant", "create", "globex"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("created tenant globex ("), "{out}");
    let (ok, out, err) = cli(&data, &["tenant", "list", "--json"]);
    assert!(ok, "{err}");
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = list.as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["acme", "globex"]);
    assert!(!err.contains("generated a new master key"), "the master key was replaced: {err}");
    drop(server);
}
