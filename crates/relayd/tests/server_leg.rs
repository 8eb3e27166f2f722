//! Requests on a session's server leg are taken only in that leg's dialog (Call-ID, both
//! tags; RFC 3261 §12.2.2) and from the server's address. Before, the Call-ID alone was
//! enough: whoever learnt a server leg's Call-ID could hang up a subscriber's session or
//! charge it, since in-dialog charges are not challenged.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use support::billing::field;
use support::relay::{RelayConfig, ServerSpec};
use support::scene::Scene;
use support::sipp::SippOpts;
use support::{unique, ALICE};

/// The server leg's dialog as the server saw it: Call-ID, the relay's tag, the server's tag.
struct LegDialog {
    call_id: String,
    relay_tag: String,
    server_tag: String,
}

/// The value of `name` in the first message of `messages` (a sipp message log) that starts
/// with `start_line` and belongs to the INVITE transaction (`CSeq: 1 INVITE`).
fn header_in(messages: &str, start_line: &str, name: &str) -> Option<String> {
    let block = messages.split("\n-----").find(|block| {
        let mut lines = block.lines().map(|l| l.trim_end_matches('\r'));
        lines.any(|l| l.starts_with(start_line)) && block.contains("CSeq: 1 INVITE")
    })?;
    block
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .map(|v| v.trim().to_string())
}

fn tag(value: &str) -> String {
    value
        .split(";tag=")
        .nth(1)
        .map(|t| t.split(';').next().unwrap_or(t).to_string())
        .unwrap_or_default()
}

fn leg_dialog(messages: &str) -> LegDialog {
    let call_id = header_in(messages, "INVITE sip:", "Call-ID").expect(messages);
    let relay_tag = tag(&header_in(messages, "INVITE sip:", "From").expect(messages));
    let server_tag = tag(&header_in(messages, "SIP/2.0 200 OK", "To").expect(messages));
    assert!(
        !relay_tag.is_empty() && !server_tag.is_empty(),
        "{messages}"
    );
    LegDialog {
        call_id,
        relay_tag,
        server_tag,
    }
}

/// Sends `method` in the server leg's dialog (From the server's tag, To the relay's, as the
/// server would) from `from` to the relay, and returns the status code of the answer.
fn send_in_leg(from: IpAddr, relay_port: u16, leg: &LegDialog, method: &str, body: &str) -> u16 {
    let sock = UdpSocket::bind((from, 0)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let local = sock.local_addr().unwrap();
    let content_type = if body.is_empty() {
        String::new()
    } else {
        "Content-Type: application/vnd.relay.charge+json\r\n".to_string()
    };
    let req = format!(
        "{method} sip:relay@127.0.0.1:{relay_port} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {local};branch=z9hG4bK{branch};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:echo@127.0.0.1>;tag={server_tag}\r\n\
         To: <sip:alice@relay.test>;tag={relay_tag}\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 900 {method}\r\n\
         {content_type}\
         Content-Length: {len}\r\n\r\n{body}",
        branch = unique("x"),
        server_tag = leg.server_tag,
        relay_tag = leg.relay_tag,
        call_id = leg.call_id,
        len = body.len(),
    );
    let relay = SocketAddr::from((Ipv4Addr::LOCALHOST, relay_port));
    sock.send_to(req.as_bytes(), relay).unwrap();
    let mut buf = [0u8; 65_535];
    loop {
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no answer to the {method}: {e}"));
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        let code: u16 = text
            .get(8..11)
            .and_then(|c| c.parse().ok())
            .unwrap_or_default();
        if code >= 200 {
            return code;
        }
    }
}

#[test]
fn requests_outside_the_server_legs_dialog_or_from_elsewhere_are_refused_481() {
    let mut scene = Scene::new();
    let as_port = scene.server("uas", "uas_answer.xml", SippOpts::default());
    scene.start_relay(
        &RelayConfig::standard().server(ServerSpec::udp(as_port, &["echo"]).account("as1")),
    );
    let relay_port = scene.relay().port;
    let mut terminal = scene.terminal("terminal", "terminal_hold.xml", ALICE, "echo", &[]);
    assert!(
        terminal.wait_logged("ESTABLISHED").is_some(),
        "{}",
        scene.report(Some(&terminal))
    );
    let leg = leg_dialog(&scene.server_named("uas").messages());
    let stranger: IpAddr = Ipv4Addr::new(127, 0, 0, 2).into();
    let server_ip: IpAddr = Ipv4Addr::LOCALHOST.into();
    let charge = format!(
        "{{\"event_id\": \"{}\", \"call_id\": \"{}\", \"amount\": 500, \"currency\": \"EUR\"}}",
        unique("forged-"),
        leg.call_id
    );

    // The whole dialog id, but not from the server's address.
    assert_eq!(
        send_in_leg(stranger, relay_port, &leg, "MESSAGE", &charge),
        481
    );
    assert_eq!(send_in_leg(stranger, relay_port, &leg, "BYE", ""), 481);
    // From the server's address, with the Call-ID but not the server's tag.
    let wrong_tag = LegDialog {
        server_tag: "guessed".into(),
        call_id: leg.call_id.clone(),
        relay_tag: leg.relay_tag.clone(),
    };
    assert_eq!(
        send_in_leg(server_ip, relay_port, &wrong_tag, "BYE", ""),
        481
    );
    assert_eq!(
        send_in_leg(server_ip, relay_port, &wrong_tag, "MESSAGE", &charge),
        481
    );

    // The session lived on: the terminal ends it, and nothing was charged.
    terminal.signal_hang_up();
    scene.assert_success(&mut terminal);
    let records = scene.session_records();
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(field(&records[0], "cause"), "caller-bye", "{}", records[0]);
    assert!(
        scene.charge_records().is_empty(),
        "{:#?}",
        scene.charge_records()
    );
}

/// A server whose ACK was lost sends its 2xx again (RFC 3261 §13.3.1.4); the relay ACKs it
/// again (§13.2.2.4). relayd's INVITE transaction to the server ends at the first 2xx
/// (sip-core's `After2xx::Terminate`), so the repeated 2xx reaches the call as a stray
/// response, matched to the session's server leg by its dialog.
#[test]
fn a_repeated_2xx_of_the_server_is_acked_again() {
    let mut scene = Scene::new();
    let as_port = scene.server("uas", "uas_repeat_2xx.xml", SippOpts::default());
    scene.start_relay(
        &RelayConfig::standard().server(ServerSpec::udp(as_port, &["echo"]).account("as1")),
    );
    let mut terminal = scene.terminal("terminal", "terminal_hold.xml", ALICE, "echo", &[]);
    assert!(
        terminal.wait_logged("ESTABLISHED").is_some(),
        "{}",
        scene.report(Some(&terminal))
    );
    // The server's scenario goes on to the BYE only after a second ACK (or fails its call
    // after 5 s without one).
    let acked_twice = support::wait_until(Duration::from_secs(10), || {
        let messages = scene.server_named("uas").messages();
        messages.matches("ACK sip:").count() >= 2
    });
    let messages = scene.server_named("uas").messages();
    assert!(acked_twice, "one ACK only:\n{messages}");
    terminal.signal_hang_up();
    scene.assert_success(&mut terminal);
    let records = scene.session_records();
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(field(&records[0], "cause"), "caller-bye", "{}", records[0]);
}
