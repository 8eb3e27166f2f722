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
/// tag for the UAC and the To tag for the UAS. This is the owned form, a map key; a
/// [`Dialog`] lends its own as a [`DialogIdRef`].
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

    /// This identity borrowed, as [`Dialog::id`] gives one (§12).
    pub fn as_id_ref(&self) -> DialogIdRef<'_> {
        DialogIdRef {
            call_id: &self.call_id,
            local_tag: &self.local_tag,
            remote_tag: &self.remote_tag,
        }
    }
}

impl fmt::Display for DialogId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.as_id_ref(), f)
    }
}

/// A dialog's identity (§12) as [`Dialog::id`] lends it: Call-ID, local tag and remote tag
/// borrowed from the dialog's text. Compares with [`DialogId`] both ways (and with
/// `&DialogId`), prints and hashes like it; [`DialogIdRef::to_owned`] makes the owned key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DialogIdRef<'a> {
    /// The Call-ID.
    pub call_id: &'a str,
    /// Our tag.
    pub local_tag: &'a str,
    /// The peer's tag.
    pub remote_tag: &'a str,
}

impl DialogIdRef<'_> {
    /// The owned identity (§12), say to key a map of dialogs.
    pub fn to_owned(self) -> DialogId {
        DialogId {
            call_id: self.call_id.to_string(),
            local_tag: self.local_tag.to_string(),
            remote_tag: self.remote_tag.to_string(),
        }
    }
}

impl From<DialogIdRef<'_>> for DialogId {
    /// [`DialogIdRef::to_owned`].
    fn from(id: DialogIdRef<'_>) -> DialogId {
        id.to_owned()
    }
}

impl fmt::Display for DialogIdRef<'_> {
    /// `call-id;local=tag;remote=tag`, as [`DialogId`] prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{};local={};remote={}",
            self.call_id, self.local_tag, self.remote_tag
        )
    }
}

impl PartialEq<DialogId> for DialogIdRef<'_> {
    fn eq(&self, other: &DialogId) -> bool {
        *self == other.as_id_ref()
    }
}

impl PartialEq<&DialogId> for DialogIdRef<'_> {
    fn eq(&self, other: &&DialogId) -> bool {
        *self == other.as_id_ref()
    }
}

impl PartialEq<DialogIdRef<'_>> for DialogId {
    fn eq(&self, other: &DialogIdRef<'_>) -> bool {
        self.as_id_ref() == *other
    }
}

impl PartialEq<DialogIdRef<'_>> for &DialogId {
    fn eq(&self, other: &DialogIdRef<'_>) -> bool {
        self.as_id_ref() == *other
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

/// The first From or To header (`name`), parsed whole by [`crate::address`], without its
/// tag: the party as the dialog keeps it (display name, URI and the other parameters, as
/// written).
fn party(headers: &rsip::Headers, name: &'static str) -> Result<NameAddr, DialogError> {
    let value = address::header_values(headers, name)
        .next()
        .ok_or(DialogError::Missing(name))?;
    FromTo::parse(value)
        .map(|v| v.into_address().without_param("tag"))
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

// The parts of a [`Dialog`]'s text, in the order they are written there: part `i` ends at
// `ends[i]` and starts where part `i - 1` ends. The route set follows the last part.

/// The Call-ID.
const CALL_ID: usize = 0;
/// Our tag (From tag of the UAC, To tag of the UAS).
const LOCAL_TAG: usize = 1;
/// The peer's tag.
const REMOTE_TAG: usize = 2;
/// Our name-addr as written in From/To, without the tag.
const LOCAL: usize = 3;
/// The peer's name-addr, likewise.
const REMOTE: usize = 4;
/// Our Contact URI.
const LOCAL_TARGET: usize = 5;
/// The peer's Contact URI (or its To URI in an early dialog without one).
const REMOTE_TARGET: usize = 6;
/// How many parts have an end in [`Dialog`]'s `ends`.
const PARTS: usize = 7;

/// Between two route set entries in a [`Dialog`]'s text: a line feed, which no name-addr
/// read by [`crate::address`] holds (not in a quoted string, a URI, a display name or a
/// parameter), so splitting there gives back the entries as written.
const ROUTE_SEP: char = '\n';

/// `parts` and the route set written one after the other into one text, with the end of
/// each part. Fails only when the parts pass 4 GiB, which no message we read holds.
fn pack<'r>(
    parts: [&str; PARTS],
    routes: impl Iterator<Item = &'r str> + Clone,
) -> Result<(Box<str>, [u32; PARTS]), DialogError> {
    let (count, routes_len) = routes
        .clone()
        .fold((0, 0), |(n, len), r| (n + 1, len + r.len()));
    let seps = ROUTE_SEP.len_utf8() * usize::saturating_sub(count, 1);
    // Exactly the length written, so that `into_boxed_str` keeps the one allocation.
    let len = parts.iter().map(|p| p.len()).sum::<usize>() + routes_len + seps;
    let mut text = String::with_capacity(len);
    let mut ends = [0; PARTS];
    for (end, part) in ends.iter_mut().zip(parts) {
        text.push_str(part);
        // The Call-ID is the one part with no length limit of its own.
        *end = u32::try_from(text.len()).map_err(|_| DialogError::Invalid("Call-ID"))?;
    }
    for (i, route) in routes.enumerate() {
        if i > 0 {
            text.push(ROUTE_SEP);
        }
        text.push_str(route);
    }
    Ok((text.into_boxed_str(), ends))
}

/// One dialog (§12): identity, CSeq numbers, parties, targets and route set.
///
/// A relay holds two per call for as long as the call lasts, so a dialog is kept small: all
/// its text — Call-ID, both tags, both parties, both targets and the route set — is one
/// allocation, cut by offsets, and what is not a plain string (the remote target, the route
/// set) is parsed again when asked for ([`Dialog::remote_target`], [`Dialog::route_set`]).
#[derive(Clone, PartialEq, Eq)]
pub struct Dialog {
    /// The parts ([`CALL_ID`] … [`REMOTE_TARGET`]) then the route set, its entries as
    /// written in Record-Route, in the order our requests visit them, [`ROUTE_SEP`] between
    /// two.
    text: Box<str>,
    /// Where each part ends in `text`.
    ends: [u32; PARTS],
    local_seq: Option<u32>,
    remote_seq: Option<u32>,
    state: DialogState,
}

impl fmt::Debug for Dialog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dialog")
            .field("id", &self.id())
            .field("state", &self.state)
            .field("local_seq", &self.local_seq)
            .field("remote_seq", &self.remote_seq)
            .field("local", &self.part(LOCAL))
            .field("remote", &self.part(REMOTE))
            .field("local_target", &self.part(LOCAL_TARGET))
            .field("remote_target", &self.part(REMOTE_TARGET))
            .field("route_set", &self.route_entries().collect::<Vec<_>>())
            .finish()
    }
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
        let local_tag = req.from_tag.ok_or(DialogError::Missing("From tag"))?;
        let remote_tag = resp.to_tag.ok_or(DialogError::NotDialogCreating)?;
        let local_target = contact_uri(&request.headers)?.ok_or(DialogError::Missing("Contact"))?;
        let contact = contact_uri(&response.headers)?;
        let remote_target = match &contact {
            Some(uri) => uri,
            None if code < 200 => remote.uri(),
            None => return Err(DialogError::Missing("Contact")),
        };
        let route_set = record_routes(&response.headers)?;
        let (text, ends) = pack(
            [
                &req.call_id,
                &local_tag,
                &remote_tag,
                local.as_str(),
                remote.as_str(),
                local_target.as_str(),
                remote_target.as_str(),
            ],
            route_set.iter().rev().map(NameAddr::as_str),
        )?;
        Ok(Dialog {
            text,
            ends,
            local_seq: Some(req.cseq),
            remote_seq: None,
            state: if code < 200 {
                DialogState::Early
            } else {
                DialogState::Confirmed
            },
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
        let remote_tag = req.from_tag.ok_or(DialogError::Missing("From tag"))?;
        let remote_target =
            contact_uri(&request.headers)?.ok_or(DialogError::Missing("Contact"))?;
        let route_set = record_routes(&request.headers)?;
        let (text, ends) = pack(
            [
                &req.call_id,
                local_tag,
                &remote_tag,
                local.as_str(),
                remote.as_str(),
                &local_contact.to_string(),
                remote_target.as_str(),
            ],
            route_set.iter().map(NameAddr::as_str),
        )?;
        Ok(Dialog {
            text,
            ends,
            local_seq: None,
            remote_seq: Some(req.cseq),
            state,
        })
    }

    /// Part `i` of the text (see [`CALL_ID`]).
    fn part(&self, i: usize) -> &str {
        let start = match i.checked_sub(1) {
            Some(before) => self.ends.get(before).copied().unwrap_or(0),
            None => 0,
        };
        let end = self.ends.get(i).copied().unwrap_or(start);
        self.text
            .get(start as usize..end as usize)
            .unwrap_or_default()
    }

    /// Every part of the text, in order.
    fn parts(&self) -> [&str; PARTS] {
        std::array::from_fn(|i| self.part(i))
    }

    /// The route set entries as written, in the order our requests visit them.
    fn route_entries(&self) -> impl Iterator<Item = &str> + Clone {
        self.text
            .get(self.ends[PARTS - 1] as usize..)
            .unwrap_or_default()
            .split(ROUTE_SEP)
            .filter(|r| !r.is_empty())
    }

    /// The first route, parsed again (it parsed when the dialog was made).
    fn first_route(&self) -> Option<NameAddr> {
        self.route_entries()
            .next()
            .and_then(|r| NameAddr::parse(r).ok())
    }

    /// Part `i` replaced by `with`, the rest kept.
    fn set_part(&mut self, i: usize, with: &str) -> Result<(), DialogError> {
        let mut parts = self.parts();
        parts[i] = with;
        let (text, ends) = pack(parts, self.route_entries())?;
        self.text = text;
        self.ends = ends;
        Ok(())
    }

    /// The route set replaced by `routes` (in the order our requests visit them).
    fn set_routes<'r>(
        &mut self,
        routes: impl Iterator<Item = &'r str> + Clone,
    ) -> Result<(), DialogError> {
        let (text, ends) = pack(self.parts(), routes)?;
        self.text = text;
        self.ends = ends;
        Ok(())
    }

    /// The dialog's identity (§12), borrowed from its text: compare it with a
    /// [`DialogId`], or make one with [`DialogIdRef::to_owned`].
    pub fn id(&self) -> DialogIdRef<'_> {
        DialogIdRef {
            call_id: self.part(CALL_ID),
            local_tag: self.part(LOCAL_TAG),
            remote_tag: self.part(REMOTE_TAG),
        }
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
        NameAddr::parse(self.part(LOCAL)).ok()
    }

    /// The peer's address as the To of our requests carries it, without the tag, like
    /// [`Dialog::local_address`]. Its URI is the remote URI (§12.1).
    pub fn remote_address(&self) -> Option<NameAddr> {
        NameAddr::parse(self.part(REMOTE)).ok()
    }

    /// Our Contact URI, as it goes in the Contact of our requests (§12.1.1, §12.1.2: the
    /// local target).
    pub fn local_target(&self) -> &str {
        self.part(LOCAL_TARGET)
    }

    /// The peer's Contact: where in-dialog requests go (§12.2.1.1). Parsed again from the
    /// text the dialog keeps, on each call.
    pub fn remote_target(&self) -> crate::uri::Uri {
        crate::uri::Uri::reparse(self.part(REMOTE_TARGET))
    }

    /// The route set, in the order our requests visit it, each entry as the Record-Route
    /// carried it (§12.1.1, §12.1.2). Parsed again from the text the dialog keeps, on each
    /// call.
    pub fn route_set(&self) -> Vec<NameAddr> {
        self.route_entries()
            .filter_map(|r| NameAddr::parse(r).ok())
            .collect()
    }

    /// Where to send an in-dialog request: the first route, or the remote target when the
    /// route set is empty (§12.2.1.1, §8.1.2); as an rsip URI that prints like
    /// [`Dialog::next_hop_uri`] (see [`crate::uri::Uri::to_rsip`]: an IPv6 or `tel:` target
    /// comes as a carrier; read it with [`Dialog::next_hop_uri`]).
    pub fn next_hop(&self) -> Uri {
        self.next_hop_uri().to_rsip()
    }

    /// Where to send an in-dialog request (§12.2.1.1, §8.1.2), read by our parser: IPv6
    /// hosts and every URI form included. Parsed again on each call.
    pub fn next_hop_uri(&self) -> crate::uri::Uri {
        match self.first_route() {
            Some(route) => route.uri().clone(),
            None => self.remote_target(),
        }
    }

    /// Sets our Contact (say, after a transport change), used from the next request on
    /// (§12.2.1.1: the Contact of target refresh requests).
    pub fn set_local_target(&mut self, contact: Uri) {
        // Fails only past 4 GiB of text; the dialog then keeps its Contact.
        let _ = self.set_part(LOCAL_TARGET, &contact.to_string());
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
                self.set_part(REMOTE_TARGET, uri.as_str())?;
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
        let id = self.id();
        if parts.call_id != id.call_id
            || parts.from_tag.as_deref() != Some(id.local_tag)
            || parts.to_tag.as_deref() != Some(id.remote_tag)
        {
            return Ok(());
        }
        let code = resp.status_code.code();
        let success = (200..300).contains(&code);
        if success && parts.cseq_method == Method::Invite && self.state == DialogState::Early {
            self.state = DialogState::Confirmed;
            let routes = record_routes(&resp.headers)?;
            self.set_routes(routes.iter().rev().map(NameAddr::as_str))?;
        }
        let early_refresh = self.state == DialogState::Early && (101..200).contains(&code);
        if is_target_refresh(parts.cseq_method) && (success || early_refresh) {
            if let Some(uri) = contact_uri(&resp.headers)? {
                self.set_part(REMOTE_TARGET, uri.as_str())?;
            }
        }
        Ok(())
    }

    /// The Request-URI and Route headers of an in-dialog request (§12.2.1.1): with an empty
    /// route set or a loose-routing first hop, the remote target and the route set; with a
    /// strict router first, that router (minus parameters a Request-URI may not carry) and
    /// the rest of the route set followed by the remote target.
    fn target_and_routes(&self) -> (Uri, Vec<Header>) {
        let route_header = |r: &str| Header::Route(rsip::headers::Route::new(r));
        match self.first_route() {
            None => (self.remote_target().to_rsip(), Vec::new()),
            Some(first) if is_loose(&first) => (
                self.remote_target().to_rsip(),
                self.route_entries().map(route_header).collect(),
            ),
            Some(first) => {
                let uri = first.uri().for_request_line().to_rsip();
                let mut routes: Vec<Header> =
                    self.route_entries().skip(1).map(route_header).collect();
                routes.push(Header::Route(rsip::headers::Route::new(format!(
                    "<{}>",
                    self.part(REMOTE_TARGET)
                ))));
                (uri, routes)
            }
        }
    }

    /// `name-addr;tag=…` for a From or To: part `party` ([`LOCAL`] or [`REMOTE`]) with the
    /// tag of part `tag`.
    fn render_party(&self, party: usize, tag: usize) -> String {
        let (party, tag) = (self.part(party), self.part(tag));
        let mut out = String::with_capacity(party.len() + 5 + tag.len());
        out.push_str(party);
        out.push_str(";tag=");
        out.push_str(tag);
        out
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
            self.render_party(LOCAL, LOCAL_TAG),
        )));
        headers.push(Header::To(rsip::headers::To::new(
            self.render_party(REMOTE, REMOTE_TAG),
        )));
        headers.push(Header::CallId(rsip::headers::CallId::new(
            self.part(CALL_ID),
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
                    self.local_target()
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
        let credentials = invite
            .headers
            .iter()
            .filter(|h| matches!(h, Header::Authorization(_) | Header::ProxyAuthorization(_)))
            .cloned();
        Ok(self.ack_for_cseq(parts.cseq, via, credentials.chain(extra).collect(), body))
    }

    /// The ACK for a 2xx to the INVITE of CSeq number `cseq` that carried no credentials
    /// (§13.2.2.4), as [`Dialog::ack_for_2xx`] builds it, but with a branch drawn from the
    /// dialog's id and `cseq`: for a UA that keeps the number rather than the INVITE or the
    /// ACK, to send the same ACK again for each 2xx that comes again.
    pub fn ack_for_cseq(
        &self,
        cseq: u32,
        via: &ViaSpec,
        extra: Vec<Header>,
        body: Vec<u8>,
    ) -> Request {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (self.id(), cseq).hash(&mut h);
        let branch = format!("z9hG4bK{:016x}a", h.finish());
        let mut req = self.base_request(Method::Ack, cseq, via.header_with_branch(&branch));
        for h in extra {
            req.headers.push(h);
        }
        set_content_length(&mut req.headers, body.len());
        req.body = body;
        req
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
        assert_eq!(DialogId::of_response(&ok), Some(d.id().to_owned()));

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

        // Built from the CSeq number alone: the same ACK but for the credentials and the
        // branch, and the same message each time it is built again.
        let again = |d: &Dialog| parse_back(d.ack_for_cseq(10, &via(), vec![], vec![]));
        let first = again(&d);
        assert_eq!(first.to_string(), again(&d).to_string());
        let branch = Summary::of_request(&first).unwrap().branch;
        assert!(
            branch.starts_with("z9hG4bK") && branch != "z9hG4bKinv1",
            "{branch}"
        );
        let strip = |r: &Request| {
            let mut r = r.clone();
            r.headers
                .retain(|h| !matches!(h, Header::Via(_) | Header::ProxyAuthorization(_)));
            r.to_string()
        };
        assert_eq!(strip(&first), strip(&ack));
        let other = parse_back(d.ack_for_cseq(11, &via(), vec![], vec![]));
        assert_ne!(Summary::of_request(&other).unwrap().branch, branch);
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

    /// Everything a dialog says and sends, as text, with each Via branch masked: what
    /// [`same_as_before`] compares with what the dialog printed before it kept one text.
    fn describe(d: &mut Dialog, invite: &Request) -> String {
        let mask = |bytes: bytes::Bytes| {
            let text = String::from_utf8(bytes.to_vec()).unwrap();
            let (head, rest) = text.split_once("branch=").unwrap();
            let end = rest.find(';').unwrap();
            format!("{head}branch=X{}", &rest[end..]).replace("\r\n", "↵\n")
        };
        let mut out = String::new();
        out.push_str(&format!("id: {}\n", d.id()));
        out.push_str(&format!("state: {:?}\n", d.state()));
        out.push_str(&format!("seq: {:?} {:?}\n", d.local_seq(), d.remote_seq()));
        out.push_str(&format!(
            "local: {}\n",
            d.local_address().map(|a| a.to_string()).unwrap_or_default()
        ));
        out.push_str(&format!(
            "remote: {}\n",
            d.remote_address()
                .map(|a| a.to_string())
                .unwrap_or_default()
        ));
        out.push_str(&format!("local target: {}\n", d.local_target()));
        out.push_str(&format!("remote target: {}\n", d.remote_target()));
        let rs: Vec<String> = d.route_set().iter().map(|r| r.to_string()).collect();
        out.push_str(&format!("route set: {}\n", rs.join(" | ")));
        out.push_str(&format!(
            "next hop: {} / {}\n",
            d.next_hop_uri(),
            d.next_hop()
        ));
        let extra = vec![Header::Other("X-Test".into(), "1".into())];
        let reinvite = d
            .request(Method::Invite, &via(), extra, b"v=0\r\n".to_vec())
            .unwrap();
        out.push_str(&mask(to_bytes(reinvite)));
        let bye = d.request(Method::Bye, &via(), vec![], vec![]).unwrap();
        out.push_str(&mask(to_bytes(bye)));
        let ack = d.ack_for_2xx(invite, &via(), vec![], vec![]).unwrap();
        out.push_str(&mask(to_bytes(ack)));
        out
    }

    /// Dialogs made by [`Dialog::uac`] and [`Dialog::uas`] from a few messages (a route set
    /// with a strict router and an IPv6 entry, a display name with quotes and escapes, an
    /// early dialog without Contact, a `tel:` party), described by [`describe`].
    fn described_dialogs() -> Vec<String> {
        let invite = request(&INVITE.replace(
            "From: \"Alice\" <sip:alice@relay.test>;tag=alice1",
            "From: \"Alice \\\"A\\\" \\\\ B\" <sip:alice@relay.test>;x=\"a;b,c\";tag=alice1",
        ));
        let mut out = Vec::new();
        let contact = Uri::try_from("sip:relay@203.0.113.5:5060").unwrap();
        let mut uas = Dialog::uas(&invite, "relay7", contact, DialogState::Confirmed).unwrap();
        out.push(describe(&mut uas, &invite));
        let linphone = "<sip:bob@127.0.0.1:59754;transport=udp>;+sip.instance=\"<urn:uuid:090b314c-7132-0014-ac65-4248b341241a>\";expires=3600";
        let ok = ok_for(
            &invite,
            &[
                "<sip:[2001:db8::9]:5070;lr>",
                "\"P \\\"1\\\"\" <sip:p1.test;transport=tcp>;x=\"a,b\"",
            ],
            linphone,
            200,
        );
        let mut uac = Dialog::uac(&invite, &ok).unwrap();
        out.push(describe(&mut uac, &invite));
        let ringing = response_for(&invite, 180, None, Some("bob9"));
        let mut early = Dialog::uac(&invite, &ringing).unwrap();
        out.push(describe(&mut early, &invite));
        let tel = request(
            &INVITE
                .replace(
                    "To: <sip:echo@relay.test>",
                    "To: \"Echo\" <tel:+1-555-123-4567;phone-context=relay.test>;p=1",
                )
                .replace(
                    "Record-Route: <sip:p1.test;lr>, <sip:p2.test;lr>\r\nRecord-Route: <sip:p3.test;lr>\r\n",
                    "",
                ),
        );
        let contact = Uri::try_from("sip:me@relay.test:5061;transport=tls").unwrap();
        let mut plain = Dialog::uas(&tel, "t", contact, DialogState::Early).unwrap();
        out.push(describe(&mut plain, &tel));
        out
    }

    /// The UAS dialog: three loose routes, a caller with quotes and escapes in its display name.
    const UAS_WITH_ROUTES: &str = r##"id: call-1@192.0.2.1;local=relay7;remote=alice1
state: Confirmed
seq: None Some(10)
local: <sip:echo@relay.test>
remote: "Alice \"A\" \\ B" <sip:alice@relay.test>;x="a;b,c"
local target: sip:relay@203.0.113.5:5060
remote target: sip:alice@192.0.2.1:5070
route set: <sip:p1.test;lr> | <sip:p2.test;lr> | <sip:p3.test;lr>
next hop: sip:p1.test;lr / sip:p1.test;lr
INVITE sip:alice@192.0.2.1:5070 SIP/2.0↵
Via: SIP/2.0/TCP 192.0.2.1:5070;branch=X;rport↵
Max-Forwards: 70↵
Route: <sip:p1.test;lr>↵
Route: <sip:p2.test;lr>↵
Route: <sip:p3.test;lr>↵
From: <sip:echo@relay.test>;tag=relay7↵
To: "Alice \"A\" \\ B" <sip:alice@relay.test>;x="a;b,c";tag=alice1↵
Call-ID: call-1@192.0.2.1↵
CSeq: 1 INVITE↵
Contact: <sip:relay@203.0.113.5:5060>↵
X-Test: 1↵
Content-Length: 5↵
↵
v=0↵
BYE sip:alice@192.0.2.1:5070 SIP/2.0↵
Via: SIP/2.0/TCP 192.0.2.1:5070;branch=X;rport↵
Max-Forwards: 70↵
Route: <sip:p1.test;lr>↵
Route: <sip:p2.test;lr>↵
Route: <sip:p3.test;lr>↵
From: <sip:echo@relay.test>;tag=relay7↵
To: "Alice \"A\" \\ B" <sip:alice@relay.test>;x="a;b,c";tag=alice1↵
Call-ID: call-1@192.0.2.1↵
CSeq: 2 BYE↵
Content-Length: 0↵
↵
ACK sip:alice@192.0.2.1:5070 SIP/2.0↵
Via: SIP/2.0/TCP 192.0.2.1:5070;branch=X;rport↵
Max-Forwards: 70↵
Route: <sip:p1.test;lr>↵
Route: <sip:p2.test;lr>↵
Route: <sip:p3.test;lr>↵
From: <sip:echo@relay.test>;tag=relay7↵
To: "Alice \"A\" \\ B" <sip:alice@relay.test>;x="a;b,c";tag=alice1↵
Call-ID: call-1@192.0.2.1↵
CSeq: 10 ACK↵
Proxy-Authorization: Digest username="alice", realm="relay.test", nonce="n", uri="sip:echo@relay.test", response="r"↵
Content-Length: 0↵
↵
"##;

    /// The UAC dialog: a strict router (display name with quotes) first, then an IPv6 loose router; linphone's Contact.
    const UAC_STRICT_ROUTER_FIRST: &str = r##"id: call-1@192.0.2.1;local=alice1;remote=bob9
state: Confirmed
seq: Some(10) None
local: "Alice \"A\" \\ B" <sip:alice@relay.test>;x="a;b,c"
remote: <sip:echo@relay.test>
local target: sip:alice@192.0.2.1:5070
remote target: sip:bob@127.0.0.1:59754;transport=udp
route set: "P \"1\"" <sip:p1.test;transport=tcp>;x="a,b" | <sip:[2001:db8::9]:5070;lr>
next hop: sip:p1.test;transport=tcp / sip:p1.test;transport=tcp
INVITE sip:p1.test;transport=tcp SIP/2.0↵
Via: SIP/2.0/TCP 192.0.2.1:5070;branch=X;rport↵
Max-Forwards: 70↵
Route: <sip:[2001:db8::9]:5070;lr>↵
Route: <sip:bob@127.0.0.1:59754;transport=udp>↵
From: "Alice \"A\" \\ B" <sip:alice@relay.test>;x="a;b,c";tag=alice1↵
To: <sip:echo@relay.test>;tag=bob9↵
Call-ID: call-1@192.0.2.1↵
CSeq: 11 INVITE↵
Contact: <sip:alice@192.0.2.1:5070>↵
X-Test: 1↵
Content-Length: 5↵
↵
v=0↵
BYE sip:p1.test;transport=tcp SIP/2.0↵
Via: SIP/2.0/TCP 192.0.2.1:5070;branch=X;rport↵
Max-Forwards: 70↵
Route: <sip:[2001:db8::9]:5070;lr>↵
Route: <sip:bob@127.0.0.1:59754;transport=udp>↵
From: "Alice \"A\" \\ B" <sip:alice@relay.test>;x="a;b,c";tag=alice1↵
To: <sip:echo@relay.test>;tag=bob9↵
Call-ID: call-1@192.0.2.1↵
CSeq: 12 BYE↵
Content-Length: 0↵
↵
ACK sip:p1.test;transport=tcp SIP/2.0↵
Via: SIP/2.0/TCP 192.0.2.1:5070;branch=X;rport↵
Max-Forwards: 70↵
Route: <sip:[2001:db8::9]:5070;lr>↵
Route: <sip:bob@127.0.0.1:59754;transport=udp>↵
From: "Alice \"A\" \\ B" <sip:alice@relay.test>;x="a;b,c";tag=alice1↵
To: <sip:echo@relay.test>;tag=bob9↵
Call-ID: call-1@192.0.2.1↵
CSeq: 10 ACK↵
Proxy-Authorization: Digest username="alice", realm="relay.test", nonce="n", uri="sip:echo@relay.test", response="r"↵
Content-Length: 0↵
↵
"##;

    /// The early UAC dialog of a 180 without Contact: the To URI is the remote target.
    const UAC_EARLY_WITHOUT_CONTACT: &str = r##"id: call-1@192.0.2.1;local=alice1;remote=bob9
state: Early
seq: Some(10) None
local: "Alice \"A\" \\ B" <sip:alice@relay.test>;x="a;b,c"
remote: <sip:echo@relay.test>
local target: sip:alice@192.0.2.1:5070
remote target: sip:echo@relay.test
route set: 
next hop: sip:echo@relay.test / sip:echo@relay.test
INVITE sip:echo@relay.test SIP/2.0↵
Via: SIP/2.0/TCP 192.0.2.1:5070;branch=X;rport↵
Max-Forwards: 70↵
From: "Alice \"A\" \\ B" <sip:alice@relay.test>;x="a;b,c";tag=alice1↵
To: <sip:echo@relay.test>;tag=bob9↵
Call-ID: call-1@192.0.2.1↵
CSeq: 11 INVITE↵
Contact: <sip:alice@192.0.2.1:5070>↵
X-Test: 1↵
Content-Length: 5↵
↵
v=0↵
BYE sip:echo@relay.test SIP/2.0↵
Via: SIP/2.0/TCP 192.0.2.1:5070;branch=X;rport↵
Max-Forwards: 70↵
From: "Alice \"A\" \\ B" <sip:alice@relay.test>;x="a;b,c";tag=alice1↵
To: <sip:echo@relay.test>;tag=bob9↵
Call-ID: call-1@192.0.2.1↵
CSeq: 12 BYE↵
Content-Length: 0↵
↵
ACK sip:echo@relay.test SIP/2.0↵
Via: SIP/2.0/TCP 192.0.2.1:5070;branch=X;rport↵
Max-Forwards: 70↵
From: "Alice \"A\" \\ B" <sip:alice@relay.test>;x="a;b,c";tag=alice1↵
To: <sip:echo@relay.test>;tag=bob9↵
Call-ID: call-1@192.0.2.1↵
CSeq: 10 ACK↵
Proxy-Authorization: Digest username="alice", realm="relay.test", nonce="n", uri="sip:echo@relay.test", response="r"↵
Content-Length: 0↵
↵
"##;

    /// An early UAS dialog without route set, whose local party is a `tel:` URI with a display name.
    const UAS_TEL_WITHOUT_ROUTES: &str = r##"id: call-1@192.0.2.1;local=t;remote=alice1
state: Early
seq: None Some(10)
local: "Echo" <tel:+1-555-123-4567;phone-context=relay.test>;p=1
remote: "Alice" <sip:alice@relay.test>
local target: sip:me@relay.test:5061;transport=TLS
remote target: sip:alice@192.0.2.1:5070
route set: 
next hop: sip:alice@192.0.2.1:5070 / sip:alice@192.0.2.1:5070
INVITE sip:alice@192.0.2.1:5070 SIP/2.0↵
Via: SIP/2.0/TCP 192.0.2.1:5070;branch=X;rport↵
Max-Forwards: 70↵
From: "Echo" <tel:+1-555-123-4567;phone-context=relay.test>;p=1;tag=t↵
To: "Alice" <sip:alice@relay.test>;tag=alice1↵
Call-ID: call-1@192.0.2.1↵
CSeq: 1 INVITE↵
Contact: <sip:me@relay.test:5061;transport=TLS>↵
X-Test: 1↵
Content-Length: 5↵
↵
v=0↵
BYE sip:alice@192.0.2.1:5070 SIP/2.0↵
Via: SIP/2.0/TCP 192.0.2.1:5070;branch=X;rport↵
Max-Forwards: 70↵
From: "Echo" <tel:+1-555-123-4567;phone-context=relay.test>;p=1;tag=t↵
To: "Alice" <sip:alice@relay.test>;tag=alice1↵
Call-ID: call-1@192.0.2.1↵
CSeq: 2 BYE↵
Content-Length: 0↵
↵
ACK sip:alice@192.0.2.1:5070 SIP/2.0↵
Via: SIP/2.0/TCP 192.0.2.1:5070;branch=X;rport↵
Max-Forwards: 70↵
From: "Echo" <tel:+1-555-123-4567;phone-context=relay.test>;p=1;tag=t↵
To: "Alice" <sip:alice@relay.test>;tag=alice1↵
Call-ID: call-1@192.0.2.1↵
CSeq: 10 ACK↵
Proxy-Authorization: Digest username="alice", realm="relay.test", nonce="n", uri="sip:echo@relay.test", response="r"↵
Content-Length: 0↵
↵
"##;

    /// What the dialogs of [`described_dialogs`] said and sent before a dialog kept its
    /// text in one allocation (printed then, with the Via branches masked and each CRLF
    /// shown as `↵`): the same, byte for byte.
    #[test]
    fn same_as_before() {
        let got = described_dialogs();
        let expected = [
            UAS_WITH_ROUTES,
            UAC_STRICT_ROUTER_FIRST,
            UAC_EARLY_WITHOUT_CONTACT,
            UAS_TEL_WITHOUT_ROUTES,
        ];
        assert_eq!(got.len(), expected.len());
        for (got, expected) in got.iter().zip(expected) {
            assert_eq!(got, expected);
        }
    }

    /// A relay keeps two dialogs per call: each fits in 96 bytes.
    #[test]
    fn dialog_is_small() {
        assert!(
            std::mem::size_of::<Dialog>() <= 96,
            "{}",
            std::mem::size_of::<Dialog>()
        );
    }

    /// All of a dialog's text is its one `text` (the only field that owns memory), cut at
    /// `ends`; the route set follows, one entry a line; a new target or route set keeps the
    /// other parts.
    #[test]
    fn one_text_holds_every_part() {
        let invite = request(INVITE);
        let ok = ok_for(&invite, &[], "<sip:bob@198.51.100.9:5080>", 180);
        let mut d = Dialog::uac(&invite, &ok).unwrap();
        assert_eq!(
            &*d.text,
            "call-1@192.0.2.1alice1bob9\"Alice\" <sip:alice@relay.test><sip:echo@relay.test>\
             sip:alice@192.0.2.1:5070sip:bob@198.51.100.9:5080"
        );
        assert_eq!(d.text.len(), d.ends[PARTS - 1] as usize);
        let mut ok2 = ok_for(
            &invite,
            &["<sip:p1.test;lr>, <sip:p2.test;lr>"],
            "<sip:bob@10.0.0.2>",
            200,
        );
        ok2.headers
            .push(Header::RecordRoute(rsip::headers::RecordRoute::new(
                "<sip:p3.test;lr>",
            )));
        d.on_response(&ok2).unwrap();
        d.set_local_target(Uri::try_from("sip:alice@192.0.2.7").unwrap());
        assert_eq!(
            &*d.text,
            "call-1@192.0.2.1alice1bob9\"Alice\" <sip:alice@relay.test><sip:echo@relay.test>\
             sip:alice@192.0.2.7sip:bob@10.0.0.2\
             <sip:p3.test;lr>\n<sip:p2.test;lr>\n<sip:p1.test;lr>"
        );
        assert_eq!(d.text.len(), d.ends[PARTS - 1] as usize + 50);
        assert_eq!(d.id().call_id, "call-1@192.0.2.1");
        assert_eq!(d.local_target(), "sip:alice@192.0.2.7");
        let rs: Vec<String> = d.route_set().iter().map(|r| r.to_string()).collect();
        assert_eq!(
            rs,
            ["<sip:p3.test;lr>", "<sip:p2.test;lr>", "<sip:p1.test;lr>"]
        );
    }

    /// [`DialogIdRef`] compares with [`DialogId`] both ways, prints and hashes like it.
    #[test]
    #[allow(clippy::op_ref)] // comparing with `&DialogId` is what is tested
    fn id_ref_and_owned_id() {
        use std::hash::{BuildHasher, RandomState};
        let invite = request(INVITE);
        let d = Dialog::uas(
            &invite,
            "t",
            Uri::try_from("sip:me@h").unwrap(),
            DialogState::Early,
        )
        .unwrap();
        let owned = d.id().to_owned();
        assert_eq!(owned.local_tag, "t");
        assert!(d.id() == owned && owned == d.id());
        assert!(d.id() == &owned && &owned == d.id());
        assert_eq!(owned.to_string(), d.id().to_string());
        assert_eq!(owned.as_id_ref(), d.id());
        assert_eq!(DialogId::from(d.id()), owned);
        let other = DialogId {
            remote_tag: "x".into(),
            ..owned.clone()
        };
        assert!(d.id() != other && other != d.id());
        let hasher = RandomState::new();
        assert_eq!(hasher.hash_one(d.id()), hasher.hash_one(&owned));
    }
}
