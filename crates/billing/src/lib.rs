//! Billing for the service relay (crate docs written last).

pub mod error;
pub mod money;
mod oneshot;
pub mod record;
pub mod sqlite;
pub mod store;
pub mod tariff;
pub mod writer;

pub use error::BillingError;
