//! Applies the other relays' changes to this relay's memory: the current rows at start-up,
//! then each change announced on [`super::CHANNEL`]. What is applied here is not announced
//! again (no ping-pong), and this relay's own announcements are skipped.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::sync::mpsc;
use tokio_postgres::Client;

use super::rows::{self, Note, Noted};
use super::ClusterError;
use crate::auth::SharedFailure;
use crate::directory::HealthChange;
use crate::registrar::Binding;

/// Where remote changes are applied: the relay's registrar and directory, without
/// publishing them again.
pub trait SharedState: Send + Sync + 'static {
    /// `user` now has exactly `bindings` (none: it is no longer registered anywhere).
    fn apply_bindings(&self, user: &str, bindings: Vec<Binding>);
    /// Another relay's probes saw the server at `uri` go up or down.
    fn apply_health(&self, uri: &str, change: HealthChange);
    /// An authentication attempt failed on another relay: count it here too.
    fn apply_auth_failure(&self, failure: SharedFailure);
}

/// The other relays' changes, as they come. Made by [`super::Cluster::connect`].
pub struct Listener {
    client: Arc<Client>,
    node: Arc<str>,
    notes: mpsc::UnboundedReceiver<String>,
}

impl Listener {
    pub(super) fn new(
        client: Arc<Client>,
        node: Arc<str>,
        notes: mpsc::UnboundedReceiver<String>,
    ) -> Listener {
        Listener {
            client,
            node,
            notes,
        }
    }

    /// Loads the registrations that have not ended and the servers' health as the rows
    /// hold them now. Called once at start-up, after `LISTEN`: what changes meanwhile is
    /// announced and applied again by [`Listener::run`], which is harmless.
    pub async fn load(&self, state: &dyn SharedState) -> Result<(), ClusterError> {
        let now = Instant::now();
        let wall = SystemTime::now();
        let now_ms = rows::epoch_ms(now, now, wall);
        let registrations = self
            .client
            .query(
                "SELECT username, bindings FROM relayd.registrations WHERE expires_ms > $1",
                &[&now_ms],
            )
            .await?;
        for row in &registrations {
            let user: String = row.try_get(0)?;
            let json: String = row.try_get(1)?;
            apply_row(state, &user, &json, now, wall);
        }
        let health = self
            .client
            .query("SELECT uri, up FROM relayd.server_health", &[])
            .await?;
        for row in &health {
            let uri: String = row.try_get(0)?;
            let up: bool = row.try_get(1)?;
            state.apply_health(&uri, Noted::health_change(up));
        }
        tracing::info!(
            registrations = registrations.len(),
            servers = health.len(),
            "shared state loaded"
        );
        Ok(())
    }

    /// Applies the other relays' announced changes until the connection ends.
    pub async fn run<S: SharedState>(mut self, state: Arc<S>) {
        while let Some(payload) = self.notes.recv().await {
            let note: Note = match serde_json::from_str(&payload) {
                Ok(note) => note,
                Err(e) => {
                    tracing::warn!(error = %e, payload, "unreadable shared-state notification");
                    continue;
                }
            };
            if *note.node == *self.node {
                continue;
            }
            if let Err(e) = self.apply(&*state, &note).await {
                tracing::warn!(error = %e, node = note.node, "remote change not applied");
            }
        }
        tracing::error!("shared-state notifications stopped; other relays' changes no longer seen");
    }

    async fn apply(&self, state: &dyn SharedState, note: &Note) -> Result<(), ClusterError> {
        match &note.what {
            Noted::Bindings { user } => {
                let row = self
                    .client
                    .query_opt(
                        "SELECT bindings FROM relayd.registrations WHERE username = $1",
                        &[user],
                    )
                    .await?;
                let json = match row {
                    Some(row) => row.try_get::<_, String>(0)?,
                    None => "[]".to_owned(),
                };
                apply_row(state, user, &json, Instant::now(), SystemTime::now());
                tracing::debug!(user, node = note.node, "registration from another relay");
            }
            Noted::Health { uri, up } => {
                state.apply_health(uri, Noted::health_change(*up));
            }
            Noted::AuthFailure {
                user,
                source,
                weight,
            } => state.apply_auth_failure(SharedFailure {
                user: user.clone(),
                source: *source,
                weight: *weight,
            }),
        }
        Ok(())
    }
}

fn apply_row(state: &dyn SharedState, user: &str, json: &str, now: Instant, wall: SystemTime) {
    match rows::decode_bindings(user, json, now, wall) {
        Ok((bindings, errors)) => {
            for e in errors {
                tracing::warn!(user, error = %e, "stored binding not readable; skipped");
            }
            state.apply_bindings(user, bindings);
        }
        Err(e) => tracing::warn!(user, error = %e, "stored registration not readable; skipped"),
    }
}
