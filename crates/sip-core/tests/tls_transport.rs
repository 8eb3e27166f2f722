//! The TLS transport on real loopback sockets (RFC 3261 §26.2, RFC 5922): certificates made
//! at test time with rcgen, one CA for the good parties and another for a stranger.
//!
//! * a message crosses both ways over TLS, the server knows the client by the certificate
//!   it presented (mutual TLS), and the reply goes back on the same connection;
//! * a client whose certificate is not chained to the server's CA is refused by a server that
//!   requires one, and so is a client with none;
//! * a client refuses a server whose certificate does not name the address it connected to,
//!   or is not chained to its CA;
//! * a TLS handshake that never starts is closed at the message deadline, holding its
//!   place under the caps until then;
//! * a TLS peer is never sent to over a TCP connection to the same address.
//!
//! Every wait is bounded by a tokio timeout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sip_core::tls::{ClientAuth, TlsFiles, TlsSetup};
use sip_core::transport::{Sink, TransportConfig, TransportError, Transports};
use sip_core::{Peer, Transport};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);

struct Received(mpsc::UnboundedSender<(Peer, Bytes)>);

impl Sink for Received {
    fn deliver(&self, from: Peer, bytes: Bytes) {
        let _ = self.0.send((from, bytes));
    }
}

/// A CA and leaf certificates signed by it, in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} CA"));
        let ca = params.self_signed(&ca_key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        Pki { dir, ca, ca_key }
    }

    /// A leaf certificate for `names` (DNS names or IP addresses), good for server and
    /// client authentication.
    fn leaf(&self, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        let cert_path = self.dir.path().join(format!("{file}.pem"));
        let key_path = self.dir.path().join(format!("{file}-key.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn setup(&self, file: &str, names: &[&str], auth: ClientAuth) -> TlsSetup {
        let (certificate, key) = self.leaf(file, names);
        TlsSetup::load(
            &TlsFiles {
                certificate: Some(certificate),
                key: Some(key),
                ca: Some(self.ca()),
            },
            auth,
        )
        .unwrap()
    }
}

async fn server(
    setup: TlsSetup,
    config: TransportConfig,
) -> (
    Transports,
    SocketAddr,
    mpsc::UnboundedReceiver<(Peer, Bytes)>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let t = Transports::bind(
        TransportConfig {
            tls: vec!["127.0.0.1:0".parse().unwrap()],
            tls_setup: Some(setup),
            ..config
        },
        Arc::new(Received(tx)),
    )
    .await
    .unwrap();
    let addr = t.local_addr(Transport::Tls).unwrap();
    (t, addr, rx)
}

async fn client(setup: Option<TlsSetup>) -> (Transports, mpsc::UnboundedReceiver<(Peer, Bytes)>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let t = Transports::bind(
        TransportConfig {
            tls_setup: setup,
            ..TransportConfig::default()
        },
        Arc::new(Received(tx)),
    )
    .await
    .unwrap();
    (t, rx)
}

fn options(branch: &str) -> Bytes {
    Bytes::from(format!(
        "OPTIONS sip:relay@127.0.0.1 SIP/2.0\r\n\
         Via: SIP/2.0/TLS 127.0.0.1:5999;branch=z9hG4bK{branch}\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:probe@127.0.0.1>;tag=t{branch}\r\n\
         To: <sip:relay@127.0.0.1>\r\n\
         Call-ID: {branch}@test\r\n\
         CSeq: 1 OPTIONS\r\n\
         Content-Length: 0\r\n\r\n"
    ))
}

async fn next(rx: &mut mpsc::UnboundedReceiver<(Peer, Bytes)>) -> (Peer, Bytes) {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("nothing arrived in time")
        .expect("the transports are gone")
}

#[tokio::test]
async fn messages_cross_both_ways_over_mutual_tls() {
    let pki = Pki::new("test");
    let (srv, addr, mut srv_rx) = server(
        pki.setup("relay", &["127.0.0.1", "relay.test"], ClientAuth::Required),
        TransportConfig::default(),
    )
    .await;
    let (cli, mut cli_rx) =
        client(Some(pki.setup("agent", &["agent.test"], ClientAuth::None))).await;
    let to = Peer {
        transport: Transport::Tls,
        addr,
        conn: None,
    };
    cli.send(&to, options("a1")).await.unwrap();
    let (from, bytes) = next(&mut srv_rx).await;
    assert_eq!(from.transport, Transport::Tls);
    assert_eq!(bytes, options("a1"));
    let conn = from.conn.expect("a stream peer names its connection");
    // The server knows its client by its certificate, verified against its CA.
    let cert = srv
        .peer_certificate(conn)
        .expect("the client presented one");
    assert!(TlsSetup::certificate_names(&cert, "agent.test"));
    assert!(!TlsSetup::certificate_names(&cert, "relay.test"));
    // The reply goes back on the same connection.
    srv.send(&from, options("b1")).await.unwrap();
    let (back, bytes) = next(&mut cli_rx).await;
    assert_eq!(back.transport, Transport::Tls);
    assert_eq!(back.addr, addr);
    assert_eq!(bytes, options("b1"));
    assert!(cli.peer_certificate(back.conn.unwrap()).is_some());
    assert_eq!(
        srv.stats().tls_handshake_failures.load(Ordering::Relaxed),
        0
    );
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_or_none_is_refused_when_required() {
    let pki = Pki::new("good");
    let stranger = Pki::new("stranger");
    let (srv, addr, mut srv_rx) = server(
        pki.setup("relay", &["127.0.0.1"], ClientAuth::Required),
        TransportConfig::default(),
    )
    .await;
    // The stranger trusts the server's CA, but its own certificate is from another.
    let (certificate, key) = stranger.leaf("mallory", &["mallory.test"]);
    let mallory = TlsSetup::load(
        &TlsFiles {
            certificate: Some(certificate),
            key: Some(key),
            ca: Some(pki.ca()),
        },
        ClientAuth::None,
    )
    .unwrap();
    let anonymous = TlsSetup::load(
        &TlsFiles {
            ca: Some(pki.ca()),
            ..TlsFiles::default()
        },
        ClientAuth::None,
    )
    .unwrap();
    let to = Peer {
        transport: Transport::Tls,
        addr,
        conn: None,
    };
    for setup in [mallory, anonymous] {
        let (cli, _rx) = client(Some(setup)).await;
        // TLS 1.3 ends the client's handshake before the server has judged its certificate:
        // the send may seem to succeed, but nothing is delivered and the server counts it.
        let _ = cli.send(&to, options("m1")).await;
    }
    let failures = &srv.stats().tls_handshake_failures;
    tokio::time::timeout(WAIT, async {
        while failures.load(Ordering::Relaxed) < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the server did not refuse both handshakes");
    assert!(srv_rx.try_recv().is_err(), "nothing was delivered");
}

#[tokio::test]
async fn a_server_that_does_not_name_the_address_or_is_untrusted_is_refused() {
    let pki = Pki::new("good");
    let stranger = Pki::new("stranger");
    // A certificate for another address than the one connected to.
    let (_srv, addr, _rx) = server(
        pki.setup("relay", &["127.0.0.9", "relay.test"], ClientAuth::None),
        TransportConfig::default(),
    )
    .await;
    let (cli, _cli_rx) = client(Some(pki.setup("agent", &["agent.test"], ClientAuth::None))).await;
    let to = Peer {
        transport: Transport::Tls,
        addr,
        conn: None,
    };
    let e = cli.send(&to, options("n1")).await.unwrap_err();
    assert!(matches!(e, TransportError::Handshake { .. }), "{e}");
    // Told that the address stands for relay.test (a sips: URI's host), it accepts.
    cli.expect_name(addr, sip_core::tls::server_name("relay.test").unwrap());
    cli.send(&to, options("n2")).await.unwrap();
    // A server whose certificate is from a CA the client does not trust.
    let (_srv2, addr2, _rx2) = server(
        stranger.setup("fake", &["127.0.0.1"], ClientAuth::None),
        TransportConfig::default(),
    )
    .await;
    let e = cli
        .send(
            &Peer {
                transport: Transport::Tls,
                addr: addr2,
                conn: None,
            },
            options("n3"),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, TransportError::Handshake { .. }), "{e}");
    // A party with no TLS settings cannot send over TLS at all.
    let (plain, _) = client(None).await;
    let e = plain.send(&to, options("n4")).await.unwrap_err();
    assert!(
        matches!(e, TransportError::NoTransport(Transport::Tls)),
        "{e}"
    );
}

#[tokio::test]
async fn a_handshake_that_never_starts_is_closed_at_the_message_deadline() {
    let pki = Pki::new("test");
    let (srv, addr, _rx) = server(
        pki.setup("relay", &["127.0.0.1"], ClientAuth::None),
        TransportConfig {
            message_timeout: Duration::from_millis(300),
            max_connections_per_source: 1,
            ..TransportConfig::default()
        },
    )
    .await;
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    // A second connection from the same address is over the cap while the first holds its
    // place during its handshake.
    let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(WAIT, second.read(&mut buf))
        .await
        .expect("the second connection was not closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without a byte");
    assert_eq!(srv.stats().refused_per_source.load(Ordering::Relaxed), 1);
    let start = std::time::Instant::now();
    let n = tokio::time::timeout(WAIT, silent.read(&mut buf))
        .await
        .expect("the silent connection was not closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(
        srv.stats().tls_handshake_failures.load(Ordering::Relaxed),
        1
    );
    tokio::time::timeout(WAIT, async {
        while srv.accepted_connections() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the place under the cap was not given back");
}

#[tokio::test]
async fn a_tls_peer_never_gets_a_tcp_connection_to_the_same_address() {
    let pki = Pki::new("test");
    // One server listening for TCP on one port, TLS on another: a TCP connection to the TLS
    // port's address must not be reused for TLS, and a named TCP connection not taken for TLS.
    let (tx, mut srv_rx) = mpsc::unbounded_channel();
    let srv = Transports::bind(
        TransportConfig {
            tcp: vec!["127.0.0.1:0".parse().unwrap()],
            tls: vec!["127.0.0.1:0".parse().unwrap()],
            tls_setup: Some(pki.setup("relay", &["127.0.0.1"], ClientAuth::None)),
            ..TransportConfig::default()
        },
        Arc::new(Received(tx)),
    )
    .await
    .unwrap();
    let tcp = srv.local_addr(Transport::Tcp).unwrap();
    let tls = srv.local_addr(Transport::Tls).unwrap();
    assert_ne!(tcp, tls);
    assert_eq!(
        srv.transports(),
        vec![Transport::Tcp, Transport::Tls],
        "both listed"
    );
    let (cli, _rx) = client(Some(pki.setup("agent", &["agent.test"], ClientAuth::None))).await;
    cli.send(&Peer::tcp(tcp), options("t1")).await.unwrap();
    let (from_tcp, _) = next(&mut srv_rx).await;
    assert_eq!(from_tcp.transport, Transport::Tcp);
    // Connection numbers start at 1 on each side: the client's own TCP connection has the
    // number the server gave it, so naming it here is naming a TCP connection for TLS.
    cli.send(
        &Peer {
            transport: Transport::Tls,
            addr: tls,
            conn: from_tcp.conn,
        },
        options("t2"),
    )
    .await
    .unwrap();
    let (from_tls, _) = next(&mut srv_rx).await;
    assert_eq!(from_tls.transport, Transport::Tls);
    assert_eq!(from_tls.addr.ip(), from_tcp.addr.ip());
    assert_ne!(from_tls.conn, from_tcp.conn);
}
