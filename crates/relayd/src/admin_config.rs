//! `[admin]`: the admin listener — JSON over HTTP/1.1 for `relayd ctl` and operators'
//! scripts (see [`crate::admin`]).
//!
//! ```toml
//! [admin]
//! listen = "127.0.0.1:5070"     # absent (the default): no admin listener
//! token_file = "admin.token"    # or token = "…" (at least 16 characters)
//! # public = true               # needed to listen on an address other than loopback
//! ```
//!
//! Every API route asks for `Authorization: Bearer <token>`. `token_file` is relative to
//! the configuration file's directory; its content, less the surrounding white space, is the
//! token. The token is never logged nor shown in a message: [`AdminToken`]'s `Debug` hides
//! it.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The shortest token accepted: a guessable one protects nothing.
pub const MIN_TOKEN_LEN: usize = 16;

/// The default number of admin connections served at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16;

/// The admin bearer token. Its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(transparent)]
pub struct AdminToken(String);

impl AdminToken {
    /// A token of this text.
    pub fn new(text: impl Into<String>) -> AdminToken {
        AdminToken(text.into())
    }

    /// The token's bytes, for the constant-time comparison and for `relayd ctl`.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<hidden>)")
    }
}

/// `[admin]`. See the [module documentation](self).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "an [admin] table")]
pub struct AdminConfig {
    /// Where the admin listener listens; absent: no listener.
    pub listen: Option<SocketAddr>,
    /// The bearer token, written in the file (prefer `token_file`).
    pub token: Option<AdminToken>,
    /// A file holding the bearer token, relative to the configuration file's directory.
    pub token_file: Option<PathBuf>,
    /// Whether `listen` may be an address other than loopback.
    pub public: bool,
    /// How many connections are served at once; more are closed at once.
    pub max_connections: usize,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: None,
            token: None,
            token_file: None,
            public: false,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

impl AdminConfig {
    /// The token in force, read from `token` or `token_file` (relative to `base_dir`):
    /// `None` when neither is set. A problem comes as (key, message); the message never
    /// holds the token.
    pub fn load_token(&self, base_dir: &Path) -> Result<Option<AdminToken>, (String, String)> {
        let text = match (&self.token, &self.token_file) {
            (Some(_), Some(_)) => {
                return Err((
                    "admin.token_file".into(),
                    "give `token` or `token_file`, not both".into(),
                ))
            }
            (None, None) => return Ok(None),
            (Some(token), None) => token.0.trim().to_owned(),
            (None, Some(file)) => {
                let path = base_dir.join(file);
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    (
                        "admin.token_file".to_owned(),
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                text.trim().to_owned()
            }
        };
        let key = if self.token.is_some() {
            "admin.token"
        } else {
            "admin.token_file"
        };
        if text.chars().count() < MIN_TOKEN_LEN {
            return Err((
                key.into(),
                format!("the token must have at least {MIN_TOKEN_LEN} characters"),
            ));
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err((
                key.into(),
                "the token must be printable ASCII without spaces (it travels in an HTTP header)"
                    .into(),
            ));
        }
        Ok(Some(AdminToken(text)))
    }

    /// Every problem of the section, as (key, message).
    pub fn problems(&self, base_dir: &Path) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let token = self.load_token(base_dir);
        if let Err(problem) = &token {
            problems.push(problem.clone());
        }
        if let Some(addr) = self.listen {
            if matches!(token, Ok(None)) {
                problems.push((
                    "admin.token".into(),
                    "the admin listener needs `token` or `token_file`".into(),
                ));
            }
            if !addr.ip().is_loopback() && !self.public {
                problems.push((
                    "admin.listen".into(),
                    format!("{addr} is not a loopback address: set `public = true` to serve the admin API there"),
                ));
            }
        }
        if self.max_connections == 0 {
            problems.push(("admin.max_connections".into(), "must be at least 1".into()));
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn admin(text: &str) -> AdminConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn the_token_is_never_shown_by_debug() {
        let config = admin("listen = \"127.0.0.1:9\"\ntoken = \"s3cret-s3cret-s3cret\"\n");
        assert!(!format!("{config:?}").contains("s3cret"));
        assert!(config.problems(Path::new(".")).is_empty());
    }

    #[test]
    fn a_listener_without_a_token_or_off_loopback_is_refused_by_key() {
        let keys = |c: &AdminConfig| -> Vec<String> {
            c.problems(Path::new("."))
                .into_iter()
                .map(|p| p.0)
                .collect()
        };
        assert_eq!(keys(&admin("listen = \"127.0.0.1:9\"")), ["admin.token"]);
        let short = admin("listen = \"127.0.0.1:9\"\ntoken = \"short\"");
        let problems = short.problems(Path::new("."));
        assert_eq!(problems[0].0, "admin.token");
        assert!(!problems[0].1.contains("short"), "{problems:?}");
        assert_eq!(
            keys(&admin(
                "listen = \"0.0.0.0:9\"\ntoken = \"0123456789abcdef\""
            )),
            ["admin.listen"]
        );
        assert!(keys(&admin(
            "listen = \"0.0.0.0:9\"\ntoken = \"0123456789abcdef\"\npublic = true"
        ))
        .is_empty());
        assert_eq!(
            keys(&admin(
                "token = \"0123456789abcdef\"\ntoken_file = \"t\"\nlisten = \"[::1]:9\""
            )),
            ["admin.token_file"]
        );
        // Off by default: nothing to check.
        assert!(keys(&AdminConfig::default()).is_empty());
    }

    #[test]
    fn a_token_file_is_read_relative_to_the_base_directory_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("admin.token"), "0123456789abcdef\n").unwrap();
        let config = admin("listen = \"127.0.0.1:9\"\ntoken_file = \"admin.token\"");
        let token = config.load_token(dir.path()).unwrap().unwrap();
        assert_eq!(token.expose(), "0123456789abcdef");
        let missing = admin("listen = \"127.0.0.1:9\"\ntoken_file = \"nope\"");
        let (key, message) = missing.load_token(dir.path()).unwrap_err();
        assert_eq!(key, "admin.token_file");
        assert!(message.contains("nope"), "{message}");
    }
}
