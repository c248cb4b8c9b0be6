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

/// An MDM rollout's token: `--uses 20` enrols 20 workstations (several at once, so the
/// row lock is what keeps the count) and refuses the 21st; a revoked token enrols none;
/// `token list`, `agent list` and `user list` show what happened, and a revoked API user
/// gets 401 from its next request. Every change is in the tenant's audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_use_tokens_and_revocation_for_a_mass_rollout() {
    if !have_postgres() {
        return;
    }
    let dir = tempdir();
    let data = dir.path().join("data");
    let server = ServerProcess::start(&data, &[]).unwrap();
    let (ok, _, err) = cli(&data, &["tenant", "create", "acme", "--encryption", "off"]);
    assert!(ok, "{err}");
    let quic = server.quic_addr.to_string();
    let create = |uses: &str| {
        let (ok, out, err) = cli(
            &data,
            &[
                "--quic-advertise",
                &quic,
                "token",
                "create",
                "--tenant",
                "acme",
                "--uses",
                uses,
                "--expires",
                "1h",
                "--json",
            ],
        );
        assert!(ok, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    for bad in ["0", "100001", "many"] {
        let (ok, _, err) = cli(&data, &["token", "create", "--tenant", "acme", "--uses", bad]);
        assert!(!ok && err.contains("--uses"), "--uses {bad}: {err}");
    }
    let rollout = create("20");
    assert_eq!(rollout["uses"], 20);
    let token = rollout["token"].as_str().unwrap().to_string();

    let enrol = |n: usize, token: String| {
        let state = dir.path().join(format!("ws{n}"));
        async move { crate::agent_run::agent(&state, "127.0.0.1:1", &["enroll", &token]).await }
    };
    // 21 workstations, four at a time.
    let mut outcomes = Vec::new();
    for batch in (0..21).collect::<Vec<_>>().chunks(4) {
        let runs = batch.iter().map(|&n| enrol(n, token.clone()));
        outcomes.extend(futures_util::future::join_all(runs).await);
    }
    let enrolled = outcomes.iter().filter(|(ok, _, _)| *ok).count();
    assert_eq!(enrolled, 20, "{outcomes:?}");
    let (_, _, refused) = outcomes.iter().find(|(ok, _, _)| !ok).unwrap();
    assert!(
        refused.contains("this enrolment token has enrolled all the 20 agents it was made for; create a new one"),
        "{refused}"
    );

    let (ok, out, err) = cli(&data, &["agent", "list", "--tenant", "acme", "--json"]);
    assert!(ok, "{err}");
    let agents: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(agents.len(), 20);
    assert!(
        agents.iter().all(|a| a["enrollment_token"] == rollout["id"] && a["tenant"] == "acme" && a["revoked"] == false)
    );

    // Revoked before it is spent: it enrols no one more.
    let spare = create("5");
    let (ok, out, err) = cli(&data, &["token", "revoke", spare["id"].as_str().unwrap(), "--tenant", "acme"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("revoked enrolment token "), "{out}");
    let (ok, _, err) = cli(&data, &["token", "revoke", spare["id"].as_str().unwrap()]);
    assert!(!ok && err.contains("no unrevoked enrolment token"), "{err}");
    let (ok, _, err) = enrol(99, spare["token"].as_str().unwrap().into()).await;
    assert!(!ok && err.contains("this enrolment token was revoked; create a new one"), "{err}");

    let (ok, out, err) = cli(&data, &["token", "list", "--tenant", "acme", "--json"]);
    assert!(ok, "{err}");
    let tokens: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let shown: Vec<_> = tokens
        .iter()
        .map(|t| (t["id"].clone(), t["state"].clone(), t["use_count"].clone(), t["max_uses"].clone()))
        .collect();
    assert_eq!(
        shown,
        [
            (spare["id"].clone(), "revoked".into(), 0.into(), 5.into()),
            (rollout["id"].clone(), "spent".into(), 20.into(), 20.into())
        ]
    );
    assert!(!out.contains(&token), "token list shows no secret");

    // An API user works until it is revoked, then gets 401 at once.
    let (ok, out, err) =
        cli(&data, &["user", "create", "--tenant", "acme", "--role", "viewer", "--name", "desk", "--json"]);
    assert!(ok, "{err}");
    let user: serde_json::Value = serde_json::from_str(&out).unwrap();
    let credential = user["credential"].as_str().unwrap();
    let (code, _) = lifeboat_e2e::http_get(server.http_addr, "/api/v1/devices", Some(credential)).await.unwrap();
    assert_eq!(code, 200);
    let (ok, _, err) = cli(&data, &["user", "revoke", user["id"].as_str().unwrap(), "--tenant", "acme"]);
    assert!(ok, "{err}");
    let (code, body) = lifeboat_e2e::http_get(server.http_addr, "/api/v1/devices", Some(credential)).await.unwrap();
    assert_eq!(code, 401, "{body}");
    let (ok, out, err) = cli(&data, &["user", "list", "--json"]);
    assert!(ok, "{err}");
    let users: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(users.len(), 1);
    assert_eq!((&users[0]["name"], &users[0]["tenant"]), (&"desk".into(), &"acme".into()));
    assert!(users[0]["revoked_at"].is_string(), "{out}");
    assert!(!out.contains(credential));

    // An agent revoked by the operator; each change is audited.
    let (ok, _, err) = cli(&data, &["agent", "revoke", agents[0]["id"].as_str().unwrap()]);
    assert!(ok, "{err}");
    let db = lifeboat_e2e::embedded_db(&data).await;
    let rows = db.query("SELECT action, actor FROM audit_events ORDER BY id", &[]).await.unwrap();
    let actions: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let operator = |a: &str| (a.to_string(), "operator (CLI)".to_string());
    for expected in ["enrollment-token.create", "enrollment-token.revoke", "user.create", "user.revoke", "agent.revoke"]
    {
        assert!(actions.contains(&operator(expected)), "{expected} not audited: {actions:?}");
    }
    drop(server);
}
