//! The trace's routes of the admin API:
//!
//! | route | what |
//! |---|---|
//! | `GET /api/v1/trace/{call-id}` | one call's ladder (either leg's Call-ID, percent-encoded): its Call-IDs, entries, the ladder as text and as SVG |
//! | `GET /api/v1/trace?after=N&limit=M` | at most M (≤ 500) entries numbered after N, and `next`, the cursor to ask after next; without `after`, no entries and the newest number (where `relayd trace --follow` starts) |

use std::time::UNIX_EPOCH;

use serde_json::{json, Value};

use super::http::{HttpRequest, HttpResponse};
use super::query;
use crate::relay::Relay;
use crate::trace::ladder::Ladder;
use crate::trace::ring::{Direction, Entry, Event};
use crate::trace::{svg, text};

/// The most entries one `after` request gives.
pub const MAX_PAGE: usize = 500;

/// Answers `GET /api/v1/trace…`; `rest` is the path after `trace`.
pub fn route(relay: &Relay, req: &HttpRequest, rest: &str) -> HttpResponse {
    if req.method != "GET" {
        return HttpResponse::error(405, format!("{} not allowed here", req.method));
    }
    let Some(trace) = &relay.trace else {
        return HttpResponse::error(409, "the trace is off ([trace] messages = 0)");
    };
    if rest.is_empty() {
        let limit = query::param(&req.query, "limit")
            .and_then(|l| l.parse::<usize>().ok())
            .unwrap_or(MAX_PAGE)
            .min(MAX_PAGE);
        let Some(after) = query::param(&req.query, "after") else {
            let newest = trace.newest();
            return HttpResponse::json(200, json!({ "entries": [], "next": newest }));
        };
        let Ok(after) = after.parse::<u64>() else {
            return HttpResponse::error(400, "after: not a number");
        };
        let (entries, next) = trace.after(after, limit);
        let list: Vec<Value> = entries.iter().map(entry_json).collect();
        return HttpResponse::json(200, json!({ "entries": list, "next": next }));
    }
    let Some(call_id) = rest.strip_prefix('/').and_then(query::decode) else {
        return HttpResponse::error(400, "the Call-ID is not percent-encoded UTF-8");
    };
    let (ids, entries) = trace.call(&call_id);
    if entries.is_empty() {
        return HttpResponse::error(404, format!("no trace of call {call_id}"));
    }
    let list: Vec<Value> = entries.iter().map(entry_json).collect();
    let ladder = Ladder::build(ids.clone(), &entries);
    HttpResponse::json(
        200,
        json!({
            "call_ids": ids,
            "entries": list,
            "text": text::render(&ladder),
            "svg": svg::render(&ladder),
        }),
    )
}

/// One entry as JSON.
pub fn entry_json(entry: &Entry) -> Value {
    let at_ms = entry
        .at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    match &entry.event {
        Event::Message(m) => json!({
            "seq": entry.seq,
            "at_ms": at_ms,
            "kind": "message",
            "direction": match m.direction { Direction::In => "in", Direction::Out => "out" },
            "peer": m.peer.to_string(),
            "call_id": &*m.call_id,
            "label": m.start.label(),
            "cseq": &*m.cseq,
            "bytes": m.len,
            "raw": String::from_utf8_lossy(&m.raw),
        }),
        Event::Decision { call_id, text } => json!({
            "seq": entry.seq,
            "at_ms": at_ms,
            "kind": "decision",
            "call_id": &**call_id,
            "text": &**text,
        }),
        Event::Link { call, leg } => json!({
            "seq": entry.seq,
            "at_ms": at_ms,
            "kind": "link",
            "call_id": &**call,
            "leg": &**leg,
        }),
    }
}
