//! Golden bytes: one example of every frame of the protocol (`docs/protocol.md`), its
//! exact bytes on the wire — length prefix included — in `shared/tests/golden/<name>.bin`.
//! A change to any message's encoding fails here until the files are refreshed
//! (`LIFEBOAT_BLESS=1 cargo test -p lifeboat-shared --test it golden`) and the diff
//! reviewed: an encoding change without a protocol version bump is a bug.

use lifeboat_shared::Secret;
use lifeboat_shared::ids::{AgentId, ChunkId, RestoreJobId, RunId, SnapshotId, TenantId, Udid};
use lifeboat_shared::manifest::DeviceInfo;
use lifeboat_shared::wire::{
    self, Auth, Data, DeviceState, Enrolled, ErrorCode, Hello, JobRequest, JobSource, Request, Response, RestoreEnd,
    RunEnd, VERSIONS, Welcome,
};

fn uuid(n: u128) -> uuid::Uuid {
    uuid::Uuid::from_u128(0x0011_2233_4455_6677_8899_aabb_ccdd_ee00 + n)
}

fn udid() -> Udid {
    "00008030-001A2B3C4D5E6F70".parse().unwrap()
}

fn device() -> DeviceInfo {
    DeviceInfo {
        udid: udid(),
        name: "Anna's iPhone".into(),
        product_type: "iPhone15,2".into(),
        ios_version: "17.5.1".into(),
    }
}

fn chunk(n: u8) -> ChunkId {
    ChunkId(std::array::from_fn(|i| n.wrapping_add(i as u8)))
}

/// Frame names and their bytes. Each frame is also decoded from its golden bytes and
/// compared with the value, so the decoder is pinned as well as the encoder.
fn frames() -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    macro_rules! frame {
        ($name:expr, $ty:ty, $value:expr) => {{
            let value: $ty = $value;
            let bytes = wire::encode(&value);
            let decoded: $ty = wire::decode(&bytes[4..]).unwrap();
            assert_eq!(decoded, value, "{} does not decode to itself", $name);
            out.push(($name.to_string(), bytes));
        }};
    }
    let (run, snapshot, agent, tenant, job) =
        (RunId(uuid(1)), SnapshotId(uuid(2)), AgentId(uuid(3)), TenantId(uuid(4)), RestoreJobId(uuid(5)));

    frame!(
        "hello-enroll",
        Hello,
        Hello {
            versions: VERSIONS.to_vec(),
            auth: Auth::Enroll { token_secret: vec![0xa5; 32], hostname: "ws-1".into(), agent_version: "0.1.0".into() },
        }
    );
    frame!(
        "hello-access",
        Hello,
        Hello { versions: VERSIONS.to_vec(), auth: Auth::Access { token: "eyJ.x.y".into() } }
    );
    frame!(
        "hello-refresh",
        Hello,
        Hello { versions: VERSIONS.to_vec(), auth: Auth::Refresh { agent, secret: vec![0x5a; 32] } }
    );
    frame!(
        "welcome-accepted-enrolled",
        Welcome,
        Welcome::Accepted {
            version: 2,
            agent,
            tenant,
            access_token: "eyJ.x.y".into(),
            access_expires_in_seconds: 900,
            enrolled: Some(Enrolled { refresh_secret: vec![1; 32], id_key: [2; 32], data_key: [3; 32] }),
        }
    );
    frame!(
        "welcome-accepted",
        Welcome,
        Welcome::Accepted {
            version: 2,
            agent,
            tenant,
            access_token: "eyJ.x.y".into(),
            access_expires_in_seconds: 900,
            enrolled: None,
        }
    );
    let codes = [
        ("unsupported-version", ErrorCode::UnsupportedVersion),
        ("bad-credential", ErrorCode::BadCredential),
        ("expired", ErrorCode::Expired),
        ("already-used", ErrorCode::AlreadyUsed),
        ("revoked", ErrorCode::Revoked),
        ("forbidden", ErrorCode::Forbidden),
        ("not-found", ErrorCode::NotFound),
        ("lease-held", ErrorCode::LeaseHeld),
        ("lease-lost", ErrorCode::LeaseLost),
        ("malformed", ErrorCode::Malformed),
        ("too-large", ErrorCode::TooLarge),
        ("chunk-mismatch", ErrorCode::ChunkMismatch),
        ("missing-chunks", ErrorCode::MissingChunks),
        ("internal", ErrorCode::Internal),
    ];
    frame!(
        "welcome-refused",
        Welcome,
        Welcome::Refused {
            code: ErrorCode::UnsupportedVersion,
            message: "agent speaks protocol versions [1]; this server speaks [2]: upgrade lifeboat-agent".into(),
        }
    );

    frame!(
        "request-register-device",
        Request,
        Request::RegisterDevice { device: device(), serial_number: Some("F2LXK0ABCDEF".into()) }
    );
    for (name, state) in [
        ("idle", DeviceState::Idle),
        ("backing-up", DeviceState::BackingUp),
        ("needs-trust", DeviceState::NeedsTrust),
        ("needs-passcode", DeviceState::NeedsPasscode),
        ("failing", DeviceState::Failing),
        ("needs-backup-password", DeviceState::NeedsBackupPassword),
    ] {
        let message = (state == DeviceState::NeedsPasscode).then(|| "enter the passcode on the phone".to_string());
        frame!(format!("request-report-state-{name}"), Request, Request::ReportState { udid: udid(), state, message });
    }
    frame!("request-open-run", Request, Request::OpenRun { udid: udid(), resume: None });
    frame!("request-open-run-resume", Request, Request::OpenRun { udid: udid(), resume: Some(run) });
    frame!("request-missing-chunks", Request, Request::MissingChunks { run, ids: vec![chunk(0), chunk(0x80)] });
    frame!("request-put-chunks", Request, Request::PutChunks { run });
    frame!("request-commit", Request, Request::Commit { run, snapshot });
    frame!(
        "request-end-run-failed",
        Request,
        Request::EndRun {
            run,
            end: RunEnd::Failed { reason: "device-disconnected".into(), message: "unplugged".into() },
        }
    );
    frame!(
        "request-end-run-cancelled",
        Request,
        Request::EndRun { run, end: RunEnd::Cancelled { reason: "shutdown".into() } }
    );
    frame!("request-latest-snapshot", Request, Request::LatestSnapshot { udid: udid() });
    frame!("request-get-manifest", Request, Request::GetManifest { snapshot });
    frame!("request-get-chunks", Request, Request::GetChunks { ids: vec![chunk(7)] });
    frame!("request-get-policy", Request, Request::GetPolicy);
    frame!("request-next-restore", Request, Request::NextRestore { udid: udid() });
    frame!("request-end-restore-succeeded", Request, Request::EndRestore { job, end: RestoreEnd::Succeeded });
    frame!(
        "request-end-restore-failed",
        Request,
        Request::EndRestore {
            job,
            end: RestoreEnd::Failed { reason: "device-disconnected".into(), message: "unplugged".into() },
        }
    );
    frame!("request-get-backup-password", Request, Request::GetBackupPassword { udid: udid() });
    frame!(
        "request-put-backup-password",
        Request,
        Request::PutBackupPassword { udid: udid(), password: Secret::new("8fK2-mQ9x-Lp4W-zR7c".into()) }
    );

    frame!("response-ok", Response, Response::Ok);
    frame!(
        "response-backup-password",
        Response,
        Response::BackupPassword { password: Some(Secret::new("8fK2-mQ9x-Lp4W-zR7c".into())) }
    );
    frame!("response-backup-password-none", Response, Response::BackupPassword { password: None });
    frame!("request-get-encryption-policy", Request, Request::GetEncryptionPolicy { udid: udid() });
    frame!("response-encryption-policy", Response, Response::EncryptionPolicy { required: true });
    frame!(
        "request-report-keybag",
        Request,
        Request::ReportKeybag { udid: udid(), keybag: b"VERS\0\0\0\x04\0\0\0\x05".to_vec() }
    );
    for (name, job) in [
        ("restore", JobRequest::Restore { target: udid(), source: JobSource::Snapshot(snapshot) }),
        ("export", JobRequest::Export { source: JobSource::LatestOf(udid()) }),
    ] {
        let credential = Secret::new("lbu1_0123456789abcdef".into());
        frame!(format!("request-start-job-{name}"), Request, Request::StartJob { credential, job });
    }
    frame!("response-run-opened", Response, Response::RunOpened { run, snapshot, lease_seconds: 600 });
    frame!("response-missing", Response, Response::Missing { ids: vec![chunk(0x80)] });
    frame!("response-stored", Response, Response::Stored { chunks: 300, new_chunks: 200, new_bytes: 1 << 33 });
    frame!(
        "response-committed",
        Response,
        Response::Committed { snapshot, files: 50_000, logical_bytes: 2_023_000_000 }
    );
    frame!(
        "response-snapshot",
        Response,
        Response::Snapshot { snapshot, device: device(), created_unix_ms: 1_764_700_000_000 }
    );
    frame!("response-manifest", Response, Response::Manifest { snapshot, bytes: 1_500_000 });
    for (name, code) in codes {
        frame!(format!("response-error-{name}"), Response, Response::Error { code, message: "why, for people".into() });
    }
    frame!("response-policy", Response, Response::Policy { backup_interval_seconds: 86_400 });
    frame!("response-restore-job", Response, Response::RestoreJob { job, snapshot });

    frame!("data-blob", Data, Data::Blob { id: chunk(9), blob: vec![1, 2, 3, 4] });
    frame!("data-bytes", Data, Data::Bytes(b"sealed manifest part".to_vec()));
    frame!("data-end", Data, Data::End);
    out
}

#[test]
fn every_frame_is_encoded_exactly_as_its_golden_bytes() {
    let dir = crate::dir("golden");
    let frames = frames();
    if crate::bless() {
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(&dir).unwrap() {
            std::fs::remove_file(entry.unwrap().path()).unwrap();
        }
        for (name, bytes) in &frames {
            std::fs::write(dir.join(format!("{name}.bin")), bytes).unwrap();
        }
    }
    let mut wrong = Vec::new();
    for (name, bytes) in &frames {
        match std::fs::read(dir.join(format!("{name}.bin"))) {
            Ok(golden) if golden == *bytes => {}
            Ok(golden) => wrong.push(format!("{name}: golden {} but encoded {}", hex(&golden), hex(bytes))),
            Err(e) => wrong.push(format!("{name}: no golden file ({e})")),
        }
    }
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().trim_end_matches(".bin").to_string())
        .collect();
    on_disk.sort();
    let mut named: Vec<String> = frames.iter().map(|(n, _)| n.clone()).collect();
    named.sort();
    assert_eq!(on_disk, named, "golden files without a frame, or frames without a file");
    assert!(
        wrong.is_empty(),
        "frames differ from their golden bytes (a change of encoding needs a protocol version bump; \
         then LIFEBOAT_BLESS=1 and review):\n{}",
        wrong.join("\n")
    );
}

/// The discriminants `docs/protocol.md` gives, checked against the code: variant N of
/// each message encodes as the varint N.
#[test]
fn variant_numbers_are_those_the_spec_gives() {
    let first_byte = |name: &str| {
        let frames = frames();
        frames.iter().find(|(n, _)| n == name).map(|(_, b)| b[4]).unwrap()
    };
    let requests = [
        "request-register-device",
        "request-report-state-idle",
        "request-open-run",
        "request-missing-chunks",
        "request-put-chunks",
        "request-commit",
        "request-end-run-failed",
        "request-latest-snapshot",
        "request-get-manifest",
        "request-get-chunks",
        "request-get-policy",
        "request-next-restore",
        "request-end-restore-succeeded",
        "request-get-backup-password",
        "request-put-backup-password",
        "request-get-encryption-policy",
        "request-report-keybag",
    ];
    for (n, name) in requests.iter().enumerate() {
        assert_eq!(first_byte(name) as usize, n, "{name}");
    }
    let responses = [
        "response-ok",
        "response-run-opened",
        "response-missing",
        "response-stored",
        "response-committed",
        "response-snapshot",
        "response-manifest",
        "response-error-internal",
        "response-policy",
        "response-restore-job",
        "response-backup-password",
        "response-encryption-policy",
    ];
    for (n, name) in responses.iter().enumerate() {
        assert_eq!(first_byte(name) as usize, n, "{name}");
    }
}

/// The worked examples in `docs/protocol.md` are these frames' bytes.
#[test]
fn the_specs_worked_examples_are_the_real_bytes() {
    let spec = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/protocol.md"))
        .unwrap()
        .replace('\n', " ");
    let spaced = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ");
    for frame in [wire::encode(&Request::GetPolicy), wire::encode(&Request::OpenRun { udid: udid(), resume: None })] {
        assert!(spec.contains(&spaced(&frame)), "docs/protocol.md lacks the frame {}", spaced(&frame));
    }
}

#[test]
fn this_build_speaks_versions_2_to_6() {
    assert_eq!(VERSIONS, &[2, 3, 4, 5, 6]);
    assert_eq!(wire::ESCROW_VERSION, 3);
    assert_eq!(wire::ENCRYPTION_POLICY_VERSION, 4);
    assert_eq!(wire::KEYBAG_VERSION, 5);
    assert_eq!(wire::START_JOB_VERSION, 6);
    assert_eq!(wire::negotiate(&[2, 3, 4, 5, 6]), Some(6));
    assert_eq!(wire::negotiate(&[2, 3, 4, 5]), Some(5));
    assert_eq!(wire::negotiate(&[2, 3, 4]), Some(4));
    assert_eq!(wire::negotiate(&[1]), None, "a v1 agent is refused");
    assert_eq!(wire::negotiate(&[1, 2]), Some(2), "a v2 agent is served");
    assert_eq!(wire::negotiate(&[2, 3]), Some(3));
}

/// A password in a frame is only ever in the frame: its Debug, as a log line would show it,
/// hides it.
#[test]
fn backup_passwords_do_not_reach_debug_output() {
    let r = Request::PutBackupPassword { udid: udid(), password: Secret::new("8fK2-mQ9x".into()) };
    assert!(!format!("{r:?}").contains("8fK2"), "{r:?}");
    let r = Response::BackupPassword { password: Some(Secret::new("8fK2-mQ9x".into())) };
    assert!(!format!("{r:?}").contains("8fK2"), "{r:?}");
    let frame = wire::encode(&r);
    assert!(frame.windows(9).any(|w| w == b"8fK2-mQ9x"));
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}
