//! Parse + transaction handling throughput: each iteration takes a datagram through the wire
//! layer into a server transaction, answers it, and drains the output, as the endpoint does
//! for every request. Run with `scripts/bench-sip-core.sh`; it prints messages per second.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sip_core::message;
use sip_core::transaction::{Event, Output, Timers, TransactionLayer};
use sip_core::{wire, Peer};

fn invite(n: u64) -> Vec<u8> {
    format!(
        "INVITE sip:echo@relay.test SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK{n:016x};rport\r\n\
Max-Forwards: 70\r\n\
From: \"Alice\" <sip:alice@relay.test>;tag=a{n}\r\n\
To: <sip:echo@relay.test>\r\n\
Call-ID: {n:x}@127.0.0.1\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:alice@127.0.0.1:5070>\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

fn options(n: u64) -> Vec<u8> {
    format!(
        "OPTIONS sip:relay.test SIP/2.0\r\n\
v: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK{n:016x}\r\n\
Max-Forwards: 70\r\n\
f: <sip:alice@relay.test>;tag=a{n}\r\n\
t: <sip:relay.test>\r\n\
i: {n:x}@127.0.0.1\r\n\
CSeq: 1 OPTIONS\r\n\
l: 0\r\n\r\n"
    )
    .into_bytes()
}

fn run(c: &mut Criterion, name: &str, make: fn(u64) -> Vec<u8>, code: u16) {
    let peer = Peer::udp("127.0.0.1:5070".parse().unwrap());
    let messages: Vec<Vec<u8>> = (0..4096).map(make).collect();
    let mut group = c.benchmark_group("parse+transaction");
    group.throughput(Throughput::Elements(1));
    group.bench_function(name, |b| {
        let mut layer = TransactionLayer::new(Timers::default());
        let mut now = Instant::now();
        let mut i = 0usize;
        b.iter(|| {
            let bytes = &messages[i % messages.len()];
            i += 1;
            let msg = wire::parse(bytes).unwrap();
            layer.handle_message(now, msg, peer);
            loop {
                match layer.poll_output() {
                    Output::Event(Event::Request { tx, req, .. }) => {
                        let resp = message::response_for(&req, code, None, Some("bench"));
                        layer.respond(now, tx, resp).unwrap();
                    }
                    Output::Timeout(_) => break,
                    _ => {}
                }
            }
            // Let old transactions expire so the table stays at a steady size.
            if i % 1024 == 0 {
                now += Duration::from_secs(40);
                layer.handle_timeout(now);
                while !matches!(layer.poll_output(), Output::Timeout(_)) {}
            }
        });
    });
    group.finish();
}

fn bench(c: &mut Criterion) {
    run(c, "invite-486", invite, 486);
    run(c, "options-compact-200", options, 200);
}

criterion_group!(benches, bench);
criterion_main!(benches);
