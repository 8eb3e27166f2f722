//! Writes this relay's changes to the shared tables and announces them with `NOTIFY`, in
//! the order they were made. Each write and its announcement are one statement, so another
//! relay never hears of a change it cannot read yet.

use std::time::{Duration, Instant, SystemTime};

use tokio_postgres::Client;

use super::rows::{self, Note, Noted};
use super::{Change, ClusterError, CHANNEL};
use crate::directory::HealthChange;

/// How often rows whose registrations have all ended are deleted ([`sweep`]).
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

const UPSERT_BINDINGS: &str = "WITH written AS (
        INSERT INTO relayd.registrations (username, node, bindings, expires_ms)
        VALUES ($1, $2, $3, $4)
        ON CONFLICT (username) DO UPDATE
            SET node = EXCLUDED.node, bindings = EXCLUDED.bindings,
                expires_ms = EXCLUDED.expires_ms
        RETURNING 1)
    SELECT pg_notify($5, $6) FROM written";

const UPSERT_HEALTH: &str = "WITH written AS (
        INSERT INTO relayd.server_health (uri, up, node, changed_ms)
        VALUES ($1, $2, $3, $4)
        ON CONFLICT (uri) DO UPDATE
            SET up = EXCLUDED.up, node = EXCLUDED.node, changed_ms = EXCLUDED.changed_ms
        RETURNING 1)
    SELECT pg_notify($5, $6) FROM written";

/// Deletes the rows whose registrations have all ended.
pub async fn sweep(client: &Client) {
    let now = rows::epoch_ms(Instant::now(), Instant::now(), SystemTime::now());
    match client
        .execute(
            "DELETE FROM relayd.registrations WHERE expires_ms <= $1",
            &[&now],
        )
        .await
    {
        Ok(n) if n > 0 => tracing::debug!(rows = n, "ended registrations deleted"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "ended registrations not deleted"),
    }
}

/// Writes one change and announces it.
pub async fn write(client: &Client, node: &str, change: &Change) -> Result<(), ClusterError> {
    let now = Instant::now();
    let wall = SystemTime::now();
    match change {
        Change::Bindings { user, bindings } => {
            let (json, expires_ms) = rows::encode_bindings(bindings, now, wall)
                .map_err(|e| ClusterError::Row(e.to_string()))?;
            let note = note(node, Noted::Bindings { user: user.clone() })?;
            client
                .execute(
                    UPSERT_BINDINGS,
                    &[&user, &node, &json, &expires_ms, &CHANNEL, &note],
                )
                .await?;
            tracing::debug!(user, bindings = bindings.len(), "registration shared");
        }
        Change::Health { uri, change } => {
            let up = *change == HealthChange::Up;
            let note = note(
                node,
                Noted::Health {
                    uri: uri.clone(),
                    up,
                },
            )?;
            let at = rows::epoch_ms(now, now, wall);
            client
                .execute(UPSERT_HEALTH, &[&uri, &up, &node, &at, &CHANNEL, &note])
                .await?;
            tracing::debug!(uri, up, "server health shared");
        }
        Change::AuthFailure(failure) => {
            let note = note(
                node,
                Noted::AuthFailure {
                    user: failure.user.clone(),
                    source: failure.source,
                    weight: failure.weight,
                },
            )?;
            client
                .execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &note])
                .await?;
        }
    }
    Ok(())
}

fn note(node: &str, what: Noted) -> Result<String, ClusterError> {
    serde_json::to_string(&Note {
        node: node.to_owned(),
        what,
    })
    .map_err(|e| ClusterError::Row(e.to_string()))
}
