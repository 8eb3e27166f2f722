//! The admin listener (`[admin]`, see [`crate::admin_config`]): JSON over HTTP/1.1 for
//! `relayd ctl` and operators' scripts, one request per connection.
//!
//! Every request must carry `Authorization: Bearer <token>` ([`bearer`]); without it, or
//! with another token, the answer is 401 and nothing else is looked at. A stranger gets no
//! more than [`http::Bounds`] of memory and time per connection, and at most
//! `[admin] max_connections` connections at once (more are closed at once). The token is
//! never logged.
//!
//! Routes live in [`api`] (`/api/v1/…`, the trace's in [`trace_api`]); the status page
//! ([`status`]) is `GET /` or `GET /status`, and there alone the token may come in the
//! query (`?token=`), for a browser.

pub mod api;
pub mod bearer;
pub mod http;
pub mod query;
pub mod status;
pub mod trace_api;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::admin_config::AdminToken;
use crate::metrics::accept_loop;
use crate::relay::Relay;
use http::{Bounds, HttpRequest, HttpResponse};

/// Serves the admin API on `addr` until the relay stops.
pub async fn serve(
    relay: Arc<Relay>,
    addr: SocketAddr,
    token: AdminToken,
    max_connections: usize,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the admin listener on {addr}"))?;
    info!(addr = %listener.local_addr().unwrap_or(addr), "admin listener listening");
    let token = Arc::new(token);
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    accept_loop(
        || listener.accept(),
        |stream: TcpStream, peer| {
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                debug!(%peer, "admin connection refused: too many at once");
                drop(stream);
                return;
            };
            let relay = Arc::clone(&relay);
            let token = Arc::clone(&token);
            tokio::spawn(async move {
                connection(relay, stream, peer, &token).await;
                drop(slot);
            });
        },
    )
    .await;
    Ok(())
}

/// Reads one request off `stream`, answers it, and closes.
async fn connection(
    relay: Arc<Relay>,
    mut stream: TcpStream,
    peer: SocketAddr,
    token: &AdminToken,
) {
    let response = match http::read_request(&mut stream, &Bounds::default()).await {
        Ok(req) => answer(relay, req, peer, token).await,
        Err(e) => {
            debug!(%peer, error = %e, "admin request not read");
            match e.status() {
                Some(status) => HttpResponse::error(status, e.to_string()),
                None => return,
            }
        }
    };
    if let Err(e) = http::write_response(&mut stream, &response).await {
        debug!(%peer, error = %e, "admin reply failed");
    }
}

/// The answer to an authorized-or-not request.
async fn answer(
    relay: Arc<Relay>,
    req: HttpRequest,
    peer: SocketAddr,
    token: &AdminToken,
) -> HttpResponse {
    // The status page may take the token from its URL (`?token=`): a browser cannot send
    // a bearer header by itself. Only there; the query is never logged.
    let page = matches!(req.path.as_str(), "/" | "/status");
    let in_query = page
        && query::param(&req.query, "token")
            .is_some_and(|t| bearer::constant_time_eq(t.as_bytes(), token.expose().as_bytes()));
    if !in_query && !bearer::authorized(req.header("authorization"), token) {
        // Neither the header nor the token is logged; at `info`, as the SIP digest
        // failures are, so that a stranger's stream of refusals does not fill the log.
        info!(%peer, method = %req.method, path = %req.path, "admin request without a valid token refused");
        return HttpResponse::error(401, "a valid bearer token is required");
    }
    debug!(%peer, method = %req.method, path = %req.path, "admin request");
    // A route may read files (a reload) or walk every session: off the async threads.
    let work = move || {
        if page {
            if req.method == "GET" {
                status::page(&relay)
            } else {
                HttpResponse::error(405, format!("{} not allowed here", req.method))
            }
        } else {
            api::route(&relay, &req)
        }
    };
    match tokio::task::spawn_blocking(work).await {
        Ok(response) => response,
        Err(e) => {
            warn!(error = %e, "admin request failed");
            HttpResponse::error(503, "the request failed; see the relay's log")
        }
    }
}
