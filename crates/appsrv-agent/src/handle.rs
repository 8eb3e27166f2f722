//! What an application server can do with a running agent — the same verbs whether it
//! embeds the agent ([`crate::agent::Agent::handle`]) or speaks to it over the control API
//! ([`crate::control`]): list its sessions, hear their events, charge, hang up.
//!
//! An [`AgentHandle`] is cheap to clone and may be used from any task. Each call goes to the
//! session core or the charging task over a channel, so the sessions keep one owner.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{info, warn};

use crate::app_charge::{
    fingerprint, AppCharge, ChargeError, ChargeReceipt, EventLedger, ReceiptStatus,
};
use crate::charging::{ChargeRequest, ChargeSink, Delivery};
use crate::events::{SessionEvent, SessionInfo};
use crate::session::{Command, HangUpError, HangUpResult, SessionRef};

/// How long asking the session core may take before the agent counts as stopped.
const CORE_ANSWER: Duration = Duration::from_secs(10);

/// What the application server's charges default to, and how long they wait.
#[derive(Debug, Clone)]
pub struct ChargeDefaults {
    /// `billing.price_per_block`: the unit price of a charge in units that names none.
    pub unit_price: u64,
    /// `billing.currency`.
    pub currency: String,
    /// `billing.confirm_wait_secs`: how long a charge waits for the relay's answer.
    pub confirm_wait: Duration,
    /// Whether a spool directory keeps unconfirmed charges.
    pub spooled: bool,
}

/// The application server's side of a running agent. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AgentHandle {
    commands: mpsc::Sender<Command>,
    charges: ChargeSink,
    events: broadcast::Sender<SessionEvent>,
    ledger: Arc<Mutex<EventLedger>>,
    defaults: ChargeDefaults,
}

/// Why a request to the agent failed for want of the agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the agent is shutting down")]
pub struct Stopped;

impl AgentHandle {
    /// A handle on the session core's `commands`, the charging task's `charges` and the
    /// session `events`.
    pub fn new(
        commands: mpsc::Sender<Command>,
        charges: ChargeSink,
        events: broadcast::Sender<SessionEvent>,
        defaults: ChargeDefaults,
    ) -> AgentHandle {
        AgentHandle {
            commands,
            charges,
            events,
            ledger: Arc::new(Mutex::new(EventLedger::default())),
            defaults,
        }
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Stopped> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(make(tx)).await.map_err(|_| Stopped)?;
        match tokio::time::timeout(CORE_ANSWER, rx).await {
            Ok(Ok(answer)) => Ok(answer),
            _ => Err(Stopped),
        }
    }

    /// The live sessions, oldest first.
    pub async fn sessions(&self) -> Result<Vec<SessionInfo>, Stopped> {
        self.ask(|reply| Command::List { reply }).await
    }

    /// One live session.
    pub async fn session(&self, session_id: &str) -> Result<Option<SessionInfo>, Stopped> {
        Ok(self
            .sessions()
            .await?
            .into_iter()
            .find(|s| s.session_id == session_id))
    }

    /// The session events from now on. A receiver that falls more than 1024 events behind
    /// loses the oldest ([`broadcast::error::RecvError::Lagged`]).
    pub fn events(&self) -> broadcast::Receiver<SessionEvent> {
        self.events.subscribe()
    }

    /// Ends a live session: the agent sends BYE (once the relay has ACKed its 200) with a
    /// `Reason` naming the application server, and the relay records the end as
    /// `server-bye`. Returns the relay's final status to the BYE (`None` when the session
    /// ended otherwise before the BYE went out).
    pub async fn hang_up(&self, session_id: &str, reason: &str) -> HangUpResult {
        let (tx, rx) = oneshot::channel();
        let command = Command::HangUp {
            session_id: session_id.to_string(),
            reason: reason.to_string(),
            reply: tx,
        };
        self.commands
            .send(command)
            .await
            .map_err(|_| HangUpError::Stopped)?;
        // The BYE's transaction bounds this (Timer F), and the shutdown answers every waiter.
        rx.await.unwrap_or(Err(HangUpError::Stopped))
    }

    /// Asks the relay to charge, and waits for its answer up to `billing.confirm_wait_secs`:
    /// [`ReceiptStatus::Confirmed`] once the relay committed the charge record,
    /// [`ReceiptStatus::Pending`] when it has not yet (the charge is retried until it has;
    /// `spooled` says whether it survives a restart of the agent). The same event id asked
    /// again for the same charge is answered again and charged once.
    pub async fn charge(&self, charge: AppCharge) -> Result<ChargeReceipt, ChargeError> {
        let checked = charge.check(self.defaults.unit_price, &self.defaults.currency)?;
        let (subscriber, outstanding) = match &charge.session_id {
            Some(id) => {
                let SessionRef {
                    subscriber,
                    outstanding,
                } = self
                    .ask(|reply| Command::Lookup {
                        session_id: id.clone(),
                        reply,
                    })
                    .await
                    .map_err(|Stopped| ChargeError::Stopped)?
                    .ok_or_else(|| ChargeError::UnknownSession(id.clone()))?;
                if let Some(given) = &charge.subscriber {
                    if *given != subscriber {
                        return Err(ChargeError::SubscriberMismatch {
                            session_id: id.clone(),
                            given: given.clone(),
                        });
                    }
                }
                (subscriber, outstanding)
            }
            None => (charge.subscriber.clone().unwrap_or_default(), None),
        };
        let print = fingerprint(charge.session_id.as_deref(), &subscriber, &checked);
        self.ledger
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(&charge.event_id, print)?;
        let (tx, rx) = oneshot::channel();
        self.charges.charge(ChargeRequest {
            event_id: Some(checked.relay_event_id.clone()),
            call_id: charge.session_id.clone(),
            subscriber: subscriber.clone(),
            price: checked.price,
            currency: Some(checked.currency.clone()),
            description: checked.description.clone(),
            guard: outstanding.map(|o| o.begin()),
            reply: Some(tx),
        });
        let mut receipt = ChargeReceipt {
            status: ReceiptStatus::Pending,
            event_id: charge.event_id.clone(),
            relay_event_id: checked.relay_event_id.clone(),
            session_id: charge.session_id.clone(),
            subscriber,
            amount: checked.total,
            currency: checked.currency,
            spooled: self.defaults.spooled,
            detail: None,
        };
        match tokio::time::timeout(self.defaults.confirm_wait, rx).await {
            Ok(Ok(Delivery::Confirmed { .. })) => {
                receipt.status = ReceiptStatus::Confirmed;
                info!(
                    event_id = %receipt.relay_event_id,
                    call_id = ?receipt.session_id,
                    amount = receipt.amount,
                    "application charge confirmed"
                );
                Ok(receipt)
            }
            Ok(Ok(Delivery::Refused { status, reason, .. })) => {
                warn!(event_id = %receipt.relay_event_id, status, %reason, "application charge refused by the relay");
                // Nothing was charged: the id may be asked for again, corrected.
                self.ledger
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .forget(&charge.event_id);
                Err(ChargeError::Refused { status, reason })
            }
            Ok(Ok(Delivery::Pending {
                spooled,
                status,
                reason,
                ..
            })) => {
                receipt.spooled = spooled;
                receipt.detail = Some(format!(
                    "{status} {reason}; retried until the relay answers"
                ));
                Ok(receipt)
            }
            Ok(Err(_)) => {
                // The charging task dropped the request: it has stopped.
                self.ledger
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .forget(&charge.event_id);
                Err(ChargeError::Stopped)
            }
            Err(_) => {
                receipt.detail = Some(format!(
                    "no answer from the relay within {} s; retried until it answers",
                    self.defaults.confirm_wait.as_secs()
                ));
                Ok(receipt)
            }
        }
    }
}
