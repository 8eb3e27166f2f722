//! A call's legs towards application servers: an INVITE leg in flight ([`PendingLeg`]: being
//! resolved, then inquiring, with its inquiry and answer deadlines), the leg once a server
//! answered 2xx ([`ServerLeg`]), and the requests a call sends on a leg of its own (the
//! inquiry INVITE, CANCEL, the ACK of its 2xx, BYE).

use std::time::Instant;

use bytes::Bytes;
use rsip::{Header, Method, Request};
use sip_core::dialog::session_timer::{Negotiated, Policy};
use sip_core::dialog::{cancel_for, Dialog};
use sip_core::Peer;
use tracing::warn;

use super::limits::SessionLimits;
use crate::b2bua::{self, Inquiry, LocalAddr};
use crate::directory::ServerRef;

/// What a leg's INVITE asks once its server is resolved: the service, its parameters and
/// the offer (body and the headers describing it).
#[derive(Debug, Clone)]
pub(crate) struct LegPlan {
    pub(crate) service: String,
    pub(crate) params: Vec<(String, String)>,
    pub(crate) offer: (Vec<Header>, Vec<u8>),
}

/// An INVITE leg in flight; `P` says what it is for.
pub(crate) struct PendingLeg<P> {
    pub(crate) server: ServerRef,
    /// What to ask, until the INVITE is built.
    pub(crate) plan: Option<LegPlan>,
    /// The INVITE sent and where, once resolved.
    pub(crate) sent: Option<(Request, Peer)>,
    pub(crate) purpose: P,
    /// Whether a provisional came (a CANCEL may be sent only then, RFC 3261 §9.1).
    pub(crate) provisional: bool,
    /// When the leg started.
    pub(crate) started: Instant,
    /// When the call stops waiting for it: the inquiry timeout until the server is heard
    /// from at all, then the answer timeout.
    pub(crate) deadline: Instant,
    /// Whether any response came.
    pub(crate) heard: bool,
    /// The session interval its INVITE asks for (RFC 4028 §7.1): ours, or what a `422`
    /// asked for.
    pub(crate) session_expires: u32,
}

impl<P> PendingLeg<P> {
    /// A leg to `server` for `purpose`, started now.
    pub(crate) fn new(
        server: ServerRef,
        plan: LegPlan,
        purpose: P,
        now: Instant,
        limits: &SessionLimits,
    ) -> Self {
        PendingLeg {
            server,
            plan: Some(plan),
            sent: None,
            purpose,
            provisional: false,
            started: now,
            deadline: now + limits.inquiry_timeout,
            heard: false,
            session_expires: limits.session_timer.session_expires,
        }
    }

    /// The server answered something: from now on it has the answer timeout.
    pub(crate) fn heard(&mut self, limits: &SessionLimits) {
        if !self.heard {
            self.heard = true;
            self.deadline = self.started + limits.answer_timeout;
        }
    }

    /// The CANCEL of the leg's INVITE, once a provisional allows it (RFC 3261 §9.1: a leg
    /// that never answered is left to its inquiry timeout, and a late 2xx is hung up).
    pub(crate) fn cancel(&self) -> Option<(Request, Peer)> {
        if !self.provisional {
            return None;
        }
        let (invite, peer) = self.sent.as_ref()?;
        match cancel_for(invite) {
            Ok(cancel) => Some((cancel, *peer)),
            Err(e) => {
                warn!(error = %e, "cannot build CANCEL");
                None
            }
        }
    }
}

/// Builds the inquiry INVITE of a leg (DESIGN.md "inquiry"): the terminal's INVITE lends
/// its Request-URI `uri` and its `max_forwards` (while the inquiry runs), `plan` the service
/// and offer; it asks for a session timer of `session_expires` seconds with the relay as
/// refresher (RFC 4028 §7.1).
#[allow(clippy::too_many_arguments)]
pub(crate) fn inquiry(
    uri: &str,
    max_forwards: Option<Header>,
    plan: LegPlan,
    subscriber: &str,
    realm: &str,
    server: &ServerRef,
    local: &LocalAddr,
    timer: &Policy,
    session_expires: u32,
) -> Result<Request, rsip::Error> {
    let hostport = server.uri().host_port_text().unwrap_or_default();
    let mut headers: rsip::Headers = max_forwards.into_iter().collect::<Vec<_>>().into();
    headers.extend(plan.offer.0);
    let base = Request {
        method: Method::Invite,
        uri: sip_core::uri::Uri::parse(uri)
            .map_err(|e| rsip::Error::ParseError(format!("Request-URI {uri}: {e}")))?
            .to_rsip(),
        version: rsip::Version::V2,
        headers,
        body: plan.offer.1,
    };
    let mut invite = b2bua::inquiry_invite(&Inquiry {
        service: &plan.service,
        params: &plan.params,
        subscriber,
        realm,
        server_hostport: hostport,
        terminal_request: &base,
        local,
    })?;
    timer.stamp_request(&mut invite.headers, session_expires);
    Ok(invite)
}

/// The `Reason` (RFC 3326) of a BYE that ends a server's leg because the session moved on
/// to another leg: `text` says why (`changed`, `transferred`), so that the server can tell
/// it from the terminal hanging up.
pub(crate) fn moved_on(text: &str) -> Header {
    Header::Other("Reason".into(), format!("SIP;cause=200;text=\"{text}\""))
}

/// Whether a leg's 2xx was ACKed, and what that ACK carried: each time the 2xx comes again
/// (the server did not get the ACK) the same ACK is built again from the dialog
/// (RFC 3261 §13.2.2.4), instead of keeping its bytes.
#[derive(Debug)]
pub(crate) enum Acked {
    /// Not yet.
    No,
    /// With no body.
    Bare,
    /// With a body and the headers describing it (the answer to an offer in the 2xx).
    Carrying(Box<(Vec<Header>, Vec<u8>)>),
}

/// An application server's leg, once it answered 2xx.
pub(crate) struct ServerLeg {
    pub(crate) id: super::io::LegId,
    pub(crate) server: ServerRef,
    /// The CSeq number of the leg's INVITE, which the ACK of its 2xx carries.
    pub(crate) invite_cseq: u32,
    pub(crate) peer: Peer,
    pub(crate) dialog: Dialog,
    /// The ACK of its 2xx, once sent.
    pub(crate) acked: Acked,
    /// The session timer its 2xx agreed to (RFC 4028 §7.2), if any.
    pub(crate) timer: Option<Negotiated>,
}

impl ServerLeg {
    /// Whether the leg's 2xx was ACKed.
    pub(crate) fn is_acked(&self) -> bool {
        !matches!(self.acked, Acked::No)
    }

    /// The ACK of the leg's 2xx, serialised, carrying `headers` and `body` the first time;
    /// the same ACK again afterwards (whatever `headers` and `body` say then).
    pub(crate) fn ack(
        &mut self,
        local: &LocalAddr,
        headers: Vec<Header>,
        body: Vec<u8>,
    ) -> Option<Bytes> {
        if let Acked::No = self.acked {
            self.acked = if headers.is_empty() && body.is_empty() {
                Acked::Bare
            } else {
                Acked::Carrying(Box::new((headers, body)))
            };
        }
        let (headers, body) = match &self.acked {
            Acked::Carrying(carried) => carried.as_ref().clone(),
            Acked::No | Acked::Bare => (Vec::new(), Vec::new()),
        };
        let ack = self
            .dialog
            .ack_for_cseq(self.invite_cseq, &local.via(), headers, body);
        Some(sip_core::message::to_bytes(ack))
    }

    /// The ACK of a 2xx that came again to the leg's INVITE numbered `cseq`: the leg's own
    /// ACK for its first INVITE; for a later one (a re-INVITE of the relay's: a session
    /// refresh, a change on the same server) a bare ACK with that number (RFC 3261
    /// §13.2.2.4).
    pub(crate) fn ack_again(&mut self, local: &LocalAddr, cseq: u32) -> Option<Bytes> {
        if cseq == self.invite_cseq {
            return self.ack(local, Vec::new(), Vec::new());
        }
        let ack = self
            .dialog
            .ack_for_cseq(cseq, &local.via(), Vec::new(), Vec::new());
        Some(sip_core::message::to_bytes(ack))
    }

    /// A BYE on the leg, with `extra` headers (a `Reason`, RFC 3326).
    pub(crate) fn bye(&mut self, local: &LocalAddr, extra: Vec<Header>) -> Option<Request> {
        match self
            .dialog
            .request(Method::Bye, &local.via(), extra, Vec::new())
        {
            Ok(req) => Some(req),
            Err(e) => {
                warn!(error = %e, "cannot build BYE");
                None
            }
        }
    }
}
