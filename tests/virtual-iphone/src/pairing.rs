//! Keys, certificates and pair records, and the device's TLS server.
//!
//! One process has one set of RSA-2048 keys, derived from its seed: the device key (whose
//! PKCS#1 public key lockdownd reports as `DevicePublicKey`, and which signs the device's
//! side of every TLS handshake) and a host key that serves as root and host key of the
//! pre-made pair records, as idevice's own `ca.rs` does. Each device gets a pre-made pair
//! record, served by the virtual usbmuxd, so hosts need not pair; hosts that pair through
//! lockdownd bring their own record and are remembered too.
//!
//! The device is the TLS server. No host verifies the device certificate, and the hosts
//! present different client certificates (libimobiledevice the root, the others the host
//! certificate, some SHA-1 signed), so client certificates are requested and accepted
//! whatever their chain, while their handshake signatures are still checked (reference §2.3).

use std::sync::Arc;

use base64::Engine as _;
use plist::{Dictionary, Value};
use rand_chacha::rand_core::SeedableRng as _;
use rsa::pkcs1::EncodeRsaPublicKey as _;
use rsa::pkcs8::EncodePrivateKey as _;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::devices::Device;

#[derive(Debug, thiserror::Error)]
pub enum PairingError {
    #[error("generating an RSA key: {0}")]
    Rsa(String),
    #[error("making a certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// A certificate and its key, PEM and DER. `Debug` shows no key.
#[derive(Clone)]
struct Certified {
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
}

/// The process's keys and certificates, and the TLS server configuration built on them.
/// `Debug` shows no key.
#[derive(Clone)]
pub struct Identity {
    root: Certified,
    host: Certified,
    device: Certified,
    /// `DevicePublicKey`: PKCS#1 PEM ("BEGIN RSA PUBLIC KEY"), as every host parses it.
    pub device_public_key_pem: String,
    /// `HostID` of the pre-made pair records.
    pub host_id: String,
    tls: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for Certified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certified").field("cert_der_len", &self.cert_der.len()).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("host_id", &self.host_id).finish_non_exhaustive()
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn rsa_key(rng: &mut rand_chacha::ChaCha20Rng) -> Result<(rsa::RsaPrivateKey, Vec<u8>), PairingError> {
    let key = rsa::RsaPrivateKey::new(rng, 2048).map_err(|e| PairingError::Rsa(e.to_string()))?;
    let der = key.to_pkcs8_der().map_err(|e| PairingError::Rsa(e.to_string()))?.as_bytes().to_vec();
    Ok((key, der))
}

fn signing_key(pkcs8: &[u8]) -> Result<rcgen::KeyPair, PairingError> {
    Ok(rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(pkcs8.to_vec()),
        &rcgen::PKCS_RSA_SHA256,
    )?)
}

fn params(common_name: Option<&str>, ca: bool) -> Result<rcgen::CertificateParams, PairingError> {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(cn) = common_name {
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    }
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2034, 1, 1);
    p.is_ca = if ca { rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained) } else { rcgen::IsCa::NoCa };
    if !ca {
        p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature, rcgen::KeyUsagePurpose::KeyEncipherment];
    }
    Ok(p)
}

impl Identity {
    /// Keys and certificates derived from `seed` (two RSA-2048 keys: well under a second
    /// with optimised dependencies).
    pub fn from_seed(seed: u64) -> Result<Self, PairingError> {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed ^ 0x7061_6972_696e_6721);
        let (_, host_der) = rsa_key(&mut rng)?;
        let (device_key, device_der) = rsa_key(&mut rng)?;
        let host_kp = signing_key(&host_der)?;
        let device_kp = signing_key(&device_der)?;
        let host_key_pem = pem("PRIVATE KEY", &host_der);

        let root_params = params(None, true)?;
        let root_cert = root_params.self_signed(&host_kp)?;
        let issuer = rcgen::Issuer::from_params(&root_params, &host_kp);
        let host_cert = params(None, false)?.signed_by(&host_kp, &issuer)?;
        let device_cert = params(Some("Device"), false)?.signed_by(&device_kp, &issuer)?;

        let certified = |c: &rcgen::Certificate, key_pem: &str| Certified {
            cert_der: c.der().clone(),
            cert_pem: pem("CERTIFICATE", c.der()),
            key_pem: key_pem.to_string(),
        };
        let device = certified(&device_cert, &pem("PRIVATE KEY", &device_der));
        let device_public_key_pem = device_key
            .to_public_key()
            .to_pkcs1_pem(rsa::pkcs1::LineEnding::LF)
            .map_err(|e| PairingError::Rsa(e.to_string()))?;
        let tls = server_config(&device.cert_der, &device_der)?;
        Ok(Self {
            root: certified(&root_cert, &host_key_pem),
            host: certified(&host_cert, &host_key_pem),
            device,
            device_public_key_pem,
            host_id: uuid::Uuid::from_u64_pair(seed, 0x4057_1d00).to_string().to_uppercase(),
            tls,
        })
    }

    /// The TLS server configuration the device uses for lockdown sessions and services.
    pub fn tls(&self) -> Arc<rustls::ServerConfig> {
        self.tls.clone()
    }

    /// The pre-made pair record usbmuxd serves for `device` (an XML plist, as hosts store it).
    pub fn pair_record(&self, device: &Device, system_buid: &str) -> Vec<u8> {
        let mut d = Dictionary::new();
        let data = |s: &str| Value::Data(s.as_bytes().to_vec());
        d.insert("DeviceCertificate".into(), data(&self.device.cert_pem));
        d.insert("HostCertificate".into(), data(&self.host.cert_pem));
        d.insert("HostPrivateKey".into(), data(&self.host.key_pem));
        d.insert("RootCertificate".into(), data(&self.root.cert_pem));
        d.insert("RootPrivateKey".into(), data(&self.root.key_pem));
        d.insert("HostID".into(), self.host_id.clone().into());
        d.insert("SystemBUID".into(), system_buid.into());
        d.insert("WiFiMACAddress".into(), crate::lockdownd::wifi_address(device).into());
        d.insert("EscrowBag".into(), Value::Data(escrow_bag(device)));
        d.insert("UDID".into(), device.udid.clone().into());
        let mut xml = Vec::new();
        // Invariant: a dictionary of plain values always serialises into a Vec.
        plist::to_writer_xml(&mut xml, &d).expect("XML plist into Vec");
        xml
    }
}

/// The escrow bag a device hands a paired host (opaque to every host; 48 bytes here).
pub fn escrow_bag(device: &Device) -> Vec<u8> {
    let mut bag = b"VIRTUAL-ESCROW-BAG:".to_vec();
    bag.extend_from_slice(device.udid.as_bytes());
    bag.resize(48, 0);
    bag
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_config(cert: &CertificateDer<'static>, pkcs8: &[u8]) -> Result<Arc<rustls::ServerConfig>, PairingError> {
    let provider = provider();
    let config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(AnyClientCert(provider)))
        .with_single_cert(vec![cert.clone()], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8.to_vec())))?;
    Ok(Arc::new(config))
}

/// Accepts the client certificate whatever its chain (hosts' certificates are
/// self-made, some SHA-1 signed) but checks the handshake signature made with it.
#[derive(Debug)]
struct AnyClientCert(Arc<CryptoProvider>);

impl ClientCertVerifier for AnyClientCert {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_records_carry_every_key_hosts_require() {
        let id = Identity::from_seed(3).unwrap();
        let device = Device::from_seed(3, 0);
        let record: Dictionary = plist::from_bytes(&id.pair_record(&device, "BUID")).unwrap();
        for key in
            ["DeviceCertificate", "HostCertificate", "HostPrivateKey", "RootCertificate", "RootPrivateKey", "EscrowBag"]
        {
            assert!(matches!(record.get(key), Some(Value::Data(d)) if !d.is_empty()), "{key}");
        }
        for key in ["HostID", "SystemBUID", "WiFiMACAddress", "UDID"] {
            assert!(record.get(key).and_then(Value::as_string).is_some(), "{key}");
        }
        assert!(id.device_public_key_pem.starts_with("-----BEGIN RSA PUBLIC KEY-----"));
        let again = Identity::from_seed(3).unwrap();
        assert_eq!(again.device.cert_der, id.device.cert_der, "identity is deterministic per seed");
    }
}
