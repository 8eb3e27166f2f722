//! A client and a server `TransactionLayer` joined by a scripted link that drops, delays,
//! reorders and duplicates datagrams by a seeded schedule. A virtual clock jumps from one
//! deadline (either layer's timer, the next arrival, the UAS's next answer) to the next:
//! thousands of simulated calls run in well under a second, with no sleeping.
//!
//! The UAC and UAS around the layers are the smallest that exercise them: the UAC ACKs every
//! 2xx itself (re-ACKing retransmissions) and then hangs up with BYE; the UAS answers INVITE
//! after a delay (so that the layer's own 100 Trying goes out), BYE and OPTIONS at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sip_core::message::{new_branch, response_for};
use sip_core::rsip::{self, Request, Response, SipMessage};
use sip_core::transaction::{ClientTxId, Event, Output, ServerTxId, Timers, TransactionLayer};
use sip_core::{Peer, Transport};

const UAC_ADDR: &str = "10.0.0.1:5060";
const UAS_ADDR: &str = "10.0.0.2:5060";

fn peer(transport: Transport, addr: &str) -> Peer {
    let addr: SocketAddr = addr.parse().unwrap();
    Peer {
        transport,
        addr,
        conn: None,
    }
}

fn parse_request(text: &str) -> Request {
    match SipMessage::try_from(text) {
        Ok(SipMessage::Request(r)) => r,
        other => panic!("bad test request: {other:?}"),
    }
}

fn request(
    method: &str,
    branch: &str,
    cseq: u32,
    to_tag: Option<&str>,
    transport: Transport,
) -> Request {
    let to_tag = to_tag.map(|t| format!(";tag={t}")).unwrap_or_default();
    parse_request(&format!(
        "{method} sip:bob@{UAS_ADDR} SIP/2.0\r\n\
Via: SIP/2.0/{transport} {UAC_ADDR};branch={branch}\r\n\
Max-Forwards: 70\r\n\
From: <sip:alice@example.test>;tag=alice\r\n\
To: <sip:bob@example.test>{to_tag}\r\n\
Call-ID: link-call@example.test\r\n\
CSeq: {cseq} {method}\r\n\
Content-Length: 0\r\n\r\n"
    ))
}

fn to_tag(resp: &Response) -> Option<String> {
    sip_core::message::Summary::of_response(resp)
        .ok()
        .and_then(|s| s.to_tag)
}

/// Which way a datagram travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    ToUas,
    ToUac,
}

#[derive(Debug)]
struct Flight {
    at: Instant,
    seq: u64,
    dir: Dir,
    bytes: Bytes,
}

/// What a link does to each datagram.
trait Schedule {
    /// `None` to drop it, else the delays of the copies delivered (more than one: duplicated).
    fn fate(&mut self, dir: Dir, bytes: &Bytes) -> Vec<Duration>;
}

/// Random loss, jitter (hence reordering) and duplication from a seed.
struct Lossy {
    rng: StdRng,
    loss: f64,
    duplicate: f64,
}

impl Schedule for Lossy {
    fn fate(&mut self, _dir: Dir, _bytes: &Bytes) -> Vec<Duration> {
        if self.rng.gen_bool(self.loss) {
            return vec![];
        }
        let mut copies = vec![Duration::from_millis(self.rng.gen_range(1..400))];
        if self.rng.gen_bool(self.duplicate) {
            copies.push(Duration::from_millis(self.rng.gen_range(1..400)));
        }
        copies
    }
}

/// Drops the first copy of every message whose start line begins with one of `drop_first`
/// (e.g. "INVITE", "SIP/2.0 200", "ACK"), delivers the rest after a fixed delay.
struct Scripted {
    drop_first: Vec<&'static str>,
    delay: Duration,
}

impl Schedule for Scripted {
    fn fate(&mut self, _dir: Dir, bytes: &Bytes) -> Vec<Duration> {
        if let Some(i) = self
            .drop_first
            .iter()
            .position(|p| bytes.starts_with(p.as_bytes()))
        {
            self.drop_first.remove(i);
            return vec![];
        }
        vec![self.delay]
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct LinkStats {
    sent: u64,
    dropped: u64,
    duplicated: u64,
    reordered: u64,
}

struct Link<S> {
    schedule: S,
    flights: Vec<Flight>,
    seq: u64,
    last_delivered: [u64; 2],
    stats: LinkStats,
}

impl<S: Schedule> Link<S> {
    fn new(schedule: S) -> Self {
        Link {
            schedule,
            flights: vec![],
            seq: 0,
            last_delivered: [0; 2],
            stats: LinkStats::default(),
        }
    }

    fn send(&mut self, now: Instant, dir: Dir, bytes: Bytes) {
        self.seq += 1;
        self.stats.sent += 1;
        let copies = self.schedule.fate(dir, &bytes);
        if copies.is_empty() {
            self.stats.dropped += 1;
        }
        if copies.len() > 1 {
            self.stats.duplicated += 1;
        }
        for delay in copies {
            self.flights.push(Flight {
                at: now + delay,
                seq: self.seq,
                dir,
                bytes: bytes.clone(),
            });
        }
    }

    fn next_arrival(&self) -> Option<Instant> {
        self.flights.iter().map(|f| f.at).min()
    }

    /// Everything due at `now`, in arrival order.
    fn arrivals(&mut self, now: Instant) -> Vec<Flight> {
        let (mut due, rest): (Vec<_>, Vec<_>) = self.flights.drain(..).partition(|f| f.at <= now);
        self.flights = rest;
        due.sort_by_key(|f| (f.at, f.seq));
        for f in &due {
            let last = &mut self.last_delivered[f.dir as usize];
            if f.seq < *last {
                self.stats.reordered += 1;
            }
            *last = (*last).max(f.seq);
        }
        due
    }
}

/// Outcome of one simulated call.
#[derive(Debug, Default)]
struct Outcome {
    invite_final: Option<u16>,
    invite_responses_2xx: u32,
    acks_at_uas: u32,
    bye_final: Option<u16>,
    bye_at_uas: u32,
    options_done: u32,
    timed_out: Vec<ClientTxId>,
    ack_timeouts: Vec<ServerTxId>,
    unexpected: Vec<String>,
    uac_left: usize,
    uas_left: usize,
}

/// What the UAC does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    /// INVITE answered 200, ACKed, then BYE.
    Call,
    /// INVITE answered 486 (the transactions ACK it).
    Rejected,
    /// Three OPTIONS in parallel.
    Options,
}

struct Sim<S> {
    t0: Instant,
    now: Instant,
    transport: Transport,
    scenario: Scenario,
    uac: TransactionLayer,
    uas: TransactionLayer,
    link: Link<S>,
    uac_deadline: Option<Instant>,
    uas_deadline: Option<Instant>,
    /// The UAS's scheduled answers.
    answers: Vec<(Instant, ServerTxId, Response)>,
    invite_tx: Option<ClientTxId>,
    bye_tx: Option<ClientTxId>,
    ack: Option<Bytes>,
    out: Outcome,
}

impl<S: Schedule> Sim<S> {
    fn new(scenario: Scenario, transport: Transport, schedule: S) -> Self {
        let t0 = Instant::now();
        Sim {
            t0,
            now: t0,
            transport,
            scenario,
            uac: TransactionLayer::new(Timers::default()),
            uas: TransactionLayer::new(Timers::default()),
            link: Link::new(schedule),
            uac_deadline: None,
            uas_deadline: None,
            answers: vec![],
            invite_tx: None,
            bye_tx: None,
            ack: None,
            out: Outcome::default(),
        }
    }

    fn uas_peer(&self) -> Peer {
        peer(self.transport, UAS_ADDR)
    }

    fn uac_peer(&self) -> Peer {
        peer(self.transport, UAC_ADDR)
    }

    fn start(&mut self) {
        let to = self.uas_peer();
        match self.scenario {
            Scenario::Call | Scenario::Rejected => {
                let req = request("INVITE", &new_branch(), 1, None, self.transport);
                self.invite_tx = Some(self.uac.send_request(self.now, req, to).unwrap());
            }
            Scenario::Options => {
                for cseq in 1..=3 {
                    let req = request("OPTIONS", &new_branch(), cseq, None, self.transport);
                    self.uac.send_request(self.now, req, to).unwrap();
                }
            }
        }
    }

    /// Drains both layers until neither has anything to say.
    fn pump(&mut self) {
        loop {
            let mut busy = false;
            loop {
                match self.uac.poll_output() {
                    Output::Transmit(t) => {
                        busy = true;
                        assert_eq!(t.to, self.uas_peer());
                        self.link.send(self.now, Dir::ToUas, t.bytes);
                    }
                    Output::Event(e) => {
                        busy = true;
                        self.uac_event(e);
                    }
                    Output::Timeout(t) => {
                        self.uac_deadline = t;
                        break;
                    }
                }
            }
            loop {
                match self.uas.poll_output() {
                    Output::Transmit(t) => {
                        busy = true;
                        assert_eq!(t.to, self.uac_peer());
                        self.link.send(self.now, Dir::ToUac, t.bytes);
                    }
                    Output::Event(e) => {
                        busy = true;
                        self.uas_event(e);
                    }
                    Output::Timeout(t) => {
                        self.uas_deadline = t;
                        break;
                    }
                }
            }
            if !busy {
                return;
            }
        }
    }

    fn uac_event(&mut self, e: Event) {
        match e {
            Event::Response { tx, resp } if Some(tx) == self.invite_tx => {
                let code = resp.status_code.code();
                if code < 200 {
                    return;
                }
                if self.out.invite_final.is_none() {
                    self.out.invite_final = Some(code);
                } else if code >= 300 {
                    self.out
                        .unexpected
                        .push(format!("second non-2xx final {code}"));
                }
                if (200..300).contains(&code) {
                    self.out.invite_responses_2xx += 1;
                    self.ack_2xx(&resp);
                }
            }
            Event::Response { tx, resp } if Some(tx) == self.bye_tx => {
                let code = resp.status_code.code();
                if code >= 200 {
                    if self.out.bye_final.is_some() {
                        self.out.unexpected.push("second BYE final".into());
                    }
                    self.out.bye_final = Some(code);
                }
            }
            Event::Response { resp, .. } if self.scenario == Scenario::Options => {
                if resp.status_code.code() >= 200 {
                    self.out.options_done += 1;
                }
            }
            // A 2xx retransmitted after Timer M: ACK it again.
            Event::StrayResponse { resp, .. } if (200..300).contains(&resp.status_code.code()) => {
                self.ack_2xx(&resp)
            }
            Event::TimedOut { tx } => self.out.timed_out.push(tx),
            other => self.out.unexpected.push(format!("UAC: {other:?}")),
        }
    }

    /// The UAC core's ACK for a 2xx (§13.2.2.4): its own branch, sent outside any
    /// transaction, the same bytes for every 2xx retransmission; then the BYE.
    fn ack_2xx(&mut self, resp: &Response) {
        let ack = match &self.ack {
            Some(ack) => ack.clone(),
            None => {
                let tag = to_tag(resp);
                let ack = request("ACK", &new_branch(), 1, tag.as_deref(), self.transport);
                let bytes = sip_core::message::to_bytes(ack);
                self.ack = Some(bytes.clone());
                let bye = request("BYE", &new_branch(), 2, tag.as_deref(), self.transport);
                let to = self.uas_peer();
                self.link.send(self.now, Dir::ToUas, bytes.clone());
                self.bye_tx = Some(self.uac.send_request(self.now, bye, to).unwrap());
                return;
            }
        };
        self.link.send(self.now, Dir::ToUas, ack);
    }

    fn uas_event(&mut self, e: Event) {
        match e {
            Event::Request { tx, req, from, .. } => {
                assert_eq!(from, self.uac_peer());
                match req.method {
                    rsip::Method::Invite => {
                        let code = if self.scenario == Scenario::Rejected {
                            486
                        } else {
                            200
                        };
                        let ringing = response_for(&req, 180, None, Some("bob"));
                        let answer = response_for(&req, code, None, Some("bob"));
                        // Think 300 ms before ringing, 200 ms more before answering.
                        self.answers
                            .push((self.now + Duration::from_millis(300), tx, ringing));
                        self.answers
                            .push((self.now + Duration::from_millis(500), tx, answer));
                    }
                    rsip::Method::Bye => {
                        self.out.bye_at_uas += 1;
                        self.uas
                            .respond(self.now, tx, response_for(&req, 200, None, None))
                            .unwrap();
                    }
                    _ => self
                        .uas
                        .respond(self.now, tx, response_for(&req, 200, None, Some("bob")))
                        .unwrap(),
                }
            }
            Event::Ack2xx { .. } => self.out.acks_at_uas += 1,
            Event::AckTimeout { tx } => self.out.ack_timeouts.push(tx),
            other => self.out.unexpected.push(format!("UAS: {other:?}")),
        }
    }

    fn next_instant(&self) -> Option<Instant> {
        [
            self.uac_deadline,
            self.uas_deadline,
            self.link.next_arrival(),
            self.answers.iter().map(|a| a.0).min(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn run(mut self, limit: Duration) -> (Outcome, LinkStats) {
        self.start();
        self.pump();
        while let Some(next) = self.next_instant() {
            if next > self.t0 + limit {
                break;
            }
            assert!(next >= self.now, "time went backwards");
            self.now = next;
            for f in self.link.arrivals(self.now) {
                let msg = SipMessage::try_from(f.bytes.to_vec()).unwrap();
                match f.dir {
                    Dir::ToUas => {
                        let from = self.uac_peer();
                        self.uas.handle_message(self.now, msg, from)
                    }
                    Dir::ToUac => {
                        let from = self.uas_peer();
                        self.uac.handle_message(self.now, msg, from)
                    }
                }
            }
            let now = self.now;
            let (due, later): (Vec<_>, Vec<_>) = self.answers.drain(..).partition(|a| a.0 <= now);
            self.answers = later;
            for (_, tx, resp) in due {
                self.uas.respond(now, tx, resp).unwrap();
            }
            self.uac.handle_timeout(now);
            self.uas.handle_timeout(now);
            self.pump();
            for d in [self.uac_deadline, self.uas_deadline].into_iter().flatten() {
                assert!(d > now, "deadline {:?} not after now", d - self.t0);
            }
        }
        self.out.uac_left = self.uac.len();
        self.out.uas_left = self.uas.len();
        (self.out, self.link.stats)
    }
}

fn lossy(seed: u64, loss: f64) -> Lossy {
    Lossy {
        rng: StdRng::seed_from_u64(seed),
        loss,
        duplicate: 0.1,
    }
}

/// Long enough for every timer of every transaction to have run out.
const LIMIT: Duration = Duration::from_secs(300);

fn assert_call_completed(o: &Outcome, what: &str) {
    assert_eq!(o.invite_final, Some(200), "{what}: {o:?}");
    assert!(o.invite_responses_2xx >= 1, "{what}: {o:?}");
    assert!(
        o.acks_at_uas >= 1,
        "{what}: the ACK for the 2xx reached the UAS: {o:?}"
    );
    assert_eq!(o.bye_final, Some(200), "{what}: {o:?}");
    assert_eq!(
        o.bye_at_uas, 1,
        "{what}: the BYE opened one transaction: {o:?}"
    );
    assert!(
        o.timed_out.is_empty() && o.ack_timeouts.is_empty(),
        "{what}: {o:?}"
    );
    assert!(o.unexpected.is_empty(), "{what}: {o:?}");
    assert_eq!(
        (o.uac_left, o.uas_left),
        (0, 0),
        "{what}: every transaction ended: {o:?}"
    );
}

#[test]
fn invite_call_completes_over_a_lossy_reordering_link() {
    let mut total = LinkStats::default();
    for seed in 0..300 {
        let (o, stats) = Sim::new(Scenario::Call, Transport::Udp, lossy(seed, 0.2)).run(LIMIT);
        assert_call_completed(&o, &format!("seed {seed}"));
        total.dropped += stats.dropped;
        total.reordered += stats.reordered;
        total.duplicated += stats.duplicated;
    }
    // The link really was hostile.
    assert!(total.dropped > 300, "{total:?}");
    assert!(total.reordered > 100, "{total:?}");
    assert!(total.duplicated > 100, "{total:?}");
}

#[test]
fn rejected_invite_completes_over_a_lossy_link() {
    for seed in 0..300 {
        let (o, _) = Sim::new(Scenario::Rejected, Transport::Udp, lossy(seed, 0.2)).run(LIMIT);
        assert_eq!(o.invite_final, Some(486), "seed {seed}: {o:?}");
        // The ACK for the 486 is absorbed by the server transaction: the UAS sees nothing.
        assert_eq!(o.acks_at_uas, 0, "seed {seed}: {o:?}");
        assert!(
            o.unexpected.is_empty() && o.timed_out.is_empty(),
            "seed {seed}: {o:?}"
        );
        assert_eq!((o.uac_left, o.uas_left), (0, 0), "seed {seed}: {o:?}");
    }
}

#[test]
fn non_invite_transactions_complete_over_a_lossy_link() {
    for seed in 0..300 {
        let (o, _) = Sim::new(Scenario::Options, Transport::Udp, lossy(seed, 0.2)).run(LIMIT);
        assert_eq!(o.options_done, 3, "seed {seed}: {o:?}");
        assert!(
            o.unexpected.is_empty() && o.timed_out.is_empty(),
            "seed {seed}: {o:?}"
        );
        assert_eq!((o.uac_left, o.uas_left), (0, 0), "seed {seed}: {o:?}");
    }
}

#[test]
fn scripted_losses_of_each_message_are_recovered() {
    // First INVITE, first 100, first 180, first 200, first ACK and first BYE all lost.
    let schedule = Scripted {
        drop_first: vec![
            "INVITE",
            "SIP/2.0 100",
            "SIP/2.0 180",
            "SIP/2.0 200",
            "ACK",
            "BYE",
        ],
        delay: Duration::from_millis(20),
    };
    let (o, stats) = Sim::new(Scenario::Call, Transport::Udp, schedule).run(LIMIT);
    assert_call_completed(&o, "scripted");
    assert_eq!(stats.dropped, 6);
}

#[test]
fn a_link_that_loses_everything_times_out() {
    let schedule = Lossy {
        rng: StdRng::seed_from_u64(1),
        loss: 1.0,
        duplicate: 0.0,
    };
    let (o, stats) = Sim::new(Scenario::Call, Transport::Udp, schedule).run(LIMIT);
    assert_eq!(o.invite_final, None);
    assert_eq!(o.timed_out.len(), 1, "Timer B: {o:?}");
    // The INVITE and its six Timer A retransmissions.
    assert_eq!(stats.sent, 7);
    assert_eq!((o.uac_left, o.uas_left), (0, 0));
}

#[test]
fn reliable_transport_never_retransmits() {
    for seed in 0..50 {
        // TCP: no loss, no duplication; the jitter stands for the time to deliver.
        let schedule = Lossy {
            rng: StdRng::seed_from_u64(seed),
            loss: 0.0,
            duplicate: 0.0,
        };
        let (o, stats) = Sim::new(Scenario::Call, Transport::Tcp, schedule).run(LIMIT);
        assert_call_completed(&o, &format!("tcp seed {seed}"));
        // INVITE, 100, 180, 200, ACK, BYE, 200: each exactly once.
        assert_eq!(stats.sent, 7, "seed {seed}: {o:?}");
    }
}
