//! The recording and the rendering of a scripted call: the messages both legs exchange
//! through the relay, and the decisions between them, in order, as text and SVG.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sip_core::Peer;

use super::config::TraceConfig;
use super::ladder::{Ladder, Row, RELAY, TERMINAL};
use super::ring::Direction::{In, Out};
use super::{svg, text, Trace};

const TERMINAL_CID: &str = "t-1@terminal";
const LEG_CID: &str = "leg-1@relay";

fn request(method: &str, cid: &str, cseq: u32) -> Vec<u8> {
    format!("{method} sip:echo@relay SIP/2.0\r\nVia: SIP/2.0/UDP x\r\nCall-ID: {cid}\r\nCSeq: {cseq} {method}\r\n\r\n").into_bytes()
}

fn response(code: u16, reason: &str, method: &str, cid: &str, cseq: u32) -> Vec<u8> {
    format!("SIP/2.0 {code} {reason}\r\nVia: SIP/2.0/UDP x\r\ni: {cid}\r\nCSeq: {cseq} {method}\r\n\r\n").into_bytes()
}

/// A call as the relay sees it: challenged, admitted, inquired of a server, confirmed,
/// ended by the terminal, with a message of another call in between.
fn scripted() -> std::sync::Arc<Trace> {
    let trace = Trace::from_config(&TraceConfig::default()).unwrap();
    let terminal = Peer::udp("192.0.2.10:5060".parse().unwrap());
    let server = Peer::udp("192.0.2.20:5080".parse().unwrap());
    let other = Peer::udp("192.0.2.99:5060".parse().unwrap());
    let t0 = UNIX_EPOCH + Duration::from_secs(12 * 3600);
    let mut ms = 0;
    let mut at = || {
        ms += 10;
        t0 + Duration::from_millis(ms)
    };
    let t = &trace;
    t.message_at(at(), In, &terminal, &request("INVITE", TERMINAL_CID, 1));
    t.decision_at(
        at(),
        TERMINAL_CID,
        "auth: not authenticated (challenged or refused)",
    );
    t.message_at(
        at(),
        Out,
        &terminal,
        &response(
            407,
            "Proxy Authentication Required",
            "INVITE",
            TERMINAL_CID,
            1,
        ),
    );
    t.message_at(at(), In, &terminal, &request("ACK", TERMINAL_CID, 1));
    t.message_at(at(), In, &other, &request("REGISTER", "another", 1));
    t.message_at(at(), In, &terminal, &request("INVITE", TERMINAL_CID, 2));
    t.decision_at(at(), TERMINAL_CID, "auth: alice authenticated");
    t.decision_at(at(), TERMINAL_CID, "rule r1 matched: service echo");
    t.decision_at(
        at(),
        TERMINAL_CID,
        "server chosen: sip:echo@192.0.2.20:5080",
    );
    t.link(TERMINAL_CID, LEG_CID);
    t.message_at(at(), Out, &server, &request("INVITE", LEG_CID, 1));
    t.message_at(
        at(),
        In,
        &server,
        &response(200, "OK", "INVITE", LEG_CID, 1),
    );
    t.decision_at(at(), TERMINAL_CID, "billing: session s1 opened written");
    t.message_at(
        at(),
        Out,
        &terminal,
        &response(200, "OK", "INVITE", TERMINAL_CID, 2),
    );
    t.message_at(at(), In, &terminal, &request("ACK", TERMINAL_CID, 2));
    t.message_at(at(), Out, &server, &request("ACK", LEG_CID, 1));
    t.message_at(at(), In, &terminal, &request("BYE", TERMINAL_CID, 3));
    t.message_at(at(), Out, &server, &request("BYE", LEG_CID, 2));
    t.message_at(at(), In, &server, &response(200, "OK", "BYE", LEG_CID, 2));
    t.decision_at(
        at(),
        TERMINAL_CID,
        "billing: record of session s1, end cause caller-bye written",
    );
    t.message_at(
        at(),
        Out,
        &terminal,
        &response(200, "OK", "BYE", TERMINAL_CID, 3),
    );
    trace
}

fn arrows(ladder: &Ladder) -> Vec<(usize, usize, String)> {
    ladder
        .rows
        .iter()
        .filter_map(|r| match r {
            Row::Arrow {
                from, to, label, ..
            } => Some((*from, *to, label.clone())),
            Row::Note { .. } => None,
        })
        .collect()
}

#[test]
fn both_legs_of_a_call_are_found_by_either_call_id_in_order() {
    let trace = scripted();
    let (ids, entries) = trace.call(LEG_CID);
    assert_eq!(ids, vec![TERMINAL_CID.to_owned(), LEG_CID.to_owned()]);
    let ladder = Ladder::build(ids, &entries);
    assert_eq!(
        ladder.columns,
        vec![
            "terminal udp:192.0.2.10:5060",
            "relay",
            "server udp:192.0.2.20:5080"
        ]
    );
    let s = 2;
    let want: Vec<(usize, usize, &str)> = vec![
        (TERMINAL, RELAY, "INVITE"),
        (RELAY, TERMINAL, "407 Proxy Authentication Required"),
        (TERMINAL, RELAY, "ACK"),
        (TERMINAL, RELAY, "INVITE"),
        (RELAY, s, "INVITE"),
        (s, RELAY, "200 OK"),
        (RELAY, TERMINAL, "200 OK"),
        (TERMINAL, RELAY, "ACK"),
        (RELAY, s, "ACK"),
        (TERMINAL, RELAY, "BYE"),
        (RELAY, s, "BYE"),
        (s, RELAY, "200 OK"),
        (RELAY, TERMINAL, "200 OK"),
    ];
    let got = arrows(&ladder);
    let got: Vec<(usize, usize, &str)> = got.iter().map(|(a, b, l)| (*a, *b, l.as_str())).collect();
    assert_eq!(got, want);
    let notes: Vec<&str> = ladder
        .rows
        .iter()
        .filter_map(|r| match r {
            Row::Note { text, .. } => Some(text.as_str()),
            Row::Arrow { .. } => None,
        })
        .collect();
    assert_eq!(
        notes,
        vec![
            "auth: not authenticated (challenged or refused)",
            "auth: alice authenticated",
            "rule r1 matched: service echo",
            "server chosen: sip:echo@192.0.2.20:5080",
            "billing: session s1 opened written",
            "billing: record of session s1, end cause caller-bye written",
        ]
    );
    // The other call's REGISTER is not in this one's ladder.
    assert!(!arrows(&ladder).iter().any(|(_, _, l)| l == "REGISTER"));
}

#[test]
fn the_text_ladder_draws_arrows_between_the_right_columns_with_times_and_notes() {
    let trace = scripted();
    let (ids, entries) = trace.call(TERMINAL_CID);
    let drawn = text::render(&Ladder::build(ids, &entries));
    let lines: Vec<&str> = drawn.lines().collect();
    assert_eq!(lines[0], format!("call {TERMINAL_CID}"));
    assert_eq!(lines[1], format!("  leg {LEG_CID}"));
    assert_eq!(
        lines[2],
        "  terminal udp:192.0.2.10:5060 | relay | server udp:192.0.2.20:5080"
    );
    assert!(lines[3].contains("terminal udp:192.0.2.10:5060") && lines[3].contains("relay"));
    // The first INVITE: terminal's column to the relay's, at its time.
    let invite = lines[4];
    assert!(invite.starts_with("12:00:00.010  "), "{invite}");
    let grid = &invite[14..];
    assert_eq!(grid.find('|'), Some(16), "{grid}");
    assert_eq!(grid.find('>'), Some(47), "{grid}");
    assert!(grid.contains("INVITE"));
    // The 407 goes back, and names the method it answers.
    assert!(
        lines[6][14..].starts_with(&format!("{}|<407 Proxy", " ".repeat(16))),
        "{}",
        lines[6]
    );
    // A response names the method it answers when there is room.
    assert!(
        drawn.contains("200 OK (INVITE)") && drawn.contains("200 OK (BYE)"),
        "{drawn}"
    );
    // A decision is a note on the relay's line.
    let note = format!("{}|{}* auth: not", " ".repeat(16), " ".repeat(31));
    assert!(lines[5][14..].starts_with(&note), "{}", lines[5]);
    // The INVITE to the server: from the relay's column to the server's.
    let to_server = lines
        .iter()
        .find(|l| l.contains("INVITE") && l[14..].find('>') == Some(79))
        .unwrap();
    assert_eq!(to_server[14..].find('-'), Some(49), "{to_server}");
    let order: Vec<usize> = ["407", "rule r1", "server chosen", "end cause caller-bye"]
        .iter()
        .map(|needle| drawn.find(needle).unwrap())
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{drawn}");
}

#[test]
fn the_svg_ladder_has_an_arrow_per_message_and_escapes_what_the_network_chose() {
    let trace = Trace::from_config(&TraceConfig::default()).unwrap();
    let evil = "<script>alert(1)</script>\"@x";
    let peer = Peer::udp("192.0.2.10:5060".parse().unwrap());
    trace.message(In, &peer, &request("INVITE", evil, 1));
    trace.message(
        Out,
        &peer,
        &response(403, "<b>Forbidden</b>", "INVITE", evil, 1),
    );
    trace.decision(evil, "auth: <img src=x onerror=alert(1)> authenticated");
    let (ids, entries) = trace.call(evil);
    let drawn = svg::render(&Ladder::build(ids, &entries));
    assert!(drawn.starts_with("<svg ") && drawn.ends_with("</svg>"));
    assert_eq!(drawn.matches(r#"<g class="message">"#).count(), 2);
    assert_eq!(drawn.matches(r#"<g class="note">"#).count(), 1);
    assert!(!drawn.contains("<script"), "{drawn}");
    assert!(!drawn.contains("<img"), "{drawn}");
    assert!(!drawn.contains("<b>"), "{drawn}");
    assert!(drawn.contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;@x"));
    assert!(drawn.contains("403 &lt;b&gt;Forbidden&lt;/b&gt; (INVITE)"));
    assert_eq!(trace.recent_failures(5), vec![evil.to_owned()]);
}

#[test]
fn a_failed_call_is_listed_but_a_successful_one_is_not() {
    let trace = scripted();
    // The scripted call's 407 is a failure of its first INVITE.
    assert_eq!(trace.recent_failures(5), vec![TERMINAL_CID.to_owned()]);
    let _ = SystemTime::now();
}

#[test]
fn entries_recorded_from_many_threads_are_all_followed_in_order_within_the_caps() {
    let config = TraceConfig {
        messages: 100_000,
        max_bytes: 64 << 20,
        ..TraceConfig::default()
    };
    let trace = Trace::from_config(&config).unwrap();
    let peer = Peer::udp("192.0.2.10:5060".parse().unwrap());
    std::thread::scope(|s| {
        for t in 0..4 {
            let trace = &trace;
            s.spawn(move || {
                for i in 0..500 {
                    trace.message(In, &peer, &request("INVITE", &format!("c{t}-{i}"), 1));
                }
            });
        }
    });
    let mut seen = Vec::new();
    let mut cursor = 0;
    loop {
        let (page, next) = trace.after(cursor, 300);
        if page.is_empty() {
            break;
        }
        seen.extend(page.iter().map(|e| e.seq));
        cursor = next;
    }
    assert_eq!(seen, (1..=2000).collect::<Vec<u64>>());
    assert_eq!(trace.newest(), 2000);

    // A small ring keeps within its byte cap whatever arrives.
    let small = Trace::from_config(&TraceConfig {
        messages: 1_000_000,
        max_bytes: 16 * (4096 + 1024),
        raw_bytes: 4096,
    })
    .unwrap();
    let mut big = request("MESSAGE", "x", 1);
    big.extend(std::iter::repeat_n(b'y', 3000));
    for i in 0..1000 {
        let mut m = request("MESSAGE", &format!("m{i}"), 1);
        m.extend_from_slice(&big);
        small.message(In, &peer, &m);
    }
    let (entries, bytes) = small.usage();
    assert!(bytes <= 16 * (4096 + 1024), "{bytes}");
    assert!(entries > 0 && entries < 1000, "{entries}");
}
