//! The control API of a running agent, against the relay stand-in of `common` (so that the
//! test decides every answer the relay gives):
//!
//! * without the bearer token, or with another, every request is `401` (routes included);
//!   with it, malformed requests get the status that says why;
//! * a charge whose first attempt fails (`500`) is answered `202 pending`, spooled, and
//!   confirmed later under the same event id; a charge the relay refuses (`403`) is answered
//!   `422` with the relay's status; a charge naming another subscriber than the session's is
//!   `409`;
//! * ending a session through the API sends BYE with the server's reason, answers once the
//!   relay answered it, and the events stream tells `started` then `ended`
//!   (`server-hang-up`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;

use common::{call_id, header, Agent, Relay, WAIT};
use rsip::Method;
use serde_json::{json, Value};
use sip_core::message;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const TOKEN: &str = "control-token-0123456789";

/// An agent for `relay` with the control API on a free loopback port; returns it and the
/// API's address.
async fn agent_with_api(relay: &Relay, config: &str) -> (Agent, SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(&file, config).unwrap();
    let uri = relay.uri();
    let agent = Agent::start(&[
        "--config",
        file.to_str().unwrap(),
        "--relay",
        &uri,
        "--domain",
        "relay.test",
        "--no-register",
        "--service",
        "echo=builtin:echo",
        "--bytes-per-charge",
        "0",
        "--control-listen",
        "127.0.0.1:0",
        "--control-token-file",
        token.to_str().unwrap(),
    ])
    .await;
    let ready = agent.wait_for("appsrv-agent ready").await;
    let control = ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("control="))
        .expect("no control= in the ready line")
        .parse()
        .unwrap();
    // The files are read at start: the directory may go.
    drop(dir);
    (agent, control)
}

/// One HTTP request; the status and the JSON body (Null when empty).
async fn request(
    api: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<(&str, &[u8])>,
) -> (u16, Value) {
    let mut s = TcpStream::connect(api).await.unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let bytes = body.map_or(&b""[..], |(_, b)| b);
    if let Some((content_type, _)) = body {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", bytes.len()));
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("no answer from the control API")
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u16>()
        .unwrap();
    let value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).unwrap()
    };
    (status, value)
}

async fn post_json(api: SocketAddr, path: &str, body: &Value) -> (u16, Value) {
    let bytes = serde_json::to_vec(body).unwrap();
    request(
        api,
        "POST",
        path,
        Some(TOKEN),
        Some(("application/json", &bytes)),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_refuses_callers_without_the_token_and_says_what_is_wrong() {
    let relay = Relay::bind().await;
    let (agent, api) = agent_with_api(&relay, "").await;
    for (method, path) in [
        ("GET", "/v1/sessions"),
        ("GET", "/v1/events"),
        ("POST", "/v1/charges"),
        ("POST", "/v1/sessions/x/end"),
        ("GET", "/nowhere"),
    ] {
        let (status, body) = request(api, method, path, None, None).await;
        assert_eq!(status, 401, "{method} {path} without a token: {body}");
        let (status, _) = request(api, method, path, Some("another-token-123456"), None).await;
        assert_eq!(status, 401, "{method} {path} with a wrong token");
    }
    assert!(agent
        .log()
        .contains("control API request without the token refused"));

    let (status, body) = request(api, "GET", "/v1/sessions", Some(TOKEN), None).await;
    assert_eq!((status, body), (200, json!({"sessions": []})));
    let (status, body) = request(api, "GET", "/nowhere", Some(TOKEN), None).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not-found")));
    let (status, _) = request(api, "DELETE", "/v1/charges", Some(TOKEN), None).await;
    assert_eq!(status, 405);
    let form = Some(("application/x-www-form-urlencoded", &b"event_id=a"[..]));
    let (status, _) = request(api, "POST", "/v1/charges", Some(TOKEN), form).await;
    assert_eq!(status, 415);
    let broken = Some(("application/json", &b"{\"event_id\": "[..]));
    let (status, body) = request(api, "POST", "/v1/charges", Some(TOKEN), broken).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid")));
    let (status, body) = post_json(
        api,
        "/v1/charges",
        &json!({"event_id": "has space", "subscriber": "alice", "amount": 1}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().unwrap().contains("event_id"));
    let (status, body) = post_json(
        api,
        "/v1/charges",
        &json!({"event_id": "e1", "session_id": "nobody@nowhere", "amount": 1}),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("unknown-session"))
    );
    let (status, _) = post_json(api, "/v1/sessions/nobody%40nowhere/end", &json!({})).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charges_wait_for_the_relay_and_hanging_up_is_told_as_events() {
    let mut relay = Relay::bind().await;
    let spool = tempfile::tempdir().unwrap();
    let config = format!(
        "[billing]\nretry_initial_ms = 50\nretry_max_secs = 1\nconfirm_wait_secs = 5\n\
         spool_dir = {:?}\n",
        spool.path()
    );
    let (agent, api) = agent_with_api(&relay, &config).await;

    // The events, from before the session.
    let mut events = TcpStream::connect(api).await.unwrap();
    events
        .write_all(
            format!("GET /v1/events HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut events = BufReader::new(events).lines();
    let first = tokio::time::timeout(WAIT, events.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first, "HTTP/1.1 200 OK");
    while !tokio::time::timeout(WAIT, events.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .is_empty()
    {}

    let leg = relay.call(agent.sip, "echo", "alice").await;
    let session = call_id(&leg);
    let started: Value = serde_json::from_str(
        &tokio::time::timeout(WAIT, events.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(started["event"], "started");
    assert_eq!(started["session_id"], session.as_str());
    assert_eq!(started["subscriber"], "alice");
    assert_eq!(started["service"], "echo");

    // A charge whose first attempt fails: pending (and spooled), then confirmed.
    let charge = json!({"event_id": "order-1", "session_id": session, "amount": 7,
                        "description": "one order"});
    let asked = tokio::spawn(async move { post_json(api, "/v1/charges", &charge).await });
    let first = relay.next_request().await;
    assert_eq!(first.req.method, Method::Message);
    let body: Value = serde_json::from_slice(&first.req.body).unwrap();
    assert_eq!(
        body,
        json!({"event_id": "app:order-1", "call_id": session, "subscriber": "alice",
               "amount": 7, "currency": "EUR", "description": "one order"})
    );
    first
        .tx
        .respond(message::response_for(
            &first.req,
            500,
            None,
            Some(&message::new_tag()),
        ))
        .unwrap();
    let (status, receipt) = asked.await.unwrap();
    assert_eq!(status, 202, "{receipt}");
    assert_eq!(receipt["status"], "pending");
    assert_eq!(receipt["spooled"], true);
    assert!(
        spool.path().join("app_3aorder-1.json").exists(),
        "not spooled"
    );
    let retry = relay.next_request().await;
    let again: Value = serde_json::from_slice(&retry.req.body).unwrap();
    assert_eq!(again, body, "the retry is the same charge");
    retry
        .tx
        .respond(message::response_for(
            &retry.req,
            200,
            None,
            Some(&message::new_tag()),
        ))
        .unwrap();
    agent
        .wait_for("charge confirmed by the relay event_id=app:order-1")
        .await;
    assert!(!spool.path().join("app_3aorder-1.json").exists());

    // The relay refuses a charge for a subscriber it never saw this server serve.
    let charge = json!({"event_id": "gift-1", "subscriber": "mallory", "amount": 3});
    let asked = tokio::spawn(async move { post_json(api, "/v1/charges", &charge).await });
    let r = relay.next_request().await;
    let body: Value = serde_json::from_slice(&r.req.body).unwrap();
    assert!(body.get("call_id").is_none(), "{body}");
    r.tx.respond(message::response_for(
        &r.req,
        403,
        Some("Subscriber never served by this server"),
        Some(&message::new_tag()),
    ))
    .unwrap();
    let (status, answer) = asked.await.unwrap();
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["relay_status"], 403);
    assert_eq!(
        answer["relay_reason"],
        "Subscriber never served by this server"
    );

    // Not the session's subscriber.
    let (status, answer) = post_json(
        api,
        "/v1/charges",
        &json!({"event_id": "x-1", "session_id": session, "subscriber": "bob", "amount": 1}),
    )
    .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (409, Some("subscriber-mismatch"))
    );

    // Listed, then ended through the API.
    let (status, listed) = request(api, "GET", "/v1/sessions", Some(TOKEN), None).await;
    assert_eq!(status, 200);
    assert_eq!(listed["sessions"][0]["session_id"], session.as_str());
    assert_eq!(listed["sessions"][0]["state"], "live");
    let path = format!("/v1/sessions/{}/end", session.replace('@', "%40"));
    let end =
        tokio::spawn(
            async move { post_json(api, &path, &json!({"reason": "out of credit"})).await },
        );
    let bye = relay.next_request().await;
    assert_eq!(bye.req.method, Method::Bye);
    let reason = header(&bye.req, "Reason").unwrap();
    assert!(
        reason.contains("ended by the application server: out of credit"),
        "{reason}"
    );
    bye.tx
        .respond(message::response_for(&bye.req, 200, None, None))
        .unwrap();
    let (status, answer) = end.await.unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["bye_status"], 200);
    let ended: Value = serde_json::from_str(
        &tokio::time::timeout(WAIT, events.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(ended["event"], "ended", "{ended}");
    assert_eq!(ended["cause"], "server-hang-up");
    assert_eq!(ended["session_id"], session.as_str());

    // A late charge still finds the session that just ended.
    let charge = json!({"event_id": "late-1", "session_id": session, "units": 2});
    let asked = tokio::spawn(async move { post_json(api, "/v1/charges", &charge).await });
    let r = relay.next_request().await;
    let body: Value = serde_json::from_slice(&r.req.body).unwrap();
    assert_eq!(body["call_id"], session.as_str());
    assert_eq!(
        (body["units"].as_u64(), body["unit_price"].as_u64()),
        (Some(2), Some(1))
    );
    r.tx.respond(message::response_for(
        &r.req,
        200,
        None,
        Some(&message::new_tag()),
    ))
    .unwrap();
    let (status, receipt) = asked.await.unwrap();
    assert_eq!(
        (status, receipt["status"].as_str()),
        (200, Some("confirmed"))
    );
}
