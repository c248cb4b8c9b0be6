//! Encrypted backups, proven by the real hosts and a real reader: libimobiledevice's
//! `idevicebackup2` and pymobiledevice3 turn encryption on with `ChangePassword`, and
//! `iphone_backup_decrypt` (PyPI) — the library forensic and export tools build on — opens
//! the backup with the password and reads back exactly the device's plaintext.

use std::collections::BTreeSet;
use std::path::Path;

use virtual_iphone::content::Profile;
use virtual_iphone::encryption;

use crate::backup::{error_code, rig, sha256_file, walk};
use crate::host_tool;
use crate::host_tools::{path, pymobiledevice3, run, run_status};

const PASSWORD: &str = "correct horse battery staple";

/// Opens a backup with `iphone_backup_decrypt`, extracts every file into `out/<domain>/<path>`,
/// and prints the sha256 of `sms.db` read on its own; exit 3 on a wrong password.
const READER: &str = r#"
import hashlib, sys
from iphone_backup_decrypt import EncryptedBackup, IncorrectPassphraseError
backup, password, out = sys.argv[1:4]
try:
    b = EncryptedBackup(backup_directory=backup, passphrase=password)
    b.test_decryption()
except IncorrectPassphraseError as e:
    print(f"IncorrectPassphraseError: {e}")
    sys.exit(3)
n = b.extract_files(relative_paths_like="%", domain_like="%", output_folder=out,
                    preserve_folders=True, domain_subfolders=True)
print("files", n)
print("sms.db", hashlib.sha256(b.extract_file_as_bytes("Library/SMS/sms.db", domain_like="HomeDomain")).hexdigest())
"#;

fn reader_python() -> Option<String> {
    let python = std::env::var("BACKUP_DECRYPT_PYTHON").unwrap_or_else(|_| "python3".into());
    let found = std::process::Command::new(&python)
        .args(["-c", "import iphone_backup_decrypt"])
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some(python);
    }
    // Reported as a missing tool: skipped locally, a failure in CI.
    host_tool("iphone_backup_decrypt (python module)");
    None
}

/// What `iphone_backup_decrypt` reads from the backup in `dir`: (exit status, stdout, and
/// the extracted files as `expect` lines).
fn read_with_library(python: &str, dir: &Path, password: &str) -> (Option<i32>, String, Vec<String>) {
    let out = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(python)
        .args(["-c", READER, path(dir), password, path(out.path())])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&o.stderr);
    if o.status.code() != Some(0) && o.status.code() != Some(3) {
        panic!("iphone_backup_decrypt failed ({}):\n{stdout}\n{stderr}", o.status);
    }
    let mut lines: Vec<String> = walk(out.path())
        .into_iter()
        .filter(|p| p.is_file())
        .map(|p| {
            let rel = p.strip_prefix(out.path()).unwrap().to_str().unwrap().to_string();
            let (domain, file) = rel.split_once('/').unwrap();
            let (size, sha) = sha256_file(&p);
            format!("{domain}\t{file}\t{size}\t{sha}")
        })
        .collect();
    lines.sort();
    (o.status.code(), stdout, lines)
}

fn line_of<'a>(expect: &'a [String], domain: &str, prefix: &str) -> &'a str {
    expect
        .iter()
        .find(|l| l.starts_with(&format!("{domain}\t{prefix}")))
        .unwrap_or_else(|| panic!("no {domain}/{prefix}… in expect"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_tools_turn_encryption_on_and_iphone_backup_decrypt_reads_the_backup() {
    let pmd3 = pymobiledevice3();
    if !host_tool("idevicebackup2") || !host_tool(&pmd3) {
        return;
    }
    let Some(python) = reader_python() else { return };
    let rig = rig(2, Profile::Tiny).await;
    let (a, b) = (rig.udid(0), rig.udid(1));
    let root = tempfile::tempdir().unwrap();
    let plain = rig.expect(&a);

    // Encryption on with each host's ChangePassword.
    run(&rig, "idevicebackup2", &["-u", &a, "encryption", "on", PASSWORD, path(root.path())]).await;
    run(&rig, &pmd3, &["backup2", "encryption", "--udid", &b, "-b", path(root.path()), "on", "b's password"]).await;
    for udid in [&a, &b] {
        assert!(rig.registry.state_by_udid(udid).unwrap().encryption().will_encrypt(), "{udid} encrypts");
    }
    // A wrong old password is refused as a phone refuses it; the password stays.
    let (ok, text) =
        run_status(&rig, "idevicebackup2", &["-u", &a, "encryption", "off", "wrong", path(root.path())]).await;
    assert!(text.contains(&format!("ErrorCode 207: {}", encryption::INVALID_PASSWORD_TEXT)), "{ok} {text}");
    assert!(rig.registry.state_by_udid(&a).unwrap().encryption().will_encrypt());

    // What the encrypted backup carries: the unencrypted one's files and the keychain,
    // Health and call history.
    let truth = rig.expect(&a);
    assert!(truth.len() > plain.len(), "{} > {}", truth.len(), plain.len());
    let extra: BTreeSet<&str> =
        truth.iter().filter(|l| !plain.contains(l)).map(|l| l.split('\t').next().unwrap()).collect();
    assert_eq!(extra, BTreeSet::from(["HealthDomain", "HomeDomain", "KeychainDomain"]));

    run(&rig, "idevicebackup2", &["-u", &a, "backup", "--full", path(root.path())]).await;
    let dir = root.path().join(&a);
    let manifest: plist::Dictionary = plist::from_file(dir.join("Manifest.plist")).unwrap();
    assert_eq!(manifest["IsEncrypted"].as_boolean(), Some(true));

    let (code, stdout, files) = read_with_library(&python, &dir, PASSWORD);
    assert_eq!(code, Some(0), "{stdout}");
    assert_eq!(files, truth, "iphone_backup_decrypt reads back exactly the device's plaintext");
    assert!(stdout.contains(&format!("files {}", truth.len())), "{stdout}");
    let sms = line_of(&truth, "HomeDomain", "Library/SMS/sms.db\t");
    assert!(stdout.contains(&format!("sms.db {}", sms.rsplit('\t').next().unwrap())), "{stdout}");
    let photo = line_of(&truth, "CameraRollDomain", "Media/DCIM/");
    assert!(files.iter().any(|l| l == photo), "{photo}");

    // A wrong password fails as the library fails on a phone's backup.
    let (code, stdout, files) = read_with_library(&python, &dir, "not the password");
    assert_eq!(code, Some(3), "{stdout}");
    assert!(stdout.starts_with("IncorrectPassphraseError: Failed to decrypt keys: incorrect passphrase?"), "{stdout}");
    assert!(files.is_empty());

    // An incremental encrypted backup after use, then a restore onto B with the password:
    // B then holds A's content and A's backup password.
    rig.registry.state_by_udid(&a).unwrap().simulate_use(0.05, 3).unwrap();
    run(&rig, "idevicebackup2", &["-u", &a, "backup", path(root.path())]).await;
    let truth = rig.expect(&a);
    let (_, _, files) = read_with_library(&python, &dir, PASSWORD);
    assert_eq!(files, truth, "the incremental encrypted backup reads back as the device");
    run(
        &rig,
        "idevicebackup2",
        &["-u", &b, "-s", &a, "restore", "--system", "--no-reboot", "--password", PASSWORD, path(root.path())],
    )
    .await;
    assert_eq!(rig.expect(&b), truth, "B holds A's backup");
    let (ok, text) =
        run_status(&rig, "idevicebackup2", &["-u", &b, "encryption", "off", PASSWORD, path(root.path())]).await;
    assert!(ok && !text.contains("ErrorCode"), "B's backup password is now A's: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_restore_needs_the_password_and_a_forced_phone_needs_one_set() {
    let rig = rig(2, Profile::Tiny).await;
    let (a, b) = (rig.udid(0), rig.udid(1));
    let root = tempfile::tempdir().unwrap();
    let enc = |u: &str| rig.registry.state_by_udid(u).unwrap();
    enc(&a).encryption().set(Some(PASSWORD.into())).unwrap();
    assert_eq!(error_code(&rig.backup(&a, root.path(), true).await.unwrap()), 0);

    // Without the password, or with a wrong one: the real error, nothing restored.
    let before = rig.expect(&b);
    let reply = rig.restore(&b, &a, root.path(), false, None).await.unwrap();
    assert_eq!(error_code(&reply), encryption::INVALID_PASSWORD, "{reply:?}");
    assert_eq!(reply["ErrorDescription"].as_string(), Some(encryption::INVALID_RESTORE_PASSWORD_TEXT));
    let reply = rig.restore(&b, &a, root.path(), false, Some("wrong")).await.unwrap();
    assert_eq!(error_code(&reply), encryption::INVALID_PASSWORD, "{reply:?}");
    assert_eq!(rig.expect(&b), before);
    let reply = rig.restore(&b, &a, root.path(), false, Some(PASSWORD)).await.unwrap();
    assert_eq!(error_code(&reply), 0, "{reply:?}");
    assert_eq!(rig.expect(&b), rig.expect(&a));

    // A phone whose profile forces encryption refuses a backup until a password is set,
    // and may not turn encryption off.
    let fresh = tempfile::tempdir().unwrap();
    enc(&a).encryption().set(None).unwrap();
    enc(&a).encryption().set_mdm_forced(true).unwrap();
    let reply = rig.backup(&a, fresh.path(), true).await.unwrap();
    assert_eq!(error_code(&reply), encryption::FORCED, "{reply:?}");
    assert_eq!(reply["ErrorDescription"].as_string(), Some(encryption::FORCED_BACKUP_TEXT));
    assert!(!fresh.path().join(&a).join("Manifest.db").exists(), "no backup was written");
    assert_eq!(enc(&a).encryption().change(None, Some(PASSWORD)), Ok(()));
    assert_eq!(
        enc(&a).encryption().change(Some(PASSWORD), None),
        Err((encryption::FORCED, encryption::FORCED_OFF_TEXT))
    );
    assert_eq!(error_code(&rig.backup(&a, fresh.path(), true).await.unwrap()), 0);
}

/// Files under `root` as `expect` lines, `<domain>/<path>` relative to `root`.
fn unpacked(root: &Path) -> Vec<String> {
    let mut lines: Vec<String> = walk(root)
        .into_iter()
        .filter(|p| p.is_file())
        .map(|p| {
            let rel = p.strip_prefix(root).unwrap().to_str().unwrap().to_string();
            let (domain, file) = rel.split_once('/').unwrap();
            let (size, sha) = sha256_file(&p);
            format!("{domain}\t{file}\t{size}\t{sha}")
        })
        .collect();
    lines.sort();
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_tools_get_info_list_unback_and_extract_as_from_a_phone() {
    let pmd3 = pymobiledevice3();
    if !host_tool("idevicebackup2") || !host_tool(&pmd3) {
        return;
    }
    let rig = rig(2, Profile::Tiny).await;
    let (a, b) = (rig.udid(0), rig.udid(1));
    let root = tempfile::tempdir().unwrap();
    run(&rig, "idevicebackup2", &["-u", &a, "backup", "--full", path(root.path())]).await;
    run(&rig, "idevicebackup2", &["-u", &b, "encryption", "on", PASSWORD, path(root.path())]).await;
    run(&rig, "idevicebackup2", &["-u", &b, "backup", "--full", path(root.path())]).await;

    // Info: the backup's Info.plist and whether it is encrypted.
    let text = run(&rig, "idevicebackup2", &["-u", &a, "info", path(root.path())]).await;
    let product = rig.registry.all()[0].product_type.clone();
    assert!(text.contains(&format!("<key>Product Type</key>\n\t<string>{product}</string>")), "{text}");
    assert!(text.contains("<key>IsEncrypted</key>\n\t<false/>"), "{text}");

    // List: one CSV row per file, directory and link of the backup.
    let rows =
        virtual_iphone::manifest::read_manifest_db(&std::fs::read(root.path().join(&a).join("Manifest.db")).unwrap())
            .unwrap();
    for program in ["idevicebackup2", pmd3.as_str()] {
        let args: Vec<&str> = if program == "idevicebackup2" {
            vec!["-u", &a, "list", path(root.path())]
        } else {
            vec!["backup2", "list", "--udid", &a, path(root.path())]
        };
        let text = run(&rig, program, &args).await;
        let csv: Vec<&str> = text.lines().filter(|l| l.starts_with('"')).collect();
        assert_eq!(csv.len(), rows.len(), "{program}: {text:.2000}");
        assert!(text.contains("Domain,RelativePath,FileID,Kind,Size,Mode,LastModified"), "{program}");
        assert!(csv.iter().any(|l| {
            l.starts_with("\"HomeDomain\",\"Library/SMS/sms.db\",3d0d7e5fb2ce288813306e4d4636395e047a3d28,file,")
        }));
    }

    // Unback of the encrypted backup with its password: every file, decrypted.
    let unback = root.path().join("_unback_").join(&b);
    let (ok, text) = run_status(&rig, &pmd3, &["backup2", "unback", "--udid", &b, path(root.path())]).await;
    assert!(!ok && text.contains("207"), "no password, no unback: {text}");
    assert!(!unback.exists());
    run(&rig, "idevicebackup2", &["-u", &b, "unback", "--password", PASSWORD, path(root.path())]).await;
    assert_eq!(unpacked(&unback), rig.expect(&b));

    // Extract: one file.
    std::fs::remove_dir_all(&unback).unwrap();
    run(
        &rig,
        &pmd3,
        &[
            "backup2",
            "extract",
            "--udid",
            &b,
            "--password",
            PASSWORD,
            "HomeDomain",
            "Library/SMS/sms.db",
            path(root.path()),
        ],
    )
    .await;
    let sms = line_of(&rig.expect(&b), "HomeDomain", "Library/SMS/sms.db\t").to_string();
    assert_eq!(unpacked(&unback), vec![sms]);
}
