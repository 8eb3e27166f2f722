//! A call's server legs: each INVITE of the relay's own towards an application server (an
//! inquiry) is a client transaction whose events the endpoint puts straight into the call's
//! inbox as [`LegEvent`]s (`LegSink`); the call applies the inquiry and answer timeouts
//! itself (`PendingLeg::deadline`). Here too are the call's bookkeeping of a leg in flight
//! (`PendingLeg`, what it is for: `Purpose`), the leg once answered (`ServerLeg`), and the
//! CANCEL, ACK and BYE a call sends on a leg. The initial inquiry, a service change ([`crate::change`]) and a
//! transfer ([`crate::transfer`]) all start their legs here.

use std::sync::Arc;

use rsip::{Header, Method, Request, Response};
use sip_core::dialog::{cancel_for, Dialog};
use sip_core::endpoint::{ClientEvent, ClientSink};
use sip_core::{message, Peer};
use tracing::{info, warn};

use crate::b2bua::{self, Inquiry};
use crate::directory::ServerRef;
use crate::in_dialog::send_and_forget;
use crate::routing::{Inbox, SessionInput};
use crate::session::{Call, SessionLimits};
use crate::{change, transfer};

/// Identifies one INVITE leg towards an application server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LegId(pub u64);

/// What a server leg's INVITE got.
#[derive(Debug)]
pub enum LegEvent {
    /// A 100 (Trying): the server heard; it now has the answer timeout to answer.
    Trying,
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
    /// When the INVITE was sent.
    pub(crate) started: tokio::time::Instant,
    /// When the call stops waiting for it: the inquiry timeout until the server is heard
    /// from at all, then the answer timeout.
    pub(crate) deadline: tokio::time::Instant,
    /// Whether any response came.
    pub(crate) heard: bool,
}

impl PendingLeg {
    /// The server answered something: from now on it has the answer timeout.
    pub(crate) fn heard(&mut self, limits: &SessionLimits) {
        if !self.heard {
            self.heard = true;
            self.deadline = self.started + limits.answer_timeout;
        }
    }
}

/// Takes a server leg's transaction events inline, from the endpoint's receiving or timer
/// task, and puts them in the call's inbox as [`LegEvent`]s: no task of its own per leg.
struct LegSink {
    me: Inbox,
    leg: LegId,
}

impl ClientSink for LegSink {
    fn deliver(&self, event: ClientEvent) {
        let event = match event {
            ClientEvent::Response(r) => match r.status_code.code() {
                100 => LegEvent::Trying,
                101..=199 => LegEvent::Provisional(r),
                200..=299 => LegEvent::Answered(r),
                code => LegEvent::Failed {
                    code,
                    resp: Some(r),
                },
            },
            ClientEvent::TimedOut => LegEvent::Failed {
                code: 408,
                resp: None,
            },
            ClientEvent::Failed(e) => {
                warn!(error = %e, "inquiry failed");
                LegEvent::Failed {
                    code: 503,
                    resp: None,
                }
            }
        };
        let _ = self.me.send(SessionInput::Leg {
            leg: self.leg,
            event,
        });
    }

    fn is_closed(&self) -> bool {
        self.me.is_closed()
    }
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
        let local = relay.local(peer);
        let hostport = server.uri().host_port_text().unwrap_or_default().to_owned();
        // What the inquiry takes from the terminal's INVITE: its Max-Forwards, and the
        // offer with the headers describing it (not a copy of the whole INVITE).
        let mut headers: rsip::Headers = self
            .a
            .invite
            .headers
            .iter()
            .filter(|h| matches!(h, Header::MaxForwards(_)))
            .cloned()
            .collect::<Vec<_>>()
            .into();
        headers.extend(offer.0);
        let base = Request {
            method: Method::Invite,
            uri: self.a.invite.uri.clone(),
            version: rsip::Version::V2,
            headers,
            body: offer.1,
        };
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
        let sink = Arc::new(LegSink {
            me: self.me.clone(),
            leg: id,
        });
        if let Err(e) = relay.endpoint.send_request_to(invite.clone(), peer, sink) {
            warn!(error = %e, "cannot send inquiry");
            let _ = self.me.send(SessionInput::Leg {
                leg: id,
                event: LegEvent::Failed {
                    code: 503,
                    resp: None,
                },
            });
        }
        let started = tokio::time::Instant::now();
        self.legs.insert(
            id,
            PendingLeg {
                server,
                invite,
                peer,
                call_id: summary.call_id,
                purpose,
                provisional: false,
                started,
                deadline: started + relay.limits.inquiry_timeout,
                heard: false,
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
        let local = self.relay.local(leg.peer);
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
        let local = relay.local(s.b.peer);
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
        let local = self.relay.local(leg.peer);
        match leg
            .dialog
            .request(Method::Bye, &local.via(), Vec::new(), Vec::new())
        {
            Ok(req) => send_and_forget(&self.relay, req, leg.peer, "BYE"),
            Err(e) => warn!(error = %e, "cannot build BYE"),
        }
    }
}
