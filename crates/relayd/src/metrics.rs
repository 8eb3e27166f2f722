//! The metrics endpoint: `GET /metrics` in the Prometheus text format (version 0.0.4) on the
//! address of `[metrics] listen`, for an operator's scraper or a quick `curl`. Counters come
//! from the transports, the endpoint, the relay, the directory and the billing writer.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::relay::Relay;

/// Renders every metric of the relay in the Prometheus text format.
pub fn render(relay: &Relay) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP relayd_{name} {help}\n# TYPE relayd_{name} {kind}\nrelayd_{name} {value}"
        );
    };
    let t = relay.endpoint.transports().stats();
    metric(
        "messages_received_total",
        "counter",
        "SIP datagrams and stream frames received.",
        t.received.load(Ordering::Relaxed),
    );
    metric(
        "messages_sent_total",
        "counter",
        "SIP messages sent.",
        t.sent.load(Ordering::Relaxed),
    );
    metric(
        "send_errors_total",
        "counter",
        "Sends that failed.",
        t.send_errors.load(Ordering::Relaxed),
    );
    metric(
        "framing_errors_total",
        "counter",
        "Stream connections closed for a framing error.",
        t.framing_errors.load(Ordering::Relaxed),
    );
    metric(
        "tcp_connections_total",
        "counter",
        "TCP connections accepted or opened.",
        t.connections.load(Ordering::Relaxed),
    );
    metric(
        "tcp_connections_open",
        "gauge",
        "TCP connections open (accepted and opened).",
        t.connections_open.load(Ordering::Relaxed),
    );
    metric(
        "tcp_connections_refused_overall_total",
        "counter",
        "TCP connections closed at once: [limits] max_connections reached.",
        t.refused_overall.load(Ordering::Relaxed),
    );
    metric(
        "tcp_connections_refused_per_address_total",
        "counter",
        "TCP connections closed at once: [limits] max_connections_per_address reached.",
        t.refused_per_source.load(Ordering::Relaxed),
    );
    metric(
        "tcp_message_timeouts_total",
        "counter",
        "TCP connections closed: a message not whole within [limits] message_timeout_ms.",
        t.message_timeouts.load(Ordering::Relaxed),
    );
    metric(
        "tcp_idle_closed_total",
        "counter",
        "TCP connections closed after [limits] idle_timeout_secs without a message.",
        t.idle_closed.load(Ordering::Relaxed),
    );
    metric(
        "keepalive_pings_answered_total",
        "counter",
        "Double-CRLF keep-alive pings on stream connections answered with a pong (RFC 5626).",
        t.pings_answered.load(Ordering::Relaxed),
    );
    metric(
        "tcp_write_timeouts_total",
        "counter",
        "TCP connections closed: a write blocked past [limits] write_timeout_ms.",
        t.write_timeouts.load(Ordering::Relaxed),
    );
    metric(
        "tcp_queue_full_closed_total",
        "counter",
        "TCP connections closed: their send queue was full (the peer does not read).",
        t.queue_full.load(Ordering::Relaxed),
    );
    metric(
        "tls_handshake_failures_total",
        "counter",
        "TLS handshakes that failed (an untrusted or missing certificate, a name that does not match) or did not finish within [limits] message_timeout_ms.",
        t.tls_handshake_failures.load(Ordering::Relaxed),
    );
    let e = relay.endpoint.stats();
    metric(
        "rate_limited_total",
        "counter",
        "Requests over [limits] requests_per_second answered 503 with Retry-After.",
        e.rate_limited.load(Ordering::Relaxed),
    );
    metric(
        "rate_dropped_total",
        "counter",
        "Requests over [limits] requests_per_second dropped unanswered.",
        e.rate_dropped.load(Ordering::Relaxed),
    );
    metric(
        "rate_tracked_addresses",
        "gauge",
        "Source addresses whose request rate is tracked ([limits] max_tracked_addresses).",
        relay.endpoint.rate_tracked_sources() as u64,
    );
    metric(
        "sends_dropped_total",
        "counter",
        "Messages dropped because too many were waiting for their sockets.",
        e.sends_dropped.load(Ordering::Relaxed),
    );
    metric(
        "messages_parsed_total",
        "counter",
        "Messages parsed and handed to the transaction layer.",
        e.parsed.load(Ordering::Relaxed),
    );
    metric(
        "malformed_answered_total",
        "counter",
        "Malformed requests answered with 400/501/505/513.",
        e.rejected.load(Ordering::Relaxed),
    );
    metric(
        "malformed_dropped_total",
        "counter",
        "Malformed messages dropped without an answer.",
        e.dropped.load(Ordering::Relaxed),
    );
    metric(
        "overload_refused_total",
        "counter",
        "Requests refused with 503 because the relay was overloaded.",
        e.overloaded.load(Ordering::Relaxed),
    );
    metric(
        "server_transactions_unanswered_total",
        "counter",
        "Requests the relay gave no final response in time: INVITEs answered 408 by the \
         transaction layer (180 s after the request or its last provisional), others dropped \
         after 64*T1.",
        e.unanswered.load(Ordering::Relaxed),
    );
    let r = &relay.stats;
    metric(
        "requests_in_hand",
        "gauge",
        "New out-of-dialog requests being handled (503 past 16384).",
        relay.backlog.len() as u64,
    );
    metric(
        "invites_admitted_total",
        "counter",
        "INVITEs admitted into a call.",
        r.admitted.load(Ordering::Relaxed),
    );
    metric(
        "requests_refused_total",
        "counter",
        "Requests the relay itself refused.",
        r.refused.load(Ordering::Relaxed),
    );
    metric(
        "challenges_total",
        "counter",
        "Digest challenges sent (401/407).",
        r.challenged.load(Ordering::Relaxed),
    );
    let a = relay.auth.stats();
    metric(
        "auth_failures_total",
        "counter",
        "Failed digest answers (wrong password, unknown user, or locked out).",
        a.failures.load(Ordering::Relaxed),
    );
    metric(
        "auth_user_lockouts_total",
        "counter",
        "Times a user was locked out from one source address ([auth] max_failures).",
        a.user_lockouts.load(Ordering::Relaxed),
    );
    metric(
        "auth_sources_refused_total",
        "counter",
        "Times a source address was refused ([auth] source_max_failures).",
        a.sources_refused.load(Ordering::Relaxed),
    );
    metric(
        "auth_source_refusals_total",
        "counter",
        "Requests answered 503 because their source address was refused.",
        a.source_refusals.load(Ordering::Relaxed),
    );
    metric(
        "auth_tracked_sources",
        "gauge",
        "Source addresses with failure counters ([auth] max_tracked_sources).",
        relay.auth.tracked_sources() as u64,
    );
    metric(
        "auth_tracked_user_sources",
        "gauge",
        "(user, source address) pairs with failure counters ([auth] max_tracked_user_sources).",
        relay.auth.tracked_user_sources() as u64,
    );
    metric(
        "auth_counter_evictions_total",
        "counter",
        "Failure counters forgotten to make room in a full table.",
        a.evictions.load(Ordering::Relaxed),
    );
    metric(
        "auth_digest_uri_mismatches_total",
        "counter",
        "Credentials refused with 400: digest uri not the Request-URI.",
        a.uri_mismatches.load(Ordering::Relaxed),
    );
    let l = relay.subscriber_sessions.stats();
    metric(
        "subscriber_limit_refusals_total",
        "counter",
        "INVITEs refused 486 because the subscriber held [[classes]] max_sessions sessions.",
        l.refused.load(Ordering::Relaxed),
    );
    metric(
        "subscriber_limit_fork_answers_dropped_total",
        "counter",
        "Answers of a forked request hung up because the subscriber held its session limit.",
        l.fork_answers_dropped.load(Ordering::Relaxed),
    );
    metric(
        "subscribers_with_sessions",
        "gauge",
        "Subscribers holding at least one session or call in progress.",
        relay.subscriber_sessions.subscribers() as u64,
    );
    metric(
        "sessions_live",
        "gauge",
        "Sessions confirmed and not yet ended.",
        relay.billing.live_sessions() as u64,
    );
    metric(
        "call_ids_routed",
        "gauge",
        "Call-IDs routed to calls in progress (the terminal's and each server leg's).",
        relay.sessions.len() as u64,
    );
    metric(
        "transactions",
        "gauge",
        "SIP transactions alive (client and server): requests in flight, and answered ones kept to absorb retransmissions (Timer J, K...).",
        relay.endpoint.transactions() as u64,
    );
    metric(
        "served_index_entries",
        "gauge",
        "Keys of the served index: three per session that charge requests find in memory (live, until its record is committed).",
        relay.served.len() as u64,
    );
    metric(
        "registered_users",
        "gauge",
        "Users with at least one binding.",
        relay.registrar.user_count() as u64,
    );
    let w = relay.billing.writer_stats();
    metric(
        "billing_commits_total",
        "counter",
        "Billing transactions committed or attempted.",
        w.batches,
    );
    metric(
        "billing_writes_total",
        "counter",
        "Billing requests written.",
        w.ops,
    );
    metric(
        "billing_failed_commits_total",
        "counter",
        "Billing transactions that failed.",
        w.failed_batches,
    );
    if let Some(cluster) = &relay.cluster {
        metric(
            "cluster_changes_dropped_total",
            "counter",
            "Changes not shared with the other relays: too many were waiting for the database.",
            cluster.dropped(),
        );
    }
    let _ = writeln!(out, "# HELP relayd_server_up Whether an application server answers its probes.\n# TYPE relayd_server_up gauge");
    let _ = writeln!(out, "# HELP relayd_server_sessions Sessions on an application server.\n# TYPE relayd_server_sessions gauge");
    for service in relay.directory.services() {
        for server in relay.directory.servers_of(&service) {
            let uri = server.uri_text().replace('"', "");
            let _ = writeln!(
                out,
                "relayd_server_up{{service=\"{service}\",server=\"{uri}\"}} {}",
                u8::from(server.is_up())
            );
            let _ = writeln!(
                out,
                "relayd_server_sessions{{service=\"{service}\",server=\"{uri}\"}} {}",
                server.active_sessions()
            );
        }
    }
    out
}

/// How long the accept loop waits after a failed accept before it tries again.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Accepts connections with `accept` and hands each to `serve`, for ever. A failed accept
/// (EMFILE or ENFILE when the process or the system is out of descriptors, ENOBUFS…) is
/// retried only after [`ACCEPT_BACKOFF`]: the error stays until a descriptor is freed, and
/// retrying at once would spin a core and starve the relay's own tasks of the time they
/// need to free one. The first error of a run is logged at `warn`, the rest at `debug`.
pub async fn accept_loop<S, F, A>(mut accept: A, mut serve: impl FnMut(S, SocketAddr))
where
    A: FnMut() -> F,
    F: std::future::Future<Output = std::io::Result<(S, SocketAddr)>>,
{
    let mut failing = false;
    loop {
        match accept().await {
            Ok((stream, peer)) => {
                failing = false;
                serve(stream, peer);
            }
            Err(e) => {
                if failing {
                    debug!(error = %e, "metrics endpoint: accept failed again");
                } else {
                    warn!(error = %e, backoff_ms = ACCEPT_BACKOFF.as_millis() as u64, "metrics endpoint: accept failed; retrying after a pause");
                }
                failing = true;
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Serves `GET /metrics` on `addr` until the relay stops.
pub async fn serve(relay: Arc<Relay>, addr: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint on {addr}"))?;
    info!(%addr, "metrics endpoint listening");
    accept_loop(
        || listener.accept(),
        |stream, peer| {
            tokio::spawn(answer(relay.clone(), stream, peer));
        },
    )
    .await;
    Ok(())
}

/// Answers one connection to the endpoint.
async fn answer(relay: Arc<Relay>, mut stream: tokio::net::TcpStream, peer: SocketAddr) {
    let mut buf = [0u8; 2048];
    let n = match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
        Ok(Ok(n)) => n,
        _ => return,
    };
    let request = String::from_utf8_lossy(&buf[..n]);
    let (status, body) = if request.starts_with("GET /metrics ") || request.starts_with("GET / ") {
        ("200 OK", render(&relay))
    } else {
        ("404 Not Found", "only GET /metrics is served\n".to_string())
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if let Err(e) = stream.write_all(response.as_bytes()).await {
        debug!(%peer, error = %e, "metrics reply failed");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    /// A listener out of descriptors: every accept fails at once with EMFILE (os error 24).
    /// The loop must wait [`ACCEPT_BACKOFF`] between two tries instead of spinning; on the
    /// paused clock the waits show as time between the tries. (Before the fix the loop
    /// retried at once: five tries at one instant.)
    #[tokio::test(start_paused = true)]
    async fn a_failing_accept_is_retried_after_a_pause_not_at_once() {
        let tries: Rc<RefCell<Vec<tokio::time::Instant>>> = Rc::default();
        let seen = Rc::clone(&tries);
        let accept = move || {
            let seen = Rc::clone(&seen);
            async move {
                let n = {
                    let mut seen = seen.borrow_mut();
                    seen.push(tokio::time::Instant::now());
                    seen.len()
                };
                if n > 5 {
                    // Enough: stay pending, as a quiet listener does.
                    std::future::pending::<()>().await;
                }
                Err::<((), SocketAddr), _>(std::io::Error::from_raw_os_error(24))
            }
        };
        let run = accept_loop(accept, |(), _| {});
        // The paused clock jumps to each timer; a spinning loop never lets it.
        let _ = tokio::time::timeout(Duration::from_secs(10), run).await;
        let tries = tries.borrow();
        assert_eq!(tries.len(), 6, "five failures and the pending sixth try");
        for pair in tries.windows(2) {
            assert!(
                pair[1] - pair[0] >= ACCEPT_BACKOFF,
                "tries {:?} apart",
                pair[1] - pair[0]
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn accepted_connections_are_served_without_a_pause() {
        let mut n = 0u16;
        let accept = move || {
            n += 1;
            let result = if n <= 3 {
                Ok((n, SocketAddr::from(([127, 0, 0, 1], n))))
            } else {
                Err(std::io::Error::from_raw_os_error(24))
            };
            async move { result }
        };
        let served = Rc::new(RefCell::new(Vec::new()));
        let log = Rc::clone(&served);
        let start = tokio::time::Instant::now();
        let _ = tokio::time::timeout(
            Duration::from_millis(50),
            accept_loop(accept, move |s, _| {
                log.borrow_mut().push((s, tokio::time::Instant::now()))
            }),
        )
        .await;
        let served = served.borrow();
        assert_eq!(
            served.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert!(served.iter().all(|(_, at)| *at == start));
    }
}
