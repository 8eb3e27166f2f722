//! The shared state's tables, in schema `relayd`, created and upgraded by versioned
//! migrations. Relays starting together take turns under an advisory lock, so each
//! migration runs once.

use tokio_postgres::Client;

use super::ClusterError;

/// The advisory lock key relays hold while they migrate (`relayd` in ASCII).
const LOCK_KEY: i64 = i64::from_be_bytes(*b"\0\0relayd");

/// The migrations, in order; the schema's version is how many have run.
pub const MIGRATIONS: &[&str] = &[
    // 1: registrations (one row per user: its bindings as JSON, with absolute expiry
    // times) and the servers' health as the relays' probes last saw it.
    "CREATE TABLE relayd.registrations (
         username   text PRIMARY KEY,
         node       text NOT NULL,
         bindings   text NOT NULL,
         expires_ms bigint NOT NULL
     );
     CREATE INDEX registrations_expiry ON relayd.registrations (expires_ms);
     CREATE TABLE relayd.server_health (
         uri        text PRIMARY KEY,
         up         boolean NOT NULL,
         node       text NOT NULL,
         changed_ms bigint NOT NULL
     );",
];

/// Brings schema `relayd` up to the last of [`MIGRATIONS`].
pub async fn migrate(client: &Client) -> Result<(), ClusterError> {
    let run = async {
        client
            .batch_execute(&format!(
                "SELECT pg_advisory_lock({LOCK_KEY});
                 CREATE SCHEMA IF NOT EXISTS relayd;
                 CREATE TABLE IF NOT EXISTS relayd.schema_version (version integer NOT NULL);"
            ))
            .await?;
        let version: i32 = client
            .query_opt("SELECT max(version) FROM relayd.schema_version", &[])
            .await?
            .and_then(|row| row.get::<_, Option<i32>>(0))
            .unwrap_or(0);
        let done = usize::try_from(version).unwrap_or(0);
        for (i, migration) in MIGRATIONS.iter().enumerate().skip(done) {
            let next = i32::try_from(i + 1).unwrap_or(i32::MAX);
            client
                .batch_execute(&format!(
                    "BEGIN; {migration}; INSERT INTO relayd.schema_version VALUES ({next}); COMMIT;"
                ))
                .await?;
            tracing::info!(version = next, "relayd schema migrated");
        }
        Ok::<_, tokio_postgres::Error>(())
    };
    let result = run.await;
    // Unlocked whatever happened: a failed migration rolled back and leaves it to the next.
    let unlocked = client
        .batch_execute(&format!("ROLLBACK; SELECT pg_advisory_unlock({LOCK_KEY});"))
        .await;
    result.map_err(ClusterError::Schema)?;
    unlocked.map_err(ClusterError::Schema)
}
