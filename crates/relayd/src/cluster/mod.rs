//! Several relays serving as one, on one PostgreSQL database (issue 15, `[storage] backend =
//! "postgres"`).
//!
//! Each relay keeps its in-memory [`Registrar`](crate::registrar::Registrar) and
//! [`Directory`](crate::directory::Directory) as the fast lookup path. What it changes there
//! itself it also writes to the database and announces with `NOTIFY` ([`publish`]); every
//! relay `LISTEN`s and applies what the others announce ([`listen`]), without announcing it
//! again, and loads the current rows when it starts. Rows carry absolute expiry times
//! (milliseconds of the Unix epoch, [`rows`]), so every relay expires a registration at the
//! same moment without being told; the relays' clocks must agree (NTP).
//!
//! Shared: terminal registrations (a terminal registered through one relay may call through
//! any), application-server registrations and with them the dynamic entries of the service
//! directory, the health the relays' probes see (a server one relay takes out is out for
//! all, until some relay's probes see it answer again), and failed authentication attempts
//! (announced only, no table: each relay counts every relay's failures, so a user is locked
//! out everywhere once its failures on all relays add up). Not shared: sessions (each stays
//! on the relay that admitted it), static `[[servers]]` (each relay's configuration) and
//! nonces.
//!
//! A registration learned from another relay has no source connection here: this relay did
//! not receive the REGISTER. That is all this product needs: terminals call in (the
//! registration only admits their requests, checked by user name), and application servers
//! are called at their Contact URI, where the agent listens, so this relay opens its own
//! connection to it as for a configured server.
//!
//! One database connection serves a relay (within `[storage] pool_size`): it carries the
//! `LISTEN`, the reads of announced rows and the writes, in order. When it is lost the relay
//! serves on from memory, keeps its own changes queued, connects again (backing off from 1 s
//! to 30 s), loads the rows again and writes what it queued. The node name tags every
//! announcement, so a relay skips its own; two relays with the same name would ignore each
//! other.

pub mod listen;
pub mod publish;
pub mod rows;
pub mod schema;

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls};

use crate::auth::{FailureSink, SharedFailure};
use crate::directory::HealthChange;
use crate::registrar::Binding;

/// The `application_name` of the shared-state connections.
pub const APPLICATION_NAME: &str = "relayd shared state";

/// The channel every relay `LISTEN`s on.
pub const CHANNEL: &str = "relayd_changes";

/// The most changes of this relay waiting to be written, and the most announcements of the
/// others waiting to be applied. Past it a change or an announcement is dropped and counted
/// ([`Cluster::dropped`]): failed logins are announced, and a stranger's flood of them while
/// the database is away (or a peer's) must not grow memory without bound. A dropped
/// registration is shared again at its next refresh.
pub const MAX_QUEUED: usize = 10_000;

/// Why the shared state is not available.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The database could not be reached or refused the connection.
    #[error("connecting to PostgreSQL: {0}")]
    Connect(#[source] tokio_postgres::Error),
    /// The schema could not be brought up to date.
    #[error("migrating the relayd schema: {0}")]
    Schema(#[source] tokio_postgres::Error),
    /// A query failed.
    #[error("PostgreSQL query: {0}")]
    Query(#[from] tokio_postgres::Error),
    /// A stored row could not be read back.
    #[error("stored row: {0}")]
    Row(String),
}

/// A local change to write and announce.
#[derive(Debug, Clone)]
pub enum Change {
    /// The bindings a user has now (all of them; empty when it has none left).
    Bindings {
        /// The user (address of record).
        user: String,
        /// Its bindings after the change.
        bindings: Vec<Binding>,
    },
    /// A server's probes changed its state.
    Health {
        /// The server's URI as configured or registered.
        uri: String,
        /// Up or down.
        change: HealthChange,
    },
    /// An authentication attempt failed here.
    AuthFailure(SharedFailure),
}

/// One open connection, migrated and `LISTEN`ing: the client, and the notifications it
/// receives (the channel ends when the connection does).
pub struct Connection {
    client: Client,
    notes: mpsc::Receiver<String>,
}

impl Connection {
    /// Connects to `url`, brings the schema up to date and `LISTEN`s on [`CHANNEL`].
    pub async fn open(url: &str) -> Result<Connection, ClusterError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(ClusterError::Connect)?;
        // Named, so an operator tells it from the billing store's in pg_stat_activity.
        config.application_name(APPLICATION_NAME);
        let (client, mut connection) =
            config.connect(NoTls).await.map_err(ClusterError::Connect)?;
        let (notes_tx, notes) = mpsc::channel(MAX_QUEUED);
        // The connection carries the queries' answers and the notifications; it runs until
        // the client is dropped or the server goes away.
        tokio::spawn(async move {
            let mut dropped: u64 = 0;
            loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        // Never wait here: this task also carries the answers the listener
                        // may be waiting for.
                        match notes_tx.try_send(n.payload().to_owned()) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Full(_)) => {
                                dropped += 1;
                                if dropped.is_power_of_two() {
                                    tracing::warn!(
                                        dropped,
                                        "shared-state announcements dropped: {MAX_QUEUED} waiting"
                                    );
                                }
                            }
                            Err(mpsc::error::TrySendError::Closed(_)) => break,
                        }
                    }
                    Some(Ok(AsyncMessage::Notice(notice))) => {
                        tracing::debug!(notice = %notice, "PostgreSQL notice");
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::error!(error = ?e, "shared-state database connection lost");
                        break;
                    }
                    None => break,
                }
            }
        });
        schema::migrate(&client).await?;
        client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await
            .map_err(ClusterError::Query)?;
        Ok(Connection { client, notes })
    }
}

/// This relay's handle on the shared state: local changes go through it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Cluster {
    node: Arc<str>,
    changes: mpsc::Sender<Change>,
    dropped: Arc<std::sync::atomic::AtomicU64>,
}

impl Cluster {
    /// Connects to the database at `url` as relay `node`, brings the schema up to date and
    /// starts `LISTEN`ing. Returns the handle and the [`listen::Listener`] that loads the
    /// current state, applies the other relays' changes, writes this relay's, and connects
    /// again when the connection is lost.
    pub async fn connect(
        url: &str,
        node: &str,
    ) -> Result<(Cluster, listen::Listener), ClusterError> {
        let connection = Connection::open(url).await?;
        let node: Arc<str> = Arc::from(node);
        let (changes, changes_rx) = mpsc::channel(MAX_QUEUED);
        tracing::info!(node = %node, "shared state on PostgreSQL");
        let listener = listen::Listener::new(url, node.clone(), connection, changes_rx);
        Ok((
            Cluster {
                node,
                changes,
                dropped: Arc::default(),
            },
            listener,
        ))
    }

    /// This relay's node name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Writes and announces the bindings `user` has now, after a REGISTER handled here.
    pub fn publish_bindings(&self, user: &str, bindings: &[Binding]) {
        self.send(Change::Bindings {
            user: user.to_owned(),
            bindings: bindings.to_vec(),
        });
    }

    /// Writes and announces a change of health this relay's probes saw.
    pub fn publish_health(&self, uri: &str, change: HealthChange) {
        self.send(Change::Health {
            uri: uri.to_owned(),
            change,
        });
    }

    /// Announces a failed authentication attempt counted here.
    pub fn publish_auth_failure(&self, failure: SharedFailure) {
        self.send(Change::AuthFailure(failure));
    }

    /// Local changes dropped because [`MAX_QUEUED`] were waiting to be written.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn send(&self, change: Change) {
        match self.changes.try_send(change) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(change)) => {
                let n = self
                    .dropped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // Said once per power of two, not once per change of a flood.
                if n.is_power_of_two() || n == 0 {
                    tracing::warn!(
                        dropped = n + 1,
                        ?change,
                        "shared-state queue full; change not shared"
                    );
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::error!("shared-state writer stopped; change not shared");
            }
        }
    }
}

impl FailureSink for Cluster {
    fn failed(&self, failure: SharedFailure) {
        self.publish_auth_failure(failure);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn changes_past_the_queue_are_dropped_and_counted_not_kept() {
        let (changes, mut queued) = mpsc::channel(MAX_QUEUED);
        let cluster = Cluster {
            node: Arc::from("relay-a"),
            changes,
            dropped: Arc::default(),
        };
        // The database is away: nothing takes the changes. A stranger's failed logins.
        let failure = || SharedFailure {
            user: Some("mallory".into()),
            source: "127.0.0.1".parse().unwrap(),
            weight: 100,
        };
        for _ in 0..MAX_QUEUED + 500 {
            cluster.publish_auth_failure(failure());
        }
        assert_eq!(cluster.dropped(), 500);
        let mut kept = 0;
        while queued.try_recv().is_ok() {
            kept += 1;
        }
        assert_eq!(kept, MAX_QUEUED);
    }
}
