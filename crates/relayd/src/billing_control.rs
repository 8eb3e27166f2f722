//! Between the sessions and the `billing` crate: journals a session when it is confirmed,
//! keeps its last-seen time fresh while it lives, writes its record when it ends, records
//! application charges, and runs crash recovery at start-up.
//!
//! The store is the one `[storage]` names: the SQLite file `data_dir/billing.db` (one relay,
//! node `""`), or a PostgreSQL database shared by several relays. There each relay journals
//! its sessions under its `[storage] node` name, renews its lease on them with every touch,
//! recovers only its own at start-up, and closes (`relay-lost`) those of a relay whose lease
//! has expired ([`BillingControl::claim_loop`]).
//!
//! Every write goes through the group-committing writer thread, so the signalling tasks never
//! block on the disk; each call resolves only once its transaction is committed, which is
//! what lets a session answer a BYE only after its record is durable.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use billing::backend::{AnyStore, StorageBackend};
use billing::record::{ChargeRecord, EndCause, SessionRecord};
use billing::store::{CloseSession, EndedSession, NewCharge, OpenSession};
use billing::tariff::TariffTable;
use billing::writer::{Writer, WriterConfig, WriterHandle};
use billing::BillingError;
use tracing::{info, warn};

/// Opens the billing store of `[storage]` (from configuration file `file`) read-only,
/// for reports: on PostgreSQL every relay's records.
pub fn open_read_only(backend: &StorageBackend, file: &Path) -> anyhow::Result<AnyStore> {
    if let StorageBackend::Sqlite { path } = backend {
        if !path.exists() {
            anyhow::bail!(
                "{}: no billing store yet (relayd has not run with this data_dir)",
                path.display()
            );
        }
    }
    AnyStore::open_read_only(backend).map_err(|e| open_error(backend, file, e))
}

/// An error opening the store, naming the key (and file) that chose it.
fn open_error(backend: &StorageBackend, file: &Path, e: BillingError) -> anyhow::Error {
    match backend {
        StorageBackend::Sqlite { path } => anyhow::Error::new(e).context(format!(
            "storage.data_dir in {}: opening the billing store {}",
            file.display(),
            path.display()
        )),
        StorageBackend::Postgres { .. } => anyhow::Error::new(e).context(format!(
            "storage.url in {}: opening the billing store",
            file.display()
        )),
    }
}

/// Milliseconds since the Unix epoch, the time unit of billing records.
pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// When a billing segment started, on both clocks: the wall clock gives the record its
/// timestamps, the monotonic clock its duration, so that a step of the wall clock (NTP, an
/// operator's `date`) while a session lives moves neither its duration nor its bill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentClock {
    wall: SystemTime,
    mono: Instant,
}

impl SegmentClock {
    /// A segment starting at wall-clock `wall`, which is monotonic instant `mono`.
    pub fn start(wall: SystemTime, mono: Instant) -> SegmentClock {
        SegmentClock { wall, mono }
    }

    /// A segment starting now.
    pub fn now() -> SegmentClock {
        SegmentClock::start(SystemTime::now(), Instant::now())
    }

    /// The wall-clock start, as the record carries it.
    pub fn started_at(&self) -> SystemTime {
        self.wall
    }

    /// The monotonic instant the segment started.
    pub fn started_mono(&self) -> Instant {
        self.mono
    }

    /// The wall-clock end of a segment ending at monotonic instant `mono_now`: the start
    /// plus the monotonic time elapsed, whatever the wall clock says meanwhile.
    pub fn end_at(&self, mono_now: Instant) -> SystemTime {
        self.wall + mono_now.saturating_duration_since(self.mono)
    }
}

/// What a session tells billing when it is confirmed.
#[derive(Debug, Clone)]
pub struct SessionStart {
    /// The relay's session id.
    pub session_id: String,
    /// The terminal leg's Call-ID.
    pub call_id: String,
    /// The authenticated subscriber.
    pub subscriber: String,
    /// The service delivered.
    pub service: String,
    /// The application server delivering it (its URI).
    pub server: String,
    /// The server leg's Call-ID: a late charge may name the session by it.
    pub server_call_id: String,
    /// The application-server account that speaks for the server, if any: the only one
    /// whose charges may name the session.
    pub account: Option<String>,
    /// The tariff plan decided for this request.
    pub plan: String,
    /// When billing starts: the moment the 2xx went to the terminal, wall-clock time.
    pub confirmed_at: SystemTime,
}

/// The relay's billing control. Shared by every call. It keeps no list of the sessions
/// (the calls own them, the store journals them): only how many are open.
pub struct BillingControl {
    writer: WriterHandle,
    /// Replaced whole by a reload; a session journals the tariff it started with.
    tariffs: std::sync::RwLock<std::sync::Arc<TariffTable>>,
    live: AtomicUsize,
    /// The store, for logs: the SQLite file or the database URL without its password.
    location: String,
    /// The node this relay journals its sessions under (see
    /// [`StorageConfig::billing_node`](crate::config::StorageConfig::billing_node)).
    node: String,
}

impl BillingControl {
    /// Opens (creating or migrating it if needed) the billing store `[storage]` names in
    /// configuration file `file` — with SQLite in `data_dir`, which it creates — and starts
    /// its writer, committing at most once per `commit_interval`. The returned [`Writer`]
    /// must be kept and shut down when the relay stops.
    pub fn open(
        backend: &StorageBackend,
        node: &str,
        file: &Path,
        tariffs: TariffTable,
        commit_interval: std::time::Duration,
    ) -> anyhow::Result<(BillingControl, Writer)> {
        if let StorageBackend::Sqlite { path } = backend {
            if let Some(data_dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(data_dir).with_context(|| {
                    format!("creating the data directory {}", data_dir.display())
                })?;
            }
        }
        // On a thread of its own: PostgreSQL's synchronous client runs a runtime of its own,
        // which cannot start on a thread of the relay's (this runs during start-up, within
        // it); the store then lives on the writer's thread.
        let opened = std::thread::scope(|scope| {
            scope
                .spawn(|| AnyStore::open(backend))
                .join()
                .map_err(|_| anyhow::anyhow!("opening the billing store: the thread panicked"))
        })?;
        let store = opened.map_err(|e| open_error(backend, file, e))?;
        let location = match &store {
            AnyStore::Sqlite(s) => s.path().display().to_string(),
            AnyStore::Postgres(s) => s.target().to_owned(),
        };
        let writer = Writer::spawn_with(
            store,
            WriterConfig {
                commit_interval,
                ..WriterConfig::default()
            },
        )
        .context("starting the billing writer")?;
        let control = BillingControl {
            writer: writer.handle(),
            tariffs: std::sync::RwLock::new(std::sync::Arc::new(tariffs)),
            live: AtomicUsize::new(0),
            location,
            node: node.to_owned(),
        };
        Ok((control, writer))
    }

    /// Puts `tariffs` in force for the sessions (and billing segments) journaled from now
    /// on (a reload). A live session keeps the tariff journaled with it.
    pub fn replace_tariffs(&self, tariffs: TariffTable) {
        *self.tariffs.write().unwrap_or_else(|p| p.into_inner()) = std::sync::Arc::new(tariffs);
    }

    /// The store, for logs: the SQLite file, or the PostgreSQL database's URL without
    /// its password.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// The node name this relay journals its sessions under (`""` with SQLite).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Closes every session a crash of this relay (this node) left open (cause
    /// `recovered-after-restart`), once; other relays' sessions are theirs.
    pub async fn recover(&self) -> anyhow::Result<Vec<SessionRecord>> {
        let records = self
            .writer
            .recover(&self.node, unix_ms(SystemTime::now()))
            .await
            .context("recovering sessions left open by the last run")?;
        for r in &records {
            info!(session_id = %r.session_id, call_id = %r.call_id, duration_ms = r.duration_ms, "closed a session left open by the last run");
        }
        info!(
            node = %self.node,
            count = records.len(),
            "billing recovery done"
        );
        Ok(records)
    }

    /// Closes, as `relay-lost`, every session of other relays whose lease has expired
    /// (not renewed for `lease`), each billed up to its last-seen time; logs each.
    pub async fn claim_lost(&self, lease: Duration) -> anyhow::Result<Vec<SessionRecord>> {
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        let records = self
            .writer
            .claim_lost(&self.node, lease_ms, unix_ms(SystemTime::now()))
            .await
            .context("closing the sessions of relays whose lease expired")?;
        for r in &records {
            info!(session_id = %r.session_id, call_id = %r.call_id, subscriber = %r.subscriber,
                duration_ms = r.duration_ms, charge = %r.charge,
                "closed a session of a relay whose lease expired (relay-lost)");
        }
        Ok(records)
    }

    /// Runs [`BillingControl::claim_lost`] every `every` until the relay stops; a failure
    /// (the database unreachable) is logged and the next round tries again.
    pub async fn claim_loop(self: std::sync::Arc<Self>, every: Duration, lease: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.claim_lost(lease).await {
                warn!(error = %format!("{e:#}"), "claiming the sessions of lost relays failed");
            }
        }
    }

    /// Journals a confirmed session; resolves once committed.
    pub async fn session_confirmed(&self, start: SessionStart) -> anyhow::Result<()> {
        let tariffs =
            std::sync::Arc::clone(&self.tariffs.read().unwrap_or_else(|p| p.into_inner()));
        let tariff = tariffs
            .lookup(&start.service, &start.plan)
            .with_context(|| {
                format!(
                    "no tariff for service {} plan {}",
                    start.service, start.plan
                )
            })?
            .clone();
        let id = start.session_id.clone();
        self.writer
            .open_session(OpenSession {
                node: self.node.clone(),
                session_id: start.session_id,
                call_id: start.call_id,
                subscriber: start.subscriber,
                service: start.service,
                server: start.server,
                server_call_id: start.server_call_id,
                account: start.account,
                plan: start.plan,
                tariff,
                confirmed_at_ms: unix_ms(start.confirmed_at),
            })
            .await
            .with_context(|| format!("journaling session {id}"))?;
        self.live.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Ends a session: its record is committed when this resolves.
    pub async fn session_ended(
        &self,
        session_id: &str,
        cause: EndCause,
        ended_at: SystemTime,
    ) -> anyhow::Result<SessionRecord> {
        let closed = self
            .writer
            .close_session(CloseSession {
                session_id: session_id.to_string(),
                ended_at_ms: unix_ms(ended_at),
                cause,
            })
            .await;
        let record = match closed {
            Ok(record) => record,
            Err(e @ BillingError::UnknownSession { .. }) => {
                // Closed already, and billed once: by another relay as relay-lost while this
                // one could not renew its lease (cut off from the database). No second
                // record; the session no longer counts as live here.
                warn!(session_id, "session closed already (billed by another relay as relay-lost?); no record written");
                self.decrement_live();
                return Err(anyhow::Error::new(e).context(format!("closing session {session_id}")));
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!("closing session {session_id}")))
            }
        };
        self.decrement_live();
        Ok(record)
    }

    /// One live session fewer; never below zero, whatever order the counts come in.
    fn decrement_live(&self) {
        let _ = self
            .live
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Records an application charge; `true` in the result when the event id was already
    /// charged (nothing new stored).
    pub async fn charge(
        &self,
        charge: NewCharge,
    ) -> Result<(ChargeRecord, bool), billing::BillingError> {
        self.writer.record_charge(charge).await
    }

    /// The session whose id or Call-ID (either leg's) is `key` and whose record was
    /// committed within `grace` before now: what a late charge names. The lookup runs on
    /// the writer, after every commit submitted before it.
    pub async fn ended_session(
        &self,
        key: &str,
        grace: Duration,
    ) -> anyhow::Result<Option<EndedSession>> {
        let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
        let since_ms = unix_ms(SystemTime::now()).saturating_sub(grace_ms);
        self.writer
            .find_ended(key, since_ms)
            .await
            .context("looking up an ended session in the billing store")
    }

    /// The billing writer's counters.
    pub fn writer_stats(&self) -> billing::writer::WriterStats {
        self.writer.stats()
    }

    /// How many sessions are live (journaled and not yet closed).
    pub fn live_sessions(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Refreshes the last-seen time of every open session of this relay in one statement,
    /// renewing its lease on them (crash recovery, or another relay's claim, closes a
    /// session at that time, see the `billing` crate).
    pub async fn touch_live(&self) {
        if self.live_sessions() == 0 {
            return;
        }
        let now = unix_ms(SystemTime::now());
        if let Err(e) = self.writer.touch_all_open(&self.node, now).await {
            warn!(error = %e, "refreshing last-seen times of live sessions failed");
        }
    }

    /// Runs [`BillingControl::touch_live`] every `every` until the relay stops.
    pub async fn touch_loop(self: std::sync::Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.touch_live().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_segment_lasts_what_the_monotonic_clock_says() {
        let wall = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mono = Instant::now();
        let clock = SegmentClock::start(wall, mono);
        assert_eq!(clock.started_at(), wall);
        // 90 s later on the monotonic clock, whatever the wall clock was stepped to in
        // between (the end is never read from it), the segment ends 90 s after its start.
        let end = clock.end_at(mono + Duration::from_secs(90));
        assert_eq!(unix_ms(end) - unix_ms(wall), 90_000);
        // Ending at the very start bills nothing.
        assert_eq!(clock.end_at(mono), wall);
    }
}
