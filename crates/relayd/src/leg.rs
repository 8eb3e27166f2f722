//! A call's server legs: each INVITE of the relay's own towards an application server (an
//! inquiry) runs in a small task of its own (`spawn_leg`) that sends it, applies the
//! inquiry and answer timeouts and reports the server's answers to the call's inbox as
//! [`LegEvent`]s. Here too are the call's bookkeeping of a leg in flight (`PendingLeg`, what
//! it is for: `Purpose`), the leg once answered (`ServerLeg`), and the CANCEL, ACK and BYE
//! a call sends on a leg. The initial inquiry, a service change ([`crate::change`]) and a
//! transfer ([`crate::transfer`]) all start their legs here.

use std::sync::Arc;

use rsip::{Header, Method, Request, Response};
use sip_core::dialog::{cancel_for, Dialog};
use sip_core::endpoint::ClientEvent;
use sip_core::{message, Peer};
use tracing::{info, warn};

use crate::b2bua::{self, Inquiry};
use crate::directory::ServerRef;
use crate::in_dialog::send_and_forget;
use crate::relay::Relay;
use crate::routing::{Inbox, SessionInput};
use crate::session::Call;
use crate::{change, transfer};

/// Identifies one INVITE leg towards an application server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LegId(pub u64);

/// What a server leg's INVITE got, as reported by its task.
#[derive(Debug)]
pub enum LegEvent {
    /// A 101–199.
    Provisional(Response),
    /// A 2xx (again for each retransmission the server sends).
    Answered(Response),
    /// A final failure, or no answer in time (408, with no response).
    Failed {
        /// The status code (408 for silence).
        code: u16,
        /// The response, when there was one.
        resp: Option<Response>,
    },
}

/// An application server's leg, once it answered 2xx.
pub(crate) struct ServerLeg {
    pub(crate) server: ServerRef,
    pub(crate) invite: Request,
    pub(crate) peer: Peer,
    pub(crate) call_id: String,
    pub(crate) dialog: Dialog,
    pub(crate) ack: Option<Request>,
}

/// What a pending INVITE leg is for.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Purpose {
    /// The terminal's initial request (a session of its own per 2xx).
    Initial {
        /// The To tag the terminal sees for this leg's answers.
        a_tag: String,
    },
    /// A service change onto a new server (claim 5).
    Change(change::Pending),
    /// A transfer to a second server (claim 6).
    Transfer(transfer::Pending),
}

/// An INVITE leg in flight.
pub(crate) struct PendingLeg {
    pub(crate) server: ServerRef,
    pub(crate) invite: Request,
    pub(crate) peer: Peer,
    pub(crate) call_id: String,
    pub(crate) purpose: Purpose,
    /// Whether a provisional came (a CANCEL may be sent only then, RFC 3261 §9.1).
    pub(crate) provisional: bool,
}

/// Spawns the task of one INVITE leg: sends it, applies the inquiry and answer timeouts,
/// and reports every answer to the call's inbox.
fn spawn_leg(relay: &Arc<Relay>, me: Inbox, leg: LegId, invite: Request, peer: Peer) {
    let ctx = relay.endpoint.send_request(invite.clone(), peer);
    let limits = relay.limits;
    let endpoint = relay.endpoint.clone();
    tokio::spawn(async move {
        let mut ctx = match ctx {
            Ok(ctx) => ctx,
            Err(e) => {
                warn!(error = %e, "cannot send inquiry");
                let _ = me.send(SessionInput::Leg {
                    leg,
                    event: LegEvent::Failed {
                        code: 503,
                        resp: None,
                    },
                });
                return;
            }
        };
        let started = tokio::time::Instant::now();
        let mut deadline = started + limits.inquiry_timeout;
        let mut answered = false;
        let mut heard = false;
        loop {
            tokio::select! {
                ev = ctx.recv() => {
                    let event = match ev {
                        Some(ClientEvent::Response(r)) => {
                            let code = r.status_code.code();
                            if !heard {
                                heard = true;
                                deadline = started + limits.answer_timeout;
                            }
                            match code {
                                100 => continue,
                                101..=199 => LegEvent::Provisional(r),
                                200..=299 => {
                                    if !answered {
                                        // Further 2xx (retransmissions until our ACK) come
                                        // within 64·T1 (RFC 6026 Timer M); then the leg is done.
                                        answered = true;
                                        deadline = tokio::time::Instant::now() + limits.ack_timeout;
                                    }
                                    LegEvent::Answered(r)
                                }
                                _ => LegEvent::Failed { code, resp: Some(r) },
                            }
                        }
                        Some(ClientEvent::TimedOut) => LegEvent::Failed { code: 408, resp: None },
                        Some(ClientEvent::Failed(e)) => {
                            warn!(error = %e, "inquiry failed");
                            LegEvent::Failed { code: 503, resp: None }
                        }
                        None => return,
                    };
                    let last = matches!(event, LegEvent::Failed { .. });
                    if me.send(SessionInput::Leg { leg, event }).is_err() || last {
                        return;
                    }
                }
                // The call has ended: nothing is left to report to.
                () = me.closed() => return,
                _ = tokio::time::sleep_until(deadline) => {
                    if answered {
                        return;
                    }
                    if heard {
                        // Ringing too long: cancel it (a provisional came, so CANCEL is allowed).
                        if let Ok(cancel) = cancel_for(&invite) {
                            let _ = endpoint.send_request(cancel, peer);
                        }
                    }
                    info!(to = %peer, "no answer in time");
                    let _ = me.send(SessionInput::Leg { leg, event: LegEvent::Failed { code: 408, resp: None } });
                    return;
                }
            }
        }
    });
}

impl Call {
    /// Builds and sends an inquiry INVITE to `server`; false when it could not be sent.
    pub(crate) async fn start_leg(
        &mut self,
        server: ServerRef,
        service: &str,
        params: &[(String, String)],
        offer: (Vec<Header>, Vec<u8>),
        purpose: Purpose,
    ) -> bool {
        let relay = self.relay.clone();
        let Some(peer) = relay.resolve_server(&server).await else {
            warn!(
                server = server.uri_text(),
                "cannot resolve application server"
            );
            return false;
        };
        let local = relay.local(peer.transport);
        let hostport = server.uri().host_with_port.to_string();
        let mut base = self.a.invite.clone();
        base.headers.retain(|h| {
            !matches!(
                h,
                Header::ContentType(_) | Header::ContentDisposition(_) | Header::ContentEncoding(_)
            )
        });
        base.headers.extend(offer.0);
        base.body = offer.1;
        let invite = match b2bua::inquiry_invite(&Inquiry {
            service,
            params,
            subscriber: &self.adm.subscriber,
            realm: &relay.realm,
            server_hostport: &hostport,
            terminal_request: &base,
            local: &local,
        }) {
            Ok(inv) => inv,
            Err(e) => {
                warn!(error = %e, "cannot build inquiry");
                return false;
            }
        };
        let Ok(summary) = message::Summary::of_request(&invite) else {
            return false;
        };
        relay.sessions.insert(&summary.call_id, self.me.clone());
        self.routed.push(summary.call_id.clone());
        let id = LegId(self.next_leg);
        self.next_leg += 1;
        info!(server = server.uri_text(), service, "inquiring");
        spawn_leg(&relay, self.me.clone(), id, invite.clone(), peer);
        self.legs.insert(
            id,
            PendingLeg {
                server,
                invite,
                peer,
                call_id: summary.call_id,
                purpose,
                provisional: false,
            },
        );
        true
    }

    /// Sends CANCEL for a pending leg's INVITE, once a provisional allows it.
    pub(crate) fn cancel_leg(&self, leg: &PendingLeg) {
        if !leg.provisional {
            // RFC 3261 §9.1: no CANCEL before a provisional; the leg's task stops waiting
            // at the inquiry timeout and a late 2xx is ACKed and hung up.
            return;
        }
        match cancel_for(&leg.invite) {
            Ok(cancel) => {
                if let Err(e) = self.relay.endpoint.send_request(cancel, leg.peer) {
                    warn!(error = %e, "cannot send CANCEL");
                }
            }
            Err(e) => warn!(error = %e, "cannot build CANCEL"),
        }
    }

    /// Sends the ACK for a server leg's 2xx and keeps it for re-sending.
    pub(crate) async fn ack_leg(&self, leg: &mut ServerLeg) {
        let local = self.relay.local(leg.peer.transport);
        match leg
            .dialog
            .ack_for_2xx(&leg.invite, &local.via(), Vec::new(), Vec::new())
        {
            Ok(ack) => {
                if let Err(e) = self
                    .relay
                    .endpoint
                    .send_stateless(&leg.peer, ack.clone())
                    .await
                {
                    warn!(error = %e, "cannot send ACK to server");
                }
                leg.ack = Some(ack);
            }
            Err(e) => warn!(error = %e, "cannot build ACK"),
        }
    }

    /// ACKs the server leg of session `i`, unless that was done already.
    pub(crate) async fn ack_server(&mut self, i: usize) {
        if self.sessions[i].b.ack.is_some() {
            return;
        }
        let relay = self.relay.clone();
        let s = &mut self.sessions[i];
        let local = relay.local(s.b.peer.transport);
        if let Ok(ack) =
            s.b.dialog
                .ack_for_2xx(&s.b.invite, &local.via(), Vec::new(), Vec::new())
        {
            let _ = relay.endpoint.send_stateless(&s.b.peer, ack.clone()).await;
            s.b.ack = Some(ack);
        }
    }

    /// Re-sends the ACK of session `i`'s server leg (its 2xx came again: our ACK was lost).
    pub(crate) async fn reack(&mut self, i: usize) {
        let s = &self.sessions[i];
        if let Some(ack) = s.b.ack.clone() {
            let _ = self.relay.endpoint.send_stateless(&s.b.peer, ack).await;
        }
    }

    /// Sends BYE on a server leg that is not (or no longer) part of a session.
    pub(crate) fn bye_leg(&self, leg: &mut ServerLeg) {
        let local = self.relay.local(leg.peer.transport);
        match leg
            .dialog
            .request(Method::Bye, &local.via(), Vec::new(), Vec::new())
        {
            Ok(req) => send_and_forget(&self.relay, req, leg.peer, "BYE"),
            Err(e) => warn!(error = %e, "cannot build BYE"),
        }
    }
}
