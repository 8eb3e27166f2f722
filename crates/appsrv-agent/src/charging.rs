//! Application billing, the server's side of claim 4: charge requests sent to the relay as
//! `MESSAGE sip:charge@<domain>` with an `application/vnd.relay.charge+json` body
//! (`docs/protocol.md`), digest-authenticated as the agent's account.
//!
//! Charges come from two places: byte blocks delivered by the data gateway, and the
//! application server itself (control API or [`crate::handle::AgentHandle::charge`], checked
//! in [`crate::app_charge`]). Every charge has an event id that it keeps on every retry, so
//! the relay stores it once however often it arrives: the agent's own are
//! `<account>-<run id>-<sequence>` (the run id random per start of the agent so ids never
//! repeat across restarts); the application server's are its own, written `app:<its id>`.
//! A charge is retried, with backoff, until the relay gives a final answer: 2xx confirms it;
//! a 4xx other than 401/407/408/480/491 (or a 3xx/6xx) refuses it for good, which is logged
//! with the body — except a `403` to a charge naming a session the relay has already closed,
//! which is sent again for the subscriber alone, under the same event id. A refusal of the
//! agent's address or account for too many failed authentication attempts is no answer to
//! the charge (issue 14): relayd says so with `503` and `Retry-After` (RFC 3261 §21.5.4),
//! a relay of an older kind with `403 Too many failed attempts`; both are retried like a
//! timeout, no sooner than the `Retry-After` (within `retry_max`), and a charge stays
//! spooled meanwhile. A challenge that follows credentials (the account's credentials not
//! taken from here just now) is retried likewise. With a spool
//! directory each charge is written to disk (fsync) before the first attempt and removed once
//! confirmed; charges left there by a crash are sent again at the next start.
//!
//! Whoever asked may hear how it went ([`Delivery`]): confirmed, refused, or — after the
//! first attempt that will be retried — pending (and whether it is spooled).

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::RngCore;
use rsip::headers::UntypedHeader as _;
use rsip::{Header, Method, Request, Response};
use sip_core::dialog::ViaSpec;
use sip_core::endpoint::Endpoint;
use sip_core::message;
use sip_core::resolve::{self, NetDns};
use sip_core::uri::Uri;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

use crate::auth::{ChallengeOutcome, ClientAuth};
use crate::backoff::Backoff;
use crate::inflight::InFlightGuard;
use crate::registration::{local_response, retry_after, USER_AGENT};

/// The body's media type.
pub const CONTENT_TYPE: &str = "application/vnd.relay.charge+json";

/// Challenges answered in a row for one attempt before it counts as failed.
const MAX_CHALLENGES: u8 = 3;

/// How much a charge is for: units at a price, or an amount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Price {
    /// `units` × `unit_price` (the configured `billing.price_per_block` when `None`).
    Units {
        /// Units charged.
        units: u64,
        /// Price of a unit, in minor units.
        unit_price: Option<u64>,
    },
    /// A total, in minor units.
    Amount(u64),
}

/// A request to charge a subscriber, from the data gateway or the application server.
#[derive(Debug)]
pub struct ChargeRequest {
    /// The event id as sent to the relay; `None`: the agent makes one.
    pub event_id: Option<String>,
    /// The server leg's Call-ID, when the charge belongs to a session.
    pub call_id: Option<String>,
    /// The subscriber the relay asserted.
    pub subscriber: String,
    /// How much.
    pub price: Price,
    /// ISO 4217 code; `None`: the configured `billing.currency`.
    pub currency: Option<String>,
    /// For the billing record.
    pub description: String,
    /// Held until the relay answers the charge.
    pub guard: Option<InFlightGuard>,
    /// Told how the delivery went (confirmed, refused, or pending after a first failure).
    pub reply: Option<oneshot::Sender<Delivery>>,
}

/// How the delivery of one charge went, as far as its requester needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The relay committed it (2xx).
    Confirmed {
        /// Its event id, as sent to the relay.
        event_id: String,
    },
    /// The relay refused it for good.
    Refused {
        /// Its event id, as sent to the relay.
        event_id: String,
        /// The relay's status code.
        status: u16,
        /// The relay's reason phrase.
        reason: String,
    },
    /// The first attempt failed in a way that is retried (timeout, 5xx…); the charge stays
    /// queued (and on disk when `spooled`) until the relay answers.
    Pending {
        /// Its event id, as sent to the relay.
        event_id: String,
        /// Whether it is in the spool directory (survives a restart).
        spooled: bool,
        /// The status of the failed attempt (503 for a transport error).
        status: u16,
        /// Its reason.
        reason: String,
    },
}

/// The body of a charge `MESSAGE` (`docs/protocol.md`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Charge {
    /// Unique per charge, the same on every retry.
    pub event_id: String,
    /// The server leg's Call-ID: the session to charge. Left out when the relay no longer
    /// knows the session (it ended before the charge arrived): the subscriber is charged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_id: Option<String>,
    /// The subscriber.
    pub subscriber: String,
    /// Units charged (with `unit_price`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub units: Option<u64>,
    /// Price of a unit, in minor units (with `units`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_price: Option<u64>,
    /// A total in minor units (instead of `units` and `unit_price`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<u64>,
    /// ISO 4217 code.
    pub currency: String,
    /// For the billing record.
    pub description: String,
}

impl Charge {
    /// The total in minor units (saturating).
    pub fn total(&self) -> u64 {
        match (self.amount, self.units, self.unit_price) {
            (Some(a), _, _) => a,
            (None, Some(u), Some(p)) => u.saturating_mul(p),
            _ => 0,
        }
    }
}

/// Event ids: `<account>-<run id>-<sequence>`.
#[derive(Debug)]
pub struct EventIds {
    prefix: String,
    next: u64,
}

impl EventIds {
    /// Ids for `account`, with a fresh random run id.
    pub fn new(account: &str) -> EventIds {
        let mut run = [0u8; 4];
        rand::thread_rng().fill_bytes(&mut run);
        let run: String = run.iter().map(|b| format!("{b:02x}")).collect();
        EventIds {
            prefix: format!("{account}-{run}"),
            next: 1,
        }
    }

    /// The next id.
    pub fn next_id(&mut self) -> String {
        let id = format!("{}-{:06}", self.prefix, self.next);
        self.next += 1;
        id
    }
}

/// Charges waiting for the relay's confirmation, one JSON file each.
#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
}

impl Spool {
    /// Opens (creating) the spool directory.
    pub fn open(dir: &Path) -> io::Result<Spool> {
        std::fs::create_dir_all(dir)?;
        Ok(Spool {
            dir: dir.to_path_buf(),
        })
    }

    /// The file of a charge: its event id with every byte but ASCII letters, digits and `-`
    /// written `_xx` (hex), so that two event ids never share a file.
    fn path(&self, event_id: &str, ext: &str) -> PathBuf {
        let mut safe = String::with_capacity(event_id.len());
        for b in event_id.bytes() {
            if b.is_ascii_alphanumeric() || b == b'-' {
                safe.push(char::from(b));
            } else {
                safe.push_str(&format!("_{b:02x}"));
            }
        }
        self.dir.join(format!("{safe}.{ext}"))
    }

    /// Writes a charge durably (temporary file, fsync, rename, fsync of the directory).
    pub fn store(&self, charge: &Charge) -> io::Result<()> {
        let body = serde_json::to_vec(charge).map_err(io::Error::other)?;
        let tmp = self.path(&charge.event_id, "tmp");
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&body)?;
        file.sync_all()?;
        std::fs::rename(&tmp, self.path(&charge.event_id, "json"))?;
        std::fs::File::open(&self.dir)?.sync_all()
    }

    /// Forgets a confirmed charge.
    pub fn remove(&self, event_id: &str) -> io::Result<()> {
        match std::fs::remove_file(self.path(event_id, "json")) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Sets a refused charge aside (`.rejected`) for the operator.
    pub fn reject(&self, event_id: &str) -> io::Result<()> {
        std::fs::rename(self.path(event_id, "json"), self.path(event_id, "rejected"))
    }

    /// The charges waiting, in event id order. Unreadable files are skipped with a warning.
    pub fn load(&self) -> io::Result<Vec<Charge>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Charge>(&b).map_err(|e| e.to_string()))
            {
                Ok(c) => out.push(c),
                Err(e) => {
                    warn!(file = %path.display(), error = %e, "unreadable charge in the spool")
                }
            }
        }
        out.sort_by(|a, b| a.event_id.cmp(&b.event_id));
        Ok(out)
    }
}

/// How a charge attempt's final response is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx: the relay committed the charge.
    Confirmed,
    /// 401/407: answer the challenge and send again.
    Challenge,
    /// Send again after a delay (timeout, 5xx, 408, 480, 491).
    Retry,
    /// Refused for good (3xx, other 4xx, 6xx): sending again would not help.
    Refused,
}

/// What to do with a final response `code` to a charge.
pub fn verdict(code: u16) -> Verdict {
    match code {
        200..=299 => Verdict::Confirmed,
        401 | 407 => Verdict::Challenge,
        408 | 480 | 491 | 500..=599 => Verdict::Retry,
        _ => Verdict::Refused,
    }
}

/// The reason phrase with which a relay refuses an address or account that failed to
/// authenticate too often (relayd's, with 503 now, with 403 before issue 14).
pub const LOCKED_OUT_REASON: &str = "Too many failed attempts";

/// What to do with a final response to a charge: [`verdict`] of its code, except that a
/// lock-out refusal (`403 Too many failed attempts`) is retried: it says nothing about the
/// charge, only that the relay does not take credentials from here for a while (issue 14).
pub fn verdict_of(resp: &Response) -> Verdict {
    let code = resp.status_code.code();
    if code == 403 && is_lockout(resp) {
        return Verdict::Retry;
    }
    verdict(code)
}

/// Whether `resp` refuses the sender for too many failed authentication attempts (by its
/// reason phrase, ASCII case ignored).
pub fn is_lockout(resp: &Response) -> bool {
    reason_of(resp)
        .trim()
        .eq_ignore_ascii_case(LOCKED_OUT_REASON)
}

/// The wait before the next attempt after `resp`: the backoff's `next`, or what the relay
/// asks in `Retry-After` when that is longer, but never more than `max`.
pub fn retry_delay(resp: &Response, next: Duration, max: Duration) -> Duration {
    match retry_after(resp) {
        Some(asked) => next.max(asked.min(max)),
        None => next,
    }
}

/// Where charges go and how they are paid for. The URIs are sip-core's, so that an IPv6
/// relay (`sip:[::1]:5060`) reads and prints as written.
#[derive(Clone)]
pub struct ChargerConfig {
    /// The SIP endpoint.
    pub endpoint: Endpoint,
    /// The relay's URI: where the MESSAGE is sent.
    pub relay: Uri,
    /// The DNS client the relay's domain is resolved with (RFC 3263).
    pub dns: NetDns,
    /// The MESSAGE's Request-URI (`sip:charge@<domain>`).
    pub charge_uri: Uri,
    /// Our address of record (From).
    pub aor: Uri,
    /// Our `host:port` for the Via header.
    pub sent_by: String,
    /// Price of a unit.
    pub unit_price: u64,
    /// Currency.
    pub currency: String,
    /// First retry delay.
    pub retry_initial: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Durable store, if any.
    pub spool: Option<Spool>,
    /// How long pending charges may take to go out at shutdown.
    pub flush_timeout: Duration,
}

/// Where charge requests are handed in. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ChargeSink(mpsc::UnboundedSender<ChargeRequest>);

impl ChargeSink {
    /// Queues a charge; it is sent at once and retried until the relay answers. When
    /// charging has stopped the charge is dropped (its `reply`, if any, is closed).
    pub fn charge(&self, req: ChargeRequest) {
        if let Err(e) = self.0.send(req) {
            error!(call_id = ?e.0.call_id, price = ?e.0.price, "charging has stopped: charge dropped");
        }
    }

    /// A sink and the receiving end, for tests and wiring.
    pub fn channel() -> (ChargeSink, mpsc::UnboundedReceiver<ChargeRequest>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (ChargeSink(tx), rx)
    }
}

struct Shared {
    config: ChargerConfig,
    auth: Mutex<ClientAuth>,
}

/// Starts the charging task: it sends what the spool holds, then every charge handed to the
/// returned sink; at shutdown it sends what is queued and waits up to `flush_timeout` for
/// the relay's answers.
pub fn spawn(
    config: ChargerConfig,
    auth: ClientAuth,
    ids: EventIds,
    shutdown: watch::Receiver<bool>,
) -> (ChargeSink, tokio::task::JoinHandle<()>) {
    let (sink, rx) = ChargeSink::channel();
    let shared = Arc::new(Shared {
        config,
        auth: Mutex::new(auth),
    });
    let task = tokio::spawn(run(shared, ids, rx, shutdown));
    (sink, task)
}

async fn run(
    shared: Arc<Shared>,
    mut ids: EventIds,
    mut rx: mpsc::UnboundedReceiver<ChargeRequest>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut pending: JoinSet<()> = JoinSet::new();
    if let Some(spool) = &shared.config.spool {
        match spool.load() {
            Ok(charges) => {
                if !charges.is_empty() {
                    info!(count = charges.len(), "sending charges left in the spool");
                }
                for charge in charges {
                    pending.spawn(deliver(shared.clone(), charge, None, None));
                }
            }
            Err(e) => error!(error = %e, "cannot read the charge spool"),
        }
    }
    loop {
        tokio::select! {
            req = rx.recv() => match req {
                Some(mut req) => {
                    let guard = req.guard.take();
                    let reply = req.reply.take();
                    let charge = shared.make_charge(&mut ids, req);
                    pending.spawn(deliver(shared.clone(), charge, guard, reply));
                }
                None => break,
            },
            Some(_) = pending.join_next(), if !pending.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    // Shutdown: what was queued goes out too, then the answers are awaited for a while.
    while let Ok(mut req) = rx.try_recv() {
        let guard = req.guard.take();
        let reply = req.reply.take();
        let charge = shared.make_charge(&mut ids, req);
        pending.spawn(deliver(shared.clone(), charge, guard, reply));
    }
    let flush = async { while pending.join_next().await.is_some() {} };
    if tokio::time::timeout(shared.config.flush_timeout, flush)
        .await
        .is_err()
    {
        let left = pending.len();
        pending.abort_all();
        if shared.config.spool.is_some() {
            warn!(
                left,
                "charges not yet confirmed at shutdown stay in the spool"
            );
        } else {
            error!(
                left,
                "charges not yet confirmed at shutdown are lost (no spool_dir)"
            );
        }
    }
}

impl Shared {
    fn make_charge(&self, ids: &mut EventIds, req: ChargeRequest) -> Charge {
        let (units, unit_price, amount) = match req.price {
            Price::Units { units, unit_price } => (
                Some(units),
                Some(unit_price.unwrap_or(self.config.unit_price)),
                None,
            ),
            Price::Amount(a) => (None, None, Some(a)),
        };
        let charge = Charge {
            event_id: req.event_id.unwrap_or_else(|| ids.next_id()),
            description: req.description,
            call_id: req.call_id,
            subscriber: req.subscriber,
            units,
            unit_price,
            amount,
            currency: req.currency.unwrap_or_else(|| self.config.currency.clone()),
        };
        if let Some(spool) = &self.config.spool {
            if let Err(e) = spool.store(&charge) {
                error!(event_id = %charge.event_id, error = %e, "cannot write the charge to the spool");
            }
        }
        charge
    }

    fn authorization(&self, uri: &str) -> Option<Header> {
        self.auth
            .lock()
            .ok()
            .and_then(|mut a| a.authorization("MESSAGE", uri))
    }

    fn on_challenge(&self, resp: &Response, answered: bool) -> ChallengeOutcome {
        match self.auth.lock() {
            Ok(mut a) => a.on_challenge(resp, answered),
            Err(_) => ChallengeOutcome::Unusable("credential lock poisoned".into()),
        }
    }
}

/// Sends one charge until the relay gives a final answer.
///
/// A `403` (other than a lock-out, see [`verdict_of`]) to a charge naming the session's
/// Call-ID means the relay no longer holds that
/// session (it ended, say by the BYE that followed the last bytes, before the charge
/// arrived): the same charge, same event id, is then sent for the subscriber alone, whom the
/// relay knows the server has served.
/// `_guard` keeps the charge counted as outstanding for its session until this returns;
/// `reply` hears the outcome (or, after a first failure that is retried, that it is pending).
async fn deliver(
    shared: Arc<Shared>,
    mut charge: Charge,
    _guard: Option<InFlightGuard>,
    mut reply: Option<oneshot::Sender<Delivery>>,
) {
    let config = &shared.config;
    let mut body = match serde_json::to_vec(&charge) {
        Ok(b) => b,
        Err(e) => {
            error!(event_id = %charge.event_id, error = %e, "cannot encode the charge");
            return;
        }
    };
    let mut backoff = Backoff::new(config.retry_initial, config.retry_max);
    let mut builder = MessageBuilder::new(config);
    let mut challenges = 0u8;
    loop {
        let uri = config.charge_uri.to_string();
        let auth = shared.authorization(&uri);
        let answered = auth.is_some();
        let resp = match target(&config.relay, &config.dns).await {
            Ok((peer, transport)) => {
                let via = ViaSpec {
                    transport,
                    sent_by: config.sent_by.clone(),
                };
                let req = builder.build(&via, auth, body.clone());
                match config.endpoint.send_request(req, peer) {
                    Ok(mut tx) => tx.final_response().await,
                    Err(e) => local_response(503, &e.to_string()),
                }
            }
            Err(reason) => local_response(503, &reason),
        };
        let code = resp.status_code.code();
        match verdict_of(&resp) {
            Verdict::Confirmed => {
                if let Some(spool) = &config.spool {
                    if let Err(e) = spool.remove(&charge.event_id) {
                        warn!(event_id = %charge.event_id, error = %e, "cannot remove the charge from the spool");
                    }
                }
                info!(
                    event_id = %charge.event_id,
                    call_id = ?charge.call_id,
                    units = ?charge.units,
                    amount = charge.total(),
                    "charge confirmed by the relay"
                );
                tell(
                    &mut reply,
                    Delivery::Confirmed {
                        event_id: charge.event_id.clone(),
                    },
                );
                return;
            }
            Verdict::Challenge if challenges < MAX_CHALLENGES => {
                match shared.on_challenge(&resp, answered) {
                    ChallengeOutcome::Retry => {
                        challenges += 1;
                        continue;
                    }
                    ChallengeOutcome::Rejected => {
                        error!(event_id = %charge.event_id, "relay refused the account's credentials for a charge");
                    }
                    ChallengeOutcome::Unusable(e) => {
                        warn!(event_id = %charge.event_id, error = %e, "unusable challenge for a charge");
                    }
                }
            }
            Verdict::Challenge | Verdict::Retry => {}
            Verdict::Refused if code == 403 && charge.call_id.is_some() => {
                info!(
                    event_id = %charge.event_id,
                    call_id = ?charge.call_id,
                    "relay no longer knows the session: charging the subscriber"
                );
                charge.call_id = None;
                match serde_json::to_vec(&charge) {
                    Ok(b) => body = b,
                    Err(e) => {
                        error!(event_id = %charge.event_id, error = %e, "cannot encode the charge");
                        return;
                    }
                }
                if let Some(spool) = &config.spool {
                    if let Err(e) = spool.store(&charge) {
                        warn!(event_id = %charge.event_id, error = %e, "cannot update the spooled charge");
                    }
                }
                challenges = 0;
                continue;
            }
            Verdict::Refused => {
                error!(
                    event_id = %charge.event_id,
                    status = code,
                    reason = %reason_of(&resp),
                    body = %String::from_utf8_lossy(&body),
                    "relay refused the charge"
                );
                if let Some(spool) = &config.spool {
                    if let Err(e) = spool.reject(&charge.event_id) {
                        warn!(event_id = %charge.event_id, error = %e, "cannot set the refused charge aside");
                    }
                }
                tell(
                    &mut reply,
                    Delivery::Refused {
                        event_id: charge.event_id.clone(),
                        status: code,
                        reason: reason_of(&resp),
                    },
                );
                return;
            }
        }
        challenges = 0;
        tell(
            &mut reply,
            Delivery::Pending {
                event_id: charge.event_id.clone(),
                spooled: config.spool.is_some(),
                status: code,
                reason: reason_of(&resp),
            },
        );
        let delay = retry_delay(&resp, backoff.next_delay(), config.retry_max);
        warn!(
            event_id = %charge.event_id,
            status = code,
            reason = %reason_of(&resp),
            retry_in_ms = delay.as_millis() as u64,
            "charge not confirmed yet"
        );
        tokio::time::sleep(delay).await;
    }
}

/// Tells the requester, once, how its charge went.
fn tell(reply: &mut Option<oneshot::Sender<Delivery>>, delivery: Delivery) {
    if let Some(tx) = reply.take() {
        // The requester may have stopped waiting; the charge goes on regardless.
        let _ = tx.send(delivery);
    }
}

fn reason_of(resp: &Response) -> String {
    match &resp.status_code {
        rsip::StatusCode::Other(_, reason) => reason.clone(),
        other => other.to_string(),
    }
}

async fn target(
    relay: &Uri,
    dns: &NetDns,
) -> Result<(sip_core::Peer, sip_core::Transport), String> {
    let targets = resolve::resolve(relay, dns)
        .await
        .map_err(|e| format!("cannot resolve {relay}: {e}"))?;
    let t = targets
        .first()
        .ok_or_else(|| format!("no address for {relay}"))?;
    Ok((t.peer(), t.transport))
}

/// Builds the MESSAGEs of one charge: one Call-ID and From tag, the CSeq counting up.
struct MessageBuilder {
    charge_uri: Uri,
    aor: Uri,
    call_id: String,
    from_tag: String,
    cseq: u32,
}

impl MessageBuilder {
    fn new(config: &ChargerConfig) -> MessageBuilder {
        let host = crate::config::host_of(&config.sent_by).to_string();
        MessageBuilder {
            charge_uri: config.charge_uri.clone(),
            aor: config.aor.clone(),
            call_id: message::new_call_id(&host),
            from_tag: message::new_tag(),
            cseq: 0,
        }
    }

    fn build(&mut self, via: &ViaSpec, auth: Option<Header>, body: Vec<u8>) -> Request {
        self.cseq += 1;
        let mut headers = vec![
            via.header(),
            Header::MaxForwards(rsip::headers::MaxForwards::new("70")),
            Header::From(rsip::headers::From::new(format!(
                "<{}>;tag={}",
                self.aor, self.from_tag
            ))),
            Header::To(rsip::headers::To::new(format!("<{}>", self.charge_uri))),
            Header::CallId(rsip::headers::CallId::new(self.call_id.clone())),
            Header::CSeq(rsip::headers::CSeq::new(format!("{} MESSAGE", self.cseq))),
            Header::UserAgent(rsip::headers::UserAgent::new(USER_AGENT)),
            Header::ContentType(rsip::headers::ContentType::new(CONTENT_TYPE)),
        ];
        headers.extend(auth);
        let mut headers = rsip::Headers::from(headers);
        message::set_content_length(&mut headers, body.len());
        debug!(call_id = %self.call_id, cseq = self.cseq, "charge MESSAGE");
        Request {
            method: Method::Message,
            uri: self.charge_uri.to_rsip(),
            version: rsip::Version::V2,
            headers,
            body,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn charge(id: &str) -> Charge {
        Charge {
            event_id: id.into(),
            call_id: Some("leg-1@relay".into()),
            subscriber: "alice".into(),
            units: Some(3),
            unit_price: Some(5),
            amount: None,
            currency: "EUR".into(),
            description: "3 x 1048576 bytes delivered (echo)".into(),
        }
    }

    #[test]
    fn event_ids_are_unique_per_run_and_sequence() {
        let mut a = EventIds::new("as1");
        let mut b = EventIds::new("as1");
        let a1 = a.next_id();
        let a2 = a.next_id();
        assert!(a1.starts_with("as1-") && a1.ends_with("-000001"), "{a1}");
        assert!(a2.ends_with("-000002"));
        assert_ne!(a1, b.next_id(), "two runs never share ids");
    }

    #[test]
    fn the_body_has_the_protocol_fields() {
        let json: serde_json::Value = serde_json::to_value(charge("as1-x-000001")).unwrap();
        for key in [
            "event_id",
            "call_id",
            "subscriber",
            "units",
            "unit_price",
            "currency",
            "description",
        ] {
            assert!(json.get(key).is_some(), "{key} missing in {json}");
        }
        assert_eq!(json["units"], 3);
        assert_eq!(json["unit_price"], 5);
        let mut for_subscriber = charge("as1-x-000002");
        for_subscriber.call_id = None;
        let json = serde_json::to_value(for_subscriber).unwrap();
        assert!(json.get("call_id").is_none(), "{json}");
        assert_eq!(json["subscriber"], "alice");
        assert!(json.get("amount").is_none(), "{json}");
        // An amount instead of units: only the amount goes out.
        let mut total = charge("app:level-1");
        (total.units, total.unit_price, total.amount) = (None, None, Some(25));
        let json = serde_json::to_value(&total).unwrap();
        assert_eq!(json["amount"], 25);
        assert!(json.get("units").is_none() && json.get("unit_price").is_none());
        assert_eq!(total.total(), 25);
        assert_eq!(charge("x").total(), 15);
    }

    #[test]
    fn verdicts_follow_the_protocol() {
        assert_eq!(verdict(200), Verdict::Confirmed);
        assert_eq!(verdict(202), Verdict::Confirmed);
        assert_eq!(verdict(407), Verdict::Challenge);
        assert_eq!(verdict(401), Verdict::Challenge);
        for retry in [408, 480, 491, 500, 503, 504] {
            assert_eq!(verdict(retry), Verdict::Retry, "{retry}");
        }
        for refused in [302, 400, 403, 404, 415, 488, 603] {
            assert_eq!(verdict(refused), Verdict::Refused, "{refused}");
        }
    }

    fn response(code: u16, reason: &str, retry_after: Option<&str>) -> Response {
        let mut resp = local_response(code, reason);
        if let Some(secs) = retry_after {
            resp.headers
                .push(Header::RetryAfter(rsip::headers::RetryAfter::new(secs)));
        }
        resp
    }

    #[test]
    fn a_lockout_is_retried_never_final() {
        // relayd refuses a failing address with 503 + Retry-After; an older relay with 403.
        let refused = response(503, "Too many failed attempts", Some("300"));
        assert_eq!(verdict_of(&refused), Verdict::Retry);
        for reason in ["Too many failed attempts", "too many FAILED attempts "] {
            let old = response(403, reason, None);
            assert!(is_lockout(&old), "{reason}");
            assert_eq!(verdict_of(&old), Verdict::Retry, "{reason}");
        }
        // Any other 403 is the relay's word on the charge itself.
        for reason in ["Session not served by this server", "Forbidden", ""] {
            assert_eq!(
                verdict_of(&response(403, reason, None)),
                Verdict::Refused,
                "{reason}"
            );
        }
        assert_eq!(verdict_of(&response(200, "OK", None)), Verdict::Confirmed);
        assert_eq!(
            verdict_of(&response(407, "Proxy Authentication Required", None)),
            Verdict::Challenge
        );
    }

    #[test]
    fn retry_after_is_waited_for_within_the_longest_delay() {
        let max = Duration::from_secs(60);
        let next = Duration::from_secs(2);
        let with = |v: &str| response(503, "Too many failed attempts", Some(v));
        assert_eq!(retry_after(&with("30")), Some(Duration::from_secs(30)));
        assert_eq!(
            retry_after(&with("18000;duration=3600")),
            Some(Duration::from_secs(18000))
        );
        assert_eq!(
            retry_after(&with("120 (I'm in a meeting)")),
            Some(Duration::from_secs(120))
        );
        assert_eq!(retry_after(&with("soon")), None);
        assert_eq!(retry_delay(&with("30"), next, max), Duration::from_secs(30));
        assert_eq!(retry_delay(&with("300"), next, max), max, "capped");
        assert_eq!(
            retry_delay(&with("1"), next, max),
            next,
            "the backoff if longer"
        );
        assert_eq!(retry_delay(&response(500, "Oops", None), next, max), next);
    }

    #[test]
    fn the_spool_keeps_charges_until_confirmed() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool")).unwrap();
        spool.store(&charge("as1-r-000002")).unwrap();
        spool.store(&charge("as1-r-000001")).unwrap();
        spool.store(&charge("as1-r-000003")).unwrap();
        std::fs::write(dir.path().join("spool/garbage.json"), b"{not json").unwrap();
        let loaded = spool.load().unwrap();
        let ids: Vec<_> = loaded.iter().map(|c| c.event_id.as_str()).collect();
        assert_eq!(ids, ["as1-r-000001", "as1-r-000002", "as1-r-000003"]);
        assert_eq!(loaded[0], charge("as1-r-000001"));
        spool.remove("as1-r-000001").unwrap();
        spool.remove("as1-r-000001").unwrap();
        spool.reject("as1-r-000002").unwrap();
        let ids: Vec<_> = spool
            .load()
            .unwrap()
            .into_iter()
            .map(|c| c.event_id)
            .collect();
        assert_eq!(ids, ["as1-r-000003"]);
        assert!(dir.path().join("spool/as1-r-000002.rejected").exists());
        // Event ids that differ only in punctuation get files of their own.
        spool.store(&charge("app:a_b")).unwrap();
        spool.store(&charge("app:a:b")).unwrap();
        spool.store(&charge("app:a.b")).unwrap();
        assert_eq!(spool.load().unwrap().len(), 4);
        assert!(dir.path().join("spool/app_3aa_5fb.json").exists());
    }

    #[test]
    fn messages_of_one_charge_share_call_id_and_count_cseq() {
        let via = ViaSpec {
            transport: sip_core::Transport::Udp,
            sent_by: "127.0.0.1:5080".into(),
        };
        let mut b = MessageBuilder {
            charge_uri: Uri::parse("sip:charge@relay.test").unwrap(),
            aor: Uri::parse("sip:as1@relay.test").unwrap(),
            call_id: "c1@127.0.0.1".into(),
            from_tag: "t1".into(),
            cseq: 0,
        };
        let first = b.build(&via, None, b"{}".to_vec());
        let second = b.build(&via, None, b"{}".to_vec());
        let text = |r: &Request| message::to_bytes(r.clone());
        let (one, two) = (text(&first), text(&second));
        let one = String::from_utf8_lossy(&one);
        let two = String::from_utf8_lossy(&two);
        assert!(
            one.starts_with("MESSAGE sip:charge@relay.test SIP/2.0\r\n"),
            "{one}"
        );
        assert!(one.contains("CSeq: 1 MESSAGE") && two.contains("CSeq: 2 MESSAGE"));
        assert!(one.contains(&format!("Content-Type: {CONTENT_TYPE}")));
        assert!(one.contains("Call-ID: c1@127.0.0.1") && two.contains("Call-ID: c1@127.0.0.1"));
        assert!(one.ends_with("\r\n\r\n{}"), "{one}");
    }

    #[test]
    fn a_charge_toward_an_ipv6_relay_brackets_every_address() {
        let via = ViaSpec {
            transport: sip_core::Transport::Udp,
            sent_by: crate::config::host_port("::1", 5080),
        };
        let mut b = MessageBuilder {
            charge_uri: Uri::parse("sip:charge@[::1]:5060").unwrap(),
            aor: Uri::parse("sip:as1@[::1]:5060").unwrap(),
            call_id: "c6@[::1]".into(),
            from_tag: "t6".into(),
            cseq: 0,
        };
        let req = b.build(&via, None, b"{}".to_vec());
        let text = message::to_bytes(req);
        let text = String::from_utf8_lossy(&text);
        assert!(
            text.starts_with("MESSAGE sip:charge@[::1]:5060 SIP/2.0\r\n"),
            "{text}"
        );
        assert!(text.contains("Via: SIP/2.0/UDP [::1]:5080;"), "{text}");
        assert!(
            text.contains("From: <sip:as1@[::1]:5060>;tag=t6\r\n"),
            "{text}"
        );
        assert!(text.contains("To: <sip:charge@[::1]:5060>\r\n"), "{text}");
        // What goes out parses back, Request-URI included.
        let back = sip_core::wire::parse(text.as_bytes());
        assert!(back.is_ok(), "{text}");
    }
}
