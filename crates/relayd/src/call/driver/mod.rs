//! The thin tokio layer around a [`Call`]: a driver per call that owns the call and the
//! server transactions it answers, feeds it what arrives in its inbox and what its deadline
//! asks, and carries out what it asks — sending through the endpoint, resolving servers,
//! committing billing commands on the group-committing writer. Calls run on a few runner
//! tasks ([`runner`]), not a task each. The only part of the call that knows tokio.

pub mod routing;
pub(crate) mod runner;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use sip_core::dialog::DialogId;
use sip_core::endpoint::{
    synthetic_response, ClientEvent, ClientSink, Endpoint, IncomingRequest, ServerTx,
};
use sip_core::message::RequestIds;
use sip_core::transport::TrySendError;
use sip_core::Peer;
use tracing::{debug, info_span, warn};

use self::routing::{Inbox, InboxReceiver, SessionInput, SessionTable};
use self::runner::CallTask;
use super::{Admission, BillingCmd, Call, CallEnv, Incoming, Input, LegEvent, LegId, Output};
use super::{Token, TxId};
use crate::billing_control::BillingControl;
use crate::directory::ServerRef;
use crate::trace::Trace;

/// What the driver needs of the relay besides what the call asks ([`CallEnv`]): the
/// endpoint, the billing control, the routing table, DNS and charging.
pub trait Relaying: CallEnv + Send + Sync + 'static {
    /// The SIP endpoint.
    fn endpoint(&self) -> &Endpoint;
    /// The billing control.
    fn billing(&self) -> &BillingControl;
    /// Where each Call-ID's messages go.
    fn table(&self) -> &SessionTable;
    /// Where a server is (RFC 3263).
    fn resolve(&self, server: &ServerRef) -> impl Future<Output = Option<Peer>> + Send;
    /// Where a server is when that needs no lookup (an IP address in its URI): `Some`
    /// with the answer, `None` when [`Relaying::resolve`] must look it up.
    fn resolve_now(&self, server: &ServerRef) -> Option<Option<Peer>>;
    /// Handles a charge request that came on the server leg of session `session_id`.
    fn charge_in_dialog(self: &Arc<Self>, incoming: IncomingRequest, session_id: &str);
    /// The trace of recent messages and decisions, when `[trace]` is on.
    fn trace(&self) -> Option<&Trace> {
        None
    }
}

/// Starts the call for an admitted INVITE whose Call-ID is `call_id`, on a runner.
pub fn spawn<R: Relaying>(
    relay: Arc<R>,
    incoming: IncomingRequest,
    adm: Admission,
    call_id: String,
) {
    let (me, rx) = relay.table().new_inbox();
    let routed = relay.table().insert(&call_id, me.clone());
    let span = info_span!("call", call_id = %call_id, service = %adm.service);
    let mut driver = Driver {
        relay,
        me,
        txs: Vec::new(),
        next_tx: 0,
        invite_tx: TxId(0),
        call_id: call_id.as_str().into(),
        routed: vec![routed],
        ready: Vec::new(),
    };
    driver.invite_tx = driver.hold(incoming.tx);
    let invite = Incoming {
        tx: driver.invite_tx,
        req: incoming.req,
        from: incoming.from,
    };
    let call = {
        let _entered = span.enter();
        Call::new(
            invite,
            call_id,
            adm,
            &*driver.relay,
            Instant::now(),
            SystemTime::now(),
        )
    };
    let (runner, key) = rx.runner();
    let slot = CallSlot {
        driver,
        call,
        rx,
        span,
    };
    // What a call holds for its whole life besides its sessions on the heap: this, in one
    // allocation.
    tracing::trace!(
        slot_bytes = std::mem::size_of_val(&slot),
        "call placed on its runner"
    );
    runner.start(key, Box::new(slot));
}

/// A call on its runner: its driver, the call, its inbox, its span.
struct CallSlot<R: Relaying> {
    driver: Driver<R>,
    call: Call,
    rx: InboxReceiver,
    span: tracing::Span,
}

impl<R: Relaying> CallSlot<R> {
    /// Carries out what the call asks and lets go of what it no longer needs.
    fn settle(&mut self) {
        self.driver.carry_out(&mut self.call);
        if self.call.inquiry_over() {
            // The transaction goes on in the endpoint (2xx retransmissions, Timer L);
            // the call has nothing more to send on it.
            let invite_tx = self.driver.invite_tx;
            if Driver::<R>::take_tx(&mut self.driver.txs, invite_tx).is_some() {
                self.driver.txs.shrink_to_fit();
            }
        }
    }
}

impl<R: Relaying> CallTask for CallSlot<R> {
    fn drain(&mut self) {
        let span = self.span.clone();
        let _entered = span.enter();
        self.settle();
        while !self.call.is_finished() {
            let Some(input) = self.rx.try_recv() else {
                break;
            };
            if let Some(input) = self.driver.translate(input) {
                self.call.handle(input, &*self.driver.relay, Instant::now());
            }
            self.settle();
        }
    }

    fn timeout(&mut self) {
        let span = self.span.clone();
        let _entered = span.enter();
        self.call
            .handle_timeout(&*self.driver.relay, Instant::now());
        self.settle();
    }

    fn deadline(&self) -> Option<Instant> {
        self.call.poll_timeout()
    }

    fn finished(&self) -> bool {
        self.call.is_finished()
    }
}

impl<R: Relaying> Drop for CallSlot<R> {
    fn drop(&mut self) {
        if self.call.is_finished() {
            debug!(parent: &self.span, "call over");
        }
        for &key in &self.driver.routed {
            self.driver.relay.table().remove(key);
        }
    }
}

struct Driver<R> {
    relay: Arc<R>,
    me: Inbox,
    /// The server transactions the call answers, by the ids it knows them by: rarely more
    /// than one or two, so a list rather than a table.
    txs: Vec<(TxId, ServerTx)>,
    next_tx: u64,
    invite_tx: TxId,
    /// The terminal's Call-ID, for traces.
    call_id: Box<str>,
    /// Every Call-ID routed to this call, by its key in the table, unrouted when it ends.
    routed: Vec<u64>,
    /// Inputs produced while carrying out outputs (a failed send, a resolved IP address).
    ready: Vec<Input>,
}

impl<R: Relaying> Driver<R> {
    /// The terminal's Call-ID.
    fn call_id(&self) -> &str {
        &self.call_id
    }

    fn hold(&mut self, tx: ServerTx) -> TxId {
        self.next_tx += 1;
        let id = TxId(self.next_tx);
        self.txs.push((id, tx));
        id
    }

    /// Takes server transaction `id` out of the call's hands.
    /// (Of the list alone, so that it can be taken while the relay is borrowed.)
    fn take_tx(txs: &mut Vec<(TxId, ServerTx)>, id: TxId) -> Option<ServerTx> {
        let at = txs.iter().position(|(t, _)| *t == id)?;
        Some(txs.swap_remove(at).1)
    }

    /// What the call makes of one inbox message.
    fn translate(&mut self, input: SessionInput) -> Option<Input> {
        Some(match input {
            SessionInput::Request(r) => {
                let dialog = DialogId::of_request_ids(&r.ids);
                let tx = self.hold(r.tx);
                Input::Request {
                    incoming: Incoming {
                        tx,
                        req: r.req,
                        from: r.from,
                    },
                    dialog,
                }
            }
            SessionInput::Cancel { req, tx, invite: _ } => {
                let tx = self.hold(tx);
                Input::Cancel { tx, req }
            }
            SessionInput::Ack(req) => {
                let dialog = DialogId::of_incoming_request(&req);
                Input::Ack { req, dialog }
            }
            SessionInput::Stray(resp) => {
                let dialog = DialogId::of_response(&resp);
                Input::Stray { resp, dialog }
            }
            SessionInput::Leg { leg, event } => Input::Leg { leg, event },
            SessionInput::Resolved { leg, peer } => Input::Resolved { leg, peer },
            SessionInput::Answered { token, resp } => Input::Answered { token, resp },
            SessionInput::Billed { token, result } => Input::Billed { token, result },
            SessionInput::Shutdown => Input::Shutdown,
            SessionInput::End { session_id } => Input::End { session_id },
        })
    }

    /// Carries out everything the call asks, feeding back what that produces at once,
    /// until it asks nothing more. Nothing here waits: what must (a DNS lookup, a TCP
    /// connection to open, a billing commit) goes to a task of its own and comes back
    /// through the inbox, so that a call never holds up the others of its runner.
    fn carry_out(&mut self, call: &mut Call) {
        loop {
            while let Some(out) = call.poll_output() {
                self.execute(out);
            }
            if self.ready.is_empty() {
                break;
            }
            let input = self.ready.remove(0);
            call.handle(input, &*self.relay, Instant::now());
        }
        // Its room is given back: a call keeps its driver for life.
        self.ready = Vec::new();
    }

    fn execute(&mut self, out: Output) {
        let relay = &self.relay;
        match out {
            Output::Respond { tx, resp } => {
                let last = resp.status_code.code() >= 200 && tx != self.invite_tx;
                let held = if last {
                    Self::take_tx(&mut self.txs, tx)
                } else {
                    self.txs
                        .iter()
                        .find(|(t, _)| *t == tx)
                        .map(|(_, t)| t.clone())
                };
                if let Some(t) = held {
                    if t.respond(resp).is_err() {
                        debug!("transaction gone");
                    }
                }
            }
            Output::Resolve { leg, server } => {
                if let Some(peer) = relay.resolve_now(&server) {
                    // No lookup to wait for: the address is in the URI.
                    self.ready.push(Input::Resolved { leg, peer });
                } else {
                    let relay = relay.clone();
                    let me = self.me.clone();
                    tokio::spawn(async move {
                        let peer = relay.resolve(&server).await;
                        let _ = me.send(SessionInput::Resolved { leg, peer });
                    });
                }
            }
            Output::Invite { leg, req, peer } => {
                if let Some(trace) = relay.trace() {
                    trace.decision(
                        self.call_id(),
                        format!("server chosen: {} at {peer}", req.uri),
                    );
                }
                let sink = Arc::new(LegSink {
                    me: self.me.clone(),
                    leg,
                });
                if let Err(e) = relay.endpoint().send_request_to(req, peer, sink) {
                    warn!(error = %e, "cannot send inquiry");
                    self.ready.push(Input::Leg {
                        leg,
                        event: LegEvent::Failed {
                            code: 503,
                            resp: None,
                        },
                    });
                }
            }
            Output::Request { req, peer, answer } => {
                let method = req.method;
                match answer {
                    Some(token) => {
                        let sink = Arc::new(AnswerSink {
                            me: self.me.clone(),
                            token,
                            done: AtomicBool::new(false),
                        });
                        if let Err(e) = relay.endpoint().send_request_to(req, peer, sink) {
                            warn!(error = %e, %method, "cannot send");
                            self.ready.push(Input::Answered {
                                token,
                                resp: synthetic_response(503, &e.to_string()),
                            });
                        }
                    }
                    None => {
                        // The transaction goes on (retransmissions, timers) without a user.
                        if let Err(e) = relay.endpoint().send_request(req, peer) {
                            warn!(error = %e, %method, "cannot send");
                        }
                    }
                }
            }
            Output::Stateless { msg, peer } => {
                match relay.endpoint().transports().try_send(&peer, msg) {
                    Ok(()) => {}
                    Err(TrySendError::WouldBlock(msg)) => {
                        // A TCP connection to open, or a full queue: wait for it elsewhere.
                        let relay = relay.clone();
                        tokio::spawn(async move {
                            if let Err(e) = relay.endpoint().transports().send(&peer, msg).await {
                                warn!(error = %e, "cannot send a message outside a transaction");
                            }
                        });
                    }
                    Err(TrySendError::Failed(e)) => {
                        warn!(error = %e, "cannot send a message outside a transaction")
                    }
                }
            }
            Output::Route { call_id } => {
                if let Some(trace) = relay.trace() {
                    trace.link(self.call_id(), &call_id);
                }
                let key = relay.table().insert(&call_id, self.me.clone());
                self.routed.push(key);
            }
            Output::Bill { token, cmd } => {
                let relay = relay.clone();
                let me = self.me.clone();
                let traced = relay
                    .trace()
                    .is_some()
                    .then(|| (self.call_id().to_owned(), billing_note(&cmd)));
                tokio::spawn(async move {
                    let result = commit(relay.billing(), cmd)
                        .await
                        .map_err(|e| format!("{e:#}"));
                    if let (Some(trace), Some((call_id, what))) = (relay.trace(), traced) {
                        let text = match &result {
                            Ok(_) => format!("billing: {what} written"),
                            Err(e) => format!("billing: {what} failed: {e}"),
                        };
                        trace.decision(&call_id, text);
                    }
                    let _ = me.send(SessionInput::Billed { token, result });
                });
            }
            Output::Charge {
                incoming,
                session_id,
            } => {
                if let Some(tx) = Self::take_tx(&mut self.txs, incoming.tx) {
                    // The call kept the request, not its ids: read them again, for the
                    // one charge request in a session's life.
                    let Ok(ids) = RequestIds::read(&incoming.req) else {
                        return;
                    };
                    let r = IncomingRequest {
                        req: incoming.req,
                        from: incoming.from,
                        tx,
                        ids,
                    };
                    relay.charge_in_dialog(r, &session_id);
                }
            }
        }
    }
}

/// Commits one billing command; resolves once it is durable.
async fn commit(billing: &BillingControl, cmd: BillingCmd) -> anyhow::Result<()> {
    match cmd {
        BillingCmd::Open(start) => billing.session_confirmed(start).await,
        BillingCmd::Close {
            session_id,
            cause,
            ended_at,
        } => {
            let record = billing.session_ended(&session_id, cause, ended_at).await?;
            debug!(session_id = %session_id, duration_ms = record.duration_ms, "record written");
            Ok(())
        }
        BillingCmd::Segment {
            closing,
            cause,
            at,
            open,
        } => {
            billing.session_ended(&closing, cause, at).await?;
            billing.session_confirmed(open).await
        }
    }
}

/// Takes a leg's INVITE transaction events inline, from the endpoint's receiving or timer
/// task, and puts them in the call's inbox: no task of its own per leg.
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

/// Takes the final answer of a request the call waits for (a timeout as 408, a transport
/// failure as 503, RFC 3261 §8.1.3.1) and puts it in the call's inbox, once.
struct AnswerSink {
    me: Inbox,
    token: Token,
    done: AtomicBool,
}

impl ClientSink for AnswerSink {
    fn deliver(&self, event: ClientEvent) {
        let resp = match event {
            ClientEvent::Response(r) if r.status_code.code() >= 200 => r,
            ClientEvent::Response(_) => return,
            ClientEvent::TimedOut => synthetic_response(408, "Request Timeout"),
            ClientEvent::Failed(e) => synthetic_response(503, &e),
        };
        if self.done.swap(true, Ordering::AcqRel) {
            return;
        }
        let _ = self.me.send(SessionInput::Answered {
            token: self.token,
            resp,
        });
    }

    fn is_closed(&self) -> bool {
        self.done.load(Ordering::Acquire) || self.me.is_closed()
    }
}

/// What a billing command writes, for the trace.
fn billing_note(cmd: &BillingCmd) -> String {
    match cmd {
        BillingCmd::Open(start) => format!(
            "session {} opened (subscriber {}, service {}, server {}, plan {})",
            start.session_id, start.subscriber, start.service, start.server, start.plan
        ),
        BillingCmd::Close {
            session_id, cause, ..
        } => format!("record of session {session_id}, end cause {cause}"),
        BillingCmd::Segment {
            closing, cause, open, ..
        } => format!(
            "record of segment {closing}, end cause {cause}; segment {} opened (service {}, server {})",
            open.session_id, open.service, open.server
        ),
    }
}

#[cfg(test)]
mod tests {
    /// A call holds its slot on its runner for life: the driver, the call, the inbox and
    /// the span, boxed together. jemalloc serves up to 640 bytes from its 640-byte class,
    /// 641 from the 768-byte one.
    #[test]
    fn a_call_and_its_driver_fit_640_bytes() {
        let size = std::mem::size_of::<super::CallSlot<crate::relay::Relay>>();
        assert!(size <= 640, "{size}");
    }
}
