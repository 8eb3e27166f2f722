//! `[tls]`: SIP over TLS (RFC 3261 §26.2, RFC 5630 `sips:`) — the relay's certificate and
//! key, the CAs it trusts, where it listens for TLS, and what it asks of its TLS clients.
//!
//! ```toml
//! [tls]
//! certificate = "relay.pem"     # chain, the relay's own certificate first (PEM)
//! key = "relay-key.pem"         # its private key (PEM)
//! ca = "ca.pem"                 # trusted CAs: application servers' certificates chain to it
//! listen = ["127.0.0.1:5061"]   # default: the first [listen] address on port 5061
//! client_certificates = "optional"   # none | optional | required
//! servers_need_certificate = true    # application-server accounts only over mutual TLS
//! ```
//!
//! Paths are relative to the configuration file's directory. With a certificate configured
//! the relay listens for TLS (port 5061 by default, RFC 3261 §19.1.2) and opens TLS
//! connections to application servers whose Contact is `sips:` or `;transport=tls`,
//! verifying their certificate against `ca` and presenting its own (mutual TLS, RFC 5922
//! §7.2). Terminals usually have no certificate: `client_certificates = "optional"` (the
//! default) verifies one that is offered and lets a terminal without one authenticate by
//! digest; `required` refuses every TLS client without a certificate chained to `ca`.
//!
//! `servers_need_certificate` (default: on whenever a CA is configured) refuses a REGISTER
//! or a charging MESSAGE of an application-server account unless it came over a TLS
//! connection whose peer presented a certificate chained to `ca` — so a stolen server
//! password alone is not enough to register a server or charge a subscriber.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sip_core::tls::{ClientAuth, TlsError, TlsFile, TlsFiles, TlsSetup};

/// What the relay asks of TLS clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientCertificates {
    /// No client certificate is asked for.
    None,
    /// A certificate offered is verified against `ca`; none is also accepted.
    #[default]
    Optional,
    /// A handshake without a certificate chained to `ca` is refused.
    Required,
}

impl From<ClientCertificates> for ClientAuth {
    fn from(c: ClientCertificates) -> ClientAuth {
        match c {
            ClientCertificates::None => ClientAuth::None,
            ClientCertificates::Optional => ClientAuth::Optional,
            ClientCertificates::Required => ClientAuth::Required,
        }
    }
}

/// `[tls]`. See the [module documentation](self).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a [tls] table")]
pub struct TlsConfig {
    /// The relay's certificate chain (PEM); with it the relay listens for TLS.
    pub certificate: Option<PathBuf>,
    /// The certificate's private key (PEM).
    pub key: Option<PathBuf>,
    /// The trusted CAs (PEM): application servers' and clients' certificates chain to them.
    pub ca: Option<PathBuf>,
    /// TLS listening addresses; empty (the default) with a certificate configured: the first
    /// `[listen]` address's IP on port 5061.
    pub listen: Vec<SocketAddr>,
    /// What is asked of TLS clients.
    pub client_certificates: ClientCertificates,
    /// Whether an application-server account's REGISTER and charges must come over TLS from a
    /// peer with a certificate chained to `ca`; unset: whenever `ca` and a certificate are
    /// configured.
    pub servers_need_certificate: Option<bool>,
}

/// The default port of SIP over TLS (RFC 3261 §19.1.2).
pub const DEFAULT_TLS_PORT: u16 = 5061;

impl TlsConfig {
    /// Whether TLS is configured at all.
    pub fn enabled(&self) -> bool {
        self.certificate.is_some() || self.key.is_some() || self.ca.is_some()
    }

    /// The files, resolved against `base` (the configuration file's directory).
    pub fn files(&self, base: &Path) -> TlsFiles {
        TlsFiles {
            certificate: self.certificate.as_ref().map(|p| base.join(p)),
            key: self.key.as_ref().map(|p| base.join(p)),
            ca: self.ca.as_ref().map(|p| base.join(p)),
        }
    }

    /// The TLS listening addresses: those configured, else — with a certificate — the first
    /// of `udp_tcp` (the `[listen]` addresses) on port 5061 (the loopback address when there
    /// is none, as `[listen]`'s own default).
    pub fn listen_addrs(&self, udp_tcp: &[SocketAddr]) -> Vec<SocketAddr> {
        if !self.listen.is_empty() || self.certificate.is_none() {
            return self.listen.clone();
        }
        let ip = udp_tcp
            .first()
            .map(|a| a.ip())
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
        vec![SocketAddr::new(ip, DEFAULT_TLS_PORT)]
    }

    /// Whether application-server accounts must come over mutual TLS.
    pub fn servers_need_certificate(&self) -> bool {
        self.servers_need_certificate
            .unwrap_or(self.ca.is_some() && self.certificate.is_some())
    }

    /// Loads the files into a [`TlsSetup`], or `None` when `[tls]` is empty. An error names
    /// the key and the file.
    pub fn load(&self, base: &Path) -> Result<Option<TlsSetup>, Vec<(String, String)>> {
        if !self.enabled() {
            return Ok(None);
        }
        let mut problems = Vec::new();
        if self.certificate.is_some() != self.key.is_some() {
            let (missing, present) = if self.key.is_none() {
                ("tls.key", "tls.certificate")
            } else {
                ("tls.certificate", "tls.key")
            };
            problems.push((
                missing.to_string(),
                format!("must be set along with `{present}`"),
            ));
        }
        if !self.listen.is_empty() && self.certificate.is_none() {
            problems.push((
                "tls.listen".to_string(),
                "listening for TLS needs `tls.certificate` and `tls.key`".to_string(),
            ));
        }
        if self.client_certificates != ClientCertificates::None
            && self.certificate.is_some()
            && self.ca.is_none()
        {
            problems.push((
                "tls.ca".to_string(),
                format!(
                    "client_certificates = {:?} needs the CAs to verify them with (or set it to \"none\")",
                    self.client_certificates
                )
                .to_lowercase(),
            ));
        }
        if self.servers_need_certificate == Some(true) && self.ca.is_none() {
            problems.push((
                "tls.servers_need_certificate".to_string(),
                "needs `tls.ca` to verify application servers' certificates".to_string(),
            ));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let files = self.files(base);
        // Without a certificate of its own, the relay asks nothing of clients (it does not
        // accept TLS at all).
        let auth = if self.certificate.is_some() {
            self.client_certificates.into()
        } else {
            ClientAuth::None
        };
        TlsSetup::load(&files, auth)
            .map(Some)
            .map_err(|e| vec![(key_of(&e, &files).to_string(), e.to_string())])
    }
}

/// The `[tls]` key an error is about.
fn key_of(e: &TlsError, files: &TlsFiles) -> &'static str {
    match e.file(files) {
        Some(TlsFile::Certificate) => "tls.certificate",
        Some(TlsFile::Key) => "tls.key",
        Some(TlsFile::Ca) => "tls.ca",
        None => "tls",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn pki(dir: &Path) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".into()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("relay.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.join("relay-key.pem"), key.serialize_pem()).unwrap();
    }

    fn config(text: &str) -> TlsConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn empty_is_off_and_listens_nowhere() {
        let c = TlsConfig::default();
        assert!(!c.enabled());
        assert!(c.load(Path::new("")).unwrap().is_none());
        assert!(c
            .listen_addrs(&["127.0.0.1:5060".parse().unwrap()])
            .is_empty());
        assert!(!c.servers_need_certificate());
    }

    #[test]
    fn a_certificate_listens_on_5061_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        pki(dir.path());
        let c = config("certificate = \"relay.pem\"\nkey = \"relay-key.pem\"\nca = \"ca.pem\"\n");
        assert_eq!(
            c.listen_addrs(&["10.0.0.1:5060".parse().unwrap()]),
            vec!["10.0.0.1:5061".parse::<SocketAddr>().unwrap()]
        );
        assert!(c.servers_need_certificate());
        let setup = c.load(dir.path()).unwrap().unwrap();
        assert!(setup.has_certificate() && setup.trusts_any());
        assert_eq!(setup.client_auth(), ClientAuth::Optional);
    }

    #[test]
    fn errors_name_the_key_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        pki(dir.path());
        let e = config("certificate = \"missing.pem\"\nkey = \"relay-key.pem\"\nca = \"ca.pem\"\n")
            .load(dir.path())
            .unwrap_err();
        assert_eq!(e[0].0, "tls.certificate");
        assert!(e[0].1.contains("missing.pem"), "{e:?}");
        // The CA file is a key: no certificate in it.
        let e = config(
            "certificate = \"relay.pem\"\nkey = \"relay-key.pem\"\nca = \"relay-key.pem\"\n",
        )
        .load(dir.path())
        .unwrap_err();
        assert_eq!(e[0].0, "tls.ca", "{e:?}");
        assert!(e[0].1.contains("relay-key.pem"), "{e:?}");
        let e = config("certificate = \"relay.pem\"\nkey = \"ca.pem\"\nca = \"ca.pem\"\n")
            .load(dir.path())
            .unwrap_err();
        assert_eq!(e[0].0, "tls.key", "{e:?}");
        let e = config("certificate = \"relay.pem\"\n")
            .load(dir.path())
            .unwrap_err();
        assert_eq!(e[0].0, "tls.key", "{e:?}");
        let e = config("certificate = \"relay.pem\"\nkey = \"relay-key.pem\"\nclient_certificates = \"required\"\n")
            .load(dir.path())
            .unwrap_err();
        assert_eq!(e[0].0, "tls.ca", "{e:?}");
        assert!(toml::from_str::<TlsConfig>("listen = [\"127.0.0.1:5061\"]\nbogus = 1\n").is_err());
        let e = config("listen = [\"127.0.0.1:5061\"]\nca = \"ca.pem\"\n")
            .load(dir.path())
            .unwrap_err();
        assert_eq!(e[0].0, "tls.listen", "{e:?}");
    }
}
