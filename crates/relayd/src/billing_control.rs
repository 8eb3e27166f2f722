//! Between the sessions and the `billing` crate: journals a session when it is confirmed,
//! keeps its last-seen time fresh while it lives, writes its record when it ends, records
//! application charges, and runs crash recovery at start-up.
//!
//! Every write goes through the group-committing writer thread, so the signalling tasks never
//! block on the disk; each call resolves only once its transaction is committed, which is
//! what lets a session answer a BYE only after its record is durable.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use billing::record::{ChargeRecord, EndCause, SessionRecord};
use billing::sqlite::SqliteStore;
use billing::store::{CloseSession, NewCharge, OpenSession};
use billing::tariff::TariffTable;
use billing::writer::{Writer, WriterConfig, WriterHandle};
use tracing::{info, warn};

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
    path: PathBuf,
}

impl BillingControl {
    /// Opens (creating if needed) the SQLite store in `data_dir` and starts its writer,
    /// committing at most once per `commit_interval`. The returned [`Writer`] must be kept
    /// and shut down when the relay stops.
    pub fn open(
        data_dir: &Path,
        tariffs: TariffTable,
        commit_interval: std::time::Duration,
    ) -> anyhow::Result<(BillingControl, Writer)> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
        let path = data_dir.join("billing.db");
        let store = SqliteStore::open(&path)
            .with_context(|| format!("opening the billing store {}", path.display()))?;
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
            path,
        };
        Ok((control, writer))
    }

    /// Puts `tariffs` in force for the sessions (and billing segments) journaled from now
    /// on (a reload). A live session keeps the tariff journaled with it.
    pub fn replace_tariffs(&self, tariffs: TariffTable) {
        *self.tariffs.write().unwrap_or_else(|p| p.into_inner()) = std::sync::Arc::new(tariffs);
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Closes every session a crash left open (cause `recovered-after-restart`), once.
    pub async fn recover(&self) -> anyhow::Result<Vec<SessionRecord>> {
        let records = self
            .writer
            .recover(unix_ms(SystemTime::now()))
            .await
            .context("recovering sessions left open by the last run")?;
        for r in &records {
            info!(session_id = %r.session_id, call_id = %r.call_id, duration_ms = r.duration_ms, "closed a session left open by the last run");
        }
        Ok(records)
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
                session_id: start.session_id,
                call_id: start.call_id,
                subscriber: start.subscriber,
                service: start.service,
                server: start.server,
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
        let record = self
            .writer
            .close_session(CloseSession {
                session_id: session_id.to_string(),
                ended_at_ms: unix_ms(ended_at),
                cause,
            })
            .await
            .with_context(|| format!("closing session {session_id}"))?;
        // Never below zero, whatever order the counts come in.
        let _ = self
            .live
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        Ok(record)
    }

    /// Records an application charge; `true` in the result when the event id was already
    /// charged (nothing new stored).
    pub async fn charge(
        &self,
        charge: NewCharge,
    ) -> Result<(ChargeRecord, bool), billing::BillingError> {
        self.writer.record_charge(charge).await
    }

    /// The billing writer's counters.
    pub fn writer_stats(&self) -> billing::writer::WriterStats {
        self.writer.stats()
    }

    /// How many sessions are live (journaled and not yet closed).
    pub fn live_sessions(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Refreshes the last-seen time of every open session in one statement (crash
    /// recovery closes a session at that time, see the `billing` crate).
    pub async fn touch_live(&self) {
        if self.live_sessions() == 0 {
            return;
        }
        if let Err(e) = self.writer.touch_all_open(unix_ms(SystemTime::now())).await {
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
