//! What a call asks of the relay around it, synchronously and without I/O: its addresses,
//! its limits, the directory's candidates, the rules, the subscriber's session slots, and
//! the indexes that point at the call's sessions (the call owns them; the directory's counters and the served index only
//! index them). [`crate::relay::Relay`] implements it; the call's unit tests have their own.

use std::collections::VecDeque;
use std::sync::Arc;

use rsip::Request;
use sip_core::Peer;

use super::limits::SessionLimits;
use crate::b2bua::LocalAddr;
use crate::directory::{ServerRef, Strategy};
use crate::served::ServedSession;

/// What the rules decided again for a change or a transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redecision {
    /// The service to deliver.
    pub service: String,
    /// Its parameters.
    pub params: Vec<(String, String)>,
    /// The tariff plan the next segment is billed on.
    pub plan: String,
}

/// The relay as a call sees it.
pub trait CallEnv {
    /// The timing limits.
    fn limits(&self) -> SessionLimits;
    /// The relay's realm (the host of the identities it asserts).
    fn realm(&self) -> &str;
    /// The relay's address for talking to `peer` (same transport and address family).
    fn local(&self, peer: Peer) -> Arc<LocalAddr>;
    /// The servers to inquire of for `service`, in the strategy's order.
    fn candidates(&self, service: &str, strategy: Strategy) -> Vec<ServerRef>;
    /// The servers to move a live session of `service` to: others than `current` first,
    /// `current` last when `current_last`.
    fn candidates_away_from(
        &self,
        service: &str,
        current: &ServerRef,
        current_last: bool,
    ) -> VecDeque<ServerRef>;
    /// Whether `server` delivers `service`.
    fn serves(&self, server: &ServerRef, service: &str) -> bool;
    /// Runs the rules again for `subscriber` asking for `service` with in-dialog request
    /// `req`; a refusal is a status code and reason.
    fn decide_again(
        &self,
        subscriber: &str,
        req: &Request,
        service: &str,
        params: &[(String, String)],
    ) -> Result<Redecision, (u16, &'static str)>;
    /// Whether a URI names the relay (a transfer's `Refer-To` must).
    fn names_relay(&self, uri: &sip_core::uri::Uri) -> bool;
    /// Counts a session on `server` (its capacity).
    fn session_started(&self, server: &ServerRef);
    /// Counts a session on `server` as ended.
    fn session_ended(&self, server: &ServerRef);
    /// Takes one more of `subscriber`'s concurrent session slots, for a further session of a
    /// forked request, if it holds fewer than `limit`; whether it did. (Admission took the
    /// slot of the call's first session; see `crate::subscriber_sessions`.)
    fn take_session_slot(&self, subscriber: &str, limit: u32) -> bool;
    /// Gives back one of `subscriber`'s session slots: a session ended, or the inquiry ended
    /// without using the slot admission took.
    fn give_back_session_slot(&self, subscriber: &str);
    /// Makes a session findable by charge requests.
    fn index(&self, served: ServedSession);
    /// Takes a session whose record is committed out of the served index: a charge for it
    /// is checked against that record from now on.
    fn unindex(&self, session_id: &str);
}
