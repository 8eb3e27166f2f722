//! Client transactions: the INVITE state machine of RFC 3261 §17.1.1 with RFC 6026's
//! Accepted state, and the non-INVITE state machine of §17.1.2.

use std::time::{Duration, Instant};

use bytes::Bytes;
use rsip::{Header, Method, Request, Response};
use tracing::{debug, trace};

use super::matching::ClientKey;
use super::timers::{Slot, TimerSlots, TxRef};
use super::{ClientTxId, Event, Fate, Io};
use crate::message::to_bytes;
use crate::Peer;

/// The states of both client machines. A non-INVITE transaction's "Trying" is `Calling`;
/// only an INVITE transaction enters `Accepted`. Terminated transactions are removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ClientState {
    /// The request is out, nothing heard yet (INVITE "Calling", non-INVITE "Trying").
    Calling,
    /// A provisional response arrived.
    Proceeding,
    /// INVITE only (RFC 6026 §7.2): a 2xx arrived; further 2xx are passed up until Timer M.
    Accepted,
    /// A final response arrived (3xx–6xx for INVITE, any for non-INVITE); its
    /// retransmissions are absorbed (and ACKed again for INVITE) until Timer D or K.
    Completed,
}

/// What the ACK for a non-2xx final response copies from the INVITE (§17.1.1.3): the
/// Request-URI, the top Via only, the Route headers, From, Call-ID and the CSeq number.
#[derive(Debug)]
struct AckTemplate {
    uri: rsip::Uri,
    via: Option<Header>,
    routes: Vec<Header>,
    from: Option<Header>,
    call_id: Option<Header>,
    cseq: u32,
}

impl AckTemplate {
    fn of(req: &Request, cseq: u32) -> AckTemplate {
        let mut template = AckTemplate {
            uri: req.uri.clone(),
            via: None,
            routes: Vec::new(),
            from: None,
            call_id: None,
            cseq,
        };
        for header in req.headers.iter() {
            match header {
                Header::Via(_) if template.via.is_none() => template.via = Some(header.clone()),
                Header::Route(_) => template.routes.push(header.clone()),
                Header::From(_) if template.from.is_none() => template.from = Some(header.clone()),
                Header::CallId(_) if template.call_id.is_none() => {
                    template.call_id = Some(header.clone())
                }
                _ => {}
            }
        }
        template
    }

    /// The ACK for `resp`, whose To header (with the UAS's tag) it carries.
    fn ack_for(&self, resp: &Response) -> Bytes {
        let to = resp
            .headers
            .iter()
            .find(|h| matches!(h, Header::To(_)))
            .cloned();
        let mut headers = Vec::with_capacity(7 + self.routes.len());
        headers.extend(self.via.clone());
        headers.extend(self.routes.iter().cloned());
        headers.push(Header::MaxForwards(rsip::headers::MaxForwards::from(70u32)));
        headers.extend(self.from.clone());
        headers.extend(to);
        headers.extend(self.call_id.clone());
        headers.push(Header::CSeq(rsip::headers::CSeq::from(rsip::typed::CSeq {
            seq: self.cseq,
            method: Method::Ack,
        })));
        to_bytes(Request {
            method: Method::Ack,
            uri: self.uri.clone(),
            version: rsip::Version::V2,
            headers: headers.into(),
            body: Vec::new(),
        })
    }
}

/// INVITE-only parts of a client transaction.
#[derive(Debug)]
struct InviteParts {
    /// Source of the ACK for a non-2xx final response; dropped once that ACK is built.
    /// Boxed: transactions live in a hash table for up to 64·T1, and the template (a whole
    /// URI and headers) is gone after the first response.
    template: Option<Box<AckTemplate>>,
    /// The ACK sent for the non-2xx final response, resent on each retransmission of it.
    ack: Option<Bytes>,
}

/// One client transaction.
#[derive(Debug)]
pub(super) struct ClientTx {
    id: ClientTxId,
    /// The key it is indexed under.
    pub key: ClientKey,
    /// Where the request goes.
    pub to: Peer,
    /// The request, serialised once, resent as is.
    request: Bytes,
    state: ClientState,
    /// `Some` for an INVITE transaction.
    invite: Option<InviteParts>,
    /// The current retransmission interval of Timer A or E.
    interval: Duration,
    /// Its timers (see [`Slot`]).
    pub timers: TimerSlots,
}

impl ClientTx {
    /// Starts a transaction for `req`, sending it: the initial state, Timer A or E (on an
    /// unreliable transport) and Timer B or F.
    pub fn start(
        now: Instant,
        id: ClientTxId,
        key: ClientKey,
        req: Request,
        cseq: u32,
        to: Peer,
        io: &mut Io<'_>,
    ) -> ClientTx {
        let invite = (req.method == Method::Invite).then(|| InviteParts {
            template: Some(Box::new(AckTemplate::of(&req, cseq))),
            ack: None,
        });
        let request = to_bytes(req);
        let mut tx = ClientTx {
            id,
            key,
            to,
            request,
            state: ClientState::Calling,
            invite,
            interval: io.timers.t1,
            timers: TimerSlots::default(),
        };
        io.transmit(to, tx.request.clone());
        if !to.is_reliable() {
            tx.arm(io, Slot::Resend, now, tx.interval);
        }
        tx.arm(io, Slot::Lifetime, now, io.timers.transaction_timeout());
        trace!(tx = ?id, invite = tx.invite.is_some(), "client transaction started");
        tx
    }

    fn arm(&mut self, io: &mut Io<'_>, slot: Slot, now: Instant, after: Duration) {
        self.timers
            .arm(io.queue, TxRef::Client(self.id), slot, now, after);
    }

    /// The current state.
    #[cfg(test)]
    pub fn state(&self) -> ClientState {
        self.state
    }

    /// A response matched this transaction (§17.1.1.2, §17.1.2.2, RFC 6026 §8.4).
    pub fn on_response(
        &mut self,
        now: Instant,
        resp: Response,
        from: Peer,
        io: &mut Io<'_>,
    ) -> Fate {
        let code = resp.status_code.code();
        match self.invite {
            Some(_) => self.invite_response(now, code, resp, from, io),
            None => self.non_invite_response(now, code, resp, io),
        }
    }

    fn invite_response(
        &mut self,
        now: Instant,
        code: u16,
        resp: Response,
        from: Peer,
        io: &mut Io<'_>,
    ) -> Fate {
        match (self.state, code) {
            (ClientState::Calling | ClientState::Proceeding, 100..=199) => {
                // Timer B guards the Calling state only: an INVITE that is ringing waits for
                // the TU (which CANCELs when it gives up).
                self.state = ClientState::Proceeding;
                self.timers.disarm(Slot::Resend);
                self.timers.disarm(Slot::Lifetime);
                io.event(Event::Response { tx: self.id, resp });
                Fate::Live
            }
            (ClientState::Calling | ClientState::Proceeding, 200..=299)
                if io.after_2xx == super::After2xx::Terminate =>
            {
                // RFC 3261 §17.1.1.2: the TU takes every later 2xx as a stray response.
                io.event(Event::Response { tx: self.id, resp });
                Fate::Terminated
            }
            (ClientState::Calling | ClientState::Proceeding, 200..=299) => {
                self.state = ClientState::Accepted;
                self.forget_request();
                // The TU ACKs a 2xx (§13.2.2.4); the template is for a non-2xx final only,
                // which cannot come now. Accepted lasts 64·T1: keep only what it needs.
                if let Some(parts) = self.invite.as_mut() {
                    parts.template = None;
                }
                self.timers.disarm(Slot::Resend);
                self.arm(io, Slot::Lifetime, now, io.timers.transaction_timeout());
                io.event(Event::Response { tx: self.id, resp });
                Fate::Live
            }
            (ClientState::Calling | ClientState::Proceeding, _) => {
                self.state = ClientState::Completed;
                self.forget_request();
                self.timers.disarm(Slot::Resend);
                self.timers.disarm(Slot::Lifetime);
                if let Some(parts) = self.invite.as_mut() {
                    if let Some(template) = parts.template.take() {
                        let ack = template.ack_for(&resp);
                        io.transmit(self.to, ack.clone());
                        parts.ack = Some(ack);
                    }
                }
                io.event(Event::Response { tx: self.id, resp });
                let wait = io.timers.timer_d(self.to.is_reliable());
                if wait.is_zero() {
                    return Fate::Terminated;
                }
                self.arm(io, Slot::Lifetime, now, wait);
                Fate::Live
            }
            // RFC 6026 §8.4: every 2xx in Accepted goes up (retransmissions and other forks);
            // anything else is discarded.
            (ClientState::Accepted, 200..=299) => {
                io.event(Event::Response { tx: self.id, resp });
                Fate::Live
            }
            (ClientState::Accepted, _) => Fate::Live,
            (ClientState::Completed, 300..) => {
                if let Some(ack) = self.invite.as_ref().and_then(|p| p.ack.clone()) {
                    trace!(tx = ?self.id, "final response retransmitted: ACK again");
                    io.transmit(self.to, ack);
                }
                Fate::Live
            }
            (ClientState::Completed, 200..=299) => {
                // A 2xx from another fork after a non-2xx final: the transaction cannot take
                // it, the TU may ACK and BYE it.
                debug!(tx = ?self.id, "2xx after a non-2xx final response");
                io.event(Event::StrayResponse { resp, from });
                Fate::Live
            }
            (ClientState::Completed, _) => Fate::Live,
        }
    }

    /// A final response came: the request is never sent again, so its bytes need not be
    /// kept for the rest of the transaction's life (up to 64·T1 in Accepted).
    fn forget_request(&mut self) {
        self.request = Bytes::new();
    }

    fn non_invite_response(
        &mut self,
        now: Instant,
        code: u16,
        resp: Response,
        io: &mut Io<'_>,
    ) -> Fate {
        match (self.state, code) {
            (ClientState::Calling | ClientState::Proceeding, 100..=199) => {
                self.state = ClientState::Proceeding;
                io.event(Event::Response { tx: self.id, resp });
                Fate::Live
            }
            (ClientState::Calling | ClientState::Proceeding, _) => {
                self.state = ClientState::Completed;
                self.forget_request();
                self.timers.disarm(Slot::Resend);
                self.timers.disarm(Slot::Lifetime);
                io.event(Event::Response { tx: self.id, resp });
                let wait = io.timers.timer_t4(self.to.is_reliable());
                if wait.is_zero() {
                    return Fate::Terminated;
                }
                self.arm(io, Slot::Lifetime, now, wait);
                Fate::Live
            }
            // Completed absorbs retransmissions until Timer K.
            _ => Fate::Live,
        }
    }

    /// The TU sent a CANCEL of this INVITE: without a final response in 64·T1 the INVITE
    /// counts as cancelled and the transaction ends (RFC 3261 §9.1), rather than waiting in
    /// Proceeding for a server that never answers.
    pub fn on_cancel_sent(&mut self, now: Instant, io: &mut Io<'_>) {
        if self.invite.is_some()
            && matches!(self.state, ClientState::Calling | ClientState::Proceeding)
        {
            let limit = now + io.timers.transaction_timeout();
            if self
                .timers
                .armed_at(Slot::Lifetime)
                .is_none_or(|at| at > limit)
            {
                self.arm(io, Slot::Lifetime, now, io.timers.transaction_timeout());
            }
        }
    }

    /// One of its timers fired (the slot already disarmed by the caller).
    pub fn on_timer(&mut self, now: Instant, slot: Slot, io: &mut Io<'_>) -> Fate {
        match (slot, self.state) {
            (Slot::Resend, ClientState::Calling | ClientState::Proceeding) => {
                // Timer A (INVITE, doubling) or E (non-INVITE: doubling capped at T2, and
                // T2 once a provisional response came).
                self.interval = match (self.invite.is_some(), self.state) {
                    (true, _) => io.timers.backoff_uncapped(self.interval),
                    (false, ClientState::Proceeding) => io.timers.t2,
                    (false, _) => io.timers.backoff_capped(self.interval),
                };
                trace!(tx = ?self.id, next = ?self.interval, "retransmitting request");
                io.transmit(self.to, self.request.clone());
                self.arm(io, Slot::Resend, now, self.interval);
                Fate::Live
            }
            (Slot::Lifetime, ClientState::Calling | ClientState::Proceeding) => {
                // Timer B or F, or a cancelled INVITE's 64·T1 (§9.1).
                debug!(tx = ?self.id, "client transaction timed out");
                io.event(Event::TimedOut { tx: self.id });
                Fate::Terminated
            }
            // Timer M, D or K.
            (Slot::Lifetime, ClientState::Accepted | ClientState::Completed) => Fate::Terminated,
            (Slot::Resend, ClientState::Accepted | ClientState::Completed) => Fate::Live,
        }
    }

    /// The transport reported that the request cannot reach its destination (§17.1.4):
    /// a transaction still waiting for its final response reports a timeout and ends.
    pub fn on_transport_error(&mut self, io: &mut Io<'_>) -> Fate {
        match self.state {
            ClientState::Calling | ClientState::Proceeding => {
                io.event(Event::TimedOut { tx: self.id });
                Fate::Terminated
            }
            ClientState::Accepted | ClientState::Completed => Fate::Live,
        }
    }
}
