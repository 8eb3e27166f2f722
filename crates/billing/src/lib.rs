//! Billing for the service relay (placeholder while the crate is written).
