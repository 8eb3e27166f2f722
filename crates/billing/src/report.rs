//! Reports over stored records: totals per subscriber, service or application server, and
//! exports as CSV or JSON lines. `relayd billing report` and `relayd billing export` are
//! thin shells over these functions.
//!
//! Times in CSV and text are RFC 3339 UTC with milliseconds (`2024-05-01T12:00:00.000Z`);
//! JSON lines carry the records as they are, with Unix-millisecond times. Amounts are
//! always integer minor units.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::io::Write;
use std::str::FromStr;

use serde::Serialize;

use crate::error::BillingError;
use crate::money::{Currency, MoneyError};
use crate::record::{ChargeRecord, SessionRecord};
use crate::store::{Period, Store};

/// What totals are grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GroupBy {
    /// Per subscriber.
    Subscriber,
    /// Per service; charges without a service are grouped under `(none)`.
    Service,
    /// Per application server.
    Server,
}

impl GroupBy {
    /// The name used on the command line and in headers.
    pub const fn as_str(&self) -> &'static str {
        match self {
            GroupBy::Subscriber => "subscriber",
            GroupBy::Service => "service",
            GroupBy::Server => "server",
        }
    }
}

impl fmt::Display for GroupBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for GroupBy {
    type Err = BillingError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "subscriber" => Ok(GroupBy::Subscriber),
            "service" => Ok(GroupBy::Service),
            "server" => Ok(GroupBy::Server),
            other => Err(BillingError::InvalidInput {
                field: "group by",
                reason: format!("{other:?}: expected subscriber, service or server"),
            }),
        }
    }
}

/// The key under which charges without a service are grouped by service.
pub const NO_SERVICE: &str = "(none)";

/// The totals of one group in one currency over a period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Total {
    /// The subscriber, service or server.
    pub key: String,
    /// The currency of the amounts.
    pub currency: Currency,
    /// Session records.
    pub sessions: u64,
    /// Their summed duration, ms.
    pub session_ms: i64,
    /// Their summed charges, minor units.
    pub session_minor: i64,
    /// Charge records.
    pub charges: u64,
    /// Their summed amounts, minor units.
    pub charge_minor: i64,
    /// `session_minor + charge_minor`.
    pub total_minor: i64,
}

fn add(sum: &mut i64, x: i64) -> Result<(), BillingError> {
    *sum = sum.checked_add(x).ok_or(MoneyError::Overflow)?;
    Ok(())
}

fn group<'a>(
    groups: &'a mut BTreeMap<(String, Currency), Total>,
    key: &str,
    currency: Currency,
) -> &'a mut Total {
    groups
        .entry((key.to_owned(), currency))
        .or_insert_with(|| Total {
            key: key.to_owned(),
            currency,
            sessions: 0,
            session_ms: 0,
            session_minor: 0,
            charges: 0,
            charge_minor: 0,
            total_minor: 0,
        })
}

/// Totals per `by` over the session records that ended and the charges made within
/// `period`, one row per (key, currency), sorted by key then currency.
pub fn totals<S: Store + ?Sized>(
    store: &S,
    period: Period,
    by: GroupBy,
) -> Result<Vec<Total>, BillingError> {
    let mut groups: BTreeMap<(String, Currency), Total> = BTreeMap::new();
    store.scan_sessions(period, &mut |r| {
        let key = match by {
            GroupBy::Subscriber => &r.subscriber,
            GroupBy::Service => &r.service,
            GroupBy::Server => &r.server,
        };
        let t = group(&mut groups, key, r.charge.currency);
        t.sessions += 1;
        add(&mut t.session_ms, r.duration_ms)?;
        add(&mut t.session_minor, r.charge.minor)?;
        add(&mut t.total_minor, r.charge.minor)
    })?;
    store.scan_charges(period, &mut |c| {
        let key = match by {
            GroupBy::Subscriber => c.subscriber.as_str(),
            GroupBy::Service => c.service.as_deref().unwrap_or(NO_SERVICE),
            GroupBy::Server => c.server.as_str(),
        };
        let t = group(&mut groups, key, c.amount.currency);
        t.charges += 1;
        add(&mut t.charge_minor, c.amount.minor)?;
        add(&mut t.total_minor, c.amount.minor)
    })?;
    Ok(groups.into_values().collect())
}

/// Formats a duration in ms as `h:mm:ss.mmm`.
fn hms(ms: i64) -> String {
    let ms = ms.max(0);
    format!(
        "{}:{:02}:{:02}.{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

/// Renders totals as an aligned plain-text table for a person to read.
pub fn format_totals(totals: &[Total], by: GroupBy) -> String {
    let headers = [
        by.as_str(),
        "currency",
        "sessions",
        "duration",
        "session charges",
        "charges",
        "charge amounts",
        "total",
    ];
    let rows: Vec<[String; 8]> = totals
        .iter()
        .map(|t| {
            [
                t.key.clone(),
                t.currency.to_string(),
                t.sessions.to_string(),
                hms(t.session_ms),
                t.session_minor.to_string(),
                t.charges.to_string(),
                t.charge_minor.to_string(),
                t.total_minor.to_string(),
            ]
        })
        .collect();
    let mut widths = headers.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [&str; 8]| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            // Names and codes left-aligned, numbers right-aligned.
            let _ = if i < 2 {
                write!(text, "{cell:<w$}")
            } else {
                write!(text, "{cell:>w$}")
            };
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(headers);
    for row in &rows {
        line(row.each_ref().map(String::as_str));
    }
    out
}

/// Which records to export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    /// Session records (time billing).
    Sessions,
    /// Charge records (application billing).
    Charges,
}

/// The format of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExportFormat {
    /// RFC 4180 CSV with a header line, CRLF line ends, RFC 3339 times.
    Csv,
    /// One JSON object per line, as the records serialize (Unix-ms times).
    JsonLines,
}

/// The CSV header of session records.
pub const SESSION_CSV_HEADER: &str = "record_id,session_id,call_id,subscriber,service,server,plan,\
     tariff,confirmed_at,ended_at,duration_ms,end_cause,amount_minor,currency";
/// The CSV header of charge records.
pub const CHARGE_CSV_HEADER: &str = "record_id,session_id,server,subscriber,service,event_id,\
     amount_minor,currency,units,unit_price_minor,description,charged_at";

/// Writes the records of `kind` within `period` to `out` in `format`; returns how many.
pub fn export<S: Store + ?Sized, W: Write>(
    store: &S,
    period: Period,
    kind: RecordKind,
    format: ExportFormat,
    mut out: W,
) -> Result<u64, BillingError> {
    let mut count = 0u64;
    match (kind, format) {
        (RecordKind::Sessions, ExportFormat::Csv) => {
            write!(out, "{SESSION_CSV_HEADER}\r\n")?;
            store.scan_sessions(period, &mut |r| {
                count += 1;
                write_session_csv(&mut out, &r)
            })?;
        }
        (RecordKind::Charges, ExportFormat::Csv) => {
            write!(out, "{CHARGE_CSV_HEADER}\r\n")?;
            store.scan_charges(period, &mut |c| {
                count += 1;
                write_charge_csv(&mut out, &c)
            })?;
        }
        (RecordKind::Sessions, ExportFormat::JsonLines) => {
            store.scan_sessions(period, &mut |r| {
                count += 1;
                write_json_line(&mut out, &r)
            })?;
        }
        (RecordKind::Charges, ExportFormat::JsonLines) => {
            store.scan_charges(period, &mut |c| {
                count += 1;
                write_json_line(&mut out, &c)
            })?;
        }
    }
    out.flush()?;
    Ok(count)
}

fn write_json_line<W: Write, T: Serialize>(out: &mut W, record: &T) -> Result<(), BillingError> {
    serde_json::to_writer(&mut *out, record).map_err(std::io::Error::from)?;
    out.write_all(b"\n")?;
    Ok(())
}

/// One CSV cell: text that came from outside (ids, names, descriptions: neutralised, see
/// [`push_text_cell`]), or a number the store computed or checked (amounts, durations,
/// counts: written as they are).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cell<'a> {
    /// Text, neutralised against formula injection and quoted when needed.
    Text(&'a str),
    /// An integer, or nothing (an empty cell).
    Number(Option<i64>),
}

fn write_csv_row<W: Write>(out: &mut W, cells: &[Cell<'_>]) -> Result<(), BillingError> {
    let mut line = String::new();
    for (i, cell) in cells.iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        match cell {
            Cell::Text(text) => push_text_cell(&mut line, text),
            Cell::Number(Some(n)) => {
                let _ = write!(line, "{n}");
            }
            Cell::Number(None) => {}
        }
    }
    line.push_str("\r\n");
    out.write_all(line.as_bytes())?;
    Ok(())
}

/// Whether a spreadsheet would read text starting like `text` as a formula (or a DDE
/// command): `=`, `+`, `-`, `@`, or a tab or carriage return before one (OWASP, "CSV
/// Injection").
fn reads_as_formula(text: &str) -> bool {
    text.starts_with(['=', '+', '-', '@', '\t', '\r'])
}

/// Appends a text cell: neutralised with a leading `'` when a spreadsheet would take it
/// for a formula (a Call-ID, an event id or a description comes from the network, and
/// `=HYPERLINK(…)` or `=cmd|…` in one would run in the reader's spreadsheet), then quoted
/// per RFC 4180 when needed. Text is always text: `-5` as an event id is written `'-5`.
/// Number cells ([`Cell::Number`]) are never prefixed: a negative amount stays a number.
fn push_text_cell(line: &mut String, text: &str) {
    if reads_as_formula(text) {
        let mut neutral = String::with_capacity(text.len() + 1);
        neutral.push('\'');
        neutral.push_str(text);
        push_csv_field(line, &neutral);
    } else {
        push_csv_field(line, text);
    }
}

/// Appends `field` to `line`, quoted per RFC 4180 when it holds a comma, a quote, a line
/// break or leading or trailing space.
fn push_csv_field(line: &mut String, field: &str) {
    let needs_quotes =
        field.contains([',', '"', '\r', '\n']) || field.starts_with(' ') || field.ends_with(' ');
    if needs_quotes {
        line.push('"');
        line.push_str(&field.replace('"', "\"\""));
        line.push('"');
    } else {
        line.push_str(field);
    }
}

fn write_session_csv<W: Write>(out: &mut W, r: &SessionRecord) -> Result<(), BillingError> {
    write_csv_row(
        out,
        &[
            Cell::Number(Some(r.record_id)),
            Cell::Text(&r.session_id),
            Cell::Text(&r.call_id),
            Cell::Text(&r.subscriber),
            Cell::Text(&r.service),
            Cell::Text(&r.server),
            Cell::Text(&r.plan),
            Cell::Text(&r.tariff),
            Cell::Text(&rfc3339(r.confirmed_at_ms)),
            Cell::Text(&rfc3339(r.ended_at_ms)),
            Cell::Number(Some(r.duration_ms)),
            Cell::Text(r.cause.as_str()),
            Cell::Number(Some(r.charge.minor)),
            Cell::Text(r.charge.currency.as_str()),
        ],
    )
}

fn write_charge_csv<W: Write>(out: &mut W, c: &ChargeRecord) -> Result<(), BillingError> {
    write_csv_row(
        out,
        &[
            Cell::Number(Some(c.record_id)),
            Cell::Text(c.session_id.as_deref().unwrap_or("")),
            Cell::Text(&c.server),
            Cell::Text(&c.subscriber),
            Cell::Text(c.service.as_deref().unwrap_or("")),
            Cell::Text(&c.event_id),
            Cell::Number(Some(c.amount.minor)),
            Cell::Text(c.amount.currency.as_str()),
            Cell::Number(c.units.map(|u| u.units)),
            Cell::Number(c.units.map(|u| u.unit_price_minor)),
            Cell::Text(&c.description),
            Cell::Text(&rfc3339(c.charged_at_ms)),
        ],
    )
}

const MS_PER_DAY: i64 = 86_400_000;

/// The proleptic Gregorian (year, month, day) of a count of days since 1970-01-01
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    // day is 1..=31 and month 1..=12 by construction.
    (year, month as u32, day as u32)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (`days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = year - i64::from(month <= 2);
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let m = i64::from(month);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Formats Unix milliseconds as RFC 3339 UTC with milliseconds,
/// e.g. `2023-11-14T22:13:20.000Z`.
pub fn rfc3339(unix_ms: i64) -> String {
    let (year, month, day) = civil_from_days(unix_ms.div_euclid(MS_PER_DAY));
    let ms = unix_ms.rem_euclid(MS_PER_DAY);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

/// Parses a time for a report period: a date `YYYY-MM-DD` (midnight UTC) or an RFC 3339
/// timestamp `YYYY-MM-DDTHH:MM:SS[.fff]` followed by `Z` or an offset `±HH:MM`.
/// Returns Unix milliseconds.
pub fn parse_time(text: &str) -> Result<i64, BillingError> {
    let bad = |why: &str| BillingError::InvalidInput {
        field: "time",
        reason: format!("{text:?}: {why}; expected YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS[.fff]Z"),
    };
    let num = |s: &str, what: &str| -> Result<u32, BillingError> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(&format!("bad {what}")));
        }
        s.parse().map_err(|_| bad(&format!("bad {what}")))
    };
    let (date, time) = match text.split_once(['T', 't', ' ']) {
        Some((d, t)) => (d, Some(t)),
        None => (text, None),
    };
    let mut parts = date.split('-');
    let (Some(y), Some(mo), Some(d), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("bad date"));
    };
    if y.len() != 4 || mo.len() != 2 || d.len() != 2 {
        return Err(bad("bad date"));
    }
    let (year, month, day) = (num(y, "year")?, num(mo, "month")?, num(d, "day")?);
    let year = i64::from(year);
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return Err(bad("no such date"));
    }
    let mut ms = days_from_civil(year, month, day) * MS_PER_DAY;
    if let Some(time) = time {
        let (clock, offset_ms) = if let Some(clock) = time.strip_suffix(['Z', 'z']) {
            (clock, 0)
        } else if let Some(at) = time.rfind(['+', '-']) {
            let (clock, offset) = time.split_at(at);
            let sign = if offset.starts_with('-') { -1 } else { 1 };
            let (oh, om) = offset[1..]
                .split_once(':')
                .ok_or_else(|| bad("bad offset"))?;
            let (oh, om) = (num(oh, "offset")?, num(om, "offset")?);
            if oh > 23 || om > 59 {
                return Err(bad("bad offset"));
            }
            (
                clock,
                sign * (i64::from(oh) * 3_600_000 + i64::from(om) * 60_000),
            )
        } else {
            return Err(bad("missing Z or offset"));
        };
        let (hms, frac) = match clock.split_once('.') {
            Some((hms, frac)) => (hms, Some(frac)),
            None => (clock, None),
        };
        let mut fields = hms.split(':');
        let (Some(h), Some(mi), Some(s), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(bad("bad time of day"));
        };
        let (h, mi, s) = (num(h, "hour")?, num(mi, "minute")?, num(s, "second")?);
        if h > 23 || mi > 59 || s > 59 {
            return Err(bad("bad time of day"));
        }
        let frac_ms = match frac {
            None => 0,
            Some(f) => {
                num(f, "fraction")?;
                // Milliseconds: the first three digits, padded; finer digits are dropped.
                let digits: String = f.chars().chain("000".chars()).take(3).collect();
                i64::from(num(&digits, "fraction")?)
            }
        };
        ms += i64::from(h) * 3_600_000 + i64::from(mi) * 60_000 + i64::from(s) * 1000 + frac_ms;
        ms -= offset_ms;
    }
    Ok(ms)
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::money::Money;
    use crate::record::EndCause;
    use crate::sqlite::SqliteStore;
    use crate::store::{ChargeAmount, CloseSession, NewCharge, OpenSession, MAX_TIME_MS};
    use crate::tariff::{Tariff, TariffSpec};

    const T0: i64 = 1_700_000_000_000;

    fn currency(code: &str) -> Currency {
        Currency::new(code).unwrap()
    }

    fn tariff(code: &str) -> Tariff {
        Tariff::new(TariffSpec {
            name: format!("per-second-{code}"),
            service: None,
            plan: None,
            currency: currency(code),
            setup: 0,
            rate: 60,
            period_seconds: 60,
            increment: "1/1".parse().unwrap(),
            free_seconds: 0,
        })
        .unwrap()
    }

    /// Writes a session of `secs` seconds (charged `secs` minor units) that ends at `end`.
    fn session(
        store: &mut SqliteStore,
        id: &str,
        who: (&str, &str, &str),
        secs: i64,
        end: i64,
        code: &str,
    ) {
        let (subscriber, service, server) = who;
        store
            .open_session(OpenSession {
                node: String::new(),
                session_id: id.into(),
                call_id: format!("{id}@terminal"),
                server_call_id: String::new(),
                subscriber: subscriber.into(),
                service: service.into(),
                server: server.into(),
                account: None,
                plan: "basic".into(),
                tariff: tariff(code),
                confirmed_at_ms: end - secs * 1000,
            })
            .unwrap();
        store
            .close_session(CloseSession {
                session_id: id.into(),
                ended_at_ms: end,
                cause: EndCause::CallerBye,
            })
            .unwrap();
    }

    fn charge(
        store: &mut SqliteStore,
        event: &str,
        who: (&str, Option<&str>, &str),
        minor: i64,
        at: i64,
    ) {
        let (subscriber, service, server) = who;
        store
            .record_charge(NewCharge {
                session_id: None,
                server: server.into(),
                subscriber: subscriber.into(),
                service: service.map(Into::into),
                event_id: event.into(),
                amount: ChargeAmount::Total(Money::new(minor, currency("EUR"))),
                description: format!("item, \"{event}\""),
                charged_at_ms: at,
            })
            .unwrap();
    }

    fn sample() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path().join("b.db")).unwrap();
        session(&mut store, "s1", ("alice", "video", "as1"), 30, T0, "EUR");
        session(
            &mut store,
            "s2",
            ("alice", "chat", "as2"),
            90,
            T0 + 1_000,
            "EUR",
        );
        session(
            &mut store,
            "s3",
            ("bob", "video", "as1"),
            10,
            T0 + 2_000,
            "EUR",
        );
        session(
            &mut store,
            "s4",
            ("bob", "video", "as1"),
            7,
            T0 + 3_000,
            "USD",
        );
        // Outside the period used below.
        session(
            &mut store,
            "s5",
            ("alice", "video", "as1"),
            1_000,
            T0 + 100_000,
            "EUR",
        );
        charge(&mut store, "e1", ("alice", Some("video"), "as1"), 150, T0);
        charge(&mut store, "e2", ("bob", None, "as2"), 40, T0 + 5);
        (dir, store)
    }

    fn period() -> Period {
        Period::new(T0 - 1_000, T0 + 10_000).unwrap()
    }

    #[test]
    fn totals_per_subscriber_service_and_server() {
        let (_dir, store) = sample();
        type Row = (String, String, u64, i64, i64, u64, i64, i64);
        let rows = |by| -> Vec<Row> {
            totals(&store, period(), by)
                .unwrap()
                .into_iter()
                .map(|t| {
                    (
                        t.key,
                        t.currency.to_string(),
                        t.sessions,
                        t.session_ms,
                        t.session_minor,
                        t.charges,
                        t.charge_minor,
                        t.total_minor,
                    )
                })
                .collect()
        };
        let s = |k: &str, c: &str| (k.to_string(), c.to_string());
        let row = |(k, c): (String, String), n, ms, sm, ch, cm, t| (k, c, n, ms, sm, ch, cm, t);
        assert_eq!(
            rows(GroupBy::Subscriber),
            [
                row(s("alice", "EUR"), 2, 120_000, 120, 1, 150, 270),
                row(s("bob", "EUR"), 1, 10_000, 10, 1, 40, 50),
                row(s("bob", "USD"), 1, 7_000, 7, 0, 0, 7),
            ]
        );
        assert_eq!(
            rows(GroupBy::Service),
            [
                row(s("(none)", "EUR"), 0, 0, 0, 1, 40, 40),
                row(s("chat", "EUR"), 1, 90_000, 90, 0, 0, 90),
                row(s("video", "EUR"), 2, 40_000, 40, 1, 150, 190),
                row(s("video", "USD"), 1, 7_000, 7, 0, 0, 7),
            ]
        );
        assert_eq!(
            rows(GroupBy::Server),
            [
                row(s("as1", "EUR"), 2, 40_000, 40, 1, 150, 190),
                row(s("as1", "USD"), 1, 7_000, 7, 0, 0, 7),
                row(s("as2", "EUR"), 1, 90_000, 90, 1, 40, 130),
            ]
        );
        assert_eq!(
            totals(&store, Period::all(), GroupBy::Subscriber).unwrap()[0].sessions,
            3
        );
    }

    #[test]
    fn totals_render_as_an_aligned_table() {
        let (_dir, store) = sample();
        let text = format_totals(
            &totals(&store, period(), GroupBy::Subscriber).unwrap(),
            GroupBy::Subscriber,
        );
        let expected = "\
subscriber  currency  sessions     duration  session charges  charges  charge amounts  total
alice       EUR              2  0:02:00.000              120        1             150    270
bob         EUR              1  0:00:10.000               10        1              40     50
bob         USD              1  0:00:07.000                7        0               0      7
";
        assert_eq!(text, expected);
    }

    #[test]
    fn csv_export_quotes_fields_and_uses_rfc3339_times() {
        let (_dir, store) = sample();
        let mut out = Vec::new();
        let n = export(
            &store,
            period(),
            RecordKind::Charges,
            ExportFormat::Csv,
            &mut out,
        )
        .unwrap();
        assert_eq!(n, 2);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.split("\r\n").collect();
        assert_eq!(lines[0], CHARGE_CSV_HEADER);
        assert_eq!(
            lines[1],
            "1,,as1,alice,video,e1,150,EUR,,,\"item, \"\"e1\"\"\",2023-11-14T22:13:20.000Z"
        );
        assert_eq!(
            lines[2],
            "2,,as2,bob,,e2,40,EUR,,,\"item, \"\"e2\"\"\",2023-11-14T22:13:20.005Z"
        );
        assert_eq!(lines[3], "", "CRLF after the last row");
        assert_eq!(lines.len(), 4);

        let mut out = Vec::new();
        let n = export(
            &store,
            period(),
            RecordKind::Sessions,
            ExportFormat::Csv,
            &mut out,
        )
        .unwrap();
        assert_eq!(n, 4);
        let text = String::from_utf8(out).unwrap();
        let first = text.split("\r\n").nth(1).unwrap();
        assert_eq!(
            first,
            "1,s1,s1@terminal,alice,video,as1,basic,per-second-EUR,2023-11-14T22:12:50.000Z,\
             2023-11-14T22:13:20.000Z,30000,caller-bye,30,EUR"
        );
    }

    #[test]
    fn json_lines_export_round_trips() {
        let (_dir, store) = sample();
        let mut out = Vec::new();
        let n = export(
            &store,
            Period::all(),
            RecordKind::Sessions,
            ExportFormat::JsonLines,
            &mut out,
        )
        .unwrap();
        assert_eq!(n, 5);
        let text = String::from_utf8(out).unwrap();
        let parsed: Vec<SessionRecord> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(parsed, store.session_records(Period::all()).unwrap());
        assert!(text
            .lines()
            .next()
            .unwrap()
            .contains("\"cause\":\"caller-bye\""));

        let mut out = Vec::new();
        export(
            &store,
            Period::all(),
            RecordKind::Charges,
            ExportFormat::JsonLines,
            &mut out,
        )
        .unwrap();
        let parsed: Vec<ChargeRecord> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(parsed, store.charge_records(Period::all()).unwrap());
    }

    #[test]
    fn csv_fields_are_quoted_only_when_needed() {
        let quoted = |f: &str| {
            let mut s = String::new();
            push_csv_field(&mut s, f);
            s
        };
        assert_eq!(quoted("plain"), "plain");
        assert_eq!(quoted(""), "");
        assert_eq!(quoted("a,b"), "\"a,b\"");
        assert_eq!(quoted("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(quoted("two\nlines"), "\"two\nlines\"");
        assert_eq!(quoted(" padded"), "\" padded\"");
    }

    /// Issue 14, finding 11: text from the network (a terminal's Call-ID, a server's event
    /// id and description) was written as it came, so `=HYPERLINK(…)` or `=cmd|…` ran as a
    /// formula in the spreadsheet of whoever opened the export.
    #[test]
    fn csv_text_that_reads_as_a_formula_is_neutralised_and_numbers_are_kept() {
        let row = |cells: &[Cell<'_>]| {
            let mut out = Vec::new();
            write_csv_row(&mut out, cells).unwrap();
            String::from_utf8(out).unwrap()
        };
        assert_eq!(
            row(&[
                Cell::Text("=1+1"),
                Cell::Text("+1"),
                Cell::Text("-2+3"),
                Cell::Text("@SUM(A1)"),
                Cell::Text("\t=1"),
                Cell::Text("\r=1"),
            ]),
            "'=1+1,'+1,'-2+3,'@SUM(A1),'\t=1,\"'\r=1\"\r\n"
        );
        // Quoting still applies after the prefix.
        assert_eq!(
            row(&[Cell::Text("=HYPERLINK(\"http://x\",\"y\")")]),
            "\"'=HYPERLINK(\"\"http://x\"\",\"\"y\"\")\"\r\n"
        );
        // A number stays a number, negative or not; text is text even when it looks like one.
        assert_eq!(
            row(&[
                Cell::Number(Some(-50)),
                Cell::Number(Some(7)),
                Cell::Number(None),
                Cell::Text("-50"),
                Cell::Text("a=b"),
                Cell::Text("x-1"),
                Cell::Text(""),
            ]),
            "-50,7,,'-50,a=b,x-1,\r\n"
        );

        // Through the store and the export.
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path().join("b.db")).unwrap();
        store
            .open_session(OpenSession {
                node: String::new(),
                session_id: "s1".into(),
                call_id: "=cmd|' /C calc'!A0".into(),
                server_call_id: String::new(),
                subscriber: "alice".into(),
                service: "video".into(),
                server: "@as1".into(),
                account: None,
                plan: "basic".into(),
                tariff: tariff("EUR"),
                confirmed_at_ms: T0 - 1_000,
            })
            .unwrap();
        store
            .close_session(CloseSession {
                session_id: "s1".into(),
                ended_at_ms: T0,
                cause: EndCause::CallerBye,
            })
            .unwrap();
        store
            .record_charge(NewCharge {
                session_id: None,
                server: "as1".into(),
                subscriber: "alice".into(),
                service: None,
                event_id: "-1+1".into(),
                amount: ChargeAmount::Units {
                    units: 2,
                    unit_price: Money::new(5, currency("EUR")),
                },
                description: "+HYPERLINK(\"http://evil\")".into(),
                charged_at_ms: T0,
            })
            .unwrap();
        let export_of = |kind| {
            let mut out = Vec::new();
            export(&store, Period::all(), kind, ExportFormat::Csv, &mut out).unwrap();
            String::from_utf8(out).unwrap()
        };
        let sessions = export_of(RecordKind::Sessions);
        assert_eq!(
            sessions.split("\r\n").nth(1).unwrap(),
            "1,s1,'=cmd|' /C calc'!A0,alice,video,'@as1,basic,per-second-EUR,\
             2023-11-14T22:13:19.000Z,2023-11-14T22:13:20.000Z,1000,caller-bye,1,EUR"
        );
        let charges = export_of(RecordKind::Charges);
        assert_eq!(
            charges.split("\r\n").nth(1).unwrap(),
            "1,,as1,alice,,'-1+1,10,EUR,2,5,\"'+HYPERLINK(\"\"http://evil\"\")\",\
             2023-11-14T22:13:20.000Z"
        );
    }

    #[test]
    fn parse_time_never_panics_on_garbage() {
        use rand::{Rng, SeedableRng};
        let alphabet: Vec<char> = "0123456789-:+.TZz é".chars().collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..20_000 {
            let len = rng.gen_range(0..30);
            let text: String = (0..len)
                .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
                .collect();
            if let Ok(ms) = parse_time(&text) {
                // Whatever parses is an instant that survives a round trip.
                assert_eq!(parse_time(&rfc3339(ms)).unwrap(), ms, "{text:?}");
            }
        }
        assert!(parse_time("2024-02-29T00:00:00.000Z").is_ok());
    }

    #[test]
    fn rfc3339_formats_and_parses() {
        let cases = [
            (0, "1970-01-01T00:00:00.000Z"),
            (-1, "1969-12-31T23:59:59.999Z"),
            (T0, "2023-11-14T22:13:20.000Z"),
            (951_782_400_000, "2000-02-29T00:00:00.000Z"),
            (4_107_542_400_000, "2100-03-01T00:00:00.000Z"),
            (MAX_TIME_MS, "9999-12-31T23:59:59.999Z"),
        ];
        for (ms, text) in cases {
            assert_eq!(rfc3339(ms), text);
            assert_eq!(parse_time(text).unwrap(), ms, "{text}");
        }
        assert_eq!(parse_time("2023-11-14").unwrap(), T0 - 80_000_000);
        assert_eq!(parse_time("2023-11-14T23:13:20+01:00").unwrap(), T0);
        assert_eq!(parse_time("2023-11-14T21:13:20.5-01:00").unwrap(), T0 + 500);
        assert_eq!(parse_time("2023-11-14T22:13:20.123456Z").unwrap(), T0 + 123);
        // Far outside the accepted range, formatting still does not panic.
        assert!(rfc3339(i64::MIN).ends_with('Z'));
        assert!(rfc3339(i64::MAX).ends_with('Z'));
        for bad in [
            "",
            "2023-11",
            "2023-13-01",
            "2023-02-29",
            "2023-11-14T22:13:20",
            "2023-11-14T24:00:00Z",
            "2023-11-14T22:13Z",
            "2023-11-14T22:13:20+0100",
            "23-11-14",
            "2023-11-14T22:13:20.Z",
            "２０２３-11-14",
        ] {
            let err = parse_time(bad).unwrap_err();
            assert!(
                err.to_string().starts_with("invalid time: "),
                "{bad}: {err}"
            );
        }
    }
}
