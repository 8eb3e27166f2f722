//! Applies the other relays' changes to this relay's memory: the current rows at start-up,
//! then each change announced on [`super::CHANNEL`]. What is applied here is not announced
//! again (no ping-pong), and this relay's own announcements are skipped. The same task
//! writes this relay's changes ([`super::publish`]) on the same connection, in order, and
//! connects again when the connection is lost.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;

use super::rows::{self, Note, Noted};
use super::{publish, Change, ClusterError, Connection};
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

/// How long to wait before connecting again, at first and at most.
const RECONNECT_FIRST: Duration = Duration::from_secs(1);
const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// The relay's side of the shared state, once started: applies the other relays' changes as
/// they are announced and writes this relay's own, in order, on one connection, connecting
/// again when it is lost. Made by [`super::Cluster::connect`].
pub struct Listener {
    url: String,
    node: Arc<str>,
    connection: Connection,
    changes: mpsc::Receiver<Change>,
}

impl Listener {
    pub(super) fn new(
        url: &str,
        node: Arc<str>,
        connection: Connection,
        changes: mpsc::Receiver<Change>,
    ) -> Listener {
        Listener {
            url: url.to_owned(),
            node,
            connection,
            changes,
        }
    }

    /// Loads the registrations and the servers' health as the rows hold them now: at
    /// start-up, after `LISTEN` (what changes meanwhile is announced and applied again,
    /// which is harmless), and after connecting again (rows emptied meanwhile remove what
    /// this relay still holds).
    pub async fn load(&self, state: &dyn SharedState) -> Result<(), ClusterError> {
        let client = &self.connection.client;
        let now = Instant::now();
        let wall = SystemTime::now();
        let registrations = client
            .query("SELECT username, bindings FROM relayd.registrations", &[])
            .await?;
        for row in &registrations {
            let user: String = row.try_get(0)?;
            let json: String = row.try_get(1)?;
            apply_row(state, &user, &json, now, wall);
        }
        let health = client
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

    /// Applies the other relays' announced changes and writes this relay's until every
    /// [`super::Cluster`] handle is gone, connecting again whenever the connection is lost.
    pub async fn run<S: SharedState>(mut self, state: Arc<S>) {
        let mut pending: Option<Change> = None;
        loop {
            if self.serve(&*state, &mut pending).await.is_break() {
                return;
            }
            tracing::error!(
                queued = pending.is_some(),
                "shared state unreachable: serving from memory, connecting again"
            );
            self.reconnect(&*state).await;
            tracing::info!("shared state reachable again");
        }
    }

    /// Serves the current connection until it is lost (`Continue`) or the handles are gone
    /// (`Break`). A change whose write met a lost connection is left in `pending`.
    async fn serve(
        &mut self,
        state: &dyn SharedState,
        pending: &mut Option<Change>,
    ) -> ControlFlow<()> {
        let mut sweep = tokio::time::interval(publish::SWEEP_INTERVAL);
        loop {
            if let Some(change) = pending.take() {
                let client = &self.connection.client;
                if let Err(e) = publish::write(client, &self.node, &change).await {
                    if client.is_closed() {
                        *pending = Some(change);
                        return ControlFlow::Continue(());
                    }
                    tracing::warn!(error = %e, ?change, "change not written to the shared state");
                }
                continue;
            }
            tokio::select! {
                note = self.connection.notes.recv() => match note {
                    Some(payload) => self.on_note(state, &payload).await,
                    None => return ControlFlow::Continue(()),
                },
                change = self.changes.recv() => match change {
                    Some(change) => *pending = Some(change),
                    None => return ControlFlow::Break(()),
                },
                _ = sweep.tick() => publish::sweep(&self.connection.client).await,
            }
        }
    }

    async fn reconnect(&mut self, state: &dyn SharedState) {
        let mut delay = RECONNECT_FIRST;
        loop {
            // A back-off between attempts, not a wait for something to happen.
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RECONNECT_MAX);
            match Connection::open(&self.url).await {
                Ok(connection) => {
                    self.connection = connection;
                    match self.load(state).await {
                        Ok(()) => return,
                        Err(e) => tracing::warn!(error = %e, "shared state not loaded again"),
                    }
                }
                Err(e) => tracing::warn!(error = %e, "shared state still unreachable"),
            }
        }
    }

    async fn on_note(&self, state: &dyn SharedState, payload: &str) {
        let note: Note = match serde_json::from_str(payload) {
            Ok(note) => note,
            Err(e) => {
                tracing::warn!(error = %e, payload, "unreadable shared-state notification");
                return;
            }
        };
        if *note.node == *self.node {
            return;
        }
        if let Err(e) = self.apply(state, &note).await {
            tracing::warn!(error = %e, node = note.node, "remote change not applied");
        }
    }

    async fn apply(&self, state: &dyn SharedState, note: &Note) -> Result<(), ClusterError> {
        match &note.what {
            Noted::Bindings { user } => {
                let row = self
                    .connection
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
