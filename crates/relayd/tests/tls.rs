//! TLS everywhere (issue 14, findings 1 and 7), with the three programs as separate
//! processes on loopback and certificates made at test time (rcgen: a CA for the platform, a
//! second CA for a stranger):
//!
//! * `sip-client` → relayd → `appsrv-agent` over TLS end to end: the agent registers over
//!   mutual TLS (`sips:` Contact), the terminal calls `echo` with `--ca`, and its data —
//!   over TLS too (`TCP/TLS` in the SDP) — comes back whole;
//! * a third-party TLS peer (`openssl s_client`, Debian's `openssl`) sends OPTIONS to
//!   relayd's TLS port, verifying its certificate for 127.0.0.1, and gets `200`;
//! * a peer presenting a certificate from another CA is refused, by relayd (which verifies a
//!   certificate that is offered) and by the agent (which requires one); nothing SIP
//!   crosses;
//! * the agent refuses an inquiry that did not come over the relay's authenticated TLS:
//!   INVITEs over UDP and TCP, and over TLS with a certificate of the platform's own CA that
//!   does not name the relay, all get `403`.
//!
//! Every wait is bounded; every process is owned by a guard that kills it by its pid.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;
mod system_support;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use support::ports::free_port;
use support::process::Guard;
use support::relay::Relay;
use support::{read_text, wait_until, TestDir, ALICE, REALM, STEP};
use system_support::programs;

/// How long one exchange with a peer may take.
const WAIT: Duration = Duration::from_secs(15);

/// The platform's certificates in a directory: `ca.pem`, and a certificate and key per
/// party (`relay`, `as1`, `mallory` of the platform's CA naming only mallory.test,
/// `stranger` of another CA).
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        let ca = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, format!("{name} test CA"));
            let cert = params.self_signed(&key).unwrap();
            (cert, key)
        };
        let (ca_cert, ca_key) = ca("platform");
        let (other_cert, other_key) = ca("stranger");
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
        let leaf = |file: &str, names: &[&str], issuer: &rcgen::Certificate, issuer_key| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(
                names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            )
            .unwrap();
            params.extended_key_usages = vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = params.signed_by(&key, issuer, issuer_key).unwrap();
            std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.join(format!("{file}-key.pem")), key.serialize_pem()).unwrap();
        };
        leaf("relay", &["127.0.0.1", REALM], &ca_cert, &ca_key);
        leaf("as1", &["127.0.0.1", "as1.relay.test"], &ca_cert, &ca_key);
        leaf("mallory", &["mallory.test"], &ca_cert, &ca_key);
        leaf("stranger", &["127.0.0.1"], &other_cert, &other_key);
        Pki {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

/// relayd with TLS on its own port, and one agent (as1) registered over mutual TLS.
struct TlsSystem {
    dir: TestDir,
    pki: Pki,
    relay: Relay,
    tls_port: u16,
    metrics_port: u16,
    agent: Guard,
    agent_log: PathBuf,
    agent_sip_port: u16,
    agent_tls_port: u16,
}

impl TlsSystem {
    fn start() -> TlsSystem {
        programs();
        let dir = TestDir::new("relay-tls-");
        let pki = Pki::new(dir.path());
        let port = free_port();
        let tls_port = free_port();
        let metrics_port = free_port();
        let config = dir.path().join("relayd.toml");
        std::fs::write(
            &config,
            format!(
                "[listen]\nudp = \"127.0.0.1:{port}\"\ntcp = \"127.0.0.1:{port}\"\n\n\
                 [tls]\ncertificate = \"relay.pem\"\nkey = \"relay-key.pem\"\nca = \"ca.pem\"\n\
                 listen = [\"127.0.0.1:{tls_port}\"]\n\n\
                 [relay]\nrealm = \"{REALM}\"\n\n\
                 [storage]\ndata_dir = {data:?}\n\n\
                 [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n\
                 [registrar]\nallowed_contact_nets = [\"127.0.0.0/8\"]\n\n\
                 [directory]\nprobe_interval_secs = 3600\n\n\
                 [[services]]\nname = \"echo\"\nstrategy = \"first\"\n\n\
                 [[users]]\nname = \"{alice}\"\npassword = \"{alice_pw}\"\nplan = \"basic\"\n\
                 services = [\"echo\"]\n\n\
                 [[server_accounts]]\nname = \"as1\"\npassword = \"as1-secret\"\n\
                 services = [\"*\"]\n\n{tariff}",
                data = dir.path().join("relayd-data"),
                alice = ALICE.0,
                alice_pw = ALICE.1,
                tariff = system_support::TARIFF,
            ),
        )
        .unwrap();
        let relay = Relay::start_with(&config, port);

        let agent_sip_port = free_port();
        let agent_tls_port = free_port();
        let data_port = free_port();
        let agent_config = dir.path().join("as1.toml");
        std::fs::write(
            &agent_config,
            format!(
                "[relay]\nuri = \"sips:127.0.0.1:{tls_port}\"\ndomain = \"{REALM}\"\n\
                 account = \"as1\"\npassword = \"as1-secret\"\nexpires = 120\n\n\
                 [sip]\nlisten = \"127.0.0.1:{agent_sip_port}\"\n\n\
                 [tls]\ncertificate = \"as1.pem\"\nkey = \"as1-key.pem\"\nca = \"ca.pem\"\n\
                 listen = \"127.0.0.1:{agent_tls_port}\"\n\n\
                 [data]\nlisten = \"127.0.0.1:{data_port}\"\n\n\
                 [[services]]\nname = \"echo\"\nbackend = \"builtin:echo\"\n\n\
                 [billing]\nbytes_per_charge = 0\n\n[log]\nlevel = \"info,appsrv_agent=debug\"\n"
            ),
        )
        .unwrap();
        let agent_log = dir.path().join("as1.log");
        let mut cmd = Command::new(&programs().agent);
        cmd.arg("--config")
            .arg(&agent_config)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&agent_log).unwrap());
        let agent = Guard::spawn(cmd, "appsrv-agent as1");
        let mut system = TlsSystem {
            dir,
            pki,
            relay,
            tls_port,
            metrics_port,
            agent,
            agent_log,
            agent_sip_port,
            agent_tls_port,
        };
        let server = format!("sips:as1@127.0.0.1:{agent_tls_port}");
        let up = wait_until(STEP, || {
            if let Some(status) = system.agent.try_wait() {
                panic!("appsrv-agent exited ({status})\n{}", system.report());
            }
            system.metric_is(
                &format!("relayd_server_up{{service=\"echo\",server=\"{server}\"}}"),
                1,
            )
        });
        assert!(
            up,
            "the relay never listed {server} as up (registered over mutual TLS)\n{}",
            system.report()
        );
        system
    }

    fn metric_is(&self, name: &str, value: i64) -> bool {
        self.metric(name) == Some(value)
    }

    /// The value of one metric line, `None` when the relay does not answer or has no such
    /// line.
    fn metric(&self, name: &str) -> Option<i64> {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.metrics_port)) else {
            return None;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        if stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .is_err()
        {
            return None;
        }
        let mut text = String::new();
        let _ = stream.read_to_string(&mut text);
        text.lines().find_map(|l| {
            l.strip_prefix(name)
                .filter(|rest| rest.starts_with(' '))
                .and_then(|rest| rest.trim().parse::<i64>().ok())
        })
    }

    fn report(&self) -> String {
        format!(
            "--- relayd log ---\n{}\n--- as1 log ---\n{}",
            support::tail(&self.relay.log(), 60),
            support::tail(&read_text(&self.agent_log), 60)
        )
    }
}

/// The `openssl` program, or a failure naming the Debian package that has it.
fn openssl() -> &'static str {
    let ok = Command::new("openssl")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "this test needs the openssl program: install the Debian package `openssl` \
         (apt-get install openssl)"
    );
    "openssl"
}

/// What an `openssl s_client` session printed, and whether it was refused.
struct Exchange {
    stdout: String,
    stderr: String,
}

/// Connects with `openssl s_client` to 127.0.0.1:`port` verifying the server's certificate
/// against the platform CA for 127.0.0.1, presenting `client` (a certificate name of the
/// [`Pki`]) when given, sends `message` and collects what comes back until `until` shows
/// on stdout or the connection ends (bounded by [`WAIT`]).
fn s_client(pki: &Pki, port: u16, client: Option<&str>, message: &str, until: &str) -> Exchange {
    let dir = &pki.dir;
    let stderr_path = dir.join(format!("s_client-{port}-{}.err", client.unwrap_or("none")));
    let mut cmd = Command::new(openssl());
    cmd.args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-CAfile", &pki.path("ca.pem")])
        .args(["-verify_return_error", "-verify_ip", "127.0.0.1", "-quiet"]);
    if let Some(name) = client {
        cmd.args(["-cert", &pki.path(&format!("{name}.pem"))])
            .args(["-key", &pki.path(&format!("{name}-key.pem"))]);
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(File::create(&stderr_path).unwrap());
    let mut child = cmd.spawn().expect("cannot start openssl s_client");
    let stdout = child.stdout.take().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut guard = GuardChild(child);
    let (tx, rx) = mpsc::channel::<Option<String>>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            match line {
                Ok(l) => {
                    if tx.send(Some(l)).is_err() {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = tx.send(None);
    });
    // A refused handshake may close the pipe before the message is written.
    let _ = stdin.write_all(message.as_bytes());
    let _ = stdin.flush();
    let mut out = String::new();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(Some(line)) => {
                out.push_str(&line);
                out.push('\n');
                if line.contains(until) {
                    break;
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    drop(stdin);
    guard.kill();
    Exchange {
        stdout: out,
        stderr: read_text(&stderr_path),
    }
}

/// A child killed (by its own pid) and reaped when dropped.
struct GuardChild(std::process::Child);

impl GuardChild {
    fn kill(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

impl Drop for GuardChild {
    fn drop(&mut self) {
        self.kill();
    }
}

fn options(transport: &str) -> String {
    format!(
        "OPTIONS sip:{REALM} SIP/2.0\r\n\
         Via: SIP/2.0/{transport} 127.0.0.1:5999;branch=z9hG4bK{branch};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:probe@127.0.0.1>;tag=p1\r\n\
         To: <sip:{REALM}>\r\n\
         Call-ID: {branch}@tls-test\r\n\
         CSeq: 1 OPTIONS\r\n\
         Content-Length: 0\r\n\r\n",
        branch = support::unique("opt"),
    )
}

/// An inquiry as the relay would send it, from someone who is not the relay.
fn forged_invite(transport: &str, agent_port: u16) -> String {
    format!(
        "INVITE sips:echo@127.0.0.1:{agent_port} SIP/2.0\r\n\
         Via: SIP/2.0/{transport} 127.0.0.1:5999;branch=z9hG4bK{branch};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:alice@{REALM}>;tag=f1\r\n\
         To: <sip:echo@127.0.0.1:{agent_port}>\r\n\
         Call-ID: {branch}@forged\r\n\
         CSeq: 1 INVITE\r\n\
         Contact: <sip:mallory@127.0.0.1:5999>\r\n\
         P-Asserted-Identity: <sip:alice@{REALM}>\r\n\
         P-Asserted-Service: echo\r\n\
         Content-Length: 0\r\n\r\n",
        branch = support::unique("inv"),
    )
}

#[test]
fn a_call_and_its_data_cross_tls_end_to_end() {
    let system = TlsSystem::start();
    let dir = system.dir.path();
    std::fs::write(dir.join("sip-client.toml"), "").unwrap();
    let stdout = dir.join("alice.out");
    let stderr = dir.join("alice.err");
    let events = dir.join("alice.events");
    let mut cmd = Command::new(&programs().client);
    cmd.args(["-u", ALICE.0, "--domain", REALM])
        .args(["--relay", &format!("sips:127.0.0.1:{}", system.tls_port)])
        .args(["--ca", &system.pki.path("ca.pem")])
        .arg("--events-file")
        .arg(&events)
        .args(["call", "echo", "--wait-after-eof", "5s"])
        .env("SIP_CLIENT_PASSWORD", ALICE.1)
        .env("SIP_CLIENT_CONFIG", dir.join("sip-client.toml"))
        .env_remove("SIP_CLIENT_RELAY")
        .env_remove("SIP_CLIENT_CA")
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(File::create(&stdout).unwrap())
        .stderr(File::create(&stderr).unwrap());
    let mut client = Guard::spawn(cmd, "sip-client alice");
    let input = b"hello over TLS, both ways\nand a second line\n";
    {
        let mut stdin = client.take_stdin().unwrap();
        stdin.write_all(input).unwrap();
    }
    let status = client.wait_timeout(Duration::from_secs(60));
    let report = || {
        format!(
            "--- sip-client stderr ---\n{}\n--- events ---\n{}\n{}",
            read_text(&stderr),
            read_text(&events),
            system.report()
        )
    };
    assert!(
        status.is_some_and(|s| s.success()),
        "sip-client did not finish well ({status:?})\n{}",
        report()
    );
    assert_eq!(
        read_text(&stdout).as_bytes(),
        input,
        "the echo did not come back whole\n{}",
        report()
    );
    // The data connection was TLS: the agent's answer said so, and the terminal used it.
    let events_text = read_text(&events);
    assert!(events_text.contains("data-connected"), "{}", report());
    // The relay reached the agent over TLS with a sips: Request-URI, and knew the terminal's
    // leg as TLS.
    let agent_log = read_text(&system.agent_log);
    assert!(!agent_log.contains("refused"), "{}", report());
}

#[test]
fn openssl_s_client_gets_200_to_options_over_tls() {
    let system = TlsSystem::start();
    let got = s_client(
        &system.pki,
        system.tls_port,
        None,
        &options("TLS"),
        "SIP/2.0 200",
    );
    assert!(
        got.stdout.contains("SIP/2.0 200"),
        "no 200 to OPTIONS over TLS\nstdout:\n{}\nstderr:\n{}\n{}",
        got.stdout,
        got.stderr,
        system.report()
    );
}

#[test]
fn an_untrusted_client_certificate_is_refused() {
    let system = TlsSystem::start();
    // The relay verifies a certificate that is offered: one of another CA ends the handshake.
    let relay = s_client(
        &system.pki,
        system.tls_port,
        Some("stranger"),
        &options("TLS"),
        "SIP/2.0",
    );
    assert!(
        !relay.stdout.contains("SIP/2.0"),
        "relayd answered a peer with an untrusted certificate\n{}\n{}",
        relay.stdout,
        system.report()
    );
    let counted = wait_until(WAIT, || {
        system
            .metric("relayd_tls_handshake_failures_total")
            .is_some_and(|n| n >= 1)
    });
    assert!(
        counted,
        "the refused handshake was not counted\n{}",
        system.report()
    );
    // The agent requires one chained to its CA: a stranger's, or none, is refused.
    for client in [Some("stranger"), None] {
        let agent = s_client(
            &system.pki,
            system.agent_tls_port,
            client,
            &forged_invite("TLS", system.agent_tls_port),
            "SIP/2.0",
        );
        assert!(
            !agent.stdout.contains("SIP/2.0"),
            "the agent answered a peer with {client:?}\n{}\n{}",
            agent.stdout,
            system.report()
        );
    }
    // Still up for the relay's own traffic.
    let ok = s_client(
        &system.pki,
        system.tls_port,
        None,
        &options("TLS"),
        "SIP/2.0 200",
    );
    assert!(ok.stdout.contains("SIP/2.0 200"), "{}", system.report());
}

#[test]
fn the_agent_refuses_inquiries_not_over_the_relays_tls() {
    let system = TlsSystem::start();
    // UDP, from the relay's own address (loopback): refused, however it looks.
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(WAIT)).unwrap();
    udp.send_to(
        forged_invite("UDP", system.agent_sip_port).as_bytes(),
        ("127.0.0.1", system.agent_sip_port),
    )
    .unwrap();
    let mut buf = [0u8; 4096];
    let n = loop {
        let (n, _) = udp.recv_from(&mut buf).expect("no answer over UDP");
        // Skip a 100 Trying, if any.
        if !buf[..n].starts_with(b"SIP/2.0 100") {
            break n;
        }
    };
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(
        text.starts_with("SIP/2.0 403"),
        "UDP: {text}\n{}",
        system.report()
    );
    // TCP: refused too.
    let mut tcp = TcpStream::connect(("127.0.0.1", system.agent_sip_port)).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    tcp.write_all(forged_invite("TCP", system.agent_sip_port).as_bytes())
        .unwrap();
    let mut got = Vec::new();
    let ok = wait_until(WAIT, || {
        let mut chunk = [0u8; 4096];
        match tcp.read(&mut chunk) {
            Ok(0) | Err(_) => true,
            Ok(n) => {
                got.extend_from_slice(&chunk[..n]);
                String::from_utf8_lossy(&got).contains("SIP/2.0 403")
            }
        }
    });
    let text = String::from_utf8_lossy(&got).to_string();
    assert!(
        ok && text.contains("SIP/2.0 403"),
        "TCP: {text}\n{}",
        system.report()
    );
    // TLS with a certificate of the platform's own CA that does not name the relay (another
    // application server's, say): the handshake passes, the inquiry does not.
    let mallory = s_client(
        &system.pki,
        system.agent_tls_port,
        Some("mallory"),
        &forged_invite("TLS", system.agent_tls_port),
        "SIP/2.0 403",
    );
    assert!(
        mallory.stdout.contains("SIP/2.0 403"),
        "TLS from a certificate not naming the relay\nstdout:\n{}\nstderr:\n{}\n{}",
        mallory.stdout,
        mallory.stderr,
        system.report()
    );
    assert!(
        !mallory.stdout.contains("SIP/2.0 200"),
        "{}",
        system.report()
    );
}
