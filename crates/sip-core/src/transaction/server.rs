//! Server transactions: the INVITE state machine of RFC 3261 §17.2.1 with RFC 6026's
//! Accepted state, and the non-INVITE state machine of §17.2.2.
//!
//! The UAS core's duty of §13.3.1.4 (retransmit a 2xx to INVITE until its ACK arrives, and
//! give up after 64·T1) is done here too, in the Accepted state, so that the user only
//! sends the 2xx once.
//!
//! RFC 3261 gives a server transaction no end while its TU stays silent. Here it has one
//! ([`super::ServerDeadlines`]): an INVITE with no final response from its TU by the
//! deadline (counted from the request or, within a tenth of it, the TU's last provisional,
//! like a proxy's Timer C, §16.8) is answered 408 by the layer and ends as any non-2xx does; a non-INVITE one is
//! dropped without an answer once the client's Timer F has fired (RFC 4320 §4.2: no 408 to
//! a non-INVITE request). Either way the layer counts it.

use std::time::{Duration, Instant};

use bytes::Bytes;
use rsip::prelude::UntypedHeader;
use rsip::{Header, Response};
use tracing::{debug, trace};

use super::matching::{AckKey, ServerKey};
use super::timers::{Slot, TimerSlots, TxRef, TRYING_DELAY};
use super::{Event, Fate, Io, ServerTxId, TxError};
use crate::message::{new_tag, status, to_bytes};
use crate::Peer;

/// The states of both server machines. Terminated transactions are removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ServerState {
    /// Non-INVITE only: the request came, nothing sent yet. The TU's deadline runs.
    Trying,
    /// A provisional response was sent (INVITE: from creation on). The TU's deadline runs.
    Proceeding,
    /// INVITE only (RFC 6026 §7.1): a 2xx was sent; INVITE retransmissions are absorbed
    /// until Timer L, the 2xx is retransmitted until its ACK arrives.
    Accepted,
    /// A final response was sent (3xx–6xx for INVITE, any for non-INVITE).
    Completed,
    /// INVITE only: the ACK for the non-2xx final arrived; later ACKs are absorbed until
    /// Timer I.
    Confirmed,
}

/// What to do with an ACK that matched a server transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AckDisposition {
    /// Part of the transaction (the ACK for a non-2xx final): absorbed.
    Absorb(Fate),
    /// The ACK for the 2xx, sent with the INVITE's own branch: delivered to the user as
    /// an ACK for a 2xx.
    Deliver,
}

/// INVITE-only parts of a server transaction.
#[derive(Debug)]
struct InviteParts {
    /// The response the layer may have to send itself, built from the request when it
    /// came: the 100 (Trying) if the TU stays silent for 200 ms, and the 408 if the TU
    /// gives no final response by its deadline (then with the To header of the TU's last
    /// provisional, so with its tag). `None` once a final response went out.
    template: Option<Box<Response>>,
    /// The dialog fields an ACK for our 2xx carries.
    ack_key: AckKey,
    /// Whether the ACK for our 2xx arrived.
    acked: bool,
}

/// One server transaction.
#[derive(Debug)]
pub(super) struct ServerTx {
    id: ServerTxId,
    /// The key it is indexed under.
    pub key: ServerKey,
    /// Where the request came from, and so where responses go (§18.2.2: the endpoint has
    /// put the `received`/`rport` address and the connection in it).
    pub from: Peer,
    state: ServerState,
    /// The last response sent, serialised once: resent on request retransmissions (the
    /// provisional in Proceeding, the final in Completed) and by Timer G or the 2xx
    /// retransmission timer.
    last: Option<Bytes>,
    /// `Some` for an INVITE transaction.
    invite: Option<InviteParts>,
    /// The current interval of Timer G or of the 2xx retransmissions.
    interval: Duration,
    /// Its timers (see [`Slot`]).
    pub timers: TimerSlots,
}

impl ServerTx {
    /// A new INVITE server transaction in Proceeding, with the 100 (Trying) it sends after
    /// 200 ms unless the TU answers first (§17.2.1), and the TU's deadline armed.
    pub fn invite(
        now: Instant,
        id: ServerTxId,
        key: ServerKey,
        from: Peer,
        ack_key: AckKey,
        trying: Response,
        io: &mut Io<'_>,
    ) -> ServerTx {
        let mut tx = ServerTx {
            id,
            key,
            from,
            state: ServerState::Proceeding,
            last: None,
            invite: Some(InviteParts {
                template: Some(Box::new(trying)),
                ack_key,
                acked: false,
            }),
            interval: io.timers.t1,
            timers: TimerSlots::default(),
        };
        tx.arm(io, Slot::Resend, now, TRYING_DELAY);
        tx.arm(io, Slot::Lifetime, now, io.deadlines.invite);
        tx
    }

    /// A new non-INVITE server transaction in Trying, with the TU's deadline armed.
    pub fn non_invite(
        now: Instant,
        id: ServerTxId,
        key: ServerKey,
        from: Peer,
        io: &mut Io<'_>,
    ) -> ServerTx {
        let mut tx = ServerTx {
            id,
            key,
            from,
            state: ServerState::Trying,
            last: None,
            invite: None,
            interval: io.timers.t1,
            timers: TimerSlots::default(),
        };
        let deadline = io.deadlines.non_invite(io.timers);
        tx.arm(io, Slot::Lifetime, now, deadline);
        tx
    }

    fn arm(&mut self, io: &mut Io<'_>, slot: Slot, now: Instant, after: Duration) {
        self.timers
            .arm(io.queue, TxRef::Server(self.id), slot, now, after);
    }

    /// The current state.
    #[cfg(test)]
    pub fn state(&self) -> ServerState {
        self.state
    }

    /// Whether the TU still owes this transaction its final response.
    pub fn awaits_final(&self) -> bool {
        matches!(self.state, ServerState::Trying | ServerState::Proceeding)
    }

    /// The dialog key of the ACK this transaction waits for: `Some` in Accepted until the
    /// ACK for the 2xx arrives.
    pub fn awaiting_ack(&self) -> Option<&AckKey> {
        match &self.invite {
            Some(parts) if self.state == ServerState::Accepted && !parts.acked => {
                Some(&parts.ack_key)
            }
            _ => None,
        }
    }

    /// The dialog key of an INVITE transaction.
    pub fn ack_key(&self) -> Option<&AckKey> {
        self.invite.as_ref().map(|p| &p.ack_key)
    }

    /// Sends `resp` (whose status the caller checked to be 100–699) on this transaction.
    pub fn respond(
        &mut self,
        now: Instant,
        resp: Response,
        io: &mut Io<'_>,
    ) -> Result<Fate, TxError> {
        let code = resp.status_code.code();
        let reliable = self.from.is_reliable();
        match (self.invite.is_some(), self.state, code) {
            // A 2xx the TU retransmits itself in Accepted goes out (RFC 6026 §8.7).
            (true, ServerState::Accepted, 200..=299) => {
                io.transmit(self.from, to_bytes(resp));
                Ok(Fate::Live)
            }
            (_, ServerState::Accepted | ServerState::Completed | ServerState::Confirmed, _) => {
                Err(TxError::AlreadyFinal)
            }
            (true, _, 100..=199) => {
                if let Some(template) = self.invite.as_mut().and_then(|p| p.template.as_mut()) {
                    // A 408 of ours would carry the tag the TU chose.
                    take_to(template, &resp);
                }
                self.send(to_bytes(resp), io);
                // The TU spoke: no 100 (Trying) of our own, and its deadline starts again —
                // moved once a tenth of it has run, so that a TU passing on provisionals
                // quickly does not leave a stale timer entry behind for each.
                self.timers.disarm(Slot::Resend);
                let deadline = io.deadlines.invite;
                let moved = self
                    .timers
                    .armed_at(Slot::Lifetime)
                    .is_none_or(|at| at + deadline / 10 <= now + deadline);
                if moved {
                    self.arm(io, Slot::Lifetime, now, deadline);
                }
                Ok(Fate::Live)
            }
            (true, _, 200..=299) => {
                self.drop_template();
                self.send(to_bytes(resp), io);
                self.state = ServerState::Accepted;
                self.interval = io.timers.t1;
                if reliable {
                    self.timers.disarm(Slot::Resend);
                } else {
                    self.arm(io, Slot::Resend, now, self.interval);
                }
                // Timer L, which is also how long we wait for the ACK (§13.3.1.4).
                self.arm(io, Slot::Lifetime, now, io.timers.transaction_timeout());
                Ok(Fate::Live)
            }
            (true, _, _) => {
                self.drop_template();
                self.send(to_bytes(resp), io);
                self.state = ServerState::Completed;
                self.interval = io.timers.t1;
                if reliable {
                    self.timers.disarm(Slot::Resend);
                } else {
                    // Timer G.
                    self.arm(io, Slot::Resend, now, self.interval);
                }
                // Timer H.
                self.arm(io, Slot::Lifetime, now, io.timers.transaction_timeout());
                Ok(Fate::Live)
            }
            (false, _, 100..=199) => {
                self.send(to_bytes(resp), io);
                self.state = ServerState::Proceeding;
                Ok(Fate::Live)
            }
            (false, _, _) => {
                // Completed: all that is left for Timer J (over an unreliable transport)
                // is to send this response again on a retransmission, which the layer's
                // compact table does ([`ServerTx::completed_non_invite`]); this ends here.
                self.send(to_bytes(resp), io);
                self.state = ServerState::Completed;
                Ok(Fate::Terminated)
            }
        }
    }

    /// Transmits a response and keeps it for retransmission.
    fn send(&mut self, bytes: Bytes, io: &mut Io<'_>) {
        io.transmit(self.from, bytes.clone());
        self.last = Some(bytes);
    }

    /// A final response is going out: the layer will not answer for the TU any more.
    fn drop_template(&mut self) {
        if let Some(parts) = self.invite.as_mut() {
            parts.template = None;
        }
    }

    /// Sends the 100 (Trying) of an INVITE unless a provisional went out already.
    fn send_trying(&mut self, io: &mut Io<'_>) {
        if self.last.is_some() {
            return;
        }
        let Some(template) = self.invite.as_ref().and_then(|p| p.template.as_deref()) else {
            return;
        };
        let trying = template.clone();
        self.send(to_bytes(trying), io);
    }

    /// A non-INVITE transaction that has sent its final response: its key, where the
    /// response went, and the response, for the layer to keep through Timer J in its
    /// compact table (see `linger`).
    pub fn completed_non_invite(self) -> Option<(ServerKey, Peer, Bytes)> {
        if self.invite.is_some() || self.state != ServerState::Completed {
            return None;
        }
        Some((self.key, self.from, self.last?))
    }

    /// Sends the final response `resp` once, as a stateless UAS does (RFC 3261 §8.2.7): the
    /// caller then removes the transaction, so nothing of it stays to resend the response,
    /// absorb a retransmitted request or match an ACK. A retransmission of the request is a
    /// new request to the TU, which answers it again the same way. Only a final response
    /// may go so, and to an INVITE only 3xx–6xx: its 2xx must be resent until ACKed
    /// (§13.3.1.4).
    pub fn respond_stateless(&mut self, resp: Response, io: &mut Io<'_>) -> Result<(), TxError> {
        let code = resp.status_code.code();
        if !self.awaits_final() {
            return Err(TxError::AlreadyFinal);
        }
        let least = if self.invite.is_some() { 300 } else { 200 };
        if !(least..=699).contains(&code) {
            return Err(TxError::InvalidStatus(code));
        }
        trace!(tx = ?self.id, code, "answered statelessly");
        io.transmit(self.from, to_bytes(resp));
        Ok(())
    }

    /// The request was retransmitted (§17.2.1, §17.2.2, RFC 6026 §7.1).
    pub fn on_request_retransmission(&mut self, io: &mut Io<'_>) {
        match self.state {
            ServerState::Proceeding | ServerState::Completed => {
                if let Some(last) = self.last.clone() {
                    trace!(tx = ?self.id, "request retransmitted: response again");
                    io.transmit(self.from, last);
                } else if self.invite.is_some() {
                    // The client is already retransmitting: send 100 (Trying) now rather
                    // than when the 200 ms are up.
                    self.send_trying(io);
                    self.timers.disarm(Slot::Resend);
                }
            }
            // Trying: nothing sent yet; Accepted, Confirmed: absorbed.
            ServerState::Trying | ServerState::Accepted | ServerState::Confirmed => {}
        }
    }

    /// An ACK matched this transaction by its Via (§17.2.1).
    pub fn on_ack(&mut self, now: Instant, io: &mut Io<'_>) -> AckDisposition {
        match self.state {
            ServerState::Completed if self.invite.is_some() => {
                self.state = ServerState::Confirmed;
                // Confirmed absorbs retransmissions without answering: the final
                // response is not sent again.
                self.last = None;
                self.timers.disarm(Slot::Resend);
                self.timers.disarm(Slot::Lifetime);
                let wait = io.timers.timer_t4(self.from.is_reliable());
                if wait.is_zero() {
                    return AckDisposition::Absorb(Fate::Terminated);
                }
                // Timer I.
                self.arm(io, Slot::Lifetime, now, wait);
                AckDisposition::Absorb(Fate::Live)
            }
            ServerState::Accepted => {
                self.on_2xx_ack(now, io);
                AckDisposition::Deliver
            }
            _ => AckDisposition::Absorb(Fate::Live),
        }
    }

    /// The ACK for our 2xx arrived: stop retransmitting it. The transaction stays in
    /// Accepted only to absorb INVITE retransmissions still on their way: for T4 over an
    /// unreliable transport (as Confirmed does after the ACK of a non-2xx, Timer I,
    /// §17.2.1), not at all over a reliable one, instead of the rest of Timer L's 64·T1
    /// (RFC 6026 §7.1). A client that sent the ACK has its 2xx and no longer retransmits the
    /// INVITE; a server holding a transaction per session for 32 s after the ACK paid for
    /// it in memory with every concurrent session.
    pub fn on_2xx_ack(&mut self, now: Instant, io: &mut Io<'_>) {
        if let Some(parts) = self.invite.as_mut() {
            if self.state == ServerState::Accepted && !parts.acked {
                trace!(tx = ?self.id, "2xx acknowledged");
                parts.acked = true;
                // Nothing resends the 2xx now (INVITE retransmissions are absorbed).
                self.last = None;
                parts.template = None;
                self.timers.disarm(Slot::Resend);
                let linger = io.timers.timer_t4(self.from.is_reliable());
                self.timers.disarm(Slot::Lifetime);
                self.arm(io, Slot::Lifetime, now, linger);
            }
        }
    }

    /// One of its timers fired (the slot already disarmed by the caller).
    pub fn on_timer(&mut self, now: Instant, slot: Slot, io: &mut Io<'_>) -> Fate {
        match (slot, self.state) {
            (Slot::Resend, ServerState::Proceeding) => {
                trace!(tx = ?self.id, "TU silent for 200 ms: 100 Trying");
                self.send_trying(io);
                Fate::Live
            }
            (Slot::Resend, ServerState::Accepted | ServerState::Completed) => {
                // 2xx retransmission (§13.3.1.4) or Timer G: both double up to T2.
                if let Some(last) = self.last.clone() {
                    io.transmit(self.from, last);
                }
                self.interval = io.timers.backoff_capped(self.interval);
                self.arm(io, Slot::Resend, now, self.interval);
                Fate::Live
            }
            (Slot::Lifetime, ServerState::Accepted) => {
                // Timer L; without an ACK it is also the end of the 2xx retransmissions.
                if self.awaiting_ack().is_some() {
                    debug!(tx = ?self.id, "2xx never acknowledged");
                    io.event(Event::AckTimeout { tx: self.id });
                }
                Fate::Terminated
            }
            (Slot::Lifetime, ServerState::Completed) => {
                if self.invite.is_some() {
                    // Timer H: the ACK for our non-2xx final never came.
                    debug!(tx = ?self.id, "no ACK for the final response (Timer H)");
                }
                Fate::Terminated
            }
            // Timer I.
            (Slot::Lifetime, ServerState::Confirmed) => Fate::Terminated,
            (Slot::Lifetime, ServerState::Trying | ServerState::Proceeding) => {
                self.tu_deadline(now, io)
            }
            (Slot::Resend, ServerState::Trying | ServerState::Confirmed) => Fate::Live,
        }
    }

    /// The TU gave no final response in time: an INVITE is answered 408 (Request Timeout,
    /// as a proxy answers when its Timer C fires, RFC 3261 §16.8) and goes on to Completed;
    /// any other transaction ends unanswered, its client having given up already.
    fn tu_deadline(&mut self, now: Instant, io: &mut Io<'_>) -> Fate {
        let template = self.invite.as_mut().and_then(|p| p.template.take());
        let Some(template) = template else {
            debug!(tx = ?self.id, "no final response from the TU in time: dropped");
            return Fate::Terminated;
        };
        debug!(tx = ?self.id, "no final response from the TU in time: 408");
        let mut resp = *template;
        resp.status_code = status(408, None);
        resp.headers
            .retain(|h| !matches!(h, Header::Timestamp(_)) && !is_other(h, "Timestamp"));
        ensure_to_tag(&mut resp);
        match self.respond(now, resp, io) {
            Ok(fate) => fate,
            // Not reached: the state was Proceeding.
            Err(_) => Fate::Terminated,
        }
    }
}

/// Whether `h` is an unparsed header named `name`.
fn is_other(h: &Header, name: &str) -> bool {
    matches!(h, Header::Other(n, _) if n.eq_ignore_ascii_case(name))
}

/// Puts the To header of the TU's provisional `resp` (with its tag) into `template`.
fn take_to(template: &mut Response, resp: &Response) {
    let Some(to) = resp.headers.iter().find(|h| matches!(h, Header::To(_))) else {
        return;
    };
    if let Some(slot) = template
        .headers
        .iter_mut()
        .find(|h| matches!(h, Header::To(_)))
    {
        *slot = to.clone();
    }
}

/// Gives the To header of a final response a tag of our own if it has none (RFC 3261
/// §8.2.6.2).
fn ensure_to_tag(resp: &mut Response) {
    for h in resp.headers.iter_mut() {
        if let Header::To(to) = h {
            let value = to.value().to_string();
            if !matches!(crate::fields::tag_of(&value), Ok(Some(_))) {
                *to = rsip::headers::To::new(format!("{value};tag={}", new_tag()));
            }
            return;
        }
    }
}
