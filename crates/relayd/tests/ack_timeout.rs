//! A terminal that takes the 2xx (and with it the data token) and never ACKs it. The
//! session was delivered: the relay ends it after 64·T1 (RFC 3261 §13.3.1.4) and bills it
//! from the moment its 2xx went out, with cause `timeout`. Before, this path wrote no record
//! at all: time-billed service for free, as often as a terminal liked.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::billing::{field, int};
use support::relay::{RelayConfig, ServerSpec};
use support::scene::Scene;
use support::sipp::SippOpts;
use support::ALICE;

#[test]
fn a_2xx_never_acknowledged_is_billed_from_the_2xx_until_the_ack_wait_ends() {
    const T1_MS: u64 = 50;
    let mut scene = Scene::new();
    let as_port = scene.server("uas", "uas_answer.xml", SippOpts::default());
    scene.start_relay(
        &RelayConfig::standard()
            .t1_ms(T1_MS)
            .server(ServerSpec::udp(as_port, &["echo"])),
    );
    let mut terminal = scene.terminal(
        "uac",
        "uac_no_ack.xml",
        ALICE,
        "echo",
        SippOpts::default().timeout(Duration::from_secs(20)),
    );
    // The relay's BYE came (the scenario ends on answering it) ...
    scene.assert_success(&mut terminal);
    // ... and the server got the relay's ACK and BYE.
    let server = scene.server_named("uas");
    server.wait_count("SuccessfulCall", 1, Duration::from_secs(10));

    let records = scene.session_records();
    assert_eq!(
        records.len(),
        1,
        "one record for the delivered session: {records:#?}"
    );
    let r = &records[0];
    assert_eq!(field(r, "cause"), "timeout", "{r}");
    assert_eq!(field(r, "subscriber"), "alice", "{r}");
    assert_eq!(field(r, "service"), "echo", "{r}");
    // Billed from the 2xx to the end of the ACK wait: 64·T1, give or take scheduling.
    let d = int(r, "duration_ms");
    let wait = (64 * T1_MS) as i64;
    assert!(
        d >= wait - 50 && d <= wait + 1000,
        "duration {d} ms is not the {wait} ms ACK wait: {r}"
    );
}
