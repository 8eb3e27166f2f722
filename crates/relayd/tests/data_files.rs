//! Issue 14, finding 11: the files that hold secrets and money are readable by the relay's
//! user only — the billing store (`billing.db`, its `-wal` and `-shm`) in a data directory
//! of mode 0700, and the users file `relayd user add` writes (digest hashes) — where they
//! used to be created readable by every local user. Checked on the real programs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;

use support::ports::free_port;
use support::relay::{relayd_cmd, Relay, RelayConfig};
use support::TestDir;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .mode()
        & 0o7777
}

#[test]
fn the_billing_store_is_created_for_its_owner_only() {
    let dir = TestDir::new("relayd-files-");
    let relay = Relay::start(dir.path(), &RelayConfig::standard());
    let data = dir.path().join("data");
    assert_eq!(mode(&data), 0o700, "the data directory");
    assert_eq!(mode(&data.join("billing.db")), 0o600);
    // SQLite gives its WAL files the store's mode.
    for companion in ["billing.db-wal", "billing.db-shm"] {
        let path = data.join(companion);
        if path.exists() {
            assert_eq!(mode(&path), 0o600, "{companion}");
        }
    }
    drop(relay);
}

#[test]
fn a_store_an_older_relay_left_readable_by_others_is_narrowed_at_start() {
    let dir = TestDir::new("relayd-files-");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // An empty store file, as an older relay would have left it (0644).
    let store = data.join("billing.db");
    std::fs::write(&store, b"").unwrap();
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o644)).unwrap();
    let relay = Relay::start(dir.path(), &RelayConfig::standard());
    assert_eq!(mode(&store) & 0o007, 0, "{:o}", mode(&store));
    assert!(
        relay
            .log()
            .contains("billing store file was readable by others"),
        "{}",
        relay.log()
    );
}

#[test]
fn relayd_user_add_writes_the_users_file_for_its_owner_only() {
    let dir = TestDir::new("relayd-files-");
    let config = dir.path().join("relayd.toml");
    let text = RelayConfig::standard().to_toml(free_port(), &dir.path().join("data"));
    std::fs::write(&config, format!("users_file = \"users.toml\"\n{text}")).unwrap();
    relayd_cmd(&config)
        .args([
            "user",
            "add",
            "dave",
            "--plan",
            "basic",
            "--services",
            "echo",
        ])
        .write_stdin("dave-secret\n")
        .assert()
        .success();
    let users = dir.path().join("users.toml");
    assert_eq!(mode(&users), 0o600);
    assert!(std::fs::read_to_string(&users).unwrap().contains("dave"));
    assert!(!dir.path().join("users.toml.tmp").exists());
}
