//! The server's QUIC identity: generated once and kept, or loaded from the operator's files.

use lifeboat_server::platform::tls::{Identity, fingerprint};

#[test]
fn a_generated_identity_is_kept_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let a = Identity::load_or_create(&dir.path().join("quic")).unwrap();
    let b = Identity::load_or_create(&dir.path().join("quic")).unwrap();
    assert_eq!(a.fingerprint, b.fingerprint);
    assert_eq!(a.fingerprint, fingerprint(&a.cert));
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(dir.path().join("quic/key.der")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn an_operator_certificate_loads_from_pem_and_a_mismatched_key_is_refused() {
    lifeboat_server::platform::tls::install_default_provider();
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["backup.example".into()]).unwrap();
    let other = rcgen::generate_simple_self_signed(vec!["other.example".into()]).unwrap();
    let (cert, key, wrong) = (dir.path().join("c.pem"), dir.path().join("k.pem"), dir.path().join("w.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    std::fs::write(&wrong, other.signing_key.serialize_pem()).unwrap();

    let id = Identity::load(&cert, &key).unwrap();
    assert_eq!(id.fingerprint, fingerprint(ck.cert.der()));
    let err = Identity::load(&cert, &wrong).unwrap_err().to_string();
    assert!(err.contains("c.pem"), "{err}");
    let err = Identity::load(&dir.path().join("missing.pem"), &key).unwrap_err().to_string();
    assert!(err.contains("missing.pem") && err.contains("No such file"), "{err}");
}
