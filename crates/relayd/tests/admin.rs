//! The admin API and `relayd ctl` across processes (issue 16): relayd run as a program with
//! an `[admin]` listener, sipp as terminals and application servers, the API spoken over
//! raw HTTP/1.1 and through `relayd ctl`, the billing store read back with `relayd billing
//! export`.
//!
//! * a session ended through the API is billed with end cause `admin`, BYE on both legs;
//! * a drained server gets no new session while its live one goes on and finishes;
//! * a reload adds a user who can then register; a reload (API or SIGHUP) of a bad file
//!   changes nothing and says why, naming file and key;
//! * the API refuses a request without the token or with a wrong one (401), and relayd's
//!   log never shows the token.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

use support::ports::free_port;
use support::relay::{relayd_cmd, server_uri, RelayConfig, ServerSpec};
use support::scene::Scene;
use support::sip::SipClient;
use support::sipp::{Sipp, Transport};
use support::{wait_until, ALICE, BOB, STEP};

/// The bearer token of every test relay, in `admin.token` beside its configuration.
const TOKEN: &str = "t0ken-of-the-admin-api-7f3c9e";

/// The `[admin]` section of a relay whose admin listener is on 127.0.0.1:`port`.
fn admin_toml(port: u16) -> String {
    format!("[admin]\nlisten = \"127.0.0.1:{port}\"\ntoken_file = \"admin.token\"\n")
}

/// A scene's relay started from `config` with an admin listener; its admin port.
fn start(scene: &mut Scene, config: RelayConfig) -> u16 {
    let port = free_port();
    std::fs::write(scene.dir().join("admin.token"), format!("{TOKEN}\n")).unwrap();
    scene.start_relay(&config.extra_toml(&admin_toml(port)));
    port
}

/// One HTTP/1.1 request to the admin API with `authorization` (the whole header value);
/// the status and the JSON answer.
fn request(
    port: u16,
    method: &str,
    path: &str,
    authorization: Option<&str>,
    body: &Value,
) -> (u16, Value) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(STEP)).unwrap();
    let body = body.to_string();
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let text = String::from_utf8(answer).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// A request with the right token.
fn api(port: u16, method: &str, path: &str, body: Value) -> (u16, Value) {
    request(port, method, path, Some(&format!("Bearer {TOKEN}")), &body)
}

/// `relayd ctl ARGS` on the scene's configuration: (success, stdout, stderr).
fn ctl(scene: &Scene, args: &[&str]) -> (bool, String, String) {
    let out = relayd_cmd(&scene.relay().config)
        .arg("ctl")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A terminal holding a session to echo as `user`, once it is established.
fn held(scene: &Scene, name: &str, user: support::Credentials<'_>) -> Sipp {
    let terminal = scene.terminal(name, "terminal_hold.xml", user, "echo", &[]);
    let lines = terminal.wait_for_log(|l| l.iter().any(|x| x == "ESTABLISHED"));
    assert!(
        lines.iter().any(|x| x == "ESTABLISHED"),
        "{name}: no session established\n{}",
        scene.report(Some(&terminal))
    );
    terminal
}

/// The INVITEs server `name` was asked.
fn invites(scene: &Scene, name: &str) -> usize {
    scene
        .server_named(name)
        .log()
        .iter()
        .filter(|l| l.starts_with("INVITE "))
        .count()
}

/// The live sessions the API lists.
fn live_sessions(port: u16) -> Vec<Value> {
    let (status, answer) = api(port, "GET", "/api/v1/sessions", Value::Null);
    assert_eq!(status, 200, "{answer}");
    answer["sessions"].as_array().cloned().unwrap_or_default()
}

/// The session records of the store once there are `n`.
fn records(scene: &Scene, n: usize) -> Vec<Value> {
    let mut got = Vec::new();
    let ok = wait_until(STEP, || {
        got = scene.session_records();
        got.len() >= n
    });
    assert!(
        ok,
        "{} session records, wanted {n}\n{}",
        got.len(),
        scene.report(None)
    );
    got
}

#[test]
fn a_session_ended_through_the_api_is_billed_admin_with_a_bye_on_both_legs() {
    let mut scene = Scene::new();
    let echo = scene.server("echo", "server_answer.xml", &[("token", "e1")]);
    let port = start(
        &mut scene,
        RelayConfig::standard().server(ServerSpec::udp(echo, &["echo"])),
    );
    let mut terminal = held(&scene, "terminal", ALICE);

    let sessions = live_sessions(port);
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    let session = &sessions[0];
    assert_eq!(session["subscriber"], "alice");
    assert_eq!(session["service"], "echo");
    assert_eq!(session["server"], server_uri(echo, Transport::Udp).as_str());
    assert!(session["call_id"].as_str().is_some_and(|c| !c.is_empty()));
    assert!(session["duration_secs"].as_u64().is_some());
    let id = session["session_id"].as_str().unwrap().to_string();

    // `relayd ctl sessions` prints it as a table; --json as the API's answer.
    let (ok, table, err) = ctl(&scene, &["sessions"]);
    assert!(ok, "{err}");
    assert!(table.starts_with("session_id"), "{table}");
    assert!(
        table
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with(&id) && l.contains("alice")),
        "{table}"
    );
    let (ok, text, err) = ctl(&scene, &["--json", "sessions"]);
    assert!(ok, "{err}");
    let parsed: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(parsed["sessions"][0]["session_id"], id.as_str());

    // An unknown session is refused by name; the live one ends.
    let (ok, _, err) = ctl(&scene, &["end", "s-nobody"]);
    assert!(
        !ok && err.contains("404") && err.contains("s-nobody"),
        "{err}"
    );
    let (ok, out, err) = ctl(&scene, &["end", &id]);
    assert!(ok, "{err}");
    assert!(out.contains(&id), "{out}");

    // The relay sent BYE to the terminal (which answered and ended its run) and to the
    // server; the record says `admin`.
    scene.assert_success(&mut terminal);
    assert!(
        terminal.log().iter().any(|l| l == "BYE"),
        "{}",
        terminal.report()
    );
    let server = scene
        .server_named("echo")
        .wait_for_log(|l| l.iter().any(|x| x.starts_with("BYE ")));
    assert!(
        server.iter().any(|l| l.starts_with("BYE ")),
        "{}",
        scene.report(None)
    );
    let got = records(&scene, 1);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["session_id"], id.as_str());
    assert_eq!(got[0]["cause"], "admin");
    assert_eq!(got[0]["subscriber"], "alice");
    assert!(live_sessions(port).is_empty());
}

#[test]
fn a_drained_server_gets_no_new_session_while_its_live_one_finishes() {
    let mut scene = Scene::new();
    let one = scene.server("echo-1", "server_answer.xml", &[("token", "e1")]);
    let two = scene.server("echo-2", "server_answer.xml", &[("token", "e2")]);
    let uri_one = server_uri(one, Transport::Udp);
    let port = start(
        &mut scene,
        RelayConfig::standard()
            .server(ServerSpec::udp(one, &["echo"]))
            .server(ServerSpec::udp(two, &["echo"])),
    );
    // Strategy `first`: the first session goes to echo-1.
    let mut first = held(&scene, "first", ALICE);
    assert_eq!(
        (invites(&scene, "echo-1"), invites(&scene, "echo-2")),
        (1, 0)
    );

    let (ok, out, err) = ctl(&scene, &["drain", &uri_one]);
    assert!(ok, "{err}");
    assert!(out.contains(&uri_one) && out.contains("true"), "{out}");
    let (status, directory) = api(port, "GET", "/api/v1/directory", Value::Null);
    assert_eq!(status, 200);
    let entry = directory["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["uri"] == uri_one.as_str())
        .cloned()
        .unwrap();
    assert_eq!(entry["drained"], true, "{directory}");
    assert_eq!(entry["active_sessions"], 1, "{directory}");
    assert_eq!(entry["up"], true, "{directory}");

    // A new session goes to echo-2; echo-1 is not asked.
    let mut second = held(&scene, "second", ALICE);
    assert_eq!(
        (invites(&scene, "echo-1"), invites(&scene, "echo-2")),
        (1, 1)
    );
    assert_eq!(live_sessions(port).len(), 2);

    // The drained server's live session goes on until its terminal hangs up.
    first.signal_hang_up();
    scene.assert_success(&mut first);
    second.signal_hang_up();
    scene.assert_success(&mut second);
    let got = records(&scene, 2);
    let mut summary: Vec<(String, String)> = got
        .iter()
        .map(|r| {
            (
                r["server"].as_str().unwrap().to_string(),
                r["cause"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    summary.sort();
    let mut expected = vec![
        (uri_one.clone(), "caller-bye".to_string()),
        (server_uri(two, Transport::Udp), "caller-bye".to_string()),
    ];
    expected.sort();
    assert_eq!(summary, expected);

    // Undrained, it takes sessions again.
    let (status, _) = api(
        port,
        "POST",
        "/api/v1/servers/undrain",
        json!({ "server": uri_one }),
    );
    assert_eq!(status, 200);
    let mut third = held(&scene, "third", ALICE);
    assert_eq!(invites(&scene, "echo-1"), 2);
    third.signal_hang_up();
    scene.assert_success(&mut third);
    // An unknown server is refused by name.
    let (status, answer) = api(
        port,
        "POST",
        "/api/v1/servers/drain",
        json!({ "server": "nowhere" }),
    );
    assert_eq!(status, 404, "{answer}");
}

/// The configuration file with `extra` appended.
fn append(config: &Path, extra: &str) {
    let mut text = std::fs::read_to_string(config).unwrap();
    text.push('\n');
    text.push_str(extra);
    std::fs::write(config, text).unwrap();
}

const DAVE: &str = "[[users]]\nname = \"dave\"\npassword = \"dave-secret\"\nplan = \"basic\"\nservices = [\"echo\"]\n";

#[test]
fn a_reload_adds_a_user_who_can_then_register() {
    let mut scene = Scene::new();
    let port = start(&mut scene, RelayConfig::standard());
    let dave = SipClient::new(scene.relay().port, "dave");
    assert_ne!(
        dave.register("dave-secret").code,
        200,
        "dave is not a user yet"
    );

    let config = scene.relay().config.clone();
    append(&config, DAVE);
    let (ok, out, err) = ctl(&scene, &["reload"]);
    assert!(ok, "{err}\n{}", scene.report(None));
    assert!(
        out.starts_with("reloaded ") && out.contains("4 users"),
        "{out}"
    );
    assert!(
        !out.contains("restart"),
        "nothing that needs a restart changed: {out}"
    );
    assert_eq!(dave.register("dave-secret").code, 200);
    let (_, registrations) = api(port, "GET", "/api/v1/registrations", Value::Null);
    assert!(
        registrations["registrations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["user"] == "dave"),
        "{registrations}"
    );
    // Removed by the operator, the registration is gone.
    let (status, _) = api(
        port,
        "POST",
        "/api/v1/registrations/remove",
        json!({ "user": "dave" }),
    );
    assert_eq!(status, 200);
    let (_, registrations) = api(port, "GET", "/api/v1/registrations", Value::Null);
    assert!(
        !registrations["registrations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["user"] == "dave"),
        "{registrations}"
    );

    // A change that needs a restart is named as such; the rest still applies.
    append(&config, "[metrics]\nlisten = \"127.0.0.1:1\"\n");
    let (status, answer) = api(port, "POST", "/api/v1/reload", Value::Null);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["restart_needed"], json!(["metrics"]));
}

#[test]
fn a_reload_of_a_bad_file_changes_nothing_and_names_file_and_key() {
    let mut scene = Scene::new();
    let port = start(&mut scene, RelayConfig::standard());
    let config = scene.relay().config.clone();
    // Dave would be added, but he subscribes to a service that does not exist.
    append(
        &config,
        &DAVE.replace("[\"echo\"]", "[\"no-such-service\"]"),
    );
    const KEY: &str = "users[3].services[0]";
    let (status, answer) = api(port, "POST", "/api/v1/reload", Value::Null);
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["reloaded"], false);
    let error = answer["error"].as_str().unwrap();
    let file = config.display().to_string();
    assert!(error.contains(&file), "{error}");
    assert!(error.contains(KEY), "{error}");
    // The same through ctl, and through SIGHUP (the log names file and key).
    let (ok, _, err) = ctl(&scene, &["reload"]);
    assert!(!ok && err.contains(KEY) && err.contains(&file), "{err}");
    let relay = scene.relay();
    let hup = Command::new("kill")
        .args(["-HUP", &relay.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    relay.wait_for("configuration reload refused", 3, STEP);
    let refusals: Vec<String> = relay
        .log()
        .lines()
        .filter(|l| l.contains("configuration reload refused"))
        .map(str::to_string)
        .collect();
    assert!(
        refusals
            .iter()
            .all(|l| l.contains(&file) && l.contains(KEY)),
        "{refusals:?}"
    );
    // Nothing changed: dave is still unknown, alice and bob still register.
    assert_ne!(
        SipClient::new(relay.port, "dave")
            .register("dave-secret")
            .code,
        200
    );
    assert_eq!(
        SipClient::new(relay.port, ALICE.0).register(ALICE.1).code,
        200
    );
    assert_eq!(SipClient::new(relay.port, BOB.0).register(BOB.1).code, 200);
}

#[test]
fn the_api_refuses_a_missing_or_wrong_token_and_never_logs_one() {
    let mut scene = Scene::new();
    let port = start(&mut scene, RelayConfig::standard());
    let wrong = "Bearer not-the-token-but-long-enough";
    for authorization in [None, Some(wrong), Some(&*format!("Basic {TOKEN}"))] {
        for (method, path) in [
            ("GET", "/api/v1/sessions"),
            ("POST", "/api/v1/reload"),
            ("GET", "/nothing"),
        ] {
            let (status, answer) = request(port, method, path, authorization, &Value::Null);
            assert_eq!(
                status, 401,
                "{method} {path} with {authorization:?}: {answer}"
            );
        }
    }
    // The right one opens the API; an unknown route is 404, a wrong method 405.
    assert_eq!(api(port, "GET", "/api/v1/sessions", Value::Null).0, 200);
    assert_eq!(api(port, "GET", "/api/v1/nothing", Value::Null).0, 404);
    assert_eq!(api(port, "GET", "/api/v1/reload", Value::Null).0, 405);
    assert_eq!(api(port, "POST", "/api/v1/reload", Value::Null).0, 200);
    // A head larger than allowed is refused, not buffered.
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(STEP)).unwrap();
    let _ = write!(
        stream,
        "GET /api/v1/sessions HTTP/1.1\r\nX: {}\r\n\r\n",
        "a".repeat(8_500)
    );
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    // ctl with a configuration whose token is wrong is refused too.
    let other = scene.dir().join("wrong.toml");
    let text = std::fs::read_to_string(&scene.relay().config)
        .unwrap()
        .replace(
            "token_file = \"admin.token\"",
            "token = \"not-the-token-either-0000\"",
        );
    std::fs::write(&other, text).unwrap();
    let out = relayd_cmd(&other)
        .arg("ctl")
        .arg("sessions")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));

    let relay = scene.relay();
    relay.wait_for("admin request without a valid token refused", 10, STEP);
    let log = relay.log();
    for secret in [
        TOKEN,
        "not-the-token-but-long-enough",
        "not-the-token-either-0000",
    ] {
        assert!(!log.contains(secret), "the log shows a token:\n{log}");
    }
}
