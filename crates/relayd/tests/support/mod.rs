//! The harness of relayd's cross-process tests: `relayd` run as a program on a configuration
//! written into a temporary directory, sipp (Debian's `sip-tester`) as terminals and as
//! application servers, a raw SIP client over UDP, and the billing store read back through
//! `relayd billing export`.
//!
//! * [`ports`]: loopback ports free for UDP and TCP;
//! * [`process`]: child processes killed when dropped;
//! * [`sipp`]: sipp terminals and servers, their logs, statistics and failure reports;
//! * [`sip`]: raw SIP: readiness probes and a digest-answering client;
//! * [`relay`]: the test configuration and the relayd process;
//! * [`billing`]: the billing export as JSON records;
//! * [`pg_server`]: a real PostgreSQL (Debian's `postgresql`) for relays sharing one database;
//! * [`scene`]: one test's world (directory, relay, servers), kept on failure.
//!
//! The system tests (`system.rs`, with `system_support`) use the generic parts of it too:
//! ports, process guards, waits, sipp, the relayd process and the billing export.
//!
//! Every wait is on a condition (a process exits, a log line appears, a counter moves, a
//! socket answers) and bounded; every process is killed by its own guard, by its pid, so a
//! failing test leaves nothing running. Each test binary compiles this module on its own and
//! uses part of it, hence `dead_code` is allowed here.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod billing;
/// A real PostgreSQL server started by the test (the billing crate's harness, shared).
#[path = "../../../billing/tests/support/pg_server.rs"]
pub mod pg_server;
pub mod ports;
pub mod process;
pub mod relay;
pub mod scene;
pub mod sip;
pub mod sipp;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long any one step (a start, a log line awaited, a terminal's whole run) may take
/// before the test gives up on it. Generous: the machine is shared with builds.
pub const STEP: Duration = Duration::from_secs(20);

/// The realm (and SIP domain) of every test relay.
pub const REALM: &str = "relay.test";

/// A user name and its password.
pub type Credentials<'a> = (&'a str, &'a str);

/// Subscriber alice (echo and clock in [`relay::RelayConfig::standard`]).
pub const ALICE: Credentials<'static> = ("alice", "alice-secret");
/// Subscriber bob (clock only in [`relay::RelayConfig::standard`]).
pub const BOB: Credentials<'static> = ("bob", "bob-secret");
/// Subscriber carol (echo in [`relay::RelayConfig::standard`]; for lockouts).
pub const CAROL: Credentials<'static> = ("carol", "carol-secret");
/// Application-server account as1.
pub const AS1: Credentials<'static> = ("as1", "as1-secret");
/// Application-server account as2.
pub const AS2: Credentials<'static> = ("as2", "as2-secret");

/// A test's temporary directory: removed when dropped, unless the test is failing (the
/// thread is panicking), when it is kept and its path printed.
pub struct TestDir(Option<tempfile::TempDir>);

impl TestDir {
    /// A fresh directory named `PREFIX…` in the system's temporary directory.
    pub fn new(prefix: &str) -> TestDir {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
        TestDir(Some(dir))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        self.0
            .as_ref()
            .map_or(Path::new(""), tempfile::TempDir::path)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            if std::thread::panicking() {
                let kept = dir.keep();
                eprintln!("test files kept in {}", kept.display());
            }
        }
    }
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A token unique in this test run, for branches, tags, Call-IDs and file names.
pub fn unique(prefix: &str) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(1);
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// A file's text (lossy), empty when it cannot be read (yet).
pub fn read_text(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
