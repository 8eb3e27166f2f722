//! Unit tests of the transaction layer, driven by a fake clock: every schedule is checked to
//! the millisecond, with no sleeping.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use rsip::prelude::UntypedHeader;
use std::time::Duration;

use super::client::ClientState;
use super::server::ServerState;
use super::*;
use crate::message::response_for;
use crate::Transport;

const ALICE: &str = "10.0.0.1:5060";
const BOB: &str = "10.0.0.2:5060";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn udp(s: &str) -> Peer {
    Peer::udp(addr(s))
}

fn tcp(s: &str) -> Peer {
    Peer::tcp(addr(s))
}

/// A request as a UA at ALICE sends it, with a proxy's Via below ours and a Route.
fn request(method: &str, branch: &str, cseq: u32) -> Request {
    let text = format!(
        "{method} sip:bob@example.test SIP/2.0\r\n\
Via: SIP/2.0/UDP {ALICE};branch={branch}\r\n\
Via: SIP/2.0/UDP 10.0.0.9:5060;branch=z9hG4bKbelow\r\n\
Route: <sip:proxy.example.test;lr>\r\n\
Max-Forwards: 70\r\n\
From: <sip:alice@example.test>;tag=alice1\r\n\
To: <sip:bob@example.test>\r\n\
Call-ID: call-1@example.test\r\n\
CSeq: {cseq} {method}\r\n\
Content-Length: 0\r\n\r\n"
    );
    match SipMessage::try_from(text.as_str()) {
        Ok(SipMessage::Request(r)) => r,
        other => panic!("test request did not parse: {other:?}"),
    }
}

fn response(req: &Request, code: u16) -> Response {
    response_for(req, code, None, Some("bob1"))
}

fn parse(bytes: &Bytes) -> SipMessage {
    SipMessage::try_from(bytes.to_vec()).unwrap()
}

#[derive(Debug, Default)]
struct Drained {
    sent: Vec<Transmit>,
    events: Vec<Event>,
    deadline: Option<Instant>,
}

fn drain(layer: &mut TransactionLayer) -> Drained {
    let mut d = Drained::default();
    loop {
        match layer.poll_output() {
            Output::Transmit(t) => d.sent.push(t),
            Output::Event(e) => d.events.push(e),
            Output::Timeout(t) => {
                d.deadline = t;
                return d;
            }
        }
    }
}

/// What happened at one instant of a run.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Sent(u128),
    TimedOut(u128),
    AckTimeout(u128),
}

/// Advances the clock from deadline to deadline until none is left (or `limit`), noting
/// each transmission and timeout in milliseconds since `t0`.
fn run(layer: &mut TransactionLayer, t0: Instant, limit: Duration) -> Vec<Seen> {
    let mut seen = vec![];
    let mut deadline = drain(layer).deadline;
    while let Some(at) = deadline {
        if at > t0 + limit {
            break;
        }
        layer.handle_timeout(at);
        let d = drain(layer);
        let ms = (at - t0).as_millis();
        seen.extend(d.sent.iter().map(|_| Seen::Sent(ms)));
        for e in d.events {
            match e {
                Event::TimedOut { .. } => seen.push(Seen::TimedOut(ms)),
                Event::AckTimeout { .. } => seen.push(Seen::AckTimeout(ms)),
                other => panic!("unexpected event {other:?}"),
            }
        }
        if let Some(next) = d.deadline {
            assert!(next > at, "deadline {next:?} not after {at:?}");
        }
        deadline = d.deadline;
    }
    seen
}

fn sent_at(ms: &[u128]) -> Vec<Seen> {
    ms.iter().map(|&m| Seen::Sent(m)).collect()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn layer() -> TransactionLayer {
    TransactionLayer::new(Timers::default())
}

// ---------------------------------------------------------------- client, non-INVITE

#[test]
fn non_invite_udp_schedule_doubles_to_t2_then_times_out_at_64_t1() {
    let mut l = layer();
    let t0 = Instant::now();
    let id = l
        .send_request(t0, request("OPTIONS", "z9hG4bKo1", 1), udp(BOB))
        .unwrap();
    let first = drain(&mut l);
    assert_eq!(first.sent.len(), 1);
    assert_eq!(first.sent[0].to, udp(BOB));
    assert_eq!(first.deadline, Some(t0 + ms(500)));
    let mut expected = sent_at(&[
        500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500,
    ]);
    expected.push(Seen::TimedOut(32000));
    assert_eq!(run(&mut l, t0, Duration::from_secs(100)), expected);
    assert!(l.is_empty());
    let _ = id;
}

#[test]
fn non_invite_retransmissions_are_the_same_bytes() {
    let mut l = layer();
    let t0 = Instant::now();
    l.send_request(t0, request("OPTIONS", "z9hG4bKo1", 1), udp(BOB))
        .unwrap();
    let first = drain(&mut l).sent.remove(0);
    l.handle_timeout(t0 + ms(500));
    let again = drain(&mut l).sent.remove(0);
    assert_eq!(first, again);
    assert_eq!(
        first.bytes.as_ptr(),
        again.bytes.as_ptr(),
        "serialised once, shared"
    );
}

#[test]
fn non_invite_proceeding_retransmits_every_t2() {
    let mut l = layer();
    let t0 = Instant::now();
    let req = request("BYE", "z9hG4bKb1", 2);
    let id = l.send_request(t0, req.clone(), udp(BOB)).unwrap();
    drain(&mut l);
    l.handle_timeout(t0 + ms(500));
    assert_eq!(drain(&mut l).sent.len(), 1);
    l.handle_message(
        t0 + ms(700),
        SipMessage::Response(response(&req, 100)),
        udp(BOB),
    );
    let d = drain(&mut l);
    assert!(
        matches!(&d.events[..], [Event::Response { tx, resp }] if *tx == id && resp.status_code.code() == 100)
    );
    // Timer E armed at 1.5 s stays; after it, T2.
    let mut expected = sent_at(&[1500, 5500, 9500, 13500, 17500, 21500, 25500, 29500]);
    expected.push(Seen::TimedOut(32000));
    assert_eq!(run(&mut l, t0, Duration::from_secs(100)), expected);
}

#[test]
fn non_invite_final_then_timer_k() {
    let mut l = layer();
    let t0 = Instant::now();
    let req = request("OPTIONS", "z9hG4bKo2", 1);
    let id = l.send_request(t0, req.clone(), udp(BOB)).unwrap();
    drain(&mut l);
    l.handle_message(
        t0 + ms(100),
        SipMessage::Response(response(&req, 200)),
        udp(BOB),
    );
    let d = drain(&mut l);
    assert!(matches!(&d.events[..], [Event::Response { tx, .. }] if *tx == id));
    assert_eq!(l.clients[&id].state(), ClientState::Completed);
    assert_eq!(d.deadline, Some(t0 + ms(5100)), "Timer K = T4");
    // Retransmitted final: absorbed.
    l.handle_message(
        t0 + ms(200),
        SipMessage::Response(response(&req, 200)),
        udp(BOB),
    );
    let d = drain(&mut l);
    assert!(d.events.is_empty() && d.sent.is_empty());
    assert_eq!(run(&mut l, t0, Duration::from_secs(100)), vec![]);
    assert!(l.is_empty());
    // After Timer K the response is stray.
    l.handle_message(
        t0 + ms(6000),
        SipMessage::Response(response(&req, 200)),
        udp(BOB),
    );
    assert!(matches!(
        &drain(&mut l).events[..],
        [Event::StrayResponse { .. }]
    ));
}

#[test]
fn non_invite_reliable_no_retransmission_and_zero_timer_k() {
    let mut l = layer();
    let t0 = Instant::now();
    let req = request("OPTIONS", "z9hG4bKo3", 1);
    l.send_request(t0, req.clone(), tcp(BOB)).unwrap();
    let d = drain(&mut l);
    assert_eq!(d.sent.len(), 1);
    assert_eq!(
        d.deadline,
        Some(t0 + Duration::from_secs(32)),
        "only Timer F"
    );
    l.handle_message(
        t0 + ms(10),
        SipMessage::Response(response(&req, 200)),
        tcp(BOB),
    );
    let d = drain(&mut l);
    assert_eq!(d.events.len(), 1);
    assert_eq!(d.deadline, None);
    assert!(l.is_empty(), "Timer K is zero on a reliable transport");
}

#[test]
fn non_invite_reliable_times_out_without_retransmitting() {
    let mut l = layer();
    let t0 = Instant::now();
    l.send_request(t0, request("OPTIONS", "z9hG4bKo4", 1), tcp(BOB))
        .unwrap();
    drain(&mut l);
    assert_eq!(
        run(&mut l, t0, Duration::from_secs(100)),
        vec![Seen::TimedOut(32000)]
    );
}

// ---------------------------------------------------------------- client, INVITE

#[test]
fn invite_udp_schedule_doubles_until_timer_b() {
    let mut l = layer();
    let t0 = Instant::now();
    l.send_request(t0, request("INVITE", "z9hG4bKi1", 1), udp(BOB))
        .unwrap();
    assert_eq!(drain(&mut l).sent.len(), 1);
    let mut expected = sent_at(&[500, 1500, 3500, 7500, 15500, 31500]);
    expected.push(Seen::TimedOut(32000));
    assert_eq!(run(&mut l, t0, Duration::from_secs(100)), expected);
    assert!(l.is_empty());
}

#[test]
fn invite_reliable_only_timer_b() {
    let mut l = layer();
    let t0 = Instant::now();
    l.send_request(t0, request("INVITE", "z9hG4bKi2", 1), tcp(BOB))
        .unwrap();
    drain(&mut l);
    assert_eq!(
        run(&mut l, t0, Duration::from_secs(100)),
        vec![Seen::TimedOut(32000)]
    );
}

#[test]
fn invite_provisional_stops_retransmission_and_timer_b() {
    let mut l = layer();
    let t0 = Instant::now();
    let req = request("INVITE", "z9hG4bKi3", 1);
    let id = l.send_request(t0, req.clone(), udp(BOB)).unwrap();
    drain(&mut l);
    l.handle_timeout(t0 + ms(500));
    drain(&mut l);
    l.handle_message(
        t0 + ms(600),
        SipMessage::Response(response(&req, 180)),
        udp(BOB),
    );
    let d = drain(&mut l);
    assert!(matches!(&d.events[..], [Event::Response { tx, .. }] if *tx == id));
    assert_eq!(d.deadline, None, "ringing waits for the TU");
    assert_eq!(l.clients[&id].state(), ClientState::Proceeding);
    // A further provisional goes up too.
    l.handle_message(
        t0 + ms(700),
        SipMessage::Response(response(&req, 183)),
        udp(BOB),
    );
    assert_eq!(drain(&mut l).events.len(), 1);
}

#[test]
fn a_cancelled_invite_without_a_final_response_ends_64_t1_after_its_cancel() {
    let mut l = layer();
    let t0 = Instant::now();
    let req = request("INVITE", "z9hG4bKc9", 1);
    let id = l.send_request(t0, req.clone(), tcp(BOB)).unwrap();
    l.handle_message(
        t0 + ms(100),
        SipMessage::Response(response(&req, 180)),
        tcp(BOB),
    );
    assert_eq!(drain(&mut l).deadline, None, "ringing waits for the TU");
    // The TU gives up at 120 s: its CANCEL has the INVITE's branch (§9.1).
    let t_cancel = t0 + Duration::from_secs(120);
    let cancel = request("CANCEL", "z9hG4bKc9", 1);
    let cancel_id = l.send_request(t_cancel, cancel.clone(), tcp(BOB)).unwrap();
    // The server answers the CANCEL, but never sends the INVITE's 487.
    l.handle_message(
        t_cancel + ms(10),
        SipMessage::Response(response(&cancel, 200)),
        tcp(BOB),
    );
    drain(&mut l);
    assert!(!l.clients.contains_key(&cancel_id));
    let seen = run(&mut l, t_cancel, Duration::from_secs(3600));
    assert_eq!(seen, vec![Seen::TimedOut(32_000)], "64·T1 after the CANCEL");
    assert!(
        !l.clients.contains_key(&id),
        "the INVITE transaction is gone"
    );
}

#[test]
fn invite_non_2xx_is_acked_by_the_transaction() {
    let mut l = layer();
    let t0 = Instant::now();
    let req = request("INVITE", "z9hG4bKi4", 7);
    let id = l.send_request(t0, req.clone(), udp(BOB)).unwrap();
    drain(&mut l);
    l.handle_message(
        t0 + ms(100),
        SipMessage::Response(response(&req, 486)),
        udp(BOB),
    );
    let d = drain(&mut l);
    assert!(
        matches!(&d.events[..], [Event::Response { tx, resp }] if *tx == id && resp.status_code.code() == 486)
    );
    assert_eq!(d.sent.len(), 1);
    assert_eq!(d.sent[0].to, udp(BOB));
    let ack = match parse(&d.sent[0].bytes) {
        SipMessage::Request(r) => r,
        other => panic!("not a request: {other:?}"),
    };
    assert_eq!(ack.method, Method::Ack);
    assert_eq!(ack.uri, req.uri);
    let text = String::from_utf8(d.sent[0].bytes.to_vec()).unwrap();
    assert!(
        text.contains("Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKi4\r\n"),
        "{text}"
    );
    assert!(!text.contains("z9hG4bKbelow"), "only the top Via: {text}");
    assert!(
        text.contains("Route: <sip:proxy.example.test;lr>\r\n"),
        "{text}"
    );
    assert!(
        text.contains("To: <sip:bob@example.test>;tag=bob1\r\n"),
        "To of the response: {text}"
    );
    assert!(
        text.contains("From: <sip:alice@example.test>;tag=alice1\r\n"),
        "{text}"
    );
    assert!(text.contains("Call-ID: call-1@example.test\r\n"), "{text}");
    assert!(text.contains("CSeq: 7 ACK\r\n"), "{text}");
    assert_eq!(
        d.deadline,
        Some(t0 + ms(100) + Duration::from_secs(32)),
        "Timer D"
    );
    // The final retransmitted: the same ACK again, no event.
    l.handle_message(
        t0 + ms(600),
        SipMessage::Response(response(&req, 486)),
        udp(BOB),
    );
    let again = drain(&mut l);
    assert!(again.events.is_empty());
    assert_eq!(again.sent, d.sent);
    // A provisional after the final: absorbed.
    l.handle_message(
        t0 + ms(700),
        SipMessage::Response(response(&req, 180)),
        udp(BOB),
    );
    let d = drain(&mut l);
    assert!(d.events.is_empty() && d.sent.is_empty());
    assert_eq!(run(&mut l, t0, Duration::from_secs(100)), vec![]);
    assert!(l.is_empty());
}

#[test]
fn invite_non_2xx_reliable_acks_and_terminates() {
    let mut l = layer();
    let t0 = Instant::now();
    let req = request("INVITE", "z9hG4bKi5", 1);
    l.send_request(t0, req.clone(), tcp(BOB)).unwrap();
    drain(&mut l);
    l.handle_message(
        t0 + ms(100),
        SipMessage::Response(response(&req, 603)),
        tcp(BOB),
    );
    let d = drain(&mut l);
    assert_eq!(d.sent.len(), 1, "the ACK");
    assert_eq!(d.events.len(), 1);
    assert!(l.is_empty(), "Timer D is zero on a reliable transport");
}

#[test]
fn invite_2xx_accepted_passes_every_2xx_until_timer_m() {
    let mut l = layer();
    let t0 = Instant::now();
    let req = request("INVITE", "z9hG4bKi6", 1);
    let id = l.send_request(t0, req.clone(), udp(BOB)).unwrap();
    drain(&mut l);
    let ok = response(&req, 200);
    l.handle_message(t0 + ms(100), SipMessage::Response(ok.clone()), udp(BOB));
    let d = drain(&mut l);
    assert!(d.sent.is_empty(), "the TU ACKs a 2xx, not the transaction");
    assert!(matches!(&d.events[..], [Event::Response { tx, .. }] if *tx == id));
    assert_eq!(l.clients[&id].state(), ClientState::Accepted);
    assert_eq!(
        d.deadline,
        Some(t0 + ms(100) + Duration::from_secs(32)),
        "Timer M"
    );
    // Retransmitted 2xx: up again (RFC 6026 §7.2), so the TU re-ACKs it.
    l.handle_message(t0 + ms(600), SipMessage::Response(ok.clone()), udp(BOB));
    assert!(matches!(&drain(&mut l).events[..], [Event::Response { tx, .. }] if *tx == id));
    // A 2xx from another fork: up as well.
    let mut forked = ok.clone();
    for h in forked.headers.iter_mut() {
        if let rsip::Header::To(to) = h {
            *to = rsip::headers::To::new("<sip:bob@example.test>;tag=other");
        }
    }
    l.handle_message(t0 + ms(700), SipMessage::Response(forked), udp(BOB));
    assert_eq!(drain(&mut l).events.len(), 1);
    // A non-2xx in Accepted is discarded.
    l.handle_message(
        t0 + ms(800),
        SipMessage::Response(response(&req, 500)),
        udp(BOB),
    );
    let d = drain(&mut l);
    assert!(d.events.is_empty() && d.sent.is_empty());
    assert_eq!(run(&mut l, t0, Duration::from_secs(100)), vec![]);
    assert!(l.is_empty());
    // After Timer M: stray, for the TU to re-ACK.
    l.handle_message(
        t0 + Duration::from_secs(40),
        SipMessage::Response(ok),
        udp(BOB),
    );
    assert!(
        matches!(&drain(&mut l).events[..], [Event::StrayResponse { from, .. }] if *from == udp(BOB))
    );
}

#[test]
fn invite_2xx_ends_the_transaction_when_the_tu_takes_later_2xx() {
    // RFC 3261 §17.1.1.2 as first written, for a UA core that matches later 2xx to its
    // dialogs itself: nothing is kept for Timer M.
    let mut l = layer().with_after_2xx(super::After2xx::Terminate);
    let t0 = Instant::now();
    let req = request("INVITE", "z9hG4bKi6t", 1);
    let id = l.send_request(t0, req.clone(), udp(BOB)).unwrap();
    drain(&mut l);
    l.handle_message(
        t0 + ms(50),
        SipMessage::Response(response(&req, 180)),
        udp(BOB),
    );
    assert!(matches!(&drain(&mut l).events[..], [Event::Response { tx, .. }] if *tx == id));
    let ok = response(&req, 200);
    l.handle_message(t0 + ms(100), SipMessage::Response(ok.clone()), udp(BOB));
    let d = drain(&mut l);
    assert!(d.sent.is_empty(), "the TU ACKs a 2xx, not the transaction");
    assert!(matches!(&d.events[..], [Event::Response { tx, .. }] if *tx == id));
    assert!(l.is_empty(), "no Accepted state");
    assert_eq!(d.deadline, None, "no Timer M");
    // Its retransmission is stray at once, for the TU to re-ACK.
    l.handle_message(t0 + ms(600), SipMessage::Response(ok), udp(BOB));
    assert!(
        matches!(&drain(&mut l).events[..], [Event::StrayResponse { from, .. }] if *from == udp(BOB))
    );
    // A non-INVITE's 2xx and an INVITE's non-2xx are as before.
    let bye = request("BYE", "z9hG4bKi6u", 2);
    l.send_request(t0, bye.clone(), udp(BOB)).unwrap();
    drain(&mut l);
    l.handle_message(
        t0 + ms(700),
        SipMessage::Response(response(&bye, 200)),
        udp(BOB),
    );
    drain(&mut l);
    assert!(!l.is_empty(), "a non-INVITE waits Timer K");
}

#[test]
fn invite_2xx_after_non_2xx_is_stray() {
    let mut l = layer();
    let t0 = Instant::now();
    let req = request("INVITE", "z9hG4bKi7", 1);
    l.send_request(t0, req.clone(), udp(BOB)).unwrap();
    drain(&mut l);
    l.handle_message(
        t0 + ms(100),
        SipMessage::Response(response(&req, 603)),
        udp(BOB),
    );
    drain(&mut l);
    l.handle_message(
        t0 + ms(200),
        SipMessage::Response(response(&req, 200)),
        udp(BOB),
    );
    assert!(matches!(
        &drain(&mut l).events[..],
        [Event::StrayResponse { .. }]
    ));
}

#[test]
fn response_matching_uses_branch_and_cseq_method() {
    let mut l = layer();
    let t0 = Instant::now();
    let invite = request("INVITE", "z9hG4bKm1", 1);
    let cancel = request("CANCEL", "z9hG4bKm1", 1);
    let i = l.send_request(t0, invite.clone(), udp(BOB)).unwrap();
    let c = l.send_request(t0, cancel.clone(), udp(BOB)).unwrap();
    assert_ne!(i, c);
    drain(&mut l);
    l.handle_message(t0, SipMessage::Response(response(&cancel, 200)), udp(BOB));
    assert!(matches!(&drain(&mut l).events[..], [Event::Response { tx, .. }] if *tx == c));
    l.handle_message(t0, SipMessage::Response(response(&invite, 487)), udp(BOB));
    assert!(matches!(&drain(&mut l).events[..], [Event::Response { tx, .. }] if *tx == i));
    l.handle_message(
        t0,
        SipMessage::Response(response(&request("INVITE", "z9hG4bKzz", 1), 200)),
        udp(BOB),
    );
    assert!(matches!(
        &drain(&mut l).events[..],
        [Event::StrayResponse { .. }]
    ));
}

#[test]
fn send_request_refuses_what_is_not_a_transaction() {
    let mut l = layer();
    let t0 = Instant::now();
    assert_eq!(
        l.send_request(t0, request("ACK", "z9hG4bKa", 1), udp(BOB)),
        Err(TxError::AckNotATransaction)
    );
    let mut no_branch = request("OPTIONS", "z9hG4bKx", 1);
    for h in no_branch.headers.iter_mut() {
        if let rsip::Header::Via(v) = h {
            *v = rsip::headers::Via::new("SIP/2.0/UDP 10.0.0.1:5060");
        }
    }
    assert!(matches!(
        l.send_request(t0, no_branch, udp(BOB)),
        Err(TxError::InvalidMessage(_))
    ));
    assert!(matches!(
        l.send_request(t0, request("OPTIONS", "nocookie", 1), udp(BOB)),
        Err(TxError::InvalidMessage(_))
    ));
    let mut mismatched = request("OPTIONS", "z9hG4bKmm", 1);
    mismatched.method = Method::Info;
    assert!(matches!(
        l.send_request(t0, mismatched, udp(BOB)),
        Err(TxError::InvalidMessage(_))
    ));
    l.send_request(t0, request("OPTIONS", "z9hG4bKd", 1), udp(BOB))
        .unwrap();
    assert_eq!(
        l.send_request(t0, request("OPTIONS", "z9hG4bKd", 2), udp(BOB)),
        Err(TxError::DuplicateTransaction)
    );
    assert_eq!(l.len(), 1);
}

#[test]
fn transport_error_times_out_pending_transactions() {
    let mut l = layer();
    let t0 = Instant::now();
    let a = l
        .send_request(t0, request("OPTIONS", "z9hG4bKt1", 1), tcp(BOB))
        .unwrap();
    l.send_request(t0, request("OPTIONS", "z9hG4bKt2", 1), tcp(ALICE))
        .unwrap();
    drain(&mut l);
    l.transport_error(&tcp(BOB));
    let d = drain(&mut l);
    assert_eq!(d.events, vec![Event::TimedOut { tx: a }]);
    assert_eq!(l.len(), 1);
}

// ---------------------------------------------------------------- server, non-INVITE

fn server_request(l: &mut TransactionLayer, now: Instant, req: &Request, from: Peer) -> ServerTxId {
    l.handle_message(now, SipMessage::Request(req.clone()), from);
    match &drain(l).events[..] {
        [Event::Request {
            tx,
            req: got,
            from: f,
            ..
        }] => {
            assert_eq!(got, req);
            assert_eq!(*f, from);
            *tx
        }
        other => panic!("expected a new request, got {other:?}"),
    }
}

#[test]
fn server_non_invite_resends_last_response_on_retransmission() {
    let mut l = layer();
    let t0 = Instant::now();
    let req = request("BYE", "z9hG4bKs1", 3);
    let id = server_request(&mut l, t0, &req, udp(ALICE));
    // Trying: a retransmission is absorbed.
    l.handle_message(t0 + ms(500), SipMessage::Request(req.clone()), udp(ALICE));
    let d = drain(&mut l);
    assert!(d.sent.is_empty() && d.events.is_empty());
    assert_eq!(
        d.deadline,
        Some(t0 + Duration::from_secs(32)),
        "only the TU's deadline in Trying"
    );
    // Proceeding: the provisional again.
    l.respond(t0 + ms(600), id, response(&req, 100)).unwrap();
    let trying = drain(&mut l).sent;
    assert_eq!(trying.len(), 1);
    assert_eq!(trying[0].to, udp(ALICE));
    l.handle_message(t0 + ms(1500), SipMessage::Request(req.clone()), udp(ALICE));
    assert_eq!(drain(&mut l).sent, trying);
    // Completed: the final again, until Timer J.
    l.respond(t0 + ms(2000), id, response(&req, 200)).unwrap();
    let ok = drain(&mut l);
    assert_eq!(ok.sent.len(), 1);
    assert_eq!(
        ok.deadline,
        Some(t0 + ms(2000) + Duration::from_secs(32)),
        "Timer J"
    );
    // Completed: kept compactly (only to answer retransmissions), not as a transaction.
    assert!(!l.servers.contains_key(&id));
    assert_eq!((l.server_len(), l.lingering.len()), (1, 1));
    l.handle_message(t0 + ms(3500), SipMessage::Request(req.clone()), udp(ALICE));
    let again = drain(&mut l);
    assert_eq!(again.sent, ok.sent);
    assert!(again.events.is_empty());
    assert_eq!(
        l.respond(t0 + ms(3600), id, response(&req, 500)),
        Err(TxError::UnknownTransaction)
    );
    // Just before Timer J it is still answered; at Timer J it ends.
    l.handle_timeout(t0 + ms(2000) + Duration::from_secs(32) - ms(1));
    l.handle_message(
        t0 + ms(33_000),
        SipMessage::Request(req.clone()),
        udp(ALICE),
    );
    assert_eq!(drain(&mut l).sent, ok.sent);
    assert_eq!(run(&mut l, t0, Duration::from_secs(100)), vec![]);
    assert!(l.is_empty());
    assert_eq!(
        l.respond(t0, id, response(&req, 200)),
        Err(TxError::UnknownTransaction)
    );
}

#[test]
fn server_non_invite_reliable_terminates_on_final() {
    let mut l = layer();
    let t0 = Instant::now();
    let req = request("OPTIONS", "z9hG4bKs2", 1);
    let id = server_request(&mut l, t0, &req, tcp(ALICE));
    l.respond(t0, id, response(&req, 200)).unwrap();
    let d = drain(&mut l);
    assert_eq!(d.sent.len(), 1);
    assert_eq!(d.sent[0].to, tcp(ALICE));
    assert!(l.is_empty(), "Timer J is zero on a reliable transport");
}

#[test]
fn server_respond_checks_status() {
    let mut l = layer();
    let t0 = Instant::now();
    let req = request("OPTIONS", "z9hG4bKs3", 1);
    let id = server_request(&mut l, t0, &req, udp(ALICE));
    let mut bad = response(&req, 200);
    bad.status_code = rsip::StatusCode::Other(99, "x".into());
    assert_eq!(l.respond(t0, id, bad), Err(TxError::InvalidStatus(99)));
    assert_eq!(
        l.respond(t0, ServerTxId(999), response(&req, 200)),
        Err(TxError::UnknownTransaction)
    );
}

#[test]
fn same_branch_other_sent_by_is_another_transaction() {
    let mut l = layer();
    let t0 = Instant::now();
    let req = request("OPTIONS", "z9hG4bKs4", 1);
    let a = server_request(&mut l, t0, &req, udp(ALICE));
    let mut other = req.clone();
    for h in other.headers.iter_mut() {
        if let rsip::Header::Via(v) = h {
            if v.value().contains("z9hG4bKs4") {
                *v = rsip::headers::Via::new("SIP/2.0/UDP 10.0.0.7:5060;branch=z9hG4bKs4");
            }
        }
    }
    let b = server_request(&mut l, t0, &other, udp("10.0.0.7:5060"));
    assert_ne!(a, b);
    assert_eq!(l.len(), 2);
}

#[test]
fn rfc2543_requests_without_cookie_are_matched_too() {
    let mut l = layer();
    let t0 = Instant::now();
    let req = request("OPTIONS", "oldstyle", 1);
    server_request(&mut l, t0, &req, udp(ALICE));
    l.handle_message(t0, SipMessage::Request(req.clone()), udp(ALICE));
    assert!(drain(&mut l).events.is_empty(), "retransmission");
    server_request(&mut l, t0, &request("OPTIONS", "oldstyle", 2), udp(ALICE));
}

// ---------------------------------------------------------------- server, INVITE

#[test]
fn server_invite_sends_100_after_200ms() {
    let mut l = layer();
    let t0 = Instant::now();
    let req = request("INVITE", "z9hG4bKv1", 1);
    let id = server_request(&mut l, t0, &req, udp(ALICE));
    assert_eq!(drain(&mut l).deadline, Some(t0 + ms(200)));
    l.handle_timeout(t0 + ms(200));
    let d = drain(&mut l);
    assert_eq!(d.sent.len(), 1);
    match parse(&d.sent[0].bytes) {
        SipMessage::Response(r) => {
            assert_eq!(r.status_code.code(), 100);
            let s = Summary::of_response(&r).unwrap();
            assert_eq!(s.to_tag, None, "100 carries no To tag");
            assert_eq!(s.branch, "z9hG4bKv1");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        d.deadline,
        Some(t0 + Duration::from_secs(180)),
        "the TU's deadline"
    );
    // INVITE retransmission: the 100 again.
    l.handle_message(t0 + ms(500), SipMessage::Request(req.clone()), udp(ALICE));
    assert_eq!(drain(&mut l).sent, d.sent);
    // The TU's provisional replaces it.
    l.respond(t0 + ms(600), id, response(&req, 180)).unwrap();
    let ringing = drain(&mut l).sent;
    l.handle_message(t0 + ms(1500), SipMessage::Request(req.clone()), udp(ALICE));
    assert_eq!(drain(&mut l).sent, ringing);
}

#[test]
fn server_invite_no_100_when_the_tu_answers_first() {
    let mut l = layer();
    let t0 = Instant::now();
    let req = request("INVITE", "z9hG4bKv2", 1);
    let id = server_request(&mut l, t0, &req, udp(ALICE));
    l.respond(t0 + ms(50), id, response(&req, 180)).unwrap();
    let d = drain(&mut l);
    assert_eq!(d.sent.len(), 1);
    assert_eq!(
        d.deadline,
        Some(t0 + Duration::from_secs(180)),
        "the 100 timer is off; the TU's deadline runs from the request (its provisional came \
         before a tenth of the deadline had run)"
    );
    l.handle_timeout(t0 + ms(300));
    assert!(drain(&mut l).sent.is_empty());
}

#[test]
fn server_invite_retransmission_before_200ms_gets_100_at_once() {
    let mut l = layer();
    let t0 = Instant::now();
    let req = request("INVITE", "z9hG4bKv3", 1);
    server_request(&mut l, t0, &req, udp(ALICE));
    l.handle_message(t0 + ms(150), SipMessage::Request(req), udp(ALICE));
    let d = drain(&mut l);
    assert_eq!(d.sent.len(), 1);
    assert!(d.events.is_empty());
    assert_eq!(d.deadline, Some(t0 + Duration::from_secs(180)));
}

#[test]
fn server_invite_non_2xx_timer_g_until_timer_h() {
    let mut l = layer();
    let t0 = Instant::now();
    let req = request("INVITE", "z9hG4bKv4", 1);
    let id = server_request(&mut l, t0, &req, udp(ALICE));
    l.respond(t0, id, response(&req, 486)).unwrap();
    assert_eq!(drain(&mut l).sent.len(), 1);
    // Timer G doubles to T2; Timer H ends it at 64·T1 with no ACK.
    let expected = sent_at(&[
        500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500,
    ]);
    assert_eq!(run(&mut l, t0, Duration::from_secs(100)), expected);
    assert!(l.is_empty());
}

#[test]
fn server_invite_non_2xx_ack_absorbed_then_timer_i() {
    let mut l = layer();
    let t0 = Instant::now();
    let req = request("INVITE", "z9hG4bKv5", 1);
    let id = server_request(&mut l, t0, &req, udp(ALICE));
    l.respond(t0, id, response(&req, 486)).unwrap();
    let final_sent = drain(&mut l).sent;
    // INVITE retransmitted in Completed: the final again.
    l.handle_message(t0 + ms(100), SipMessage::Request(req.clone()), udp(ALICE));
    assert_eq!(drain(&mut l).sent, final_sent);
    l.handle_timeout(t0 + ms(500));
    assert_eq!(drain(&mut l).sent, final_sent, "Timer G");
    // The ACK (same branch) is absorbed: no event, Confirmed, retransmissions over.
    let ack = request("ACK", "z9hG4bKv5", 1);
    l.handle_message(t0 + ms(700), SipMessage::Request(ack.clone()), udp(ALICE));
    let d = drain(&mut l);
    assert!(d.events.is_empty() && d.sent.is_empty());
    assert_eq!(l.servers[&id].state(), ServerState::Confirmed);
    assert_eq!(
        d.deadline,
        Some(t0 + ms(700) + Duration::from_secs(5)),
        "Timer I = T4"
    );
    l.handle_message(t0 + ms(800), SipMessage::Request(ack), udp(ALICE));
    assert!(
        drain(&mut l).events.is_empty(),
        "ACK retransmission absorbed"
    );
    l.handle_message(t0 + ms(900), SipMessage::Request(req), udp(ALICE));
    assert!(
        drain(&mut l).sent.is_empty(),
        "INVITE retransmission absorbed in Confirmed"
    );
    assert_eq!(run(&mut l, t0, Duration::from_secs(100)), vec![]);
    assert!(l.is_empty());
}

#[test]
fn server_invite_non_2xx_reliable() {
    let mut l = layer();
    let t0 = Instant::now();
    let req = request("INVITE", "z9hG4bKv6", 1);
    let id = server_request(&mut l, t0, &req, tcp(ALICE));
    l.respond(t0, id, response(&req, 486)).unwrap();
    let d = drain(&mut l);
    assert_eq!(d.sent.len(), 1);
    assert_eq!(
        d.deadline,
        Some(t0 + Duration::from_secs(32)),
        "no Timer G, only H"
    );
    l.handle_message(
        t0 + ms(10),
        SipMessage::Request(request("ACK", "z9hG4bKv6", 1)),
        tcp(ALICE),
    );
    assert!(drain(&mut l).events.is_empty());
    assert!(l.is_empty(), "Timer I is zero on a reliable transport");
}

#[test]
fn server_invite_2xx_retransmitted_until_ack() {
    let mut l = layer();
    let t0 = Instant::now();
    let req = request("INVITE", "z9hG4bKv7", 1);
    let id = server_request(&mut l, t0, &req, udp(ALICE));
    l.respond(t0, id, response(&req, 200)).unwrap();
    let ok = drain(&mut l).sent;
    assert_eq!(l.servers[&id].state(), ServerState::Accepted);
    assert_eq!(
        run(&mut l, t0, ms(4000)),
        sent_at(&[500, 1500, 3500]),
        "T1 doubling (§13.3.1.4)"
    );
    // INVITE retransmissions are absorbed in Accepted (RFC 6026 §7.1).
    l.handle_message(t0 + ms(4000), SipMessage::Request(req.clone()), udp(ALICE));
    let d = drain(&mut l);
    assert!(d.sent.is_empty() && d.events.is_empty());
    // The TU may retransmit the 2xx itself.
    l.respond(t0 + ms(4100), id, response(&req, 200)).unwrap();
    assert_eq!(drain(&mut l).sent, ok);
    assert_eq!(
        l.respond(t0 + ms(4100), id, response(&req, 486)),
        Err(TxError::AlreadyFinal)
    );
    // The ACK for the 2xx has a new branch: delivered, retransmissions stop.
    let ack = request("ACK", "z9hG4bKnewbranch", 1);
    l.handle_message(t0 + ms(5000), SipMessage::Request(ack.clone()), udp(ALICE));
    let d = drain(&mut l);
    assert!(
        matches!(&d.events[..], [Event::Ack2xx { ack: got, from }] if *got == ack && *from == udp(ALICE))
    );
    assert!(d.sent.is_empty());
    assert_eq!(
        d.deadline,
        Some(t0 + ms(5000) + Duration::from_secs(5)),
        "Accepted lingers T4 after the ACK, not the rest of Timer L's 64·T1"
    );
    // A retransmitted ACK is delivered again (dialog level), the INVITE still absorbed.
    l.handle_message(t0 + ms(5100), SipMessage::Request(ack), udp(ALICE));
    assert_eq!(drain(&mut l).events.len(), 1);
    l.handle_message(t0 + ms(9000), SipMessage::Request(req.clone()), udp(ALICE));
    let d = drain(&mut l);
    assert!(d.sent.is_empty() && d.events.is_empty(), "still absorbed");
    assert_eq!(
        run(&mut l, t0, Duration::from_secs(100)),
        vec![],
        "no AckTimeout"
    );
    assert!(l.is_empty());
}

#[test]
fn server_invite_2xx_acked_over_a_reliable_transport_ends_at_once() {
    let mut l = layer();
    let t0 = Instant::now();
    let req = request("INVITE", "z9hG4bKvr", 1);
    let id = server_request(&mut l, t0, &req, tcp(ALICE));
    l.respond(t0, id, response(&req, 200)).unwrap();
    drain(&mut l);
    l.handle_message(
        t0 + ms(300),
        SipMessage::Request(request("ACK", "z9hG4bKnewbranch", 1)),
        tcp(ALICE),
    );
    let d = drain(&mut l);
    assert!(matches!(&d.events[..], [Event::Ack2xx { .. }]));
    assert_eq!(d.deadline, Some(t0 + ms(300)), "nothing to absorb over TCP");
    assert_eq!(run(&mut l, t0 + ms(300), ms(1)), vec![]);
    assert!(l.is_empty());
}

#[test]
fn server_invite_2xx_without_ack_times_out() {
    let mut l = layer();
    let t0 = Instant::now();
    let req = request("INVITE", "z9hG4bKv8", 1);
    let id = server_request(&mut l, t0, &req, udp(ALICE));
    l.respond(t0, id, response(&req, 200)).unwrap();
    drain(&mut l);
    let mut expected = sent_at(&[
        500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500,
    ]);
    expected.push(Seen::AckTimeout(32000));
    assert_eq!(run(&mut l, t0, Duration::from_secs(100)), expected);
    assert!(l.is_empty());
    assert!(l.ack_index.is_empty());
}

#[test]
fn server_invite_2xx_reliable_no_retransmission_but_ack_timeout() {
    let mut l = layer();
    let t0 = Instant::now();
    let req = request("INVITE", "z9hG4bKv9", 1);
    let id = server_request(&mut l, t0, &req, tcp(ALICE));
    l.respond(t0, id, response(&req, 200)).unwrap();
    drain(&mut l);
    assert_eq!(
        run(&mut l, t0, Duration::from_secs(100)),
        vec![Seen::AckTimeout(32000)]
    );
}

#[test]
fn server_invite_2xx_ack_with_invite_branch_is_delivered() {
    let mut l = layer();
    let t0 = Instant::now();
    let req = request("INVITE", "z9hG4bKva", 1);
    let id = server_request(&mut l, t0, &req, udp(ALICE));
    l.respond(t0, id, response(&req, 200)).unwrap();
    drain(&mut l);
    l.handle_message(
        t0 + ms(100),
        SipMessage::Request(request("ACK", "z9hG4bKva", 1)),
        udp(ALICE),
    );
    let d = drain(&mut l);
    assert!(matches!(&d.events[..], [Event::Ack2xx { .. }]));
    assert_eq!(d.deadline, Some(t0 + ms(100) + Duration::from_secs(5)));
    assert!(l.ack_index.is_empty());
}

#[test]
fn ack_for_other_dialog_does_not_stop_retransmission() {
    let mut l = layer();
    let t0 = Instant::now();
    let req = request("INVITE", "z9hG4bKvb", 5);
    let id = server_request(&mut l, t0, &req, udp(ALICE));
    l.respond(t0, id, response(&req, 200)).unwrap();
    drain(&mut l);
    // CSeq 4, not 5: another INVITE of the dialog.
    l.handle_message(
        t0 + ms(100),
        SipMessage::Request(request("ACK", "z9hG4bKz", 4)),
        udp(ALICE),
    );
    assert!(matches!(&drain(&mut l).events[..], [Event::Ack2xx { .. }]));
    l.handle_timeout(t0 + ms(500));
    assert_eq!(drain(&mut l).sent.len(), 1, "still retransmitting");
}

#[test]
fn ack_with_the_invite_branch_but_another_cseq_does_not_stop_retransmission() {
    // sipp over a lossy link: the 407 of INVITE 1 was retransmitted after INVITE 2 was
    // answered 180, and sipp ACKed it again with the Via of that 180 (INVITE 2's branch)
    // but CSeq 1. It acknowledges nothing of INVITE 2, whose 2xx goes on being resent.
    let mut l = layer();
    let t0 = Instant::now();
    let req = request("INVITE", "z9hG4bKvc", 2);
    let id = server_request(&mut l, t0, &req, udp(ALICE));
    l.respond(t0, id, response(&req, 180)).unwrap();
    l.respond(t0, id, response(&req, 200)).unwrap();
    drain(&mut l);
    l.handle_message(
        t0 + ms(100),
        SipMessage::Request(request("ACK", "z9hG4bKvc", 1)),
        udp(ALICE),
    );
    // Handed up as an ACK matching no transaction (the TU tells what it is).
    assert!(matches!(&drain(&mut l).events[..], [Event::Ack2xx { .. }]));
    assert_eq!(l.servers[&id].state(), ServerState::Accepted);
    assert_eq!(
        run(&mut l, t0, ms(4000)),
        sent_at(&[500, 1500, 3500]),
        "the 2xx is still retransmitted"
    );
    // The real ACK (CSeq 2) stops it.
    l.handle_message(
        t0 + ms(4000),
        SipMessage::Request(request("ACK", "z9hG4bKvc", 2)),
        udp(ALICE),
    );
    assert!(matches!(&drain(&mut l).events[..], [Event::Ack2xx { .. }]));
    assert_eq!(run(&mut l, t0, Duration::from_secs(100)), vec![]);
    assert!(l.is_empty());
}

#[test]
fn cancel_matches_its_invite() {
    let mut l = layer();
    let t0 = Instant::now();
    let invite = request("INVITE", "z9hG4bKc1", 1);
    let inv = server_request(&mut l, t0, &invite, udp(ALICE));
    let cancel = request("CANCEL", "z9hG4bKc1", 1);
    l.handle_message(t0 + ms(10), SipMessage::Request(cancel.clone()), udp(ALICE));
    let d = drain(&mut l);
    let ctx = match &d.events[..] {
        [Event::Cancel {
            tx,
            invite: i,
            req,
            from,
        }] => {
            assert_eq!(*i, inv);
            assert_eq!(req, &cancel);
            assert_eq!(*from, udp(ALICE));
            *tx
        }
        other => panic!("{other:?}"),
    };
    assert_ne!(ctx, inv);
    l.respond(t0 + ms(20), ctx, response(&cancel, 200)).unwrap();
    l.respond(t0 + ms(20), inv, response(&invite, 487)).unwrap();
    assert_eq!(drain(&mut l).sent.len(), 2);
    // CANCEL retransmitted: its 200 again, no new event.
    l.handle_message(t0 + ms(30), SipMessage::Request(cancel), udp(ALICE));
    let d = drain(&mut l);
    assert_eq!(d.sent.len(), 1);
    assert!(d.events.is_empty());
    // A CANCEL for nothing is an ordinary request (the TU answers 481).
    server_request(&mut l, t0, &request("CANCEL", "z9hG4bKc2", 1), udp(ALICE));
}

// ---------------------------------------------------------------- both

#[test]
fn ack_matching_nothing_is_an_ack_for_2xx() {
    let mut l = layer();
    let t0 = Instant::now();
    let ack = request("ACK", "z9hG4bKa1", 1);
    l.handle_message(t0, SipMessage::Request(ack.clone()), udp(ALICE));
    assert_eq!(
        drain(&mut l).events,
        vec![Event::Ack2xx {
            ack,
            from: udp(ALICE)
        }]
    );
    assert!(l.is_empty());
}

#[test]
fn messages_without_mandatory_headers_are_dropped_and_counted() {
    let mut l = layer();
    let t0 = Instant::now();
    let mut req = request("OPTIONS", "z9hG4bKd1", 1);
    req.headers
        .retain(|h| !matches!(h, rsip::Header::CallId(_)));
    l.handle_message(t0, SipMessage::Request(req.clone()), udp(ALICE));
    let mut resp = response(&request("OPTIONS", "z9hG4bKd1", 1), 200);
    resp.headers.retain(|h| !matches!(h, rsip::Header::CSeq(_)));
    l.handle_message(t0, SipMessage::Response(resp), udp(ALICE));
    let mut mismatched = request("OPTIONS", "z9hG4bKd2", 1);
    mismatched.method = Method::Bye;
    l.handle_message(t0, SipMessage::Request(mismatched), udp(ALICE));
    let d = drain(&mut l);
    assert!(d.events.is_empty() && d.sent.is_empty());
    assert_eq!(l.dropped(), 3);
    assert!(l.is_empty());
}

#[test]
fn stale_timers_are_skipped_in_the_deadline() {
    let mut l = layer();
    let t0 = Instant::now();
    // Many transactions that end before their first timer: their entries go stale.
    for n in 0..50 {
        let req = request("OPTIONS", &format!("z9hG4bKst{n}"), 1);
        l.send_request(t0, req.clone(), udp(BOB)).unwrap();
        l.handle_message(t0, SipMessage::Response(response(&req, 200)), udp(BOB));
    }
    let keep = request("OPTIONS", "z9hG4bKkeep", 1);
    l.send_request(t0 + ms(1), keep, tcp(BOB)).unwrap();
    let d = drain(&mut l);
    // Each of the 50 is in Completed with Timer K; the Timer E/F entries are stale.
    assert_eq!(d.deadline, Some(t0 + Duration::from_secs(5)));
    l.handle_timeout(t0 + Duration::from_secs(5));
    assert_eq!(
        drain(&mut l).deadline,
        Some(t0 + ms(1) + Duration::from_secs(32))
    );
    assert_eq!(l.len(), 1);
    assert!(
        l.queue.len() <= 1,
        "stale entries dropped on the way: {}",
        l.queue.len()
    );
}

#[test]
fn client_and_server_complete_an_invite_over_tcp() {
    let mut uac = layer();
    let mut uas = layer();
    let t0 = Instant::now();
    let req = request("INVITE", "z9hG4bKp1", 1);
    let c = uac.send_request(t0, req, tcp(BOB)).unwrap();
    let out = drain(&mut uac).sent;
    uas.handle_message(t0, parse(&out[0].bytes), tcp(ALICE));
    let s = match &drain(&mut uas).events[..] {
        [Event::Request { tx, req, .. }] => {
            let tx = *tx;
            uas.respond(t0, tx, response(req, 200)).unwrap();
            tx
        }
        other => panic!("{other:?}"),
    };
    let ok = drain(&mut uas).sent;
    uac.handle_message(t0, parse(&ok[0].bytes), tcp(BOB));
    assert!(
        matches!(&drain(&mut uac).events[..], [Event::Response { tx, resp }] if *tx == c && resp.status_code.code() == 200)
    );
    uas.handle_message(
        t0,
        SipMessage::Request(request("ACK", "z9hG4bKp2", 1)),
        tcp(ALICE),
    );
    assert!(matches!(
        &drain(&mut uas).events[..],
        [Event::Ack2xx { .. }]
    ));
    assert_eq!(run(&mut uas, t0, Duration::from_secs(100)), vec![]);
    assert_eq!(run(&mut uac, t0, Duration::from_secs(100)), vec![]);
    assert!(uac.is_empty() && uas.is_empty());
    let _ = s;
    assert_eq!(Transport::Tcp, tcp(BOB).transport);
}

/// Transactions sit in hash tables for up to 64·T1 after their last message: the slot of
/// each stays small (what a transaction no longer needs is boxed and dropped).
#[test]
fn transactions_stay_small_in_their_tables() {
    let client = std::mem::size_of::<super::client::ClientTx>();
    let server = std::mem::size_of::<super::server::ServerTx>();
    // The client was 552 bytes before its ACK template was boxed.
    assert!(client <= 256, "ClientTx is {client} bytes");
    assert!(server <= 288, "ServerTx is {server} bytes");
}

// ---------------------------------------------------------------- server, never answered

/// The status code and To tag of a response the layer sent.
fn status_and_tag(t: &Transmit) -> (u16, Option<String>) {
    match parse(&t.bytes) {
        SipMessage::Response(r) => {
            let s = Summary::of_response(&r).unwrap();
            (r.status_code.code(), s.to_tag)
        }
        other => panic!("{other:?}"),
    }
}

/// A non-INVITE request the TU never answers is dropped unanswered once the client's Timer
/// F has fired (64·T1 from the request): no 408 to a non-INVITE (RFC 4320 §4.2), nothing
/// kept, counted.
#[test]
fn server_non_invite_never_answered_is_dropped_after_64_t1() {
    let mut l = layer();
    let t0 = Instant::now();
    let req = request("OPTIONS", "z9hG4bKu1", 1);
    let id = server_request(&mut l, t0, &req, udp(ALICE));
    assert_eq!(drain(&mut l).deadline, Some(t0 + Duration::from_secs(32)));
    // The client's retransmissions are absorbed meanwhile.
    l.handle_message(t0 + ms(500), SipMessage::Request(req.clone()), udp(ALICE));
    assert!(drain(&mut l).sent.is_empty());
    assert_eq!(run(&mut l, t0, Duration::from_secs(3600)), vec![]);
    assert!(l.is_empty(), "the transaction is gone");
    assert_eq!(l.unanswered(), 1);
    assert_eq!(
        l.respond(t0 + Duration::from_secs(40), id, response(&req, 200)),
        Err(TxError::UnknownTransaction)
    );
    // A retransmission after that is a new request for the TU (the client has given up,
    // so only one that ignores Timer F sends it).
    server_request(&mut l, t0 + Duration::from_secs(40), &req, udp(ALICE));
}

/// A provisional does not keep a non-INVITE transaction past 64·T1 either.
#[test]
fn server_non_invite_proceeding_never_finished_is_dropped_too() {
    let mut l = layer();
    let t0 = Instant::now();
    let req = request("REGISTER", "z9hG4bKu2", 1);
    let id = server_request(&mut l, t0, &req, tcp(ALICE));
    l.respond(t0 + ms(100), id, response(&req, 100)).unwrap();
    assert_eq!(drain(&mut l).sent.len(), 1);
    assert_eq!(run(&mut l, t0, Duration::from_secs(3600)), vec![]);
    assert!(l.is_empty());
    assert_eq!(l.unanswered(), 1);
}

/// An INVITE the TU never finishes: after the deadline (180 s by default, counted from the
/// request or the TU's last provisional) the layer answers 408 itself, with the To tag of
/// the TU's provisional, and the transaction then ends like any other non-2xx: Timer G
/// resends, the ACK is absorbed, Timer I ends it.
#[test]
fn server_invite_never_answered_gets_408_after_the_deadline() {
    let mut l = layer();
    let t0 = Instant::now();
    let req = request("INVITE", "z9hG4bKu3", 1);
    let id = server_request(&mut l, t0, &req, udp(ALICE));
    l.handle_timeout(t0 + ms(200));
    let trying = drain(&mut l);
    assert_eq!(trying.sent.len(), 1, "100 Trying");
    assert_eq!(trying.deadline, Some(t0 + Duration::from_secs(180)));
    // The TU rings at 10 s: before a tenth of the deadline (18 s) has run, so it stays.
    l.respond(t0 + Duration::from_secs(10), id, response(&req, 180))
        .unwrap();
    let ringing = drain(&mut l);
    assert_eq!(status_and_tag(&ringing.sent[0]), (180, Some("bob1".into())));
    assert_eq!(ringing.deadline, Some(t0 + Duration::from_secs(180)));
    // Provisionals in quick succession do not move it either (one timer entry each would
    // pile up); one 18 s after the request does.
    let entries = l.queue.len();
    for n in 0..100 {
        l.respond(
            t0 + Duration::from_secs(10) + ms(n),
            id,
            response(&req, 183),
        )
        .unwrap();
    }
    assert_eq!(drain(&mut l).sent.len(), 100);
    assert_eq!(l.queue.len(), entries, "no timer entry per provisional");
    l.respond(t0 + Duration::from_secs(28), id, response(&req, 180))
        .unwrap();
    assert_eq!(drain(&mut l).deadline, Some(t0 + Duration::from_secs(208)));
    l.handle_timeout(t0 + Duration::from_secs(207));
    assert!(drain(&mut l).sent.is_empty());
    l.handle_timeout(t0 + Duration::from_secs(208));
    let timeout = drain(&mut l);
    assert_eq!(timeout.sent.len(), 1);
    assert_eq!(timeout.sent[0].to, udp(ALICE));
    assert_eq!(status_and_tag(&timeout.sent[0]), (408, Some("bob1".into())));
    assert!(timeout.events.is_empty());
    assert_eq!(l.unanswered(), 1);
    assert_eq!(l.servers[&id].state(), ServerState::Completed);
    // The TU's late answer is refused; the INVITE's retransmission gets the 408 again.
    assert_eq!(
        l.respond(t0 + ms(208_200), id, response(&req, 200)),
        Err(TxError::AlreadyFinal)
    );
    l.handle_message(
        t0 + ms(208_200),
        SipMessage::Request(req.clone()),
        udp(ALICE),
    );
    assert_eq!(drain(&mut l).sent, timeout.sent);
    // Timer G at 208.5 s; then the ACK: absorbed, Timer I.
    l.handle_timeout(t0 + ms(208_500));
    assert_eq!(drain(&mut l).sent, timeout.sent);
    let mut ack = req.clone();
    ack.method = rsip::Method::Ack;
    for h in ack.headers.iter_mut() {
        if let rsip::Header::CSeq(c) = h {
            *c = rsip::headers::CSeq::new("1 ACK");
        }
    }
    l.handle_message(t0 + ms(208_600), SipMessage::Request(ack), udp(ALICE));
    let acked = drain(&mut l);
    assert!(acked.sent.is_empty() && acked.events.is_empty());
    assert_eq!(acked.deadline, Some(t0 + ms(213_600)), "Timer I");
    assert_eq!(run(&mut l, t0, Duration::from_secs(3600)), vec![]);
    assert!(l.is_empty());
    assert_eq!(l.unanswered(), 1);
}

/// Without any provisional from the TU, the 408 carries a tag of the layer's own (RFC 3261
/// §8.2.6.2); over TCP it is sent once and the transaction ends at Timer H.
#[test]
fn server_invite_never_answered_over_tcp_gets_a_tagged_408() {
    let mut l = layer();
    let t0 = Instant::now();
    let req = request("INVITE", "z9hG4bKu4", 1);
    server_request(&mut l, t0, &req, tcp(ALICE));
    let seen = run(&mut l, t0, Duration::from_secs(3600));
    // The 100 at 200 ms, the 408 at 180 s, nothing after.
    assert_eq!(seen, sent_at(&[200, 180_000]));
    assert!(l.is_empty());
    assert_eq!(l.unanswered(), 1);
}

/// The bounds are the user's to set ([`ServerDeadlines`]); a TU that answers in time is
/// not touched, nor counted.
#[test]
fn server_deadlines_are_configurable_and_an_answer_in_time_is_untouched() {
    let deadlines = ServerDeadlines {
        invite: Duration::from_secs(5),
        non_invite: Some(Duration::from_secs(2)),
    };
    let mut l = TransactionLayer::new(Timers::default()).with_server_deadlines(deadlines);
    let t0 = Instant::now();
    let invite = request("INVITE", "z9hG4bKu5", 1);
    let options = request("OPTIONS", "z9hG4bKu6", 1);
    let bye = request("BYE", "z9hG4bKu7", 2);
    server_request(&mut l, t0, &invite, tcp(ALICE));
    server_request(&mut l, t0, &options, tcp(ALICE));
    let answered = server_request(&mut l, t0, &bye, tcp(ALICE));
    l.respond(t0 + ms(1999), answered, response(&bye, 200))
        .unwrap();
    l.handle_timeout(t0 + ms(1999));
    assert_eq!(
        drain(&mut l).sent.len(),
        2,
        "the 200 to the BYE, the INVITE's 100"
    );
    l.handle_timeout(t0 + Duration::from_secs(2));
    assert!(drain(&mut l).sent.is_empty());
    assert_eq!(l.len(), 1, "the OPTIONS dropped at 2 s, the BYE answered");
    l.handle_timeout(t0 + Duration::from_secs(5));
    let d = drain(&mut l);
    assert_eq!(d.sent.len(), 1);
    assert_eq!(status_and_tag(&d.sent[0]).0, 408);
    assert_eq!(l.unanswered(), 2);
    assert_eq!(run(&mut l, t0, Duration::from_secs(3600)), vec![]);
    assert!(l.is_empty());
}

/// A CANCEL's own transaction, which the TU must answer too, is bounded like any other
/// non-INVITE one; the INVITE it cancels keeps its own deadline.
#[test]
fn server_cancel_never_answered_is_dropped() {
    let mut l = layer();
    let t0 = Instant::now();
    let invite = request("INVITE", "z9hG4bKu8", 1);
    let inv = server_request(&mut l, t0, &invite, udp(ALICE));
    let mut cancel = invite.clone();
    cancel.method = rsip::Method::Cancel;
    for h in cancel.headers.iter_mut() {
        if let rsip::Header::CSeq(c) = h {
            *c = rsip::headers::CSeq::new("1 CANCEL");
        }
    }
    l.handle_message(t0 + ms(50), SipMessage::Request(cancel), udp(ALICE));
    assert!(matches!(
        &drain(&mut l).events[..],
        [Event::Cancel { invite, .. }] if *invite == inv
    ));
    l.handle_timeout(t0 + ms(50) + Duration::from_secs(32));
    drain(&mut l);
    assert_eq!(l.len(), 1, "the CANCEL is gone, the INVITE is not");
    assert_eq!(l.unanswered(), 1);
    // The 408 at 180 s and Timer G's ten retransmissions until Timer H.
    assert_eq!(run(&mut l, t0, Duration::from_secs(3600)).len(), 1 + 10);
    assert!(l.is_empty());
    assert_eq!(l.unanswered(), 2);
}

#[test]
fn tables_a_load_peak_grew_are_given_back_once_it_is_over() {
    let mut l = layer();
    let t0 = Instant::now();
    let mut peak = Vec::new();
    for i in 0..5000 {
        let req = request("OPTIONS", &format!("z9hG4bKpeak{i}"), 1);
        let id = server_request(&mut l, t0, &req, udp(ALICE));
        peak.push((id, req));
    }
    assert!(l.servers.capacity() >= 5000 && l.server_index.capacity() >= 5000);
    // Answered, they linger compactly for Timer J (64·T1), which ends them all; every
    // table shrinks back to a small room.
    for (id, req) in &peak {
        l.respond(t0, *id, response(req, 200)).unwrap();
    }
    drain(&mut l);
    assert_eq!(l.server_len(), 5000);
    assert!(l.lingering.capacity() >= 5000);
    run(&mut l, t0, Duration::from_secs(40));
    assert!(l.is_empty());
    assert!(
        l.servers.capacity() <= KEEP_CAPACITY
            && l.server_index.capacity() <= KEEP_CAPACITY
            && l.lingering.capacity() <= 4 * KEEP_CAPACITY,
        "servers {} index {} lingering {}",
        l.servers.capacity(),
        l.server_index.capacity(),
        l.lingering.capacity()
    );
}

#[test]
fn a_stateless_answer_keeps_no_transaction_and_a_retransmission_is_asked_again() {
    let mut l = layer();
    let t0 = Instant::now();
    let invite = request("INVITE", "z9hG4bKsl1", 1);
    let id = server_request(&mut l, t0, &invite, udp(ALICE));
    // Neither a provisional nor a 2xx to an INVITE can go without a transaction.
    for code in [100, 180, 200] {
        assert_eq!(
            l.respond_stateless(id, response(&invite, code)),
            Err(TxError::InvalidStatus(code))
        );
    }
    l.respond_stateless(id, response(&invite, 407)).unwrap();
    let d = drain(&mut l);
    assert_eq!(d.sent.len(), 1, "the challenge goes out once");
    assert_eq!(d.sent[0].to, udp(ALICE));
    assert!(l.is_empty(), "nothing kept");
    // No Timer G, no 100 (Trying) after 200 ms: nothing is left to fire.
    assert_eq!(run(&mut l, t0, Duration::from_secs(100)), vec![]);
    // A retransmission of the INVITE is a request for the TU again (which challenges it
    // again), not absorbed.
    let again = server_request(&mut l, t0 + ms(500), &invite, udp(ALICE));
    assert_ne!(again, id);
    l.respond_stateless(again, response(&invite, 407)).unwrap();
    assert_eq!(drain(&mut l).sent.len(), 1);
    // The ACK for the 407 matches nothing: up to the TU as an ACK to ignore, nothing sent.
    l.handle_message(
        t0 + ms(600),
        SipMessage::Request(request("ACK", "z9hG4bKsl1", 1)),
        udp(ALICE),
    );
    let ack = drain(&mut l);
    assert!(ack.sent.is_empty());
    assert!(
        matches!(&ack.events[..], [Event::Ack2xx { .. }]),
        "{:?}",
        ack.events
    );
    assert!(l.is_empty());

    // A non-INVITE may be answered 2xx so too; a transaction with its final already
    // sent cannot.
    let register = request("REGISTER", "z9hG4bKsl2", 1);
    let id = server_request(&mut l, t0, &register, udp(ALICE));
    l.respond(t0, id, response(&register, 200)).unwrap();
    assert_eq!(
        l.respond_stateless(id, response(&register, 401)),
        Err(TxError::UnknownTransaction)
    );
    assert!(!l.is_empty(), "the stateful one is kept for Timer J");
    let id = server_request(
        &mut l,
        t0,
        &request("REGISTER", "z9hG4bKsl3", 1),
        udp(ALICE),
    );
    l.respond_stateless(id, response(&register, 401)).unwrap();
    assert_eq!(drain(&mut l).sent.len(), 1);
    assert_eq!(
        l.respond_stateless(id, response(&register, 401)),
        Err(TxError::UnknownTransaction)
    );
}

#[test]
fn stale_timer_entries_of_a_peak_are_dropped_with_their_room() {
    let mut l = layer();
    let t0 = Instant::now();
    // 3,000 INVITEs answered at once and ACKed: each left a stale entry for the TU's
    // deadline (180 s) and one for Timer L behind it.
    for i in 0..3000 {
        let invite = request("INVITE", &format!("z9hG4bKstale{i}"), 1);
        let id = server_request(&mut l, t0, &invite, tcp(ALICE));
        l.respond(t0, id, response(&invite, 200)).unwrap();
        l.handle_message(
            t0,
            SipMessage::Request(request("ACK", &format!("z9hG4bKstale{i}"), 1)),
            tcp(ALICE),
        );
        drain(&mut l);
    }
    assert!(l.queue.len() >= 6000, "{}", l.queue.len());
    // Over TCP the ACK ends each at once (T4 is zero there): at the layer's next step they
    // are gone, and so are their entries, though none is due for minutes.
    l.handle_timeout(t0);
    assert!(l.is_empty());
    assert!(
        l.queue.len() <= 4,
        "stale entries kept: {} for {} live transactions",
        l.queue.len(),
        l.len()
    );
}
