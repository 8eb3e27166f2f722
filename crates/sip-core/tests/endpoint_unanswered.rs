//! A user that never answers: the endpoint does not keep its server transactions for ever
//! (RFC 3261 §17.2 sets them no bound). An INVITE is answered 408 once its deadline passes,
//! an OPTIONS is dropped, and both are counted in `EndpointStats::unanswered`. Two endpoints
//! on loopback UDP, real sockets, deadlines of a second or less.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sip_core::endpoint::{
    ClientEvent, ClientSink, Endpoint, EndpointConfig, EndpointEvent, EventSink,
};
use sip_core::transaction::{ServerDeadlines, Timers};
use sip_core::{Peer, Transport};
use tokio::sync::mpsc;

mod support;
use support::{loopback, request};

/// Takes every request and never answers it.
struct Silent(mpsc::UnboundedSender<String>);

impl EventSink for Silent {
    fn deliver(&self, event: EndpointEvent) -> Result<(), EndpointEvent> {
        if let EndpointEvent::Request(r) = event {
            let _ = self.0.send(r.req.method.to_string());
        }
        Ok(())
    }
}

struct Collect(mpsc::UnboundedSender<ClientEvent>);

impl ClientSink for Collect {
    fn deliver(&self, event: ClientEvent) {
        let _ = self.0.send(event);
    }

    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// The final outcome of a client transaction: its status, or 0 for a timeout.
async fn outcome(events: &mut mpsc::UnboundedReceiver<ClientEvent>) -> u16 {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(20), events.recv())
            .await
            .expect("no outcome within 20 s")
            .expect("the sink's queue closed");
        match event {
            ClientEvent::Response(r) if r.status_code.code() >= 200 => return r.status_code.code(),
            ClientEvent::Response(_) => continue,
            ClientEvent::TimedOut => return 0,
            ClientEvent::Failed(e) => panic!("{e}"),
        }
    }
}

#[tokio::test]
async fn requests_the_user_never_answers_end_at_their_deadline_and_are_counted() {
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let uas = Endpoint::bind_with_sink(
        EndpointConfig {
            server_deadlines: ServerDeadlines {
                invite: Duration::from_millis(800),
                // Past the client's Timer F (1.6 s), as the default 64·T1 is with equal
                // T1s: a retransmission must not find the transaction gone and reach the
                // user again.
                non_invite: Some(Duration::from_secs(2)),
            },
            ..loopback()
        },
        Arc::new(Silent(seen_tx)),
    )
    .await
    .unwrap();
    let uas_addr = uas.local_addr(Transport::Udp).unwrap();
    // A client that gives up on the OPTIONS after 64·T1 = 1.6 s.
    let (uac, _events) = Endpoint::bind(EndpointConfig {
        timers: Timers {
            t1: Duration::from_millis(25),
            ..Timers::default()
        },
        ..loopback()
    })
    .await
    .unwrap();
    let uac_addr = uac.local_addr(Transport::Udp).unwrap();

    let started = Instant::now();
    let (inv_tx, mut invite) = mpsc::unbounded_channel();
    uac.send_request_to(
        request("INVITE", uac_addr, uas_addr),
        Peer::udp(uas_addr),
        Arc::new(Collect(inv_tx)),
    )
    .unwrap();
    let (opt_tx, mut options) = mpsc::unbounded_channel();
    uac.send_request_to(
        request("OPTIONS", uac_addr, uas_addr),
        Peer::udp(uas_addr),
        Arc::new(Collect(opt_tx)),
    )
    .unwrap();
    let mut methods = vec![seen.recv().await.unwrap(), seen.recv().await.unwrap()];
    methods.sort();
    assert_eq!(methods, ["INVITE", "OPTIONS"], "each reached the user once");

    assert_eq!(
        outcome(&mut invite).await,
        408,
        "the endpoint answered the INVITE"
    );
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(800), "408 after {waited:?}");
    assert_eq!(outcome(&mut options).await, 0, "the OPTIONS got no answer");
    // The UAS drops the OPTIONS at 2 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    while uas.stats().unanswered.load(Ordering::Relaxed) < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(uas.stats().unanswered.load(Ordering::Relaxed), 2);
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert!(
        seen.try_recv().is_err(),
        "no request reached the user twice"
    );
}
