//! The whole service delivery system end to end (claim 10; issue 8): `relayd`,
//! `appsrv-agent` and `sip-client` run as separate processes on loopback, and every claim is
//! checked as a user of the three programs sees it — what the terminal prints, its events
//! and exit status — and as the operator sees it: the records of `relayd billing export`
//! after each scenario. Each scenario runs over UDP and over TCP (every SIP hop: terminal
//! to relay and agents to relay).
//!
//! sipp (Debian's `sip-tester`) then stands in for the terminal (sipp → relayd → a real
//! appsrv-agent) and for the application server (sip-client → relayd → sipp), so each of our
//! programs is also checked against a peer we did not write. Last, bad input at the edges:
//! a malformed request, a bad configuration for each program, a wrong password.
//!
//! The harness (`system_support`) explains where the binaries come from and how every wait
//! is bounded; a failing test prints the logs of every process and keeps its directory.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;
mod system_support;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};

use serde_json::Value;
use support::ports::free_port;
use support::sipp::{Sipp, SippOpts, Transport};
use support::{wait_until, ALICE, BOB, REALM as DOMAIN, STEP};
use system_support::{
    evidence, int, open_data, programs, read_exactly, tariff_charge, text, EchoGateway, Finished,
    StaticServer, System, BYTES_PER_CHARGE, PRICE_PER_UNIT,
};

/// The checks every session record must pass: who, what, and a charge that is the tariff's
/// for the record's own duration.
fn check_record(record: &Value, subscriber: &str, service: &str) {
    assert_eq!(text(record, "subscriber"), subscriber, "{record:#}");
    assert_eq!(text(record, "service"), service, "{record:#}");
    assert!(!text(record, "session_id").is_empty(), "{record:#}");
    let duration = int(record, "duration_ms");
    assert!(duration >= 0, "{record:#}");
    assert_eq!(
        int(record, "ended_at_ms") - int(record, "confirmed_at_ms"),
        duration,
        "duration is the time from confirmation to the end: {record:#}"
    );
    assert_eq!(
        int(&record["charge"], "minor"),
        tariff_charge(duration),
        "the charge follows the tariff (setup 10, 60/min in 60/60 steps): {record:#}"
    );
    assert_eq!(text(&record["charge"], "currency"), "EUR", "{record:#}");
}

/// The data endpoints a client's sessions connected to, in order.
fn data_endpoints(run: &Finished) -> Vec<String> {
    run.events_named("data-connected")
        .iter()
        .map(|e| text(e, "addr").to_string())
        .collect()
}

// ---------------------------------------------------------------------------------------
// The three programs together.

/// Claims 1 and 3: a terminal registers, requests the echo service, exchanges data with the
/// application server directly, hangs up; the relay bills the session by its duration.
fn register_call_echo_and_hang_up(transport: Transport) {
    let system = System::start(transport, 1);

    let registered = system
        .client("register", ALICE)
        .args(["register", "--once"])
        .run(b"");
    registered.assert_code(0, &system);
    let reg = registered.events_named("registered");
    assert_eq!(reg.len(), 1, "{registered:#?}");
    assert_eq!(text(reg[0], "aor"), format!("sip:alice@{DOMAIN}"));
    assert_eq!(int(reg[0], "status"), 200);

    let input = b"hello through the service relay\nsecond line\n";
    let call = system
        .client("echo", ALICE)
        .args(["call", "echo", "--wait-after-eof", "5s"])
        .run(input);
    call.assert_code(0, &system);
    assert_eq!(
        String::from_utf8_lossy(&call.stdout),
        String::from_utf8_lossy(input),
        "the echo server's answer is the input"
    );
    let agent = &system.agents[0];
    assert_eq!(
        data_endpoints(&call),
        [agent.data_addr()],
        "the data went straight to the agent's gateway, not through the relay"
    );
    let established = call.events_named("established");
    assert_eq!(established.len(), 1, "{call:#?}");
    assert_eq!(text(established[0], "service"), "echo");
    assert_eq!(call.events_named("ended").len(), 1, "{call:#?}");

    let records = system.wait_sessions(&call.call_id(), 1);
    assert_eq!(records.len(), 1, "{records:#?}");
    let record = &records[0];
    check_record(record, "alice", "echo");
    assert_eq!(text(record, "server"), agent.uri());
    assert_eq!(text(record, "plan"), "basic");
    assert_eq!(text(record, "tariff"), "system");
    assert!(
        ["caller-bye", "server-bye"].contains(&text(record, "cause")),
        "ended by a BYE from one side: {record:#}"
    );

    // The same record in the CSV export, and in the report an operator reads.
    let csv = system.export_text("csv", "sessions");
    let mut lines = csv.lines();
    let header = lines.next().unwrap_or_default();
    assert!(
        header.contains("session_id") && header.contains("subscriber"),
        "{csv}"
    );
    let rows: Vec<&str> = lines.filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(rows.len(), 1, "{csv}");
    assert!(rows[0].contains(text(record, "session_id")), "{csv}");
    let report = system
        .relayd_cmd()
        .args(["billing", "report", "--by", "subscriber"])
        .output()
        .unwrap();
    assert!(report.status.success(), "{report:?}");
    let report = String::from_utf8_lossy(&report.stdout);
    assert!(
        report.lines().any(|l| l.starts_with("alice")),
        "the report has a line for alice:\n{report}"
    );
}

#[test]
fn register_call_echo_and_hang_up_over_udp() {
    register_call_echo_and_hang_up(Transport::Udp);
}

#[test]
fn register_call_echo_and_hang_up_over_tcp() {
    register_call_echo_and_hang_up(Transport::Tcp);
}

/// Claims 5, 6 and 3: a live echo session is changed to clock (re-INVITE with
/// P-Preferred-Service), transferred to the other server (REFER), and hung up with SIGTERM
/// (as Ctrl-C); the bill splits into one record per service and server, back to back.
fn change_then_transfer_then_hang_up(transport: Transport) {
    let system = System::start(transport, 2);
    let mut client = system
        .client("live", ALICE)
        .args([
            "call",
            "echo",
            "--then",
            "after 200ms change clock; after 200ms transfer clock",
        ])
        .spawn();
    // stdin stays open: the session lives until the terminal hangs up.
    client.write(b"before the change\n");
    let changed = client.wait_event("changed", |_| true);
    assert_eq!(int(&changed, "status"), 200, "change refused: {changed:#}");
    assert_eq!(text(&changed, "service"), "clock");
    let transferred = client.wait_event("transferred", |_| true);
    assert_eq!(
        int(&transferred, "status"),
        200,
        "transfer failed: {transferred:#}"
    );
    // The data connection moves to the new server: a third data-connected event.
    wait_until(STEP, || {
        client
            .events()
            .iter()
            .filter(|e| text(e, "event") == "data-connected")
            .count()
            >= 3
    });
    client.hang_up();
    let run = client.finish();
    run.assert_code(0, &system);
    let progress: Vec<i64> = run
        .events_named("transfer-progress")
        .iter()
        .map(|e| int(e, "status"))
        .collect();
    // The REFER's 202 and the NOTIFYs may cross on the wire (RFC 6665 §4.1.2.4); the
    // NOTIFYs' sipfrags come in order.
    let mut sorted = progress.clone();
    sorted.sort_unstable();
    let at = |status: i64| progress.iter().position(|&s| s == status);
    assert!(
        sorted == [100, 200, 202] && at(100) < at(200),
        "REFER accepted (202), NOTIFY sipfrags 100 then 200: {progress:?}"
    );
    let ended = run.events_named("ended");
    assert_eq!(ended.len(), 1, "{run:#?}");
    assert_eq!(
        text(ended[0], "by"),
        "local",
        "the terminal hung up: {run:#?}"
    );
    assert_eq!(int(ended[0], "status"), 200, "its BYE was answered 200");
    assert!(
        String::from_utf8_lossy(&run.stdout).starts_with("before the change\n"),
        "echo answered before the change: {:?}",
        String::from_utf8_lossy(&run.stdout)
    );

    let endpoints = data_endpoints(&run);
    assert_eq!(
        endpoints.len(),
        3,
        "echo, clock, clock after the transfer: {endpoints:?}"
    );
    let clock_before = system.agent_by_data(&endpoints[1]).unwrap().uri();
    let clock_after = system.agent_by_data(&endpoints[2]).unwrap().uri();
    assert_ne!(
        clock_before, clock_after,
        "the transfer moved the session to the other server"
    );

    let records = system.wait_sessions(&run.call_id(), 3);
    let summary: Vec<(&str, &str, &str)> = records
        .iter()
        .map(|r| (text(r, "service"), text(r, "server"), text(r, "cause")))
        .collect();
    let echo_server = system.agent_by_data(&endpoints[0]).unwrap().uri();
    assert_eq!(
        summary,
        [
            ("echo", echo_server.as_str(), "changed"),
            ("clock", clock_before.as_str(), "transferred"),
            ("clock", clock_after.as_str(), "caller-bye"),
        ],
        "one record per service and server: {records:#?}"
    );
    let ids: HashSet<&str> = records.iter().map(|r| text(r, "session_id")).collect();
    assert_eq!(ids.len(), 3, "each segment has its own session id");
    for pair in records.windows(2) {
        assert_eq!(
            int(&pair[1], "confirmed_at_ms"),
            int(&pair[0], "ended_at_ms"),
            "each segment starts where the previous ended: {records:#?}"
        );
    }
    for (record, service) in records.iter().zip(["echo", "clock", "clock"]) {
        check_record(record, "alice", service);
    }
}

#[test]
fn change_then_transfer_then_hang_up_over_udp() {
    change_then_transfer_then_hang_up(Transport::Udp);
}

#[test]
fn change_then_transfer_then_hang_up_over_tcp() {
    change_then_transfer_then_hang_up(Transport::Tcp);
}

/// Claim 4: the agent charges per block of bytes it delivers; the relay commits one charge
/// record per charge request, tied to the session, with the agent's price.
fn application_charge(transport: Transport) {
    let system = System::start(transport, 1);
    let mut client = system
        .client("bulk", ALICE)
        .args(["call", "echo", "--wait-after-eof", "5s"])
        .spawn();
    client.wait_event("data-connected", |_| true);
    // Send once the relay counts the session (see the test with sipp below for what
    // happens to a charge that comes before).
    assert!(
        wait_until(STEP, || system.metric("relayd_sessions_live") == Some(1)),
        "the relay never counted the session\n{}",
        system.report()
    );
    let blocks = 4u64;
    let input: Vec<u8> = (0..BYTES_PER_CHARGE * blocks)
        .map(|i| b'a' + (i % 26) as u8)
        .collect();
    client.write(&input);
    let units = |charges: &[Value]| {
        charges
            .iter()
            .map(|c| int(&c["units"], "units"))
            .sum::<i64>()
    };
    let mut charges = Vec::new();
    let charged = wait_until(STEP, || {
        charges = system.charges();
        units(&charges) >= blocks as i64
    });
    assert!(
        charged,
        "expected {blocks} units charged, got {charges:#?}\n{}",
        system.report()
    );
    client.close_stdin();
    let run = client.finish();
    run.assert_code(0, &system);
    assert_eq!(run.stdout, input, "every byte came back");

    let records = system.wait_sessions(&run.call_id(), 1);
    let session_id = text(&records[0], "session_id");
    check_record(&records[0], "alice", "echo");
    let charges = system.charges();
    assert_eq!(units(&charges), blocks as i64, "{charges:#?}");
    let events: HashSet<&str> = charges.iter().map(|c| text(c, "event_id")).collect();
    assert_eq!(
        events.len(),
        charges.len(),
        "each charge has its own event id"
    );
    let agent = &system.agents[0];
    for charge in &charges {
        assert_eq!(
            text(charge, "session_id"),
            session_id,
            "the charge names the session: {charge:#}"
        );
        assert_eq!(text(charge, "subscriber"), "alice", "{charge:#}");
        assert_eq!(text(charge, "service"), "echo", "{charge:#}");
        assert!(
            text(charge, "server").contains(&agent.uri()),
            "the charge names the server that asked: {charge:#}"
        );
        assert!(text(charge, "event_id").starts_with("as1-"), "{charge:#}");
        assert_eq!(
            int(&charge["amount"], "minor"),
            int(&charge["units"], "units") * PRICE_PER_UNIT,
            "amount = units x the agent's price: {charge:#}"
        );
        assert_eq!(text(&charge["amount"], "currency"), "EUR");
    }
}

#[test]
fn application_charge_over_udp() {
    application_charge(Transport::Udp);
}

#[test]
fn application_charge_over_tcp() {
    application_charge(Transport::Tcp);
}

/// Claim 7: one request for a service with strategy "all" gives one session per server,
/// each with its own To tag, its own data connection and its own billing record.
fn forked_request_gives_two_sessions(transport: Transport) {
    let system = System::start(transport, 2);
    let run = system
        .client("fork", BOB)
        .args(["call", "echo-all", "--label", "--then", "sessions 2"])
        .run(b"hello, both of you\n");
    run.assert_code(0, &system);
    let established = run.events_named("established");
    assert_eq!(established.len(), 2, "two sessions: {run:#?}");
    let tags: HashSet<&str> = established.iter().map(|e| text(e, "remote_tag")).collect();
    assert_eq!(
        tags.len(),
        2,
        "each 2xx has its own To tag: {established:#?}"
    );
    let call_id = text(established[0], "call_id").to_string();
    assert_eq!(text(established[1], "call_id"), call_id, "one request");
    let mut endpoints = data_endpoints(&run);
    endpoints.sort();
    let mut expected: Vec<String> = system.agents.iter().map(|a| a.data_addr()).collect();
    expected.sort();
    assert_eq!(endpoints, expected, "one data connection to each server");
    let output = String::from_utf8_lossy(&run.stdout);
    let mut lines: Vec<&str> = output.lines().collect();
    lines.sort_unstable();
    assert_eq!(
        lines,
        ["[1] hello, both of you", "[2] hello, both of you"],
        "each session echoed the input, labelled"
    );

    let records = system.wait_sessions(&call_id, 2);
    assert_eq!(records.len(), 2, "{records:#?}");
    let servers: HashSet<&str> = records.iter().map(|r| text(r, "server")).collect();
    let expected: HashSet<String> = system.agents.iter().map(|a| a.uri()).collect();
    assert_eq!(
        servers,
        expected.iter().map(String::as_str).collect(),
        "{records:#?}"
    );
    let ids: HashSet<&str> = records.iter().map(|r| text(r, "session_id")).collect();
    assert_eq!(ids.len(), 2, "two sessions billed apart: {records:#?}");
    for record in &records {
        check_record(record, "bob", "echo-all");
        assert_eq!(text(record, "plan"), "premium");
    }
}

#[test]
fn forked_request_gives_two_sessions_over_udp() {
    forked_request_gives_two_sessions(Transport::Udp);
}

#[test]
fn forked_request_gives_two_sessions_over_tcp() {
    forked_request_gives_two_sessions(Transport::Tcp);
}

// ---------------------------------------------------------------------------------------
// sipp in place of the terminal, then of the application server.

/// Parses sipp's `ANSWERED ip=… port=… token=…` line.
fn answered(line: &str) -> (SocketAddr, String) {
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in `{line}`"))
            .to_string()
    };
    let addr = format!("{}:{}", field("ip="), field("port="))
        .parse()
        .unwrap_or_else(|e| panic!("data endpoint in `{line}`: {e}"));
    (addr, field("token="))
}

/// Starts sipp as alice's terminal (`system_terminal.xml`) calling echo over the system's
/// transport, holding its ACK back `ack_delay_ms` after the 2xx.
fn sipp_terminal(system: &System, name: &str, ack_delay_ms: u64) -> Sipp {
    let opts = SippOpts::default()
        .timeout(2 * STEP)
        .args(&["-d", &ack_delay_ms.to_string()]);
    system.sipp_terminal(name, "system_terminal.xml", ALICE, "echo", opts)
}

/// A terminal we did not write (sipp) calls echo through relayd and a real appsrv-agent;
/// the test opens the data connection the answer names, with its token, and closes it; the
/// agent hangs up and the relay relays its BYE to sipp.
fn sipp_terminal_to_agent(transport: Transport) {
    let system = System::start(transport, 1);
    let mut sipp = sipp_terminal(&system, "terminal", 0);
    let line = system.wait_log(&mut sipp, "ANSWERED");
    let (addr, token) = answered(&line);
    assert_eq!(addr.to_string(), system.agents[0].data_addr(), "{line}");
    // The data round trip below ends with the agent's BYE: wait until sipp has sent its
    // ACK, or that BYE may reach sipp before the ACK step of its scenario (a BYE sipp's
    // scenario does not expect yet). Data before the ACK has a test of its own below.
    system.wait_log(&mut sipp, "ACKED");
    let mut data = open_data(addr, &token);
    data.write_all(b"ping from sipp's side\n").unwrap();
    assert_eq!(read_exactly(&mut data, 22), b"ping from sipp's side\n");
    data.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = data.read_to_end(&mut rest);
    system.assert_success(&mut sipp);
    assert!(
        sipp.log().contains(&"BYE".to_string()),
        "the agent's BYE reached sipp"
    );

    // The token was for one use only.
    let mut again = TcpStream::connect(addr).unwrap();
    again.set_read_timeout(Some(STEP)).unwrap();
    again.write_all(format!("{token}\n").as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = again.read_to_string(&mut answer);
    assert!(
        answer.starts_with("ERR"),
        "a used token is refused: {answer:?}"
    );

    let records: Vec<Value> = system
        .sessions()
        .into_iter()
        .filter(|r| text(r, "subscriber") == "alice")
        .collect();
    assert_eq!(records.len(), 1, "{records:#?}\n{}", system.report());
    check_record(&records[0], "alice", "echo");
    assert_eq!(text(&records[0], "server"), system.agents[0].uri());
    assert_eq!(text(&records[0], "cause"), "server-bye", "{records:#?}");
}

#[test]
fn sipp_terminal_to_agent_over_udp() {
    sipp_terminal_to_agent(Transport::Udp);
}

#[test]
fn sipp_terminal_to_agent_over_tcp() {
    sipp_terminal_to_agent(Transport::Tcp);
}

/// A terminal may use its data connection as soon as the server's answer reaches it (the
/// token is valid from the 200 OK; docs/protocol.md), before its ACK confirms the session at
/// the relay. Data delivered then is charged by the agent at once; the charge must still be
/// recorded, against that session. sipp holds its ACK back (over TCP, so the relay does not
/// retransmit its 200) while the test moves two blocks of data.
#[test]
fn data_before_the_ack_is_still_charged_to_its_session() {
    let system = System::start(Transport::Tcp, 1);
    let mut sipp = sipp_terminal(&system, "terminal", 4000);
    let line = system.wait_log(&mut sipp, "ANSWERED");
    let (addr, token) = answered(&line);
    let mut data = open_data(addr, &token);
    let input = vec![b'x'; 2 * BYTES_PER_CHARGE as usize];
    data.write_all(&input).unwrap();
    assert_eq!(read_exactly(&mut data, input.len()), input);
    // The agent has charged: wait until the relay either recorded it or refused it for good.
    let agent = &system.agents[0];
    let answered_charge = wait_until(STEP, || {
        !system.charges().is_empty() || agent.log_text().contains("relay refused the charge")
    });
    assert!(
        answered_charge,
        "the charge got no answer\n{}",
        system.report()
    );
    let acked_before = sipp.log().contains(&"ACKED".to_string());
    data.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = data.read_to_end(&mut rest);
    system.assert_success(&mut sipp);
    assert!(
        !acked_before,
        "the test meant to charge before the ACK but sipp had ACKed already (slow machine?)"
    );

    let records = system.sessions();
    assert_eq!(records.len(), 1, "{records:#?}");
    let charges = system.charges();
    assert_eq!(
        charges.len(),
        1,
        "the charge for the data delivered before the ACK was not recorded (relayd answered \
         the agent 403: the session is not yet in its index of served sessions)\n{}",
        system.report()
    );
    assert_eq!(int(&charges[0]["units"], "units"), 2, "{charges:#?}");
    assert_eq!(
        text(&charges[0], "session_id"),
        text(&records[0], "session_id"),
        "{charges:#?}"
    );
}

/// Our terminal (sip-client) calls through relayd a server we did not write (sipp), whose
/// answer names a data endpoint the test runs: the inquiry carries the relay's assertions,
/// the data reaches the endpoint with the token, and the session is billed to sipp's URI.
fn client_to_sipp_server(transport: Transport) {
    let token = "tok-sipp-server-1";
    let gateway = EchoGateway::start(token);
    let sipp_port = free_port();
    let server = StaticServer {
        port: sipp_port,
        transport,
        services: vec!["echo".into()],
    };
    let uri = server.uri();
    let system = System::start_with(transport, 0, &[server]);
    // No -m: the relay's OPTIONS probes, answered by -aa, would count as calls.
    let data_port = gateway.port.to_string();
    let opts = SippOpts::keys(&[("data_port", &data_port), ("token", token)])
        .port(sipp_port)
        .timeout(2 * STEP)
        .args(&["-aa"]);
    let mut sipp = system.sipp_server("server", "system_server.xml", opts);
    // sipp is ready once its port is taken (asking it anything would start a call).
    let listening = wait_until(STEP, || match transport {
        Transport::Tcp => std::net::TcpListener::bind(("127.0.0.1", sipp_port)).is_err(),
        Transport::Udp => UdpSocket::bind(("127.0.0.1", sipp_port)).is_err(),
    });
    assert!(listening, "sipp server never listened\n{}", evidence(&sipp));

    let input = b"to a server we did not write\n";
    let run = system
        .client("echo", ALICE)
        .args(["call", "echo", "--wait-after-eof", "5s"])
        .run(input);
    run.assert_code(0, &system);
    assert_eq!(run.stdout, input, "the gateway echoed the data");
    system.wait_log(&mut sipp, "BYE");
    assert!(
        !sipp.exited(),
        "sipp failed its scenario\n{}",
        evidence(&sipp)
    );
    let seen = gateway.finish();
    assert_eq!(
        seen,
        [format!("token {token}"), format!("echoed {}", input.len())],
        "the terminal presented the token the server's SDP named"
    );
    let invite = sipp
        .log()
        .into_iter()
        .find(|l| l.starts_with("INVITE "))
        .unwrap();
    assert!(
        invite.contains("service=echo")
            && invite.contains(&format!("identity=<sip:alice@{DOMAIN}>")),
        "the relay asserted service and subscriber: {invite}"
    );
    assert!(
        invite.contains(&format!("ruri=sip:echo@127.0.0.1:{sipp_port}")),
        "the inquiry's Request-URI names the service at the server: {invite}"
    );
    let steps: Vec<String> = sipp
        .log()
        .into_iter()
        .map(|l| l.split_whitespace().next().unwrap_or_default().to_string())
        .collect();
    assert_eq!(steps, ["INVITE", "ACK", "BYE"], "{}", evidence(&sipp));
    let records = system.wait_sessions(&run.call_id(), 1);
    check_record(&records[0], "alice", "echo");
    assert_eq!(text(&records[0], "server"), uri);
    assert_eq!(text(&records[0], "cause"), "caller-bye");
}

#[test]
fn client_to_sipp_server_over_udp() {
    client_to_sipp_server(Transport::Udp);
}

#[test]
fn client_to_sipp_server_over_tcp() {
    client_to_sipp_server(Transport::Tcp);
}

// ---------------------------------------------------------------------------------------
// Bad input at the edges.

/// A request missing its Call-ID, over UDP and over TCP.
fn malformed(transport: &str, local: u16) -> String {
    format!(
        "INVITE sip:echo@{DOMAIN} SIP/2.0\r\n\
         Via: SIP/2.0/{transport} 127.0.0.1:{local};branch=z9hG4bK-bad-{local}\r\n\
         Max-Forwards: 70\r\nFrom: <sip:alice@{DOMAIN}>;tag=bad\r\nTo: <sip:echo@{DOMAIN}>\r\n\
         CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
    )
}

/// The status line of the first response in `bytes`.
fn status_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn malformed_request_gets_400_with_a_reason_and_the_relay_keeps_serving() {
    let system = System::start(Transport::Udp, 1);

    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(STEP)).unwrap();
    let local = udp.local_addr().unwrap().port();
    udp.send_to(
        malformed("UDP", local).as_bytes(),
        ("127.0.0.1", system.port),
    )
    .unwrap();
    let mut buf = [0u8; 4096];
    let (n, _) = udp.recv_from(&mut buf).unwrap();
    let line = status_line(&buf[..n]);
    assert!(line.starts_with("SIP/2.0 400 "), "{line}");
    assert!(
        line.contains("Call-ID"),
        "the reason names what is wrong: {line}"
    );

    let mut tcp = TcpStream::connect(("127.0.0.1", system.port)).unwrap();
    tcp.set_read_timeout(Some(STEP)).unwrap();
    let local = tcp.local_addr().unwrap().port();
    tcp.write_all(malformed("TCP", local).as_bytes()).unwrap();
    let n = tcp.read(&mut buf).unwrap();
    let line = status_line(&buf[..n]);
    assert!(
        line.starts_with("SIP/2.0 400 ") && line.contains("Call-ID"),
        "{line}"
    );

    // Garbage gets nothing, and is counted.
    udp.send_to(
        b"\x00\x01 not SIP at all\r\n\r\n",
        ("127.0.0.1", system.port),
    )
    .unwrap();
    assert!(
        wait_until(STEP, || {
            system.metric("relayd_malformed_answered_total") >= Some(2)
                && system.metric("relayd_malformed_dropped_total") >= Some(1)
        }),
        "malformed input is counted: {:?}",
        system.metrics()
    );

    // And a real call still goes through, over both transports.
    for transport in ["udp", "tcp"] {
        let run = system
            .client(&format!("after-{transport}"), ALICE)
            .args(["--transport", transport, "call", "echo"])
            .run(b"still here\n");
        run.assert_code(0, &system);
        assert_eq!(run.stdout, b"still here\n");
    }
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn bad_relayd_configuration_is_refused_with_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        dir.path(),
        "relayd.toml",
        "[listen]\nudp = \"127.0.0.1:5060\"\n\n[[users]]\nname = \"carol\"\npassword = \"x\"\n\
         plan = \"gold\"\nservices = [\"*\"]\n",
    );
    for args in [vec!["run"], vec!["check-config"]] {
        let out = assert_cmd::Command::new(&programs().relayd)
            .arg("--config")
            .arg(&bad)
            .args(&args)
            .env_remove("RELAYD_CONFIG")
            .current_dir(dir.path())
            .timeout(STEP)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("relayd.toml")
                && stderr.contains("users[0].plan")
                && stderr.contains("gold"),
            "{args:?}: the error names the file, the key and the value: {stderr}"
        );
    }
}

#[test]
fn bad_agent_configuration_is_refused_with_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        dir.path(),
        "agent.toml",
        "[relay]\nuri = \"sip:127.0.0.1:5060\"\naccount = \"as1\"\npassword = \"x\"\n\n\
         [sip]\nlisten = \"127.0.0.1:5080\"\nlisten_port = 5080\n",
    );
    let out = assert_cmd::Command::new(&programs().agent)
        .arg("--config")
        .arg(&bad)
        .env_remove("RUST_LOG")
        .current_dir(dir.path())
        .timeout(STEP)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("agent.toml") && stderr.contains("sip.listen_port"),
        "the error names the file and the key: {stderr}"
    );
    // Missing what has no default (the account) is as clear.
    let incomplete = write(
        dir.path(),
        "incomplete.toml",
        "[relay]\nuri = \"sip:127.0.0.1:5060\"\n",
    );
    let out = assert_cmd::Command::new(&programs().agent)
        .arg("--config")
        .arg(&incomplete)
        .arg("--check-config")
        .env_remove("RUST_LOG")
        .current_dir(dir.path())
        .timeout(STEP)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("account"),
        "the error names the missing key: {stderr}"
    );
}

#[test]
fn bad_client_configuration_is_refused_with_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        dir.path(),
        "client.toml",
        "user = \"alice\"\nrelay = \"sip:127.0.0.1:5060\"\ntransport = \"carrier-pigeon\"\n",
    );
    let out = assert_cmd::Command::new(&programs().client)
        .arg("--config")
        .arg(&bad)
        .args(["register", "--once"])
        .env("SIP_CLIENT_PASSWORD", "x")
        .env_remove("SIP_CLIENT_CONFIG")
        .current_dir(dir.path())
        .timeout(STEP)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "usage or configuration error: {stderr}"
    );
    assert!(
        stderr.contains("client.toml")
            && stderr.contains("transport")
            && stderr.contains("carrier-pigeon"),
        "the error names the file, the key and the value: {stderr}"
    );
}

#[test]
fn wrong_password_gives_exit_status_4_and_says_so() {
    let system = System::start(Transport::Udp, 1);
    let (code, stderr) = {
        let run = system
            .client("wrong", ALICE)
            .password("not-alices-password")
            .args(["call", "echo"])
            .run(b"never sent\n");
        (run.status.code(), run.stderr)
    };
    assert_eq!(code, Some(4), "authentication failed: {stderr}");
    assert!(
        stderr.to_lowercase().contains("authentication"),
        "the message says why: {stderr}"
    );
    assert!(system.sessions().is_empty(), "nothing was billed");
    // The relay still serves alice with her real password.
    let run = system
        .client("right", ALICE)
        .args(["call", "echo"])
        .run(b"now it works\n");
    run.assert_code(0, &system);
    assert_eq!(run.stdout, b"now it works\n");
}
