//! The admin API's routes (JSON in, JSON out), under `/api/v1/`:
//!
//! | route | what |
//! |---|---|
//! | `GET /api/v1/sessions` | live sessions: id, Call-ID, subscriber, service, server, seconds so far |
//! | `POST /api/v1/sessions/end` `{"session_id"}` | ends a session (BYE both ways, billed `admin`) |
//! | `GET /api/v1/registrations` | every current binding |
//! | `POST /api/v1/registrations/remove` `{"user", "contact"?}` | removes one binding, or all of a user's |
//! | `POST /api/v1/servers/drain` `{"server"}` | no new session to the server; its live ones finish |
//! | `POST /api/v1/servers/undrain` `{"server"}` | takes it back |
//! | `GET /api/v1/directory` | servers (services, health, load, drain) and services |
//! | `POST /api/v1/reload` | reads the configuration file again ([`crate::reload`]) |
//! | `GET /api/v1/trace…` | a call's ladder, recent messages ([`super::trace_api`]) |

use std::time::{Instant, SystemTime};

use serde::Deserialize;
use serde_json::{json, Value};

use super::http::{HttpRequest, HttpResponse};
use crate::call::driver::routing::SessionInput;
use crate::directory::Strategy;
use crate::relay::Relay;
use crate::reload;

/// Answers one authorized API request.
pub fn route(relay: &Relay, req: &HttpRequest) -> HttpResponse {
    let Some(path) = req.path.strip_prefix("/api/v1/") else {
        return HttpResponse::error(404, "no such route");
    };
    let get = req.method == "GET";
    let post = req.method == "POST";
    if let Some(rest) = path.strip_prefix("trace") {
        if rest.is_empty() || rest.starts_with('/') {
            return super::trace_api::route(relay, req, rest);
        }
    }
    match path {
        "sessions" if get => sessions(relay),
        "sessions/end" if post => with_body(req, |b: EndSession| end_session(relay, &b)),
        "registrations" if get => registrations(relay),
        "registrations/remove" if post => {
            with_body(req, |b: RemoveRegistration| remove_registration(relay, &b))
        }
        "servers/drain" if post => with_body(req, |b: ServerKey| drain(relay, &b.server, true)),
        "servers/undrain" if post => with_body(req, |b: ServerKey| drain(relay, &b.server, false)),
        "directory" if get => directory(relay),
        "reload" if post => reload_answer(relay),
        "sessions"
        | "sessions/end"
        | "registrations"
        | "registrations/remove"
        | "servers/drain"
        | "servers/undrain"
        | "directory"
        | "reload" => HttpResponse::error(405, format!("{} not allowed here", req.method)),
        _ => HttpResponse::error(404, "no such route"),
    }
}

fn with_body<T: for<'de> Deserialize<'de>>(
    req: &HttpRequest,
    f: impl FnOnce(T) -> HttpResponse,
) -> HttpResponse {
    match serde_json::from_slice::<T>(&req.body) {
        Ok(body) => f(body),
        Err(e) => HttpResponse::error(400, format!("bad JSON body: {e}")),
    }
}

/// `{"session_id": …}`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndSession {
    session_id: String,
}

/// `{"user": …, "contact": …}`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveRegistration {
    user: String,
    contact: Option<String>,
}

/// `{"server": …}`: a server's name, account or URI.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerKey {
    server: String,
}

fn sessions(relay: &Relay) -> HttpResponse {
    let now = SystemTime::now();
    let list: Vec<Value> = relay
        .served
        .live_sessions()
        .into_iter()
        .map(|s| {
            let secs = now
                .duration_since(s.started)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            json!({
                "session_id": s.session_id,
                "call_id": s.terminal_call_id,
                "server_call_id": s.server_call_id,
                "subscriber": s.subscriber,
                "service": s.service,
                "server": s.server,
                "duration_secs": secs,
            })
        })
        .collect();
    HttpResponse::json(200, json!({ "sessions": list }))
}

fn end_session(relay: &Relay, body: &EndSession) -> HttpResponse {
    let id = body.session_id.trim();
    let Some(session) = relay
        .served
        .live_sessions()
        .into_iter()
        .find(|s| s.session_id == id)
    else {
        return HttpResponse::error(404, format!("no live session {id}"));
    };
    let input = SessionInput::End {
        session_id: session.session_id.clone(),
    };
    match relay.sessions.deliver(&session.terminal_call_id, input) {
        Ok(()) => {
            tracing::info!(session_id = %session.session_id, call_id = %session.terminal_call_id, "ending a session for an operator");
            HttpResponse::json(
                202,
                json!({ "ending": session.session_id, "call_id": session.terminal_call_id }),
            )
        }
        Err(_) => HttpResponse::error(404, format!("session {id} has just ended")),
    }
}

fn registrations(relay: &Relay) -> HttpResponse {
    let now = Instant::now();
    let list: Vec<Value> = relay
        .registrar
        .all_bindings(now)
        .into_iter()
        .map(|b| {
            json!({
                "user": b.user,
                "contact": b.uri_text,
                "expires_in_secs": b.expires_in(now),
                "source": b.source.map(|p| p.to_string()),
                "services": b.services,
            })
        })
        .collect();
    HttpResponse::json(200, json!({ "registrations": list }))
}

fn remove_registration(relay: &Relay, body: &RemoveRegistration) -> HttpResponse {
    let user = body.user.trim();
    let gone = relay.registrar.remove(user, body.contact.as_deref());
    if gone.is_empty() {
        return HttpResponse::error(404, format!("no such registration of {user}"));
    }
    for binding in &gone {
        // An application server's registration is its directory entry too.
        relay.directory.remove_dynamic(user, &binding.uri_text);
        tracing::info!(user, contact = %binding.uri_text, "registration removed by an operator");
    }
    // Relays sharing a database take the user's remaining bindings, as after a REGISTER.
    if let Some(cluster) = &relay.cluster {
        cluster.publish_bindings(user, &relay.registrar.bindings(user, Instant::now()));
    }
    let contacts: Vec<&str> = gone.iter().map(|b| b.uri_text.as_str()).collect();
    HttpResponse::json(200, json!({ "removed": contacts }))
}

fn drain(relay: &Relay, key: &str, drained: bool) -> HttpResponse {
    let marked = relay.directory.set_drained(key, drained);
    if marked.is_empty() {
        return HttpResponse::error(404, format!("no server named {key}"));
    }
    let servers: Vec<Value> = marked
        .iter()
        .map(|s| {
            json!({
                "name": s.name(),
                "uri": s.uri_text(),
                "drained": s.is_drained(),
                "active_sessions": s.active_sessions(),
            })
        })
        .collect();
    HttpResponse::json(200, json!({ "servers": servers }))
}

fn directory(relay: &Relay) -> HttpResponse {
    let now = Instant::now();
    let servers: Vec<Value> = relay
        .directory
        .servers()
        .into_iter()
        .map(|(s, services)| {
            let origin = s.origin().label();
            json!({
                "name": s.name(),
                "uri": s.uri_text(),
                "origin": origin,
                "account": s.account(),
                "services": services,
                "up": s.is_up(),
                "probed": s.is_probed(),
                "drained": s.is_drained(),
                "active_sessions": s.active_sessions(),
                "capacity": s.capacity(),
                "expires_in_secs": s.expires_at().map(|at| at.saturating_duration_since(now).as_secs()),
            })
        })
        .collect();
    // The configured services, then those only registered servers offer (strategy
    // `first`, as the rules give them).
    let settings = relay.settings();
    let mut named: Vec<(String, &'static str)> = settings
        .config
        .services
        .iter()
        .map(|svc| (svc.name.clone(), svc.strategy.name()))
        .collect();
    for name in relay.directory.services() {
        if !named.iter().any(|(n, _)| *n == name) {
            named.push((name, Strategy::First.name()));
        }
    }
    let services: Vec<Value> = named
        .into_iter()
        .map(|(name, strategy)| {
            let servers: Vec<String> = relay
                .directory
                .servers_of(&name)
                .iter()
                .map(|s| s.name().to_owned())
                .collect();
            json!({ "name": name, "strategy": strategy, "servers": servers })
        })
        .collect();
    HttpResponse::json(200, json!({ "servers": servers, "services": services }))
}

fn reload_answer(relay: &Relay) -> HttpResponse {
    match reload::reload(relay) {
        Ok(done) => HttpResponse::json(
            200,
            json!({
                "reloaded": true,
                "file": done.file.display().to_string(),
                "users": done.users,
                "services": done.services,
                "rules": done.rules,
                "servers_added": done.servers_added,
                "servers_removed": done.servers_removed,
                "restart_needed": done.restart_needed,
            }),
        ),
        Err(refused) => HttpResponse::json(
            422,
            json!({ "reloaded": false, "error": refused.to_string() }),
        ),
    }
}
