//! Registration with the relay (RFC 3261 §10.2): the application-server account registers its
//! Contact with the services it delivers as parameters (`docs/protocol.md`), answers the
//! digest challenge, refreshes at half the granted lifetime, retries with backoff when the
//! relay does not answer or refuses, and unregisters (`Expires: 0`) on shutdown.
//!
//! A refused attempt never ends the registration (issue 14: a stranger's wrong answers
//! once got the account locked out, and the agent out of the directory): every failure is
//! retried, no sooner than a `Retry-After` the relay gives (RFC 3261 §20.33, up to an hour)
//! but, while the relay still holds the binding, always before it lapses — at half the time
//! left — so a refusal that ends (a lock-out of our address, a relay restarting) costs no
//! binding.
//!
//! [`Registration`] is the sans-IO core: it is told the time and the responses, and says
//! which REGISTER to send and when. [`run`] drives it with the endpoint. A relay that
//! restarts has forgotten the binding; the next refresh (at most half the lifetime later)
//! restores it, and an OPTIONS probe from the relay while the agent believes itself
//! unregistered makes it register at once ([`RegistrationHandle::kick`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rsip::headers::UntypedHeader as _;
use rsip::{Header, Method, Request, Response};
use sip_core::address::{header_values, Contacts};
use sip_core::dialog::ViaSpec;
use sip_core::endpoint::Endpoint;
use sip_core::message;
use sip_core::resolve::{self, Failover, NetDns};
use sip_core::uri::{Host, Uri};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::auth::{ChallengeOutcome, ClientAuth};
use crate::backoff::Backoff;

/// The value of our `User-Agent` header.
pub const USER_AGENT: &str = concat!("appsrv-agent/", env!("CARGO_PKG_VERSION"));

/// The shortest refresh interval, whatever the relay grants.
const MIN_REFRESH: Duration = Duration::from_secs(1);
/// Challenges answered in a row before the attempt counts as failed.
const MAX_CHALLENGES: u8 = 3;
/// The longest `Retry-After` waited for.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// What a REGISTER says about us. The URIs are sip-core's (an IPv6 host in brackets reads
/// and prints as written); they go into the rsip message as [`Uri::to_rsip`] carriers.
#[derive(Debug, Clone)]
pub struct RegistrationParams {
    /// Request-URI: `sip:<relay domain>`.
    pub registrar: Uri,
    /// Address of record, in From and To: `sip:<account>@<relay domain>`.
    pub aor: Uri,
    /// Our Contact URI: where the relay sends its inquiries.
    pub contact: Uri,
    /// The Contact's parameters: `;services="echo,clock";capacity=50`.
    pub contact_params: String,
    /// The lifetime asked for, in seconds.
    pub expires: u32,
}

impl RegistrationParams {
    /// The Contact parameters for a list of services and an optional capacity, in the form
    /// of `docs/protocol.md`.
    pub fn service_params(services: &[&str], capacity: Option<u32>) -> String {
        let mut out = format!(";services=\"{}\"", services.join(","));
        if let Some(c) = capacity {
            out.push_str(&format!(";capacity={c}"));
        }
        out
    }
}

/// What a response did to the registration, for the driver to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The relay holds our binding for this many seconds.
    Registered {
        /// Granted lifetime.
        expires: u32,
    },
    /// The binding is removed.
    Unregistered,
    /// The relay challenged; the request goes again with credentials.
    Challenged,
    /// The relay asked for a longer lifetime (423); the request goes again.
    IntervalRaised {
        /// The new lifetime asked for.
        expires: u32,
    },
    /// The attempt failed; the next one is in `retry_in` (`None` for a failed
    /// unregistration, which is not retried).
    Failed {
        /// Status and reason, or what went wrong.
        reason: String,
        /// When the next attempt is.
        retry_in: Option<Duration>,
    },
    /// A response when none was expected (ignored).
    Ignored,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A REGISTER is to be sent at this time.
    Due { at: Instant, unregister: bool },
    /// A REGISTER is out; waiting for its final response.
    Sent { unregister: bool },
    /// Registered; refresh at this time.
    Bound { refresh_at: Instant },
    /// Unregistered for good (shutdown).
    Closed,
}

/// The registration state machine (sans-IO).
#[derive(Debug)]
pub struct Registration {
    params: RegistrationParams,
    auth: ClientAuth,
    call_id: String,
    from_tag: String,
    cseq: u32,
    expires: u32,
    phase: Phase,
    bound_until: Option<Instant>,
    ever_bound: bool,
    backoff: Backoff,
    answered: bool,
    challenges: u8,
}

impl Registration {
    /// A registration that sends its first REGISTER at `now`. `backoff` paces the retries.
    pub fn new(
        params: RegistrationParams,
        auth: ClientAuth,
        backoff: Backoff,
        now: Instant,
    ) -> Registration {
        let host = params.contact.host_text().unwrap_or("agent").to_string();
        Registration {
            expires: params.expires,
            params,
            auth,
            call_id: message::new_call_id(&host),
            from_tag: message::new_tag(),
            cseq: 0,
            phase: Phase::Due {
                at: now,
                unregister: false,
            },
            bound_until: None,
            ever_bound: false,
            backoff,
            answered: false,
            challenges: 0,
        }
    }

    /// Whether the relay holds our binding at `now`, as far as we know.
    pub fn is_bound(&self, now: Instant) -> bool {
        self.bound_until.is_some_and(|until| now < until)
    }

    /// Whether a REGISTER is due at `now`.
    pub fn is_due(&self, now: Instant) -> bool {
        match self.phase {
            Phase::Due { at, .. } => now >= at,
            Phase::Bound { refresh_at } => now >= refresh_at,
            Phase::Sent { .. } | Phase::Closed => false,
        }
    }

    /// When something is next due; `None` while waiting for a response or when closed.
    pub fn deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Due { at, .. } => Some(at),
            Phase::Bound { refresh_at } => Some(refresh_at),
            Phase::Sent { .. } | Phase::Closed => None,
        }
    }

    /// Registers at once rather than at the next scheduled time (unless a REGISTER is out).
    pub fn kick(&mut self, now: Instant) {
        match self.phase {
            Phase::Due { at, unregister } if at > now => {
                self.phase = Phase::Due {
                    at: now,
                    unregister,
                }
            }
            Phase::Bound { .. } => {
                self.phase = Phase::Due {
                    at: now,
                    unregister: false,
                }
            }
            _ => {}
        }
    }

    /// The REGISTER due at `now`, if any; the registration then waits for its response.
    pub fn poll_request(&mut self, now: Instant, via: &ViaSpec) -> Option<Request> {
        if !self.is_due(now) {
            return None;
        }
        let unregister = matches!(
            self.phase,
            Phase::Due {
                unregister: true,
                ..
            }
        );
        self.phase = Phase::Sent { unregister };
        Some(self.build(via, unregister))
    }

    /// The REGISTER removing our binding (`Expires: 0`), when the relay may hold one; the
    /// registration then ends.
    pub fn unregister_request(&mut self, via: &ViaSpec) -> Option<Request> {
        if !self.ever_bound || self.phase == Phase::Closed {
            self.phase = Phase::Closed;
            return None;
        }
        self.challenges = 0;
        self.phase = Phase::Sent { unregister: true };
        Some(self.build(via, true))
    }

    /// Whether the registration has ended (unregistered, or gave up unregistering).
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    fn build(&mut self, via: &ViaSpec, unregister: bool) -> Request {
        self.cseq = self.cseq.wrapping_add(1).max(1);
        let registrar = self.params.registrar.to_string();
        let mut headers = vec![
            via.header(),
            Header::MaxForwards(rsip::headers::MaxForwards::new("70")),
            Header::From(rsip::headers::From::new(format!(
                "<{}>;tag={}",
                self.params.aor, self.from_tag
            ))),
            Header::To(rsip::headers::To::new(format!("<{}>", self.params.aor))),
            Header::CallId(rsip::headers::CallId::new(self.call_id.clone())),
            Header::CSeq(rsip::headers::CSeq::new(format!("{} REGISTER", self.cseq))),
            Header::Contact(rsip::headers::Contact::new(format!(
                "<{}>{}",
                self.params.contact, self.params.contact_params
            ))),
            Header::Expires(rsip::headers::Expires::new(if unregister {
                "0".to_string()
            } else {
                self.expires.to_string()
            })),
            Header::UserAgent(rsip::headers::UserAgent::new(USER_AGENT)),
        ];
        let authorization = self.auth.authorization("REGISTER", &registrar);
        self.answered = authorization.is_some();
        headers.extend(authorization);
        let mut headers = rsip::Headers::from(headers);
        message::set_content_length(&mut headers, 0);
        Request {
            method: Method::Register,
            uri: self.params.registrar.to_rsip(),
            version: rsip::Version::V2,
            headers,
            body: Vec::new(),
        }
    }

    /// Takes the final response to the REGISTER that is out (a locally made 408/503 for a
    /// timeout or a transport failure).
    pub fn on_response(&mut self, now: Instant, resp: &Response) -> Outcome {
        let Phase::Sent { unregister } = self.phase else {
            return Outcome::Ignored;
        };
        let code = resp.status_code.code();
        match code {
            200..=299 => {
                self.backoff.reset();
                self.challenges = 0;
                if unregister {
                    self.bound_until = None;
                    self.phase = Phase::Closed;
                    return Outcome::Unregistered;
                }
                let expires = self.granted_expires(resp);
                let lifetime = Duration::from_secs(u64::from(expires));
                self.bound_until = Some(now + lifetime);
                self.ever_bound = true;
                self.phase = Phase::Bound {
                    refresh_at: now + (lifetime / 2).max(MIN_REFRESH),
                };
                Outcome::Registered { expires }
            }
            401 | 407 => match self.auth.on_challenge(resp, self.answered) {
                ChallengeOutcome::Retry if self.challenges < MAX_CHALLENGES => {
                    self.challenges += 1;
                    self.phase = Phase::Due {
                        at: now,
                        unregister,
                    };
                    Outcome::Challenged
                }
                ChallengeOutcome::Retry => {
                    self.fail(now, unregister, "challenged again and again".into())
                }
                ChallengeOutcome::Rejected => self.fail(
                    now,
                    unregister,
                    format!("{code} credentials refused: check the account and its password"),
                ),
                ChallengeOutcome::Unusable(e) => self.fail(
                    now,
                    unregister,
                    format!("{code} with no usable challenge: {e}"),
                ),
            },
            423 => {
                let min =
                    header_values(&resp.headers, "Min-Expires").find_map(|v| v.parse::<u32>().ok());
                match min {
                    Some(min) if min > self.expires && min <= 86_400 && !unregister => {
                        self.expires = min;
                        self.phase = Phase::Due {
                            at: now,
                            unregister,
                        };
                        Outcome::IntervalRaised { expires: min }
                    }
                    _ => self.fail(now, unregister, "423 without a usable Min-Expires".into()),
                }
            }
            _ => {
                let reason = format!("{code} {}", reason_of(resp));
                let asked = retry_after(resp);
                self.fail_after(now, unregister, reason, asked)
            }
        }
    }

    /// An attempt that could not be sent at all (the relay's name does not resolve): a
    /// failure like any other, retried with backoff.
    pub fn on_send_failure(&mut self, now: Instant, reason: String) -> Outcome {
        let unregister = matches!(
            self.phase,
            Phase::Due {
                unregister: true,
                ..
            } | Phase::Sent { unregister: true }
        );
        self.fail(now, unregister, reason)
    }

    fn fail(&mut self, now: Instant, unregister: bool, reason: String) -> Outcome {
        self.fail_after(now, unregister, reason, None)
    }

    /// A failed attempt, the relay having asked for `asked` before the next (Retry-After).
    fn fail_after(
        &mut self,
        now: Instant,
        unregister: bool,
        reason: String,
        asked: Option<Duration>,
    ) -> Outcome {
        self.challenges = 0;
        if unregister {
            self.phase = Phase::Closed;
            return Outcome::Failed {
                reason,
                retry_in: None,
            };
        }
        let mut delay = self.backoff.next_delay();
        if let Some(asked) = asked {
            delay = delay.max(asked.min(MAX_RETRY_AFTER));
        }
        // Still bound: try again before the binding lapses (see the module documentation).
        if let Some(left) = self
            .bound_until
            .map(|until| until.saturating_duration_since(now))
            .filter(|left| !left.is_zero())
        {
            delay = delay.min((left / 2).max(MIN_REFRESH));
        }
        self.phase = Phase::Due {
            at: now + delay,
            unregister: false,
        };
        Outcome::Failed {
            reason,
            retry_in: Some(delay),
        }
    }

    /// The lifetime the relay granted: our Contact's `expires` in the 2xx, else its
    /// `Expires` header, else what we asked for (RFC 3261 §10.2.4). At least one second.
    fn granted_expires(&self, resp: &Response) -> u32 {
        let ours = &self.params.contact;
        let from_contact =
            header_values(&resp.headers, "Contact").find_map(|v| contact_expires(v, ours));
        let from_header =
            || header_values(&resp.headers, "Expires").find_map(|v| v.parse::<u32>().ok());
        from_contact
            .or_else(from_header)
            .unwrap_or(self.expires)
            .max(1)
    }
}

/// The `expires` parameter of a Contact value (a list, possibly) for the entry whose URI is
/// `ours` (same user, host and port; an IPv6 host compared as an address). The value is read
/// by sip-core's parser, which takes quoted parameter values such as `services="echo,clock"`
/// and IPv6 references, both of which rsip's typed Contact refuses.
fn contact_expires(value: &str, ours: &Uri) -> Option<u32> {
    let Ok(Contacts::List(list)) = Contacts::parse(value) else {
        return None;
    };
    list.iter()
        .find(|c| same_binding(c.uri(), ours))
        .and_then(|c| c.expires())
}

/// Whether two SIP URIs name the same binding: user, host (a domain without regard to
/// case, an IP address by value) and port.
fn same_binding(a: &Uri, b: &Uri) -> bool {
    let same_host = match (a.host(), b.host()) {
        (Some(Host::Domain(x)), Some(Host::Domain(y))) => x.eq_ignore_ascii_case(y),
        (Some(x), Some(y)) => x == y,
        _ => false,
    };
    same_host && a.port() == b.port() && a.user() == b.user()
}

/// The `Retry-After` of `resp` in seconds (RFC 3261 §20.33: the delta-seconds, maybe
/// followed by a comment and parameters), `None` when absent or unreadable.
pub fn retry_after(resp: &Response) -> Option<Duration> {
    header_values(&resp.headers, "Retry-After").find_map(|v| {
        let digits: String = v
            .trim_start()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse::<u64>().ok().map(Duration::from_secs)
    })
}

fn reason_of(resp: &Response) -> String {
    match &resp.status_code {
        rsip::StatusCode::Other(_, reason) => reason.clone(),
        other => other.to_string(),
    }
}

/// What the rest of the agent holds of the registration task.
#[derive(Debug, Clone)]
pub struct RegistrationHandle {
    kick: mpsc::Sender<()>,
    registered: watch::Receiver<bool>,
}

impl RegistrationHandle {
    /// Asks for a REGISTER now (the relay probed us while we thought we were not registered).
    pub fn kick(&self) {
        let _ = self.kick.try_send(());
    }

    /// Whether the relay holds our binding, as far as the agent knows.
    pub fn is_registered(&self) -> bool {
        *self.registered.borrow()
    }

    /// A handle for an agent that does not register: never registered, kicks go nowhere.
    pub fn disabled() -> RegistrationHandle {
        let (kick, _) = mpsc::channel(1);
        let (_, registered) = watch::channel(false);
        RegistrationHandle { kick, registered }
    }
}

/// How the registration task reaches the relay.
#[derive(Clone)]
pub struct Driver {
    /// The SIP endpoint.
    pub endpoint: Endpoint,
    /// The relay's URI, resolved before every attempt (RFC 3263).
    pub relay: Uri,
    /// Our `host:port` for the Via header.
    pub sent_by: String,
    /// How long unregistering may take at shutdown.
    pub unregister_timeout: Duration,
    /// The DNS client the relay's domain is resolved with.
    pub dns: NetDns,
    /// The relay's targets as last resolved, and the one in use (RFC 3263 §4.3).
    pub failover: Arc<std::sync::Mutex<Option<Failover>>>,
}

/// Starts the registration task. It runs until `shutdown` turns true, then unregisters
/// (within `unregister_timeout`) and ends.
pub fn spawn(
    reg: Registration,
    driver: Driver,
    shutdown: watch::Receiver<bool>,
) -> (RegistrationHandle, tokio::task::JoinHandle<()>) {
    let (kick_tx, kick_rx) = mpsc::channel(1);
    let (status_tx, status_rx) = watch::channel(false);
    let task = tokio::spawn(run(reg, driver, kick_rx, status_tx, shutdown));
    (
        RegistrationHandle {
            kick: kick_tx,
            registered: status_rx,
        },
        task,
    )
}

/// Drives a [`Registration`]: sends what is due, feeds back the responses, sleeps until the
/// next deadline, a kick or shutdown; then unregisters.
pub async fn run(
    mut reg: Registration,
    driver: Driver,
    mut kick: mpsc::Receiver<()>,
    status: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        if *shutdown.borrow() {
            break;
        }
        let now = Instant::now();
        status.send_if_modified(|s| std::mem::replace(s, reg.is_bound(now)) != *s);
        if reg.is_due(now) {
            let outcome = match driver.target().await {
                Ok((peer, via)) => match reg.poll_request(now, &via) {
                    Some(req) => {
                        tokio::select! {
                            resp = driver.transact(req, peer) => reg.on_response(Instant::now(), &resp),
                            _ = shutdown.changed() => break,
                        }
                    }
                    None => continue,
                },
                Err(reason) => reg.on_send_failure(now, reason),
            };
            log_outcome(&outcome, &driver.relay);
            continue;
        }
        let sleep = match reg.deadline() {
            Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)),
            None => tokio::time::sleep(Duration::from_secs(3600)),
        };
        tokio::select! {
            _ = sleep => {}
            Some(()) = kick.recv() => {
                debug!("registration kicked");
                reg.kick(Instant::now());
            }
            _ = shutdown.changed() => {}
        }
    }
    // Shutdown: remove the binding, within the time allowed.
    let unregister = async {
        let Ok((peer, via)) = driver.target().await else {
            return;
        };
        let Some(mut req) = reg.unregister_request(&via) else {
            return;
        };
        loop {
            let resp = driver.transact(req, peer).await;
            let outcome = reg.on_response(Instant::now(), &resp);
            log_outcome(&outcome, &driver.relay);
            if reg.is_closed() {
                return;
            }
            match reg.poll_request(Instant::now(), &via) {
                Some(next) => req = next,
                None => return,
            }
        }
    };
    if tokio::time::timeout(driver.unregister_timeout, unregister)
        .await
        .is_err()
    {
        warn!(relay = %driver.relay, "no answer to the unregistration in time");
    }
    status.send_replace(false);
}

impl Driver {
    /// Where to send, and the Via for it: the target in use, or the first of a new
    /// resolution when there is none yet or every target has failed.
    async fn target(&self) -> Result<(sip_core::Peer, ViaSpec), String> {
        let kept = self.lock_failover().as_ref().map(Failover::current);
        let target = match kept {
            Some(t) => t,
            None => {
                let targets = resolve::resolve(&self.relay, &self.dns)
                    .await
                    .map_err(|e| format!("cannot resolve {}: {e}", self.relay))?;
                let failover = Failover::new(targets)
                    .ok_or_else(|| format!("no address for {}", self.relay))?;
                let first = failover.current();
                *self.lock_failover() = Some(failover);
                first
            }
        };
        let via = ViaSpec {
            transport: target.transport,
            sent_by: self.sent_by.clone(),
        };
        Ok((target.peer(), via))
    }

    /// Sends `req` and waits for its final response (a local 408 on timeout, 503 on a
    /// transport failure). A timeout, a transport failure or a 503 moves the relay to its
    /// next target for the next attempt (RFC 3263 §4.3); after the last, the next attempt
    /// resolves again.
    async fn transact(&self, req: Request, peer: sip_core::Peer) -> Response {
        let resp = match self.endpoint.transports().ensure_connected(&peer).await {
            Err(e) => local_response(503, &e.to_string()),
            Ok(()) => match self.endpoint.send_request(req, peer) {
                Ok(mut tx) => tx.final_response().await,
                Err(e) => local_response(503, &e.to_string()),
            },
        };
        if resolve::moves_on(&resp) {
            let mut guard = self.lock_failover();
            if let Some(f) = guard.as_mut().filter(|f| f.current().peer() == peer) {
                match f.failed() {
                    Some(next) => {
                        warn!(failed = %peer, next = %next.peer(), "the relay does not answer: trying the next target")
                    }
                    None => *guard = None,
                }
            }
        }
        resp
    }

    fn lock_failover(&self) -> std::sync::MutexGuard<'_, Option<Failover>> {
        match self.failover.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

fn log_outcome(outcome: &Outcome, relay: &Uri) {
    match outcome {
        Outcome::Registered { expires } => info!(%relay, expires, "registered with the relay"),
        Outcome::Unregistered => info!(%relay, "unregistered from the relay"),
        Outcome::Challenged => debug!(%relay, "registration challenged"),
        Outcome::IntervalRaised { expires } => {
            info!(%relay, expires, "relay asks for a longer registration")
        }
        Outcome::Failed {
            reason,
            retry_in: Some(delay),
        } => warn!(%relay, %reason, retry_in_ms = delay.as_millis() as u64, "registration failed"),
        Outcome::Failed {
            reason,
            retry_in: None,
        } => warn!(%relay, %reason, "unregistration failed"),
        Outcome::Ignored => {}
    }
}

/// A response made up locally for a request that got none.
pub fn local_response(code: u16, reason: &str) -> Response {
    Response {
        status_code: message::status(code, Some(reason)),
        version: rsip::Version::V2,
        headers: rsip::Headers::default(),
        body: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::config::Secret;
    use sip_core::digest::{Credentials, DigestServer, StoredCredential};

    fn params() -> RegistrationParams {
        RegistrationParams {
            registrar: Uri::parse("sip:relay.test").unwrap(),
            aor: Uri::parse("sip:as1@relay.test").unwrap(),
            contact: Uri::parse("sip:as1@127.0.0.1:5080").unwrap(),
            contact_params: RegistrationParams::service_params(&["echo", "clock"], Some(50)),
            expires: 120,
        }
    }

    fn via() -> ViaSpec {
        ViaSpec {
            transport: sip_core::Transport::Udp,
            sent_by: "127.0.0.1:5080".into(),
        }
    }

    fn new_reg(now: Instant) -> Registration {
        Registration::new(
            params(),
            ClientAuth::new("as1", Secret("as1-secret".into())),
            Backoff::new(Duration::from_secs(1), Duration::from_secs(8)),
            now,
        )
    }

    fn header(req: &Request, name: &str) -> Option<String> {
        req.headers.iter().find_map(|h| {
            let line = h.to_string();
            let (n, v) = line.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }

    fn reply(req: &Request, code: u16, extra: Vec<Header>) -> Response {
        let mut resp = message::response_for(req, code, None, Some("reg1"));
        for h in extra {
            resp.headers.push(h);
        }
        resp
    }

    fn server() -> DigestServer {
        DigestServer::new("relay.test", [3u8; 32], Duration::from_secs(300))
    }

    fn challenge(server: &DigestServer) -> Vec<Header> {
        server
            .challenge(100, false)
            .into_iter()
            .map(|v| Header::WwwAuthenticate(rsip::headers::WwwAuthenticate::new(v)))
            .collect()
    }

    #[test]
    fn registers_with_digest_and_refreshes_at_half_the_granted_time() {
        let t0 = Instant::now();
        let mut reg = new_reg(t0);
        assert!(reg.is_due(t0));
        let first = reg.poll_request(t0, &via()).unwrap();
        assert_eq!(first.method, Method::Register);
        assert_eq!(first.uri.to_string(), "sip:relay.test");
        assert_eq!(
            header(&first, "Contact").unwrap(),
            "<sip:as1@127.0.0.1:5080>;services=\"echo,clock\";capacity=50"
        );
        assert_eq!(header(&first, "Expires").unwrap(), "120");
        assert!(header(&first, "Authorization").is_none());
        assert!(
            reg.poll_request(t0, &via()).is_none(),
            "one request at a time"
        );

        let srv = server();
        assert_eq!(
            reg.on_response(t0, &reply(&first, 401, challenge(&srv))),
            Outcome::Challenged
        );
        let second = reg.poll_request(t0, &via()).unwrap();
        let creds = Credentials::parse(&header(&second, "Authorization").unwrap()).unwrap();
        let stored = StoredCredential::from_password("as1", "relay.test", "as1-secret");
        srv.verify(&creds, "REGISTER", |_| Some(stored.clone()), 101)
            .unwrap();
        assert_eq!(header(&second, "Call-ID"), header(&first, "Call-ID"));
        assert_eq!(header(&second, "CSeq").unwrap(), "2 REGISTER");

        let ok = reply(
            &second,
            200,
            vec![
                Header::Contact(rsip::headers::Contact::new(
                    "<sip:as1@127.0.0.1:5082>;services=echo;expires=3000",
                )),
                Header::Contact(rsip::headers::Contact::new(
                    "<sip:as1@127.0.0.1:5080>;services=\"echo,clock\";capacity=50;expires=100",
                )),
                Header::Expires(rsip::headers::Expires::new("999")),
            ],
        );
        assert_eq!(
            reg.on_response(t0, &ok),
            Outcome::Registered { expires: 100 }
        );
        assert!(reg.is_bound(t0));
        assert_eq!(reg.deadline(), Some(t0 + Duration::from_secs(50)));
        assert!(reg
            .poll_request(t0 + Duration::from_secs(49), &via())
            .is_none());
        let refresh = reg
            .poll_request(t0 + Duration::from_secs(50), &via())
            .unwrap();
        assert_eq!(header(&refresh, "CSeq").unwrap(), "3 REGISTER");
        assert!(
            header(&refresh, "Authorization").is_some(),
            "reuses the challenge"
        );
        assert!(reg.is_bound(t0 + Duration::from_secs(99)));
        assert!(!reg.is_bound(t0 + Duration::from_secs(100)));
    }

    #[test]
    fn failures_back_off_and_a_kick_retries_at_once() {
        let t0 = Instant::now();
        let mut reg = new_reg(t0);
        let mut now = t0;
        let mut delays = Vec::new();
        for _ in 0..5 {
            let req = reg.poll_request(now, &via()).unwrap();
            match reg.on_response(now, &local_response(408, "Request Timeout")) {
                Outcome::Failed {
                    retry_in: Some(d), ..
                } => delays.push(d.as_secs()),
                other => panic!("{other:?}"),
            }
            drop(req);
            assert!(!reg.is_due(now));
            now = reg.deadline().unwrap();
        }
        assert_eq!(delays, [1, 2, 4, 8, 8]);
        // A probe from the relay: register now.
        reg.kick(t0);
        assert!(reg.is_due(t0));
        let req = reg.poll_request(t0, &via()).unwrap();
        assert_eq!(
            reg.on_response(t0, &reply(&req, 200, vec![])),
            Outcome::Registered { expires: 120 }
        );
        // After a success the backoff starts over.
        reg.kick(t0);
        let req = reg.poll_request(t0, &via()).unwrap();
        match reg.on_response(t0, &reply(&req, 503, vec![])) {
            Outcome::Failed { retry_in, .. } => assert_eq!(retry_in, Some(Duration::from_secs(1))),
            other => panic!("{other:?}"),
        }
        // The binding granted before still holds until it expires.
        assert!(reg.is_bound(t0 + Duration::from_secs(119)));
    }

    #[test]
    fn a_refused_refresh_is_retried_before_the_binding_lapses() {
        let t0 = Instant::now();
        let mut reg = Registration::new(
            params(),
            ClientAuth::new("as1", Secret("as1-secret".into())),
            Backoff::new(Duration::from_secs(1), Duration::from_secs(600)),
            t0,
        );
        let req = reg.poll_request(t0, &via()).unwrap();
        assert_eq!(
            reg.on_response(t0, &reply(&req, 200, vec![])),
            Outcome::Registered { expires: 120 }
        );
        // The refresh, at 60 s, meets the refusal of our address for five minutes.
        let mut now = t0 + Duration::from_secs(60);
        let refused = |req: &Request| {
            reply(
                req,
                503,
                vec![Header::RetryAfter(rsip::headers::RetryAfter::new("300"))],
            )
        };
        let mut tries = Vec::new();
        while reg.is_bound(now) && tries.len() < 20 {
            let req = reg.poll_request(now, &via()).unwrap();
            match reg.on_response(now, &refused(&req)) {
                Outcome::Failed {
                    retry_in: Some(d), ..
                } => tries.push(d.as_secs()),
                other => panic!("{other:?}"),
            }
            now = reg.deadline().unwrap();
        }
        // Half the time left each time, never the 300 s asked, down to a second.
        assert_eq!(&tries[..5], [30, 15, 7, 3, 1], "{tries:?}");
        assert!(tries.iter().all(|&d| d >= 1), "{tries:?}");
        // The refusal ends: registered again, and the backoff starts over.
        let req = reg.poll_request(now, &via()).unwrap();
        assert_eq!(
            reg.on_response(now, &reply(&req, 200, vec![])),
            Outcome::Registered { expires: 120 }
        );
    }

    #[test]
    fn unbound_the_agent_waits_what_the_relay_asks_and_keeps_trying() {
        let t0 = Instant::now();
        let mut reg = new_reg(t0);
        let req = reg.poll_request(t0, &via()).unwrap();
        let mut old_relay = reply(&req, 403, vec![]);
        old_relay.status_code = message::status(403, Some("Too many failed attempts"));
        match reg.on_response(t0, &old_relay) {
            Outcome::Failed {
                reason,
                retry_in: Some(d),
            } => {
                assert!(reason.contains("Too many failed attempts"), "{reason}");
                assert_eq!(d, Duration::from_secs(1), "backoff, then again");
            }
            other => panic!("{other:?}"),
        }
        let now = reg.deadline().unwrap();
        let req = reg.poll_request(now, &via()).unwrap();
        let refused = reply(
            &req,
            503,
            vec![Header::RetryAfter(rsip::headers::RetryAfter::new(
                "20;duration=60",
            ))],
        );
        match reg.on_response(now, &refused) {
            Outcome::Failed { retry_in, .. } => {
                assert_eq!(retry_in, Some(Duration::from_secs(20)))
            }
            other => panic!("{other:?}"),
        }
        assert!(!reg.is_closed());
        assert!(reg.deadline().is_some(), "another attempt is due");
    }

    #[test]
    fn wrong_password_fails_instead_of_looping() {
        let t0 = Instant::now();
        let mut reg = Registration::new(
            params(),
            ClientAuth::new("as1", Secret("wrong".into())),
            Backoff::new(Duration::from_secs(1), Duration::from_secs(8)),
            t0,
        );
        let srv = server();
        let first = reg.poll_request(t0, &via()).unwrap();
        assert_eq!(
            reg.on_response(t0, &reply(&first, 401, challenge(&srv))),
            Outcome::Challenged
        );
        let second = reg.poll_request(t0, &via()).unwrap();
        match reg.on_response(t0, &reply(&second, 401, challenge(&srv))) {
            Outcome::Failed { reason, retry_in } => {
                assert!(reason.contains("credentials refused"), "{reason}");
                assert_eq!(retry_in, Some(Duration::from_secs(1)));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn interval_too_brief_raises_the_lifetime() {
        let t0 = Instant::now();
        let mut reg = new_reg(t0);
        let first = reg.poll_request(t0, &via()).unwrap();
        let min = Header::MinExpires(rsip::headers::MinExpires::new("600"));
        assert_eq!(
            reg.on_response(t0, &reply(&first, 423, vec![min])),
            Outcome::IntervalRaised { expires: 600 }
        );
        let second = reg.poll_request(t0, &via()).unwrap();
        assert_eq!(header(&second, "Expires").unwrap(), "600");
    }

    #[test]
    fn unregisters_with_expires_zero_only_after_a_binding() {
        let t0 = Instant::now();
        let mut never = new_reg(t0);
        assert!(never.unregister_request(&via()).is_none());
        assert!(never.is_closed());

        let mut reg = new_reg(t0);
        let req = reg.poll_request(t0, &via()).unwrap();
        reg.on_response(t0, &reply(&req, 200, vec![]));
        let bye = reg.unregister_request(&via()).unwrap();
        assert_eq!(header(&bye, "Expires").unwrap(), "0");
        assert!(header(&bye, "Contact")
            .unwrap()
            .starts_with("<sip:as1@127.0.0.1:5080>"));
        // Challenged: answered once more, still as an unregistration.
        let srv = server();
        assert_eq!(
            reg.on_response(t0, &reply(&bye, 401, challenge(&srv))),
            Outcome::Challenged
        );
        let again = reg.poll_request(t0, &via()).unwrap();
        assert_eq!(header(&again, "Expires").unwrap(), "0");
        assert!(header(&again, "Authorization").is_some());
        assert_eq!(
            reg.on_response(t0, &reply(&again, 200, vec![])),
            Outcome::Unregistered
        );
        assert!(reg.is_closed() && !reg.is_bound(t0));
        assert_eq!(reg.deadline(), None);
    }

    #[test]
    fn contact_expires_reads_our_contact_only() {
        let ours = Uri::parse("sip:as1@127.0.0.1:5080").unwrap();
        let read = |v: &str| contact_expires(v, &ours);
        assert_eq!(
            read("<sip:as1@127.0.0.1:5080>;services=\"a;b,c\";expires=60"),
            Some(60)
        );
        assert_eq!(
            read("<sip:as1@127.0.0.1:5080>;EXPIRES=7;capacity=2"),
            Some(7)
        );
        assert_eq!(read("sip:as1@127.0.0.1:5080;expires=9"), Some(9));
        assert_eq!(read("<sip:as1@127.0.0.1:5081>;expires=60"), None);
        assert_eq!(read("<sip:as2@127.0.0.1:5080>;expires=60"), None);
        assert_eq!(read("<sip:as1@127.0.0.1:5080>;services=x"), None);
        assert_eq!(read("<garbage>;expires=1"), None);
    }

    #[test]
    fn registers_an_ipv6_contact_with_an_ipv6_relay() {
        let t0 = Instant::now();
        let params = RegistrationParams {
            registrar: Uri::parse("sip:[::1]:5060").unwrap(),
            aor: Uri::parse("sip:as1@[::1]:5060").unwrap(),
            contact: Uri::parse("sip:as1@[::1]:5080").unwrap(),
            contact_params: RegistrationParams::service_params(&["echo"], None),
            expires: 120,
        };
        let mut reg = Registration::new(
            params,
            ClientAuth::new("as1", Secret("as1-secret".into())),
            Backoff::new(Duration::from_secs(1), Duration::from_secs(8)),
            t0,
        );
        let via = ViaSpec {
            transport: sip_core::Transport::Udp,
            sent_by: "[::1]:5080".into(),
        };
        let req = reg.poll_request(t0, &via).unwrap();
        let text = String::from_utf8(message::to_bytes(req.clone()).to_vec()).unwrap();
        assert!(
            text.starts_with("REGISTER sip:[::1]:5060 SIP/2.0\r\n"),
            "{text}"
        );
        assert!(text.contains("Via: SIP/2.0/UDP [::1]:5080;"), "{text}");
        assert!(
            text.contains("Contact: <sip:as1@[::1]:5080>;services=\"echo\"\r\n"),
            "{text}"
        );
        assert!(text.contains("From: <sip:as1@[::1]:5060>;tag="), "{text}");
        assert!(header(&req, "Call-ID").unwrap().ends_with("@[::1]"));
        // The relay echoes our Contact, the address written another way.
        let ok = reply(
            &req,
            200,
            vec![Header::Contact(rsip::headers::Contact::new(
                "<sip:as1@[0:0::1]:5080>;services=\"echo\";expires=60",
            ))],
        );
        assert_eq!(
            reg.on_response(t0, &ok),
            Outcome::Registered { expires: 60 }
        );
    }

    #[test]
    fn contact_expires_reads_ipv6_contacts_and_lists() {
        let ours = Uri::parse("sip:as1@[::1]:5080").unwrap();
        let read = |v: &str| contact_expires(v, &ours);
        assert_eq!(read("<sip:as1@[::1]:5080>;expires=30"), Some(30));
        assert_eq!(
            read("<sip:as1@[::1]:5081>;expires=1, <sip:as1@[::1]:5080>;expires=2"),
            Some(2)
        );
        assert_eq!(read("<sip:as1@127.0.0.1:5080>;expires=30"), None);
        assert_eq!(read("<sip:as1@[::2]:5080>;expires=30"), None);
        assert_eq!(read("<sip:as1@[::1>;expires=30"), None);
    }

    #[test]
    fn stray_responses_are_ignored() {
        let t0 = Instant::now();
        let mut reg = new_reg(t0);
        let req = reg.poll_request(t0, &via()).unwrap();
        reg.on_response(t0, &reply(&req, 200, vec![]));
        assert_eq!(
            reg.on_response(t0, &reply(&req, 200, vec![])),
            Outcome::Ignored
        );
    }

    #[test]
    fn an_unresolvable_relay_is_a_failure_with_backoff() {
        let t0 = Instant::now();
        let mut reg = new_reg(t0);
        match reg.on_send_failure(t0, "cannot resolve".into()) {
            Outcome::Failed { retry_in, .. } => assert_eq!(retry_in, Some(Duration::from_secs(1))),
            other => panic!("{other:?}"),
        }
        assert_eq!(reg.deadline(), Some(t0 + Duration::from_secs(1)));
    }
}
