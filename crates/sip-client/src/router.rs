//! Hands what the endpoint receives to the session it belongs to (by dialog id), and
//! answers what belongs to none: OPTIONS 200, an INVITE 603 (this client only calls out),
//! an in-dialog request of an unknown dialog 481 (RFC 3261 §12.2.2).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use rsip::{Header, Method};
use rsip::{Request, Response};
use sip_core::dialog::DialogId;
use sip_core::endpoint::{EndpointEvent, IncomingRequest, ServerTx};
use sip_core::message;
use tokio::sync::{mpsc, oneshot};

use crate::headers;
use crate::script::Action;
use crate::ua::Ua;

/// What is routed to a session.
#[derive(Debug)]
pub enum SessionInput {
    /// An in-dialog request.
    Request(IncomingRequest),
    /// An ACK for a 2xx we sent (to a re-INVITE).
    Ack(Request),
    /// A 2xx to one of our INVITEs again: the ACK was lost, send it again.
    Stray2xx(Response),
    /// A 2xx we sent was never ACKed.
    AckTimeout(ServerTx),
    /// Something to do; the sender is told when it is done.
    Command(Action, oneshot::Sender<()>),
}

/// The live sessions by dialog id. Cheap to clone.
#[derive(Clone, Default)]
pub struct Router {
    sessions: Arc<Mutex<HashMap<DialogId, mpsc::UnboundedSender<SessionInput>>>>,
}

impl Router {
    fn lock(&self) -> MutexGuard<'_, HashMap<DialogId, mpsc::UnboundedSender<SessionInput>>> {
        match self.sessions.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Routes a dialog's messages to `tx`.
    pub fn insert(&self, id: DialogId, tx: mpsc::UnboundedSender<SessionInput>) {
        self.lock().insert(id, tx);
    }

    /// Stops routing a dialog.
    pub fn remove(&self, id: &DialogId) {
        self.lock().remove(id);
    }

    /// The session of a dialog.
    pub fn get(&self, id: &DialogId) -> Option<mpsc::UnboundedSender<SessionInput>> {
        self.lock().get(id).cloned()
    }

    fn all(&self) -> Vec<mpsc::UnboundedSender<SessionInput>> {
        self.lock().values().cloned().collect()
    }

    /// Reads the endpoint's events until it closes.
    pub async fn run(self, ua: Ua, mut events: mpsc::Receiver<EndpointEvent>) {
        while let Some(event) = events.recv().await {
            match event {
                EndpointEvent::Request(r) => {
                    let session =
                        DialogId::of_incoming_request(&r.req).and_then(|id| self.get(&id));
                    match session {
                        Some(s) => {
                            if let Err(mpsc::error::SendError(SessionInput::Request(r))) =
                                s.send(SessionInput::Request(r))
                            {
                                let resp = message::response_for(&r.req, 481, None, None);
                                ua.respond(&r.tx, resp);
                            }
                        }
                        None => {
                            let in_dialog = DialogId::of_incoming_request(&r.req).is_some();
                            let (code, extra): (u16, Vec<Header>) = match r.req.method {
                                _ if in_dialog => (481, Vec::new()),
                                Method::Options => (200, vec![headers::allow()]),
                                Method::Invite => (603, Vec::new()),
                                _ => (405, vec![headers::allow()]),
                            };
                            tracing::debug!(method = %r.req.method, code, "request outside our sessions");
                            let mut resp = message::response_for(
                                &r.req,
                                code,
                                None,
                                Some(&message::new_tag()),
                            );
                            for h in extra {
                                resp.headers.push(h);
                            }
                            ua.respond(&r.tx, resp);
                        }
                    }
                }
                EndpointEvent::Cancel { req, tx, .. } => {
                    // Every INVITE to us was answered at once (603): nothing left to cancel.
                    ua.respond(&tx, message::response_for(&req, 200, None, None));
                }
                EndpointEvent::Ack { ack, .. } => {
                    if let Some(s) =
                        DialogId::of_incoming_request(&ack).and_then(|id| self.get(&id))
                    {
                        let _ = s.send(SessionInput::Ack(ack));
                    }
                }
                EndpointEvent::StrayResponse { resp, .. } => {
                    let is_2xx = (200..300).contains(&resp.status_code.code());
                    let session = DialogId::of_response(&resp).and_then(|id| self.get(&id));
                    match (is_2xx, session) {
                        (true, Some(s)) => {
                            let _ = s.send(SessionInput::Stray2xx(resp));
                        }
                        _ => tracing::debug!(
                            status = resp.status_code.code(),
                            "stray response dropped"
                        ),
                    }
                }
                EndpointEvent::AckTimeout { tx } => {
                    for s in self.all() {
                        let _ = s.send(SessionInput::AckTimeout(tx.clone()));
                    }
                }
            }
        }
    }
}
