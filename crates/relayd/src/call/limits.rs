//! What a call is told when it starts: what admission decided ([`Admission`], the
//! subscriber's session limit among it) and the timing limits every call lives by
//! ([`SessionLimits`]), and which failures send an inquiry on to the next candidate
//! ([`fails_over`]).

use std::time::Duration;

use sip_core::dialog::session_timer;

use crate::directory::Strategy;

/// What admission decided for an authenticated INVITE (claims 1 and 2): who, which service,
/// how to search, how to bill.
#[derive(Debug, Clone)]
pub struct Admission {
    /// The authenticated subscriber.
    pub subscriber: String,
    /// The service to deliver.
    pub service: String,
    /// The server selection strategy.
    pub strategy: Strategy,
    /// Service parameters passed on to the server.
    pub params: Vec<(String, String)>,
    /// The tariff plan.
    pub plan: String,
    /// The rule that decided.
    pub rule: String,
    /// The most sessions the subscriber may hold at once (`[[classes]] max_sessions` of the
    /// class decided for this request). Admission took one of its slots for this call: the
    /// call's first session keeps it, else the call gives it back when its inquiry ends.
    pub session_limit: u32,
}

/// What a call keeps of its [`Admission`] for its life: the rule that decided was for the
/// trace and the logs of admission, and the text never grows, so boxed slices (72 bytes
/// in every call instead of 128).
#[derive(Debug)]
pub(crate) struct Admitted {
    pub(crate) subscriber: Box<str>,
    pub(crate) service: Box<str>,
    pub(crate) params: Box<[(String, String)]>,
    pub(crate) plan: Box<str>,
    pub(crate) strategy: Strategy,
    pub(crate) session_limit: u32,
}

impl From<Admission> for Admitted {
    fn from(adm: Admission) -> Admitted {
        Admitted {
            subscriber: adm.subscriber.into(),
            service: adm.service.into(),
            params: adm.params.into(),
            plan: adm.plan.into(),
            strategy: adm.strategy,
            session_limit: adm.session_limit,
        }
    }
}

/// The reason phrase of the `486` for a subscriber that holds as many sessions as its class
/// allows (at admission, or for a forked answer when none was relayed yet).
pub const SESSION_LIMIT_REASON: &str = "Too many sessions";

/// Liveness and timing limits of sessions.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    /// How long a server may take to answer an inquiry at all (any response) before the
    /// next candidate is tried.
    pub inquiry_timeout: Duration,
    /// How long a server may ring before the inquiry gives up on it.
    pub answer_timeout: Duration,
    /// How long to wait for the terminal's ACK to a 2xx (64·T1, RFC 3261 §13.3.1.4).
    pub ack_timeout: Duration,
    /// How often each leg of an established session is probed with OPTIONS; zero disables.
    pub probe_interval: Duration,
    /// How long a forked inquiry waits for answers before cancelling the pending legs.
    pub fork_timeout: Duration,
    /// The session timers of both legs (RFC 4028): the interval asked for and the smallest
    /// accepted (`[session] session_expires_secs`, `min_se_secs`).
    pub session_timer: session_timer::Policy,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            inquiry_timeout: Duration::from_secs(4),
            answer_timeout: Duration::from_secs(120),
            ack_timeout: Duration::from_secs(32),
            probe_interval: Duration::from_secs(30),
            fork_timeout: Duration::from_secs(30),
            session_timer: session_timer::Policy::default(),
        }
    }
}

/// Whether a failure from a server makes the inquiry try the next candidate: the server
/// cannot serve now (408, 480, 486, 5xx), or declines for itself (6xx).
pub fn fails_over(code: u16) -> bool {
    matches!(code, 408 | 480 | 486 | 500..=699)
}
