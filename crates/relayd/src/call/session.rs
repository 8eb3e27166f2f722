//! One session of a call: the terminal's dialog paired with a server leg, billed on its own
//! (DESIGN.md claims 1 and 3). The call owns its sessions; everything else (the served
//! index, the directory's counters, the billing journal) only points at them by id.

use std::time::{Instant, SystemTime};

use rsip::{Header, Method, Request};
use sip_core::dialog::Dialog;
use sip_core::Peer;
use tracing::warn;

use super::env::CallEnv;
use super::io::Incoming;
pub use super::io::Side;
use super::leg::ServerLeg;
use super::session_timer::Timers;
use crate::billing_control::{SegmentClock, SessionStart};
use crate::served::ServedSession;

/// Where a session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// A server answered 2xx; the session is being journaled, and its 2xx goes to the
    /// terminal once that is committed.
    Journaling,
    /// The 2xx went to the terminal; waiting for its ACK until the deadline.
    AwaitingAck(Instant),
    /// Confirmed and billed by time.
    Established,
    /// Over.
    Ended,
}

/// A re-INVITE relayed from one side whose 2xx the other side's ACK must follow.
pub(crate) struct PendingAck {
    /// The side whose ACK we wait for (the side that sent the re-INVITE).
    pub(crate) from: Side,
    /// The re-INVITE we sent on the other side.
    pub(crate) sent: Request,
}

/// One session: a terminal dialog paired with a server leg.
pub(crate) struct Session {
    pub(crate) id: String,
    pub(crate) a_dialog: Dialog,
    pub(crate) b: ServerLeg,
    pub(crate) service: Box<str>,
    pub(crate) params: Box<[(String, String)]>,
    pub(crate) state: State,
    /// Boxed, as the other rarely-set parts: a session keeps its inline size for its
    /// whole life.
    pub(crate) pending_ack: Option<Box<PendingAck>>,
    /// A change or transfer in progress (another is refused with 491 meanwhile).
    pub(crate) busy: bool,
    /// The terminal's current SDP offer (for a transfer's inquiry).
    pub(crate) offer: crate::b2bua::Carried,
    pub(crate) next_probe: Option<Instant>,
    /// When each leg (terminal, server) last answered a probe: the last proof of life a
    /// session ended by a failed probe is billed up to, as one a session timer ends is
    /// billed up to its last refresh.
    pub(crate) probe_answered: [Option<Instant>; 2],
    /// When the current billing segment started: the 2xx to the terminal, or the change or
    /// transfer that opened it.
    pub(crate) clock: SegmentClock,
    /// The tariff plan of the current billing segment.
    pub(crate) plan: Box<str>,
    /// The plan the rules decided for a change or transfer in progress, which the next
    /// segment is billed on.
    pub(crate) next_plan: Option<Box<str>>,
    /// A BYE that came while the session was being journaled: handled once it is.
    pub(crate) deferred_bye: Option<Box<(Side, Incoming)>>,
    /// The session timers of both legs (RFC 4028).
    pub(crate) timers: Timers,
    /// A fork's further 2xx, resent over UDP until the terminal's ACK (RFC 3261
    /// §13.3.1.4): the INVITE transaction only resends the first.
    pub(crate) resend_2xx: Option<Box<Resend2xx>>,
}

/// A 2xx the call itself resends until it is acknowledged: T1, doubling up to T2
/// (RFC 3261 §13.3.1.4).
pub(crate) struct Resend2xx {
    /// The 2xx as it went out.
    pub(crate) msg: bytes::Bytes,
    /// When it goes out again.
    pub(crate) at: Instant,
    /// The interval that led to `at`.
    pub(crate) interval: std::time::Duration,
}

impl Resend2xx {
    /// RFC 3261's T2: the longest interval between resends of a 2xx.
    const T2: std::time::Duration = std::time::Duration::from_secs(4);

    /// Moves to the next resend after the one due now.
    pub(crate) fn next(&mut self, now: Instant) {
        self.interval = (self.interval * 2).min(Self::T2);
        self.at = now + self.interval;
    }
}

/// Who a session bills and what it delivers, for its journal entry and its index entry.
pub(crate) struct Billed<'a> {
    pub(crate) subscriber: &'a str,
    pub(crate) terminal_call_id: &'a str,
}

impl Session {
    /// Builds a request on one leg's dialog with the relay's Via for that leg; a re-INVITE
    /// or UPDATE carries the leg's session-timer values (RFC 4028 §7.4).
    pub(crate) fn request(
        &mut self,
        side: Side,
        a_peer: Peer,
        method: Method,
        mut extra: Vec<Header>,
        body: Vec<u8>,
        env: &dyn CallEnv,
    ) -> Option<(Request, Peer)> {
        self.timers
            .stamp_request(side, method, &mut extra, &env.limits().session_timer);
        let (dialog, peer) = match side {
            Side::Terminal => (&mut self.a_dialog, a_peer),
            Side::Server => (&mut self.b.dialog, self.b.peer),
        };
        let local = env.local(peer);
        match dialog.request(method, &local.via(), extra, body) {
            Ok(req) => Some((req, peer)),
            Err(e) => {
                warn!(error = %e, "cannot build in-dialog request");
                None
            }
        }
    }

    /// The journal entry of the current segment.
    pub(crate) fn start(&self, who: &Billed<'_>) -> SessionStart {
        SessionStart {
            session_id: self.id.clone(),
            call_id: who.terminal_call_id.to_string(),
            subscriber: who.subscriber.to_string(),
            service: self.service.to_string(),
            server: self.b.server.uri_text().to_string(),
            server_call_id: self.b.dialog.id().call_id.to_owned(),
            // The store refuses an empty account: none is none.
            account: self
                .b
                .server
                .account()
                .filter(|a| !a.is_empty())
                .map(str::to_owned),
            plan: self.plan.to_string(),
            confirmed_at: self.clock.started_at(),
        }
    }

    /// The served-index entry of the current segment.
    pub(crate) fn served(&self, who: &Billed<'_>) -> ServedSession {
        ServedSession {
            session_id: self.id.clone(),
            subscriber: who.subscriber.to_string(),
            service: self.service.to_string(),
            server: self.b.server.uri_text().to_string(),
            account: self.b.server.account().map(str::to_owned),
            server_call_id: self.b.dialog.id().call_id.to_owned(),
            terminal_call_id: who.terminal_call_id.to_string(),
            started: self.clock.started_at(),
        }
    }

    /// A change or transfer did not happen: the session takes requests again and keeps
    /// its plan.
    pub(crate) fn give_up_move(&mut self) {
        self.busy = false;
        self.next_plan = None;
    }

    /// Whether the session is live (not ended).
    pub(crate) fn live(&self) -> bool {
        self.state != State::Ended
    }

    /// Ends the current segment at monotonic `now` and starts the next one there; returns
    /// when the closed one ended on the wall clock.
    pub(crate) fn next_segment(&mut self, now: Instant, new_id: String) -> SystemTime {
        let at = self.clock.end_at(now);
        self.clock = SegmentClock::start(at, now);
        self.id = new_id;
        if let Some(plan) = self.next_plan.take() {
            self.plan = plan;
        }
        at
    }
}
