//! The endpoint driven inline: a user's [`EventSink`] and [`ClientSink`] take events from
//! the task that produced them, may call back into the endpoint from inside, and a request
//! the user has no room for is answered 503. Two endpoints on loopback UDP, real sockets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rsip::Method;
use sip_core::endpoint::{ClientEvent, ClientSink, Endpoint, EndpointEvent, EventSink};
use sip_core::{message, Peer, Transport};
use tokio::sync::mpsc;

mod support;
use support::{loopback, request};

/// Answers every request from inside `deliver` (re-entering the endpoint), or gives every
/// request back when `refuse` is set.
struct Answering {
    refuse: bool,
}

impl EventSink for Answering {
    fn deliver(&self, event: EndpointEvent) -> Result<(), EndpointEvent> {
        match event {
            EndpointEvent::Request(_) if self.refuse => Err(event),
            EndpointEvent::Request(r) => {
                let resp = message::response_for(&r.req, 200, None, Some(&message::new_tag()));
                r.tx.respond(resp).unwrap();
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// A client transaction's events, into a queue the test reads.
struct Collect(mpsc::UnboundedSender<ClientEvent>);

impl ClientSink for Collect {
    fn deliver(&self, event: ClientEvent) {
        let _ = self.0.send(event);
    }

    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

async fn final_code(events: &mut mpsc::UnboundedReceiver<ClientEvent>) -> (u16, Option<String>) {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("no final response within 10 s")
            .expect("the sink's queue closed");
        match event {
            ClientEvent::Response(r) if r.status_code.code() >= 200 => {
                let retry_after = r.headers.iter().find_map(|h| match h {
                    rsip::Header::RetryAfter(v) => {
                        Some(rsip::headers::UntypedHeader::value(v).to_string())
                    }
                    _ => None,
                });
                return (r.status_code.code(), retry_after);
            }
            ClientEvent::Response(_) => continue,
            other => panic!("expected a final response, got {other:?}"),
        }
    }
}

async fn pair(refuse: bool) -> (Endpoint, SocketAddr, Endpoint, SocketAddr) {
    let uas = Endpoint::bind_with_sink(loopback(), Arc::new(Answering { refuse }))
        .await
        .unwrap();
    let uas_addr = uas.local_addr(Transport::Udp).unwrap();
    let (uac, _events) = Endpoint::bind(loopback()).await.unwrap();
    let uac_addr = uac.local_addr(Transport::Udp).unwrap();
    (uas, uas_addr, uac, uac_addr)
}

/// Sends an OPTIONS from `uac` to `uas` through a client sink; its final status and
/// Retry-After.
async fn options(uac: &Endpoint, uac_addr: SocketAddr, uas: SocketAddr) -> (u16, Option<String>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    uac.send_request_to(
        request("OPTIONS", uac_addr, uas),
        Peer::udp(uas),
        Arc::new(Collect(tx)),
    )
    .unwrap();
    final_code(&mut rx).await
}

#[tokio::test]
async fn an_inline_sink_answers_from_inside_and_the_answer_reaches_a_client_sink() {
    let (_uas, uas_addr, uac, uac_addr) = pair(false).await;
    for _ in 0..20 {
        assert_eq!(options(&uac, uac_addr, uas_addr).await, (200, None));
    }
}

#[tokio::test]
async fn a_request_the_sink_gives_back_is_answered_503_with_retry_after() {
    let (_uas, uas_addr, uac, uac_addr) = pair(true).await;
    let (code, retry_after) = options(&uac, uac_addr, uas_addr).await;
    assert_eq!(code, 503);
    assert_eq!(retry_after.as_deref().map(str::trim), Some("5"));
}

#[tokio::test]
async fn a_request_the_transaction_layer_refuses_reaches_the_client_sink_as_failed() {
    let (_uas, uas_addr, uac, uac_addr) = pair(false).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut ack = request("ACK", uac_addr, uas_addr);
    ack.method = Method::Ack;
    uac.send_request_to(ack, Peer::udp(uas_addr), Arc::new(Collect(tx)))
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("no event within 10 s");
    assert!(
        matches!(event, Some(ClientEvent::Failed(_))),
        "an ACK is no transaction: {event:?}"
    );
}
