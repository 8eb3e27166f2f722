//! `relayd trace`: a recent call's ladder from the running relay's trace, through its admin
//! API (the address and token of the configuration file's `[admin]`, as `relayd ctl`); or,
//! with `--follow`, new messages and decisions as they happen, by asking for what came
//! after a cursor twice a second (each answer at most [`crate::admin::trace_api::MAX_PAGE`]
//! entries).

use std::io::Write;
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use serde_json::Value;

use crate::admin::query::encode;
use crate::cli::TraceArgs;
use crate::ctl;
use crate::trace::ladder::clock;

/// How often `--follow` asks for new entries.
const POLL: Duration = Duration::from_millis(500);

/// Runs `relayd trace` with the configuration file `file`, writing to `out`.
pub fn run(file: &Path, args: &TraceArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let (addr, token) = ctl::admin_of(file)?;
    let get = |path: &str| -> anyhow::Result<Value> {
        let (status, answer) = ctl::send_to(addr, &token, "GET", path, None)?;
        if !(200..300).contains(&status) {
            bail!("{}", ctl::refusal(status, &answer));
        }
        Ok(answer)
    };
    if let Some(call_id) = &args.call_id {
        let answer = get(&format!("/api/v1/trace/{}", encode(call_id)))?;
        let key = if args.svg { "svg" } else { "text" };
        let Some(drawn) = answer[key].as_str() else {
            bail!("the relay's answer has no {key} ladder");
        };
        writeln!(out, "{}", drawn.trim_end()).context("writing the ladder")?;
        return Ok(());
    }
    let mut cursor = get("/api/v1/trace")?["next"].as_u64().unwrap_or(0);
    loop {
        let answer = get(&format!("/api/v1/trace?after={cursor}"))?;
        if let Some(entries) = answer["entries"].as_array() {
            for entry in entries {
                writeln!(out, "{}", line(entry)).context("writing an entry")?;
            }
        }
        out.flush().context("writing an entry")?;
        let next = answer["next"].as_u64().unwrap_or(cursor);
        let full = answer["entries"]
            .as_array()
            .is_some_and(|e| e.len() >= crate::admin::trace_api::MAX_PAGE);
        cursor = next;
        if !full {
            std::thread::sleep(POLL);
        }
    }
}

/// One entry as a line: time, Call-ID, then the message's direction, peer, label and CSeq,
/// or the decision.
pub fn line(entry: &Value) -> String {
    let s = |key: &str| entry[key].as_str().unwrap_or("").to_owned();
    let at = UNIX_EPOCH + Duration::from_millis(entry["at_ms"].as_u64().unwrap_or(0));
    let time = clock(at);
    match entry["kind"].as_str() {
        Some("message") => {
            let arrow = if s("direction") == "in" { "<-" } else { "->" };
            format!(
                "{time}  {}  {arrow} {}  {}  [{}]",
                s("call_id"),
                s("peer"),
                s("label"),
                s("cseq")
            )
        }
        Some("decision") => format!("{time}  {}  * {}", s("call_id"), s("text")),
        Some("link") => format!("{time}  {}  leg {}", s("call_id"), s("leg")),
        _ => format!("{time}  {entry}"),
    }
}
