//! The data gateway of a running agent, driven through real inquiries: a relay stand-in built
//! on sip-core sends the INVITEs, and the test connects to the data port named in the 200's
//! SDP answer like a terminal would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{call_id, present_token, read_to_end, Agent, Relay};
use rsip::prelude::*;
use rsip::{Header, Method};
use sip_core::sdp::{AppSdp, Connection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn agent_for(relay: &Relay, extra: &[&str]) -> Agent {
    let uri = relay.uri();
    let mut args = vec![
        "--relay",
        uri.as_str(),
        "--no-register",
        "--service",
        "echo=builtin:echo",
        "--service",
        "clock=builtin:clock",
        "--bytes-per-charge",
        "0",
    ];
    args.extend_from_slice(extra);
    Agent::start(&args).await
}

/// A bad token is refused and nothing reaches the service; the token of a real 200 opens
/// an echo session whose bytes come back unchanged; the same token again is refused; when
/// the echo service closes (after the terminal's end of input) the agent sends BYE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_gate_the_data_and_echo_returns_every_byte() {
    let mut relay = Relay::bind().await;
    let agent = agent_for(&relay, &[]).await;
    let leg = relay.call(agent.sip, "echo", "alice").await;
    assert_eq!(
        leg.answer.socket_addr(),
        agent.data,
        "the answer names the data gateway"
    );
    let token = leg.answer.token.clone().expect("answer without a token");
    assert_eq!(token.len(), 32);

    let (mut bad, line) = present_token(agent.data, "00000000000000000000000000000000").await;
    assert_eq!(line, "ERR unknown token");
    assert!(
        read_to_end(&mut bad).await.is_empty(),
        "bytes after a refusal"
    );

    let (mut good, line) = present_token(agent.data, &token).await;
    assert_eq!(line, "OK");
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let (mut rd, mut wr) = good.split();
    let write = async {
        wr.write_all(&payload).await.unwrap();
        wr.shutdown().await.unwrap();
    };
    let read = async {
        let mut back = Vec::new();
        rd.read_to_end(&mut back).await.unwrap();
        back
    };
    let ((), back) = tokio::time::timeout(common::WAIT, async { tokio::join!(write, read) })
        .await
        .expect("echo did not finish");
    assert_eq!(back.len(), payload.len(), "bytes in = bytes out");
    assert!(back == payload, "echo changed the bytes");

    let (mut again, line) = present_token(agent.data, &token).await;
    assert!(
        line == "ERR token already used" || line == "ERR unknown token",
        "a used token opened a connection: {line}"
    );
    assert!(read_to_end(&mut again).await.is_empty());

    // The echo service ended: the agent hangs up.
    relay.expect_bye(&call_id(&leg)).await;
    let ended = agent.wait_for("session ended").await;
    assert!(ended.contains("backend closed"), "{ended}");
    assert!(
        ended.contains("bytes_in=200000") && ended.contains("bytes_out=200000"),
        "{ended}"
    );
    agent.wait_for("data connection refused").await;
}

/// A token is good from the 200 on, before the relay's ACK reaches the agent; a second
/// connection with it while the first is open is refused as used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_works_before_the_ack_and_only_once() {
    let relay = Relay::bind().await;
    let agent = agent_for(&relay, &[]).await;
    let invite = relay.invite(agent.sip, "echo", "bob");
    let resp = relay.transact(invite.clone(), agent.sip).await;
    assert_eq!(resp.status_code.code(), 200);
    let answer = AppSdp::parse(&resp.body).unwrap();
    let token = answer.token.unwrap();

    let (mut first, line) = present_token(agent.data, &token).await;
    assert_eq!(line, "OK");
    let (mut second, line) = present_token(agent.data, &token).await;
    assert_eq!(line, "ERR token already used");
    assert!(read_to_end(&mut second).await.is_empty());

    first.write_all(b"ping").await.unwrap();
    let mut four = [0u8; 4];
    tokio::time::timeout(common::WAIT, first.read_exact(&mut four))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&four, b"ping");
}

/// A token not used within `--token-ttl` is refused as expired, and the session whose
/// terminal never connected is ended with BYE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unused_token_expires_and_the_session_is_ended() {
    let mut relay = Relay::bind().await;
    let agent = agent_for(&relay, &["--token-ttl", "1"]).await;
    let leg = relay.call(agent.sip, "echo", "alice").await;
    relay.expect_bye(&call_id(&leg)).await;
    let ended = agent.wait_for("session ended").await;
    assert!(ended.contains("no data connection in time"), "{ended}");
    let token = leg.answer.token.unwrap();
    let (_s, line) = present_token(agent.data, &token).await;
    assert_eq!(
        line, "ERR unknown token",
        "the ended session's token is gone"
    );
}

/// re-INVITE: a service the agent does not offer is refused (404) and the live data
/// connection goes on; a change to `clock` is accepted with a new token, whose connection
/// gets the time and replaces the echo connection; the relay's BYE then closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reinvite_changes_the_service_or_leaves_the_session_untouched() {
    let relay = Relay::bind().await;
    let agent = agent_for(&relay, &[]).await;
    let mut leg = relay.call(agent.sip, "echo", "alice").await;
    let (mut echo, line) = present_token(agent.data, leg.answer.token.as_deref().unwrap()).await;
    assert_eq!(line, "OK");

    let sdp = |s: &str| {
        let mut h = vec![Header::ContentType(rsip::headers::ContentType::new(
            "application/sdp",
        ))];
        h.push(Header::Other("P-Asserted-Service".into(), s.into()));
        h
    };
    let (_, resp) = relay
        .in_dialog(
            &mut leg,
            Method::Invite,
            sdp("video"),
            common::OFFER.as_bytes().to_vec(),
        )
        .await;
    assert_eq!(resp.status_code.code(), 404, "{resp}");
    echo.write_all(b"still here").await.unwrap();
    let mut back = [0u8; 10];
    tokio::time::timeout(common::WAIT, echo.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        &back, b"still here",
        "a refused change disturbed the session"
    );

    let (reinvite, resp) = relay
        .in_dialog(
            &mut leg,
            Method::Invite,
            sdp("clock"),
            common::OFFER.as_bytes().to_vec(),
        )
        .await;
    assert_eq!(resp.status_code.code(), 200, "{resp}");
    let ack = leg
        .dialog
        .ack_for_2xx(&reinvite, &relay.via(), vec![], vec![])
        .unwrap();
    relay.endpoint.send_stateless(&leg.peer, ack).await.unwrap();
    let answer = AppSdp::parse(&resp.body).unwrap();
    assert_eq!(answer.service.as_deref(), Some("clock"));
    assert_eq!(answer.connection, Some(Connection::New));
    assert_eq!(answer.origin.session_id, leg.answer.origin.session_id);
    assert!(answer.origin.session_version > leg.answer.origin.session_version);
    let new_token = answer.token.clone().unwrap();
    assert_ne!(Some(&new_token), leg.answer.token.as_ref());

    let (mut clock, line) = present_token(agent.data, &new_token).await;
    assert_eq!(line, "OK");
    let mut tick = [0u8; 21];
    tokio::time::timeout(common::WAIT, clock.read_exact(&mut tick))
        .await
        .unwrap()
        .unwrap();
    let tick = String::from_utf8(tick.to_vec()).unwrap();
    assert!(
        tick.ends_with("Z\n") && tick.as_bytes()[10] == b'T',
        "{tick:?}"
    );
    // The echo connection was replaced: closed by the agent.
    let rest = read_to_end(&mut echo).await;
    assert!(rest.is_empty(), "{rest:?}");

    let (_, resp) = relay.in_dialog(&mut leg, Method::Bye, vec![], vec![]).await;
    assert_eq!(resp.status_code.code(), 200);
    tokio::time::timeout(Duration::from_secs(20), async {
        let mut sink = [0u8; 256];
        while clock.read(&mut sink).await.unwrap_or(0) > 0 {}
    })
    .await
    .expect("the BYE did not close the data connection");
    let ended = agent.wait_for("session ended").await;
    assert!(
        ended.contains("service=clock") && ended.contains("BYE from the relay"),
        "{ended}"
    );
}
