//! In-dialog requests of an established session relayed between its two legs: a request
//! from one side (re-INVITE, INFO, OPTIONS, UPDATE, MESSAGE, NOTIFY…) is sent on the other
//! side's dialog and its final answer relayed back; the ACK of a relayed re-INVITE's 2xx
//! follows it (`PendingAck`). Here too are the liveness probes (OPTIONS) the call sends on
//! both legs. Which request goes where (BYE, change, transfer, charging) is decided by the
//! call before it gets here.

use rsip::{Header, Method, Request};
use tracing::{debug, warn};

use super::env::CallEnv;
use super::io::Incoming;
use super::session::{PendingAck, Side};
use super::{Call, Waiting};
use crate::b2bua;

/// Headers a relayed request carries over besides its body's: what a transfer, a
/// subscription or a service preference says.
fn carried_over(h: &Header) -> bool {
    match h {
        Header::Other(name, _) => ["Refer-To", "Referred-By", "P-Preferred-Service"]
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n)),
        Header::Event(_) | Header::SubscriptionState(_) => true,
        _ => false,
    }
}

impl Call {
    /// Relays an in-dialog request of session `i` from side `from` to the other leg; its
    /// final answer comes back as a token.
    pub(super) fn relay_in_dialog(&mut self, i: usize, from: Side, r: Incoming, env: &dyn CallEnv) {
        let s = &mut self.sessions[i];
        let dialog = match from {
            Side::Terminal => &mut s.a_dialog,
            Side::Server => &mut s.b.dialog,
        };
        if let Err(e) = dialog.check_remote_cseq(&r.req) {
            debug!(error = %e, "in-dialog request out of order");
            self.out.respond(
                r.tx,
                b2bua::local_response(&r.req, 500, "CSeq out of order", None),
            );
            return;
        }
        let _ = dialog.refresh_from_request(&r.req);
        let to = from.other();
        let (mut extra, body) = b2bua::carried_body(&r.req);
        extra.extend(r.req.headers.iter().filter(|h| carried_over(h)).cloned());
        let method = r.req.method;
        if method == Method::Invite && to == Side::Server {
            // The relay asserts the service on every re-INVITE it relays to the server.
            extra.push(Header::Other(
                "P-Asserted-Service".into(),
                b2bua::asserted_service(&s.service, &s.params),
            ));
        }
        let a_peer = self.a.peer;
        let Some((req, peer)) = self.sessions[i].request(to, a_peer, method, extra, body, env)
        else {
            self.out.respond(
                r.tx,
                b2bua::local_response(&r.req, 500, "Cannot relay the request", None),
            );
            return;
        };
        if method == Method::Invite {
            self.sessions[i].pending_ack = Some(Box::new(PendingAck {
                from,
                sent: req.clone(),
            }));
        }
        let contact = (method == Method::Invite).then(|| env.local(r.from).contact_header());
        let token = self.out.send_waiting(req, peer);
        self.waiting.insert(
            token,
            Waiting::Relayed {
                tx: r.tx,
                req: r.req,
                contact,
                session: i,
                from,
            },
        );
    }

    /// Relays the ACK of a relayed re-INVITE's 2xx from side `from` to the other leg;
    /// ignores re-sent ACKs of the initial INVITE.
    pub(super) fn relay_ack(&mut self, i: usize, from: Side, ack: Request, env: &dyn CallEnv) {
        let a_peer = self.a.peer;
        let s = &mut self.sessions[i];
        let Some(pending) = s.pending_ack.take_if(|p| p.from == from) else {
            return;
        };
        let (headers, body) = b2bua::carried_body(&ack);
        let (dialog, peer) = match from {
            Side::Terminal => (&s.b.dialog, s.b.peer),
            Side::Server => (&s.a_dialog, a_peer),
        };
        let local = env.local(peer);
        match dialog.ack_for_2xx(&pending.sent, &local.via(), headers, body) {
            Ok(relayed) => self.out.ack(relayed, peer),
            Err(e) => warn!(error = %e, "cannot relay ACK"),
        }
    }

    /// Sends an in-dialog OPTIONS on each leg of session `i` that has no session timer (a
    /// leg with one is watched by its refreshes, RFC 4028); a leg answering 408 or 481 ends
    /// the session.
    pub(super) fn probe(&mut self, i: usize, env: &dyn CallEnv) {
        let a_peer = self.a.peer;
        for side in [Side::Terminal, Side::Server] {
            if self.sessions[i].timers.get(side).is_some() {
                continue;
            }
            let Some((req, peer)) = self.sessions[i].request(
                side,
                a_peer,
                Method::Options,
                Vec::new(),
                Vec::new(),
                env,
            ) else {
                continue;
            };
            let token = self.out.send_waiting(req, peer);
            self.waiting
                .insert(token, Waiting::Probe { session: i, side });
        }
    }
}
