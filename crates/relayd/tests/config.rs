//! The configuration as an operator meets it: `relayd` run as a process on good and bad
//! files, and `--help` on every command.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Output;

use assert_cmd::Command;

fn relayd() -> Command {
    let mut cmd = Command::cargo_bin("relayd").unwrap();
    cmd.env_remove("RELAYD_CONFIG").env_remove("RUST_LOG");
    cmd
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/relayd.toml")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn run(args: &[&str]) -> Output {
    relayd().args(args).output().unwrap()
}

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path
}

#[test]
fn bad_value_is_refused_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(dir.path(), "bad.toml", "[listen]\nudp = \"nowhere\"\n");
    let out = run(&["--config", bad.to_str().unwrap(), "check-config"]);
    assert!(!out.status.success());
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains(bad.to_str().unwrap()), "{stderr}");
    assert!(stderr.contains("key `listen.udp`"), "{stderr}");
    assert!(
        stderr.contains("expected a socket address like 127.0.0.1:5060, got \"nowhere\""),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "nothing printed as if it were fine");
}

#[test]
fn unknown_key_and_bad_reference_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(dir.path(), "typo.toml", "[registrar]\nmin_expire = 60\n");
    let out = run(&["--config", bad.to_str().unwrap(), "--check"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("typo.toml") && stderr.contains("key `registrar.min_expire`"),
        "{stderr}"
    );
    assert!(stderr.contains("unknown field `min_expire`"), "{stderr}");

    let bad = write(
        dir.path(),
        "rules.toml",
        "[[rules]]\nname = \"r\"\nmatch = { ruri_user = \"^v\" }\nset = { service = \"video\" }\n[[rules]]\nname = \"d\"\ndefault = true\n",
    );
    let out = run(&["--config", bad.to_str().unwrap(), "check-config"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("rules.toml") && stderr.contains("key `rules[0].set.service`"),
        "{stderr}"
    );
    assert!(stderr.contains("unknown service `video`"), "{stderr}");
}

#[test]
fn missing_file_is_refused_naming_it() {
    let out = run(&["--config", "/nonexistent/relayd.toml", "check-config"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("/nonexistent/relayd.toml"));
}

#[test]
fn example_checks_and_summarises() {
    let out = run(&["--config", example().to_str().unwrap(), "check-config"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for expected in [
        "listen: udp 127.0.0.1:5060; tcp 127.0.0.1:5060",
        "realm: relay.test",
        "data directory: ./relayd-data",
        "alice plan basic class standard services [echo, clock]",
        "bob plan premium class standard services [*]",
        "as1 services [*]",
        "sip:127.0.0.1:5080 [echo]",
        "sip:127.0.0.1:5081 [clock]",
        "configuration OK",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in\n{stdout}"
        );
    }
    // --check is the same, and the config may come from the environment.
    let out = relayd()
        .env("RELAYD_CONFIG", example())
        .arg("--check")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("realm: relay.test"));
}

#[test]
fn no_file_means_defaults() {
    let out = run(&["check-config"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("listen: udp 127.0.0.1:5060; tcp 127.0.0.1:5060"),
        "{stdout}"
    );
    assert!(stdout.contains("data directory: ./relayd-data"), "{stdout}");
}

#[test]
fn help_on_every_command() {
    for args in [
        vec!["--help"],
        vec!["run", "--help"],
        vec!["check-config", "--help"],
        vec!["user", "--help"],
        vec!["user", "add", "--help"],
        vec!["user", "remove", "--help"],
        vec!["billing", "--help"],
        vec!["billing", "report", "--help"],
        vec!["billing", "export", "--help"],
    ] {
        let out = run(&args);
        assert!(out.status.success(), "{args:?}");
        let stdout = text(&out.stdout);
        assert!(stdout.contains("Usage: relayd"), "{args:?}: {stdout}");
    }
    let out = run(&["billing", "report", "--help"]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("--since") && stdout.contains("--by"),
        "{stdout}"
    );
    assert!(text(&run(&["user", "add", "--help"]).stdout).contains("--services"));
    assert!(text(&run(&["billing", "export", "--help"]).stdout).contains("jsonl"));
}

#[test]
fn user_remove_edits_the_users_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "relayd.toml",
        "users_file = \"users.toml\"\n[[services]]\nname = \"echo\"\n[[tariffs]]\nname = \"basic\"\nplan = \"basic\"\nrate = 1\ncurrency = \"EUR\"\n",
    );
    let hash = "0".repeat(32);
    write(
        dir.path(),
        "users.toml",
        &format!("[[users]]\nname = \"carol\"\nha1_md5 = \"{hash}\"\nplan = \"basic\"\n[[users]]\nname = \"dave\"\nha1_md5 = \"{hash}\"\nplan = \"basic\"\n"),
    );
    let out = run(&[
        "--config",
        config.to_str().unwrap(),
        "user",
        "remove",
        "carol",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let users = std::fs::read_to_string(dir.path().join("users.toml")).unwrap();
    assert!(
        !users.contains("carol") && users.contains("dave"),
        "{users}"
    );
    let out = run(&[
        "--config",
        config.to_str().unwrap(),
        "user",
        "remove",
        "carol",
    ]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("not in"));
}

#[test]
fn user_add_stores_only_the_digest_hashes_of_the_password_it_reads() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "relayd.toml",
        "users_file = \"users.toml\"\n[relay]\nrealm = \"relay.test\"\n[[services]]\nname = \"echo\"\n[[tariffs]]\nname = \"basic\"\nplan = \"basic\"\nrate = 1\ncurrency = \"EUR\"\n",
    );
    let out = relayd()
        .args([
            "--config",
            config.to_str().unwrap(),
            "user",
            "add",
            "carol",
            "--plan",
            "basic",
            "--services",
            "echo",
        ])
        .write_stdin("s3cret-Pass\n")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let users = std::fs::read_to_string(dir.path().join("users.toml")).unwrap();
    assert!(
        !users.contains("s3cret-Pass"),
        "the password itself was written: {users}"
    );
    use sip_core::digest::{ha1, Algorithm};
    let md5 = ha1(Algorithm::Md5, "carol", "relay.test", "s3cret-Pass");
    let sha256 = ha1(Algorithm::Sha256, "carol", "relay.test", "s3cret-Pass");
    assert!(users.contains(&format!("ha1_md5 = \"{md5}\"")), "{users}");
    assert!(
        users.contains(&format!("ha1_sha256 = \"{sha256}\"")),
        "{users}"
    );
    // The configuration with the new user still loads.
    let out = run(&["--config", config.to_str().unwrap(), "check-config"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn a_user_holding_only_a_sha256_hash_must_be_offered_sha256() {
    let dir = tempfile::tempdir().unwrap();
    let base =
        "[[services]]\nname = \"echo\"\n[[tariffs]]\nname = \"t\"\nrate = 1\ncurrency = \"EUR\"\n\
                [[users]]\nname = \"carol\"\nplan = \"basic\"\nservices = [\"echo\"]\n";
    let sha = format!("ha1_sha256 = \"{}\"\n", "ab".repeat(32));
    // [auth] algorithms is MD5 alone by default: carol could never log in.
    let bad = write(dir.path(), "sha.toml", &format!("{base}{sha}"));
    let out = run(&["--config", bad.to_str().unwrap(), "check-config"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(bad.to_str().unwrap())
            && stderr.contains("key `users[0].digest_algorithms`: only ha1_sha256 is stored"),
        "{stderr}"
    );
    // Offered SHA-256, the same user is fine.
    let good = write(
        dir.path(),
        "sha-ok.toml",
        &format!("{base}{sha}digest_algorithms = [\"SHA-256\"]\n"),
    );
    let out = run(&["--config", good.to_str().unwrap(), "check-config"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}
