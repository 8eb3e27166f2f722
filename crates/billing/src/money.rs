//! Money as integer minor units with an ISO 4217 currency code.
//!
//! There are no floats anywhere in this crate: an amount is a count of the currency's
//! minor unit (cents for EUR, yen for JPY), and every operation on it is checked, so an
//! overflow is an error rather than a wrapped or rounded number.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a currency code or an amount was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    /// The currency code is not three ASCII letters.
    #[error("invalid currency code {0:?}: expected three ASCII letters such as \"EUR\"")]
    InvalidCurrency(String),
    /// Two amounts in different currencies were combined.
    #[error("currency mismatch: {left} and {right} cannot be added")]
    CurrencyMismatch {
        /// The currency of the left-hand amount.
        left: Currency,
        /// The currency of the right-hand amount.
        right: Currency,
    },
    /// The result does not fit in 64-bit minor units.
    #[error("amount overflow: the result does not fit in 64-bit minor units")]
    Overflow,
}

/// An ISO 4217 alphabetic currency code, stored upper-case (`EUR`, `USD`, `JPY`).
///
/// Only the shape is checked (three ASCII letters); the crate does not carry the ISO list,
/// so a private code such as `XPT` (or a made-up `CRD` for credits) is accepted.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Currency([u8; 3]);

impl Currency {
    /// Parses a three-letter code, folding it to upper case.
    pub fn new(code: &str) -> Result<Self, MoneyError> {
        match code.as_bytes() {
            [a, b, c] if [a, b, c].iter().all(|x| x.is_ascii_alphabetic()) => Ok(Currency([
                a.to_ascii_uppercase(),
                b.to_ascii_uppercase(),
                c.to_ascii_uppercase(),
            ])),
            _ => Err(MoneyError::InvalidCurrency(code.to_owned())),
        }
    }

    /// The code as a string slice, e.g. `"EUR"`.
    pub fn as_str(&self) -> &str {
        // The bytes are ASCII letters by construction, so this never takes the fallback.
        std::str::from_utf8(&self.0).unwrap_or("???")
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Currency({})", self.as_str())
    }
}

impl FromStr for Currency {
    type Err = MoneyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Currency::new(s)
    }
}

impl Serialize for Currency {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Currency::new(&s).map_err(serde::de::Error::custom)
    }
}

/// An amount of money: a signed count of minor units and its currency.
///
/// Stored amounts are never negative (the store refuses them); the type is signed so that
/// a negative input can be represented and then refused with a clear error instead of
/// silently wrapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Money {
    /// The amount in the currency's minor unit (e.g. cents).
    pub minor: i64,
    /// The currency of the amount.
    pub currency: Currency,
}

impl Money {
    /// An amount of `minor` units of `currency`.
    pub const fn new(minor: i64, currency: Currency) -> Self {
        Money { minor, currency }
    }

    /// Zero in `currency`.
    pub const fn zero(currency: Currency) -> Self {
        Money { minor: 0, currency }
    }

    /// Whether the amount is below zero.
    pub const fn is_negative(&self) -> bool {
        self.minor < 0
    }

    /// The sum of two amounts of the same currency, or an error on a currency mismatch or
    /// an overflow.
    pub fn checked_add(self, other: Money) -> Result<Money, MoneyError> {
        if self.currency != other.currency {
            return Err(MoneyError::CurrencyMismatch {
                left: self.currency,
                right: other.currency,
            });
        }
        let minor = self
            .minor
            .checked_add(other.minor)
            .ok_or(MoneyError::Overflow)?;
        Ok(Money::new(minor, self.currency))
    }

    /// The amount multiplied by a count (units × unit price), or an error on overflow.
    pub fn checked_mul(self, count: i64) -> Result<Money, MoneyError> {
        let minor = self.minor.checked_mul(count).ok_or(MoneyError::Overflow)?;
        Ok(Money::new(minor, self.currency))
    }
}

/// Shows the amount as `<minor units> <currency>`, e.g. `1250 EUR` for 12.50 euros; the
/// crate does not know each currency's exponent, so it never places a decimal point.
impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.minor, self.currency)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn eur() -> Currency {
        Currency::new("EUR").unwrap()
    }

    #[test]
    fn currency_codes_are_three_letters_folded_to_upper_case() {
        assert_eq!(Currency::new("eur").unwrap().as_str(), "EUR");
        assert_eq!("Usd".parse::<Currency>().unwrap().to_string(), "USD");
        for bad in ["", "EU", "EURO", "E1R", "€UR", "EU "] {
            assert_eq!(
                Currency::new(bad),
                Err(MoneyError::InvalidCurrency(bad.to_owned())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn addition_checks_currency_and_overflow() {
        let a = Money::new(150, eur());
        assert_eq!(
            a.checked_add(Money::new(50, eur())),
            Ok(Money::new(200, eur()))
        );
        let usd = Currency::new("USD").unwrap();
        assert_eq!(
            a.checked_add(Money::new(1, usd)),
            Err(MoneyError::CurrencyMismatch {
                left: eur(),
                right: usd
            })
        );
        assert_eq!(
            Money::new(i64::MAX, eur()).checked_add(Money::new(1, eur())),
            Err(MoneyError::Overflow)
        );
    }

    #[test]
    fn multiplication_checks_overflow() {
        assert_eq!(
            Money::new(25, eur()).checked_mul(4),
            Ok(Money::new(100, eur()))
        );
        assert_eq!(
            Money::new(i64::MAX / 2 + 1, eur()).checked_mul(2),
            Err(MoneyError::Overflow)
        );
    }

    #[test]
    fn serde_uses_the_plain_code() {
        let m = Money::new(1250, eur());
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, r#"{"minor":1250,"currency":"EUR"}"#);
        assert_eq!(serde_json::from_str::<Money>(&json).unwrap(), m);
        assert!(serde_json::from_str::<Money>(r#"{"minor":1,"currency":"EURO"}"#).is_err());
        assert_eq!(m.to_string(), "1250 EUR");
    }
}
