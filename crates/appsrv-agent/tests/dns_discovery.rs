//! Discovery of the relay by DNS (RFC 3263 §4), across processes: a DNS server on loopback
//! (Debian's `dnsmasq`, started by the test and killed by its pid) holds NAPTR and SRV
//! records for `relay.test` naming two relays on 127.0.0.1: the first by priority is down
//! (nothing listens on its port), the second is the test's relayd. The agent (over TCP: its
//! connection to the dead relay is refused) and the terminal (over UDP: its REGISTER to the
//! dead relay times out) both move on to the live relay (RFC 3263 §4.3); the agent
//! registers there and the terminal registers and calls through it. No query leaves the
//! loopback server: it answers `relay.test` from its own records and nothing else
//! (`--no-resolv`, `--local=/test/`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod relay_system;

use std::io::Write as _;
use std::path::Path;
use std::process::Command;

use relay_system::{free_port, read_text, wait_until, Guard, World, REALM, STEP};

/// Where Debian's `dnsmasq` package puts its program.
const DNSMASQ: &str = "/usr/sbin/dnsmasq";

/// Starts dnsmasq on 127.0.0.1:`port` answering only from `records` (its command-line
/// record options), its log in `dir/dnsmasq.log`; returns once it answers on its port.
fn start_dnsmasq(dir: &Path, port: u16, records: &[String]) -> Guard {
    assert!(
        Path::new(DNSMASQ).exists(),
        "this test needs dnsmasq ({DNSMASQ}): install Debian's `dnsmasq` package \
         (apt-get install dnsmasq)"
    );
    let log = dir.join("dnsmasq.log");
    let mut cmd = Command::new(DNSMASQ);
    cmd.args([
        "--no-daemon",
        "--conf-file=/dev/null",
        "--pid-file=",
        "--user=root",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--listen-address=127.0.0.1",
        "--local=/test/",
        "--log-queries",
    ])
    .arg(format!("--log-facility={}", log.display()))
    .arg(format!("--port={port}"))
    .args(records)
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null())
    .stderr(std::fs::File::create(dir.join("dnsmasq.err")).unwrap());
    let mut guard = Guard::spawn(cmd, "dnsmasq");
    let up = wait_until(STEP, || {
        if let Some(status) = guard.try_wait() {
            panic!(
                "dnsmasq exited at start ({status}): {}",
                read_text(&dir.join("dnsmasq.err"))
            );
        }
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(up, "dnsmasq never listened on 127.0.0.1:{port}");
    guard
}

#[test]
fn the_agent_and_the_terminal_find_the_live_relay_by_srv_past_a_dead_one() {
    let mut world = World::start(&["echo"]);
    let live = world.port;
    // Nothing listens there, over UDP or TCP.
    let dead = free_port();
    let dns_port = free_port();
    let mut records = vec![
        "--host-record=dead.relay.test,127.0.0.1".to_string(),
        "--host-record=live.relay.test,127.0.0.1".to_string(),
        "--naptr-record=relay.test,10,10,S,SIP+D2U,,_sip._udp.relay.test".to_string(),
    ];
    for proto in ["udp", "tcp"] {
        // The dead relay first by priority, whatever the weights (RFC 2782).
        records.push(format!(
            "--srv-host=_sip._{proto}.relay.test,dead.relay.test,{dead},10,0"
        ));
        records.push(format!(
            "--srv-host=_sip._{proto}.relay.test,live.relay.test,{live},20,100"
        ));
    }
    let dns = start_dnsmasq(world.dir(), dns_port, &records);
    world.add_log("dnsmasq", world.dir().join("dnsmasq.log"));
    let dns_addr = format!("127.0.0.1:{dns_port}");

    // The agent: relay.test over TCP, by the loopback DNS server.
    let sip_port = free_port();
    let data_port = free_port();
    let toml = world
        .agent_toml(
            sip_port,
            data_port,
            "[[services]]\nname = \"echo\"\nbackend = \"builtin:echo\"\n",
            "",
        )
        .replace(
            &format!("uri = \"{}\"", world.relay_uri()),
            &format!("uri = \"sip:{REALM};transport=tcp\"\ndns = \"{dns_addr}\""),
        );
    assert!(toml.contains("dns = "), "{toml}");
    let config = world.dir().join("agent.toml");
    std::fs::write(&config, toml).unwrap();
    let mut cmd = Command::new(&relay_system::programs().agent);
    cmd.arg("--config").arg(&config).env("NO_COLOR", "1");
    cmd.env_remove("RUST_LOG");
    world.spawn("agent", cmd, false);
    // Registered over TCP: its Contact says so.
    world.wait_server_up(
        "echo",
        &format!("sip:as1@127.0.0.1:{sip_port};transport=tcp"),
    );
    let agent_log = read_text(&world.dir().join("agent.err"));
    assert!(
        agent_log.contains("trying the next target"),
        "the agent did not try the dead relay first\n{}",
        world.report()
    );

    // The terminal: relay.test (NAPTR → SIP+D2U → SRV) over UDP; T1 of 100 ms so that the
    // REGISTER to the dead relay times out (Timer F, 64·T1) in 6.4 s.
    let empty = world.dir().join("sip-client.toml");
    std::fs::write(&empty, "").unwrap();
    let events = world.dir().join("alice.events");
    world.add_log("alice events", events.clone());
    let mut cmd = Command::new(&relay_system::programs().client);
    cmd.args(["-u", "alice", "--relay", &format!("sip:{REALM}"), "--dns"])
        .arg(&dns_addr)
        .args(["--domain", REALM])
        .arg("--events-file")
        .arg(&events)
        .args(["call", "echo", "--wait-after-eof", "5s"])
        .env("SIP_CLIENT_PASSWORD", "alice-secret")
        .env("SIP_CLIENT_CONFIG", &empty)
        .env("SIP_CLIENT_TIMER_T1_MS", "100")
        .env_remove("SIP_CLIENT_USER")
        .env_remove("SIP_CLIENT_RELAY")
        .env_remove("SIP_CLIENT_DOMAIN")
        .env("RUST_LOG", "sip_client=info")
        .env("NO_COLOR", "1");
    let client = world.spawn("alice", cmd, true);
    let mut stdin = world.proc(client).take_stdin().unwrap();
    stdin.write_all(b"hello through the live relay\n").unwrap();
    world.wait_client_event("alice", "registered", |_| true);
    world.wait_client_event("alice", "established", |_| true);
    let echoed = wait_until(STEP, || {
        world
            .stdout_of("alice")
            .contains("hello through the live relay\n")
    });
    assert!(echoed, "no echo through the live relay\n{}", world.report());
    drop(stdin);
    let status = world.wait_exit(client);
    assert!(status.success(), "sip-client: {status}\n{}", world.report());
    let client_log = read_text(&world.dir().join("alice.err"));
    assert!(
        client_log.contains("trying the next target"),
        "the terminal did not try the dead relay first\n{}",
        world.report()
    );
    // The session went through the live relay and was billed there.
    world.wait_records("sessions", 1, |r| r["service"] == "echo");
    // The DNS server was asked for SRV records: discovery, not a fixed address.
    let dns_log = read_text(&world.dir().join("dnsmasq.log"));
    assert!(
        dns_log.contains("_sip._udp.relay.test") && dns_log.contains("_sip._tcp.relay.test"),
        "no SRV query reached the loopback DNS server\n{dns_log}"
    );
    drop(dns);
}
