//! The `virtual-iphone` binary: `serve` prints its devices, `ctl` drives it through the
//! control socket, `expect` prints ground truth that a backup through it matches.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, BufReader};

use crate::backup::backup_content;

const BIN: &str = env!("CARGO_BIN_EXE_virtual-iphone");

async fn cli(args: &[&str]) -> std::process::Output {
    let out = tokio::process::Command::new(BIN).args(args).output();
    tokio::time::timeout(Duration::from_secs(60), out).await.unwrap().unwrap()
}

fn text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_ctl_and_expect_work_together() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().to_str().unwrap().to_string();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let mut serve = tokio::process::Command::new(BIN)
        .args(["serve", "--listen", &listen, "--state", &dir, "--devices", "2", "--profile", "tiny", "--seed", "9"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(serve.stdout.take().unwrap()).lines();
    let mut devices = Vec::new();
    for _ in 0..2 {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await.unwrap().unwrap().unwrap();
        let fields: Vec<&str> = line.split('\t').collect();
        assert_eq!(fields.len(), 3, "UDID, model, iOS: {line}");
        assert!(fields[1].starts_with("iPhone") && fields[2].contains('.'), "{line}");
        devices.push(fields[0].to_string());
    }
    let udid = devices[0].clone();

    let list = cli(&["ctl", "--state", &dir, "--json", "list"]).await;
    assert!(list.status.success());
    let json: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(json["devices"].as_array().unwrap().len(), 2);
    assert_eq!(json["devices"][0]["plugged"], true);

    // Ground truth before and after simulated use differs, and a backup matches it.
    let before = text(&cli(&["expect", "--state", &dir, "--udid", &udid]).await);
    assert!(before.lines().count() > 100, "a tiny device still has hundreds of files");
    let used = cli(&["ctl", "--state", &dir, "use", &udid, "--fraction", "0.05", "--seed", "2"]).await;
    assert!(used.status.success(), "{}", String::from_utf8_lossy(&used.stderr));
    assert!(text(&used).starts_with("added "), "{}", text(&used));
    let after = text(&cli(&["expect", "--state", &dir, "--udid", &udid]).await);
    assert_ne!(before, after);
    if crate::host_tool("idevicebackup2") {
        let root = tempfile::tempdir().unwrap();
        let out = tokio::process::Command::new("idevicebackup2")
            .args(["-u", &udid, "backup", "--full", root.path().to_str().unwrap()])
            .env("USBMUXD_SOCKET_ADDRESS", &listen)
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let got = backup_content(&root.path().join(&udid));
        assert_eq!(got, after.lines().map(str::to_string).collect::<Vec<_>>());
    }

    // Encryption through ctl: a password the host does not know, a forcing profile, off.
    let enc = |args: &'static [&'static str]| {
        let (dir, udid) = (dir.clone(), udid.clone());
        async move {
            let mut argv = vec!["ctl", "--state", &dir, "encryption", &udid];
            argv.extend_from_slice(args);
            cli(&argv).await
        }
    };
    let status = || async {
        let list: serde_json::Value =
            serde_json::from_slice(&cli(&["ctl", "--state", &dir, "--json", "list"]).await.stdout).unwrap();
        (list["devices"][0]["encrypted"].clone(), list["devices"][0]["mdm_forced"].clone())
    };
    assert!(enc(&["--password", "someone else's"]).await.status.success());
    assert_eq!(status().await, (true.into(), false.into()));
    assert!(text(&cli(&["expect", "--state", &dir, "--udid", &udid]).await).contains("KeychainDomain\t"));
    assert!(enc(&["--mdm-forced"]).await.status.success());
    assert_eq!(status().await, (true.into(), true.into()));
    assert!(enc(&["--off"]).await.status.success());
    assert_eq!(status().await, (false.into(), false.into()));
    let bad = enc(&[]).await;
    assert!(!bad.status.success(), "one of --password, --mdm-forced, --off is required");

    // Unplug and plug through ctl; bad requests get clear errors and a failing exit.
    assert!(cli(&["ctl", "--state", &dir, "unplug", &udid]).await.status.success());
    let list: serde_json::Value =
        serde_json::from_slice(&cli(&["ctl", "--state", &dir, "--json", "list"]).await.stdout).unwrap();
    assert_eq!(list["devices"][0]["plugged"], false);
    let bad = cli(&["ctl", "--state", &dir, "plug", "00000000-0000000000000000"]).await;
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no virtual device 00000000-0000000000000000"));
    let bad = cli(&["ctl", "--state", &dir, "use", &udid, "--fraction", "3"]).await;
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not between 0 and 1"));
    let bad = cli(&["serve", "--state", &dir, "--profile", "huge"]).await;
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("huge"), "{}", String::from_utf8_lossy(&bad.stderr));
    let nothing = tempfile::tempdir().unwrap();
    let bad = cli(&["ctl", "--state", nothing.path().to_str().unwrap(), "list"]).await;
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no virtual-iphone serve at"));
    serve.kill().await.unwrap();
}
