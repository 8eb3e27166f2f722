//! Session timers (RFC 4028) on both legs of a session, so that a session whose terminal or
//! server vanished ends, and is billed up to its last refresh rather than for ever.
//!
//! The relay is a B2BUA: each leg negotiates its own session interval and refresher.
//!
//! * **Terminal leg** (the relay is UAS): the terminal's INVITE is answered by
//!   [`sip_core::dialog::session_timer::Policy::answer`] before any server is asked —
//!   `422` with `Min-SE` when its interval is under ours (§6), else the 2xx relayed to it
//!   carries the leg's own `Session-Expires` (§9). A terminal that does not know the
//!   extension (no `Supported: timer`, no `Session-Expires`) gets no timer: the in-dialog
//!   OPTIONS probes watch it as before.
//! * **Server leg** (the relay is UAC): every inquiry asks `Session-Expires` with
//!   `refresher=uac` and our `Min-SE` (§7.1); a `422` is asked again once with the server's
//!   `Min-SE` (§7.3); the server's 2xx decides (§7.2: none means no timer on that leg).
//! * **Refreshes** (§10): where the relay refreshes, it sends UPDATE when the peer allows
//!   it, else a re-INVITE repeating the last offer it sent on that leg, at half the
//!   interval. Where the peer refreshes, a body-less UPDATE is answered here; a re-INVITE
//!   (or an UPDATE with an offer) is relayed as before, and its 2xx refreshes both legs. Any
//!   re-INVITE or UPDATE the relay sends on a leg carries that leg's values, and any 2xx it
//!   sends or receives to one renews that leg's timer.
//! * **Expiry**: a leg the peer refreshes is given up `min(32 s, SE/3)` before its end; a
//!   leg the relay refreshes ends when its refresh gets `408` or `481` (a timeout comes as
//!   `408`) or the interval passes without a 2xx. Either way both legs get BYE and the
//!   record ends at that leg's last successful refresh (cause `timeout`).
//!
//! The state of each leg's timer is owned here ([`Timers`], one per session); durations
//! come from the monotonic clock the call is driven with.

use std::time::{Duration, Instant};

use rsip::{Header, Method, Request, Response};
use sip_core::dialog::session_timer::{self, Negotiated, Policy, UasAnswer};
use tracing::{debug, info, warn};

use super::env::CallEnv;
use super::io::{Incoming, Side};
use super::leg::PendingLeg;
use super::{Call, Purpose, Waiting};
use crate::b2bua;
use billing::record::EndCause;

/// How long a refresh of ours waits after a `491`, a busy session or another failure that
/// does not end the session, before it is sent again.
const RETRY: Duration = Duration::from_secs(2);

/// One leg's session timer.
#[derive(Debug)]
pub(crate) struct LegTimer {
    /// What the leg agreed to.
    pub(crate) n: Negotiated,
    /// The last successful refresh (the 2xx that started the session, first).
    pub(crate) refreshed_at: Instant,
    /// Whether a refresh of ours is waiting for its answer.
    pub(crate) in_flight: bool,
    /// When a refresh of ours that could not go, or failed, goes again.
    pub(crate) retry_at: Option<Instant>,
    /// The offer a re-INVITE refresh repeats on the terminal's leg (the last SDP the relay
    /// sent the terminal), kept only where the relay refreshes a terminal without UPDATE.
    pub(crate) sdp: Option<Box<(Vec<Header>, Vec<u8>)>>,
}

impl LegTimer {
    fn new(n: Negotiated, now: Instant) -> LegTimer {
        LegTimer {
            n,
            refreshed_at: now,
            in_flight: false,
            retry_at: None,
            sdp: None,
        }
    }

    /// When the relay sends its next refresh, if it is the refresher and none is waiting.
    fn refresh_due(&self) -> Option<Instant> {
        if !self.n.we_refresh || self.in_flight {
            return None;
        }
        Some(
            self.retry_at
                .unwrap_or(self.refreshed_at + session_timer::refresh_after(self.n.secs)),
        )
    }

    /// When the leg's session is over without a refresh (RFC 4028 §10).
    fn expires_at(&self) -> Instant {
        if self.n.we_refresh {
            self.refreshed_at + self.n.interval()
        } else {
            self.refreshed_at + session_timer::expiry_guard(self.n.secs)
        }
    }

    fn deadline(&self) -> Instant {
        let expiry = self.expires_at();
        self.refresh_due().map_or(expiry, |r| r.min(expiry))
    }
}

/// The session timers of a session's two legs; `None` where a leg has none.
#[derive(Debug, Default)]
pub(crate) struct Timers {
    a: Option<Box<LegTimer>>,
    b: Option<Box<LegTimer>>,
}

/// What falls due on a session's timers.
enum Due {
    /// The leg's session is over: end it, billed up to the instant.
    Expired(Side, Instant),
    /// The relay's refresh of the leg is due.
    Refresh(Side),
}

impl Timers {
    /// Starts the timers of a new session at its 2xx, at `now`: `a` as agreed with the
    /// terminal, `b` as the server's 2xx said; `a_sdp` is the SDP the terminal gets.
    pub(crate) fn start(
        &mut self,
        a: Option<Negotiated>,
        b: Option<Negotiated>,
        a_sdp: (Vec<Header>, Vec<u8>),
        now: Instant,
    ) {
        self.a = a.map(|n| Box::new(LegTimer::new(n, now)));
        self.b = b.map(|n| Box::new(LegTimer::new(n, now)));
        self.keep_sdp(a_sdp);
    }

    /// The leg's timer.
    pub(crate) fn get(&self, side: Side) -> Option<&LegTimer> {
        match side {
            Side::Terminal => self.a.as_deref(),
            Side::Server => self.b.as_deref(),
        }
    }

    fn slot(&mut self, side: Side) -> &mut Option<Box<LegTimer>> {
        match side {
            Side::Terminal => &mut self.a,
            Side::Server => &mut self.b,
        }
    }

    /// The next instant a timer of the session needs the call.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        [self.a.as_deref(), self.b.as_deref()]
            .into_iter()
            .flatten()
            .map(LegTimer::deadline)
            .min()
    }

    fn due(&self, now: Instant) -> Option<Due> {
        for side in [Side::Terminal, Side::Server] {
            if let Some(t) = self.get(side) {
                if t.expires_at() <= now {
                    return Some(Due::Expired(side, t.refreshed_at));
                }
            }
        }
        [Side::Terminal, Side::Server].into_iter().find_map(|side| {
            let t = self.get(side)?;
            t.refresh_due()
                .is_some_and(|d| d <= now)
                .then_some(Due::Refresh(side))
        })
    }

    /// The leg was refreshed at `now` with the values `n` (`None`: the peer turned its
    /// timer off, RFC 4028 §7.2 and §9).
    pub(crate) fn refreshed(&mut self, side: Side, n: Option<Negotiated>, now: Instant) {
        let slot = self.slot(side);
        match (n, slot.as_mut()) {
            (None, _) => *slot = None,
            (Some(n), Some(t)) => {
                t.n = n;
                t.refreshed_at = now;
                t.in_flight = false;
                t.retry_at = None;
            }
            (Some(n), None) => *slot = Some(Box::new(LegTimer::new(n, now))),
        }
        if side == Side::Terminal {
            // A re-INVITE refresh needs an offer only where UPDATE is not allowed.
            if let Some(t) = self.a.as_mut() {
                if !t.n.we_refresh || t.n.peer_allows_update {
                    t.sdp = None;
                }
            }
        }
    }

    /// Remembers the SDP the terminal was last sent, where a re-INVITE refresh needs it.
    pub(crate) fn keep_sdp(&mut self, sdp: (Vec<Header>, Vec<u8>)) {
        if let Some(t) = self.a.as_mut() {
            if t.n.we_refresh && !t.n.peer_allows_update && !sdp.1.is_empty() {
                t.sdp = Some(Box::new(sdp));
            }
        }
    }

    /// The session moved onto a new server leg, whose 2xx agreed to `b`.
    pub(crate) fn new_server_leg(&mut self, b: Option<Negotiated>, now: Instant) {
        self.b = b.map(|n| Box::new(LegTimer::new(n, now)));
    }

    /// Writes the leg's values on a re-INVITE or UPDATE the relay sends on it (RFC 4028
    /// §7.4), so that the peer's answer renews the same timer.
    pub(crate) fn stamp_request(
        &self,
        side: Side,
        method: Method,
        extra: &mut Vec<Header>,
        policy: &Policy,
    ) {
        if !matches!(method, Method::Invite | Method::Update) {
            return;
        }
        let Some(t) = self.get(side) else {
            return;
        };
        let mut headers: rsip::Headers = std::mem::take(extra).into();
        t.n.stamp_refresh(&mut headers, policy.min_se);
        *extra = headers.iter().cloned().collect();
    }
}

/// Whether `req` is a session refresh as RFC 4028 §10 counts them.
fn refreshes(method: Method) -> bool {
    matches!(method, Method::Invite | Method::Update)
}

impl Call {
    /// Decides the terminal leg's session timer from its INVITE (RFC 4028 §9); `false`
    /// when the INVITE was refused `422` (its interval is too small, §6).
    pub(super) fn negotiate_terminal_timer(&mut self, env: &dyn CallEnv) -> bool {
        let policy = env.limits().session_timer;
        let Some(invite) = self.a.invite.as_deref() else {
            // Not reached: this is decided when the INVITE comes.
            return false;
        };
        match policy.answer(&session_timer::read(&invite.headers)) {
            UasAnswer::TooSmall(min_se) => {
                info!(min_se, "session interval too small; 422");
                let mut resp = b2bua::local_response(
                    invite,
                    422,
                    "Session Interval Too Small",
                    Some(&sip_core::message::new_tag()),
                );
                resp.headers.push(session_timer::min_se_header(min_se));
                self.respond_a(resp);
                false
            }
            UasAnswer::None => {
                self.a_timer = None;
                true
            }
            UasAnswer::Timer(n) => {
                self.a_timer = Some(n);
                true
            }
        }
    }

    /// Checks a refresh (re-INVITE or UPDATE) that came on `side` of session `i`: `false`
    /// when it was answered here — `422` for too small an interval (§6), or `200` for a
    /// body-less UPDATE, which only refreshes the leg it came on (the relay's legs have
    /// timers of their own, so it goes no further).
    pub(super) fn check_refresh(
        &mut self,
        i: usize,
        side: Side,
        r: &Incoming,
        env: &dyn CallEnv,
        now: Instant,
    ) -> bool {
        if !refreshes(r.req.method) {
            return true;
        }
        let policy = env.limits().session_timer;
        let fields = session_timer::read(&r.req.headers);
        let answer = policy.answer(&fields);
        if let UasAnswer::TooSmall(min_se) = answer {
            info!(session_id = %self.sessions[i].id, min_se, "refresh with too small an interval; 422");
            let mut resp = b2bua::local_response(&r.req, 422, "Session Interval Too Small", None);
            resp.headers.push(session_timer::min_se_header(min_se));
            self.out.respond(r.tx, resp);
            return false;
        }
        let has_timer = self.sessions[i].timers.get(side).is_some();
        if r.req.method != Method::Update
            || !r.req.body.is_empty()
            || (!has_timer && fields.session_expires.is_none())
        {
            return true;
        }
        let s = &mut self.sessions[i];
        let dialog = match side {
            Side::Terminal => &mut s.a_dialog,
            Side::Server => &mut s.b.dialog,
        };
        if let Err(e) = dialog.check_remote_cseq(&r.req) {
            debug!(error = %e, "UPDATE out of order");
            self.refuse(r, 500, "CSeq out of order");
            return false;
        }
        let _ = dialog.refresh_from_request(&r.req);
        let mut resp = b2bua::local_response(&r.req, 200, "OK", None);
        self.answer_refresh(i, side, &r.req, &mut resp, &policy, now);
        debug!(session_id = %self.sessions[i].id, ?side, "session refreshed (UPDATE)");
        self.out.respond(r.tx, resp);
        false
    }

    /// Writes the session-timer fields of the answer `resp` the relay sends, on `side` of
    /// session `i`, to `req`; a 2xx to a re-INVITE or UPDATE renews that leg (RFC 4028 §9).
    /// Whatever the other leg's answer said about its own timer is taken out.
    pub(super) fn answer_refresh(
        &mut self,
        i: usize,
        side: Side,
        req: &Request,
        resp: &mut Response,
        policy: &Policy,
        now: Instant,
    ) {
        if resp.status_code.code() / 100 != 2 || !refreshes(req.method) {
            session_timer::strip(&mut resp.headers);
            return;
        }
        let fields = session_timer::read(&req.headers);
        let n = match policy.answer(&fields) {
            UasAnswer::Timer(n) => Some(n),
            // Checked before the request went on.
            UasAnswer::TooSmall(_) | UasAnswer::None => None,
        };
        match &n {
            Some(n) => n.stamp_2xx(&mut resp.headers),
            None => session_timer::strip(&mut resp.headers),
        }
        let timers = &mut self.sessions[i].timers;
        timers.refreshed(side, n, now);
        if side == Side::Terminal {
            timers.keep_sdp(b2bua::carried_body_of_response(resp));
        }
    }

    /// The peer on `side` of session `i` answered a re-INVITE or UPDATE the relay sent with
    /// `resp`: a 2xx renews the leg with what it says (RFC 4028 §7.2).
    pub(super) fn refreshed_by_answer(
        &mut self,
        i: usize,
        side: Side,
        method: Method,
        resp: &Response,
        now: Instant,
    ) {
        if !refreshes(method) || resp.status_code.code() / 100 != 2 {
            return;
        }
        let n = Negotiated::from_2xx(&session_timer::read(&resp.headers));
        self.sessions[i].timers.refreshed(side, n, now);
    }

    /// Acts on session `i`'s timers at `now`: an expired leg ends the session, a refresh
    /// that is due goes out.
    pub(super) fn on_session_timers(&mut self, i: usize, env: &dyn CallEnv, now: Instant) {
        // Called for established sessions only; one that ends here is no longer live.
        while self.sessions[i].live() {
            match self.sessions[i].timers.due(now) {
                None => return,
                Some(Due::Expired(side, last)) => {
                    info!(session_id = %self.sessions[i].id, ?side, "session timer expired without a refresh; ending the session");
                    self.end_until(i, EndCause::Timeout, None, env, now, last);
                    return;
                }
                Some(Due::Refresh(side)) => self.send_refresh(i, side, env, now),
            }
        }
    }

    /// Sends the relay's refresh on `side` of session `i` (RFC 4028 §10): UPDATE when the
    /// peer allows it, else a re-INVITE with the last offer sent on that leg.
    fn send_refresh(&mut self, i: usize, side: Side, env: &dyn CallEnv, now: Instant) {
        let s = &mut self.sessions[i];
        let Some(t) = s.timers.slot(side).as_mut() else {
            return;
        };
        if s.busy || s.pending_ack.is_some() {
            // A change, a transfer or a relayed re-INVITE is under way: no glare.
            t.retry_at = Some(now + RETRY);
            return;
        }
        let (method, (extra, body)) = if t.n.peer_allows_update {
            (Method::Update, (Vec::new(), Vec::new()))
        } else {
            let offer = match side {
                Side::Server => Some(s.offer.parts()),
                Side::Terminal => t.sdp.as_deref().cloned(),
            };
            match offer {
                Some(o) if !o.1.is_empty() => (Method::Invite, o),
                _ => {
                    // Nothing to offer again: the peer is watched by its expiry alone.
                    warn!(session_id = %s.id, ?side, "no offer to refresh the leg with");
                    t.retry_at = Some(t.expires_at());
                    return;
                }
            }
        };
        t.in_flight = true;
        let a_peer = self.a.peer;
        let Some((req, peer)) = self.sessions[i].request(side, a_peer, method, extra, body, env)
        else {
            if let Some(t) = self.sessions[i].timers.slot(side).as_mut() {
                t.in_flight = false;
                t.retry_at = Some(now + RETRY);
            }
            return;
        };
        debug!(session_id = %self.sessions[i].id, ?side, %method, "refreshing the session");
        let sent = (method == Method::Invite).then(|| Box::new(req.clone()));
        let token = self.out.send_waiting(req, peer);
        self.waiting.insert(
            token,
            Waiting::Refresh {
                session: i,
                side,
                sent,
            },
        );
    }

    /// The answer to the relay's refresh on `side` of session `i`.
    pub(super) fn on_refresh_answer(
        &mut self,
        i: usize,
        side: Side,
        sent: Option<Box<Request>>,
        resp: Response,
        env: &dyn CallEnv,
        now: Instant,
    ) {
        if !self.sessions[i].live() {
            return;
        }
        let code = resp.status_code.code();
        if code / 100 == 2 {
            let a_peer = self.a.peer;
            if let Some(invite) = sent {
                let s = &mut self.sessions[i];
                let (dialog, peer) = match side {
                    Side::Terminal => (&mut s.a_dialog, a_peer),
                    Side::Server => (&mut s.b.dialog, s.b.peer),
                };
                let _ = dialog.on_response(&resp);
                let local = env.local(peer);
                match dialog.ack_for_2xx(&invite, &local.via(), Vec::new(), Vec::new()) {
                    Ok(ack) => self.out.ack(ack, peer),
                    Err(e) => warn!(error = %e, "cannot ACK the refresh"),
                }
            }
            debug!(session_id = %self.sessions[i].id, ?side, "session refresh answered");
            self.refreshed_by_answer(i, side, Method::Update, &resp, now);
            return;
        }
        let Some(t) = self.sessions[i].timers.slot(side).as_mut() else {
            return;
        };
        t.in_flight = false;
        match code {
            408 | 481 => {
                // RFC 4028 §10: the refresh timed out or the dialog is gone — BYE.
                let last = t.refreshed_at;
                info!(session_id = %self.sessions[i].id, ?side, code, "session refresh failed; ending the session");
                self.end_until(i, EndCause::Timeout, None, env, now, last);
            }
            405 | 501 if t.n.peer_allows_update => {
                // It does not take UPDATE after all: a re-INVITE next time.
                t.n.peer_allows_update = false;
                t.retry_at = Some(now);
            }
            422 => {
                let min_se = session_timer::read(&resp.headers)
                    .min_se
                    .unwrap_or(t.n.secs);
                t.n.secs = t.n.secs.max(min_se);
                t.retry_at = Some(now);
            }
            _ => {
                // The session goes on until it expires unless a retry gets through.
                t.retry_at = Some(now + RETRY);
                debug!(session_id = %self.sessions[i].id, ?side, code, "session refresh refused; trying again");
            }
        }
    }

    /// A server leg refused `422 Session Interval Too Small`: asked again, once, with the
    /// interval its `Min-SE` names (RFC 4028 §7.3), up to a day. Gives the leg back when it
    /// is not asked again.
    pub(super) fn retry_interval_too_small(
        &mut self,
        leg: PendingLeg<Purpose>,
        code: u16,
        resp: Option<&Response>,
        env: &dyn CallEnv,
        now: Instant,
    ) -> Option<PendingLeg<Purpose>> {
        if code != 422 {
            return Some(leg);
        }
        let min_se = resp.and_then(|r| session_timer::read(&r.headers).min_se);
        let Some(min_se) = min_se.filter(|m| *m > leg.session_expires && *m <= 86_400) else {
            return Some(leg);
        };
        let Some(plan) = leg.plan.clone() else {
            return Some(leg);
        };
        if self.inquiry.cancelled {
            return Some(leg);
        }
        info!(
            server = leg.server.uri_text(),
            min_se, "server asks a longer session interval; asking again"
        );
        self.start_leg(leg.server, plan, leg.purpose, env, now);
        if let Some((_, l)) = self.legs.last_mut() {
            l.session_expires = min_se;
        }
        None
    }
}
