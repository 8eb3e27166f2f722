//! `relayd ctl`: the client of the admin API ([`crate::admin`]). It reads the admin address
//! and token from the configuration file's `[admin]`, sends one request per command over
//! HTTP/1.1, and prints the answer as a table (or as JSON with `--json`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::{json, Value};

use crate::admin_config::{AdminConfig, AdminToken};
use crate::cli::CtlCommand;

/// The largest answer `relayd ctl` reads.
const MAX_ANSWER: u64 = 64 * 1024 * 1024;

/// How long `relayd ctl` waits for the relay (a reload reads files: give it time).
const TIMEOUT: Duration = Duration::from_secs(30);

/// The admin address and token of the configuration file `file`'s `[admin]`. Only that
/// section is read (and must be right): the rest of the file may be in the middle of an
/// edit that a `ctl reload` is about to have refused.
pub fn admin_of(file: &Path) -> anyhow::Result<(SocketAddr, AdminToken)> {
    let name = file.display();
    let text = std::fs::read_to_string(file).with_context(|| format!("{name}: cannot read"))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("{name}: not a TOML file"))?;
    let admin: AdminConfig = match table.get("admin") {
        Some(value) => value
            .clone()
            .try_into()
            .map_err(|e| anyhow::anyhow!("{name}: key `admin`: {}", e.to_string().trim()))?,
        None => AdminConfig::default(),
    };
    let Some(addr) = admin.listen else {
        bail!("{name}: no [admin] listen: relayd serves no admin API with this configuration");
    };
    let base = file.parent().unwrap_or(Path::new("."));
    let token = admin
        .load_token(base)
        .map_err(|(key, message)| anyhow::anyhow!("{name}: key `{key}`: {message}"))?
        .with_context(|| format!("{name}: [admin] has no token or token_file"))?;
    Ok((addr, token))
}

/// One API request: method, path and JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiRequest {
    /// `GET` or `POST`.
    pub method: &'static str,
    /// The route.
    pub path: &'static str,
    /// The body of a `POST`.
    pub body: Option<Value>,
}

/// The request a command sends.
pub fn request_of(command: &CtlCommand) -> ApiRequest {
    let get = |path| ApiRequest {
        method: "GET",
        path,
        body: None,
    };
    let post = |path, body| ApiRequest {
        method: "POST",
        path,
        body: Some(body),
    };
    match command {
        CtlCommand::Sessions => get("/api/v1/sessions"),
        CtlCommand::End { session_id } => {
            post("/api/v1/sessions/end", json!({ "session_id": session_id }))
        }
        CtlCommand::Registrations => get("/api/v1/registrations"),
        CtlCommand::Unregister { user, contact } => post(
            "/api/v1/registrations/remove",
            json!({ "user": user, "contact": contact }),
        ),
        CtlCommand::Drain { server } => post("/api/v1/servers/drain", json!({ "server": server })),
        CtlCommand::Undrain { server } => {
            post("/api/v1/servers/undrain", json!({ "server": server }))
        }
        CtlCommand::Directory => get("/api/v1/directory"),
        CtlCommand::Reload => post("/api/v1/reload", json!({})),
    }
}

/// Sends `request` to the admin API at `addr` with `token`; returns the status and the JSON
/// answer.
pub fn send(
    addr: SocketAddr,
    token: &AdminToken,
    request: &ApiRequest,
) -> anyhow::Result<(u16, Value)> {
    send_to(
        addr,
        token,
        request.method,
        request.path,
        request.body.as_ref(),
    )
}

/// Sends `method` `path` (with its query, already encoded) and `body` to the admin API at
/// `addr` with `token`; returns the status and the JSON answer.
pub fn send_to(
    addr: SocketAddr,
    token: &AdminToken,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<(u16, Value)> {
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT).with_context(|| {
        format!("connecting to the admin listener {addr} (is relayd running with [admin] listen?)")
    })?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .context("setting a read timeout")?;
    stream
        .set_write_timeout(Some(TIMEOUT))
        .context("setting a write timeout")?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let head = format!(
        "{} {} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        method,
        path,
        token.expose(),
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body.as_bytes()))
        .with_context(|| format!("sending the request to {addr}"))?;
    let mut answer = Vec::new();
    stream
        .take(MAX_ANSWER)
        .read_to_end(&mut answer)
        .with_context(|| format!("reading the answer of {addr}"))?;
    parse_answer(&answer)
}

/// Reads an HTTP/1.1 answer: its status and JSON body.
pub fn parse_answer(answer: &[u8]) -> anyhow::Result<(u16, Value)> {
    let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        bail!("the relay's answer is not HTTP (no end of head)");
    };
    let head = String::from_utf8_lossy(&answer[..end]);
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("the relay's answer has no status")?;
    let body = &answer[end + 4..];
    let value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(body).context("the relay's answer is not JSON")?
    };
    Ok((status, value))
}

/// The answer as a person reads it: a table, or a line.
pub fn render(command: &CtlCommand, answer: &Value) -> String {
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    };
    let rows = |key: &str, columns: &[&str]| -> String {
        let items = answer[key].as_array().cloned().unwrap_or_default();
        let cells: Vec<Vec<String>> = items
            .iter()
            .map(|item| columns.iter().map(|c| s(&item[*c])).collect())
            .collect();
        table(columns, &cells)
    };
    match command {
        CtlCommand::Sessions => rows(
            "sessions",
            &[
                "session_id",
                "call_id",
                "subscriber",
                "service",
                "server",
                "duration_secs",
            ],
        ),
        CtlCommand::Registrations => rows(
            "registrations",
            &["user", "contact", "expires_in_secs", "source", "services"],
        ),
        CtlCommand::Directory => {
            let mut out = rows(
                "servers",
                &[
                    "name",
                    "uri",
                    "origin",
                    "services",
                    "up",
                    "drained",
                    "active_sessions",
                    "capacity",
                ],
            );
            out.push('\n');
            out.push_str(&rows("services", &["name", "strategy", "servers"]));
            out
        }
        CtlCommand::End { .. } => format!("ending session {}\n", s(&answer["ending"])),
        CtlCommand::Unregister { .. } => format!("removed {}\n", s(&answer["removed"])),
        CtlCommand::Drain { .. } | CtlCommand::Undrain { .. } => {
            rows("servers", &["name", "uri", "drained", "active_sessions"])
        }
        CtlCommand::Reload => {
            let mut out = format!(
                "reloaded {}: {} users, {} services, {} rules; servers +{} -{}\n",
                s(&answer["file"]),
                s(&answer["users"]),
                s(&answer["services"]),
                s(&answer["rules"]),
                s(&answer["servers_added"]),
                s(&answer["servers_removed"]),
            );
            let restart = s(&answer["restart_needed"]);
            if !restart.is_empty() {
                out.push_str(&format!(
                    "changed but only in force after a restart: {restart}\n"
                ));
            }
            out
        }
    }
}

/// Columns aligned on the widest cell, a header first.
fn table(columns: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = columns.iter().map(|c| c.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let mut text = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        text.truncate(text.trim_end().len());
        text.push('\n');
        text
    };
    let mut out = line(columns.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// The message of an API refusal: its `error`, else the status.
pub fn refusal(status: u16, answer: &Value) -> String {
    match answer["error"].as_str() {
        Some(error) => format!("the relay refused ({status}): {error}"),
        None => format!("the relay answered {status}"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn an_answer_is_read_as_status_and_json() {
        let (status, body) = parse_answer(
            b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 13\r\n\r\n{\"error\":\"x\"}",
        )
        .unwrap();
        assert_eq!(status, 401);
        assert_eq!(refusal(status, &body), "the relay refused (401): x");
        assert!(parse_answer(b"garbage").is_err());
    }

    #[test]
    fn sessions_print_as_an_aligned_table() {
        let answer = json!({ "sessions": [
            { "session_id": "s-1", "call_id": "c", "subscriber": "alice", "service": "echo",
              "server": "sip:127.0.0.1:5080", "duration_secs": 12 }
        ]});
        let text = render(&CtlCommand::Sessions, &answer);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("session_id  call_id  subscriber"));
        assert!(lines[1].starts_with("s-1         c        alice"));
        assert!(lines[1].ends_with("12"));
    }

    #[test]
    fn the_admin_section_alone_is_read_and_a_bad_one_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("relayd.toml");
        std::fs::write(dir.path().join("admin.token"), "0123456789abcdef\n").unwrap();
        // The rest of the file is wrong (an unknown key): ctl does not mind.
        std::fs::write(
            &file,
            "nonsense = 1\n[admin]\nlisten = \"127.0.0.1:7070\"\ntoken_file = \"admin.token\"\n",
        )
        .unwrap();
        let (addr, token) = admin_of(&file).unwrap();
        assert_eq!(addr.port(), 7070);
        assert_eq!(token.expose(), "0123456789abcdef");
        std::fs::write(&file, "[admin]\nlisten = \"127.0.0.1:7070\"\n").unwrap();
        let e = format!("{:#}", admin_of(&file).unwrap_err());
        assert!(e.contains("relayd.toml") && e.contains("token"), "{e}");
        std::fs::write(&file, "[admin]\nlisten = 5\n").unwrap();
        let e = format!("{:#}", admin_of(&file).unwrap_err());
        assert!(e.contains("key `admin`"), "{e}");
    }

    #[test]
    fn each_command_asks_its_route() {
        let end = request_of(&CtlCommand::End {
            session_id: "s-1".into(),
        });
        assert_eq!((end.method, end.path), ("POST", "/api/v1/sessions/end"));
        assert_eq!(end.body, Some(json!({ "session_id": "s-1" })));
        assert_eq!(request_of(&CtlCommand::Directory).method, "GET");
    }
}
