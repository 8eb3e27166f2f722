//! Tariffs: what a session costs, per service and subscriber plan.
//!
//! A [`Tariff`] has a setup charge, a rate per period (e.g. 2 minor units per 60 s), a
//! billing [`Increment`] `a/b` and free seconds. A [`TariffTable`] holds the tariffs of the
//! relay's configuration and picks one for a session by service and plan, falling back to
//! the default tariff, the one that names neither.
//!
//! # How a duration is charged
//!
//! For a session of `d` milliseconds, with free seconds `f` and increment `a/b`:
//!
//! 1. The free seconds come off the top: the billable time is `d − 1000·f` ms. A session
//!    that ends within its free seconds (including exactly at `f` s) costs nothing — not
//!    even the setup charge.
//! 2. Otherwise the billable time is rounded up to whole seconds `s` and billed as
//!    `a` seconds if `s ≤ a`, else `a + ⌈(s − a) / b⌉ · b` seconds. So with `60/60` a
//!    session 1 ms past a minute is billed two minutes; with `30/6`, 31 s is billed 36 s.
//! 3. The charge is the setup charge plus `billed seconds × rate / period`, the latter
//!    rounded up to a whole minor unit once per session (never per step).
//!
//! All arithmetic is integer and cannot overflow: the intermediate products are 128-bit
//! and a result beyond `i64::MAX` minor units saturates there.
//!
//! # Configuration
//!
//! A table deserializes from an array of tables, so the relay embeds it as `[[tariffs]]`:
//!
//! ```toml
//! [[tariffs]]
//! name = "standard"          # the default: neither service nor plan
//! currency = "EUR"
//! rate = 2                   # minor units per period
//! period_seconds = 60        # default 60
//! increment = "60/60"        # default "60/60"
//!
//! [[tariffs]]
//! name = "video-gold"
//! service = "video"
//! plan = "gold"
//! currency = "EUR"
//! setup = 10                 # default 0
//! rate = 6
//! increment = "30/6"
//! free_seconds = 5           # default 0
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::money::{Currency, Money};

/// The longest tariff, service or plan name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// Why a tariff or a tariff table was refused, or why no tariff could be found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TariffError {
    /// A billing increment is not of the form `a/b` with `b ≥ 1`.
    #[error("invalid billing increment {0:?}: expected \"a/b\" such as \"60/60\", \"1/1\" or \"30/6\" with b at least 1")]
    InvalidIncrement(String),
    /// A tariff's parameters are unusable.
    #[error("tariff {tariff:?}: {reason}")]
    Invalid {
        /// The name of the tariff.
        tariff: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Two tariffs share a name.
    #[error("tariff {0:?} is defined twice")]
    DuplicateName(String),
    /// Two tariffs apply to the same service and plan.
    #[error("tariffs {first:?} and {second:?} both apply to service {service} and plan {plan}")]
    DuplicateKey {
        /// The first tariff.
        first: String,
        /// The second tariff.
        second: String,
        /// The service they share, or `*`.
        service: String,
        /// The plan they share, or `*`.
        plan: String,
    },
    /// No tariff has this name.
    #[error("unknown tariff {0:?}")]
    Unknown(String),
    /// No tariff applies to this service and plan and there is no default tariff.
    #[error("no tariff for service {service:?} and plan {plan:?}, and no default tariff (one with neither service nor plan)")]
    NoMatch {
        /// The service that was looked up.
        service: String,
        /// The plan that was looked up.
        plan: String,
    },
    /// The TOML text could not be read as a tariff table.
    #[error("tariff configuration: {0}")]
    Config(String),
}

/// A billing increment `a/b`: the first `a` seconds are billed as one block, then every
/// started `b` seconds as another step (`60/60`, `1/1`, `30/6`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Increment {
    first: u32,
    step: u32,
}

impl Increment {
    /// An increment with a first block of `first` seconds and steps of `step` seconds;
    /// `step` must be at least 1 (a `first` of 0 means plain `step`-second steps).
    pub fn new(first: u32, step: u32) -> Result<Self, TariffError> {
        if step == 0 {
            return Err(TariffError::InvalidIncrement(format!("{first}/{step}")));
        }
        Ok(Increment { first, step })
    }

    /// Seconds of the first block (`a`).
    pub const fn first(&self) -> u32 {
        self.first
    }

    /// Seconds of each following step (`b`).
    pub const fn step(&self) -> u32 {
        self.step
    }

    /// Seconds billed for `secs` billable seconds (`secs ≥ 1`).
    fn billed(&self, secs: u64) -> u64 {
        let first = u64::from(self.first);
        if secs <= first {
            return first;
        }
        let step = u64::from(self.step);
        let steps = (secs - first).div_ceil(step);
        // secs ≤ u64::MAX / 1000 + 1 and step < 2^32, so this cannot overflow; saturate anyway.
        first.saturating_add(steps.saturating_mul(step))
    }
}

impl Default for Increment {
    /// `60/60`: per started minute.
    fn default() -> Self {
        Increment {
            first: 60,
            step: 60,
        }
    }
}

impl fmt::Display for Increment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.first, self.step)
    }
}

impl fmt::Debug for Increment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Increment({self})")
    }
}

impl FromStr for Increment {
    type Err = TariffError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || TariffError::InvalidIncrement(s.to_owned());
        let (a, b) = s.split_once('/').ok_or_else(bad)?;
        let first = a.trim().parse::<u32>().map_err(|_| bad())?;
        let step = b.trim().parse::<u32>().map_err(|_| bad())?;
        Increment::new(first, step).map_err(|_| bad())
    }
}

impl Serialize for Increment {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Increment {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn default_period() -> u32 {
    60
}

/// The plain, unchecked form of a tariff, as written in the configuration.
///
/// [`Tariff::new`] checks it; a [`Tariff`] deserializes through it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TariffSpec {
    /// The tariff's name, written into every session record it rates.
    pub name: String,
    /// The service it applies to; `None` (or `"*"`) for any service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The subscriber plan it applies to; `None` (or `"*"`) for any plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    /// The currency of every amount of the tariff.
    pub currency: Currency,
    /// Charged once per session that has billable time, in minor units.
    #[serde(default)]
    pub setup: i64,
    /// Minor units per `period_seconds` of billed time.
    pub rate: i64,
    /// The period the rate is for, in seconds (at least 1).
    #[serde(default = "default_period")]
    pub period_seconds: u32,
    /// The billing increment `a/b`.
    #[serde(default)]
    pub increment: Increment,
    /// Seconds at the start of a session that are never charged.
    #[serde(default)]
    pub free_seconds: u32,
}

/// A checked tariff: non-negative charges, a period of at least one second, sane names.
///
/// See the [module documentation](self) for exactly how a duration is charged.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "TariffSpec", into = "TariffSpec")]
pub struct Tariff {
    spec: TariffSpec,
}

fn check_name(tariff: &str, what: &str, value: &str) -> Result<(), TariffError> {
    let reason = if value.is_empty() {
        format!("{what} is empty")
    } else if value.len() > MAX_NAME_LEN {
        format!("{what} is longer than {MAX_NAME_LEN} bytes")
    } else if value.chars().any(char::is_control) {
        format!("{what} contains a control character")
    } else {
        return Ok(());
    };
    Err(TariffError::Invalid {
        tariff: tariff.to_owned(),
        reason,
    })
}

/// Maps the `"*"` wildcard to `None`.
fn wildcard(key: Option<String>) -> Option<String> {
    key.filter(|k| k != "*")
}

impl Tariff {
    /// Checks `spec` and makes it a tariff.
    pub fn new(mut spec: TariffSpec) -> Result<Self, TariffError> {
        check_name(&spec.name, "name", &spec.name)?;
        spec.service = wildcard(spec.service);
        spec.plan = wildcard(spec.plan);
        if let Some(service) = &spec.service {
            check_name(&spec.name, "service", service)?;
        }
        if let Some(plan) = &spec.plan {
            check_name(&spec.name, "plan", plan)?;
        }
        let invalid = |reason: String| TariffError::Invalid {
            tariff: spec.name.clone(),
            reason,
        };
        if spec.setup < 0 {
            return Err(invalid(format!(
                "negative setup charge {} minor units",
                spec.setup
            )));
        }
        if spec.rate < 0 {
            return Err(invalid(format!("negative rate {} minor units", spec.rate)));
        }
        if spec.period_seconds == 0 {
            return Err(invalid("period_seconds is 0; it must be at least 1".into()));
        }
        Ok(Tariff { spec })
    }

    /// The tariff's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The service it applies to, `None` for any.
    pub fn service(&self) -> Option<&str> {
        self.spec.service.as_deref()
    }

    /// The plan it applies to, `None` for any.
    pub fn plan(&self) -> Option<&str> {
        self.spec.plan.as_deref()
    }

    /// The currency of its amounts.
    pub fn currency(&self) -> Currency {
        self.spec.currency
    }

    /// The setup charge.
    pub fn setup(&self) -> Money {
        Money::new(self.spec.setup, self.spec.currency)
    }

    /// The rate per [`period_seconds`](Self::period_seconds).
    pub fn rate(&self) -> Money {
        Money::new(self.spec.rate, self.spec.currency)
    }

    /// The period of the rate, in seconds.
    pub fn period_seconds(&self) -> u32 {
        self.spec.period_seconds
    }

    /// The billing increment.
    pub fn increment(&self) -> Increment {
        self.spec.increment
    }

    /// The free seconds at the start of a session.
    pub fn free_seconds(&self) -> u32 {
        self.spec.free_seconds
    }

    /// The unchecked form, e.g. to store a snapshot of the tariff.
    pub fn spec(&self) -> &TariffSpec {
        &self.spec
    }

    /// The seconds billed for a session of `duration_ms` milliseconds: 0 within the free
    /// seconds, else the billable time rounded up by the increment.
    pub fn billed_seconds(&self, duration_ms: u64) -> u64 {
        let free_ms = u64::from(self.spec.free_seconds) * 1000;
        if duration_ms <= free_ms {
            return 0;
        }
        let billable_secs = (duration_ms - free_ms).div_ceil(1000);
        self.spec.increment.billed(billable_secs)
    }

    /// What a session of `duration_ms` milliseconds costs under this tariff.
    pub fn charge_for(&self, duration_ms: u64) -> Money {
        let billed = self.billed_seconds(duration_ms);
        if billed == 0 {
            return Money::zero(self.spec.currency);
        }
        // Both factors are non-negative (checked in `new`): billed < 2^55, rate < 2^63.
        let rate = u128::from(self.spec.rate.unsigned_abs());
        let period = u128::from(self.spec.period_seconds);
        let time = (u128::from(billed) * rate).div_ceil(period);
        let time = i64::try_from(time).unwrap_or(i64::MAX);
        Money::new(self.spec.setup.saturating_add(time), self.spec.currency)
    }
}

impl TryFrom<TariffSpec> for Tariff {
    type Error = TariffError;

    fn try_from(spec: TariffSpec) -> Result<Self, Self::Error> {
        Tariff::new(spec)
    }
}

impl From<Tariff> for TariffSpec {
    fn from(tariff: Tariff) -> Self {
        tariff.spec
    }
}

/// The tariffs of a configuration, looked up by name or by service and plan.
///
/// Deserializes from an array of tariffs (`[[tariffs]]` in TOML) and checks that names are
/// unique and that no two tariffs apply to the same service and plan.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<Tariff>", into = "Vec<Tariff>")]
pub struct TariffTable {
    tariffs: Vec<Tariff>,
}

impl TariffTable {
    /// A table of `tariffs`, refused if two share a name or a (service, plan) key.
    pub fn new(tariffs: Vec<Tariff>) -> Result<Self, TariffError> {
        for (i, t) in tariffs.iter().enumerate() {
            for earlier in &tariffs[..i] {
                if earlier.name() == t.name() {
                    return Err(TariffError::DuplicateName(t.name().to_owned()));
                }
                if earlier.service() == t.service() && earlier.plan() == t.plan() {
                    return Err(TariffError::DuplicateKey {
                        first: earlier.name().to_owned(),
                        second: t.name().to_owned(),
                        service: t.service().unwrap_or("*").to_owned(),
                        plan: t.plan().unwrap_or("*").to_owned(),
                    });
                }
            }
        }
        Ok(TariffTable { tariffs })
    }

    /// Reads the `[[tariffs]]` array of a TOML document; other keys are ignored, so this
    /// also reads the relay's whole configuration file.
    pub fn from_toml_str(text: &str) -> Result<Self, TariffError> {
        #[derive(Deserialize)]
        struct Document {
            #[serde(default)]
            tariffs: TariffTable,
        }
        toml::from_str::<Document>(text)
            .map(|d| d.tariffs)
            .map_err(|e| TariffError::Config(e.to_string()))
    }

    /// The tariff called `name`.
    pub fn get(&self, name: &str) -> Result<&Tariff, TariffError> {
        self.tariffs
            .iter()
            .find(|t| t.name() == name)
            .ok_or_else(|| TariffError::Unknown(name.to_owned()))
    }

    /// The tariff for `service` and `plan`: the one naming both, else the one naming the
    /// service for any plan, else the one naming the plan for any service, else the default
    /// (naming neither).
    pub fn lookup(&self, service: &str, plan: &str) -> Result<&Tariff, TariffError> {
        let keys = [
            (Some(service), Some(plan)),
            (Some(service), None),
            (None, Some(plan)),
            (None, None),
        ];
        keys.iter()
            .find_map(|&(s, p)| {
                self.tariffs
                    .iter()
                    .find(|t| t.service() == s && t.plan() == p)
            })
            .ok_or_else(|| TariffError::NoMatch {
                service: service.to_owned(),
                plan: plan.to_owned(),
            })
    }

    /// The default tariff, if there is one.
    pub fn default_tariff(&self) -> Option<&Tariff> {
        self.tariffs
            .iter()
            .find(|t| t.service().is_none() && t.plan().is_none())
    }

    /// The tariffs in configuration order.
    pub fn iter(&self) -> std::slice::Iter<'_, Tariff> {
        self.tariffs.iter()
    }

    /// The number of tariffs.
    pub fn len(&self) -> usize {
        self.tariffs.len()
    }

    /// Whether the table has no tariff.
    pub fn is_empty(&self) -> bool {
        self.tariffs.is_empty()
    }
}

impl TryFrom<Vec<Tariff>> for TariffTable {
    type Error = TariffError;

    fn try_from(tariffs: Vec<Tariff>) -> Result<Self, Self::Error> {
        TariffTable::new(tariffs)
    }
}

impl From<TariffTable> for Vec<Tariff> {
    fn from(table: TariffTable) -> Self {
        table.tariffs
    }
}

impl<'a> IntoIterator for &'a TariffTable {
    type Item = &'a Tariff;
    type IntoIter = std::slice::Iter<'a, Tariff>;

    fn into_iter(self) -> Self::IntoIter {
        self.tariffs.iter()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn spec(name: &str, setup: i64, rate: i64, period: u32, inc: &str, free: u32) -> TariffSpec {
        TariffSpec {
            name: name.into(),
            service: None,
            plan: None,
            currency: Currency::new("EUR").unwrap(),
            setup,
            rate,
            period_seconds: period,
            increment: inc.parse().unwrap(),
            free_seconds: free,
        }
    }

    fn tariff(setup: i64, rate: i64, period: u32, inc: &str, free: u32) -> Tariff {
        Tariff::new(spec("t", setup, rate, period, inc, free)).unwrap()
    }

    #[test]
    fn charges_by_the_table() {
        // (setup, rate, period, increment, free, duration ms, billed s, charge)
        type Case = (i64, i64, u32, &'static str, u32, u64, u64, i64);
        let cases: &[Case] = &[
            // 60/60, 2 per minute, setup 10.
            (10, 2, 60, "60/60", 0, 0, 0, 0),
            (10, 2, 60, "60/60", 0, 1, 60, 12),
            (10, 2, 60, "60/60", 0, 59_999, 60, 12),
            (10, 2, 60, "60/60", 0, 60_000, 60, 12),
            (10, 2, 60, "60/60", 0, 60_001, 120, 14),
            (10, 2, 60, "60/60", 0, 120_000, 120, 14),
            (10, 2, 60, "60/60", 0, 120_001, 180, 16),
            // 1/1, 60 per minute (1 per second).
            (0, 60, 60, "1/1", 0, 1, 1, 1),
            (0, 60, 60, "1/1", 0, 1_000, 1, 1),
            (0, 60, 60, "1/1", 0, 1_001, 2, 2),
            // 30/6, 6 per minute: 30 s → 3, 36 s → 3.6 → 4, 42 s → 4.2 → 5.
            (0, 6, 60, "30/6", 0, 1, 30, 3),
            (0, 6, 60, "30/6", 0, 30_000, 30, 3),
            (0, 6, 60, "30/6", 0, 30_001, 36, 4),
            (0, 6, 60, "30/6", 0, 36_000, 36, 4),
            (0, 6, 60, "30/6", 0, 36_001, 42, 5),
            // 0/60: plain per-minute steps.
            (0, 2, 60, "0/60", 0, 1, 60, 2),
            (0, 2, 60, "0/60", 0, 60_001, 120, 4),
            // Free seconds come off the top; within them nothing is charged, not even setup.
            (10, 2, 60, "60/60", 5, 0, 0, 0),
            (10, 2, 60, "60/60", 5, 4_999, 0, 0),
            (10, 2, 60, "60/60", 5, 5_000, 0, 0),
            (10, 2, 60, "60/60", 5, 5_001, 60, 12),
            (10, 2, 60, "60/60", 5, 65_000, 60, 12),
            (10, 2, 60, "60/60", 5, 65_001, 120, 14),
            // A free tariff and a setup-only tariff.
            (0, 0, 60, "60/60", 0, 3_600_000, 3_600, 0),
            (25, 0, 60, "60/60", 0, 1, 60, 25),
            // Long sessions: 30 days at 1/1 and one per second.
            (0, 60, 60, "1/1", 0, 2_592_000_000, 2_592_000, 2_592_000),
            // The longest representable duration, rated exactly.
            (
                0,
                1,
                60,
                "1/1",
                0,
                u64::MAX,
                18_446_744_073_709_552,
                307_445_734_561_826,
            ),
            // Beyond i64::MAX minor units the charge saturates instead of wrapping.
            (
                i64::MAX,
                i64::MAX,
                1,
                "1/1",
                0,
                u64::MAX,
                18_446_744_073_709_552,
                i64::MAX,
            ),
            (0, i64::MAX, 1, "1/1", 0, 10_000, 10, i64::MAX),
        ];
        for &(setup, rate, period, inc, free, duration, billed, charge) in cases {
            let t = tariff(setup, rate, period, inc, free);
            let what =
                format!("setup {setup} rate {rate}/{period}s {inc} free {free}s, {duration} ms");
            assert_eq!(
                t.billed_seconds(duration),
                billed,
                "billed seconds for {what}"
            );
            assert_eq!(t.charge_for(duration).minor, charge, "charge for {what}");
            assert_eq!(t.charge_for(duration).currency, t.currency());
        }
    }

    #[test]
    fn refuses_unusable_tariffs_naming_the_problem() {
        let err = Tariff::new(spec("neg", -1, 2, 60, "60/60", 0)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tariff \"neg\": negative setup charge -1 minor units"
        );
        let err = Tariff::new(spec("neg", 0, -2, 60, "60/60", 0)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tariff \"neg\": negative rate -2 minor units"
        );
        let err = Tariff::new(spec("p0", 0, 2, 0, "60/60", 0)).unwrap_err();
        assert!(err.to_string().contains("period_seconds is 0"), "{err}");
        let err = Tariff::new(spec("", 0, 2, 60, "60/60", 0)).unwrap_err();
        assert!(err.to_string().contains("name is empty"), "{err}");
        for bad in ["60", "60/0", "a/b", "-1/1", "/", "60/60/60"] {
            assert_eq!(
                bad.parse::<Increment>(),
                Err(TariffError::InvalidIncrement(bad.into())),
                "{bad}"
            );
        }
    }

    const CONFIG: &str = r#"
        listen = "0.0.0.0:5060"   # the relay's own keys are ignored

        [[tariffs]]
        name = "standard"
        currency = "EUR"
        rate = 2

        [[tariffs]]
        name = "video-gold"
        service = "video"
        plan = "gold"
        currency = "EUR"
        setup = 10
        rate = 6
        increment = "30/6"
        free_seconds = 5

        [[tariffs]]
        name = "video"
        service = "video"
        plan = "*"
        currency = "EUR"
        rate = 4

        [[tariffs]]
        name = "gold"
        plan = "gold"
        currency = "EUR"
        rate = 1
    "#;

    #[test]
    fn loads_from_toml_and_looks_up_most_specific_first() {
        let table = TariffTable::from_toml_str(CONFIG).unwrap();
        assert_eq!(table.len(), 4);
        let standard = table.get("standard").unwrap();
        assert_eq!(standard.period_seconds(), 60);
        assert_eq!(standard.increment(), Increment::new(60, 60).unwrap());
        assert_eq!(standard.setup().minor, 0);
        let gold = table.get("video-gold").unwrap();
        assert_eq!(gold.increment().to_string(), "30/6");
        assert_eq!(gold.free_seconds(), 5);

        let name = |s, p| table.lookup(s, p).unwrap().name().to_owned();
        assert_eq!(name("video", "gold"), "video-gold");
        assert_eq!(name("video", "basic"), "video");
        assert_eq!(name("chat", "gold"), "gold");
        assert_eq!(name("chat", "basic"), "standard");
        assert_eq!(table.default_tariff().unwrap().name(), "standard");
        assert_eq!(
            table.get("platinum").unwrap_err().to_string(),
            "unknown tariff \"platinum\""
        );
    }

    #[test]
    fn lookup_without_default_names_the_service_and_plan() {
        let table = TariffTable::new(vec![Tariff::new(TariffSpec {
            service: Some("video".into()),
            ..spec("v", 0, 1, 60, "1/1", 0)
        })
        .unwrap()])
        .unwrap();
        let err = table.lookup("chat", "basic").unwrap_err();
        assert_eq!(
            err,
            TariffError::NoMatch {
                service: "chat".into(),
                plan: "basic".into()
            }
        );
        assert!(err.to_string().contains("no default tariff"));
    }

    #[test]
    fn refuses_bad_tables() {
        let dup = "[[tariffs]]\nname='a'\ncurrency='EUR'\nrate=1\n[[tariffs]]\nname='a'\nservice='x'\ncurrency='EUR'\nrate=1\n";
        let err = TariffTable::from_toml_str(dup).unwrap_err();
        assert!(err.to_string().contains("\"a\" is defined twice"), "{err}");

        let key = "[[tariffs]]\nname='a'\ncurrency='EUR'\nrate=1\n[[tariffs]]\nname='b'\nservice='*'\ncurrency='EUR'\nrate=1\n";
        let err = TariffTable::from_toml_str(key).unwrap_err();
        assert!(
            err.to_string()
                .contains("both apply to service * and plan *"),
            "{err}"
        );

        let neg = "[[tariffs]]\nname='n'\ncurrency='EUR'\nrate=-3\n";
        let err = TariffTable::from_toml_str(neg).unwrap_err();
        assert!(err.to_string().contains("negative rate -3"), "{err}");

        let unknown_key = "[[tariffs]]\nname='n'\ncurrency='EUR'\nrate=1\nrat=2\n";
        let err = TariffTable::from_toml_str(unknown_key).unwrap_err();
        assert!(err.to_string().contains("rat"), "{err}");

        let inc = "[[tariffs]]\nname='n'\ncurrency='EUR'\nrate=1\nincrement='60-60'\n";
        let err = TariffTable::from_toml_str(inc).unwrap_err();
        assert!(
            err.to_string().contains("invalid billing increment"),
            "{err}"
        );
    }

    #[test]
    fn a_tariff_round_trips_through_json() {
        let table = TariffTable::from_toml_str(CONFIG).unwrap();
        let t = table.get("video-gold").unwrap();
        let json = serde_json::to_string(t).unwrap();
        let back: Tariff = serde_json::from_str(&json).unwrap();
        assert_eq!(&back, t);
        assert!(
            serde_json::from_str::<Tariff>(&json.replace("\"rate\":6", "\"rate\":-6")).is_err()
        );
    }
}
