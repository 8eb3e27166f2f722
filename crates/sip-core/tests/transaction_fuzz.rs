//! Property test of the transaction layer against hostile input: messages parsed by rsip
//! from mutated valid ones (headers removed, random CSeq, branch, method, status, To tag,
//! sent-by), random bytes that happen to parse, duplicated and replayed deliveries, the
//! user's requests and responses at random (some invalid), transport errors, and random
//! jumps of the clock. It asserts that nothing panics and that after `handle_timeout(now)`
//! the deadline `poll_output` gives is never at or before `now`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use sip_core::message::response_for;
use sip_core::rsip::prelude::*;
use sip_core::rsip::{Header, Method, Request, SipMessage};
use sip_core::transaction::{Event, Output, ServerTxId, Timers, TransactionLayer};
use sip_core::{Peer, Transport};

const METHODS: &[&str] = &[
    "INVITE",
    "ACK",
    "BYE",
    "CANCEL",
    "OPTIONS",
    "REGISTER",
    "MESSAGE",
    "INFO",
    "PRACK",
    "UPDATE",
    "SUBSCRIBE",
    "NOTIFY",
    "REFER",
    "PUBLISH",
    "invite",
    "FOO",
];
const BRANCHES: &[&str] = &[
    "z9hG4bK1",
    "z9hG4bK2",
    "z9hG4bKx3",
    "rfc2543",
    "",
    "z9hG4bK",
];
const SENT_BY: &[&str] = &["10.0.0.1:5060", "10.0.0.2", "host.example.test:5070"];
const PEERS: &[&str] = &["10.0.0.1:5060", "10.0.0.2:5060", "10.0.0.3:5080"];

/// A message to build from the template, then to mutate.
#[derive(Debug, Clone)]
struct MsgSpec {
    /// `Some(status)` for a response, else a request.
    status: Option<u16>,
    method: usize,
    cseq_method: usize,
    cseq: u32,
    branch: usize,
    sent_by: usize,
    to_tag: Option<u8>,
    from_tag: bool,
    /// Indices of template headers to remove.
    remove: Vec<usize>,
    second_via: bool,
}

impl MsgSpec {
    fn text(&self) -> String {
        let method = METHODS[self.method % METHODS.len()];
        let cseq_method = METHODS[self.cseq_method % METHODS.len()];
        let branch = BRANCHES[self.branch % BRANCHES.len()];
        let branch = if branch.is_empty() {
            String::new()
        } else {
            format!(";branch={branch}")
        };
        let sent_by = SENT_BY[self.sent_by % SENT_BY.len()];
        let to_tag = self
            .to_tag
            .map(|t| format!(";tag=t{t}"))
            .unwrap_or_default();
        let from_tag = if self.from_tag { ";tag=f1" } else { "" };
        let mut headers = vec![
            format!("Via: SIP/2.0/UDP {sent_by}{branch}"),
            "Max-Forwards: 70".to_string(),
            format!("From: <sip:alice@example.test>{from_tag}"),
            format!("To: <sip:bob@example.test>{to_tag}"),
            "Call-ID: fuzz@example.test".to_string(),
            format!("CSeq: {} {cseq_method}", self.cseq),
            "Content-Length: 0".to_string(),
        ];
        if self.second_via {
            headers.insert(
                1,
                "Via: SIP/2.0/TCP 192.0.2.9;branch=z9hG4bKlower".to_string(),
            );
        }
        let mut remove = self.remove.clone();
        remove.sort_unstable();
        remove.dedup();
        for i in remove.into_iter().rev() {
            if i < headers.len() {
                headers.remove(i);
            }
        }
        let start = match self.status {
            Some(code) => format!("SIP/2.0 {code} Whatever"),
            None => format!("{method} sip:bob@example.test SIP/2.0"),
        };
        format!("{start}\r\n{}\r\n\r\n", headers.join("\r\n"))
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// A message off the wire.
    Deliver {
        spec: MsgSpec,
        peer: usize,
        reliable: bool,
    },
    /// Random bytes, fed if rsip parses them.
    Garbage(Vec<u8>),
    /// A message delivered earlier, again.
    Replay(usize),
    /// The user starts a client transaction.
    Send {
        spec: MsgSpec,
        peer: usize,
        reliable: bool,
    },
    /// The user answers a server transaction seen in an event (or an unknown one).
    Respond {
        pick: usize,
        status: u16,
        unknown: bool,
    },
    /// The peer answers one of our requests: a response built from it, perhaps mutated.
    Reply {
        pick: usize,
        status: u16,
        remove: Option<usize>,
    },
    /// The peer follows up one of its requests with an ACK or CANCEL of the same branch.
    FollowUp { pick: usize, cancel: bool },
    /// The clock moves on.
    Advance(u32),
    /// The transport cannot reach a peer.
    TransportError { peer: usize, reliable: bool },
}

fn spec() -> impl Strategy<Value = MsgSpec> {
    (
        prop_oneof![
            3 => Just(None),
            3 => prop::sample::select(vec![100u16, 180, 183, 200, 202, 302, 404, 486, 487, 500, 603]).prop_map(Some),
            1 => (0u16..1000).prop_map(Some),
        ],
        // Mostly the methods that have rules of their own, so that messages collide with
        // the transactions already there.
        prop_oneof![4 => 0usize..5, 1 => 0..METHODS.len()],
        prop::option::weighted(0.15, 0..METHODS.len()),
        prop_oneof![4 => 1u32..4, 1 => any::<u32>()],
        0..BRANCHES.len(),
        0..SENT_BY.len(),
        prop::option::of(0u8..3),
        prop::bool::weighted(0.9),
        prop::collection::vec(prop_oneof![8 => Just(usize::MAX), 1 => 0usize..8], 0..3),
        any::<bool>(),
    )
        .prop_map(|(status, method, cseq_method, cseq, branch, sent_by, to_tag, from_tag, remove, second_via)| {
            MsgSpec {
                status,
                method,
                // Mostly the CSeq method agrees with the request method.
                cseq_method: cseq_method.unwrap_or(method),
                cseq,
                branch,
                sent_by,
                to_tag,
                from_tag,
                remove,
                second_via,
            }
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (spec(), 0..PEERS.len(), prop::bool::weighted(0.2))
            .prop_map(|(spec, peer, reliable)| Op::Deliver { spec, peer, reliable }),
        1 => prop::collection::vec(any::<u8>(), 0..200).prop_map(Op::Garbage),
        3 => any::<usize>().prop_map(Op::Replay),
        3 => (spec(), 0..PEERS.len(), prop::bool::weighted(0.2))
            .prop_map(|(mut spec, peer, reliable)| { spec.status = None; Op::Send { spec, peer, reliable } }),
        4 => (any::<usize>(), prop_oneof![9 => 100u16..700, 1 => any::<u16>()], prop::bool::weighted(0.05))
            .prop_map(|(pick, status, unknown)| Op::Respond { pick, status, unknown }),
        4 => (any::<usize>(), prop_oneof![9 => 100u16..700, 1 => any::<u16>()], prop::option::weighted(0.1, 0usize..8))
            .prop_map(|(pick, status, remove)| Op::Reply { pick, status, remove }),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(pick, cancel)| Op::FollowUp { pick, cancel }),
        5 => prop_oneof![0u32..50, 0u32..1000, 0u32..40_000].prop_map(Op::Advance),
        1 => (0..PEERS.len(), any::<bool>()).prop_map(|(peer, reliable)| Op::TransportError { peer, reliable }),
    ]
}

fn peer(i: usize, reliable: bool) -> Peer {
    let addr: SocketAddr = PEERS[i % PEERS.len()].parse().unwrap();
    Peer {
        transport: if reliable {
            Transport::Tcp
        } else {
            Transport::Udp
        },
        addr,
        conn: None,
    }
}

/// How much of the layer a run reached, to show the input is not vacuous.
#[derive(Debug, Default)]
struct Coverage {
    transmits: u64,
    requests: u64,
    cancels: u64,
    responses: u64,
    acks_2xx: u64,
    strays: u64,
    timeouts: u64,
    ack_timeouts: u64,
    dropped: u64,
}

/// Drains the layer; returns the deadline. Remembers the requests of new server
/// transactions so that the user can answer them.
fn drain(
    layer: &mut TransactionLayer,
    requests: &mut Vec<(ServerTxId, Request)>,
    cov: &mut Coverage,
) -> Option<Instant> {
    loop {
        match layer.poll_output() {
            Output::Transmit(t) => {
                assert!(!t.bytes.is_empty());
                cov.transmits += 1;
            }
            Output::Event(Event::Request { tx, req, .. }) => {
                cov.requests += 1;
                requests.push((tx, req));
            }
            Output::Event(Event::Cancel {
                tx, invite, req, ..
            }) => {
                assert_ne!(tx, invite);
                cov.cancels += 1;
                requests.push((tx, req));
            }
            Output::Event(Event::Response { .. }) => cov.responses += 1,
            Output::Event(Event::Ack2xx { .. }) => cov.acks_2xx += 1,
            Output::Event(Event::StrayResponse { .. }) => cov.strays += 1,
            Output::Event(Event::TimedOut { .. }) => cov.timeouts += 1,
            Output::Event(Event::AckTimeout { .. }) => cov.ack_timeouts += 1,
            Output::Timeout(t) => return t,
        }
    }
}

fn run(ops: Vec<Op>, timers: Timers) -> Coverage {
    let mut cov = Coverage::default();
    let mut layer = TransactionLayer::new(timers);
    let t0 = Instant::now();
    let mut now = t0;
    let mut delivered: Vec<(SipMessage, Peer)> = vec![];
    let mut requests: Vec<(ServerTxId, Request)> = vec![];
    let mut sent: Vec<(Request, Peer)> = vec![];
    for op in ops {
        match op {
            Op::Deliver {
                spec,
                peer: p,
                reliable,
            } => {
                if let Ok(msg) = SipMessage::try_from(spec.text().as_str()) {
                    delivered.push((msg.clone(), peer(p, reliable)));
                    layer.handle_message(now, msg, peer(p, reliable));
                }
            }
            Op::Garbage(bytes) => {
                if let Ok(msg) = SipMessage::try_from(bytes) {
                    layer.handle_message(now, msg, peer(0, false));
                }
            }
            Op::Replay(i) => {
                if !delivered.is_empty() {
                    let (msg, from) = delivered[i % delivered.len()].clone();
                    layer.handle_message(now, msg, from);
                }
            }
            Op::Send {
                spec,
                peer: p,
                reliable,
            } => {
                if let Ok(SipMessage::Request(req)) = SipMessage::try_from(spec.text().as_str()) {
                    if layer
                        .send_request(now, req.clone(), peer(p, reliable))
                        .is_ok()
                    {
                        sent.push((req, peer(p, reliable)));
                    }
                }
            }
            Op::Reply {
                pick,
                status,
                remove,
            } => {
                if !sent.is_empty() {
                    let (req, to) = &sent[pick % sent.len()];
                    let mut resp = response_for(req, 200, None, Some("uas"));
                    resp.status_code = sip_core::message::status(status, None);
                    if let Some(i) = remove {
                        let mut headers: Vec<Header> = resp.headers.clone().into();
                        if i < headers.len() {
                            headers.remove(i);
                        }
                        resp.headers = headers.into();
                    }
                    layer.handle_message(now, SipMessage::Response(resp), *to);
                }
            }
            Op::FollowUp { pick, cancel } => {
                let picked =
                    (!delivered.is_empty()).then(|| delivered[pick % delivered.len()].clone());
                if let Some((SipMessage::Request(mut req), from)) = picked {
                    let method = if cancel { Method::Cancel } else { Method::Ack };
                    req.method = method;
                    for h in req.headers.iter_mut() {
                        if let Header::CSeq(c) = h {
                            if let Ok(typed) = c.typed() {
                                *h = sip_core::rsip::typed::CSeq {
                                    seq: typed.seq,
                                    method,
                                }
                                .into();
                            }
                        }
                    }
                    layer.handle_message(now, SipMessage::Request(req), from);
                }
            }
            Op::Respond {
                pick,
                status,
                unknown,
            } => {
                if unknown {
                    let resp = sip_core::message::response_for(
                        &Request::try_from(MsgSpec::default_request().text().as_str()).unwrap(),
                        200,
                        None,
                        None,
                    );
                    let _ = layer.respond(now, ServerTxId(pick as u64), resp);
                } else if !requests.is_empty() {
                    let (tx, req) = &requests[pick % requests.len()];
                    let mut resp = response_for(req, 200, None, Some("uas"));
                    resp.status_code = sip_core::message::status(status, None);
                    let _ = layer.respond(now, *tx, resp);
                }
            }
            Op::Advance(ms) => now += Duration::from_millis(u64::from(ms)),
            Op::TransportError { peer: p, reliable } => layer.transport_error(&peer(p, reliable)),
        }
        let _ = drain(&mut layer, &mut requests, &mut cov);
        layer.handle_timeout(now);
        if let Some(deadline) = drain(&mut layer, &mut requests, &mut cov) {
            assert!(
                deadline > now,
                "deadline {:?} not after now {:?}",
                deadline - t0,
                now - t0
            );
        }
    }
    // Long after: every timer has run; what is left waits for the user or the peer, and is
    // no server transaction (a TU that never answers has a deadline too).
    let end = now + layer.timers().transaction_timeout() * 2 + Duration::from_secs(3600);
    let mut deadline = drain(&mut layer, &mut requests, &mut cov);
    while let Some(at) = deadline.filter(|at| *at <= end) {
        layer.handle_timeout(at);
        deadline = drain(&mut layer, &mut requests, &mut cov);
        if let Some(next) = deadline {
            assert!(next > at);
        }
    }
    assert_eq!(
        layer.server_len(),
        0,
        "server transactions outlive every deadline"
    );
    cov.dropped = layer.dropped();
    cov
}

impl MsgSpec {
    fn default_request() -> MsgSpec {
        MsgSpec {
            status: None,
            method: 4,
            cseq_method: 4,
            cseq: 1,
            branch: 0,
            sent_by: 0,
            to_tag: None,
            from_tag: true,
            remove: vec![],
            second_via: false,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn transaction_layer_never_panics(ops in prop::collection::vec(op(), 1..120)) {
        run(ops, Timers::default());
    }

    #[test]
    fn odd_timer_values_never_panic(
        ops in prop::collection::vec(op(), 1..60),
        t1 in 0u64..10_000,
        t2 in 0u64..100_000,
        t4 in 0u64..100_000,
    ) {
        let timers = Timers {
            t1: Duration::from_millis(t1),
            t2: Duration::from_millis(t2),
            t4: Duration::from_millis(t4),
        };
        run(ops, timers);
    }
}

#[test]
fn generated_input_reaches_every_event() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = prop::collection::vec(op(), 1..120);
    let mut total = Coverage::default();
    for _ in 0..300 {
        let ops = strategy.new_tree(&mut runner).unwrap().current();
        let cov = run(ops, Timers::default());
        total.transmits += cov.transmits;
        total.requests += cov.requests;
        total.cancels += cov.cancels;
        total.responses += cov.responses;
        total.acks_2xx += cov.acks_2xx;
        total.strays += cov.strays;
        total.timeouts += cov.timeouts;
        total.ack_timeouts += cov.ack_timeouts;
        total.dropped += cov.dropped;
    }
    eprintln!("{total:?}");
    let Coverage {
        transmits,
        requests,
        cancels,
        responses,
        acks_2xx,
        strays,
        timeouts,
        ack_timeouts,
        dropped,
    } = total;
    for (name, n) in [
        ("transmits", transmits),
        ("requests", requests),
        ("cancels", cancels),
        ("responses", responses),
        ("acks_2xx", acks_2xx),
        ("strays", strays),
        ("timeouts", timeouts),
        ("ack_timeouts", ack_timeouts),
        ("dropped", dropped),
    ] {
        assert!(n > 0, "no {name} in {total:?}");
    }
}

#[test]
fn extreme_timer_values_are_clamped() {
    let timers = Timers {
        t1: Duration::MAX,
        t2: Duration::ZERO,
        t4: Duration::MAX,
    };
    let mut ops = vec![];
    for method in [0usize, 4] {
        let mut spec = MsgSpec::default_request();
        spec.method = method;
        spec.cseq_method = method;
        ops.push(Op::Send {
            spec: spec.clone(),
            peer: 1,
            reliable: false,
        });
        spec.branch = 1;
        ops.push(Op::Deliver {
            spec,
            peer: 0,
            reliable: false,
        });
        ops.push(Op::Respond {
            pick: 0,
            status: 486,
            unknown: false,
        });
        ops.push(Op::Advance(40_000));
    }
    run(ops, timers);
}

#[test]
fn mutated_templates_do_parse() {
    // The fuzz input is not vacuous: the unmutated template is a valid request for the layer.
    let mut layer = TransactionLayer::new(Timers::default());
    let msg = SipMessage::try_from(MsgSpec::default_request().text().as_str()).unwrap();
    layer.handle_message(Instant::now(), msg, peer(0, false));
    let mut requests = vec![];
    drain(&mut layer, &mut requests, &mut Coverage::default());
    assert_eq!(requests.len(), 1);
    assert_eq!(layer.dropped(), 0);
}
