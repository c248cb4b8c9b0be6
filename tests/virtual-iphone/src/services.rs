//! The device services a host starts through lockdownd and reaches with a usbmuxd
//! `Connect` to the port `StartService` named: MobileBackup2 and the helpers the host tools
//! use around a backup (notification_proxy, AFC, installation_proxy, springboardservices).
//! Ports are fixed per service (they are virtual); each `StartService` opens its port for
//! one connection, as on a real device. See the reference, sections 2.4 and 2.5.

use std::sync::Arc;

use plist::{Dictionary, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::devices::{DeviceState, Registry};
use crate::framing::{self, FrameError};

/// A service lockdownd can start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    pub name: &'static str,
    pub port: u16,
    /// `EnableServiceSSL`: the host starts TLS (device = server) right after `Connect`.
    pub ssl: bool,
}

pub const MOBILEBACKUP2: &str = "com.apple.mobilebackup2";
pub const NOTIFICATION_PROXY: &str = "com.apple.mobile.notification_proxy";
pub const INSECURE_NOTIFICATION_PROXY: &str = "com.apple.mobile.insecure_notification_proxy";
pub const AFC: &str = "com.apple.afc";
pub const INSTALLATION_PROXY: &str = "com.apple.mobile.installation_proxy";
pub const SPRINGBOARD: &str = "com.apple.springboardservices";

pub const SERVICES: &[Spec] = &[
    Spec { name: MOBILEBACKUP2, port: 49_170, ssl: true },
    Spec { name: NOTIFICATION_PROXY, port: 49_171, ssl: false },
    Spec { name: INSECURE_NOTIFICATION_PROXY, port: 49_172, ssl: false },
    Spec { name: AFC, port: 49_173, ssl: false },
    Spec { name: INSTALLATION_PROXY, port: 49_174, ssl: false },
    Spec { name: SPRINGBOARD, port: 49_175, ssl: false },
];

pub fn by_name(name: &str) -> Option<Spec> {
    SERVICES.iter().copied().find(|s| s.name == name)
}

pub fn by_port(port: u16) -> Option<Spec> {
    SERVICES.iter().copied().find(|s| s.port == port)
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Backup(#[from] crate::mobilebackup2::BackupError),
    #[error(transparent)]
    Afc(#[from] crate::afc::AfcError),
}

/// Serves one connection to `spec` until the host hangs up.
pub async fn serve(
    stream: TcpStream,
    spec: Spec,
    state: Arc<DeviceState>,
    registry: Arc<Registry>,
) -> Result<(), ServiceError> {
    if spec.ssl {
        let acceptor = tokio_rustls::TlsAcceptor::from(registry.identity.tls());
        let tls = acceptor.accept(stream).await.map_err(ServiceError::Tls)?;
        run(tls, spec, &state, &registry).await
    } else {
        run(stream, spec, &state, &registry).await
    }
}

async fn run<S: AsyncRead + AsyncWrite + Unpin + Send>(
    s: S,
    spec: Spec,
    state: &DeviceState,
    registry: &Arc<Registry>,
) -> Result<(), ServiceError> {
    match spec.name {
        MOBILEBACKUP2 => Ok(crate::mobilebackup2::serve(s, state, registry).await?),
        NOTIFICATION_PROXY | INSECURE_NOTIFICATION_PROXY => notification_proxy(s).await,
        AFC => Ok(crate::afc::serve(s, state).await?),
        INSTALLATION_PROXY => installation_proxy(s, state).await,
        SPRINGBOARD => springboard(s).await,
        _ => Ok(()),
    }
}

/// notification_proxy: observing and posting are acknowledged by silence, as on a device;
/// `Shutdown` is answered with `ProxyDeath`, which libimobiledevice waits for.
async fn notification_proxy<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> Result<(), ServiceError> {
    while let Some(msg) = framing::read_dict(&mut s).await? {
        let command = msg.get("Command").and_then(Value::as_string).unwrap_or_default();
        let name = msg.get("Name").and_then(Value::as_string).unwrap_or_default();
        tracing::debug!(np.command = command, np.name = name, "notification_proxy");
        if command == "Shutdown" {
            let mut r = Dictionary::new();
            r.insert("Command".into(), "ProxyDeath".into());
            framing::write_xml(&mut s, &Value::Dictionary(r)).await?;
            return Ok(());
        }
    }
    Ok(())
}

/// installation_proxy: `Browse` lists the device's apps (bundle ids of its app containers).
async fn installation_proxy<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    state: &DeviceState,
) -> Result<(), ServiceError> {
    while let Some(msg) = framing::read_dict(&mut s).await? {
        let command = msg.get("Command").and_then(Value::as_string).unwrap_or_default();
        tracing::debug!(instproxy.command = command, "installation_proxy");
        if command != "Browse" {
            let mut r = Dictionary::new();
            r.insert("Error".into(), "UnknownCommand".into());
            r.insert("Status".into(), "Complete".into());
            framing::write_xml(&mut s, &Value::Dictionary(r)).await?;
            continue;
        }
        let apps: Vec<Value> = state
            .app_bundles()
            .into_iter()
            .map(|bundle| {
                let mut app = Dictionary::new();
                app.insert("CFBundleIdentifier".into(), bundle.clone().into());
                app.insert("CFBundleDisplayName".into(), bundle.rsplit('.').next().unwrap_or_default().into());
                app.insert("CFBundleVersion".into(), "1.0".into());
                app.insert("ApplicationType".into(), "User".into());
                app.insert(
                    "Container".into(),
                    format!("/private/var/mobile/Containers/Data/Application/{bundle}").into(),
                );
                Value::Dictionary(app)
            })
            .collect();
        let total = apps.len() as u64;
        let mut page = Dictionary::new();
        page.insert("Status".into(), "BrowsingApplications".into());
        page.insert("CurrentAmount".into(), Value::Integer(total.into()));
        page.insert("CurrentIndex".into(), Value::Integer(0u64.into()));
        page.insert("Total".into(), Value::Integer(total.into()));
        page.insert("CurrentList".into(), Value::Array(apps));
        framing::write_xml(&mut s, &Value::Dictionary(page)).await?;
        let mut done = Dictionary::new();
        done.insert("Status".into(), "Complete".into());
        framing::write_xml(&mut s, &Value::Dictionary(done)).await?;
    }
    Ok(())
}

/// A 1×1 PNG, the icon of every virtual app.
const ICON_PNG: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1f, 0x15, 0xc4, 0x89, 0x00, 0x00, 0x00, 0x0d, 0x49,
    0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0x60, 0x60, 0x60, 0xf8, 0x0f, 0x00, 0x01, 0x04, 0x01, 0x00, 0x5f, 0xe5, 0xc3,
    0x4b, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e, 0x44, 0xae, 0x42, 0x60, 0x82,
];

/// springboardservices: icons (`getIconPNGData`) and an empty icon state.
async fn springboard<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> Result<(), ServiceError> {
    while let Some(msg) = framing::read_dict(&mut s).await? {
        let command = msg.get("command").and_then(Value::as_string).unwrap_or_default();
        tracing::debug!(springboard.command = command, "springboardservices");
        let reply = match command {
            "getIconPNGData" | "getHomeScreenWallpaperPNGData" => {
                let mut r = Dictionary::new();
                r.insert("pngData".into(), Value::Data(ICON_PNG.to_vec()));
                Value::Dictionary(r)
            }
            "getIconState" => Value::Array(Vec::new()),
            "getInterfaceOrientation" => {
                let mut r = Dictionary::new();
                r.insert("interfaceOrientation".into(), Value::Integer(1u64.into()));
                Value::Dictionary(r)
            }
            _ => {
                let mut r = Dictionary::new();
                r.insert("Error".into(), "UnknownCommand".into());
                Value::Dictionary(r)
            }
        };
        framing::write_xml(&mut s, &reply).await?;
    }
    Ok(())
}
