//! One test's world: a temporary directory, the relay and the sipp application servers,
//! with a failure report over all of them. When the test fails, the directory
//! (configuration, relay logs, sipp logs and message traces) is kept and its path printed.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;

use super::relay::{Relay, RelayConfig};
use super::sipp::{Sipp, SippOpts};
use super::{tail, unique, Credentials, TestDir, STEP};

/// A test's directory, relay and servers; dropping it kills them all. Fields drop in
/// declaration order: the processes (their guards kill them), then the directory.
pub struct Scene {
    relay: Option<Relay>,
    servers: Vec<Sipp>,
    dir: TestDir,
}

impl Default for Scene {
    fn default() -> Self {
        Self::new()
    }
}

impl Scene {
    /// An empty scene in a fresh temporary directory.
    pub fn new() -> Scene {
        Scene {
            relay: None,
            servers: Vec::new(),
            dir: TestDir::new("relayd-test-"),
        }
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts an application server `name` running `scenario_file` with `opts` on a free
    /// port, answering OPTIONS itself, and waits until it answers one. Returns its port.
    pub fn server(&mut self, name: &str, scenario_file: &str, opts: impl Into<SippOpts>) -> u16 {
        let server = Sipp::server(self.dir(), name, scenario_file, opts.into());
        let port = server.port;
        self.servers.push(server);
        port
    }

    /// The application server named `name`.
    pub fn server_named(&self, name: &str) -> &Sipp {
        self.servers
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no server {name}"))
    }

    /// The application server named `name`, to kill it.
    pub fn server_named_mut(&mut self, name: &str) -> &mut Sipp {
        self.servers
            .iter_mut()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no server {name}"))
    }

    /// Writes `config` and starts relayd; returns once it answers OPTIONS.
    pub fn start_relay(&mut self, config: &RelayConfig) {
        self.relay = Some(Relay::start(self.dir(), config));
    }

    /// Starts relayd again on the same configuration and port (the running one, if any, is
    /// killed first); returns once it answers OPTIONS.
    pub fn restart_relay(&mut self) {
        let mut old = self.relay.take().expect("the relay was never started");
        old.kill();
        self.relay = Some(Relay::start_with(&old.config, old.port));
    }

    /// The relay.
    pub fn relay(&self) -> &Relay {
        self.relay.as_ref().expect("the relay is not started")
    }

    /// The relay, to stop it.
    pub fn relay_mut(&mut self) -> &mut Relay {
        self.relay.as_mut().expect("the relay is not started")
    }

    /// Starts a terminal `name` running `scenario_file` against the relay as `user` asking
    /// for `service`, with `opts` (one call unless they say otherwise).
    pub fn terminal(
        &self,
        name: &str,
        scenario_file: &str,
        user: Credentials<'_>,
        service: &str,
        opts: impl Into<SippOpts>,
    ) -> Sipp {
        let port = self.relay().port;
        Sipp::terminal(
            self.dir(),
            name,
            scenario_file,
            port,
            user,
            Some(service),
            opts.into(),
        )
    }

    /// Waits for `sipp` to exit and asserts it succeeded (exit status 0: every call of the
    /// scenario went as written).
    pub fn assert_success(&self, sipp: &mut Sipp) {
        let status = sipp.wait_exit(STEP);
        assert!(
            status.success(),
            "{} failed ({status})\n{}",
            sipp.name,
            self.report(Some(sipp))
        );
    }

    /// An out-of-dialog charge request (charge_request.xml) from `account` with `body`;
    /// returns the status line of the relay's final answer.
    pub fn charge(&self, account: Credentials<'_>, body: &str) -> String {
        let mut sipp = Sipp::terminal(
            self.dir(),
            &unique("charge-"),
            "charge_request.xml",
            self.relay().port,
            account,
            None,
            SippOpts::keys(&[("body", body)]),
        );
        self.assert_success(&mut sipp);
        sipp.log()
            .iter()
            .find_map(|l| l.strip_prefix("STATUS "))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no status logged for charge {body}\n{}", sipp.report()))
    }

    /// The session records of the billing store.
    pub fn session_records(&self) -> Vec<Value> {
        self.relay().sessions()
    }

    /// The charge records of the billing store.
    pub fn charge_records(&self) -> Vec<Value> {
        self.relay().charges()
    }

    /// Everything worth reading when a test fails: `focus`, every server, the relay's log.
    pub fn report(&self, focus: Option<&Sipp>) -> String {
        let mut s = String::new();
        if let Some(sipp) = focus {
            s.push_str(&sipp.report());
        }
        for server in &self.servers {
            s.push_str(&server.report());
        }
        if let Some(relay) = &self.relay {
            let log = relay.log();
            let _ = writeln!(
                s,
                "--- relayd log {} (end):\n{}",
                relay.log_path().display(),
                tail(&log, 60)
            );
        }
        s
    }
}
