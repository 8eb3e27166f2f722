//! TLS settings from PEM files: the certificate chain and private key a party presents, the
//! certificate authorities it trusts, and whether a server asks its clients for certificates
//! (RFC 3261 §26.2.1, §26.3.1; RFC 5630 on `sips:`; RFC 5922 on which identity a certificate
//! must show).
//!
//! [`TlsSetup::load`] reads the files named in a program's configuration into rustls
//! configurations (the `ring` provider; TLS 1.2 and 1.3). Every error names the file it is
//! about ([`TlsError`]), so an operator can tell which key of the configuration to fix.
//!
//! * A **client** (any party opening a connection) verifies the server's certificate against
//!   the trusted CAs and against the host it meant to reach: the host of the URI it resolved
//!   (RFC 5922 §7.1, subjectAltName DNS names, or an IP address entry for a URI whose host is
//!   an address). When the party has a certificate of its own it presents it when asked
//!   (mutual TLS, RFC 5922 §7.2).
//! * A **server** presents its certificate and, per [`ClientAuth`], asks for none, takes one
//!   when offered (verifying it against the trusted CAs), or refuses a handshake without a
//!   certificate chained to them.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

pub use rustls_pki_types::ServerName;
pub use tokio_rustls::{TlsAcceptor, TlsConnector};

/// What a TLS server asks of its clients (RFC 5922 §7.2 for SIP peers that authenticate each
/// other by certificate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientAuth {
    /// No client certificate is asked for.
    #[default]
    None,
    /// A client may present a certificate; one that is presented must chain to a trusted CA,
    /// one that is not leaves the connection unauthenticated (see
    /// [`crate::transport::Transports::peer_certificate`]).
    Optional,
    /// A handshake without a certificate chained to a trusted CA is refused.
    Required,
}

/// A TLS configuration problem, naming the file it is about.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file is not valid PEM.
    #[error("{} is not valid PEM: {reason}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What the PEM reader said.
        reason: String,
    },
    /// A certificate file holds no `CERTIFICATE` section.
    #[error("{} holds no PEM certificate", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A key file holds no private key (PKCS#8, PKCS#1 or SEC1).
    #[error("{} holds no PEM private key", path.display())]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// The key cannot be used (an unsupported algorithm) or does not match the certificate.
    #[error("the key in {} does not fit the certificate in {}: {reason}", key.display(), certificate.display())]
    KeyMismatch {
        /// The certificate file.
        certificate: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        reason: String,
    },
    /// A CA file holds a certificate that cannot be a trust anchor.
    #[error("{} holds a certificate that cannot be trusted as a CA: {reason}", path.display())]
    BadCa {
        /// The file.
        path: PathBuf,
        /// What rustls said.
        reason: String,
    },
    /// A certificate is given without its key, or a key without its certificate.
    #[error("a certificate needs its key and a key its certificate: {0}")]
    Incomplete(&'static str),
    /// Client certificates are asked for, but no CA is configured to verify them.
    #[error("client certificates cannot be verified without trusted CAs")]
    NoCaForClients,
    /// Building a rustls configuration failed otherwise.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The PEM files of a party's TLS configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain presented (the party's own certificate first), PEM.
    pub certificate: Option<PathBuf>,
    /// The private key of the certificate, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// The trusted certificate authorities, PEM (one or more certificates). Without it a
    /// client can verify no server, and TLS connections can be accepted but not opened.
    pub ca: Option<PathBuf>,
}

/// Which of a party's [`TlsFiles`] something is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFile {
    /// The certificate chain.
    Certificate,
    /// The private key.
    Key,
    /// The trusted CAs.
    Ca,
}

impl TlsError {
    /// The file of `files` this error is about, for a configuration error that names the
    /// setting to fix: `None` when it is about no one file.
    pub fn file(&self, files: &TlsFiles) -> Option<TlsFile> {
        // A path may be given for two settings (the CA and the certificate in one file):
        // `order` says which to name first.
        let by_path = |path: &PathBuf, order: &[TlsFile]| {
            order.iter().copied().find(|f| {
                let given = match f {
                    TlsFile::Certificate => &files.certificate,
                    TlsFile::Key => &files.key,
                    TlsFile::Ca => &files.ca,
                };
                given.as_ref() == Some(path)
            })
        };
        match self {
            TlsError::NoKey { .. } | TlsError::KeyMismatch { .. } => Some(TlsFile::Key),
            TlsError::BadCa { .. } | TlsError::NoCaForClients => Some(TlsFile::Ca),
            // A file without a certificate where the CA should be is the CA's problem.
            TlsError::NoCertificate { path } => by_path(path, &[TlsFile::Ca, TlsFile::Certificate]),
            TlsError::Read { path, .. } | TlsError::Pem { path, .. } => {
                by_path(path, &[TlsFile::Certificate, TlsFile::Key, TlsFile::Ca])
            }
            TlsError::Incomplete(_) | TlsError::Config(_) => None,
        }
    }
}

/// A party's TLS configuration, loaded: what it presents, what it trusts, and what it asks of
/// its clients. Cheap to clone.
#[derive(Clone)]
pub struct TlsSetup {
    provider: Arc<CryptoProvider>,
    identity: Option<(Vec<CertificateDer<'static>>, Arc<PrivateKeyDer<'static>>)>,
    roots: Arc<RootCertStore>,
    client_auth: ClientAuth,
    server: Option<Arc<ServerConfig>>,
    client: Arc<ClientConfig>,
}

impl std::fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSetup")
            .field("certificate", &self.identity.as_ref().map(|(c, _)| c.len()))
            .field("trusted_cas", &self.roots.len())
            .field("client_auth", &self.client_auth)
            .finish()
    }
}

/// Reads every certificate of a PEM file.
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let mut out = Vec::new();
    for item in CertificateDer::pem_slice_iter(&bytes) {
        out.push(item.map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            reason: e.to_string(),
        })?);
    }
    if out.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(out)
}

/// Reads the first private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_owned(),
        },
        e => TlsError::Pem {
            path: path.to_owned(),
            reason: e.to_string(),
        },
    })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

impl TlsSetup {
    /// Loads the files and builds the server and client configurations. A server
    /// configuration exists only when a certificate and key are given; `client_auth` is what
    /// that server asks of its clients (anything but [`ClientAuth::None`] needs `ca`).
    pub fn load(files: &TlsFiles, client_auth: ClientAuth) -> Result<TlsSetup, TlsError> {
        // The ring provider, as the project chose (no aws-lc-rs C build); rustls 0.23.48
        // deprecates it for its lack of post-quantum key exchange, which SIP peers of today
        // do not offer either.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let identity = match (&files.certificate, &files.key) {
            (Some(cert), Some(key)) => {
                let chain = load_certificates(cert)?;
                let key_der = load_key(key)?;
                // Check now that the key fits the certificate, so the error names both files.
                let signing = provider
                    .key_provider
                    .load_private_key(key_der.clone_key())
                    .map_err(|e| TlsError::KeyMismatch {
                        certificate: cert.clone(),
                        key: key.clone(),
                        reason: e.to_string(),
                    })?;
                rustls::sign::CertifiedKey::new(chain.clone(), signing)
                    .keys_match()
                    .map_err(|e| TlsError::KeyMismatch {
                        certificate: cert.clone(),
                        key: key.clone(),
                        reason: e.to_string(),
                    })?;
                Some((chain, Arc::new(key_der)))
            }
            (None, None) => None,
            (Some(_), None) => return Err(TlsError::Incomplete("a certificate without its key")),
            (None, Some(_)) => return Err(TlsError::Incomplete("a key without its certificate")),
        };
        let mut roots = RootCertStore::empty();
        if let Some(ca) = &files.ca {
            for cert in load_certificates(ca)? {
                roots.add(cert).map_err(|e| TlsError::BadCa {
                    path: ca.clone(),
                    reason: e.to_string(),
                })?;
            }
        }
        if client_auth != ClientAuth::None && roots.is_empty() {
            return Err(TlsError::NoCaForClients);
        }
        let roots = Arc::new(roots);
        let client = Arc::new(build_client(&provider, &identity, &roots)?);
        let mut setup = TlsSetup {
            provider,
            identity,
            roots,
            client_auth,
            server: None,
            client,
        };
        if setup.identity.is_some() {
            setup.server = Some(Arc::new(setup.build_server(client_auth)?));
        }
        Ok(setup)
    }

    fn build_server(&self, client_auth: ClientAuth) -> Result<ServerConfig, TlsError> {
        let Some((chain, key)) = &self.identity else {
            return Err(TlsError::Incomplete("a server needs a certificate and key"));
        };
        let builder = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(config_error)?;
        let builder = match client_auth {
            ClientAuth::None => builder.with_no_client_auth(),
            ClientAuth::Optional | ClientAuth::Required => {
                let mut verifier = WebPkiClientVerifier::builder_with_provider(
                    self.roots.clone(),
                    self.provider.clone(),
                );
                if client_auth == ClientAuth::Optional {
                    verifier = verifier.allow_unauthenticated();
                }
                builder.with_client_cert_verifier(verifier.build().map_err(config_error)?)
            }
        };
        builder
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(config_error)
    }

    /// The configuration of a TLS server, when a certificate and key are configured.
    pub fn server_config(&self) -> Option<Arc<ServerConfig>> {
        self.server.clone()
    }

    /// The configuration of a TLS client: trusted CAs, and the party's certificate when it
    /// has one.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }

    /// What the server asks of its clients.
    pub fn client_auth(&self) -> ClientAuth {
        self.client_auth
    }

    /// Whether the party has a certificate of its own (so it can accept TLS, and present one
    /// as a client).
    pub fn has_certificate(&self) -> bool {
        self.identity.is_some()
    }

    /// Whether any CA is trusted (so the party can open TLS connections).
    pub fn trusts_any(&self) -> bool {
        !self.roots.is_empty()
    }

    /// An acceptor for the SIP listener: the party's certificate and its [`ClientAuth`].
    pub fn acceptor(&self) -> Option<TlsAcceptor> {
        self.server.clone().map(TlsAcceptor::from)
    }

    /// An acceptor that asks no client certificate: for the application data connection,
    /// whose clients (terminals) prove themselves by the session token instead.
    pub fn acceptor_without_client_auth(&self) -> Result<Option<TlsAcceptor>, TlsError> {
        if self.identity.is_none() {
            return Ok(None);
        }
        Ok(Some(TlsAcceptor::from(Arc::new(
            self.build_server(ClientAuth::None)?,
        ))))
    }

    /// A connector for opening TLS connections.
    pub fn connector(&self) -> TlsConnector {
        TlsConnector::from(self.client.clone())
    }

    /// Whether `certificate` (a peer's end-entity certificate, already verified as chained to
    /// a trusted CA by the handshake) names `host` — a DNS name or an IP address — in its
    /// subjectAltName (RFC 5922 §7.1–7.2: the identity of a SIP peer is in the certificate's
    /// subjectAltName, not its Common Name).
    pub fn certificate_names(certificate: &CertificateDer<'_>, host: &str) -> bool {
        let Ok(name) = server_name(host) else {
            return false;
        };
        let Ok(cert) = webpki::EndEntityCert::try_from(certificate) else {
            return false;
        };
        cert.verify_is_valid_for_subject_name(&name).is_ok()
    }
}

/// A TLS client's configuration: the trusted CAs (none: every server is refused), and the
/// party's own certificate when it has one (RFC 5922 §7.2, mutual TLS).
fn build_client(
    provider: &Arc<CryptoProvider>,
    identity: &Option<(Vec<CertificateDer<'static>>, Arc<PrivateKeyDer<'static>>)>,
    roots: &Arc<RootCertStore>,
) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(config_error)?
        .with_root_certificates(roots.clone());
    match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(config_error),
        None => Ok(builder.with_no_client_auth()),
    }
}

fn config_error(e: impl std::fmt::Display) -> TlsError {
    TlsError::Config(e.to_string())
}

/// The name a TLS client checks the server's certificate against, from a URI's host: an IP
/// address (with or without IPv6 brackets) or a DNS name (RFC 5922 §7.1).
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(bare.to_owned()).map_err(|_| {
        TlsError::Config(format!(
            "{host:?} is not a host name a certificate can name"
        ))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn an_error_names_the_file_it_is_about() {
        let pki = Pki::new();
        let missing = pki.path("missing.pem");
        let files = |certificate: &PathBuf, key: &PathBuf, ca: &PathBuf| TlsFiles {
            certificate: Some(certificate.clone()),
            key: Some(key.clone()),
            ca: Some(ca.clone()),
        };
        let (cert, key, ca) = (
            pki.path("cert.pem"),
            pki.path("key.pem"),
            pki.path("ca.pem"),
        );
        for (f, expected) in [
            (files(&missing, &key, &ca), TlsFile::Certificate),
            (files(&cert, &missing, &ca), TlsFile::Key),
            (files(&cert, &key, &missing), TlsFile::Ca),
            // A key file where the CA should be: no certificate in it.
            (files(&cert, &key, &key), TlsFile::Ca),
            // A key that is not the certificate's.
            (files(&cert, &pki.path("other-key.pem"), &ca), TlsFile::Key),
        ] {
            let Err(e) = TlsSetup::load(&f, ClientAuth::Optional) else {
                panic!("a broken configuration loaded: {f:?}");
            };
            assert_eq!(e.file(&f), Some(expected), "{e}");
        }
    }

    struct Pki {
        dir: tempfile::TempDir,
    }

    impl Pki {
        fn new() -> Pki {
            let dir = tempfile::tempdir().unwrap();
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca = ca_params.self_signed(&ca_key).unwrap();
            let key = rcgen::KeyPair::generate().unwrap();
            let params =
                rcgen::CertificateParams::new(vec!["relay.test".into(), "127.0.0.1".into()])
                    .unwrap();
            let leaf = params.signed_by(&key, &ca, &ca_key).unwrap();
            std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
            std::fs::write(dir.path().join("cert.pem"), leaf.pem()).unwrap();
            std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
            let other = rcgen::KeyPair::generate().unwrap();
            std::fs::write(dir.path().join("other-key.pem"), other.serialize_pem()).unwrap();
            Pki { dir }
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        fn files(&self) -> TlsFiles {
            TlsFiles {
                certificate: Some(self.path("cert.pem")),
                key: Some(self.path("key.pem")),
                ca: Some(self.path("ca.pem")),
            }
        }
    }

    #[test]
    fn good_files_make_server_and_client_configs() {
        let pki = Pki::new();
        let setup = TlsSetup::load(&pki.files(), ClientAuth::Required).unwrap();
        assert!(setup.server_config().is_some());
        assert!(setup.has_certificate() && setup.trusts_any());
        assert!(setup.acceptor_without_client_auth().unwrap().is_some());
        let client_only = TlsSetup::load(
            &TlsFiles {
                ca: Some(pki.path("ca.pem")),
                ..TlsFiles::default()
            },
            ClientAuth::None,
        )
        .unwrap();
        assert!(client_only.server_config().is_none());
        assert!(client_only.acceptor().is_none());
    }

    #[test]
    fn a_missing_file_is_named() {
        let pki = Pki::new();
        let files = TlsFiles {
            certificate: Some(pki.path("nope.pem")),
            ..pki.files()
        };
        let e = TlsSetup::load(&files, ClientAuth::None).unwrap_err();
        assert!(matches!(e, TlsError::Read { .. }), "{e}");
        assert!(e.to_string().contains("nope.pem"), "{e}");
    }

    #[test]
    fn a_file_with_no_certificate_is_named() {
        let pki = Pki::new();
        // A key where the certificate should be.
        let files = TlsFiles {
            certificate: Some(pki.path("key.pem")),
            ..pki.files()
        };
        let e = TlsSetup::load(&files, ClientAuth::None).unwrap_err();
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");
        assert!(e.to_string().contains("key.pem"), "{e}");
        let files = TlsFiles {
            ca: Some(pki.path("key.pem")),
            ..pki.files()
        };
        let e = TlsSetup::load(&files, ClientAuth::None).unwrap_err();
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");
    }

    #[test]
    fn a_file_with_no_key_is_named() {
        let pki = Pki::new();
        let files = TlsFiles {
            key: Some(pki.path("cert.pem")),
            ..pki.files()
        };
        let e = TlsSetup::load(&files, ClientAuth::None).unwrap_err();
        assert!(matches!(e, TlsError::NoKey { .. }), "{e}");
        assert!(e.to_string().contains("cert.pem"), "{e}");
    }

    #[test]
    fn broken_pem_is_named() {
        let pki = Pki::new();
        let bad = pki.path("bad.pem");
        std::fs::write(
            &bad,
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let files = TlsFiles {
            certificate: Some(bad),
            ..pki.files()
        };
        let e = TlsSetup::load(&files, ClientAuth::None).unwrap_err();
        assert!(matches!(e, TlsError::Pem { .. }), "{e}");
        assert!(e.to_string().contains("bad.pem"), "{e}");
    }

    #[test]
    fn a_key_of_another_certificate_is_refused_naming_both() {
        let pki = Pki::new();
        let files = TlsFiles {
            key: Some(pki.path("other-key.pem")),
            ..pki.files()
        };
        let e = TlsSetup::load(&files, ClientAuth::None).unwrap_err();
        assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("other-key.pem") && text.contains("cert.pem"),
            "{text}"
        );
    }

    #[test]
    fn half_an_identity_and_client_auth_without_ca_are_refused() {
        let pki = Pki::new();
        let e = TlsSetup::load(
            &TlsFiles {
                key: None,
                ..pki.files()
            },
            ClientAuth::None,
        )
        .unwrap_err();
        assert!(matches!(e, TlsError::Incomplete(_)), "{e}");
        let e = TlsSetup::load(
            &TlsFiles {
                ca: None,
                ..pki.files()
            },
            ClientAuth::Required,
        )
        .unwrap_err();
        assert!(matches!(e, TlsError::NoCaForClients), "{e}");
    }

    #[test]
    fn certificate_names_checks_the_subject_alt_name() {
        let pki = Pki::new();
        let cert = load_certificates(&pki.path("cert.pem")).unwrap().remove(0);
        assert!(TlsSetup::certificate_names(&cert, "relay.test"));
        assert!(TlsSetup::certificate_names(&cert, "127.0.0.1"));
        assert!(!TlsSetup::certificate_names(&cert, "127.0.0.2"));
        assert!(!TlsSetup::certificate_names(&cert, "evil.test"));
    }

    #[test]
    fn server_names_from_uri_hosts() {
        assert!(matches!(
            server_name("[::1]").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("10.0.0.1").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("relay.test").unwrap(),
            ServerName::DnsName(_)
        ));
        assert!(server_name("bad name!").is_err());
    }
}
