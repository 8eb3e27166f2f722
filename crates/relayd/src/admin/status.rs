//! The status page (`GET /` or `GET /status` on the admin listener): live sessions,
//! registrations, the directory with each server's health and load, the latest failed
//! calls with their ladders, and the billing totals of the day (UTC). Plain HTML with the
//! ladders as inline SVG, no script (the response's Content-Security-Policy allows none);
//! it reloads itself every [`REFRESH_SECS`] seconds. Every value is escaped
//! ([`crate::markup::escape`]): a subscriber's name or a Call-ID is chosen by a stranger.

use std::fmt::Write as _;
use std::time::{Instant, SystemTime};

use billing::report::{self, GroupBy};
use billing::store::Period;

use super::http::HttpResponse;
use crate::billing_control;
use crate::markup::escape;
use crate::relay::Relay;
use crate::trace::ladder::Ladder;
use crate::trace::svg;

/// How often the page reloads itself.
pub const REFRESH_SECS: u32 = 5;

/// How many failed calls the page draws.
pub const FAILURES_SHOWN: usize = 5;

/// The page.
pub fn page(relay: &Relay) -> HttpResponse {
    let mut html = String::new();
    let _ = write!(
        html,
        r#"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_SECS}"><title>relayd {realm}</title><style>body{{font-family:sans-serif;margin:1em}}table{{border-collapse:collapse;margin-bottom:1em}}td,th{{border:1px solid #ccc;padding:2px 6px;text-align:left}}.down{{color:#c00}}.up{{color:#080}}</style></head><body><h1>relayd {realm}</h1><p>at {now} UTC; reloads every {REFRESH_SECS} s</p>"#,
        realm = escape(&relay.realm),
        now = crate::trace::ladder::clock(SystemTime::now()),
    );
    sessions(relay, &mut html);
    registrations(relay, &mut html);
    directory(relay, &mut html);
    failures(relay, &mut html);
    billing_totals(relay, &mut html);
    html.push_str("</body></html>");
    HttpResponse::page(200, "text/html; charset=utf-8", html)
}

fn table(html: &mut String, id: &str, title: &str, columns: &[&str], rows: Vec<Vec<String>>) {
    let _ = write!(html, r#"<h2>{title}</h2><table id="{id}"><tr>"#);
    for c in columns {
        let _ = write!(html, "<th>{c}</th>");
    }
    html.push_str("</tr>");
    if rows.is_empty() {
        let _ = write!(
            html,
            r#"<tr><td colspan="{}">none</td></tr>"#,
            columns.len()
        );
    }
    for row in rows {
        html.push_str("<tr>");
        for cell in row {
            let _ = write!(html, "<td>{}</td>", escape(&cell));
        }
        html.push_str("</tr>");
    }
    html.push_str("</table>");
}

fn sessions(relay: &Relay, html: &mut String) {
    let now = SystemTime::now();
    let rows = relay
        .served
        .live_sessions()
        .into_iter()
        .map(|s| {
            let secs = now.duration_since(s.started).map_or(0, |d| d.as_secs());
            vec![
                s.subscriber,
                s.service,
                s.server,
                format!("{}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60),
                s.terminal_call_id,
                s.session_id,
            ]
        })
        .collect();
    table(
        html,
        "sessions",
        "Live sessions",
        &[
            "subscriber",
            "service",
            "server",
            "duration",
            "Call-ID",
            "session",
        ],
        rows,
    );
}

fn registrations(relay: &Relay, html: &mut String) {
    let now = Instant::now();
    let rows = relay
        .registrar
        .all_bindings(now)
        .into_iter()
        .map(|b| {
            vec![
                b.user.to_string(),
                b.uri_text.to_string(),
                format!("{} s", b.expires_in(now)),
                b.source.map(|p| p.to_string()).unwrap_or_default(),
            ]
        })
        .collect();
    table(
        html,
        "registrations",
        "Registrations",
        &["user", "contact", "expires in", "from"],
        rows,
    );
}

fn directory(relay: &Relay, html: &mut String) {
    let rows = relay
        .directory
        .servers()
        .into_iter()
        .map(|(s, services)| {
            let origin = s.origin().label();
            let health = match (s.is_up(), s.is_drained()) {
                (_, true) => "drained",
                (true, false) => "up",
                (false, false) => "down",
            };
            let capacity = s.capacity().map_or("-".to_owned(), |c| c.to_string());
            vec![
                s.name().to_owned(),
                s.uri_text().to_owned(),
                origin.to_owned(),
                services.join(", "),
                health.to_owned(),
                format!("{} / {capacity}", s.active_sessions()),
            ]
        })
        .collect();
    table(
        html,
        "directory",
        "Directory",
        &[
            "server",
            "URI",
            "origin",
            "services",
            "health",
            "sessions / capacity",
        ],
        rows,
    );
}

fn failures(relay: &Relay, html: &mut String) {
    html.push_str(r#"<h2>Recent failures</h2><div id="failures">"#);
    let Some(trace) = &relay.trace else {
        html.push_str("<p>the trace is off ([trace] messages = 0)</p></div>");
        return;
    };
    let failed = trace.recent_failures(FAILURES_SHOWN);
    if failed.is_empty() {
        html.push_str("<p>none in the trace</p>");
    }
    for call_id in failed {
        let (ids, entries) = trace.call(&call_id);
        let ladder = Ladder::build(ids, &entries);
        let _ = write!(
            html,
            r#"<h3>call {}</h3>{}"#,
            escape(&call_id),
            svg::render(&ladder)
        );
    }
    html.push_str("</div>");
}

fn billing_totals(relay: &Relay, html: &mut String) {
    let now_ms = billing_control::unix_ms(SystemTime::now());
    let day_ms = 86_400_000;
    let since = now_ms - now_ms.rem_euclid(day_ms);
    let title = format!(
        "Billing totals of the day ({} UTC)",
        report::rfc3339(since).get(..10).unwrap_or("")
    );
    let result = billing_control::open_read_only(
        &relay.config.storage.billing_backend(),
        &relay.config.file_name(),
    )
    .and_then(|store| {
        let period = Period::new(since, now_ms + 1)?;
        Ok(report::totals(&store, period, GroupBy::Service)?)
    });
    match result {
        Ok(totals) => {
            let rows = totals
                .into_iter()
                .map(|t| {
                    vec![
                        t.key,
                        t.sessions.to_string(),
                        format!("{} s", t.session_ms / 1000),
                        t.charges.to_string(),
                        format!("{} {}", t.total_minor, t.currency),
                    ]
                })
                .collect();
            table(
                html,
                "billing",
                &escape(&title),
                &[
                    "service",
                    "sessions",
                    "duration",
                    "charges",
                    "total (minor units)",
                ],
                rows,
            );
        }
        Err(e) => {
            let _ = write!(
                html,
                r#"<h2>{}</h2><p id="billing">not available: {}</p>"#,
                escape(&title),
                escape(&format!("{e:#}"))
            );
        }
    }
}
