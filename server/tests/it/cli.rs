//! Bad configuration fails at start with one clear message naming the problem and a
//! non-zero exit status (the `lifeboat-server` binary, as an operator runs it).

use std::path::Path;
use std::process::{Command, Output};

fn server(args: &[&str], data_dir: &Path) -> Output {
    server_env(args, data_dir, &[])
}

fn server_env(args: &[&str], data_dir: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lifeboat-server"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("LIFEBOAT_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied()).arg("--data-dir").arg(data_dir);
    if !args.contains(&"--quic-listen") {
        cmd.args(["--quic-listen", "127.0.0.1:0"]);
    }
    cmd.args(args).output().unwrap()
}

/// The one `error:` line, after checking the exit status.
fn error_line(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success; stderr:\n{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "expected exactly one error line in:\n{stderr}");
    errors[0].to_string()
}

#[test]
fn an_unknown_key_in_the_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("server.toml");
    std::fs::write(&file, "[http]\nlisten = \"127.0.0.1:0\"\nlisten_port = 80\n").unwrap();
    let out = server(&["--config", file.to_str().unwrap(), "serve"], &dir.path().join("data"));
    let line = error_line(&out);
    assert!(line.contains(&format!("configuration file {}", file.display())), "{line}");
    assert!(line.contains("unknown field `listen_port`"), "{line}");
    assert!(!dir.path().join("data").exists(), "nothing may start on a bad configuration");
}

#[test]
fn an_unreadable_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let out = server(&["--config", missing.to_str().unwrap(), "serve"], dir.path());
    let line = error_line(&out);
    assert_eq!(
        line,
        format!("error: cannot read configuration file {}: No such file or directory (os error 2)", missing.display())
    );
}

#[test]
fn an_unreachable_database_is_named_without_its_password() {
    let dir = tempfile::tempdir().unwrap();
    // Port 1 on loopback: nothing listens there.
    let url = "postgresql://lifeboat:hunter2@127.0.0.1:1/lifeboat";
    let out = server(&["--database-url", url, "--http-listen", "127.0.0.1:0", "serve"], dir.path());
    let line = error_line(&out);
    assert!(line.contains("cannot connect to PostgreSQL at 127.0.0.1:1 database \"lifeboat\""), "{line}");
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!all.contains("hunter2"), "the password leaked:\n{all}");
}

#[test]
fn an_http_port_in_use_is_named_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = server(&["--http-listen", &addr, "serve"], dir.path());
    let line = error_line(&out);
    assert_eq!(line, format!("error: cannot listen for HTTP on {addr}: Address already in use (os error 98)"));
    assert!(!dir.path().join("postgres").exists(), "PostgreSQL must not start when the port is taken");
}

#[test]
fn a_data_directory_that_cannot_be_written_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let data = file.join("data");
    let out = server(&["--http-listen", "127.0.0.1:0", "serve"], &data);
    let line = error_line(&out);
    assert_eq!(
        line,
        format!("error: data directory {} cannot be created: Not a directory (os error 20)", data.display())
    );

    if !nix::unistd::geteuid().is_root() {
        use std::os::unix::fs::PermissionsExt as _;
        let ro = dir.path().join("read-only");
        std::fs::create_dir(&ro).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        let out = server(&["--http-listen", "127.0.0.1:0", "serve"], &ro);
        let line = error_line(&out);
        assert!(line.starts_with(&format!("error: data directory {} is not writable", ro.display())), "{line}");
    }
}

#[test]
fn a_malformed_flag_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = server(&["--http-listen", "localhost", "serve"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("invalid value 'localhost' for '--http-listen <ADDR>'"), "{stderr}");
}

#[test]
fn help_documents_every_setting_and_its_environment_variable() {
    let out = Command::new(env!("CARGO_BIN_EXE_lifeboat-server")).args(["serve", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for var in lifeboat_server::config::KNOWN_ENV.iter().filter(|v| **v != "LIFEBOAT_PG_BINDIR") {
        assert!(help.contains(var), "--help does not mention {var}:\n{help}");
    }
}

#[test]
fn a_quic_port_in_use_is_named_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = server(&["--http-listen", "127.0.0.1:0", "--quic-listen", &addr, "serve"], dir.path());
    let line = error_line(&out);
    assert_eq!(line, format!("error: cannot listen for QUIC on {addr}: Address already in use (os error 98)"));
    assert!(!dir.path().join("postgres").exists(), "PostgreSQL must not start when the port is taken");
}

#[test]
fn a_malformed_master_key_in_the_environment_is_named_and_not_echoed() {
    let dir = tempfile::tempdir().unwrap();
    let out = server_env(
        &["--http-listen", "127.0.0.1:0", "serve"],
        dir.path(),
        &[("LIFEBOAT_MASTER_KEY", "not-a-key-hunter2")],
    );
    let line = error_line(&out);
    assert_eq!(line, "error: LIFEBOAT_MASTER_KEY must hold exactly 64 hex digits");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("hunter2"));
    assert!(!dir.path().join("master.key").exists(), "no key file may be generated when the key is given");
}

#[test]
fn a_certificate_without_its_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = server(&["--quic-cert-file", "/etc/hostname", "serve"], dir.path());
    let line = error_line(&out);
    assert_eq!(line, "error: configuration: quic.cert_file and quic.key_file go together");
}
