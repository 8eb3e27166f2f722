//! Real SIP terminals through relayd on the shipped `examples/relayd.toml` (issue 12).
//!
//! Each test starts relayd on the example configuration changed only where a test must
//! (its listen port, data_dir, metrics port, and the ports of the static echo and clock
//! servers), so the shipped settings, `[auth]` digest defaults first, are what the client
//! meets. The echo server (`sip:127.0.0.1:5080` in the example) is played by sipp with
//! `tests/interop/echo_uas.xml`: it answers the softphones' audio offers (appsrv-agent refuses
//! audio with 488). The client is driven by its script in `tests/interop/` (the same ones
//! `scripts/interop.sh` runs): register alice with digest, call `sip:echo@relay.test`, hold
//! the call 2 s once the client says it is established, hang up. The test then checks the
//! client's own events and that exactly one session record for alice/echo exists, with a
//! duration near the hold, ended by the caller's BYE.
//!
//! Every process is bounded in time and killed by its own guard (pid); every wait is on a
//! condition. A client that is not installed makes its test FAIL, naming the Debian or PyPI
//! package to install (`.ci/run` installs them all).
//!
//! Run: `cargo test -p relayd --test interop -- --nocapture`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::billing::{field, int};
use support::ports::free_port;
use support::process::Guard;
use support::relay::Relay;
use support::sip::options_ping;
use support::sipp::{sipp, Transport};
use support::{read_text, tail, wait_until, TestDir, STEP};

/// How long the client holds the established call before hanging up.
const HOLD: Duration = Duration::from_secs(2);
/// The bound a driver puts on its whole run (`--timeout`).
const DRIVER_TIMEOUT: Duration = Duration::from_secs(45);
/// How long the test waits for a driver before killing it.
const DRIVER_KILL: Duration = Duration::from_secs(60);
/// Exit status of a driver whose client is not installed.
const EXIT_MISSING: i32 = 3;

/// The directory of the drivers, scenarios and templates.
fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop")
}

/// The shipped example configuration.
fn example_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/relayd.toml")
}

/// `text` with the one line equal to `old` (trimmed) replaced by `new`; panics when the
/// example does not have exactly one such line, so that a change of the example is noticed.
fn replace_line(text: &str, old: &str, new: &str) -> String {
    let hits = text.lines().filter(|l| l.trim() == old).count();
    assert_eq!(
        hits, 1,
        "examples/relayd.toml should have the line {old:?} exactly once (has it {hits} times)"
    );
    let mut out: String = text
        .lines()
        .map(|l| if l.trim() == old { new } else { l })
        .collect::<Vec<_>>()
        .join("\n");
    out.push('\n');
    out
}

/// The world of one test: relayd on the example configuration and the echo server.
struct World {
    dir: TestDir,
    relay: Relay,
    echo: Guard,
    echo_port: u16,
}

impl World {
    fn start(name: &str) -> World {
        let dir = TestDir::new(&format!("interop-{name}-"));
        let echo_port = free_port();
        let echo = start_echo(dir.path(), echo_port);

        let port = free_port();
        let text = read_text(&example_config());
        assert!(
            !text.is_empty(),
            "cannot read {}",
            example_config().display()
        );
        let data = dir.path().join("data");
        let mut text = replace_line(
            &text,
            "udp = \"127.0.0.1:5060\"",
            &format!("udp = \"127.0.0.1:{port}\""),
        );
        text = replace_line(
            &text,
            "tcp = \"127.0.0.1:5060\"",
            &format!("tcp = \"127.0.0.1:{port}\""),
        );
        text = replace_line(
            &text,
            "data_dir = \"./relayd-data\"",
            &format!("data_dir = {:?}", data.display().to_string()),
        );
        text = replace_line(
            &text,
            "listen = \"127.0.0.1:9060\"",
            &format!("listen = \"127.0.0.1:{}\"", free_port()),
        );
        text = replace_line(
            &text,
            "uri = \"sip:127.0.0.1:5080\"",
            &format!("uri = \"sip:127.0.0.1:{echo_port}\""),
        );
        // Nothing runs there: the clock server is only probed (and found down).
        text = replace_line(
            &text,
            "uri = \"sip:127.0.0.1:5081\"",
            &format!("uri = \"sip:127.0.0.1:{}\"", free_port()),
        );
        let config = dir.path().join("relayd.toml");
        std::fs::write(&config, text).unwrap();
        let relay = Relay::start_with(&config, port);
        World {
            dir,
            relay,
            echo,
            echo_port,
        }
    }

    /// Everything that tells what happened, for a failure message.
    fn report(&self, run: &DriverRun) -> String {
        format!(
            "--- driver {} (exit {:?}) stdout:\n{}\n--- driver stderr (tail):\n{}\n--- relayd log (tail):\n{}\n--- echo server (port {}) messages (tail):\n{}",
            run.client,
            run.status,
            run.stdout,
            tail(&run.stderr, 60),
            tail(&self.relay.log(), 40),
            self.echo_port,
            tail(&read_text(&self.dir.path().join("echo.messages")), 40),
        )
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.echo.kill();
    }
}

/// sipp as the echo server on 127.0.0.1:`port` (answering OPTIONS probes, echoing RTP);
/// returns once it answers an OPTIONS.
fn start_echo(dir: &Path, port: u16) -> Guard {
    let mut cmd = Command::new(sipp());
    cmd.arg("-sf")
        .arg(interop_dir().join("echo_uas.xml"))
        .args([
            "-i",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-mi",
            "127.0.0.1",
        ])
        .args(["-mp", &free_port().to_string()])
        .args([
            "-rtp_echo",
            "-aa",
            "-nostdin",
            "-trace_msg",
            "-message_file",
        ])
        .arg(dir.join("echo.messages"))
        .args(["-trace_err", "-error_file"])
        .arg(dir.join("echo.errors"))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("echo.out")).unwrap())
        .stderr(std::fs::File::create(dir.join("echo.stderr")).unwrap());
    let mut echo = Guard::spawn(cmd, "sipp echo server");
    let ok = wait_until(STEP, || {
        echo.try_wait().is_some() || options_ping(port, Transport::Udp)
    });
    if let Some(status) = echo.try_wait() {
        panic!(
            "the sipp echo server exited at start ({status})\n{}",
            read_text(&dir.join("echo.stderr"))
        );
    }
    assert!(ok, "the sipp echo server never answered OPTIONS on {port}");
    echo
}

/// The python that runs the drivers: `$INTEROP_PYTHON`, else the venv `.ci/run` makes for
/// pjsua2 (`${XDG_CACHE_HOME:-$HOME/.cache}/service-relay/interop-venv`), else `python3`.
fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("INTEROP_PYTHON") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    if let Some(cache) = cache {
        let venv = cache.join("service-relay/interop-venv/bin/python");
        if venv.is_file() {
            return venv;
        }
    }
    PathBuf::from("python3")
}

/// What a driver did.
struct DriverRun {
    client: String,
    status: Option<i32>,
    stdout: String,
    stderr: String,
    /// Its JSON lines, in order (events, then the result).
    lines: Vec<Value>,
}

impl DriverRun {
    /// The names of its events, in order.
    fn events(&self) -> Vec<&str> {
        self.lines
            .iter()
            .filter_map(|v| v["event"].as_str())
            .collect()
    }

    /// Its result line (`{"result": "pass" | "fail" | "missing", "reason": …}`).
    fn result(&self) -> &Value {
        self.lines
            .iter()
            .rev()
            .find(|v| v.get("result").is_some())
            .unwrap_or(&Value::Null)
    }
}

/// Runs `tests/interop/CLIENT_call.py` against the world's relay, bounded by
/// [`DRIVER_KILL`], killed by its pid if it overruns.
fn drive(world: &World, client: &str) -> DriverRun {
    let dir = world.dir.path().join(client);
    std::fs::create_dir_all(&dir).unwrap();
    let (out, err) = (dir.join("driver.out"), dir.join("driver.err"));
    let python = python();
    let mut cmd = Command::new(&python);
    cmd.arg(interop_dir().join(format!("{client}_call.py")))
        .args(["--relay", &format!("127.0.0.1:{}", world.relay.port)])
        .args([
            "--domain",
            "relay.test",
            "--user",
            "alice",
            "--password",
            "alice-secret",
        ])
        .args(["--service", "echo"])
        .args(["--hold", &HOLD.as_secs_f64().to_string()])
        .args(["--timeout", &DRIVER_TIMEOUT.as_secs().to_string()])
        .arg("--workdir")
        .arg(&dir)
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap());
    let mut guard = Guard::spawn(
        cmd,
        &format!(
            "{} for the {client} driver (python 3: Debian package python3)",
            python.display()
        ),
    );
    let status = guard.wait_timeout(DRIVER_KILL);
    if status.is_none() {
        // SIGTERM first: the driver then kills its client by pid; SIGKILL if it lingers.
        guard.try_signal("TERM");
        guard.wait_timeout(Duration::from_secs(5));
        guard.kill();
    }
    let stdout = read_text(&out);
    let lines = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let run = DriverRun {
        client: client.to_string(),
        status: status.and_then(|s| s.code()),
        stdout,
        stderr: read_text(&err),
        lines,
    };
    if status.is_none() {
        panic!(
            "the {client} driver was still running after {DRIVER_KILL:?}: killed\n{}",
            world.report(&run)
        );
    }
    run
}

/// The whole check for one client: it registered, its call was established and closed (its
/// own events), and the relay billed exactly one alice/echo session lasting about the hold.
fn call_echo(client: &str) {
    let world = World::start(client);
    let run = drive(&world, client);
    let result = run.result().clone();
    if run.status == Some(EXIT_MISSING) || result["result"] == "missing" {
        panic!(
            "{client} is not installed, so this test cannot run: {}",
            result["reason"].as_str().unwrap_or("(no reason given)")
        );
    }
    assert!(
        run.status == Some(0) && result["result"] == "pass",
        "{client} did not complete register, call, hold, hang-up: {}\n{}",
        result["reason"].as_str().unwrap_or("(no result line)"),
        world.report(&run)
    );
    assert_eq!(
        run.events(),
        ["registered", "established", "closed"],
        "{client}'s events\n{}",
        world.report(&run)
    );

    // The record is committed before the relay answers the BYE; a client may report the
    // call closed before that answer arrives.
    let alice_echo = |records: &[Value]| -> Vec<Value> {
        records
            .iter()
            .filter(|r| field(r, "subscriber") == "alice" && field(r, "service") == "echo")
            .cloned()
            .collect()
    };
    let mut records = Vec::new();
    wait_until(STEP, || {
        records = world.relay.sessions();
        !alice_echo(&records).is_empty()
    });
    let mine = alice_echo(&records);
    assert_eq!(
        mine.len(),
        1,
        "{client}: wanted exactly one session record for alice/echo, got {records:#?}\n{}",
        world.report(&run)
    );
    assert_eq!(
        records.len(),
        1,
        "{client}: other records too: {records:#?}"
    );
    let record = &mine[0];
    let duration = int(record, "duration_ms");
    let hold = i64::try_from(HOLD.as_millis()).unwrap();
    assert!(
        (hold - 200..=hold + 2500).contains(&duration),
        "{client}: the session lasted {duration} ms, the call was held {hold} ms: {record:#}"
    );
    assert_eq!(field(record, "cause"), "caller-bye", "{record:#}");
    assert_eq!(
        field(record, "server"),
        format!("sip:127.0.0.1:{}", world.echo_port),
        "{record:#}"
    );
    eprintln!(
        "{client}: registered, established, held, closed; billed {duration} ms ({})",
        field(record, "session_id")
    );
}

/// pjsua2 2.15 (PyPI `pjsua2-python`), null audio device.
#[test]
fn pjsua2_calls_echo() {
    call_echo("pjsua2");
}

/// baresip 1.0 (Debian `baresip-core`) over ctrl_tcp. It gives up on a 401 that carries a
/// challenge it does not know (SHA-256 beside MD5), so this holds the shipped `[auth]`
/// default to MD5 alone.
#[test]
fn baresip_calls_echo() {
    call_echo("baresip");
}

/// linphone-daemon 5.1 (Debian `linphone-cli`): its Contact carries
/// `+sip.instance="<urn:uuid:…>"`, on INVITE too, which the relay must read to make the
/// dialog.
#[test]
fn linphone_calls_echo() {
    call_echo("linphone");
}

/// sipsak 0.9.8 (Debian `sipsak`) with request files: REGISTER, INVITE, ACK, BYE.
#[test]
fn sipsak_calls_echo() {
    call_echo("sipsak");
}

/// sipp 3.6 (Debian `sip-tester`) as a softphone, with an audio offer.
#[test]
fn sipp_calls_echo() {
    call_echo("sipp");
}
