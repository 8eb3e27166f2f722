//! Application billing (claim 4): an application-server account asks the relay to charge a
//! subscriber with `MESSAGE` and a body of type `application/vnd.relay.charge+json`
//! (docs/protocol.md). Out of dialog the account authenticates with digest (407); in dialog
//! the leg the relay itself set up with that server vouches for it.
//!
//! The charge record is committed before the 200; the same event id again is answered 200
//! and stored once. A malformed body, a missing field or an amount beyond the per-event limit
//! gets 400 with a reason; a session the server does not serve, or a subscriber it never
//! served, gets 403.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use billing::money::{Currency, Money};
use billing::store::{ChargeAmount, EndedSession, NewCharge};
use serde::Deserialize;
use sip_core::endpoint::IncomingRequest;
use sip_core::message;
use tracing::{info, warn};

use crate::b2bua;
use crate::billing_control::unix_ms;
use crate::content::{is_charge, CHARGE_CONTENT_TYPE};
use crate::relay::Relay;
use crate::served::ServedSession;

/// The JSON body of a charge request (docs/protocol.md).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChargeBody {
    event_id: String,
    #[serde(default)]
    call_id: Option<String>,
    #[serde(default)]
    session_id: Option<String>,
    #[serde(default)]
    subscriber: Option<String>,
    #[serde(default)]
    amount: Option<i64>,
    #[serde(default)]
    units: Option<i64>,
    #[serde(default)]
    unit_price: Option<i64>,
    #[serde(default)]
    currency: Option<String>,
    #[serde(default)]
    description: Option<String>,
}

/// A refusal: status and reason phrase.
type Refusal = (u16, String);

/// The session a charge names, as charging needs it: live (from the served index) or ended
/// (from its record in the billing store).
struct Named {
    session_id: String,
    subscriber: String,
    service: String,
    server: String,
    account: Option<String>,
}

impl From<ServedSession> for Named {
    fn from(s: ServedSession) -> Named {
        Named {
            session_id: s.session_id,
            subscriber: s.subscriber,
            service: s.service,
            server: s.server,
            account: s.account,
        }
    }
}

impl From<EndedSession> for Named {
    fn from(s: EndedSession) -> Named {
        Named {
            session_id: s.session_id,
            subscriber: s.subscriber,
            service: s.service,
            server: s.server,
            account: s.account,
        }
    }
}

/// The session whose id or Call-ID (either leg's) is `key`: a live one, else one whose
/// record was committed within `[billing] late_charge_grace_secs` (a server may send its
/// last charge just after the BYE). The store answers after every commit submitted before,
/// and a session leaves the index only once its record is committed: none is missed.
async fn named(relay: &Relay, key: &str) -> Result<Option<Named>, Refusal> {
    if let Some(s) = relay.served.find(key) {
        return Ok(Some(s.into()));
    }
    let grace_secs = relay.settings().config.billing.late_charge_grace_secs;
    match relay
        .billing
        .ended_session(key, Duration::from_secs(u64::from(grace_secs)))
        .await
    {
        Ok(found) => Ok(found.map(Named::from)),
        Err(e) => {
            warn!(error = %format!("{e:#}"), "looking up an ended session failed");
            Err((500, "Billing unavailable".into()))
        }
    }
}

fn bad(reason: impl Into<String>) -> Refusal {
    (400, reason.into())
}

/// Handles an out-of-dialog charge request: digest-authenticated as an application-server
/// account, which may charge only for sessions its own servers serve (or served).
pub async fn handle(relay: Arc<Relay>, r: IncomingRequest) {
    if !relay.is_ours(&r.req.uri) {
        answer(&r, 404, "Not Found");
        return;
    }
    let Some(account) = relay.authenticate_request(&r) else {
        return;
    };
    if relay.settings().config.server_account(&account).is_none() {
        answer(&r, 403, "Not an application-server account");
        return;
    }
    if !relay.server_peer_certified(r.from) {
        answer(&r, 403, "Application servers must charge over mutual TLS");
        return;
    }
    process(&relay, &r, &account, None).await;
}

/// Handles a charge request that arrived on a server leg of `served` (the leg itself
/// authenticates the server).
pub async fn handle_in_dialog(relay: Arc<Relay>, r: IncomingRequest, served: ServedSession) {
    let account = served.account.clone().unwrap_or_default();
    process(&relay, &r, &account, Some(served)).await;
}

async fn process(
    relay: &Relay,
    r: &IncomingRequest,
    account: &str,
    in_dialog: Option<ServedSession>,
) {
    match charge(relay, r, account, in_dialog).await {
        Ok(()) => answer(r, 200, "OK"),
        Err((code, reason)) => {
            info!(account, code, reason = %reason, "charge refused");
            answer(r, code, &reason);
        }
    }
}

async fn charge(
    relay: &Relay,
    r: &IncomingRequest,
    account: &str,
    in_dialog: Option<ServedSession>,
) -> Result<(), Refusal> {
    if !is_charge(&r.req) {
        return Err((
            415,
            format!("Unsupported Media Type (expected {CHARGE_CONTENT_TYPE})"),
        ));
    }
    let body: ChargeBody =
        serde_json::from_slice(&r.req.body).map_err(|e| bad(format!("Malformed charge: {e}")))?;
    if body.event_id.trim().is_empty() {
        return Err(bad("Malformed charge: empty event_id"));
    }
    let settings = relay.settings();
    let limits = &settings.config.billing;
    let currency_code = body
        .currency
        .clone()
        .unwrap_or_else(|| limits.currency.clone());
    let currency = Currency::new(&currency_code).map_err(|e| bad(format!("Bad currency: {e}")))?;
    let amount = match (body.amount, body.units, body.unit_price) {
        (Some(a), None, None) => {
            if a < 0 {
                return Err(bad("Negative amount"));
            }
            ChargeAmount::Total(Money::new(a, currency))
        }
        (None, Some(units), Some(price)) => {
            if units < 0 || price < 0 {
                return Err(bad("Negative units or unit price"));
            }
            ChargeAmount::Units {
                units,
                unit_price: Money::new(price, currency),
            }
        }
        _ => {
            return Err(bad(
                "Malformed charge: give amount, or units and unit_price",
            ))
        }
    };
    let total = match amount {
        ChargeAmount::Total(m) => Some(m.minor),
        ChargeAmount::Units { units, unit_price } => units.checked_mul(unit_price.minor),
    };
    match total {
        Some(t) if t <= limits.max_charge => {}
        _ => {
            return Err(bad(format!(
                "Amount over the per-event limit of {}",
                limits.max_charge
            )))
        }
    }
    // Whom to charge, and is this account entitled to? The session's server must be one
    // this account speaks for (registered or configured), decided by the directory entry
    // the call used, never by comparing URI text.
    let session = match (&in_dialog, &body.session_id, &body.call_id) {
        (Some(s), _, _) => Some(Named::from(s.clone())),
        (None, Some(key), _) | (None, None, Some(key)) => match named(relay, key).await? {
            Some(s) if s.account.as_deref() == Some(account) => Some(s),
            _ => return Err((403, "Session not served by this server".into())),
        },
        (None, None, None) => None,
    };
    let (subscriber, service, session_id, server) = match session {
        Some(s) => {
            if body
                .subscriber
                .as_deref()
                .is_some_and(|sub| sub != s.subscriber)
            {
                return Err(bad("Subscriber does not match the session"));
            }
            (s.subscriber, Some(s.service), Some(s.session_id), s.server)
        }
        None => {
            let Some(subscriber) = body.subscriber.clone() else {
                return Err(bad(
                    "Malformed charge: missing session_id, call_id or subscriber",
                ));
            };
            let Some(server) = relay.served.server_that_served(account, &subscriber) else {
                return Err((403, "Subscriber never served by this server".into()));
            };
            (subscriber, None, None, server)
        }
    };
    let new = NewCharge {
        session_id,
        // Keyed by the server's URI, as its session records are, so that reports per
        // server add both up; the account is in the log.
        server,
        subscriber,
        service,
        event_id: body.event_id,
        amount,
        description: body.description.unwrap_or_default(),
        charged_at_ms: unix_ms(SystemTime::now()),
    };
    match relay.billing.charge(new).await {
        Ok((record, duplicate)) => {
            info!(event_id = %record.event_id, server = %record.server, duplicate, "charge recorded");
            Ok(())
        }
        Err(e) => {
            warn!(error = %e, "charge not recorded");
            match e {
                billing::BillingError::InvalidInput { .. }
                | billing::BillingError::NegativeAmount { .. }
                | billing::BillingError::Money(_) => Err(bad(format!("Invalid charge: {e}"))),
                _ => Err((500, "Billing unavailable".into())),
            }
        }
    }
}

fn answer(r: &IncomingRequest, code: u16, reason: &str) {
    let tag = message::new_tag();
    let _ =
        r.tx.respond(b2bua::local_response(&r.req, code, reason, Some(&tag)));
}
