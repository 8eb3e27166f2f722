//! Reloading the configuration without dropping calls (`SIGHUP`, `relayd ctl reload`).
//!
//! The file the relay started with is read and checked again as at start-up (types,
//! references, rules, servers, tariffs). A file with a problem is refused whole, with its
//! name and the key at fault, and the configuration in force stays. A good file replaces:
//!
//! * users (and the users file), server accounts, services, rules, classes, session limits
//!   and the charge limits of `[billing]` — the [`Settings`] every new request takes;
//! * the static `[[servers]]` — an entry that stays keeps its health, its session count and
//!   a drain; registered servers are untouched;
//! * `[[tariffs]]` — for sessions that start afterwards. A live session keeps the tariff it
//!   started with: it was journaled with the session, and its record is priced from that.
//!
//! Other sections, and a few keys of the reloaded ones, take effect only with a restart (see
//! [`RESTART_SECTIONS`] and [`RESTART_KEYS`]); a reload that changes one says which in its
//! answer and in the log.

use std::path::PathBuf;

use tracing::{info, warn};

use crate::config::Config;
use crate::relay::Relay;
use crate::settings::Settings;

/// The sections a reload does not apply: listen addresses, TLS, storage, the admin and
/// metrics listeners, the realm and domains, logging, SIP timers and transport limits,
/// digest authentication, the registrar's and the directory's policies.
pub const RESTART_SECTIONS: [&str; 12] = [
    "listen",
    "tls",
    "storage",
    "admin",
    "metrics",
    "relay",
    "log",
    "sip",
    "limits",
    "auth",
    "registrar",
    "directory",
];

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// The file read.
    pub file: PathBuf,
    /// Subscribers now configured.
    pub users: usize,
    /// Services now configured.
    pub services: usize,
    /// Rules now configured.
    pub rules: usize,
    /// Static servers added and removed.
    pub servers_added: usize,
    /// Static servers removed.
    pub servers_removed: usize,
    /// The sections that changed but need a restart to take effect.
    pub restart_needed: Vec<&'static str>,
}

/// Why a reload was refused; the configuration in force stays. The message names the file
/// and, when it is about one, the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ReloadRefused(pub String);

/// The keys of reloaded sections that still take effect only with a restart: the billing
/// writer's timings, the ringing time the transaction layer's
/// INVITE deadline was sized for at start-up, and the digest algorithms offered per user or
/// account (the authenticator's).
pub const RESTART_KEYS: [&str; 5] = [
    "billing.commit_interval_ms",
    "billing.touch_interval_secs",
    "session.answer_timeout_secs",
    "session.inquiry_timeout_ms",
    "digest_algorithms",
];

/// The sections of [`RESTART_SECTIONS`] and the keys of [`RESTART_KEYS`] that differ between
/// `old` and `new`.
pub fn restart_needed(old: &Config, new: &Config) -> Vec<&'static str> {
    let differs = [
        old.listen != new.listen,
        old.tls != new.tls,
        old.storage != new.storage,
        old.admin != new.admin,
        old.metrics != new.metrics,
        old.relay != new.relay,
        old.log != new.log,
        old.sip != new.sip,
        old.limits != new.limits,
        old.auth != new.auth,
        old.registrar != new.registrar,
        old.directory != new.directory,
    ];
    let keys_differ = [
        old.billing.commit_interval_ms != new.billing.commit_interval_ms,
        old.billing.touch_interval_secs != new.billing.touch_interval_secs,
        old.session.answer_timeout_secs != new.session.answer_timeout_secs,
        old.session.inquiry_timeout_ms != new.session.inquiry_timeout_ms,
        old.digest_algorithms_by_user() != new.digest_algorithms_by_user(),
    ];
    RESTART_SECTIONS
        .iter()
        .zip(differs)
        .chain(RESTART_KEYS.iter().zip(keys_differ))
        .filter(|(_, differs)| *differs)
        .map(|(name, _)| *name)
        .collect()
}

/// Reads the relay's configuration file again and puts what it may change in force, or
/// refuses it whole.
pub fn reload(relay: &Relay) -> Result<Reloaded, ReloadRefused> {
    let result = try_reload(relay);
    match &result {
        Ok(done) => info!(
            file = %done.file.display(),
            users = done.users,
            services = done.services,
            rules = done.rules,
            servers_added = done.servers_added,
            servers_removed = done.servers_removed,
            restart_needed = ?done.restart_needed,
            "configuration reloaded"
        ),
        Err(refused) => warn!(
            error = %refused,
            "configuration reload refused; the configuration in force stays"
        ),
    }
    result
}

fn try_reload(relay: &Relay) -> Result<Reloaded, ReloadRefused> {
    let Some(file) = relay.config.source.clone() else {
        return Err(ReloadRefused(
            "relayd runs on its built-in defaults (no --config): there is no file to read again"
                .into(),
        ));
    };
    let new = Config::load(&file).map_err(|e| ReloadRefused(e.to_string()))?;
    let name = file.display();
    let directory = new
        .build_directory()
        .map_err(|e| ReloadRefused(format!("{name}: key `servers`: {e}")))?;
    let tariffs = new
        .tariff_table()
        .map_err(|e| ReloadRefused(e.to_string()))?;
    let restart = restart_needed(&relay.config, &new);
    let done = Reloaded {
        file: file.clone(),
        users: new.all_users().count(),
        services: new.services.len(),
        rules: new.rules.len(),
        servers_added: 0,
        servers_removed: 0,
        restart_needed: restart,
    };
    let settings =
        Settings::build(new, &relay.realm).map_err(|e| ReloadRefused(format!("{name}: {e:#}")))?;
    // Everything is built: nothing below can fail, so nothing is applied half.
    let (servers_added, servers_removed) = relay.directory.replace_statics(&directory);
    relay.billing.replace_tariffs(tariffs);
    relay.replace_settings(settings);
    Ok(Reloaded {
        servers_added,
        servers_removed,
        ..done
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::path::Path;

    fn config(text: &str) -> Config {
        Config::parse(text, Path::new("relayd.toml")).unwrap()
    }

    #[test]
    fn only_changed_restart_sections_are_named() {
        let old = config("[listen]\nudp = [\"127.0.0.1:5060\"]\n");
        let same = config("[listen]\nudp = [\"127.0.0.1:5060\"]\n[[users]]\nname = \"bob\"\npassword = \"pw\"\nplan = \"basic\"\nservices = [\"*\"]\n");
        assert!(restart_needed(&old, &same).is_empty());
        let moved = config(
            "[listen]\nudp = [\"127.0.0.1:5062\"]\n[metrics]\nlisten = \"127.0.0.1:9100\"\n",
        );
        assert_eq!(restart_needed(&old, &moved), ["listen", "metrics"]);
        let timed = config(
            "[listen]\nudp = [\"127.0.0.1:5060\"]\n[billing]\nmax_charge = 5\ncommit_interval_ms = 7\n",
        );
        assert_eq!(
            restart_needed(&old, &timed),
            ["billing.commit_interval_ms"],
            "max_charge is reloaded, the writer's interval is not"
        );
        let user =
            "[[users]]\nname = \"dave\"\npassword = \"pw\"\nplan = \"basic\"\nservices = [\"*\"]\n";
        let plain = config(&format!("[listen]\nudp = [\"127.0.0.1:5060\"]\n{user}"));
        let sha = config(&format!(
            "[listen]\nudp = [\"127.0.0.1:5060\"]\n{user}digest_algorithms = [\"SHA-256\"]\n"
        ));
        assert!(restart_needed(&old, &plain).is_empty());
        assert_eq!(restart_needed(&old, &sha), ["digest_algorithms"]);
    }
}
