//! The status page and the trace across processes (issue 16): relayd run as a program with
//! an `[admin]` listener and its `[trace]` on, sipp as a terminal holding a session and as
//! an application server.
//!
//! * headless Chromium (Debian's `chromium`) loads the status page while the call is live,
//!   and the DOM it built shows the session's subscriber, service and server, the directory
//!   and the registration; a Call-ID a stranger chose (markup in it) is shown as text in the
//!   recent failures' ladder, not run; the page refuses a missing or wrong token and the
//!   token in its URL is never logged;
//! * `relayd trace CALL-ID` prints the live call's ladder, both legs and the decisions;
//! * `relayd trace --follow` prints a new message as it comes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

use support::ports::free_port;
use support::relay::{relayd_cmd, server_uri, RelayConfig, ServerSpec};
use support::scene::Scene;
use support::sip::options_ping;
use support::sipp::{Sipp, Transport};
use support::{wait_until, ALICE, STEP};

/// The bearer token of the test relay, in `admin.token` beside its configuration.
const TOKEN: &str = "status-page-token-4b1d0e77";

/// A Call-ID with markup in it (legal in a Call-ID: RFC 3261 §25.1 `word`).
const EVIL_CALL_ID: &str = "<script>document.title='owned'</script><img/src=x>@evil";

/// The Chromium binary of Debian's `chromium` package.
const CHROMIUM: &str = "/usr/bin/chromium";

fn start(scene: &mut Scene, config: RelayConfig) -> u16 {
    let port = free_port();
    std::fs::write(scene.dir().join("admin.token"), format!("{TOKEN}\n")).unwrap();
    let admin = format!(
        "[admin]\nlisten = \"127.0.0.1:{port}\"\ntoken_file = \"admin.token\"\n[trace]\nmessages = 5000\n"
    );
    scene.start_relay(&config.extra_toml(&admin));
    port
}

/// One GET on the admin listener with `authorization`: the status and the body.
fn get(port: u16, path: &str, authorization: Option<&str>) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(STEP)).unwrap();
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn api(port: u16, path: &str) -> (u16, Value) {
    let (status, body) = get(port, path, Some(&format!("Bearer {TOKEN}")));
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// `%XX` for every byte but the unreserved ones.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A terminal holding a session to echo as alice, once it is established.
fn held(scene: &Scene) -> Sipp {
    let terminal = scene.terminal("terminal", "terminal_hold.xml", ALICE, "echo", &[]);
    let lines = terminal.wait_for_log(|l| l.iter().any(|x| x == "ESTABLISHED"));
    assert!(
        lines.iter().any(|x| x == "ESTABLISHED"),
        "no session established\n{}",
        scene.report(Some(&terminal))
    );
    terminal
}

/// An INVITE from a stranger with [`EVIL_CALL_ID`]: challenged (407), a failure.
fn evil_invite(relay_port: u16) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let local = sock.local_addr().unwrap();
    let req = format!(
        "INVITE sip:echo@127.0.0.1:{relay_port} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bK-evil1\r\nMax-Forwards: 70\r\nFrom: <sip:mallory@example.com>;tag=m1\r\nTo: <sip:echo@127.0.0.1>\r\nCall-ID: {EVIL_CALL_ID}\r\nCSeq: 1 INVITE\r\nContact: <sip:mallory@{local}>\r\nContent-Length: 0\r\n\r\n"
    );
    sock.send_to(req.as_bytes(), ("127.0.0.1", relay_port))
        .unwrap();
}

/// Chromium's DOM of `url`, after the page loaded.
fn dump_dom(url: &str) -> String {
    assert!(
        std::path::Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: install Debian's package `chromium` (apt-get install chromium) to test the status page in a browser"
    );
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new("timeout")
        .arg("120")
        .arg(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the element `<tag id="id" …>…</tag>` in `dom` (its first occurrence).
fn element<'a>(dom: &'a str, tag: &str, id: &str) -> &'a str {
    let open = format!("<{tag} id=\"{id}\"");
    let start = dom
        .find(&open)
        .unwrap_or_else(|| panic!("no {open} in the DOM:\n{dom}"));
    let close = format!("</{tag}>");
    let end = dom[start..].find(&close).map_or(dom.len(), |e| start + e);
    &dom[start..end]
}

#[test]
fn the_status_page_in_a_browser_shows_the_live_call_and_escapes_what_strangers_send() {
    let mut scene = Scene::new();
    let echo = scene.server("echo", "server_answer.xml", &[("token", "e1")]);
    let port = start(
        &mut scene,
        RelayConfig::standard().server(ServerSpec::udp(echo, &["echo"])),
    );
    let relay_port = scene.relay().port;
    let _terminal = held(&scene);
    evil_invite(relay_port);
    let evil_path = format!("/api/v1/trace/{}", encode(EVIL_CALL_ID));
    let seen = wait_until(STEP, || {
        let (status, answer) = api(port, &evil_path);
        status == 200
            && answer["entries"].as_array().is_some_and(|e| {
                e.iter()
                    .any(|x| x["label"].as_str().is_some_and(|l| l.starts_with('4')))
            })
    });
    assert!(
        seen,
        "the stranger's INVITE and its refusal are not in the trace\n{}",
        scene.report(None)
    );

    let dom = dump_dom(&format!("http://127.0.0.1:{port}/status?token={TOKEN}"));
    let sessions = element(&dom, "table", "sessions");
    let server = server_uri(echo, Transport::Udp);
    for want in ["alice", "echo", server.as_str()] {
        assert!(
            sessions.contains(want),
            "the live session's {want} is not shown:\n{sessions}"
        );
    }
    let directory = element(&dom, "table", "directory");
    assert!(
        directory.contains(server.as_str()) && directory.contains("up"),
        "{directory}"
    );
    let registrations = element(&dom, "table", "registrations");
    assert!(registrations.contains("alice"), "{registrations}");
    assert!(dom.contains("Billing totals of the day"), "{dom}");
    // The stranger's Call-ID is text in the failure's ladder: no element came of it.
    let failures = element(&dom, "div", "failures");
    assert!(failures.contains("<svg"), "no ladder drawn:\n{failures}");
    assert!(
        failures
            .contains("&lt;script&gt;document.title='owned'&lt;/script&gt;&lt;img/src=x&gt;@evil"),
        "{failures}"
    );
    assert!(
        !dom.contains("<script"),
        "markup from the network became an element:\n{dom}"
    );
    assert!(
        !dom.contains("<img"),
        "markup from the network became an element:\n{dom}"
    );
    assert!(!dom.contains("owned</title>"), "{dom}");

    // Without the token, or with a wrong one, the page is refused.
    assert_eq!(get(port, "/status", None).0, 401);
    assert_eq!(
        get(port, "/status?token=not-the-token-at-all-00", None).0,
        401
    );
    // The query token opens the page alone, not the API.
    assert_eq!(
        get(port, &format!("/api/v1/sessions?token={TOKEN}"), None).0,
        401
    );
    let relay = scene.relay();
    relay.wait_for("admin request without a valid token refused", 3, STEP);
    assert!(
        !relay.log().contains(TOKEN),
        "the log shows the token:\n{}",
        relay.log()
    );
}

#[test]
fn relayd_trace_prints_both_legs_of_a_live_call_and_follows_new_messages() {
    let mut scene = Scene::new();
    let echo = scene.server("echo", "server_answer.xml", &[("token", "e1")]);
    let port = start(
        &mut scene,
        RelayConfig::standard().server(ServerSpec::udp(echo, &["echo"])),
    );
    let _terminal = held(&scene);
    let (status, answer) = api(port, "/api/v1/sessions");
    assert_eq!(status, 200, "{answer}");
    let call_id = answer["sessions"][0]["call_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let leg_id = answer["sessions"][0]["server_call_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let config = scene.relay().config.clone();
    // Either leg's Call-ID finds the whole call.
    for id in [&call_id, &leg_id] {
        let out = relayd_cmd(&config).arg("trace").arg(id).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], format!("call {call_id}"), "{text}");
        assert_eq!(lines[1], format!("  leg {leg_id}"), "{text}");
        let find = |needle: &str| {
            text.find(needle)
                .unwrap_or_else(|| panic!("no {needle:?} in the ladder:\n{text}"))
        };
        // In order: the challenge, the authenticated INVITE's decisions, the inquiry of
        // the server, its answer relayed, the billing record of the confirmed session.
        let order = [
            find("407"),
            // The challenge is drawn before the ACK that answers it.
            find("-ACK-"),
            find("* auth: alice authenticated"),
            find("* rule "),
            find("* server chosen: "),
            find("200 OK (INVITE)"),
            find("* billing: session "),
        ];
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{text}");
        // The server's column is named by its address.
        let server_col = format!("server udp:127.0.0.1:{echo}");
        assert!(lines[2].contains(&server_col), "{text}");
    }
    let svg = relayd_cmd(&config)
        .args(["trace", "--svg", &call_id])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&svg.stdout).starts_with("<svg "));
    let missing = relayd_cmd(&config)
        .args(["trace", "no-such-call"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("404"));

    // --follow prints what comes after it started: an OPTIONS ping.
    let mut follow = Command::new(support::relay::relayd_bin())
        .arg("--config")
        .arg(&config)
        .args(["trace", "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let relay_port = scene.relay().port;
    let mut got = Vec::new();
    let seen = wait_until(STEP, || {
        options_ping(relay_port, Transport::Udp);
        while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            got.push(line);
        }
        got.iter()
            .any(|l| l.contains("<- udp:127.0.0.1:") && l.contains("OPTIONS"))
            && got
                .iter()
                .any(|l| l.contains("-> udp:127.0.0.1:") && l.contains("200 OK"))
    });
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(seen, "--follow printed:\n{}", got.join("\n"));
}
