//! The agent as a library, in this test's own process (as a Rust application server embeds
//! it), against the relay stand-in of `common`: [`Agent::start`] on a [`Config`], and the
//! session events an [`AgentHandle`] hears — `started`, `connected`, `changed` on a
//! re-INVITE asserting another service, `transferred` then `ended` on a BYE whose `Reason`
//! says so, `ended` on a plain BYE — the live sessions it lists, and a shutdown that ends
//! the rest with BYE.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use appsrv_agent::agent::Agent;
use appsrv_agent::config::{Config, Flags};
use appsrv_agent::events::{EndCause, SessionEvent};
use appsrv_agent::handle::AgentHandle;
use appsrv_agent::session::HangUpError;
use clap::Parser;
use common::{call_id, present_token, Relay, OFFER, WAIT};
use rsip::prelude::*;
use rsip::{Header, Method};
use tokio::sync::broadcast;

async fn next(events: &mut broadcast::Receiver<SessionEvent>) -> SessionEvent {
    tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("no session event in time")
        .unwrap()
}

fn config(relay: &Relay) -> Config {
    let text = format!(
        "[relay]\nuri = \"{}\"\ndomain = \"relay.test\"\naccount = \"as1\"\n\
         password = \"as1-secret\"\nregister = false\n\
         [sip]\nlisten = \"127.0.0.1:0\"\n[data]\nlisten = \"127.0.0.1:0\"\n\
         [billing]\nbytes_per_charge = 0\n\
         [[services]]\nname = \"echo\"\nbackend = \"builtin:echo\"\n\
         [[services]]\nname = \"clock\"\nbackend = \"builtin:clock\"\n",
        relay.uri()
    );
    Config::from_toml(&text, Path::new("embedded.toml"), &Flags::parse_from(["x"])).unwrap()
}

async fn assert_ended(events: &mut broadcast::Receiver<SessionEvent>, id: &str, cause: EndCause) {
    match next(events).await {
        SessionEvent::Ended {
            session_id,
            cause: got,
            ..
        } => {
            assert_eq!(session_id, id);
            assert_eq!(got, cause);
        }
        other => panic!("expected ended ({cause}), got {other:?}"),
    }
}

async fn live(handle: &AgentHandle) -> Vec<String> {
    handle
        .sessions()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.session_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedding_server_hears_every_step_of_its_sessions() {
    let mut relay = Relay::bind().await;
    let agent = Agent::start(config(&relay)).await.unwrap();
    assert!(
        agent.control_addr().is_none(),
        "no control API unless configured"
    );
    let handle = agent.handle();
    let mut events = handle.events();

    // Started and connected.
    let mut leg = relay.call(agent.sip_addr(), "echo", "alice").await;
    let id = call_id(&leg);
    match next(&mut events).await {
        SessionEvent::Started {
            session_id,
            subscriber,
            service,
            ..
        } => assert_eq!(
            (session_id.as_str(), subscriber.as_str(), service.as_str()),
            (id.as_str(), "alice", "echo")
        ),
        other => panic!("expected started, got {other:?}"),
    }
    let (_echo, line) =
        present_token(agent.data_addr(), leg.answer.token.as_deref().unwrap()).await;
    assert_eq!(line, "OK");
    assert!(
        matches!(next(&mut events).await, SessionEvent::Connected { session_id, .. } if session_id == id)
    );
    let listed = handle.session(&id).await.unwrap().unwrap();
    assert_eq!(
        (listed.service.as_str(), listed.terminal.is_some()),
        ("echo", true)
    );

    // Changed: the relay asserts clock on a re-INVITE.
    let headers = vec![
        Header::ContentType(rsip::headers::ContentType::new("application/sdp")),
        Header::Other("P-Asserted-Service".into(), "clock;tz=utc".into()),
    ];
    let (reinvite, resp) = relay
        .in_dialog(&mut leg, Method::Invite, headers, OFFER.as_bytes().to_vec())
        .await;
    assert_eq!(resp.status_code.code(), 200, "{resp}");
    let ack = leg
        .dialog
        .ack_for_2xx(&reinvite, &relay.via(), vec![], vec![])
        .unwrap();
    relay.endpoint.send_stateless(&leg.peer, ack).await.unwrap();
    match next(&mut events).await {
        SessionEvent::Changed {
            session_id,
            from,
            to,
            params,
            ..
        } => {
            assert_eq!(session_id, id);
            assert_eq!((from.as_str(), to.as_str()), ("echo", "clock"));
            assert_eq!(params.get("tz"), Some(&Some("utc".to_string())));
        }
        other => panic!("expected changed, got {other:?}"),
    }
    assert_eq!(handle.session(&id).await.unwrap().unwrap().service, "clock");

    // Transferred: the relay's BYE says why.
    let reason = Header::Other("Reason".into(), "SIP;cause=200;text=\"transferred\"".into());
    let (_, resp) = relay
        .in_dialog(&mut leg, Method::Bye, vec![reason], Vec::new())
        .await;
    assert_eq!(resp.status_code.code(), 200);
    assert!(
        matches!(next(&mut events).await, SessionEvent::Transferred { session_id, .. } if session_id == id)
    );
    assert_ended(&mut events, &id, EndCause::Transferred).await;
    assert!(live(&handle).await.is_empty());
    assert_eq!(
        handle.hang_up(&id, "too late").await,
        Err(HangUpError::NotFound(id.clone()))
    );

    // A plain BYE from the relay.
    let mut second = relay.call(agent.sip_addr(), "echo", "alice").await;
    let second_id = call_id(&second);
    assert!(matches!(
        next(&mut events).await,
        SessionEvent::Started { .. }
    ));
    let (_, resp) = relay
        .in_dialog(&mut second, Method::Bye, Vec::new(), Vec::new())
        .await;
    assert_eq!(resp.status_code.code(), 200);
    assert_ended(&mut events, &second_id, EndCause::RelayBye).await;

    // The shutdown ends what is left with BYE.
    let third = relay.call(agent.sip_addr(), "clock", "alice").await;
    let third_id = call_id(&third);
    assert!(matches!(
        next(&mut events).await,
        SessionEvent::Started { .. }
    ));
    assert_eq!(live(&handle).await, std::slice::from_ref(&third_id));
    let stopping = tokio::spawn(agent.shutdown());
    relay.expect_bye(&third_id).await;
    assert_ended(&mut events, &third_id, EndCause::Shutdown).await;
    tokio::time::timeout(WAIT, stopping).await.unwrap().unwrap();
    assert!(handle.sessions().await.is_err(), "the agent has stopped");
}
