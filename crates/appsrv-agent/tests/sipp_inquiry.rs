//! sipp (Debian's `sip-tester`) stands in for the relay and sends inquiries to a running
//! `appsrv-agent`: a third-party check of the agent's SIP, SDP answer, capacity, relay-only
//! policy and BYE on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{
    assert_sipp_ok, free_udp_port, present_token, read_to_end, run_sipp, sipp, Agent, SippRun,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An INVITE from the relay for `echo` gets 200 with an SDP answer (checked by sipp's
/// regexps: `m=application <port> TCP relay-data`, `a=setup:passive`, a 32-hex-digit
/// `a=session-token`), then ACK; the relay's BYE gets 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sipp_inquiry_gets_200_with_an_sdp_answer_then_bye() {
    sipp();
    let port = free_udp_port("127.0.0.1");
    let relay = format!("sip:127.0.0.1:{port}");
    let agent = Agent::start(&[
        "--relay",
        &relay,
        "--no-register",
        "--service",
        "echo=builtin:echo",
    ])
    .await;
    let out = run_sipp(agent.sip, "invite_accept.xml", "127.0.0.1", port).await;
    assert_sipp_ok(&out, "invite_accept", &agent);
    agent.wait_for("session established").await;
    let ended = agent.wait_for("session ended").await;
    assert!(ended.contains("BYE from the relay"), "{ended}");
}

/// With `--capacity 1`: a first inquiry is accepted and held, a second gets 486 Busy Here.
/// Then SIGTERM: the agent ends the held session with a BYE (which the first sipp must
/// receive and answer for its scenario to pass) and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_is_enforced_and_sigterm_ends_live_sessions_with_bye() {
    sipp();
    // The relay is known by IP only, so both sipp instances (two ports) count as the relay.
    let mut agent = Agent::start(&[
        "--relay",
        "sip:127.0.0.1",
        "--no-register",
        "--service",
        "echo=builtin:echo",
        "--capacity",
        "1",
    ])
    .await;
    let hold_port = free_udp_port("127.0.0.1");
    let target = agent.sip;
    let holder =
        tokio::spawn(
            async move { run_sipp(target, "invite_hold.xml", "127.0.0.1", hold_port).await },
        );
    agent.wait_for("session established").await;

    let busy_port = free_udp_port("127.0.0.1");
    let out = run_sipp(agent.sip, "invite_busy.xml", "127.0.0.1", busy_port).await;
    assert_sipp_ok(&out, "invite_busy (expects 486)", &agent);
    let refused = agent.wait_for("inquiry refused").await;
    assert!(
        refused.contains("code=486") && refused.contains("Server at capacity"),
        "{refused}"
    );

    agent.sigterm();
    let held = holder.await.unwrap();
    assert_sipp_ok(&held, "invite_hold (expects the agent's BYE)", &agent);
    let status = agent.wait_exit().await;
    assert!(status.success(), "agent exit {status:?}:\n{}", agent.log());
    let ended = agent.wait_for("session ended").await;
    assert!(ended.contains("agent shutting down"), "{ended}");
}

/// Inquiries that do not come from the configured relay get 403: from another IP address
/// (127.0.0.2), and over UDP from another port of the relay's address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inquiries_from_outside_the_relay_get_403() {
    sipp();
    let relay_port = free_udp_port("127.0.0.1");
    let relay = format!("sip:127.0.0.1:{relay_port}");
    let agent = Agent::start(&[
        "--relay",
        &relay,
        "--no-register",
        "--service",
        "echo=builtin:echo",
    ])
    .await;

    let other_ip_port = free_udp_port("127.0.0.2");
    let out = run_sipp(
        agent.sip,
        "invite_forbidden.xml",
        "127.0.0.2",
        other_ip_port,
    )
    .await;
    assert_sipp_ok(&out, "invite_forbidden from 127.0.0.2", &agent);

    let mut other_port = free_udp_port("127.0.0.1");
    while other_port == relay_port {
        other_port = free_udp_port("127.0.0.1");
    }
    let out = run_sipp(agent.sip, "invite_forbidden.xml", "127.0.0.1", other_port).await;
    assert_sipp_ok(&out, "invite_forbidden from another port", &agent);

    agent
        .wait_for_nth("request from outside the relay refused", 2)
        .await;
    assert!(!agent.log().contains("inquiry accepted"), "{}", agent.log());
}

/// Over IPv6 end to end: sipp is the relay on `::1` (`--relay sip:[::1]:PORT`), the agent
/// listens on `[::1]` for SIP and data. sipp's INVITE gets a 200 whose Contact is
/// `<sip:as1@[::1]:PORT>` and whose SDP answer says `IN IP6 ::1` in `o=` and `c=` (sipp's
/// regexps); sipp logs the session token. The data gateway, reached at the answer's IPv6
/// address, refuses a wrong token and lets the right one through to the echo service; when
/// the terminal's side ends, the agent hangs up with a BYE sent to the relay over IPv6
/// (Via bracketed, checked by sipp), which the scenario must receive to pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sipp_inquiry_over_ipv6_gets_an_ip6_answer_and_gated_data() {
    sipp();
    let port = free_udp_port("::1");
    let relay = format!("sip:[::1]:{port}");
    let agent = Agent::start(&[
        "--relay",
        &relay,
        "--no-register",
        "--listen",
        "[::1]:0",
        "--data-listen",
        "[::1]:0",
        "--service",
        "echo=builtin:echo",
        "--bytes-per-charge",
        "0",
    ])
    .await;
    assert!(
        agent.sip.is_ipv6() && agent.data.is_ipv6(),
        "{} {}",
        agent.sip,
        agent.data
    );
    let ready = agent.wait_for("appsrv-agent ready").await;
    assert!(
        ready.contains("contact=sip:as1@[::1]:") && ready.contains(&format!("relay={relay}")),
        "{ready}"
    );

    let mut sipp = SippRun::start(agent.sip, "invite_ipv6_data.xml", "::1", port);
    let token = sipp.wait_logged("TOKEN").await;
    assert_eq!(token.len(), 32, "{token}");

    // The gate, over IPv6: a wrong token gets nothing through.
    let (mut bad, line) = present_token(agent.data, "00000000000000000000000000000000").await;
    assert_eq!(line, "ERR unknown token");
    assert!(
        read_to_end(&mut bad).await.is_empty(),
        "bytes after a refusal"
    );

    let (mut good, line) = present_token(agent.data, &token).await;
    assert_eq!(line, "OK");
    assert!(good.local_addr().unwrap().is_ipv6());
    let payload: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
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
        .expect("echo over IPv6 did not finish");
    assert!(back == payload, "echo over IPv6 changed the bytes");
    let attached = agent.wait_for("data connection attached").await;
    assert!(attached.contains("peer=[::1]:"), "{attached}");

    // The echo service ended: the agent's BYE reaches sipp over IPv6.
    let out = sipp.finish().await;
    assert_sipp_ok(&out, "invite_ipv6_data", &agent);
    let ended = agent.wait_for("session ended").await;
    assert!(
        ended.contains("backend closed") && ended.contains("bytes_in=50000"),
        "{ended}"
    );
    let bye = agent.wait_for("sending BYE").await;
    assert!(bye.contains(&format!("[::1]:{port}")), "{bye}");
}
