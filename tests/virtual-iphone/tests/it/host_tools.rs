//! libimobiledevice's `idevicebackup2` and pymobiledevice3's `backup2`, the real programs,
//! back up a virtual iPhone and restore the backup onto another model.

use std::path::Path;
use std::time::Duration;

use virtual_iphone::content::Profile;

use crate::backup::{Rig, backup_content, rig};
use crate::host_tool;

/// Runs a host tool against the rig's usbmuxd; panics with its output if it fails or hangs.
pub async fn run(rig: &Rig, program: &str, args: &[&str]) -> String {
    let (ok, text) = run_status(rig, program, args).await;
    assert!(ok, "{program} {args:?} failed:\n{text}");
    text
}

/// Runs a host tool against the rig's usbmuxd: whether it succeeded, and its output.
pub async fn run_status(rig: &Rig, program: &str, args: &[&str]) -> (bool, String) {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).env("USBMUXD_SOCKET_ADDRESS", rig.addr.to_string()).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(300), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish in 300 s"))
        .unwrap();
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), format!("({})\n{text}", out.status))
}

pub fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idevicebackup2_backs_up_and_restores_onto_another_model() {
    if !host_tool("idevicebackup2") {
        return;
    }
    let rig = rig(2, Profile::Tiny).await;
    let (a, b) = (rig.udid(0), rig.udid(1));
    let root = tempfile::tempdir().unwrap();
    run(&rig, "idevicebackup2", &["-u", &a, "backup", "--full", path(root.path())]).await;
    let dir = root.path().join(&a);
    let backed_up = backup_content(&dir);
    assert_eq!(backed_up, rig.expect(&a));
    let info: plist::Dictionary = plist::from_file(dir.join("Info.plist")).unwrap();
    assert_eq!(info["Product Type"].as_string(), Some(rig.registry.all()[0].product_type.as_str()));

    // An incremental backup after use, then a restore of it onto B.
    rig.registry.state_by_udid(&a).unwrap().simulate_use(0.05, 3).unwrap();
    run(&rig, "idevicebackup2", &["-u", &a, "backup", path(root.path())]).await;
    let backed_up = backup_content(&dir);
    assert_eq!(backed_up, rig.expect(&a));
    run(&rig, "idevicebackup2", &["-u", &b, "-s", &a, "restore", "--system", "--no-reboot", path(root.path())]).await;
    assert_eq!(rig.expect(&b), backed_up, "B holds A's backup");
    let written = rig.registry.state_by_udid(&b).unwrap().afc().read("/iTunesRestore/RestoreApplications.plist");
    assert!(written.is_some(), "idevicebackup2 hands the app list over AFC before a restore");
}

pub fn pymobiledevice3() -> String {
    std::env::var("PYMOBILEDEVICE3").unwrap_or_else(|_| "pymobiledevice3".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pymobiledevice3_backs_up_and_restores_onto_another_model() {
    let pmd3 = pymobiledevice3();
    if !host_tool(&pmd3) {
        return;
    }
    let rig = rig(2, Profile::Tiny).await;
    let (a, b) = (rig.udid(0), rig.udid(1));
    let root = tempfile::tempdir().unwrap();
    run(&rig, &pmd3, &["backup2", "backup", "--udid", &a, "--full", path(root.path())]).await;
    let dir = root.path().join(&a);
    let backed_up = backup_content(&dir);
    assert_eq!(backed_up, rig.expect(&a));

    rig.registry.state_by_udid(&a).unwrap().simulate_use(0.05, 4).unwrap();
    run(&rig, &pmd3, &["backup2", "backup", "--udid", &a, path(root.path())]).await;
    let backed_up = backup_content(&dir);
    assert_eq!(backed_up, rig.expect(&a));
    run(
        &rig,
        &pmd3,
        &["backup2", "restore", "--udid", &b, "--source", &a, "--system", "--no-reboot", path(root.path())],
    )
    .await;
    assert_eq!(rig.expect(&b), backed_up, "B holds A's backup");
}
