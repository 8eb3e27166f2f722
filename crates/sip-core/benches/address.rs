//! Header-value parsing: rsip's typed Contact/From (`rsip::headers::Contact::new(text)
//! .typed()`) against sip-core's own readers (`sip_core::address`) on the same values, each
//! followed by the reads a caller makes (URI, tag, expires). Run with
//! `cargo bench -p sip-core --bench address -- --warm-up-time 1 --measurement-time 3`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rsip::headers::{ToTypedHeader as _, UntypedHeader as _};
use sip_core::address::{Contacts, FromTo};

/// Values both parsers read.
const FROMS: [&str; 3] = [
    "\"Alice\" <sip:alice@relay.test>;tag=1928301774",
    "<sip:echo@relay.test:5060;transport=tcp>;tag=a6c85cf",
    "Bob <sips:bob@198.51.100.9>;tag=314159;x-custom=1",
];

const CONTACTS: [&str; 3] = [
    "<sip:alice@192.0.2.1:5070>",
    "<sip:alice-0x55c1e6e12290@127.0.0.1:60710;transport=udp>;expires=120",
    "\"Mr. Watson\" <sip:watson@worcester.bell-telephone.com>;q=0.7;expires=3600",
];

fn from_to(c: &mut Criterion) {
    let mut g = c.benchmark_group("from");
    g.throughput(Throughput::Elements(FROMS.len() as u64));
    g.bench_function("rsip_typed", |b| {
        b.iter(|| {
            for v in FROMS {
                let f = rsip::headers::From::new(black_box(v)).typed().unwrap();
                black_box((&f.uri, f.tag()));
            }
        })
    });
    g.bench_function("sip_core", |b| {
        b.iter(|| {
            for v in FROMS {
                let f = FromTo::parse(black_box(v)).unwrap();
                black_box((f.uri(), f.tag()));
            }
        })
    });
    g.finish();
}

fn contact(c: &mut Criterion) {
    let mut g = c.benchmark_group("contact");
    g.throughput(Throughput::Elements(CONTACTS.len() as u64));
    g.bench_function("rsip_typed", |b| {
        b.iter(|| {
            for v in CONTACTS {
                let t = rsip::headers::Contact::new(black_box(v)).typed().unwrap();
                black_box((&t.uri, t.expires()));
            }
        })
    });
    g.bench_function("sip_core", |b| {
        b.iter(|| {
            for v in CONTACTS {
                let t = Contacts::parse(black_box(v)).unwrap();
                let first = &t.contacts()[0];
                black_box((first.uri(), first.expires()));
            }
        })
    });
    g.finish();
}

/// A value only ours reads (linphone's Contact), for the record.
fn linphone(c: &mut Criterion) {
    const V: &str = "<sip:alice@127.0.0.1:59754;transport=udp>;+sip.instance=\"<urn:uuid:090b314c-7132-0014-ac65-4248b341241a>\";expires=3600";
    c.bench_function("contact/sip_core_linphone", |b| {
        b.iter(|| {
            let t = Contacts::parse(black_box(V)).unwrap();
            black_box(t.contacts()[0].instance().is_some());
        })
    });
}

criterion_group!(benches, from_to, contact, linphone);
criterion_main!(benches);
