//! The dispatcher: takes the endpoint's events and hands each to the call it belongs to, or
//! to the handler of an out-of-dialog request (REGISTER, INVITE admission, OPTIONS, MESSAGE
//! charge requests). [`start`] builds the relay with it as the endpoint's event sink.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Instant;

use rsip::prelude::*;
use rsip::{Header, Method, Request};
use sip_core::endpoint::{Endpoint, EndpointEvent, EventSink, IncomingRequest};
use sip_core::{message, Peer};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::b2bua;
use crate::billing_control::BillingControl;
use crate::call::driver::routing::SessionInput;
use crate::call::driver::routing::SessionTable;
use crate::call::driver::Relaying;
use crate::call::{self, Admission};
use crate::charge;
use crate::config::Config;
use crate::content;
use crate::directory::ServerRef;
use crate::extensions;
use crate::registrar::{parse_contacts, ContactEntry, RegisterError, RegisterRequest, Role};
use crate::relay::{facts, utc_second_of_day, Relay};

/// The longest Call-ID a new INVITE may carry: what the billing journal keeps.
const MAX_CALL_ID_LEN: usize = billing::store::MAX_FIELD_LEN;

/// Builds the relay from a validated configuration (see [`Relay::start`]) and starts
/// dispatching what its sockets receive; the events that came while it was being built
/// first. Returns the relay and the billing writer (to shut down last).
pub async fn start(config: Config) -> anyhow::Result<(Arc<Relay>, billing::writer::Writer)> {
    let events = Arc::new(RelayEvents::new());
    let (relay, writer) = Relay::start(config, events.clone()).await?;
    events.start(&relay);
    Ok((relay, writer))
}

fn call_id(req: &Request) -> Option<String> {
    req.headers.iter().find_map(|h| match h {
        Header::CallId(c) => Some(c.value().trim().to_string()),
        _ => None,
    })
}

/// Hands the endpoint's events to the relay inline, from the task that received each
/// message (see [`EventSink`]): a request on a live call goes straight into that call's
/// inbox. Events that come before the relay is built (its billing recovery may take a
/// moment) wait in a bounded buffer and are dispatched when it is; new requests beyond the
/// buffer are answered 503.
pub struct RelayEvents {
    relay: OnceLock<Weak<Relay>>,
    early: Mutex<Option<Vec<EndpointEvent>>>,
}

/// How many events may wait for the relay to be built.
const EARLY_EVENTS: usize = 16 * 1024;

impl RelayEvents {
    fn new() -> Self {
        RelayEvents {
            relay: OnceLock::new(),
            early: Mutex::new(Some(Vec::new())),
        }
    }

    fn early(&self) -> std::sync::MutexGuard<'_, Option<Vec<EndpointEvent>>> {
        self.early.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts dispatching to `relay`, the events that waited first.
    fn start(&self, relay: &Arc<Relay>) {
        let _ = self.relay.set(Arc::downgrade(relay));
        let waiting = self.early().take().unwrap_or_default();
        for event in waiting {
            if let Err(EndpointEvent::Request(r)) = dispatch(relay, event) {
                relay
                    .endpoint
                    .stats()
                    .overloaded
                    .fetch_add(1, Ordering::Relaxed);
                r.refuse_overloaded();
            }
        }
    }
}

impl EventSink for RelayEvents {
    fn deliver(&self, event: EndpointEvent) -> Result<(), EndpointEvent> {
        if let Some(relay) = self.relay.get() {
            return match relay.upgrade() {
                Some(relay) => dispatch(&relay, event),
                None => Ok(()),
            };
        }
        let mut early = self.early();
        match early.as_mut() {
            Some(waiting) if waiting.len() < EARLY_EVENTS => {
                waiting.push(event);
                Ok(())
            }
            Some(_) => Err(event),
            None => {
                // Started between the look above and the lock.
                drop(early);
                match self.relay.get().and_then(Weak::upgrade) {
                    Some(relay) => dispatch(&relay, event),
                    None => Ok(()),
                }
            }
        }
    }
}

/// Routes one event of the endpoint: requests and ACKs of live calls to their inbox, new
/// requests to admission or registration.
#[allow(clippy::result_large_err)]
fn dispatch(relay: &Arc<Relay>, event: EndpointEvent) -> Result<(), EndpointEvent> {
    match event {
        EndpointEvent::Request(r) => {
            // The transaction layer read the Call-ID already (RequestIds).
            let cid = r.ids.call_id.clone();
            if r.req.method != Method::Register {
                if let Some(inbox) = relay.sessions.get(&cid) {
                    let _ = inbox.send(SessionInput::Request(r));
                    return Ok(());
                }
            }
            return out_of_dialog(relay, r, cid).map_err(EndpointEvent::Request);
        }
        EndpointEvent::Cancel {
            req,
            from: _,
            tx,
            invite,
        } => {
            let Some(cid) = call_id(&req) else {
                return Ok(());
            };
            if let Err(SessionInput::Cancel { req, tx, invite }) = relay
                .sessions
                .deliver(&cid, SessionInput::Cancel { req, tx, invite })
            {
                // Admission still running or already refused: end the INVITE here.
                let _ = tx.respond(b2bua::local_response(&req, 200, "OK", None));
                let _ = invite.respond(
                    b2bua::local_response(
                        &req,
                        487,
                        "Request Terminated",
                        Some(&message::new_tag()),
                    )
                    .with_cseq_method(Method::Invite),
                );
            }
        }
        EndpointEvent::Ack { ack, from: _ } => {
            if let Some(cid) = call_id(&ack) {
                let _ = relay.sessions.deliver(&cid, SessionInput::Ack(ack));
            }
        }
        EndpointEvent::StrayResponse { resp, from: _ } => {
            let cid = resp.headers.iter().find_map(|h| match h {
                Header::CallId(c) => Some(c.value().trim().to_string()),
                _ => None,
            });
            if let Some(cid) = cid {
                let _ = relay.sessions.deliver(&cid, SessionInput::Stray(resp));
            }
        }
        EndpointEvent::AckTimeout { tx } => {
            debug!(?tx, "a 2xx was never acknowledged");
        }
    }
    Ok(())
}

/// Handles a request outside any live call: REGISTER, a new INVITE and an out-of-dialog
/// MESSAGE go to a task of their own, unless [`MAX_BACKLOG`] are in hand already: then the
/// request comes back, for the endpoint to answer 503.
#[allow(clippy::result_large_err)]
fn out_of_dialog(
    relay: &Arc<Relay>,
    r: IncomingRequest,
    cid: String,
) -> Result<(), IncomingRequest> {
    let span = info_span!("request", call_id = %cid, method = %r.req.method);
    // RFC 3261 §8.2.2.3 / §16.3 step 5: after method inspection (the 405s below), before
    // authentication (see `extensions`).
    if !matches!(r.req.method, Method::Subscribe | Method::Publish) {
        if let Some(resp) = extensions::check(&r.req, &message::new_tag()) {
            relay.stats.refused.fetch_add(1, Ordering::Relaxed);
            debug!(parent: &span, method = %r.req.method, from = %r.from, "420: requires an unsupported extension");
            let _ = r.tx.respond(resp);
            return Ok(());
        }
    }
    match r.req.method {
        Method::Register => {
            let Some(ticket) = relay.backlog.enter() else {
                return Err(r);
            };
            let relay = relay.clone();
            tokio::spawn(
                async move {
                    let _ticket = ticket;
                    register(&relay, r)
                }
                .instrument(span),
            );
        }
        Method::Invite if r.ids.to_tag.is_none() => {
            let Some(ticket) = relay.backlog.enter() else {
                return Err(r);
            };
            let relay = relay.clone();
            tokio::spawn(
                async move {
                    let _ticket = ticket;
                    admit(relay, r)
                }
                .instrument(span),
            );
        }
        Method::Options if r.ids.to_tag.is_none() => {
            let mut resp = b2bua::local_response(&r.req, 200, "OK", Some(&message::new_tag()));
            resp.headers
                .push(Header::Allow(rsip::headers::Allow::new(ALLOW)));
            resp.headers.push(Header::Accept(rsip::headers::Accept::new(
                "application/sdp, application/vnd.relay.charge+json",
            )));
            // RFC 3261 §11.2: what it supports too.
            resp.headers
                .push(Header::AcceptEncoding(rsip::headers::AcceptEncoding::new(
                    "identity",
                )));
            resp.headers
                .push(Header::Supported(rsip::headers::Supported::new(
                    crate::extensions::SUPPORTED.join(", "),
                )));
            let _ = r.tx.respond(resp);
        }
        Method::Message if r.ids.to_tag.is_none() => {
            let Some(ticket) = relay.backlog.enter() else {
                return Err(r);
            };
            let relay = relay.clone();
            tokio::spawn(
                async move {
                    let _ticket = ticket;
                    charge::handle(relay, r).await
                }
                .instrument(span),
            );
        }
        Method::Ack => {}
        Method::Subscribe | Method::Publish => {
            let mut resp =
                b2bua::local_response(&r.req, 405, "Method Not Allowed", Some(&message::new_tag()));
            resp.headers
                .push(Header::Allow(rsip::headers::Allow::new(ALLOW)));
            let _ = r.tx.respond(resp);
        }
        _ => relay.refuse(&r, 481, "Call/Transaction Does Not Exist"),
    }
    Ok(())
}

/// The methods the relay answers (RFC 3261 §20.5), for `Allow` in OPTIONS and 405 answers.
const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, MESSAGE, REFER, NOTIFY, INFO";

/// REGISTER (RFC 3261 §10.3): authenticate (401), check the address of record is the
/// user's own, update the bindings; for an application-server account, the directory too.
fn register(relay: &Relay, r: IncomingRequest) {
    if !relay.is_ours(&r.req.uri) {
        relay.refuse(&r, 404, "Domain not served here");
        return;
    }
    // §10.3: the address of record is the To's SIP or SIPS URI; RFC 4475 §3.3.4 has a
    // registrar answer 400 to any other, before anything else is asked of the request.
    let aor = match sip_core::address::to_header(&r.req.headers) {
        Ok(Some(to)) if to.uri().is_sip() => to,
        _ => {
            relay.refuse(&r, 400, "Address of record must be a SIP or SIPS URI");
            return;
        }
    };
    let Some(user) = relay.authenticate_request(&r) else {
        return;
    };
    if aor.uri().user() != Some(user.as_str()) {
        relay.refuse(&r, 403, "Cannot register another user");
        return;
    }
    let settings = relay.settings();
    let account = settings.config.server_account(&user);
    if account.is_some() && !relay.server_peer_certified(r.from) {
        warn!(account = %user, from = %r.from, "application-server REGISTER without a client certificate refused");
        relay.refuse(&r, 403, "Application servers must register over mutual TLS");
        return;
    }
    let role = match account {
        Some(a) => Role::AppServer {
            allowed_services: a.allowed_services(),
        },
        None if settings.config.user(&user).is_some() => Role::Subscriber,
        None => {
            relay.refuse(&r, 403, "Unknown account");
            return;
        }
    };
    let now = Instant::now();
    // An application server's bindings go to the registrar and then to the directory as
    // one step (see `Relay::server_registration`); a terminal's touch the registrar only.
    // Nothing below awaits. A poisoned lock guards no data of its own.
    let _serialized = account.is_some().then(|| {
        relay
            .server_registration
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    });
    let outcome = RegisterRequest::from_sip(&r.req, Some(r.from)).and_then(|rr| {
        if account.is_some() {
            refuse_others_servers(relay, &user, &rr)?;
        }
        relay.registrar.register(&user, role, &rr, now)
    });
    match outcome {
        Ok(ok) => {
            if account.is_some() {
                for gone in &ok.removed {
                    relay.directory.remove_dynamic(&user, &gone.uri_text);
                }
                let servers: Vec<_> = ok
                    .bindings
                    .iter()
                    .filter_map(|b| b.dynamic_server())
                    .collect();
                let (_, errors) = relay.directory.sync_account(&user, &servers);
                for e in errors {
                    warn!(account = %user, error = %e, "application server not added to the directory");
                }
            }
            if let Some(cluster) = &relay.cluster {
                cluster.publish_bindings(&user, &ok.bindings);
            }
            info!(user = %user, bindings = ok.bindings.len(), "registered");
            let mut resp = b2bua::local_response(&r.req, 200, "OK", Some(&message::new_tag()));
            resp.headers
                .retain(|h| !matches!(h, Header::ContentLength(_)));
            resp.headers.extend(ok.contact_headers(now));
            message::set_content_length(&mut resp.headers, 0);
            let _ = r.tx.respond(resp);
        }
        Err(e) => {
            info!(user = %user, error = %e, "registration refused");
            let mut resp = b2bua::local_response(
                &r.req,
                e.status_code(),
                &e.reason(),
                Some(&message::new_tag()),
            );
            if let Some(h) = e.extra_header() {
                resp.headers.push(h);
            }
            relay.stats.refused.fetch_add(1, Ordering::Relaxed);
            let _ = r.tx.respond(resp);
        }
    }
}

/// Admission of a new INVITE (claim 1's authentication, claim 2's rules): authenticate
/// (407), then registered, then service known and subscribed; then the session starts.
fn admit(relay: Arc<Relay>, r: IncomingRequest) {
    // Read once: for the domain here and for the rules' facts below.
    let ruri = match sip_core::uri::Uri::from_rsip(&r.req.uri) {
        Ok(u) if relay.names_relay(&u) => u,
        _ => {
            relay.refuse(&r, 403, "Not relaying");
            return;
        }
    };
    if message::check_max_forwards(&r.req).is_err() {
        relay.refuse(&r, 483, "Too Many Hops");
        return;
    }
    let cid = r.ids.call_id.clone();
    if cid.len() > MAX_CALL_ID_LEN {
        // The billing journal keeps the terminal's Call-ID and refuses a longer one (issue
        // 14, finding 11): refused here, before any server is asked, not at the 2xx.
        debug!(from = %r.from, call_id_bytes = cid.len(), "400: Call-ID too long");
        relay.refuse(
            &r,
            400,
            &format!("Call-ID too long (at most {MAX_CALL_ID_LEN} bytes)"),
        );
        return;
    }
    if let Some(refusal) = content::check_invite(&r.req) {
        let (code, reason) = refusal.status();
        let mut resp = b2bua::local_response(&r.req, code, reason, Some(&message::new_tag()));
        if refusal == content::Refusal::UnsupportedMediaType {
            resp.headers
                .push(Header::Accept(rsip::headers::Accept::new(content::SDP)));
        }
        relay.stats.refused.fetch_add(1, Ordering::Relaxed);
        let _ = r.tx.respond(resp);
        return;
    }
    let Some(user) = relay.authenticate_request(&r) else {
        if let Some(trace) = &relay.trace {
            trace.decision(&cid, "auth: not authenticated (challenged or refused)");
        }
        return;
    };
    if let Some(trace) = &relay.trace {
        trace.decision(&cid, format!("auth: {user} authenticated"));
    }
    let settings = relay.settings();
    let Some(subscriber) = settings.config.user(&user) else {
        relay.refuse(&r, 403, "Not a subscriber");
        return;
    };
    if !relay.registrar.is_registered(&user, Instant::now()) {
        relay.refuse(&r, 403, "Not registered");
        return;
    }
    let decision = settings.rules.evaluate(
        &facts(
            &r.req,
            &ruri,
            &subscriber.plan,
            &subscriber.class,
            settings.rules.needs(),
        ),
        utc_second_of_day(),
    );
    if let Some(trace) = &relay.trace {
        trace.decision(
            &cid,
            format!(
                "rule {} matched: service {}, strategy {}, plan {}",
                decision.rule_name,
                decision.service,
                decision.strategy.name(),
                decision.plan
            ),
        );
    }
    if decision.service.is_empty() {
        relay.refuse(&r, 404, "No service requested");
        return;
    }
    if let Err((code, reason)) = relay.check_service(&user, &decision.service) {
        relay.refuse(&r, code, reason);
        return;
    }
    // Issue 14, finding 10: one subscriber may not fill every server. The call holds this
    // slot until its inquiry ends without a session, or its session ends (see
    // crate::subscriber_sessions). 486 Busy Here, not 403: the subscriber is "not willing or
    // able to take additional calls" (RFC 3261 §21.4.26), and may call again as soon as a
    // session of its own ends, where a 403 says the request "SHOULD NOT be repeated"
    // (§21.4.4); and not 503, which tells a client to try another server of the domain
    // (§21.5.4), where the limit is the same.
    let limit = settings.config.max_sessions_of(&decision.subscriber_class);
    if !relay.subscriber_sessions.try_take(&user, limit) {
        relay.subscriber_sessions.count_refusal();
        info!(subscriber = %user, class = %decision.subscriber_class, limit, "refused: the subscriber holds as many sessions as its class allows");
        relay.refuse(&r, 486, call::SESSION_LIMIT_REASON);
        return;
    }
    relay.stats.admitted.fetch_add(1, Ordering::Relaxed);
    info!(subscriber = %user, service = %decision.service, rule = %decision.rule_name, "admitted");
    let adm = Admission {
        subscriber: user,
        service: decision.service,
        strategy: decision.strategy,
        params: decision.params.into_iter().collect(),
        plan: decision.plan,
        rule: decision.rule_name,
        session_limit: limit,
    };
    call::driver::spawn(relay, r, adm, cid);
}

/// Sets the method of a response's CSeq (a 487 for an INVITE built from its CANCEL).
trait WithCseqMethod {
    fn with_cseq_method(self, method: Method) -> Self;
}

impl WithCseqMethod for rsip::Response {
    fn with_cseq_method(mut self, method: Method) -> Self {
        for h in self.headers.iter_mut() {
            if let Header::CSeq(c) = h {
                if let Some((seq, _)) = sip_core::fields::cseq(c.value()) {
                    *h = Header::CSeq(rsip::headers::CSeq::new(format!("{seq} {method}")));
                }
            }
        }
        self
    }
}

/// What a call's driver does through the relay: send, commit, route, resolve, charge.
impl Relaying for Relay {
    fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    fn trace(&self) -> Option<&crate::trace::Trace> {
        self.trace.as_deref()
    }

    fn billing(&self) -> &BillingControl {
        &self.billing
    }

    fn table(&self) -> &SessionTable {
        &self.sessions
    }

    fn resolve(
        &self,
        server: &ServerRef,
    ) -> impl std::future::Future<Output = Option<Peer>> + Send {
        self.resolve_server(server)
    }

    fn resolve_now(&self, server: &ServerRef) -> Option<Option<Peer>> {
        self.resolve_server_now(server)
    }

    fn charge_in_dialog(self: &Arc<Self>, incoming: IncomingRequest, session_id: &str) {
        if let Some(served) = self.served.find(session_id) {
            let span = tracing::info_span!("charge", session_id = %session_id);
            tokio::spawn(charge::handle_in_dialog(self.clone(), incoming, served).instrument(span));
        }
    }
}

/// Refuses (403) a REGISTER of application-server `account` that names the address of a
/// server another account registered or is configured for (issue 14, finding 8): the
/// relay would send inquiries for this account's services there. Contacts that do not
/// parse are left to the registrar's 400.
fn refuse_others_servers(
    relay: &Relay,
    account: &str,
    request: &RegisterRequest,
) -> Result<(), RegisterError> {
    for value in &request.contacts {
        for entry in parse_contacts(value).unwrap_or_default() {
            let ContactEntry::Address(address) = entry else {
                continue;
            };
            if let Some(owner) = relay.directory.other_account_at(account, &address.uri) {
                info!(account, owner = %owner, contact = %address.uri_text, "REGISTER names another account's server");
                return Err(RegisterError::Forbidden(format!(
                    "Contact address {} is another account's server",
                    address.uri.host_port_text().unwrap_or_default()
                )));
            }
        }
    }
    Ok(())
}
