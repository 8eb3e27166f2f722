//! The part of the configuration a reload replaces while calls go on (`SIGHUP`, `relayd ctl
//! reload`; see [`crate::reload`]): the configuration as last read, with what is built from
//! it on each request — the users' and server accounts' credentials, the compiled rules,
//! the session limits. A request takes the [`Settings`] in force when it starts and keeps
//! them to its end; a reload swaps in new ones for the requests after it.

use std::collections::HashMap;

use sip_core::digest::StoredCredential;

use crate::call::SessionLimits;
use crate::config::{Config, Secret};
use crate::rules::RuleSet;

/// The reloadable settings. See the [module documentation](self).
pub struct Settings {
    /// The configuration as last (re)loaded. Keys that need a restart (listen addresses,
    /// TLS, storage, the admin listener, the realm) are read from the relay's start-up
    /// configuration instead.
    pub config: Config,
    credentials: HashMap<String, StoredCredential>,
    /// The rules that decide service and client information.
    pub rules: RuleSet,
    /// Session timing limits.
    pub limits: SessionLimits,
}

fn stored_credential(
    user: &str,
    realm: &str,
    secret: Secret<'_>,
    key: &str,
) -> anyhow::Result<StoredCredential> {
    match secret {
        Secret::Password(p) => Ok(StoredCredential::from_password(user, realm, p)),
        Secret::Ha1 { md5, sha256 } => StoredCredential::from_ha1(md5, sha256)
            .map_err(|e| anyhow::anyhow!("{key}: bad HA1 hash for {user}: {e}")),
    }
}

impl Settings {
    /// Builds the settings of a validated configuration, the credentials for `realm` (the
    /// realm in force: it changes only with a restart).
    pub fn build(config: Config, realm: &str) -> anyhow::Result<Settings> {
        let mut credentials = HashMap::new();
        for (i, user) in config.all_users().enumerate() {
            let c = stored_credential(&user.name, realm, user.secret(), &format!("users[{i}]"))?;
            credentials.insert(user.name.clone(), c);
        }
        for (i, account) in config.server_accounts.iter().enumerate() {
            let c = stored_credential(
                &account.name,
                realm,
                account.secret(),
                &format!("server_accounts[{i}]"),
            )?;
            credentials.insert(account.name.clone(), c);
        }
        let rules = config.build_rules().map_err(|e| anyhow::anyhow!("{e}"))?;
        let limits = config.session_limits();
        Ok(Settings {
            config,
            credentials,
            rules,
            limits,
        })
    }

    /// The stored credential of a user or a server account.
    pub fn credential(&self, user: &str) -> Option<StoredCredential> {
        self.credentials.get(user).cloned()
    }
}
