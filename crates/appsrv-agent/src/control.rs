//! The control API: the application server's voice, over HTTP/1.1 on a loopback address
//! (`control.listen`), every request carrying `Authorization: Bearer <control.token>`
//! (`docs/protocol.md`, "Control API"). Each route is one verb of [`AgentHandle`]:
//!
//! | request | answer |
//! |---|---|
//! | `GET /v1/sessions` | `200 {"sessions": [SessionInfo…]}` |
//! | `GET /v1/sessions/{id}` | `200 SessionInfo`, `404` |
//! | `POST /v1/sessions/{id}/end` (body optional: `{"reason": "…"}`) | `200 {"session_id", "ended": true, "bye_status"}` once the relay answered the BYE, `404` |
//! | `POST /v1/charges` (body: [`AppCharge`]) | `200` receipt `confirmed`, `202` receipt `pending`, `400`, `404`, `409`, `422` |
//! | `GET /v1/events[?session_id=…]` | `200`, then one JSON [`crate::events::SessionEvent`] per line as they happen |
//!
//! `{id}` is the session id percent-encoded (Call-IDs hold `@`). Errors are
//! `{"error": "<kind>", "message": "…"}`. A request without the token, or with another, gets
//! `401` before anything else is looked at (the token is compared in constant time). At most
//! [`MAX_CONNECTIONS`] connections are served at once; a request must arrive within
//! [`REQUEST_TIMEOUT`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, watch, Semaphore};
use tracing::{debug, info, warn};

use crate::app_charge::{AppCharge, ChargeError, ReceiptStatus};
use crate::config::Secret;
use crate::handle::AgentHandle;
use crate::http::{self, HttpError, Request};
use crate::session::HangUpError;

/// Connections served at once; more are answered `503` and closed.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The control API's listener.
pub struct ControlServer {
    listener: TcpListener,
    shared: Arc<Shared>,
}

struct Shared {
    token: Secret,
    handle: AgentHandle,
    slots: Semaphore,
}

impl ControlServer {
    /// Listens on `addr` (a loopback address; the configuration checks it).
    pub async fn bind(
        addr: SocketAddr,
        token: Secret,
        handle: AgentHandle,
    ) -> std::io::Result<ControlServer> {
        Ok(ControlServer {
            listener: TcpListener::bind(addr).await?,
            shared: Arc::new(Shared {
                token,
                handle,
                slots: Semaphore::new(MAX_CONNECTIONS),
            }),
        })
    }

    /// The address listened on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` turns true; event streams end then too.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let shared = self.shared.clone();
                        let stop = shutdown.clone();
                        tokio::spawn(async move { serve(shared, stream, peer, stop).await });
                    }
                    Err(e) => {
                        warn!(error = %e, "control API accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Whether two byte strings are equal, in a time that depends on their lengths only.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = given.len() ^ expected.len();
    for (i, e) in expected.iter().enumerate() {
        let g = given.get(i).copied().unwrap_or(0);
        diff |= usize::from(g ^ e);
    }
    diff == 0
}

fn authorized(req: &Request, token: &Secret) -> bool {
    let Some(value) = req.header("authorization") else {
        return false;
    };
    let Some((scheme, given)) = value.split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer")
        && same_secret(given.trim().as_bytes(), token.expose().as_bytes())
}

/// An answer: status and JSON body.
struct Answer {
    status: u16,
    body: serde_json::Value,
}

fn error(status: u16, kind: &str, message: impl Into<String>) -> Answer {
    Answer {
        status,
        body: serde_json::json!({"error": kind, "message": message.into()}),
    }
}

fn ok(status: u16, body: impl serde::Serialize) -> Answer {
    match serde_json::to_value(body) {
        Ok(body) => Answer { status, body },
        Err(e) => error(500, "internal", e.to_string()),
    }
}

async fn write_answer(stream: &mut TcpStream, answer: Answer, extra: &[(&str, &str)]) {
    let body = serde_json::to_vec(&answer.body).unwrap_or_default();
    let bytes = http::json_response(answer.status, extra, &body);
    if let Err(e) = stream.write_all(&bytes).await {
        debug!(error = %e, "control API answer not written");
    }
    let _ = stream.shutdown().await;
}

async fn serve(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
) {
    let Ok(_slot) = shared.slots.try_acquire() else {
        warn!(%peer, "control API busy: connection refused");
        write_answer(&mut stream, error(503, "busy", "too many connections"), &[]).await;
        return;
    };
    let req = match tokio::time::timeout(REQUEST_TIMEOUT, http::read_request(&mut stream)).await {
        Ok(Ok(req)) => req,
        Ok(Err(HttpError::Closed)) => return,
        Ok(Err(e)) => {
            write_answer(
                &mut stream,
                error(e.status(), "bad-request", e.to_string()),
                &[],
            )
            .await;
            return;
        }
        Err(_) => {
            write_answer(
                &mut stream,
                error(408, "timeout", "no request in time"),
                &[],
            )
            .await;
            return;
        }
    };
    if !authorized(&req, &shared.token) {
        warn!(%peer, method = %req.method, path = %req.path, "control API request without the token refused");
        write_answer(
            &mut stream,
            error(401, "unauthorized", "missing or wrong bearer token"),
            &[("WWW-Authenticate", "Bearer realm=\"appsrv-agent\"")],
        )
        .await;
        return;
    }
    debug!(%peer, method = %req.method, path = %req.path, "control API request");
    let segments: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    let answer = match (req.method.as_str(), segments.as_slice()) {
        ("GET", ["v1", "events"]) => {
            return stream_events(&shared.handle, stream, &req, shutdown).await;
        }
        ("GET", ["v1", "sessions"]) => match shared.handle.sessions().await {
            Ok(list) => ok(200, serde_json::json!({ "sessions": list })),
            Err(e) => error(503, "stopping", e.to_string()),
        },
        ("GET", ["v1", "sessions", id]) => match http::percent_decode(id) {
            None => error(400, "bad-request", "malformed session id"),
            Some(id) => match shared.handle.session(&id).await {
                Ok(Some(info)) => ok(200, info),
                Ok(None) => error(404, "unknown-session", format!("no live session {id:?}")),
                Err(e) => error(503, "stopping", e.to_string()),
            },
        },
        ("POST", ["v1", "sessions", id, "end"]) => match http::percent_decode(id) {
            None => error(400, "bad-request", "malformed session id"),
            Some(id) => end_session(&shared.handle, &req, &id).await,
        },
        ("POST", ["v1", "charges"]) => charge(&shared.handle, &req).await,
        (_, ["v1", "events"]) | (_, ["v1", "sessions"]) | (_, ["v1", "sessions", _]) => {
            error(405, "method-not-allowed", "use GET")
        }
        (_, ["v1", "charges"]) | (_, ["v1", "sessions", _, "end"]) => {
            error(405, "method-not-allowed", "use POST")
        }
        _ => error(404, "not-found", format!("no route {}", req.path)),
    };
    write_answer(&mut stream, answer, &[]).await;
}

/// The JSON body of a request; `Ok(None)` for no body.
fn json_body<T: serde::de::DeserializeOwned>(req: &Request) -> Result<Option<T>, Answer> {
    if req.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let is_json = req
        .header("content-type")
        .and_then(|ct| ct.split(';').next())
        .is_some_and(|ct| ct.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(error(
            415,
            "unsupported-media-type",
            "send the body as Content-Type: application/json",
        ));
    }
    serde_json::from_slice(&req.body)
        .map(Some)
        .map_err(|e| error(400, "invalid", format!("malformed body: {e}")))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EndBody {
    #[serde(default)]
    reason: Option<String>,
}

async fn end_session(handle: &AgentHandle, req: &Request, id: &str) -> Answer {
    let body: Option<EndBody> = match json_body(req) {
        Ok(b) => b,
        Err(answer) => return answer,
    };
    let reason: String = body
        .and_then(|b| b.reason)
        .unwrap_or_else(|| "asked through the control API".to_string())
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    match handle.hang_up(id, &reason).await {
        Ok(status) => {
            info!(call_id = %id, bye_status = ?status, "session ended through the control API");
            ok(
                200,
                serde_json::json!({"session_id": id, "ended": true, "bye_status": status}),
            )
        }
        Err(e @ HangUpError::NotFound(_)) => error(404, "unknown-session", e.to_string()),
        Err(e @ HangUpError::Bye(_)) => error(502, "bye-failed", e.to_string()),
        Err(e @ HangUpError::Stopped) => error(503, "stopping", e.to_string()),
    }
}

async fn charge(handle: &AgentHandle, req: &Request) -> Answer {
    let charge: AppCharge = match json_body(req) {
        Ok(Some(c)) => c,
        Ok(None) => return error(400, "invalid", "the charge is the request's JSON body"),
        Err(answer) => return answer,
    };
    match handle.charge(charge).await {
        Ok(receipt) => {
            let status = match receipt.status {
                ReceiptStatus::Confirmed => 200,
                ReceiptStatus::Pending => 202,
            };
            ok(status, receipt)
        }
        Err(e) => {
            let (status, kind) = match &e {
                ChargeError::Invalid(_) => (400, "invalid"),
                ChargeError::UnknownSession(_) => (404, "unknown-session"),
                ChargeError::SubscriberMismatch { .. } => (409, "subscriber-mismatch"),
                ChargeError::EventIdReused(_) => (409, "event-id-reused"),
                ChargeError::Refused { .. } => (422, "refused-by-relay"),
                ChargeError::Stopped => (503, "stopping"),
            };
            let mut answer = error(status, kind, e.to_string());
            if let ChargeError::Refused { status, reason } = &e {
                answer.body["relay_status"] = (*status).into();
                answer.body["relay_reason"] = reason.clone().into();
            }
            answer
        }
    }
}

/// The `session_id` of a query string, percent-decoded.
fn session_filter(query: Option<&str>) -> Result<Option<String>, Answer> {
    let Some(query) = query else {
        return Ok(None);
    };
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "session_id" => {
                return http::percent_decode(value)
                    .map(Some)
                    .ok_or_else(|| error(400, "bad-request", "malformed session_id"));
            }
            "" => {}
            other => {
                return Err(error(
                    400,
                    "bad-request",
                    format!("unknown parameter {other:?}"),
                ))
            }
        }
    }
    Ok(None)
}

async fn stream_events(
    handle: &AgentHandle,
    mut stream: TcpStream,
    req: &Request,
    mut shutdown: watch::Receiver<bool>,
) {
    let filter = match session_filter(req.query.as_deref()) {
        Ok(f) => f,
        Err(answer) => return write_answer(&mut stream, answer, &[]).await,
    };
    let mut events = handle.events();
    if stream.write_all(http::stream_head()).await.is_err() {
        return;
    }
    let (mut rd, mut wr) = stream.split();
    let mut sink = [0u8; 256];
    loop {
        let line = tokio::select! {
            event = events.recv() => match event {
                Ok(e) if filter.as_deref().is_some_and(|f| f != e.session_id()) => continue,
                Ok(e) => serde_json::to_vec(&e).unwrap_or_default(),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    serde_json::to_vec(&serde_json::json!({"event": "lagged", "missed": n}))
                        .unwrap_or_default()
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            // The client closed (or sent something): the stream is over.
            read = rd.read(&mut sink) => match read {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            },
            _ = shutdown.changed() => break,
        };
        let mut line = line;
        line.push(b'\n');
        if wr.write_all(&line).await.is_err() {
            break;
        }
    }
    let _ = wr.shutdown().await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!same_secret(b"0123456789abcdeF", b"0123456789abcdef"));
        assert!(!same_secret(b"0123456789abcde", b"0123456789abcdef"));
        assert!(!same_secret(b"0123456789abcdef0", b"0123456789abcdef"));
        assert!(!same_secret(b"", b"0123456789abcdef"));
    }

    #[test]
    fn only_the_bearer_token_is_accepted() {
        let token = Secret("0123456789abcdef".into());
        let req = |auth: Option<&str>| Request {
            method: "GET".into(),
            path: "/v1/sessions".into(),
            query: None,
            headers: auth
                .map(|a| vec![("authorization".to_string(), a.to_string())])
                .unwrap_or_default(),
            body: Vec::new(),
        };
        assert!(authorized(&req(Some("Bearer 0123456789abcdef")), &token));
        assert!(authorized(&req(Some("bearer  0123456789abcdef")), &token));
        assert!(!authorized(&req(None), &token));
        assert!(!authorized(&req(Some("Bearer wrong")), &token));
        assert!(!authorized(&req(Some("Basic 0123456789abcdef")), &token));
        assert!(!authorized(&req(Some("0123456789abcdef")), &token));
    }

    #[test]
    fn the_event_filter_reads_a_session_id() {
        assert_eq!(session_filter(None).ok(), Some(None));
        assert_eq!(
            session_filter(Some("session_id=a%40b")).ok(),
            Some(Some("a@b".to_string()))
        );
        assert!(session_filter(Some("other=1")).is_err());
    }
}
