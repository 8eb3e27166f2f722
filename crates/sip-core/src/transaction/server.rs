//! Server transactions: the INVITE state machine of RFC 3261 §17.2.1 with RFC 6026's
//! Accepted state, and the non-INVITE state machine of §17.2.2.
//!
//! The UAS core's duty of §13.3.1.4 (retransmit a 2xx to INVITE until its ACK arrives, and
//! give up after 64·T1) is done here too, in the Accepted state, so that the user only
//! sends the 2xx once.

use std::time::{Duration, Instant};

use bytes::Bytes;
use rsip::Response;
use tracing::{debug, trace};

use super::matching::{AckKey, ServerKey};
use super::timers::{Slot, TimerSlots, TxRef, TRYING_DELAY};
use super::{Event, Fate, Io, ServerTxId, TxError};
use crate::message::to_bytes;
use crate::Peer;

/// The states of both server machines. Terminated transactions are removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ServerState {
    /// Non-INVITE only: the request came, nothing sent yet.
    Trying,
    /// A provisional response was sent (INVITE: from creation on).
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
    /// The 100 (Trying) to send if the TU stays silent for 200 ms; `None` once any
    /// response went out.
    trying: Option<Box<Response>>,
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
    /// 200 ms unless the TU answers first (§17.2.1).
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
                trying: Some(Box::new(trying)),
                ack_key,
                acked: false,
            }),
            interval: io.timers.t1,
            timers: TimerSlots::default(),
        };
        tx.arm(io, Slot::Resend, now, TRYING_DELAY);
        tx
    }

    /// A new non-INVITE server transaction in Trying.
    pub fn non_invite(id: ServerTxId, key: ServerKey, from: Peer, io: &Io<'_>) -> ServerTx {
        ServerTx {
            id,
            key,
            from,
            state: ServerState::Trying,
            last: None,
            invite: None,
            interval: io.timers.t1,
            timers: TimerSlots::default(),
        }
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
                self.send(to_bytes(resp), io);
                // The TU spoke: no 100 (Trying) of our own.
                self.timers.disarm(Slot::Resend);
                Ok(Fate::Live)
            }
            (true, _, 200..=299) => {
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
                self.send(to_bytes(resp), io);
                self.state = ServerState::Completed;
                let wait = io.timers.timer_j(reliable);
                if wait.is_zero() {
                    return Ok(Fate::Terminated);
                }
                self.arm(io, Slot::Lifetime, now, wait);
                Ok(Fate::Live)
            }
        }
    }

    /// Transmits a response and keeps it for retransmission.
    fn send(&mut self, bytes: Bytes, io: &mut Io<'_>) {
        if let Some(parts) = self.invite.as_mut() {
            parts.trying = None;
        }
        io.transmit(self.from, bytes.clone());
        self.last = Some(bytes);
    }

    /// The request was retransmitted (§17.2.1, §17.2.2, RFC 6026 §7.1).
    pub fn on_request_retransmission(&mut self, io: &mut Io<'_>) {
        match self.state {
            ServerState::Proceeding | ServerState::Completed => {
                if let Some(last) = self.last.clone() {
                    trace!(tx = ?self.id, "request retransmitted: response again");
                    io.transmit(self.from, last);
                } else if let Some(trying) = self.invite.as_mut().and_then(|p| p.trying.take()) {
                    // The client is already retransmitting: send 100 (Trying) now rather
                    // than when the 200 ms are up.
                    self.send(to_bytes(*trying), io);
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
                self.on_2xx_ack();
                AckDisposition::Deliver
            }
            _ => AckDisposition::Absorb(Fate::Live),
        }
    }

    /// The ACK for our 2xx arrived: stop retransmitting it. The transaction stays in
    /// Accepted until Timer L, absorbing INVITE retransmissions.
    pub fn on_2xx_ack(&mut self) {
        if let Some(parts) = self.invite.as_mut() {
            if self.state == ServerState::Accepted && !parts.acked {
                trace!(tx = ?self.id, "2xx acknowledged");
                parts.acked = true;
                // Nothing resends the 2xx now (INVITE retransmissions are absorbed).
                self.last = None;
                self.timers.disarm(Slot::Resend);
            }
        }
    }

    /// One of its timers fired (the slot already disarmed by the caller).
    pub fn on_timer(&mut self, now: Instant, slot: Slot, io: &mut Io<'_>) -> Fate {
        match (slot, self.state) {
            (Slot::Resend, ServerState::Proceeding) => {
                if let Some(trying) = self.invite.as_mut().and_then(|p| p.trying.take()) {
                    trace!(tx = ?self.id, "TU silent for 200 ms: 100 Trying");
                    self.send(to_bytes(*trying), io);
                }
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
            (Slot::Lifetime, ServerState::Trying | ServerState::Proceeding)
            | (Slot::Resend, ServerState::Trying | ServerState::Confirmed) => Fate::Live,
        }
    }
}
