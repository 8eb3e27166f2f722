//! A third-party peer against `endpoint`: sipp (Debian's `sip-tester`) sends OPTIONS over UDP
//! and over TCP to a small UAS built on [`sip_core::endpoint`] and must get 200 OK.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use sip_core::endpoint::{Endpoint, EndpointConfig, EndpointEvent};
use sip_core::message;
use sip_core::transport::TransportConfig;

fn sipp_path() -> PathBuf {
    match std::process::Command::new("sipp").arg("-v").output() {
        Ok(_) => PathBuf::from("sipp"),
        Err(_) => panic!(
            "sipp is not installed: this test needs the Debian package `sip-tester` \
             (apt-get install -y sip-tester)"
        ),
    }
}

/// Starts a UAS answering every OPTIONS with 200 and anything else with 405; returns its
/// UDP and TCP addresses and how many OPTIONS it answered.
async fn start_uas() -> (
    SocketAddr,
    SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let config = EndpointConfig {
        transport: TransportConfig {
            udp: vec!["127.0.0.1:0".parse().unwrap()],
            tcp: vec!["127.0.0.1:0".parse().unwrap()],
            ..TransportConfig::default()
        },
        ..EndpointConfig::default()
    };
    let (endpoint, mut events) = Endpoint::bind(config).await.unwrap();
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = answered.clone();
    let udp = endpoint.local_addr(sip_core::Transport::Udp).unwrap();
    let tcp = endpoint.local_addr(sip_core::Transport::Tcp).unwrap();
    tokio::spawn(async move {
        let _keep = endpoint;
        while let Some(event) = events.recv().await {
            if let EndpointEvent::Request(r) = event {
                let code = if r.req.method == rsip::Method::Options {
                    200
                } else {
                    405
                };
                let resp = message::response_for(&r.req, code, None, Some(&message::new_tag()));
                r.tx.respond(resp).unwrap();
                if code == 200 {
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
        }
    });
    (udp, tcp, answered)
}

async fn run_sipp(target: SocketAddr, transport: &str, calls: u32) -> std::process::Output {
    let scenario =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios/options_uac.xml");
    let child = tokio::process::Command::new(sipp_path())
        .arg(target.to_string())
        .args(["-sf", scenario.to_str().unwrap()])
        .args(["-t", transport])
        .args(["-i", "127.0.0.1"])
        .args(["-m", &calls.to_string(), "-r", "50"])
        .args(["-timeout", "20s", "-timeout_error"])
        .arg("-nostdin")
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("sipp did not finish within 60 s")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sipp_options_over_udp_and_tcp_get_200() {
    let (udp, tcp, answered) = start_uas().await;
    for (target, transport) in [(udp, "u1"), (tcp, "t1")] {
        let before = answered.load(std::sync::atomic::Ordering::SeqCst);
        let out = run_sipp(target, transport, 5).await;
        assert!(
            out.status.success(),
            "sipp over {transport} failed ({:?}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let after = answered.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            after - before >= 5,
            "UAS answered {} OPTIONS over {transport}",
            after - before
        );
    }
}
