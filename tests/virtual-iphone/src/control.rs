//! The control interface of a running `serve`: one JSON request per line on the Unix
//! socket `<state>/ctl.sock`, one JSON reply per line. `virtual-iphone ctl` is its client;
//! in-process tests call the same operations on [`Registry`] and [`DeviceState`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::devices::{Faults, Registry, Stats};

/// The control socket of a state directory.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("ctl.sock")
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    List,
    Plug {
        udid: String,
    },
    Unplug {
        udid: String,
    },
    /// Simulated use of about `fraction` of the device's content.
    Use {
        udid: String,
        fraction: f64,
        seed: u64,
    },
    RequirePasscode {
        udid: String,
        timeout_secs: u64,
    },
    EnterPasscode {
        udid: String,
    },
    /// usbmuxd forgets the device's pair record: it asks its user to trust the computer.
    Untrust {
        udid: String,
    },
    /// The user taps Trust: the pair record is there again.
    Trust {
        udid: String,
    },
    SetFaults {
        udid: String,
        faults: Faults,
    },
    /// Sets the backup password behind the host's back (`password`), forces encryption
    /// as an MDM profile does (`mdm_forced`), or turns both off (`off`).
    Encryption {
        udid: String,
        #[serde(default)]
        password: Option<String>,
        #[serde(default)]
        mdm_forced: bool,
        #[serde(default)]
        off: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub udid: String,
    pub product_type: String,
    pub ios_version: String,
    pub name: String,
    pub plugged: bool,
    pub waiting_for_passcode: bool,
    /// A backup password is set (`WillEncrypt`).
    pub encrypted: bool,
    pub mdm_forced: bool,
    pub faults: Faults,
    pub stats: Stats,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    Devices { devices: Vec<DeviceStatus> },
    Used { added: u64, changed: u64, deleted: u64, added_bytes: u64, changed_bytes: u64 },
    Ok,
    Error { message: String },
}

/// Carries out one request.
pub fn execute(registry: &Registry, request: Request) -> Response {
    let device = |udid: &str| registry.state_by_udid(udid).ok_or_else(|| format!("no virtual device {udid}"));
    let result = match request {
        Request::List => Ok(Response::Devices {
            devices: registry
                .all()
                .iter()
                .filter_map(|d| registry.state_by_udid(&d.udid))
                .map(|s| DeviceStatus {
                    udid: s.device.udid.clone(),
                    product_type: s.device.product_type.clone(),
                    ios_version: s.device.ios_version.clone(),
                    name: s.device.name.clone(),
                    plugged: s.is_plugged(),
                    waiting_for_passcode: s.waiting_for_passcode(),
                    encrypted: s.encryption().will_encrypt(),
                    mdm_forced: s.encryption().mdm_forced(),
                    faults: s.faults(),
                    stats: s.stats(),
                })
                .collect(),
        }),
        Request::Plug { udid } => device(&udid).map(|_| {
            registry.set_plugged(&udid, true);
            Response::Ok
        }),
        Request::Unplug { udid } => device(&udid).map(|_| {
            registry.set_plugged(&udid, false);
            Response::Ok
        }),
        Request::Use { udid, fraction, seed } => device(&udid).and_then(|s| {
            if !(0.0..=1.0).contains(&fraction) {
                return Err(format!("fraction {fraction} is not between 0 and 1"));
            }
            let u = s.simulate_use(fraction, seed).map_err(|e| e.to_string())?;
            Ok(Response::Used {
                added: u.added,
                changed: u.changed,
                deleted: u.deleted,
                added_bytes: u.added_bytes,
                changed_bytes: u.changed_bytes,
            })
        }),
        Request::RequirePasscode { udid, timeout_secs } => device(&udid).map(|s| {
            s.require_passcode(Duration::from_secs(timeout_secs));
            Response::Ok
        }),
        Request::EnterPasscode { udid } => device(&udid).map(|s| {
            s.enter_passcode();
            Response::Ok
        }),
        Request::Untrust { udid } => device(&udid).map(|_| {
            registry.untrust(&udid);
            Response::Ok
        }),
        Request::Trust { udid } => device(&udid).map(|_| {
            registry.trust(&udid);
            Response::Ok
        }),
        Request::SetFaults { udid, faults } => device(&udid).and_then(|s| {
            if faults.throttle_mb_per_s.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
                return Err("the throttle must be a positive number of MB/s".to_string());
            }
            s.set_faults(faults);
            Ok(Response::Ok)
        }),
        Request::Encryption { udid, password, mdm_forced, off } => device(&udid).and_then(|s| {
            let e = s.encryption();
            let done = match (password, mdm_forced, off) {
                (_, _, true) => e.set_mdm_forced(false).and_then(|()| e.set(None)),
                (Some(p), forced, false) if !p.is_empty() => {
                    e.set(Some(p)).and_then(|()| if forced { e.set_mdm_forced(true) } else { Ok(()) })
                }
                (Some(_), _, false) => return Err("the password must not be empty".to_string()),
                (None, true, false) => e.set_mdm_forced(true),
                (None, false, false) => return Err("say --password P, --mdm-forced or --off".to_string()),
            };
            done.map(|()| Response::Ok).map_err(|e| format!("keeping the device's encryption state: {e}"))
        }),
    };
    result.unwrap_or_else(|message| Response::Error { message })
}

/// Serves the control socket until the task is dropped.
pub async fn serve(listener: UnixListener, registry: Arc<Registry>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let registry = registry.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let response = match serde_json::from_str::<Request>(&line) {
                    Ok(request) => {
                        let registry = registry.clone();
                        // Content changes hash and write files: off the async workers.
                        tokio::task::spawn_blocking(move || execute(&registry, request))
                            .await
                            .unwrap_or_else(|e| Response::Error { message: e.to_string() })
                    }
                    Err(e) => Response::Error { message: format!("bad request: {e}") },
                };
                let mut out = serde_json::to_vec(&response).unwrap_or_default();
                out.push(b'\n');
                if write.write_all(&out).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Sends one request to the `serve` of `state_dir`.
pub async fn call(state_dir: &Path, request: &Request) -> std::io::Result<Response> {
    let path = socket_path(state_dir);
    let stream = UnixStream::connect(&path)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("no virtual-iphone serve at {} ({e})", path.display())))?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request).map_err(std::io::Error::other)?;
    line.push(b'\n');
    write.write_all(&line).await?;
    let reply = BufReader::new(read).lines().next_line().await?.unwrap_or_default();
    serde_json::from_str(&reply).map_err(|e| std::io::Error::other(format!("bad reply {reply:?}: {e}")))
}
