//! In-dialog requests of an established session relayed between its two legs: a request
//! from one side (re-INVITE, INFO, OPTIONS, UPDATE, MESSAGE, NOTIFY…) is sent on the other
//! side's dialog and its final answer relayed back; the ACK of a relayed re-INVITE's 2xx
//! follows it (`PendingAck`). Here too are the requests the call itself sends in a
//! session's dialogs: liveness probes (OPTIONS) and BYE. Which request goes where (BYE,
//! service change, transfer, charging) is decided in [`crate::session`].

use rsip::{Header, Method, Request};
use sip_core::endpoint::IncomingRequest;
use sip_core::Peer;
use tracing::{debug, warn};

use crate::b2bua;
use crate::relay::Relay;
use crate::routing::SessionInput;
use crate::session::{Call, Side};

/// A re-INVITE relayed from one side whose 2xx the other side's ACK must follow.
pub(crate) struct PendingAck {
    /// The side whose ACK we wait for (the side that sent the re-INVITE).
    pub(crate) from: Side,
    /// The re-INVITE we sent on the other side.
    pub(crate) sent: Request,
}

impl Call {
    /// Builds a request on one leg's dialog of session `i` with the relay's Via for that leg.
    pub(crate) fn build_request(
        &mut self,
        i: usize,
        side: Side,
        method: Method,
        extra: Vec<Header>,
        body: Vec<u8>,
    ) -> Option<(Request, Peer)> {
        let a_peer = self.a.peer;
        let relay = self.relay.clone();
        let s = &mut self.sessions[i];
        let (dialog, peer) = match side {
            Side::Terminal => (&mut s.a_dialog, a_peer),
            Side::Server => (&mut s.b.dialog, s.b.peer),
        };
        let local = relay.local(peer);
        match dialog.request(method, &local.via(), extra, body) {
            Ok(req) => Some((req, peer)),
            Err(e) => {
                warn!(error = %e, "cannot build in-dialog request");
                None
            }
        }
    }

    /// Relays an in-dialog request (re-INVITE, INFO, OPTIONS, UPDATE, MESSAGE, NOTIFY…) to
    /// the other leg and its final answer back.
    pub(crate) fn relay_in_dialog(&mut self, i: usize, from: Side, r: IncomingRequest) {
        let s = &mut self.sessions[i];
        let dialog = match from {
            Side::Terminal => &mut s.a_dialog,
            Side::Server => &mut s.b.dialog,
        };
        if let Err(e) = dialog.check_remote_cseq(&r.req) {
            debug!(error = %e, "in-dialog request out of order");
            let _ = r.tx.respond(b2bua::local_response(
                &r.req,
                500,
                "CSeq out of order",
                None,
            ));
            return;
        }
        let _ = dialog.refresh_from_request(&r.req);
        let to = match from {
            Side::Terminal => Side::Server,
            Side::Server => Side::Terminal,
        };
        let (mut extra, body) = b2bua::carried_body(&r.req);
        for h in r.req.headers.iter() {
            match h {
                Header::Other(name, _)
                    if ["Refer-To", "Referred-By", "P-Preferred-Service"]
                        .iter()
                        .any(|n| name.eq_ignore_ascii_case(n)) =>
                {
                    extra.push(h.clone())
                }
                Header::Event(_) | Header::SubscriptionState(_) => extra.push(h.clone()),
                _ => {}
            }
        }
        let method = r.req.method;
        if method == Method::Invite && to == Side::Server {
            // The relay asserts the service on every re-INVITE it relays to the server.
            let s = &self.sessions[i];
            extra.push(Header::Other(
                "P-Asserted-Service".into(),
                b2bua::asserted_service(&s.service, &s.params),
            ));
        }
        let Some((req, peer)) = self.build_request(i, to, method, extra, body) else {
            let _ = r.tx.respond(b2bua::local_response(
                &r.req,
                500,
                "Cannot relay the request",
                None,
            ));
            return;
        };
        if method == Method::Invite {
            self.sessions[i].pending_ack = Some(PendingAck {
                from,
                sent: req.clone(),
            });
        }
        let contact = self.relay.local(r.from).contact_header();
        let ctx = self.relay.endpoint.send_request(req, peer);
        tokio::spawn(async move {
            let resp = match ctx {
                Ok(mut ctx) => ctx.final_response().await,
                Err(e) => {
                    let _ = r.tx.respond(b2bua::local_response(
                        &r.req,
                        500,
                        &format!("Cannot relay: {e}"),
                        None,
                    ));
                    return;
                }
            };
            let contact = (method == Method::Invite).then_some(contact);
            let _ =
                r.tx.respond(b2bua::relayed_response(&r.req, &resp, None, contact));
        });
    }

    /// Relays the ACK for a relayed re-INVITE's 2xx; ignores re-sent ACKs of the initial
    /// INVITE.
    pub(crate) async fn relay_ack(&mut self, i: usize, ack: Request) {
        let from = if self.is_terminal(&ack) {
            Side::Terminal
        } else {
            Side::Server
        };
        let a_peer = self.a.peer;
        let s = &mut self.sessions[i];
        let Some(pending) = s.pending_ack.take() else {
            return;
        };
        if pending.from != from {
            s.pending_ack = Some(pending);
            return;
        }
        let (headers, body) = b2bua::carried_body(&ack);
        let (dialog, peer) = match from {
            Side::Terminal => (&s.b.dialog, s.b.peer),
            Side::Server => (&s.a_dialog, a_peer),
        };
        let local = self.relay.local(peer);
        match dialog.ack_for_2xx(&pending.sent, &local.via(), headers, body) {
            Ok(relayed) => {
                let _ = self.relay.endpoint.send_stateless(&peer, relayed).await;
            }
            Err(e) => warn!(error = %e, "cannot relay ACK"),
        }
    }

    /// Sends an in-dialog OPTIONS on each leg of session `i`; the answers come back as
    /// [`SessionInput::Probe`].
    pub(crate) fn probe(&mut self, i: usize) {
        for side in [Side::Terminal, Side::Server] {
            let Some((req, peer)) =
                self.build_request(i, side, Method::Options, Vec::new(), Vec::new())
            else {
                continue;
            };
            let Ok(mut ctx) = self.relay.endpoint.send_request(req, peer) else {
                continue;
            };
            let me = self.me.clone();
            let session = self.sessions[i].id.clone();
            tokio::spawn(async move {
                let resp = ctx.final_response().await;
                let alive = !matches!(resp.status_code.code(), 408 | 481);
                let _ = me.send(SessionInput::Probe { session, alive });
            });
        }
    }

    /// Sends BYE on one leg of session `i` without waiting for its answer: a party that does
    /// not answer does not keep the session open.
    pub(crate) fn bye(&mut self, i: usize, side: Side) {
        if let Some((req, peer)) = self.build_request(i, side, Method::Bye, Vec::new(), Vec::new())
        {
            send_and_forget(&self.relay, req, peer, "BYE");
        }
    }
}

/// Sends `req` and logs its final answer when it comes, without waiting for it.
pub(crate) fn send_and_forget(relay: &Relay, req: Request, peer: Peer, what: &'static str) {
    match relay.endpoint.send_request(req, peer) {
        // The transaction goes on (retransmissions, timers) without its user; only the
        // debug log wants to hear how it ended, and a task to wait for that costs a spawn
        // per call under load.
        Ok(mut ctx) if tracing::enabled!(tracing::Level::DEBUG) => {
            tokio::spawn(async move {
                let resp = ctx.final_response().await;
                debug!(what, code = resp.status_code.code(), "answered");
            });
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, what, "cannot send"),
    }
}
