//! The call driven through scripted peers on a virtual clock (the idea of quinn-proto's test
//! `Pair`): a terminal and one or more application servers, written as the messages they
//! send, around one [`Call`], with a billing store that commits, holds or fails on command.
//! Each test asserts what the terminal, the servers and the store see; none sleeps.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use billing::record::EndCause;
use rsip::prelude::*;
use rsip::{Header, Method, Request, Response, SipMessage};
use sip_core::dialog::DialogId;
use sip_core::{message, Peer, Transport};

use super::*;
use crate::b2bua::LocalAddr;
use crate::billing_control::{unix_ms, SessionStart};
use crate::directory::{Directory, HealthPolicy, ServerRef, Strategy};
use crate::served::ServedSession;

const TERMINAL: &str = "127.0.0.1:5070";
const RELAY: &str = "127.0.0.1:5060";
const SDP: &str = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=application 9 TCP/TLS/x\r\n";

fn peer(addr: &str) -> Peer {
    Peer {
        transport: Transport::Udp,
        addr: addr.parse::<SocketAddr>().unwrap(),
        conn: None,
    }
}

fn parse_request(text: &str) -> Request {
    match sip_core::wire::parse(text.as_bytes()).unwrap() {
        SipMessage::Request(r) => r,
        SipMessage::Response(_) => panic!("not a request"),
    }
}

fn header(headers: &rsip::Headers, name: &str) -> Option<String> {
    headers.iter().find_map(|h| {
        let text = h.to_string();
        let (n, v) = text.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

fn to_tag(headers: &rsip::Headers) -> Option<String> {
    sip_core::address::to_header(headers)
        .ok()
        .flatten()
        .and_then(|t| t.tag().map(str::to_string))
}

/// The relay around the call: a directory of static servers, rules that allow everything
/// but what a test forbids, and the indexes the call points into.
struct TestEnv {
    directory: Directory,
    local: Arc<LocalAddr>,
    limits: SessionLimits,
    /// Services the rules refuse on a change or transfer, with the status.
    refused: Vec<(String, u16)>,
    /// The plan the rules give each service on a change or transfer.
    plans: HashMap<String, String>,
    active: RefCell<HashMap<String, i64>>,
    served: RefCell<HashMap<String, ServedSession>>,
    /// The subscriber's session slots, as `crate::subscriber_sessions` counts them.
    slots: crate::subscriber_sessions::SubscriberSessions,
    /// The subscriber's session limit.
    session_limit: u32,
}

impl TestEnv {
    fn new(servers: &[(&str, &[&str])]) -> TestEnv {
        let directory = Directory::new(HealthPolicy::default());
        for (i, (uri, services)) in servers.iter().enumerate() {
            let services: Vec<String> = services.iter().map(|s| s.to_string()).collect();
            directory
                .add_static(&format!("s{i}"), uri, &services, None)
                .unwrap();
        }
        TestEnv {
            directory,
            local: Arc::new(LocalAddr::new(Transport::Udp, RELAY.parse().unwrap())),
            limits: SessionLimits {
                inquiry_timeout: Duration::from_secs(4),
                answer_timeout: Duration::from_secs(120),
                ack_timeout: Duration::from_secs(32),
                probe_interval: Duration::from_secs(30),
                fork_timeout: Duration::from_secs(30),
                session_timer: sip_core::dialog::session_timer::Policy::default(),
            },
            refused: Vec::new(),
            plans: HashMap::new(),
            active: RefCell::new(HashMap::new()),
            served: RefCell::new(HashMap::new()),
            slots: crate::subscriber_sessions::SubscriberSessions::new(),
            session_limit: 10,
        }
    }

    /// The same with a session limit of `limit` for the subscriber.
    fn with_session_limit(mut self, limit: u32) -> TestEnv {
        self.session_limit = limit;
        self
    }

    /// The session slots alice holds.
    fn slots_held(&self) -> u32 {
        self.slots.held("alice")
    }

    fn active(&self, server: &str) -> i64 {
        self.active.borrow().get(server).copied().unwrap_or(0)
    }
}

impl CallEnv for TestEnv {
    fn limits(&self) -> SessionLimits {
        self.limits
    }
    fn realm(&self) -> &str {
        "relay.test"
    }
    fn local(&self, _peer: Peer) -> Arc<LocalAddr> {
        self.local.clone()
    }
    fn candidates(&self, service: &str, strategy: Strategy) -> Vec<ServerRef> {
        self.directory.candidates(service, strategy, Instant::now())
    }
    fn candidates_away_from(
        &self,
        service: &str,
        current: &ServerRef,
        current_last: bool,
    ) -> VecDeque<ServerRef> {
        let all = self
            .directory
            .candidates(service, Strategy::First, Instant::now());
        let (same, others): (Vec<_>, Vec<_>) = all
            .into_iter()
            .partition(|s| s.uri_text() == current.uri_text());
        let mut others: VecDeque<_> = others.into();
        if current_last {
            others.extend(same);
        }
        others
    }
    fn serves(&self, server: &ServerRef, service: &str) -> bool {
        self.directory
            .servers_of(service)
            .iter()
            .any(|s| s.uri_text() == server.uri_text())
    }
    fn decide_again(
        &self,
        _subscriber: &str,
        _req: &Request,
        service: &str,
        params: &[(String, String)],
    ) -> Result<Redecision, (u16, &'static str)> {
        if let Some((_, code)) = self.refused.iter().find(|(s, _)| s == service) {
            return Err((*code, "Refused by the rules"));
        }
        Ok(Redecision {
            service: service.to_string(),
            params: params.to_vec(),
            plan: self
                .plans
                .get(service)
                .cloned()
                .unwrap_or_else(|| "basic".into()),
        })
    }
    fn names_relay(&self, uri: &sip_core::uri::Uri) -> bool {
        uri.host_text() == Some("relay.test")
    }
    fn session_started(&self, server: &ServerRef) {
        *self
            .active
            .borrow_mut()
            .entry(server.uri_text().to_string())
            .or_default() += 1;
    }
    fn session_ended(&self, server: &ServerRef) {
        *self
            .active
            .borrow_mut()
            .entry(server.uri_text().to_string())
            .or_default() -= 1;
    }
    fn take_session_slot(&self, subscriber: &str, limit: u32) -> bool {
        self.slots.try_take(subscriber, limit)
    }
    fn give_back_session_slot(&self, subscriber: &str) {
        self.slots.give_back(subscriber);
    }
    fn index(&self, served: ServedSession) {
        self.served
            .borrow_mut()
            .insert(served.session_id.clone(), served);
    }
    fn unindex(&self, session_id: &str) {
        self.served.borrow_mut().remove(session_id);
    }
}

/// How the scripted billing store treats commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    /// Commits at once.
    Commit,
    /// Holds them until [`Pair::release_billing`].
    Hold,
    /// Fails them.
    Fail,
}

/// A record the scripted store wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    id: String,
    service: String,
    server: String,
    plan: String,
    cause: EndCause,
    duration_ms: i64,
}

/// What one peer got from the relay, in order.
#[derive(Debug, Clone)]
enum Got {
    Response(TxId, Response),
    Request(Request, Option<Token>),
    Ack(Request),
}

/// An INVITE leg as its server sees it.
struct ServerSide {
    invite: Request,
    peer: Peer,
    tag: String,
}

/// One call between a scripted terminal and scripted servers, on a virtual clock.
struct Pair {
    env: TestEnv,
    call: Call,
    now: Instant,
    invite_tx: TxId,
    next_tx: u64,
    /// Everything the terminal got.
    terminal: Vec<Got>,
    /// Everything each server (by address) got, outside its INVITE legs.
    servers: HashMap<SocketAddr, Vec<Got>>,
    /// The legs, in the order they were started.
    legs: Vec<(LegId, ServerSide)>,
    store: Store,
    held: Vec<(Token, BillingCmd)>,
    open: HashMap<String, SessionStart>,
    records: Vec<Record>,
    /// The order of what the peers and the store saw, for claims on ordering.
    trace: Vec<String>,
    charges: Vec<String>,
    routed: Vec<String>,
    terminal_cseq: u32,
}

impl Pair {
    fn new(servers: &[(&str, &[&str])], strategy: Strategy) -> Pair {
        Pair::with_env(TestEnv::new(servers), strategy)
    }

    fn with_env(env: TestEnv, strategy: Strategy) -> Pair {
        Pair::with_invite(env, strategy, "")
    }

    /// A call whose terminal INVITE carries the `extra` header lines.
    fn with_invite(env: TestEnv, strategy: Strategy, extra: &str) -> Pair {
        let now = Instant::now();
        let invite = parse_request(&format!(
            "INVITE sip:echo@relay.test SIP/2.0\r\nVia: SIP/2.0/UDP {TERMINAL};branch=z9hG4bK-t1\r\nMax-Forwards: 70\r\nFrom: <sip:alice@relay.test>;tag=term\r\nTo: <sip:echo@relay.test>\r\nCall-ID: term-call\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@{TERMINAL}>\r\n{extra}Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{SDP}",
            SDP.len()
        ));
        let adm = Admission {
            subscriber: "alice".into(),
            service: "echo".into(),
            strategy,
            params: Vec::new(),
            plan: "basic".into(),
            rule: "test".into(),
            session_limit: env.session_limit,
        };
        // What admission does: one slot for the call.
        assert!(
            env.slots.try_take("alice", env.session_limit),
            "admission would refuse this call"
        );
        let invite_tx = TxId(1);
        let call = Call::new(
            Incoming {
                tx: invite_tx,
                req: invite,
                from: peer(TERMINAL),
            },
            "term-call".into(),
            adm,
            &env,
            now,
            // Any wall-clock time: durations come from the virtual monotonic clock.
            UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        );
        let mut pair = Pair {
            env,
            call,
            now,
            invite_tx,
            next_tx: 1,
            terminal: Vec::new(),
            servers: HashMap::new(),
            legs: Vec::new(),
            store: Store::Commit,
            held: Vec::new(),
            open: HashMap::new(),
            records: Vec::new(),
            trace: Vec::new(),
            charges: Vec::new(),
            routed: Vec::new(),
            terminal_cseq: 1,
        };
        pair.pump();
        pair
    }

    fn input(&mut self, input: Input) {
        self.call.handle(input, &self.env, self.now);
        self.pump();
    }

    /// Carries out everything the call asks, as the driver would, with the scripted peers
    /// and store.
    fn pump(&mut self) {
        let mut ready = VecDeque::new();
        loop {
            while let Some(out) = self.call.poll_output() {
                match out {
                    Output::Respond { tx, resp } => {
                        self.trace.push(format!(
                            "terminal<-{} {}",
                            resp.status_code.code(),
                            cseq_method(&resp.headers)
                        ));
                        self.terminal.push(Got::Response(tx, resp));
                    }
                    Output::Resolve { leg, server } => {
                        let addr = server.uri().host_port_text().unwrap().to_string();
                        ready.push_back(Input::Resolved {
                            leg,
                            peer: Some(peer(&addr)),
                        });
                    }
                    Output::Invite { leg, req, peer } => {
                        self.trace.push(format!("{}<-INVITE", peer.addr.port()));
                        self.legs.push((
                            leg,
                            ServerSide {
                                invite: req,
                                peer,
                                tag: format!("srv{}", leg.0),
                            },
                        ));
                    }
                    Output::Request { req, peer, answer } => {
                        self.trace
                            .push(format!("{}<-{}", peer.addr.port(), req.method));
                        self.got(peer, Got::Request(req, answer));
                    }
                    Output::Stateless { msg, peer } => match sip_core::wire::parse(&msg).unwrap() {
                        SipMessage::Request(req) => {
                            self.trace.push(format!("{}<-ACK", peer.addr.port()));
                            self.got(peer, Got::Ack(req));
                        }
                        SipMessage::Response(resp) => {
                            // A fork's further 2xx, sent (and resent) by the call itself.
                            assert_eq!(
                                peer.addr.to_string(),
                                TERMINAL,
                                "a response to the terminal"
                            );
                            self.trace.push(format!(
                                "terminal<-{} {} stateless",
                                resp.status_code.code(),
                                cseq_method(&resp.headers)
                            ));
                            self.terminal.push(Got::Response(self.invite_tx, resp));
                        }
                    },
                    Output::Route { call_id } => self.routed.push(call_id),
                    Output::Bill { token, cmd } => match self.store {
                        Store::Commit => {
                            self.apply(&cmd);
                            ready.push_back(Input::Billed {
                                token,
                                result: Ok(()),
                            });
                        }
                        Store::Hold => self.held.push((token, cmd)),
                        Store::Fail => ready.push_back(Input::Billed {
                            token,
                            result: Err("disk full".into()),
                        }),
                    },
                    Output::Charge { session_id, .. } => self.charges.push(session_id),
                }
            }
            let Some(input) = ready.pop_front() else {
                return;
            };
            self.call.handle(input, &self.env, self.now);
        }
    }

    fn got(&mut self, to: Peer, got: Got) {
        let key = to.addr;
        if key.to_string() == TERMINAL {
            self.terminal.push(got);
        } else {
            self.servers.entry(key).or_default().push(got);
        }
    }

    fn apply(&mut self, cmd: &BillingCmd) {
        match cmd {
            BillingCmd::Open(start) => {
                self.trace.push("commit open".into());
                self.open.insert(start.session_id.clone(), start.clone());
            }
            BillingCmd::Close {
                session_id,
                cause,
                ended_at,
            } => {
                self.trace.push("commit close".into());
                self.close(session_id, *cause, *ended_at);
            }
            BillingCmd::Segment {
                closing,
                cause,
                at,
                open,
            } => {
                self.trace.push("commit segment".into());
                self.close(closing, *cause, *at);
                self.open.insert(open.session_id.clone(), open.clone());
            }
        }
    }

    fn close(&mut self, id: &str, cause: EndCause, at: SystemTime) {
        let start = self
            .open
            .remove(id)
            .expect("closing a session never opened");
        self.records.push(Record {
            id: id.to_string(),
            service: start.service,
            server: start.server,
            plan: start.plan,
            cause,
            duration_ms: unix_ms(at) - unix_ms(start.confirmed_at),
        });
    }

    /// Commits what the store held.
    fn release_billing(&mut self) {
        self.store = Store::Commit;
        for (token, cmd) in std::mem::take(&mut self.held) {
            self.apply(&cmd);
            self.call.handle(
                Input::Billed {
                    token,
                    result: Ok(()),
                },
                &self.env,
                self.now,
            );
        }
        self.pump();
    }

    /// Moves the virtual clock on by `d`, waking the call at each deadline on the way.
    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        while let Some(at) = self.call.poll_timeout().filter(|at| *at <= end) {
            self.now = self.now.max(at);
            self.call.handle_timeout(&self.env, self.now);
            self.pump();
        }
        self.now = end;
    }

    // --- the servers ---

    /// Leg `n`'s server answers its INVITE with `code` (a 2xx with an SDP answer).
    fn server_answers(&mut self, n: usize, code: u16) {
        self.server_answers_with(n, code, "");
    }

    /// The same with the `extra` header lines (`Name: value\r\n` each).
    fn server_answers_with(&mut self, n: usize, code: u16, extra: &str) {
        let (leg, side) = &self.legs[n];
        let leg = *leg;
        let mut resp = message::response_for(&side.invite, code, None, Some(&side.tag));
        push_lines(&mut resp.headers, extra);
        if (101..300).contains(&code) {
            resp.headers
                .push(Header::Contact(rsip::headers::Contact::new(format!(
                    "<sip:srv@{}>",
                    side.peer.addr
                ))));
        }
        if code / 100 == 2 {
            resp.headers
                .push(Header::ContentType(rsip::headers::ContentType::new(
                    "application/sdp",
                )));
            resp.body = SDP
                .replace("127.0.0.1", &side.peer.addr.ip().to_string())
                .into_bytes();
            message::set_content_length(&mut resp.headers, resp.body.len());
        }
        let event = match code {
            100 => LegEvent::Trying,
            101..=199 => LegEvent::Provisional(resp),
            200..=299 => LegEvent::Answered(resp),
            _ => LegEvent::Failed {
                code,
                resp: Some(resp),
            },
        };
        self.input(Input::Leg { leg, event });
    }

    /// A request from leg `n`'s server in its dialog, from address `from`.
    fn server_request_from(&mut self, n: usize, method: &str, extra: &str, from: &str) -> TxId {
        let side = &self.legs[n].1;
        let relay_from = header(&side.invite.headers, "From").unwrap();
        let server_to = header(&side.invite.headers, "To").unwrap();
        let call_id = header(&side.invite.headers, "Call-ID").unwrap();
        let req = parse_request(&format!(
            "{method} sip:relay@{RELAY} SIP/2.0\r\nVia: SIP/2.0/UDP {from};branch=z9hG4bK-s{}\r\nMax-Forwards: 70\r\nFrom: {server_to};tag={}\r\nTo: {relay_from}\r\nCall-ID: {call_id}\r\nCSeq: 10 {method}\r\n{extra}Content-Length: 0\r\n\r\n",
            self.next_tx, side.tag
        ));
        self.send_request(req, peer(from))
    }

    fn server_request(&mut self, n: usize, method: &str, extra: &str) -> TxId {
        let from = self.legs[n].1.peer.addr.to_string();
        self.server_request_from(n, method, extra, &from)
    }

    fn send_request(&mut self, req: Request, from: Peer) -> TxId {
        self.next_tx += 1;
        let tx = TxId(self.next_tx);
        let dialog = DialogId::of_incoming_request(&req);
        self.input(Input::Request {
            incoming: Incoming { tx, req, from },
            dialog,
        });
        tx
    }

    /// What server `addr` got, besides its INVITE legs.
    fn server_got(&self, addr: &str) -> &[Got] {
        self.servers
            .get(&addr.parse::<SocketAddr>().unwrap())
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    fn server_methods(&self, addr: &str) -> Vec<String> {
        self.server_got(addr)
            .iter()
            .map(|g| match g {
                Got::Request(r, _) => r.method.to_string(),
                Got::Ack(_) => "ACK".into(),
                Got::Response(..) => "response".into(),
            })
            .collect()
    }

    /// Answers the last request that server `addr` got and the call waits for.
    fn server_answers_request(&mut self, addr: &str, code: u16) {
        self.server_answers_request_with(addr, code, "");
    }

    /// The same with the `extra` header lines.
    fn server_answers_request_with(&mut self, addr: &str, code: u16, extra: &str) {
        let (req, token) = self
            .server_got(addr)
            .iter()
            .rev()
            .find_map(|g| match g {
                Got::Request(r, Some(t)) => Some((r.clone(), *t)),
                _ => None,
            })
            .expect("no request waiting for an answer");
        self.answer_with(&req, token, code, extra);
    }

    /// Answers the last request the terminal got that the call waits for, with `extra`.
    fn terminal_answers_request_with(&mut self, code: u16, extra: &str) {
        let (req, token) = self
            .terminal
            .iter()
            .rev()
            .find_map(|g| match g {
                Got::Request(r, Some(t)) => Some((r.clone(), *t)),
                _ => None,
            })
            .expect("no request waiting for the terminal's answer");
        self.answer_with(&req, token, code, extra);
    }

    fn answer_with(&mut self, req: &Request, token: Token, code: u16, extra: &str) {
        let mut resp = message::response_for(req, code, None, None);
        push_lines(&mut resp.headers, extra);
        if req.method == Method::Invite && code / 100 == 2 {
            resp.headers
                .push(Header::ContentType(rsip::headers::ContentType::new(
                    "application/sdp",
                )));
            resp.body = SDP.as_bytes().to_vec();
            message::set_content_length(&mut resp.headers, resp.body.len());
        }
        self.input(Input::Answered { token, resp });
    }

    // --- the terminal ---

    /// The final responses the terminal got to its INVITE.
    fn invite_finals(&self) -> Vec<u16> {
        self.terminal
            .iter()
            .filter_map(|g| match g {
                Got::Response(tx, r) if *tx == self.invite_tx && r.status_code.code() >= 200 => {
                    Some(r.status_code.code())
                }
                _ => None,
            })
            .collect()
    }

    fn invite_responses(&self) -> Vec<u16> {
        self.terminal
            .iter()
            .filter_map(|g| match g {
                Got::Response(tx, r) if *tx == self.invite_tx => Some(r.status_code.code()),
                _ => None,
            })
            .collect()
    }

    /// The response the terminal got on transaction `tx`.
    fn answer_to(&self, tx: TxId) -> Option<u16> {
        self.terminal.iter().rev().find_map(|g| match g {
            Got::Response(t, r) if *t == tx && r.status_code.code() >= 200 => {
                Some(r.status_code.code())
            }
            _ => None,
        })
    }

    /// The To tag of the `k`-th 2xx the terminal got.
    fn a_tag(&self, k: usize) -> String {
        self.terminal
            .iter()
            .filter_map(|g| match g {
                Got::Response(tx, r) if *tx == self.invite_tx && r.status_code.code() == 200 => {
                    to_tag(&r.headers)
                }
                _ => None,
            })
            .nth(k)
            .expect("no such 2xx")
    }

    fn terminal_methods(&self) -> Vec<String> {
        self.terminal
            .iter()
            .filter_map(|g| match g {
                Got::Request(r, _) => Some(r.method.to_string()),
                Got::Ack(_) => Some("ACK".into()),
                Got::Response(..) => None,
            })
            .collect()
    }

    fn terminal_message(
        &self,
        method: &str,
        a_tag: &str,
        cseq: u32,
        extra: &str,
        body: &str,
    ) -> Request {
        parse_request(&format!(
            "{method} sip:relay@{RELAY} SIP/2.0\r\nVia: SIP/2.0/UDP {TERMINAL};branch=z9hG4bK-a{cseq}{method}\r\nMax-Forwards: 70\r\nFrom: <sip:alice@relay.test>;tag=term\r\nTo: <sip:echo@relay.test>;tag={a_tag}\r\nCall-ID: term-call\r\nCSeq: {cseq} {method}\r\nContact: <sip:alice@{TERMINAL}>\r\n{extra}Content-Length: {}\r\n\r\n{body}",
            body.len()
        ))
    }

    fn terminal_acks(&mut self, k: usize) {
        let tag = self.a_tag(k);
        let ack = self.terminal_message("ACK", &tag, 1, "", "");
        let dialog = DialogId::of_incoming_request(&ack);
        self.input(Input::Ack { req: ack, dialog });
    }

    /// A request from the terminal in the dialog of its `k`-th 2xx.
    fn terminal_sends(&mut self, k: usize, method: &str, extra: &str, body: &str) -> TxId {
        let tag = self.a_tag(k);
        self.terminal_cseq += 1;
        let req = self.terminal_message(method, &tag, self.terminal_cseq, extra, body);
        self.send_request(req, peer(TERMINAL))
    }

    fn terminal_cancels(&mut self) -> TxId {
        self.next_tx += 1;
        let tx = TxId(self.next_tx);
        let req = parse_request(&format!(
            "CANCEL sip:echo@relay.test SIP/2.0\r\nVia: SIP/2.0/UDP {TERMINAL};branch=z9hG4bK-t1\r\nMax-Forwards: 70\r\nFrom: <sip:alice@relay.test>;tag=term\r\nTo: <sip:echo@relay.test>\r\nCall-ID: term-call\r\nCSeq: 1 CANCEL\r\nContent-Length: 0\r\n\r\n"
        ));
        self.input(Input::Cancel { tx, req });
        tx
    }

    /// Runs a call to one established session on server 0 (answered and ACKed).
    fn established(servers: &[(&str, &[&str])]) -> Pair {
        let mut p = Pair::new(servers, Strategy::First);
        p.server_answers(0, 200);
        p.terminal_acks(0);
        p
    }
}

/// Adds header lines (`Name: value\r\n` each) as rsip reads them.
fn push_lines(headers: &mut rsip::Headers, lines: &str) {
    if lines.is_empty() {
        return;
    }
    let text = format!(
        "OPTIONS sip:x@{RELAY} SIP/2.0\r\nVia: SIP/2.0/UDP {RELAY};branch=z9hG4bK-x\r\nFrom: <sip:x@{RELAY}>;tag=x\r\nTo: <sip:x@{RELAY}>\r\nCall-ID: x\r\nCSeq: 1 OPTIONS\r\n{lines}Content-Length: 0\r\n\r\n"
    );
    let parsed = parse_request(&text).headers;
    let all: Vec<&Header> = parsed.iter().collect();
    // The five fixed headers before, Content-Length after.
    for h in &all[5..all.len() - 1] {
        headers.push((*h).clone());
    }
}

fn cseq_method(headers: &rsip::Headers) -> String {
    header(headers, "CSeq")
        .and_then(|v| v.split_whitespace().nth(1).map(str::to_string))
        .unwrap_or_default()
}

const S1: &str = "127.0.0.1:5081";
const S2: &str = "127.0.0.1:5082";
const ONE: &[(&str, &[&str])] = &[("sip:127.0.0.1:5081", &["echo"])];
const TWO: &[(&str, &[&str])] = &[
    ("sip:127.0.0.1:5081", &["echo", "clock"]),
    ("sip:127.0.0.1:5082", &["echo", "clock"]),
];

// --- claims 1 and 3: inquiry, response relay, confirmation, disconnection ---

#[test]
fn a_call_is_relayed_journaled_before_its_2xx_and_billed_for_the_time_between_2xx_and_bye() {
    let mut p = Pair::new(ONE, Strategy::First);
    assert_eq!(p.legs.len(), 1, "one inquiry to the one server");
    let inquiry = &p.legs[0].1.invite;
    assert_eq!(
        header(&inquiry.headers, "P-Asserted-Identity").as_deref(),
        Some("<sip:alice@relay.test>")
    );
    assert_eq!(
        header(&inquiry.headers, "P-Asserted-Service").as_deref(),
        Some("echo")
    );
    assert_eq!(
        inquiry.body,
        SDP.as_bytes(),
        "the terminal's offer is carried untouched"
    );
    p.server_answers(0, 180);
    assert_eq!(p.invite_responses(), vec![180]);
    p.store = Store::Hold;
    p.server_answers(0, 200);
    assert!(
        p.invite_finals().is_empty(),
        "no 2xx before the journal is committed"
    );
    p.release_billing();
    assert_eq!(p.invite_finals(), vec![200]);
    let pos = |t: &str| p.trace.iter().position(|x| x == t).unwrap();
    assert!(pos("commit open") < pos("terminal<-200 INVITE"));
    assert_eq!(
        p.env.served.borrow().len(),
        1,
        "chargeable once the 2xx is out"
    );
    p.advance(Duration::from_secs(3));
    p.terminal_acks(0);
    assert_eq!(p.server_methods(S1), vec!["ACK"]);
    p.advance(Duration::from_secs(7));
    p.store = Store::Hold;
    let bye = p.terminal_sends(0, "BYE", "", "");
    assert_eq!(
        p.server_methods(S1),
        vec!["ACK", "BYE"],
        "the BYE is relayed at once"
    );
    assert_eq!(
        p.answer_to(bye),
        None,
        "the BYE is answered only once the record is committed"
    );
    assert_eq!(
        p.env.served.borrow().len(),
        1,
        "a charge finds the session in memory until its record is committed"
    );
    p.release_billing();
    assert_eq!(p.answer_to(bye), Some(200));
    assert!(
        p.env.served.borrow().is_empty(),
        "and the record in the store after"
    );
    assert_eq!(p.records.len(), 1);
    let r = &p.records[0];
    assert_eq!(
        (r.cause, r.duration_ms, r.service.as_str()),
        (EndCause::CallerBye, 10_000, "echo")
    );
    assert_eq!(p.env.active("sip:127.0.0.1:5081"), 0);
    assert!(p.env.served.borrow().is_empty());
    assert!(p.call.is_finished());
}

#[test]
fn a_server_that_fails_is_replaced_by_the_next_and_a_silent_one_after_the_inquiry_timeout() {
    let mut p = Pair::new(TWO, Strategy::First);
    p.server_answers(0, 486);
    assert_eq!(p.legs.len(), 2, "failover to the second server");
    assert!(p.invite_finals().is_empty());
    // The second says nothing at all: after the inquiry timeout there is no one left.
    p.advance(Duration::from_millis(3_999));
    assert!(p.invite_finals().is_empty());
    p.advance(Duration::from_millis(1));
    assert_eq!(p.invite_finals(), vec![480]);
    assert!(p.records.is_empty() && p.open.is_empty());
    assert!(p.call.is_finished());
}

#[test]
fn a_refusal_another_server_would_give_too_is_relayed() {
    let mut p = Pair::new(TWO, Strategy::First);
    p.server_answers(0, 488);
    assert_eq!(p.legs.len(), 1, "no failover on 488");
    assert_eq!(p.invite_finals(), vec![488]);
}

// --- failure paths: loss, CANCEL, BYE before ACK, no ACK ---

#[test]
fn an_ack_with_another_cseq_than_the_invite_does_not_confirm_the_session() {
    let mut p = Pair::new(ONE, Strategy::First);
    p.server_answers(0, 200);
    // An ACK in the dialog of the 2xx but with another CSeq number: the ACK of an earlier
    // INVITE of the call (sipp ACKing again the 407 of its first INVITE, with the To tag of
    // the relay's later answer). It acknowledges nothing of this 2xx (RFC 3261 §13.2.2.4).
    let tag = p.a_tag(0);
    let stray = p.terminal_message("ACK", &tag, 0, "", "");
    let dialog = DialogId::of_incoming_request(&stray);
    p.input(Input::Ack { req: stray, dialog });
    assert!(p.server_methods(S1).is_empty(), "not relayed to the server");
    // The ACK of the 2xx confirms the session.
    p.terminal_acks(0);
    assert_eq!(p.server_methods(S1), vec!["ACK"]);
}

#[test]
fn a_lost_ack_is_sent_again_when_the_server_repeats_its_2xx_and_a_repeated_terminal_ack_is_not_relayed(
) {
    let mut p = Pair::established(ONE);
    assert_eq!(p.server_methods(S1), vec!["ACK"]);
    // Our ACK was lost: the server's 2xx comes again, on the leg or as a stray.
    p.server_answers(0, 200);
    let side = &p.legs[0].1;
    let mut again = message::response_for(&side.invite, 200, None, Some(&side.tag));
    again.body = Vec::new();
    let dialog = DialogId::of_response(&again);
    p.input(Input::Stray {
        resp: again,
        dialog,
    });
    assert_eq!(p.server_methods(S1), vec!["ACK", "ACK", "ACK"]);
    let acks: Vec<&Got> = p.server_got(S1).iter().collect();
    let (Got::Ack(a), Got::Ack(b)) = (acks[0], acks[1]) else {
        panic!()
    };
    assert_eq!(
        a.to_string(),
        b.to_string(),
        "the same ACK again (RFC 3261 §13.2.2.4)"
    );
    // The terminal's ACK comes twice (its 2xx was retransmitted): the server gets no more.
    p.terminal_acks(0);
    assert_eq!(p.server_methods(S1).len(), 3);
    assert_eq!(p.records.len(), 0);
    assert_eq!(p.open.len(), 1);
}

#[test]
fn a_cancel_before_any_answer_cancels_the_leg_once_it_rings_and_bills_nothing() {
    let mut p = Pair::new(ONE, Strategy::First);
    p.server_answers(0, 100);
    let cancel = p.terminal_cancels();
    assert_eq!(p.answer_to(cancel), Some(200));
    assert!(
        p.server_methods(S1).is_empty(),
        "no CANCEL before a provisional (RFC 3261 §9.1)"
    );
    p.server_answers(0, 180);
    assert_eq!(p.server_methods(S1), vec!["CANCEL"]);
    p.server_answers(0, 487);
    assert_eq!(p.invite_finals(), vec![487]);
    assert!(p.records.is_empty() && p.open.is_empty());
    assert!(p.call.is_finished());
}

#[test]
fn a_2xx_that_crosses_the_cancel_is_acked_and_hung_up_and_bills_nothing() {
    let mut p = Pair::new(ONE, Strategy::First);
    p.server_answers(0, 180);
    p.terminal_cancels();
    // The server answered 2xx before it got our CANCEL.
    p.server_answers(0, 200);
    assert_eq!(p.server_methods(S1), vec!["CANCEL", "ACK", "BYE"]);
    assert_eq!(p.invite_finals(), vec![487]);
    assert!(p.open.is_empty() && p.records.is_empty());
}

#[test]
fn a_cancel_while_the_2xx_is_being_journaled_loses_the_race_and_the_session_is_billed() {
    let mut p = Pair::new(ONE, Strategy::First);
    p.server_answers(0, 180);
    p.store = Store::Hold;
    p.server_answers(0, 200);
    let cancel = p.terminal_cancels();
    assert_eq!(p.answer_to(cancel), Some(200));
    assert!(p.invite_finals().is_empty());
    p.release_billing();
    assert_eq!(
        p.invite_finals(),
        vec![200],
        "the 2xx decided before the CANCEL goes out"
    );
    p.advance(Duration::from_secs(5));
    p.terminal_sends(0, "BYE", "", "");
    assert_eq!(p.records.len(), 1);
    assert_eq!(p.records[0].duration_ms, 5_000);
}

#[test]
fn a_bye_before_the_ack_acks_the_server_then_hangs_up_and_bills_from_the_2xx() {
    let mut p = Pair::new(ONE, Strategy::First);
    p.server_answers(0, 200);
    p.advance(Duration::from_secs(2));
    let bye = p.terminal_sends(0, "BYE", "", "");
    assert_eq!(p.answer_to(bye), Some(200));
    assert_eq!(p.server_methods(S1), vec!["ACK", "BYE"]);
    assert_eq!(p.records[0].cause, EndCause::CallerBye);
    assert_eq!(p.records[0].duration_ms, 2_000);
}

#[test]
fn a_terminal_that_never_acks_is_hung_up_after_64_t1_and_billed_for_that_time() {
    let mut p = Pair::new(ONE, Strategy::First);
    p.server_answers(0, 200);
    p.advance(Duration::from_millis(31_999));
    assert!(p.records.is_empty());
    p.advance(Duration::from_millis(1));
    assert_eq!(p.server_methods(S1), vec!["ACK", "BYE"]);
    assert_eq!(p.terminal_methods(), vec!["BYE"]);
    assert_eq!(
        p.records.len(),
        1,
        "service delivered with the 2xx is billed"
    );
    assert_eq!(
        (p.records[0].cause, p.records[0].duration_ms),
        (EndCause::Timeout, 32_000)
    );
}

#[test]
fn a_server_bye_while_the_session_is_journaled_waits_for_the_2xx_and_then_ends_it() {
    let mut p = Pair::new(ONE, Strategy::First);
    p.store = Store::Hold;
    p.server_answers(0, 200);
    let bye = p.server_request(0, "BYE", "");
    assert_eq!(p.answer_to(bye), None);
    p.release_billing();
    assert_eq!(p.invite_finals(), vec![200]);
    assert_eq!(p.answer_to(bye), Some(200));
    assert_eq!(p.terminal_methods(), vec!["BYE"]);
    assert_eq!(p.records[0].cause, EndCause::ServerBye);
}

#[test]
fn a_journal_that_cannot_be_written_refuses_the_call_and_hangs_up_the_server() {
    let mut p = Pair::new(ONE, Strategy::First);
    p.store = Store::Fail;
    p.server_answers(0, 200);
    assert_eq!(p.invite_finals(), vec![500]);
    assert_eq!(p.server_methods(S1), vec!["ACK", "BYE"]);
    assert!(p.env.served.borrow().is_empty());
    assert_eq!(p.env.active("sip:127.0.0.1:5081"), 0);
    assert!(p.call.is_finished());
}

#[test]
fn a_record_that_cannot_be_written_answers_the_bye_500() {
    let mut p = Pair::established(ONE);
    p.store = Store::Fail;
    let bye = p.terminal_sends(0, "BYE", "", "");
    assert_eq!(p.answer_to(bye), Some(500));
}

#[test]
fn a_leg_that_stops_answering_probes_ends_the_session_billed_to_its_last_answer() {
    let mut p = Pair::established(ONE);
    // The first round at 30 s: both legs answer.
    p.advance(Duration::from_secs(30));
    assert_eq!(p.server_methods(S1), vec!["ACK", "OPTIONS"]);
    assert_eq!(p.terminal_methods(), vec!["OPTIONS"]);
    p.server_answers_request(S1, 200);
    p.terminal_answers_request_with(200, "");
    // The second at 60 s: the server's transaction times out 32 s later (408).
    p.advance(Duration::from_secs(30));
    assert_eq!(count(&p.server_methods(S1), "OPTIONS"), 2);
    p.advance(Duration::from_secs(32));
    assert!(p.records.is_empty(), "nothing ends before the answer");
    p.server_answers_request(S1, 408);
    assert_eq!(p.records[0].cause, EndCause::Timeout);
    // Billed up to the server's last answer (30 s), not to the 408 (92 s): nothing was
    // delivered after it.
    assert_eq!(p.records[0].duration_ms, 30_000);
    assert_eq!(count(&p.terminal_methods(), "BYE"), 1);
}

#[test]
fn a_leg_with_a_session_timer_is_not_probed() {
    // The terminal refreshes its own leg; the server's 2xx has no timer (sipp's, say).
    // Probes on, every 30 s.
    let mut env = timer_env();
    env.limits.probe_interval = Duration::from_secs(30);
    let mut p = Pair::with_invite(env, Strategy::First, TERMINAL_REFRESHES);
    p.server_answers_with(0, 200, "");
    p.terminal_acks(0);
    p.advance(Duration::from_secs(30));
    assert_eq!(
        count(&p.terminal_methods(), "OPTIONS"),
        0,
        "the timer watches it"
    );
    assert_eq!(
        count(&p.server_methods(S1), "OPTIONS"),
        1,
        "no timer: probed"
    );
}

#[test]
fn durations_come_from_the_monotonic_clock_not_the_wall_clock() {
    // The call's wall-clock epoch is fixed; only the virtual monotonic clock moves. A wall
    // clock stepped meanwhile (NTP) is never read again, so the bill is the time elapsed.
    let mut p = Pair::established(ONE);
    p.advance(Duration::from_millis(61_250));
    p.terminal_sends(0, "BYE", "", "");
    let start = &p.records[0];
    assert_eq!(start.duration_ms, 61_250);
}

// --- server-leg requests: matched by full dialog id and address ---

#[test]
fn server_leg_requests_need_the_whole_dialog_id_and_the_servers_address() {
    let mut p = Pair::established(ONE);
    let charge = "Content-Type: application/vnd.relay.charge+json\r\n";
    // From another address: as if it did not exist.
    let tx = p.server_request_from(0, "BYE", "", "127.0.0.9:5081");
    assert_eq!(p.answer_to(tx), Some(481));
    let tx = p.server_request_from(0, "MESSAGE", charge, "127.0.0.9:5081");
    assert_eq!(p.answer_to(tx), Some(481));
    assert!(p.charges.is_empty());
    // With a wrong tag: the same.
    let real = std::mem::replace(&mut p.legs[0].1.tag, "guessed".into());
    let tx = p.server_request(0, "BYE", "");
    assert_eq!(p.answer_to(tx), Some(481));
    p.legs[0].1.tag = real;
    assert!(p.records.is_empty());
    // The server itself, in its dialog: a charge goes to charging, a BYE ends the session.
    p.server_request(0, "MESSAGE", charge);
    assert_eq!(p.charges.len(), 1);
    p.server_request(0, "BYE", "");
    assert_eq!(p.records[0].cause, EndCause::ServerBye);
}

// --- in-dialog requests, re-INVITE glare ---

#[test]
fn an_in_dialog_request_is_relayed_and_its_answer_relayed_back_and_a_reinvite_asserts_the_service()
{
    let mut p = Pair::established(ONE);
    let info = p.terminal_sends(0, "INFO", "", "");
    assert_eq!(p.server_methods(S1), vec!["ACK", "INFO"]);
    p.server_answers_request(S1, 200);
    assert_eq!(p.answer_to(info), Some(200));
    let sdp_header = "Content-Type: application/sdp\r\n";
    let reinvite = p.terminal_sends(0, "INVITE", sdp_header, SDP);
    let Some(Got::Request(sent, _)) = p.server_got(S1).last() else {
        panic!()
    };
    assert_eq!(
        header(&sent.headers, "P-Asserted-Service").as_deref(),
        Some("echo")
    );
    p.server_answers_request(S1, 200);
    assert_eq!(p.answer_to(reinvite), Some(200));
    // The terminal's ACK of that 2xx follows to the server.
    let tag = p.a_tag(0);
    let ack = p.terminal_message("ACK", &tag, p.terminal_cseq, "", "");
    let dialog = DialogId::of_incoming_request(&ack);
    p.input(Input::Ack { req: ack, dialog });
    assert_eq!(p.server_methods(S1), vec!["ACK", "INFO", "INVITE", "ACK"]);
    assert_eq!(p.open.len(), 1, "a plain re-INVITE bills nothing new");
}

#[test]
fn a_reinvite_whose_offer_names_another_service_is_refused_488() {
    let mut p = Pair::established(TWO);
    let offer = format!("{SDP}a=service:clock\r\n");
    let tx = p.terminal_sends(0, "INVITE", "Content-Type: application/sdp\r\n", &offer);
    assert_eq!(p.answer_to(tx), Some(488));
    assert_eq!(p.server_methods(S1), vec!["ACK"], "nothing relayed");
}

#[test]
fn a_second_change_while_one_is_in_progress_gets_491_and_so_does_a_request_before_the_ack() {
    let mut p = Pair::established(TWO);
    let first = p.terminal_sends(0, "INVITE", "P-Preferred-Service: clock\r\n", "");
    let glare = p.terminal_sends(0, "INVITE", "P-Preferred-Service: clock;tz=utc\r\n", "");
    assert_eq!(p.answer_to(glare), Some(491));
    assert_eq!(p.answer_to(first), None);
    let mut q = Pair::new(ONE, Strategy::First);
    q.server_answers(0, 200);
    let early = q.terminal_sends(0, "INFO", "", "");
    assert_eq!(q.answer_to(early), Some(491));
}

// --- claim 5: change of service ---

#[test]
fn a_change_on_the_same_server_closes_the_segment_and_bills_the_new_service_on_the_plan_the_rules_give(
) {
    let mut env = TestEnv::new(TWO);
    env.plans.insert("clock".into(), "premium".into());
    let mut p = Pair::with_env(env, Strategy::First);
    p.server_answers(0, 200);
    p.terminal_acks(0);
    p.advance(Duration::from_secs(4));
    let change = p.terminal_sends(0, "INVITE", "P-Preferred-Service: clock\r\n", "");
    let Some(Got::Request(sent, _)) = p.server_got(S1).last() else {
        panic!()
    };
    assert_eq!(sent.method, Method::Invite);
    assert_eq!(
        header(&sent.headers, "P-Asserted-Service").as_deref(),
        Some("clock")
    );
    let served = |p: &Pair| -> Vec<String> { p.env.served.borrow().keys().cloned().collect() };
    let first = served(&p);
    assert_eq!(first.len(), 1);
    p.store = Store::Hold;
    p.server_answers_request(S1, 200);
    assert_eq!(
        p.answer_to(change),
        None,
        "the terminal hears the 2xx once the new segment is committed"
    );
    assert_eq!(
        served(&p),
        first,
        "the closing segment is chargeable until its record is committed"
    );
    p.release_billing();
    assert_eq!(p.answer_to(change), Some(200));
    let second = served(&p);
    assert!(
        second.len() == 1 && second != first,
        "then the new segment is, alone: {first:?} -> {second:?}"
    );
    p.advance(Duration::from_secs(6));
    p.terminal_sends(0, "BYE", "", "");
    let got: Vec<(&str, &str, EndCause, i64)> = p
        .records
        .iter()
        .map(|r| (r.service.as_str(), r.plan.as_str(), r.cause, r.duration_ms))
        .collect();
    assert_eq!(
        got,
        vec![
            ("echo", "basic", EndCause::Changed, 4_000),
            ("clock", "premium", EndCause::CallerBye, 6_000)
        ]
    );
}

#[test]
fn a_change_the_rules_refuse_leaves_the_session_as_it_was() {
    let mut env = TestEnv::new(TWO);
    env.refused.push(("clock".into(), 403));
    let mut p = Pair::with_env(env, Strategy::First);
    p.server_answers(0, 200);
    p.terminal_acks(0);
    let change = p.terminal_sends(0, "INVITE", "P-Preferred-Service: clock\r\n", "");
    assert_eq!(p.answer_to(change), Some(403));
    assert_eq!(p.server_methods(S1), vec!["ACK"]);
    p.terminal_sends(0, "BYE", "", "");
    assert_eq!(p.records.len(), 1);
    assert_eq!(p.records[0].service, "echo");
}

#[test]
fn a_change_onto_another_server_moves_the_session_and_a_refused_one_rolls_back() {
    let servers: &[(&str, &[&str])] = &[
        ("sip:127.0.0.1:5081", &["echo"]),
        ("sip:127.0.0.1:5082", &["clock"]),
    ];
    let mut p = Pair::established(servers);
    // Refused by the other server: the session stays as it was.
    let change = p.terminal_sends(0, "INVITE", "P-Preferred-Service: clock\r\n", "");
    assert_eq!(p.legs.len(), 2);
    p.server_answers(1, 486);
    assert_eq!(p.answer_to(change), Some(486));
    assert_eq!(p.open.len(), 1);
    // Asked again and accepted: the new leg is ACKed, the old one hung up.
    let change = p.terminal_sends(0, "INVITE", "P-Preferred-Service: clock\r\n", "");
    p.server_answers(2, 200);
    assert_eq!(p.answer_to(change), Some(200));
    assert_eq!(p.server_methods(S1), vec!["ACK", "BYE"]);
    assert_eq!(p.server_methods(S2), vec!["ACK"]);
    assert_eq!(
        (
            p.env.active("sip:127.0.0.1:5081"),
            p.env.active("sip:127.0.0.1:5082")
        ),
        (0, 1)
    );
    p.terminal_sends(0, "BYE", "", "");
    assert_eq!(p.server_methods(S2), vec!["ACK", "BYE"]);
    let servers: Vec<&str> = p.records.iter().map(|r| r.server.as_str()).collect();
    assert_eq!(servers, vec!["sip:127.0.0.1:5081", "sip:127.0.0.1:5082"]);
}

// --- claim 6: transfer ---

fn refer(to: &str) -> String {
    format!("Refer-To: <sip:{to}@relay.test>\r\n")
}

fn notify_fragments(p: &Pair) -> Vec<String> {
    p.terminal
        .iter()
        .filter_map(|g| match g {
            Got::Request(r, _) if r.method == Method::Notify => {
                Some(String::from_utf8_lossy(&r.body).trim().to_string())
            }
            _ => None,
        })
        .collect()
}

#[test]
fn a_transfer_moves_the_session_to_the_second_server_and_reinvites_the_terminal() {
    let mut p = Pair::established(TWO);
    p.advance(Duration::from_secs(5));
    let tx = p.terminal_sends(0, "REFER", &refer("echo"), "");
    assert_eq!(p.answer_to(tx), Some(202));
    assert_eq!(p.legs.len(), 2);
    assert_eq!(
        p.legs[1].1.peer.addr.to_string(),
        S2,
        "another server than the current"
    );
    p.server_answers(1, 200);
    assert_eq!(
        notify_fragments(&p),
        vec!["SIP/2.0 100 Trying", "SIP/2.0 200 OK"]
    );
    assert_eq!(p.server_methods(S1), vec!["ACK", "BYE"]);
    assert_eq!(p.terminal_methods(), vec!["NOTIFY", "NOTIFY", "INVITE"]);
    // The terminal takes the new SDP; the relay ACKs it.
    let Some(Got::Request(reinvite, Some(token))) = p
        .terminal
        .iter()
        .rev()
        .find(|g| matches!(g, Got::Request(r, _) if r.method == Method::Invite))
        .cloned()
    else {
        panic!()
    };
    let resp = message::response_for(&reinvite, 200, None, None);
    p.input(Input::Answered { token, resp });
    assert_eq!(p.terminal_methods().last().map(String::as_str), Some("ACK"));
    p.advance(Duration::from_secs(3));
    p.terminal_sends(0, "BYE", "", "");
    let got: Vec<(&str, EndCause, i64)> = p
        .records
        .iter()
        .map(|r| (r.server.as_str(), r.cause, r.duration_ms))
        .collect();
    assert_eq!(
        got,
        vec![
            ("sip:127.0.0.1:5081", EndCause::Transferred, 5_000),
            ("sip:127.0.0.1:5082", EndCause::CallerBye, 3_000)
        ]
    );
}

#[test]
fn a_transfer_target_that_refuses_leaves_the_session_on_the_first_server() {
    let mut p = Pair::established(TWO);
    p.terminal_sends(0, "REFER", &refer("echo"), "");
    p.server_answers(1, 486);
    assert_eq!(
        notify_fragments(&p),
        vec!["SIP/2.0 100 Trying", "SIP/2.0 486 Busy Here"]
    );
    assert_eq!(p.server_methods(S1), vec!["ACK"], "the first leg untouched");
    p.advance(Duration::from_secs(9));
    p.terminal_sends(0, "BYE", "", "");
    assert_eq!(p.records.len(), 1);
    assert_eq!(
        (p.records[0].server.as_str(), p.records[0].duration_ms),
        ("sip:127.0.0.1:5081", 9_000)
    );
}

#[test]
fn a_server_that_hangs_up_during_a_transfer_ends_the_session_and_the_late_answer_is_hung_up() {
    let mut p = Pair::established(TWO);
    p.advance(Duration::from_secs(2));
    p.terminal_sends(0, "REFER", &refer("echo"), "");
    p.server_request(0, "BYE", "");
    assert_eq!(p.records.len(), 1);
    assert_eq!(
        (p.records[0].cause, p.records[0].duration_ms),
        (EndCause::ServerBye, 2_000)
    );
    p.server_answers(1, 200);
    assert_eq!(
        p.server_methods(S2),
        vec!["ACK", "BYE"],
        "the second server is not left up"
    );
    assert_eq!(p.records.len(), 1, "no second segment");
    assert!(p.open.is_empty());
    assert_eq!(p.env.active("sip:127.0.0.1:5082"), 0);
}

#[test]
fn a_transfer_the_rules_refuse_is_refused_before_the_202() {
    let mut env = TestEnv::new(TWO);
    env.refused.push(("clock".into(), 403));
    let mut p = Pair::with_env(env, Strategy::First);
    p.server_answers(0, 200);
    p.terminal_acks(0);
    let tx = p.terminal_sends(0, "REFER", &refer("clock"), "");
    assert_eq!(p.answer_to(tx), Some(403));
    assert_eq!(p.legs.len(), 1);
}

// --- claim 7: fork ---

#[test]
fn a_fork_where_one_server_answers_2xx_and_another_486_gives_one_session() {
    let mut p = Pair::new(TWO, Strategy::All);
    assert_eq!(p.legs.len(), 2, "both asked at once");
    p.server_answers(1, 486);
    assert!(
        p.invite_finals().is_empty(),
        "one refusal does not fail the request"
    );
    p.server_answers(0, 200);
    assert_eq!(p.invite_finals(), vec![200]);
    p.terminal_acks(0);
    p.terminal_sends(0, "BYE", "", "");
    assert_eq!(p.records.len(), 1);
    assert_eq!(p.records[0].server, "sip:127.0.0.1:5081");
}

#[test]
fn a_fork_where_both_answer_gives_two_sessions_each_billed() {
    let mut p = Pair::new(TWO, Strategy::All);
    p.server_answers(0, 200);
    p.server_answers(1, 200);
    assert_eq!(p.invite_finals(), vec![200, 200]);
    assert_ne!(p.a_tag(0), p.a_tag(1), "each 2xx with its own To tag");
    p.terminal_acks(0);
    p.terminal_acks(1);
    p.advance(Duration::from_secs(1));
    p.terminal_sends(0, "BYE", "", "");
    p.advance(Duration::from_secs(1));
    p.terminal_sends(1, "BYE", "", "");
    let durations: Vec<i64> = p.records.iter().map(|r| r.duration_ms).collect();
    assert_eq!(durations, vec![1_000, 2_000]);
}

#[test]
fn a_forks_further_2xx_is_sent_by_the_call_and_resent_over_udp_until_its_ack() {
    let stateless = |p: &Pair| {
        p.trace
            .iter()
            .filter(|t| t.as_str() == "terminal<-200 INVITE stateless")
            .count()
    };
    let mut p = Pair::new(TWO, Strategy::All);
    p.server_answers(0, 200);
    p.terminal_acks(0);
    assert_eq!(
        stateless(&p),
        0,
        "the first 2xx goes on the INVITE transaction"
    );
    // Over TCP the transaction is gone with the first ACK: the second 2xx must not
    // depend on it.
    p.server_answers(1, 200);
    assert_eq!(p.invite_finals(), vec![200, 200]);
    assert_eq!(
        stateless(&p),
        1,
        "the further 2xx goes out by the call itself"
    );
    // T1 = 500 ms (ack_timeout / 64), then 1 s, 2 s, 4 s, 4 s (capped at T2).
    let mut sent = Vec::new();
    for _ in 0..6 {
        p.advance(Duration::from_millis(500));
        sent.push(stateless(&p));
    }
    assert_eq!(sent, vec![2, 2, 3, 3, 3, 3], "resent at 0.5 s and 1.5 s");
    p.advance(Duration::from_millis(500));
    assert_eq!(stateless(&p), 4, "and at 3.5 s");
    p.terminal_acks(1);
    p.advance(Duration::from_secs(20));
    assert_eq!(stateless(&p), 4, "no resend after its ACK");
    p.terminal_sends(1, "BYE", "", "");
    assert_eq!(
        p.records.len(),
        1,
        "the second session established and billed"
    );
}

#[test]
fn a_fork_where_all_refuse_answers_the_best_response_and_a_fork_timeout_cancels_the_rest() {
    let mut p = Pair::new(TWO, Strategy::All);
    p.server_answers(0, 503);
    p.server_answers(1, 486);
    assert_eq!(
        p.invite_finals(),
        vec![486],
        "4xx before 5xx (RFC 3261 §16.7)"
    );
    let mut q = Pair::new(TWO, Strategy::All);
    q.server_answers(0, 180);
    q.server_answers(1, 180);
    q.advance(Duration::from_secs(30));
    assert_eq!(q.server_methods(S1), vec!["CANCEL"]);
    assert_eq!(q.server_methods(S2), vec!["CANCEL"]);
}

#[test]
fn shutdown_ends_live_sessions_and_refuses_a_call_still_inquiring() {
    let mut p = Pair::established(ONE);
    p.advance(Duration::from_secs(1));
    p.input(Input::Shutdown);
    assert_eq!(p.records[0].cause, EndCause::RelayShutdown);
    assert!(p.call.is_finished());
    let mut q = Pair::new(ONE, Strategy::First);
    q.server_answers(0, 180);
    q.input(Input::Shutdown);
    assert_eq!(q.invite_finals(), vec![503]);
}

#[test]
fn an_operator_ends_one_session_billed_admin_with_a_bye_on_both_legs() {
    let mut p = Pair::established(ONE);
    p.advance(Duration::from_secs(2));
    p.input(Input::End {
        session_id: "no-such-session".into(),
    });
    assert!(p.records.is_empty(), "an unknown id ends nothing");
    let id = p.open.keys().next().cloned().expect("a live session");
    p.input(Input::End { session_id: id });
    assert_eq!(p.records.len(), 1);
    assert_eq!(p.records[0].cause, EndCause::Admin);
    assert!(p.records[0].duration_ms >= 2000, "{:?}", p.records[0]);
    assert!(p.terminal_methods().contains(&"BYE".to_string()));
    assert!(p.server_methods(S1).contains(&"BYE".to_string()));
}

#[test]
fn a_forks_two_answers_are_journaled_side_by_side_and_both_relayed() {
    let mut p = Pair::new(TWO, Strategy::All);
    p.store = Store::Hold;
    p.server_answers(0, 200);
    p.server_answers(1, 200);
    assert_eq!(
        p.held.len(),
        2,
        "the second journal does not wait for the first"
    );
    p.release_billing();
    assert_eq!(p.invite_finals(), vec![200, 200]);
}

// --- issue 14, finding 10: the subscriber's session slots ---

#[test]
fn the_slot_admission_took_is_kept_by_the_session_from_its_2xx_to_its_end() {
    let mut p = Pair::new(ONE, Strategy::First);
    assert_eq!(p.env.slots_held(), 1, "admission took one for the call");
    p.server_answers(0, 180);
    p.server_answers(0, 200);
    assert_eq!(p.env.slots_held(), 1, "the session keeps the call's slot");
    p.terminal_acks(0);
    p.terminal_sends(0, "BYE", "", "");
    assert_eq!(p.env.slots_held(), 0, "the session's end gives it back");
    assert!(p.call.is_finished());
}

#[test]
fn a_call_that_ends_without_a_session_gives_its_slot_back() {
    // Every server refuses.
    let mut p = Pair::new(TWO, Strategy::First);
    p.server_answers(0, 486);
    assert_eq!(p.env.slots_held(), 1, "still inquiring");
    p.server_answers(1, 503);
    assert_eq!(p.invite_finals(), vec![480]);
    assert_eq!(p.env.slots_held(), 0);
    assert!(p.call.is_finished());
    // No server at all: refused as the call starts.
    let p = Pair::new(&[], Strategy::First);
    assert_eq!(p.invite_finals(), vec![480]);
    assert_eq!(p.env.slots_held(), 0);
    assert!(p.call.is_finished(), "nothing left to wait for");
    // Cancelled.
    let mut p = Pair::new(ONE, Strategy::First);
    p.server_answers(0, 180);
    p.terminal_cancels();
    p.server_answers(0, 487);
    assert_eq!(p.env.slots_held(), 0);
    // The journal cannot be written.
    let mut p = Pair::new(ONE, Strategy::First);
    p.store = Store::Fail;
    p.server_answers(0, 200);
    assert_eq!(p.invite_finals(), vec![500]);
    assert_eq!(p.env.slots_held(), 0);
    // The relay shuts down while the server rings.
    let mut p = Pair::new(ONE, Strategy::First);
    p.server_answers(0, 180);
    p.input(Input::Shutdown);
    assert_eq!(p.env.slots_held(), 0);
}

#[test]
fn each_session_of_a_fork_takes_a_slot_and_an_answer_past_the_limit_is_hung_up() {
    // A limit of 2: both answers become sessions, each holding a slot.
    let mut p = Pair::with_env(TestEnv::new(TWO).with_session_limit(2), Strategy::All);
    p.server_answers(0, 200);
    p.server_answers(1, 200);
    assert_eq!(p.invite_finals(), vec![200, 200]);
    assert_eq!(p.env.slots_held(), 2);
    p.terminal_acks(0);
    p.terminal_acks(1);
    p.terminal_sends(0, "BYE", "", "");
    assert_eq!(p.env.slots_held(), 1);
    p.terminal_sends(1, "BYE", "", "");
    assert_eq!(p.env.slots_held(), 0);

    // A limit of 1: the second answer is confirmed and hung up, never relayed or billed.
    let mut p = Pair::with_env(TestEnv::new(TWO).with_session_limit(1), Strategy::All);
    p.server_answers(0, 200);
    p.server_answers(1, 200);
    assert_eq!(p.invite_finals(), vec![200], "one session only");
    assert_eq!(p.server_methods(S2), vec!["ACK", "BYE"]);
    assert_eq!(p.open.len(), 1, "one session journaled");
    assert_eq!(p.env.active("sip:127.0.0.1:5082"), 0);
    assert_eq!(p.env.slots_held(), 1);
    p.terminal_acks(0);
    p.terminal_sends(0, "BYE", "", "");
    assert_eq!(p.env.slots_held(), 0);
    assert_eq!(p.records.len(), 1);
}

#[test]
fn a_session_moved_by_a_change_or_a_transfer_keeps_its_one_slot() {
    let mut p = Pair::established(TWO);
    assert_eq!(p.env.slots_held(), 1);
    let tx = p.terminal_sends(0, "REFER", &refer("echo"), "");
    assert_eq!(p.answer_to(tx), Some(202));
    p.server_answers(1, 200);
    assert_eq!(p.server_methods(S1), vec!["ACK", "BYE"], "moved to S2");
    assert_eq!(p.env.slots_held(), 1, "still one session");
    p.terminal_sends(0, "BYE", "", "");
    assert_eq!(p.env.slots_held(), 0);
}

// --- session timers (RFC 4028) on both legs ---

/// A terminal that refreshes its own leg (RFC 4028 §7.1: it asks `refresher=uac`).
const TERMINAL_REFRESHES: &str = "Supported: timer\r\nSession-Expires: 120;refresher=uac\r\n";
/// A server that leaves the refreshes to the relay and takes UPDATE.
const SERVER_TIMER: &str = "Session-Expires: 90;refresher=uac\r\nRequire: timer\r\nSupported: timer\r\nAllow: INVITE, ACK, BYE, OPTIONS, UPDATE\r\n";

/// One server, no OPTIONS probes (the timers alone watch the legs), an interval of 120 s
/// asked and 90 s accepted at least.
fn timer_env() -> TestEnv {
    let mut env = TestEnv::new(ONE);
    env.limits.probe_interval = Duration::ZERO;
    env.limits.session_timer = sip_core::dialog::session_timer::Policy {
        session_expires: 120,
        min_se: 90,
    };
    env
}

/// An established session whose terminal INVITE had `invite` and whose server answered
/// with `server` header lines.
fn timed(invite: &str, server: &str) -> Pair {
    let mut p = Pair::with_invite(timer_env(), Strategy::First, invite);
    p.server_answers_with(0, 200, server);
    p.terminal_acks(0);
    p
}

/// The 2xx the terminal got to its INVITE.
fn terminal_2xx(p: &Pair) -> Response {
    p.terminal
        .iter()
        .find_map(|g| match g {
            Got::Response(tx, r) if *tx == p.invite_tx && r.status_code.code() == 200 => {
                Some(r.clone())
            }
            _ => None,
        })
        .expect("no 2xx")
}

fn count(methods: &[String], method: &str) -> usize {
    methods.iter().filter(|m| *m == method).count()
}

/// The last request server `addr` got.
fn last_server_request(p: &Pair, addr: &str) -> Request {
    p.server_got(addr)
        .iter()
        .rev()
        .find_map(|g| match g {
            Got::Request(r, _) => Some(r.clone()),
            _ => None,
        })
        .expect("no request")
}

#[test]
fn session_timers_are_negotiated_on_each_leg_with_their_own_values() {
    let p = timed(TERMINAL_REFRESHES, SERVER_TIMER);
    // The inquiry asks the relay's interval, the relay refreshing (RFC 4028 §7.1).
    let inquiry = &p.legs[0].1.invite.headers;
    assert_eq!(
        header(inquiry, "Session-Expires").as_deref(),
        Some("120;refresher=uac")
    );
    assert_eq!(header(inquiry, "Min-SE").as_deref(), Some("90"));
    assert!(header(inquiry, "Supported").is_some_and(|v| v.contains("timer")));
    assert!(header(inquiry, "Allow").is_some_and(|v| v.contains("UPDATE")));
    // The terminal's 2xx carries its own leg's values, not the server's 90 s (§9), and
    // Require: timer since the terminal refreshes.
    let ok = terminal_2xx(&p);
    assert_eq!(
        header(&ok.headers, "Session-Expires").as_deref(),
        Some("120;refresher=uac")
    );
    assert_eq!(header(&ok.headers, "Require").as_deref(), Some("timer"));
}

#[test]
fn a_terminal_that_knows_no_timers_gets_none_and_never_sees_the_servers() {
    let p = timed("", SERVER_TIMER);
    let ok = terminal_2xx(&p);
    assert_eq!(header(&ok.headers, "Session-Expires"), None);
    assert_eq!(header(&ok.headers, "Require"), None);
    // The in-dialog OPTIONS probes watch it as before (probes are on by default).
    let mut p = Pair::new(ONE, Strategy::First);
    p.server_answers_with(0, 200, SERVER_TIMER);
    p.terminal_acks(0);
    p.advance(Duration::from_secs(30));
    assert_eq!(p.terminal_methods(), vec!["OPTIONS"]);
}

#[test]
fn refreshes_keep_a_session_alive_over_several_intervals() {
    let mut p = timed(TERMINAL_REFRESHES, SERVER_TIMER);
    let mut answered = 0;
    // 600 s: 40 steps of 15 s; the relay refreshes the server every 45 s (half of 90), the
    // terminal refreshes its leg every 60 s with a body-less UPDATE.
    for step in 1..=40 {
        p.advance(Duration::from_secs(15));
        if count(&p.server_methods(S1), "UPDATE") > answered {
            let update = last_server_request(&p, S1);
            assert_eq!(
                header(&update.headers, "Session-Expires").as_deref(),
                Some("90;refresher=uac"),
                "the relay's refresh keeps the server leg's values (§7.4)"
            );
            p.server_answers_request_with(S1, 200, SERVER_TIMER);
            answered += 1;
        }
        if step % 4 == 0 {
            let tx = p.terminal_sends(0, "UPDATE", TERMINAL_REFRESHES, "");
            assert_eq!(p.answer_to(tx), Some(200), "answered by the relay itself");
            let ok = p
                .terminal
                .iter()
                .rev()
                .find_map(|g| match g {
                    Got::Response(t, r) if *t == tx => Some(r.clone()),
                    _ => None,
                })
                .unwrap();
            assert_eq!(
                header(&ok.headers, "Session-Expires").as_deref(),
                Some("120;refresher=uac")
            );
        }
    }
    assert_eq!(answered, 13, "45, 90, …, 585 s");
    let server = p.server_methods(S1);
    assert_eq!(count(&server, "UPDATE"), 13);
    assert_eq!(count(&server, "BYE"), 0, "{server:?}");
    assert!(
        !p.terminal_methods().contains(&"BYE".to_string()),
        "the terminal's UPDATEs went no further than the relay, and nothing ended"
    );
    assert!(p.records.is_empty());
    p.terminal_sends(0, "BYE", "", "");
    assert_eq!(
        (p.records[0].cause, p.records[0].duration_ms),
        (EndCause::CallerBye, 600_000)
    );
}

#[test]
fn a_terminal_that_vanishes_ends_the_session_billed_to_its_last_refresh() {
    let mut p = timed(TERMINAL_REFRESHES, SERVER_TIMER);
    p.advance(Duration::from_secs(45));
    p.server_answers_request_with(S1, 200, SERVER_TIMER);
    p.advance(Duration::from_secs(15));
    let tx = p.terminal_sends(0, "UPDATE", TERMINAL_REFRESHES, "");
    assert_eq!(p.answer_to(tx), Some(200));
    // The terminal refreshed at 60 s and is heard from no more; the relay gives its leg up
    // min(32, 120/3) = 32 s before the end (RFC 4028 §10): at 60 + 88 = 148 s.
    p.advance(Duration::from_secs(30));
    p.server_answers_request_with(S1, 200, SERVER_TIMER);
    p.advance(Duration::from_secs(45));
    p.server_answers_request_with(S1, 200, SERVER_TIMER);
    p.advance(Duration::from_millis(12_999));
    assert!(p.records.is_empty(), "not before the expiry");
    assert!(!p.terminal_methods().contains(&"BYE".to_string()));
    p.advance(Duration::from_millis(1));
    assert_eq!(p.terminal_methods().last().map(String::as_str), Some("BYE"));
    assert_eq!(p.server_methods(S1).last().map(String::as_str), Some("BYE"));
    assert_eq!(p.records.len(), 1);
    assert_eq!(
        (p.records[0].cause, p.records[0].duration_ms),
        (EndCause::Timeout, 60_000),
        "billed up to the terminal's last refresh, not to the expiry"
    );
    assert_eq!(p.env.active("sip:127.0.0.1:5081"), 0);
    assert_eq!(p.env.slots_held(), 0);
}

#[test]
fn a_server_that_stops_answering_refreshes_ends_the_session_billed_to_its_last_refresh() {
    let mut p = timed(TERMINAL_REFRESHES, SERVER_TIMER);
    p.advance(Duration::from_secs(45));
    p.server_answers_request_with(S1, 200, SERVER_TIMER);
    p.advance(Duration::from_secs(15));
    p.terminal_sends(0, "UPDATE", TERMINAL_REFRESHES, "");
    p.advance(Duration::from_secs(30));
    // The refresh at 90 s gets no answer: the transaction times out (408, RFC 4028 §10).
    assert_eq!(count(&p.server_methods(S1), "UPDATE"), 2);
    p.server_answers_request(S1, 408);
    assert_eq!(p.terminal_methods().last().map(String::as_str), Some("BYE"));
    assert_eq!(p.server_methods(S1).last().map(String::as_str), Some("BYE"));
    assert_eq!(
        (p.records[0].cause, p.records[0].duration_ms),
        (EndCause::Timeout, 45_000),
        "billed up to the server leg's last successful refresh"
    );
}

#[test]
fn a_server_without_update_is_refreshed_by_reinvite_and_a_481_ends_the_session() {
    // No UPDATE in its Allow: the relay re-INVITEs it with the terminal's offer.
    let server = "Session-Expires: 90;refresher=uac\r\nRequire: timer\r\n";
    let mut p = timed(TERMINAL_REFRESHES, server);
    p.advance(Duration::from_secs(45));
    let reinvite = last_server_request(&p, S1);
    assert_eq!(reinvite.method, Method::Invite);
    assert_eq!(reinvite.body, SDP.as_bytes(), "the last offer again");
    p.server_answers_request_with(S1, 200, server);
    assert_eq!(
        p.server_methods(S1),
        vec!["ACK", "INVITE", "ACK"],
        "its 2xx ACKed"
    );
    p.advance(Duration::from_secs(15));
    p.terminal_sends(0, "UPDATE", TERMINAL_REFRESHES, "");
    p.advance(Duration::from_secs(30));
    // The server lost the dialog (it restarted): 481.
    p.server_answers_request(S1, 481);
    assert_eq!(
        (p.records[0].cause, p.records[0].duration_ms),
        (EndCause::Timeout, 45_000)
    );
}

#[test]
fn the_relay_refreshes_a_terminal_that_asks_it_to_with_the_servers_sdp() {
    // The terminal asks the relay to refresh and takes no UPDATE; the server has no timer.
    let mut p = timed(
        "Supported: timer\r\nSession-Expires: 120;refresher=uas\r\n",
        "",
    );
    let ok = terminal_2xx(&p);
    assert_eq!(
        header(&ok.headers, "Session-Expires").as_deref(),
        Some("120;refresher=uas")
    );
    assert_eq!(header(&ok.headers, "Require"), None);
    p.advance(Duration::from_secs(60));
    let reinvite = p
        .terminal
        .iter()
        .rev()
        .find_map(|g| match g {
            Got::Request(r, Some(_)) => Some(r.clone()),
            _ => None,
        })
        .expect("a refresh");
    assert_eq!(reinvite.method, Method::Invite);
    assert_eq!(reinvite.body, ok.body, "the SDP the terminal was given");
    assert_eq!(
        header(&reinvite.headers, "Session-Expires").as_deref(),
        Some("120;refresher=uac")
    );
    p.terminal_answers_request_with(200, "Session-Expires: 120;refresher=uac\r\n");
    assert_eq!(p.terminal_methods(), vec!["INVITE", "ACK"]);
    assert!(
        p.server_methods(S1) == vec!["ACK"],
        "the server leg is not touched"
    );
    // The next refresh at 120 s goes unanswered.
    p.advance(Duration::from_secs(60));
    assert_eq!(count(&p.terminal_methods(), "INVITE"), 2);
    p.terminal_answers_request_with(408, "");
    assert_eq!(
        (p.records[0].cause, p.records[0].duration_ms),
        (EndCause::Timeout, 60_000)
    );
    assert_eq!(p.server_methods(S1), vec!["ACK", "BYE"]);
}

#[test]
fn too_small_an_interval_is_refused_422_and_a_servers_422_is_asked_again() {
    // The terminal's: 422 with our Min-SE, before any server is asked (RFC 4028 §6).
    let p = Pair::with_invite(
        timer_env(),
        Strategy::First,
        "Supported: timer\r\nSession-Expires: 60\r\n",
    );
    assert_eq!(p.invite_finals(), vec![422]);
    let refusal = p
        .terminal
        .iter()
        .find_map(|g| match g {
            Got::Response(_, r) => Some(r.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(header(&refusal.headers, "Min-SE").as_deref(), Some("90"));
    assert!(p.legs.is_empty());
    assert_eq!(p.env.slots_held(), 0, "the slot went back");
    assert!(p.call.is_finished());

    // A server's: asked again with its Min-SE (§7.3), and the session goes on.
    let mut p = Pair::with_invite(timer_env(), Strategy::First, TERMINAL_REFRESHES);
    p.server_answers_with(0, 422, "Min-SE: 300\r\n");
    assert_eq!(p.legs.len(), 2, "one more INVITE");
    assert!(p.invite_finals().is_empty());
    assert_eq!(
        header(&p.legs[1].1.invite.headers, "Session-Expires").as_deref(),
        Some("300;refresher=uac")
    );
    p.server_answers_with(1, 200, "Session-Expires: 300;refresher=uac\r\n");
    assert_eq!(p.invite_finals(), vec![200]);
    // A second 422 is not asked again: relayed.
    let mut p = Pair::with_invite(timer_env(), Strategy::First, TERMINAL_REFRESHES);
    p.server_answers_with(0, 422, "Min-SE: 300\r\n");
    p.server_answers_with(1, 422, "Min-SE: 300\r\n");
    assert_eq!(p.invite_finals(), vec![422]);

    // A refresh with too small an interval, mid-session: 422, the session goes on.
    let mut p = timed(TERMINAL_REFRESHES, SERVER_TIMER);
    let tx = p.terminal_sends(
        0,
        "UPDATE",
        "Supported: timer\r\nSession-Expires: 30\r\n",
        "",
    );
    assert_eq!(p.answer_to(tx), Some(422));
    assert!(p.records.is_empty());
}

// --- memory (issue 13) ---

/// What every live session holds for its life: the `Session` (its two dialogs inline, each
/// with its text in one allocation) and the call (boxed with its driver on a runner).
/// jemalloc serves 512 bytes from its 512-byte class, 513 from the 640-byte one: a field
/// more is 128 bytes more per session.
#[test]
fn a_session_fits_512_bytes_and_a_call_under_600() {
    assert!(std::mem::size_of::<super::session::Session>() <= 512);
    assert!(std::mem::size_of::<sip_core::dialog::Dialog>() <= 64);
    assert!(std::mem::size_of::<super::Call>() <= 600);
}

/// A 2xx that comes after its INVITE transaction ended reaches the call as a stray
/// response: the initial INVITE's gets the leg's ACK again, a later re-INVITE's an ACK with
/// its own number, and a 2xx to anything but an INVITE no ACK at all.
#[test]
fn a_stray_2xx_is_acked_with_the_number_of_the_invite_it_answers() {
    let mut p = Pair::established(ONE);
    let (_, side) = &p.legs[0];
    let answer = |cseq: &str| {
        let mut resp = message::response_for(&side.invite, 200, None, Some(&side.tag));
        for h in resp.headers.iter_mut() {
            if let Header::CSeq(c) = h {
                *c = rsip::headers::CSeq::new(cseq);
            }
        }
        resp
    };
    let (first, refresh, bye) = (answer("1 INVITE"), answer("2 INVITE"), answer("3 BYE"));
    let dialog = sip_core::dialog::DialogId::of_response(&first);
    assert!(dialog.is_some());
    for resp in [first, refresh, bye] {
        p.input(Input::Stray {
            resp,
            dialog: dialog.clone(),
        });
    }
    let cseqs: Vec<String> = p
        .server_got(S1)
        .iter()
        .filter_map(|g| match g {
            Got::Ack(ack) => ack.headers.iter().find_map(|h| match h {
                Header::CSeq(c) => Some(rsip::prelude::UntypedHeader::value(c).to_string()),
                _ => None,
            }),
            _ => None,
        })
        .collect();
    assert_eq!(cseqs, ["1 ACK", "1 ACK", "2 ACK"]);
}

#[test]
fn the_search_is_let_go_when_the_inquiry_is_over() {
    // Sequential search over two servers: the first answers, the second is never asked.
    let mut p = Pair::new(TWO, Strategy::First);
    assert_eq!(p.call.inquiry.candidates.len(), 1);
    p.server_answers(0, 200);
    p.terminal_acks(0);
    assert_eq!(p.call.sessions.len(), 1);
    assert_eq!(p.call.inquiry.candidates.capacity(), 0);
    assert_eq!(p.call.inquiry.failures.capacity(), 0);
}

#[test]
fn a_call_with_one_session_keeps_room_for_that_one_only() {
    let p = Pair::established(ONE);
    assert_eq!(p.call.sessions.len(), 1);
    // A Vec's first push makes room for four; a session is near a kilobyte, kept as long as
    // the call lives.
    assert_eq!(p.call.sessions.capacity(), 1);
}

#[test]
fn the_server_legs_ack_is_built_again_for_each_repeated_2xx_not_kept() {
    let mut p = Pair::established(ONE);
    assert!(p.call.sessions[0].b.is_acked());
    // The server's 2xx comes again (our ACK was lost): ACKed again, then and later (a
    // server that never got an ACK goes on for 64·T1, and the leg keeps no bytes for it).
    p.server_answers(0, 200);
    p.advance(Duration::from_secs(40));
    p.server_answers(0, 200);
    // Each time the same ACK (RFC 3261 §13.2.2.4): the INVITE's CSeq number, the dialog's
    // tags and target, the same branch.
    let acks: Vec<String> = p
        .server_got(S1)
        .iter()
        .filter_map(|g| match g {
            Got::Ack(ack) => Some(ack.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(acks.len(), 3, "{acks:#?}");
    assert!(acks[0].contains("CSeq: 1 ACK"), "{}", acks[0]);
    assert!(acks.iter().all(|a| *a == acks[0]), "{acks:#?}");
    assert_eq!(p.call.sessions[0].state, State::Established);
    p.terminal_sends(0, "BYE", "", "");
    assert_eq!(p.records.len(), 1);
}
