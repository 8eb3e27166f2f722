//! Dialogs (RFC 3261 §12): the state two user agents share between an INVITE and its BYE,
//! and the requests built within one.
//!
//! A [`Dialog`] is plain data, sans-IO: created as UAC from the request sent and a 1xx (with
//! a To tag) or 2xx response (§12.1.2), or as UAS from the request received (§12.1.1). It
//! tracks the CSeq numbers of both directions (§12.2.1.1, §12.2.2), the remote target
//! (refreshed by re-INVITE and its 2xx, §12.2) and the route set, and builds in-dialog
//! requests with loose or strict routing (§12.2.1.1), the ACK for a 2xx (§13.2.2.4), and,
//! for any INVITE, its CANCEL (§9.1).

use std::fmt;

use rsip::prelude::*;
use rsip::{Header, Method, Request, Response, Uri};

use crate::address::{self, Contacts, FromTo, NameAddr};
use crate::message::{new_branch, set_content_length};
use crate::peer::Transport;

pub mod session_timer;

/// Why a dialog could not be created or used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DialogError {
    /// A header the dialog needs is missing (a tag, Call-ID, CSeq, Contact…).
    #[error("missing {0}")]
    Missing(&'static str),
    /// A header the dialog needs cannot be parsed.
    #[error("invalid {0} header")]
    Invalid(&'static str),
    /// The response does not create a dialog: not 101–299, or no To tag (§12.1).
    #[error("response does not create a dialog")]
    NotDialogCreating,
    /// A request's CSeq is lower than the last one received in the dialog: answer 500
    /// (§12.2.2).
    #[error("CSeq {got} lower than the last received {last}")]
    CSeqOutOfOrder {
        /// The CSeq number of the request.
        got: u32,
        /// The highest CSeq number received before it.
        last: u32,
    },
    /// The local CSeq number would pass 2^31 - 1 (§8.1.1.5).
    #[error("local CSeq exhausted")]
    CSeqExhausted,
    /// ACK and CANCEL are not built by [`Dialog::request`]: see [`Dialog::ack_for_2xx`] and
    /// [`cancel_for`].
    #[error("{0} is not an ordinary in-dialog request")]
    MethodNotAllowed(Method),
}

/// A dialog's identity (§12): Call-ID, local tag and remote tag. The local tag is the From
/// tag for the UAC and the To tag for the UAS.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DialogId {
    /// The Call-ID.
    pub call_id: String,
    /// Our tag.
    pub local_tag: String,
    /// The peer's tag.
    pub remote_tag: String,
}

impl DialogId {
    /// The dialog an incoming request belongs to, seen from its UAS (local tag = To tag,
    /// remote tag = From tag; §12.2.2). `None` when the To tag is absent (out of dialog).
    pub fn of_incoming_request(req: &Request) -> Option<DialogId> {
        let parts = Ids::of(&req.headers).ok()?;
        Some(DialogId {
            call_id: parts.call_id,
            local_tag: parts.to_tag?,
            remote_tag: parts.from_tag?,
        })
    }

    /// [`DialogId::of_incoming_request`] from the ids the transaction layer read already.
    pub fn of_request_ids(ids: &crate::message::RequestIds) -> Option<DialogId> {
        Some(DialogId {
            call_id: ids.call_id.clone(),
            local_tag: ids.to_tag.clone()?,
            remote_tag: ids.from_tag.clone()?,
        })
    }

    /// The dialog a response to one of our requests belongs to, seen from its UAC (local
    /// tag = From tag, remote tag = To tag). `None` when the To tag is absent.
    pub fn of_response(resp: &Response) -> Option<DialogId> {
        let parts = Ids::of(&resp.headers).ok()?;
        Some(DialogId {
            call_id: parts.call_id,
            local_tag: parts.from_tag?,
            remote_tag: parts.to_tag?,
        })
    }
}

impl fmt::Display for DialogId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{};local={};remote={}",
            self.call_id, self.local_tag, self.remote_tag
        )
    }
}

/// The state of a dialog (§12): early (created by a 1xx) or confirmed (by a 2xx).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DialogState {
    /// Created by a provisional response with a To tag.
    Early,
    /// Created or confirmed by a 2xx.
    Confirmed,
}

/// How to write the Via of a request we send: transport and our `host:port`. Each header
/// built gets a fresh branch and `rport` (RFC 3581).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViaSpec {
    /// The transport the request leaves on.
    pub transport: Transport,
    /// Our address as the peer should answer to, `host:port`.
    pub sent_by: String,
}

impl ViaSpec {
    /// A Via header with a fresh branch (§8.1.1.7) and `rport`.
    pub fn header(&self) -> Header {
        self.header_with_branch(&new_branch())
    }

    /// A Via header with the given branch and `rport`.
    pub fn header_with_branch(&self, branch: &str) -> Header {
        Header::Via(rsip::headers::Via::new(format!(
            "SIP/2.0/{} {};branch={branch};rport",
            self.transport.via_name(),
            self.sent_by
        )))
    }
}

/// A party of the dialog, as written in From/To (read by [`crate::address`]): display name,
/// URI and the parameters other than the tag, kept as one string as written. A dialog lives
/// as long as its session and only ever prints its parties, so it keeps their text, not
/// their parse ([`Dialog::local_address`] reads it again on demand).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Party {
    text: Box<str>,
}

impl Party {
    fn new(value: FromTo) -> Party {
        Party {
            text: value.into_address().without_param("tag").as_str().into(),
        }
    }

    /// The name-addr, parsed again (the text is what a parsed name-addr printed).
    fn address(&self) -> Option<NameAddr> {
        NameAddr::parse(&self.text).ok()
    }

    /// `["Name" ]<uri>;params;tag=…`.
    fn render(&self, tag: &str) -> String {
        let mut out = String::with_capacity(self.text.len() + 5 + tag.len());
        out.push_str(&self.text);
        out.push_str(";tag=");
        out.push_str(tag);
        out
    }
}

/// The identifying headers of a message, read once and in one pass where they are in
/// their plain form ([`crate::fields`], falling back to rsip): Call-ID, CSeq and the From and
/// To tags. The full From and To (display name, URI, parameters) are parsed only by the two
/// constructors that keep them ([`typed_from`], [`typed_to`]).
struct Ids {
    call_id: String,
    cseq: u32,
    cseq_method: Method,
    from_tag: Option<String>,
    to_tag: Option<String>,
}

impl Ids {
    fn of(headers: &rsip::Headers) -> Result<Ids, DialogError> {
        let mut call_id = None;
        let mut cseq = None;
        let mut from = None;
        let mut to = None;
        for h in headers.iter() {
            match h {
                Header::CallId(c) if call_id.is_none() => call_id = Some(c.value().trim()),
                Header::CSeq(c) if cseq.is_none() => cseq = Some(c),
                Header::From(f) if from.is_none() => from = Some(f),
                Header::To(t) if to.is_none() => to = Some(t),
                _ => {}
            }
        }
        let call_id = call_id
            .filter(|c| !c.is_empty())
            .ok_or(DialogError::Missing("Call-ID"))?
            .to_string();
        let (cseq, cseq_method) =
            crate::fields::cseq_of(cseq.ok_or(DialogError::Missing("CSeq"))?.value())
                .ok_or(DialogError::Invalid("CSeq"))?;
        let tag = |value: &str, name: &'static str| {
            crate::fields::tag_of(value)
                .map(|t| t.map(|t| t.into_owned()).filter(|t| !t.is_empty()))
                .map_err(|_| DialogError::Invalid(name))
        };
        let from_tag = tag(from.ok_or(DialogError::Missing("From"))?.value(), "From")?;
        let to_tag = tag(to.ok_or(DialogError::Missing("To"))?.value(), "To")?;
        Ok(Ids {
            call_id,
            cseq,
            cseq_method,
            from_tag,
            to_tag,
        })
    }
}

/// The first From or To header (`name`), parsed whole by [`crate::address`].
fn party(headers: &rsip::Headers, name: &'static str) -> Result<Party, DialogError> {
    let value = address::header_values(headers, name)
        .next()
        .ok_or(DialogError::Missing(name))?;
    FromTo::parse(value)
        .map(Party::new)
        .map_err(|_| DialogError::Invalid(name))
}

/// The URI of the first Contact value, if any (§12.1.1, §12.1.2: the remote target). Read by
/// [`crate::address`], so that any legal Contact works (IPv6 hosts, quoted feature parameters
/// such as linphone's `+sip.instance="<urn:uuid:…>"`).
fn contact_uri(headers: &rsip::Headers) -> Result<Option<crate::uri::Uri>, DialogError> {
    let Some(value) = address::header_values(headers, "Contact").next() else {
        return Ok(None);
    };
    match Contacts::parse(value) {
        Ok(Contacts::List(list)) => match list.into_iter().next() {
            Some(c) => Ok(Some(c.into_address().uri().clone())),
            None => Err(DialogError::Invalid("Contact")),
        },
        Ok(Contacts::Wildcard) | Err(_) => Err(DialogError::Invalid("Contact")),
    }
}

/// Every Record-Route entry, in message order (several per header allowed).
fn record_routes(headers: &rsip::Headers) -> Result<Vec<NameAddr>, DialogError> {
    address::route_headers(headers, "Record-Route")
        .map_err(|_| DialogError::Invalid("Record-Route"))
}

/// Whether a route entry is a loose router (`;lr`, RFC 3261 §19.1.1); an `lr` written after
/// a bare URI (illegal, but seen) counts too.
fn is_loose(route: &NameAddr) -> bool {
    route.uri().has_param("lr") || route.has_param("lr")
}

/// Whether a method refreshes the remote target (§12.2: re-INVITE; UPDATE, RFC 3311;
/// SUBSCRIBE/NOTIFY, RFC 6665; REFER, RFC 3515 by way of its subscription).
fn is_target_refresh(method: Method) -> bool {
    matches!(
        method,
        Method::Invite | Method::Update | Method::Subscribe | Method::Notify | Method::Refer
    )
}

/// The highest CSeq number we use (§8.1.1.5: below 2^31).
const MAX_CSEQ: u32 = (1 << 31) - 1;

/// One dialog (§12): identity, CSeq numbers, parties, targets and route set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dialog {
    id: DialogId,
    state: DialogState,
    local_seq: Option<u32>,
    remote_seq: Option<u32>,
    local: Party,
    remote: Party,
    /// Our Contact URI, as text: it is only ever printed.
    local_target: Box<str>,
    remote_target: crate::uri::Uri,
    route_set: Vec<NameAddr>,
}

impl Dialog {
    /// The dialog a UAC has after sending `request` and receiving `response` (§12.1.2):
    /// a 101–199 with a To tag makes it early, a 2xx confirmed. Route set = the response's
    /// Record-Route in reverse order; remote target = the response's Contact (for a 1xx
    /// without one, the To URI until a later response gives it); local seq = the request's
    /// CSeq; remote seq empty; local target = the request's Contact.
    pub fn uac(request: &Request, response: &Response) -> Result<Dialog, DialogError> {
        let code = response.status_code.code();
        if !(101..300).contains(&code) {
            return Err(DialogError::NotDialogCreating);
        }
        let req = Ids::of(&request.headers)?;
        let resp = Ids::of(&response.headers)?;
        let local = party(&request.headers, "From")?;
        let remote = party(&response.headers, "To")?;
        let local_tag = req
            .from_tag
            .clone()
            .ok_or(DialogError::Missing("From tag"))?;
        let remote_tag = resp.to_tag.clone().ok_or(DialogError::NotDialogCreating)?;
        let local_target = contact_uri(&request.headers)?
            .ok_or(DialogError::Missing("Contact"))?
            .to_string()
            .into_boxed_str();
        let remote_target = match contact_uri(&response.headers)? {
            Some(uri) => uri,
            None if code < 200 => remote
                .address()
                .map(|a| a.uri().clone())
                .ok_or(DialogError::Invalid("To"))?,
            None => return Err(DialogError::Missing("Contact")),
        };
        let mut route_set = record_routes(&response.headers)?;
        route_set.reverse();
        Ok(Dialog {
            id: DialogId {
                call_id: req.call_id.clone(),
                local_tag,
                remote_tag,
            },
            state: if code < 200 {
                DialogState::Early
            } else {
                DialogState::Confirmed
            },
            local_seq: Some(req.cseq),
            remote_seq: None,
            local,
            remote,
            local_target,
            remote_target,
            route_set,
        })
    }

    /// The dialog a UAS has after receiving `request` and answering it with `local_tag` in
    /// the To header and `local_contact` as Contact (§12.1.1): route set = the request's
    /// Record-Route in order; remote target = the request's Contact; remote seq = its CSeq;
    /// local seq empty (the first request we send uses 1). `state` is
    /// [`DialogState::Early`] when answering with a 1xx, [`DialogState::Confirmed`] with a
    /// 2xx.
    pub fn uas(
        request: &Request,
        local_tag: &str,
        local_contact: Uri,
        state: DialogState,
    ) -> Result<Dialog, DialogError> {
        let req = Ids::of(&request.headers)?;
        let local = party(&request.headers, "To")?;
        let remote = party(&request.headers, "From")?;
        let remote_tag = req
            .from_tag
            .clone()
            .ok_or(DialogError::Missing("From tag"))?;
        let remote_target =
            contact_uri(&request.headers)?.ok_or(DialogError::Missing("Contact"))?;
        Ok(Dialog {
            id: DialogId {
                call_id: req.call_id.clone(),
                local_tag: local_tag.to_string(),
                remote_tag,
            },
            state,
            local_seq: None,
            remote_seq: Some(req.cseq),
            local,
            remote,
            local_target: local_contact.to_string().into_boxed_str(),
            remote_target,
            route_set: record_routes(&request.headers)?,
        })
    }

    /// The dialog with its rsip next hop computed.
    /// The dialog's identity.
    pub fn id(&self) -> &DialogId {
        &self.id
    }

    /// Early or confirmed.
    pub fn state(&self) -> DialogState {
        self.state
    }

    /// Marks the dialog confirmed (a UAS that created it early has now sent its 2xx).
    pub fn confirm(&mut self) {
        self.state = DialogState::Confirmed;
    }

    /// The CSeq number of the last request we sent in the dialog, if any.
    pub fn local_seq(&self) -> Option<u32> {
        self.local_seq
    }

    /// The CSeq number of the last request received in the dialog, if any.
    pub fn remote_seq(&self) -> Option<u32> {
        self.remote_seq
    }

    /// Our address as the From of our requests carries it, without the tag, read from the
    /// text the dialog keeps (`None` only if that text no longer parses, which it did when
    /// the dialog was made). Its URI is our URI (§12.1).
    pub fn local_address(&self) -> Option<NameAddr> {
        self.local.address()
    }

    /// The peer's address as the To of our requests carries it, without the tag, like
    /// [`Dialog::local_address`]. Its URI is the remote URI (§12.1).
    pub fn remote_address(&self) -> Option<NameAddr> {
        self.remote.address()
    }

    /// Our Contact URI, as it goes in the Contact of our requests.
    pub fn local_target(&self) -> &str {
        &self.local_target
    }

    /// The peer's Contact: where in-dialog requests go (§12.2.1.1).
    pub fn remote_target(&self) -> &crate::uri::Uri {
        &self.remote_target
    }

    /// The route set, in the order our requests visit it, each entry as the Record-Route
    /// carried it (§12.1.1, §12.1.2).
    pub fn route_set(&self) -> &[NameAddr] {
        &self.route_set
    }

    /// Where to send an in-dialog request: the first route, or the remote target when the
    /// route set is empty (§12.2.1.1, §8.1.2); as an rsip URI that prints like
    /// [`Dialog::next_hop_uri`] (see [`crate::uri::Uri::to_rsip`]: an IPv6 or `tel:` target
    /// comes as a carrier; read it with [`Dialog::next_hop_uri`]).
    pub fn next_hop(&self) -> Uri {
        self.next_hop_uri().to_rsip()
    }

    /// Where to send an in-dialog request (§12.2.1.1, §8.1.2), read by our parser: IPv6
    /// hosts and every URI form included.
    pub fn next_hop_uri(&self) -> &crate::uri::Uri {
        self.route_set
            .first()
            .map(|r| r.uri())
            .unwrap_or(&self.remote_target)
    }

    /// Sets our Contact (say, after a transport change), used from the next request on.
    pub fn set_local_target(&mut self, contact: Uri) {
        self.local_target = contact.to_string().into_boxed_str();
    }

    /// Checks an incoming in-dialog request's CSeq and records it (§12.2.2): lower than
    /// the last one received gives [`DialogError::CSeqOutOfOrder`], to answer with 500. An
    /// ACK carries its INVITE's number and is neither checked nor recorded.
    pub fn check_remote_cseq(&mut self, req: &Request) -> Result<(), DialogError> {
        if req.method == Method::Ack {
            return Ok(());
        }
        let value = req
            .headers
            .iter()
            .find_map(|h| match h {
                Header::CSeq(c) => Some(c),
                _ => None,
            })
            .ok_or(DialogError::Missing("CSeq"))?;
        let (seq, _) = crate::fields::cseq_of(value.value()).ok_or(DialogError::Invalid("CSeq"))?;
        if let Some(last) = self.remote_seq {
            if seq < last {
                return Err(DialogError::CSeqOutOfOrder { got: seq, last });
            }
        }
        self.remote_seq = Some(seq);
        Ok(())
    }

    /// Applies an incoming target-refresh request (re-INVITE, UPDATE, SUBSCRIBE, NOTIFY,
    /// REFER): its Contact, if any, becomes the remote target (§12.2.2).
    pub fn refresh_from_request(&mut self, req: &Request) -> Result<(), DialogError> {
        if is_target_refresh(req.method) {
            if let Some(uri) = contact_uri(&req.headers)? {
                self.remote_target = uri;
            }
        }
        Ok(())
    }

    /// Applies a response to a request we sent in this dialog. A 2xx to INVITE confirms an
    /// early dialog and recomputes its route set from the 2xx (§13.2.2.4); a response to a
    /// target refresh (1xx in an early dialog, or 2xx) with a Contact updates the remote
    /// target (§12.2.1.2). Responses of another dialog are ignored.
    pub fn on_response(&mut self, resp: &Response) -> Result<(), DialogError> {
        let parts = Ids::of(&resp.headers)?;
        if parts.call_id != self.id.call_id
            || parts.from_tag.as_deref() != Some(self.id.local_tag.as_str())
            || parts.to_tag.as_deref() != Some(self.id.remote_tag.as_str())
        {
            return Ok(());
        }
        let code = resp.status_code.code();
        let success = (200..300).contains(&code);
        if success && parts.cseq_method == Method::Invite && self.state == DialogState::Early {
            self.state = DialogState::Confirmed;
            let mut routes = record_routes(&resp.headers)?;
            routes.reverse();
            self.route_set = routes;
        }
        let early_refresh = self.state == DialogState::Early && (101..200).contains(&code);
        if is_target_refresh(parts.cseq_method) && (success || early_refresh) {
            if let Some(uri) = contact_uri(&resp.headers)? {
                self.remote_target = uri;
            }
        }
        Ok(())
    }

    /// The Request-URI and Route headers of an in-dialog request (§12.2.1.1): with an empty
    /// route set or a loose-routing first hop, the remote target and the route set; with a
    /// strict router first, that router (minus parameters a Request-URI may not carry) and
    /// the rest of the route set followed by the remote target.
    fn target_and_routes(&self) -> (Uri, Vec<Header>) {
        let route_header = |r: &NameAddr| Header::Route(rsip::headers::Route::new(r.as_str()));
        match self.route_set.first() {
            None => (self.next_hop(), Vec::new()),
            Some(first) if is_loose(first) => (
                self.remote_target.to_rsip(),
                self.route_set.iter().map(route_header).collect(),
            ),
            Some(first) => {
                let uri = first.uri().for_request_line().to_rsip();
                let mut routes: Vec<Header> =
                    self.route_set[1..].iter().map(route_header).collect();
                routes.push(Header::Route(rsip::headers::Route::new(format!(
                    "<{}>",
                    self.remote_target
                ))));
                (uri, routes)
            }
        }
    }

    /// The headers every in-dialog request starts with: Via, Max-Forwards, Route…, From,
    /// To, Call-ID, CSeq.
    fn base_request(&self, method: Method, seq: u32, via: Header) -> Request {
        let (uri, routes) = self.target_and_routes();
        let mut headers = vec![
            via,
            Header::MaxForwards(rsip::headers::MaxForwards::new("70")),
        ];
        headers.extend(routes);
        headers.push(Header::From(rsip::headers::From::new(
            self.local.render(&self.id.local_tag),
        )));
        headers.push(Header::To(rsip::headers::To::new(
            self.remote.render(&self.id.remote_tag),
        )));
        headers.push(Header::CallId(rsip::headers::CallId::new(
            self.id.call_id.clone(),
        )));
        headers.push(Header::CSeq(rsip::headers::CSeq::new(format!(
            "{seq} {method}"
        ))));
        Request {
            method,
            uri,
            version: rsip::Version::V2,
            headers: rsip::Headers::from(headers),
            body: Vec::new(),
        }
    }

    /// Builds an in-dialog request (§12.2.1.1) — BYE, re-INVITE, UPDATE, REFER, NOTIFY,
    /// SUBSCRIBE, MESSAGE, INFO, OPTIONS, PRACK — with the next local CSeq number, a Via
    /// from `via`, the dialog's Request-URI and Route set, our Contact (for all but BYE and
    /// MESSAGE), then `extra` headers, the body and its Content-Length. ACK and CANCEL are
    /// refused: see [`Dialog::ack_for_2xx`] and [`cancel_for`].
    pub fn request(
        &mut self,
        method: Method,
        via: &ViaSpec,
        extra: Vec<Header>,
        body: Vec<u8>,
    ) -> Result<Request, DialogError> {
        if matches!(method, Method::Ack | Method::Cancel) {
            return Err(DialogError::MethodNotAllowed(method));
        }
        let seq = match self.local_seq {
            None => 1,
            Some(s) if s >= MAX_CSEQ => return Err(DialogError::CSeqExhausted),
            Some(s) => s + 1,
        };
        self.local_seq = Some(seq);
        let mut req = self.base_request(method, seq, via.header());
        if !matches!(method, Method::Bye | Method::Message) {
            req.headers
                .push(Header::Contact(rsip::headers::Contact::new(format!(
                    "<{}>",
                    self.local_target
                ))));
        }
        for h in extra {
            req.headers.push(h);
        }
        set_content_length(&mut req.headers, body.len());
        req.body = body;
        Ok(req)
    }

    /// The ACK for a 2xx to `invite` (§13.2.2.4): built like an in-dialog request, with the
    /// INVITE's CSeq number and method ACK, a new branch, the route set, and the INVITE's
    /// Authorization / Proxy-Authorization headers copied. `extra` and `body` (an SDP
    /// answer after an offerless INVITE) are added as in [`Dialog::request`].
    pub fn ack_for_2xx(
        &self,
        invite: &Request,
        via: &ViaSpec,
        extra: Vec<Header>,
        body: Vec<u8>,
    ) -> Result<Request, DialogError> {
        let parts = Ids::of(&invite.headers)?;
        let mut req = self.base_request(Method::Ack, parts.cseq, via.header());
        for h in invite.headers.iter() {
            if matches!(h, Header::Authorization(_) | Header::ProxyAuthorization(_)) {
                req.headers.push(h.clone());
            }
        }
        for h in extra {
            req.headers.push(h);
        }
        set_content_length(&mut req.headers, body.len());
        req.body = body;
        Ok(req)
    }
}

/// The CANCEL for an INVITE we sent (§9.1): the same Request-URI, Call-ID, From, To and
/// CSeq number (method CANCEL), a top Via identical to the INVITE's (branch included), its
/// Route headers, Max-Forwards 70 and no body.
pub fn cancel_for(invite: &Request) -> Result<Request, DialogError> {
    let parts = Ids::of(&invite.headers)?;
    let mut headers = Vec::new();
    let via = invite
        .headers
        .iter()
        .find(|h| matches!(h, Header::Via(_)))
        .ok_or(DialogError::Missing("Via"))?;
    headers.push(via.clone());
    headers.push(Header::MaxForwards(rsip::headers::MaxForwards::new("70")));
    for h in invite.headers.iter() {
        if matches!(h, Header::Route(_)) {
            headers.push(h.clone());
        }
    }
    for h in invite.headers.iter() {
        if matches!(h, Header::From(_) | Header::To(_) | Header::CallId(_)) {
            headers.push(h.clone());
        }
    }
    headers.push(Header::CSeq(rsip::headers::CSeq::new(format!(
        "{} CANCEL",
        parts.cseq
    ))));
    let mut headers = rsip::Headers::from(headers);
    set_content_length(&mut headers, 0);
    Ok(Request {
        method: Method::Cancel,
        uri: invite.uri.clone(),
        version: rsip::Version::V2,
        headers,
        body: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::message::{response_for, to_bytes, Summary};
    use rsip::SipMessage;

    const INVITE: &str = "INVITE sip:echo@relay.test SIP/2.0\r\n\
Via: SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bKinv1;rport\r\n\
Max-Forwards: 70\r\n\
Route: <sip:outbound.test;lr>\r\n\
From: \"Alice\" <sip:alice@relay.test>;tag=alice1\r\n\
To: <sip:echo@relay.test>\r\n\
Call-ID: call-1@192.0.2.1\r\n\
CSeq: 10 INVITE\r\n\
Contact: <sip:alice@192.0.2.1:5070>\r\n\
Proxy-Authorization: Digest username=\"alice\", realm=\"relay.test\", nonce=\"n\", uri=\"sip:echo@relay.test\", response=\"r\"\r\n\
Record-Route: <sip:p1.test;lr>, <sip:p2.test;lr>\r\n\
Record-Route: <sip:p3.test;lr>\r\n\
Content-Length: 0\r\n\r\n";

    fn request(text: &str) -> Request {
        match SipMessage::try_from(text).unwrap() {
            SipMessage::Request(r) => r,
            other => panic!("not a request: {other:?}"),
        }
    }

    fn parse_back(req: Request) -> Request {
        let bytes = to_bytes(req);
        match SipMessage::try_from(bytes.to_vec()).unwrap() {
            SipMessage::Request(r) => r,
            other => panic!("not a request: {other:?}"),
        }
    }

    fn header_values(req: &Request, name: &str) -> Vec<String> {
        req.headers
            .iter()
            .map(|h| h.to_string())
            .filter_map(|h| {
                let (n, v) = h.split_once(':')?;
                n.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
            .collect()
    }

    /// A 2xx from the UAS side with the given Record-Route lines.
    fn ok_for(invite: &Request, record_routes: &[&str], contact: &str, code: u16) -> Response {
        let mut resp = response_for(invite, code, None, Some("bob9"));
        for rr in record_routes {
            resp.headers
                .push(Header::RecordRoute(rsip::headers::RecordRoute::new(*rr)));
        }
        resp.headers
            .push(Header::Contact(rsip::headers::Contact::new(contact)));
        resp
    }

    fn via() -> ViaSpec {
        ViaSpec {
            transport: Transport::Tcp,
            sent_by: "192.0.2.1:5070".into(),
        }
    }

    #[test]
    fn uas_dialog_per_12_1_1() {
        let invite = request(INVITE);
        let contact = Uri::try_from("sip:relay@203.0.113.5:5060").unwrap();
        let mut d = Dialog::uas(&invite, "relay7", contact, DialogState::Confirmed).unwrap();
        assert_eq!(
            d.id(),
            &DialogId {
                call_id: "call-1@192.0.2.1".into(),
                local_tag: "relay7".into(),
                remote_tag: "alice1".into()
            }
        );
        assert_eq!(d.remote_seq(), Some(10));
        assert_eq!(d.local_seq(), None);
        assert_eq!(d.remote_target().to_string(), "sip:alice@192.0.2.1:5070");
        let rs: Vec<String> = d.route_set().iter().map(|r| r.to_string()).collect();
        assert_eq!(
            rs,
            ["<sip:p1.test;lr>", "<sip:p2.test;lr>", "<sip:p3.test;lr>"]
        );
        assert_eq!(d.next_hop().to_string(), "sip:p1.test;lr");

        // A BYE towards the caller: loose routing, so the Request-URI is the remote target.
        let bye = parse_back(d.request(Method::Bye, &via(), vec![], vec![]).unwrap());
        assert_eq!(bye.uri.to_string(), "sip:alice@192.0.2.1:5070");
        assert_eq!(
            header_values(&bye, "Route"),
            ["<sip:p1.test;lr>", "<sip:p2.test;lr>", "<sip:p3.test;lr>"]
        );
        assert_eq!(
            header_values(&bye, "From"),
            ["<sip:echo@relay.test>;tag=relay7"]
        );
        assert_eq!(
            header_values(&bye, "To"),
            ["\"Alice\" <sip:alice@relay.test>;tag=alice1"]
        );
        assert_eq!(header_values(&bye, "CSeq"), ["1 BYE"]);
        assert!(header_values(&bye, "Contact").is_empty());
        let s = Summary::of_request(&bye).unwrap();
        assert!(s.branch.starts_with("z9hG4bK"));
        assert_eq!(
            header_values(&bye, "Via")[0],
            format!("SIP/2.0/TCP 192.0.2.1:5070;branch={};rport", s.branch)
        );
        assert_eq!(
            DialogId::of_response(&response_for(&bye, 200, None, None))
                .unwrap()
                .local_tag,
            "relay7"
        );
    }

    #[test]
    fn uac_dialog_per_12_1_2_and_ack() {
        let invite = request(INVITE);
        let ok = ok_for(
            &invite,
            &["<sip:p1.test;lr>, <sip:p2.test;lr>", "<sip:p3.test;lr>"],
            "<sip:bob@198.51.100.9:5080;transport=tcp>",
            200,
        );
        let d = Dialog::uac(&invite, &ok).unwrap();
        assert_eq!(d.state(), DialogState::Confirmed);
        assert_eq!(d.id().local_tag, "alice1");
        assert_eq!(d.id().remote_tag, "bob9");
        assert_eq!(d.local_seq(), Some(10));
        assert_eq!(d.remote_seq(), None);
        assert_eq!(
            d.remote_target().to_string(),
            "sip:bob@198.51.100.9:5080;transport=tcp"
        );
        let rs: Vec<String> = d.route_set().iter().map(|r| r.to_string()).collect();
        assert_eq!(
            rs,
            ["<sip:p3.test;lr>", "<sip:p2.test;lr>", "<sip:p1.test;lr>"]
        );
        assert_eq!(DialogId::of_response(&ok).as_ref(), Some(d.id()));

        let ack = parse_back(d.ack_for_2xx(&invite, &via(), vec![], vec![]).unwrap());
        assert_eq!(ack.method, Method::Ack);
        assert_eq!(
            ack.uri.to_string(),
            "sip:bob@198.51.100.9:5080;transport=TCP"
        );
        assert_eq!(header_values(&ack, "CSeq"), ["10 ACK"]);
        assert_eq!(
            header_values(&ack, "Route"),
            ["<sip:p3.test;lr>", "<sip:p2.test;lr>", "<sip:p1.test;lr>"]
        );
        assert_eq!(header_values(&ack, "Proxy-Authorization").len(), 1);
        assert_ne!(Summary::of_request(&ack).unwrap().branch, "z9hG4bKinv1");
        assert_eq!(
            header_values(&ack, "To"),
            ["<sip:echo@relay.test>;tag=bob9"]
        );
        assert_eq!(
            header_values(&ack, "From"),
            ["\"Alice\" <sip:alice@relay.test>;tag=alice1"]
        );
    }

    #[test]
    fn in_dialog_methods_and_cseq() {
        let invite = request(INVITE);
        let ok = ok_for(&invite, &[], "<sip:bob@198.51.100.9:5080>", 200);
        let mut d = Dialog::uac(&invite, &ok).unwrap();
        assert_eq!(d.next_hop().to_string(), "sip:bob@198.51.100.9:5080");
        let methods = [
            Method::Invite,
            Method::Refer,
            Method::Notify,
            Method::Message,
            Method::Info,
            Method::Options,
            Method::Bye,
        ];
        for (i, m) in methods.into_iter().enumerate() {
            let extra = vec![Header::Other("X-Test".into(), "1".into())];
            let req = parse_back(d.request(m, &via(), extra, b"hi".to_vec()).unwrap());
            assert_eq!(req.method, m);
            assert_eq!(header_values(&req, "CSeq"), [format!("{} {m}", 11 + i)]);
            assert!(header_values(&req, "Route").is_empty());
            assert_eq!(req.uri.to_string(), "sip:bob@198.51.100.9:5080");
            assert_eq!(
                header_values(&req, "Contact").is_empty(),
                matches!(m, Method::Bye | Method::Message)
            );
            assert_eq!(header_values(&req, "X-Test"), ["1"]);
            assert_eq!(header_values(&req, "Content-Length"), ["2"]);
            assert_eq!(req.body, b"hi");
        }
        assert_eq!(d.local_seq(), Some(17));
        assert_eq!(
            d.request(Method::Ack, &via(), vec![], vec![]),
            Err(DialogError::MethodNotAllowed(Method::Ack))
        );
        assert_eq!(d.local_seq(), Some(17));
    }

    #[test]
    fn strict_router_first() {
        let invite = request(INVITE);
        // Record-Route reversed: the UAC's first hop is p2, a strict router (no lr).
        let ok = ok_for(
            &invite,
            &["<sip:p1.test;lr>", "<sip:p2.test;transport=tcp>"],
            "<sip:bob@198.51.100.9>",
            200,
        );
        let mut d = Dialog::uac(&invite, &ok).unwrap();
        assert_eq!(d.next_hop().to_string(), "sip:p2.test;transport=tcp");
        let bye = parse_back(d.request(Method::Bye, &via(), vec![], vec![]).unwrap());
        assert_eq!(bye.uri.to_string(), "sip:p2.test;transport=TCP");
        assert_eq!(
            header_values(&bye, "Route"),
            ["<sip:p1.test;lr>", "<sip:bob@198.51.100.9>"]
        );
    }

    #[test]
    fn remote_cseq_rejects_lower() {
        let invite = request(INVITE);
        let mut d = Dialog::uas(
            &invite,
            "t",
            Uri::try_from("sip:me@h").unwrap(),
            DialogState::Confirmed,
        )
        .unwrap();
        let with_cseq = |n: u32, m: &str| {
            request(
                &INVITE
                    .replace("CSeq: 10 INVITE", &format!("CSeq: {n} {m}"))
                    .replacen("INVITE sip", &format!("{m} sip"), 1),
            )
        };
        assert!(d.check_remote_cseq(&with_cseq(10, "ACK")).is_ok());
        assert!(d.check_remote_cseq(&with_cseq(11, "INFO")).is_ok());
        assert_eq!(d.remote_seq(), Some(11));
        assert_eq!(
            d.check_remote_cseq(&with_cseq(9, "BYE")),
            Err(DialogError::CSeqOutOfOrder { got: 9, last: 11 })
        );
        assert_eq!(d.remote_seq(), Some(11));
        assert!(d.check_remote_cseq(&with_cseq(12, "BYE")).is_ok());
    }

    #[test]
    fn target_refresh_and_early_confirmation() {
        let invite = request(INVITE);
        let ringing = ok_for(&invite, &["<sip:old.test;lr>"], "<sip:bob@10.0.0.1>", 180);
        let mut d = Dialog::uac(&invite, &ringing).unwrap();
        assert_eq!(d.state(), DialogState::Early);
        assert_eq!(d.route_set().len(), 1);
        let ok = ok_for(
            &invite,
            &["<sip:p1.test;lr>", "<sip:p2.test;lr>"],
            "<sip:bob@10.0.0.2>",
            200,
        );
        d.on_response(&ok).unwrap();
        assert_eq!(d.state(), DialogState::Confirmed);
        assert_eq!(d.remote_target().to_string(), "sip:bob@10.0.0.2");
        let rs: Vec<String> = d.route_set().iter().map(|r| r.to_string()).collect();
        assert_eq!(rs, ["<sip:p2.test;lr>", "<sip:p1.test;lr>"]);

        // A re-INVITE from the peer moves its target; a BYE does not.
        let reinvite = request(
            &INVITE
                .replace(
                    "To: <sip:echo@relay.test>",
                    "To: <sip:echo@relay.test>;tag=x",
                )
                .replace(
                    "Contact: <sip:alice@192.0.2.1:5070>",
                    "Contact: <sip:bob@10.0.0.3>",
                ),
        );
        d.refresh_from_request(&reinvite).unwrap();
        assert_eq!(d.remote_target().to_string(), "sip:bob@10.0.0.3");
        let bye = request(
            &reinvite
                .to_string()
                .replacen("INVITE sip", "BYE sip", 1)
                .replace("10 INVITE", "11 BYE")
                .replace("sip:bob@10.0.0.3", "sip:bob@10.0.0.4"),
        );
        d.refresh_from_request(&bye).unwrap();
        assert_eq!(d.remote_target().to_string(), "sip:bob@10.0.0.3");

        // Our re-INVITE's 2xx with a new Contact moves it again; the route set stays.
        let reinv = d.request(Method::Invite, &via(), vec![], vec![]).unwrap();
        let mut ok2 = response_for(&reinv, 200, None, None);
        ok2.headers
            .push(Header::Contact(rsip::headers::Contact::new(
                "<sip:bob@10.0.0.5>",
            )));
        ok2.headers
            .push(Header::RecordRoute(rsip::headers::RecordRoute::new(
                "<sip:evil.test;lr>",
            )));
        d.on_response(&ok2).unwrap();
        assert_eq!(d.remote_target().to_string(), "sip:bob@10.0.0.5");
        assert_eq!(d.route_set().len(), 2);
        // A response of another dialog changes nothing.
        let mut foreign = ok2.clone();
        foreign.headers.retain(|h| !matches!(h, Header::CallId(_)));
        foreign
            .headers
            .push(Header::CallId(rsip::headers::CallId::new("other")));
        foreign.headers.retain(|h| !matches!(h, Header::Contact(_)));
        foreign
            .headers
            .push(Header::Contact(rsip::headers::Contact::new(
                "<sip:bob@10.0.0.6>",
            )));
        d.on_response(&foreign).unwrap();
        assert_eq!(d.remote_target().to_string(), "sip:bob@10.0.0.5");
    }

    #[test]
    fn creation_errors() {
        let invite = request(INVITE);
        let trying = response_for(&invite, 100, None, None);
        assert_eq!(
            Dialog::uac(&invite, &trying),
            Err(DialogError::NotDialogCreating)
        );
        let busy = response_for(&invite, 486, None, Some("b"));
        assert_eq!(
            Dialog::uac(&invite, &busy),
            Err(DialogError::NotDialogCreating)
        );
        let no_tag = response_for(&invite, 180, None, None);
        assert_eq!(
            Dialog::uac(&invite, &no_tag),
            Err(DialogError::NotDialogCreating)
        );
        let ok_no_contact = response_for(&invite, 200, None, Some("b"));
        assert_eq!(
            Dialog::uac(&invite, &ok_no_contact),
            Err(DialogError::Missing("Contact"))
        );
        let untagged = request(&INVITE.replace(";tag=alice1", ""));
        assert_eq!(
            Dialog::uas(
                &untagged,
                "t",
                Uri::try_from("sip:me@h").unwrap(),
                DialogState::Early
            ),
            Err(DialogError::Missing("From tag"))
        );
        assert_eq!(DialogId::of_incoming_request(&invite), None);
    }

    /// §12.1.2 with values rsip cannot read: linphone's Contact (a quoted `+sip.instance`
    /// holding `<…>`), IPv6 hosts in Contact and Record-Route, a quoted From parameter.
    #[test]
    fn uac_dialog_from_values_rsip_cannot_read() {
        let invite = request(&INVITE.replace(
            "From: \"Alice\" <sip:alice@relay.test>;tag=alice1",
            "From: \"Alice \\\"A\\\"\" <sip:alice@relay.test>;x=\"a;b,c\";tag=alice1",
        ));
        let linphone = "<sip:bob@127.0.0.1:59754;transport=udp>;+sip.instance=\"<urn:uuid:090b314c-7132-0014-ac65-4248b341241a>\";expires=3600";
        let ok = ok_for(
            &invite,
            &["<sip:[2001:db8::9]:5070;lr>", "<sip:p1.test;lr>"],
            linphone,
            200,
        );
        let d = Dialog::uac(&invite, &ok).unwrap();
        assert_eq!(
            d.remote_target().to_string(),
            "sip:bob@127.0.0.1:59754;transport=udp"
        );
        assert_eq!(d.remote_target().transport(), Some("udp"));
        assert_eq!(d.next_hop_uri().to_string(), "sip:p1.test;lr");
        assert_eq!(d.next_hop().to_string(), "sip:p1.test;lr");
        assert_eq!(
            d.local_address().unwrap().param("x").flatten().as_deref(),
            Some("a;b,c")
        );
        // What we send, before any rsip re-parse (rsip would upper-case `transport=udp`).
        let bye = Dialog::uac(&invite, &ok)
            .unwrap()
            .request(Method::Bye, &via(), vec![], vec![])
            .unwrap();
        assert!(String::from_utf8(to_bytes(bye.clone()).to_vec())
            .unwrap()
            .starts_with("BYE sip:bob@127.0.0.1:59754;transport=udp SIP/2.0\r\n"));
        assert_eq!(bye.uri.to_string(), "sip:bob@127.0.0.1:59754;transport=udp");
        assert_eq!(
            header_values(&bye, "Route"),
            ["<sip:p1.test;lr>", "<sip:[2001:db8::9]:5070;lr>"]
        );
        assert_eq!(
            header_values(&bye, "From"),
            ["\"Alice \\\"A\\\"\" <sip:alice@relay.test>;x=\"a;b,c\";tag=alice1"]
        );

        // An IPv6 Contact and no route: the request goes to the IPv6 target.
        let ok6 = ok_for(
            &invite,
            &[],
            "<sip:bob@[2001:db8::10]:5070;transport=tcp>;expires=60",
            200,
        );
        let mut d = Dialog::uac(&invite, &ok6).unwrap();
        let target = d.next_hop_uri();
        assert!(matches!(target.host(), Some(crate::uri::Host::V6(_))));
        assert_eq!(target.host_port_text(), Some("[2001:db8::10]:5070"));
        assert_eq!(
            d.next_hop().to_string(),
            "sip:bob@[2001:db8::10]:5070;transport=tcp"
        );
        let bye = d.request(Method::Bye, &via(), vec![], vec![]).unwrap();
        assert_eq!(
            bye.uri.to_string(),
            "sip:bob@[2001:db8::10]:5070;transport=tcp"
        );
    }

    /// §12.1.1 with an IPv6 Contact, a strict IPv6 router and a `tel:` To.
    #[test]
    fn uas_dialog_with_ipv6_and_tel() {
        let invite = request(
            &INVITE
                .replace("To: <sip:echo@relay.test>", "To: <tel:+1-555-123-4567;phone-context=relay.test>")
                .replace(
                    "Contact: <sip:alice@192.0.2.1:5070>",
                    "Contact: \"Alice\" <sip:alice@[2001:db8::1]:5070;ob>;reg-id=1",
                )
                .replace(
                    "Record-Route: <sip:p1.test;lr>, <sip:p2.test;lr>\r\nRecord-Route: <sip:p3.test;lr>\r\n",
                    "Record-Route: <sip:[2001:db8::5];method=INVITE>, <sip:p2.test;lr>\r\n",
                ),
        );
        let mut d = Dialog::uas(
            &invite,
            "t",
            Uri::try_from("sip:me@h").unwrap(),
            DialogState::Confirmed,
        )
        .unwrap();
        assert_eq!(
            d.remote_target().to_string(),
            "sip:alice@[2001:db8::1]:5070;ob"
        );
        assert_eq!(d.next_hop_uri().host_port_text(), Some("[2001:db8::5]"));
        let bye = d.request(Method::Bye, &via(), vec![], vec![]).unwrap();
        // Strict routing: the router's URI (minus method) is the Request-URI.
        assert_eq!(bye.uri.to_string(), "sip:[2001:db8::5]");
        assert_eq!(
            header_values(&bye, "Route"),
            ["<sip:p2.test;lr>", "<sip:alice@[2001:db8::1]:5070;ob>"]
        );
        assert_eq!(
            header_values(&bye, "From"),
            ["<tel:+1-555-123-4567;phone-context=relay.test>;tag=t"]
        );
        assert_eq!(
            d.local_address().unwrap().uri().tel_number().as_deref(),
            Some("+15551234567")
        );
        // A Contact nobody can read is an error, not a panic.
        let bad = request(&INVITE.replace(
            "Contact: <sip:alice@192.0.2.1:5070>",
            "Contact: <sip:alice@[zz]>",
        ));
        assert_eq!(
            Dialog::uas(
                &bad,
                "t",
                Uri::try_from("sip:me@h").unwrap(),
                DialogState::Early
            ),
            Err(DialogError::Invalid("Contact"))
        );
    }

    #[test]
    fn cancel_per_9_1() {
        let invite = request(INVITE);
        let cancel = parse_back(cancel_for(&invite).unwrap());
        assert_eq!(cancel.method, Method::Cancel);
        assert_eq!(cancel.uri, invite.uri);
        assert_eq!(header_values(&cancel, "Via"), header_values(&invite, "Via"));
        assert_eq!(header_values(&cancel, "CSeq"), ["10 CANCEL"]);
        assert_eq!(header_values(&cancel, "Route"), ["<sip:outbound.test;lr>"]);
        assert_eq!(
            header_values(&cancel, "From"),
            header_values(&invite, "From")
        );
        assert_eq!(header_values(&cancel, "To"), header_values(&invite, "To"));
        assert_eq!(
            header_values(&cancel, "Call-ID"),
            header_values(&invite, "Call-ID")
        );
        assert!(header_values(&cancel, "Proxy-Authorization").is_empty());
        assert!(cancel.body.is_empty());
    }
}
