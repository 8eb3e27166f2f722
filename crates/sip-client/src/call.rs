//! `sip-client call`: the INVITE with the service request information and our SDP offer,
//! its 407, the provisional responses shown as status lines, every 2xx ACKed and turned
//! into its own session (forks, claim 7), and the call-level loop that runs the script, the
//! terminal escapes and Ctrl-C until every session has ended.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use rsip::{Method, Request, Response};
use sip_core::dialog::{cancel_for, Dialog, DialogId};
use sip_core::endpoint::{ClientEvent, ClientTx};
use sip_core::message;
use sip_core::sdp::{AppSdp, Setup};
use sip_core::uri::Uri;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot, watch};

use crate::auth::{with_credentials, AuthError};
use crate::config::{CallArgs, ConfigError, Settings};
use crate::escape::{self, EscapeFilter, Piece};
use crate::events::{Event, Events};
use crate::failure::Failure;
use crate::headers;
use crate::input::InputHub;
use crate::output::{self, Output};
use crate::registration::{self, Registration};
use crate::router::{Router, SessionInput};
use crate::script::{self, Action, Step, Target};
use crate::service::ServiceRequest;
use crate::session::{self, Report, Shared, Start};
use crate::ua::Ua;

/// How much of stdin is kept for sessions that start later (forks).
const INPUT_HISTORY: usize = 1 << 20;

/// A command for the call loop, with who to tell when it is done.
type Command = (Action, Option<oneshot::Sender<()>>);

/// Why the call is being given up before an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cancelled {
    /// The answer timeout ran out.
    NoAnswer,
    /// The user hung up (Ctrl-C, `~.`, `bye`).
    ByUser,
}

/// Runs `sip-client call`; returns the exit status.
pub async fn run(settings: Settings, args: CallArgs, events: Events) -> anyhow::Result<u8> {
    let service =
        ServiceRequest::parse_args(&args.service, &args.params).map_err(|e| ConfigError {
            source: "SERVICE".into(),
            message: e.to_string(),
        })?;
    let steps = match &args.then {
        Some(text) => Some(script::parse_script(text).map_err(|e| ConfigError {
            source: "--then".into(),
            message: e.to_string(),
        })?),
        None => None,
    };
    let mode = match (&args.output_dir, args.label) {
        (Some(dir), _) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create --output-dir {}", dir.display()))?;
            output::Mode::Dir(dir.clone())
        }
        (None, true) => output::Mode::Labelled,
        (None, false) => output::Mode::Auto,
    };

    let (ua, endpoint_events) = Ua::start(&settings).await?;
    let router = Router::default();
    tokio::spawn(router.clone().run(ua.clone(), endpoint_events));

    let mut registration = None;
    let mut refresher = None;
    if !args.no_register {
        let mut reg = Registration::new(ua.clone(), settings.expires, events.clone());
        let granted = reg.register().await?;
        let reg = Arc::new(tokio::sync::Mutex::new(reg));
        let ev = events.clone();
        let keeper = reg.clone();
        refresher = Some(tokio::spawn(async move {
            let e = registration::keep_refreshed(keeper, granted).await;
            ev.notice(format!("registration refresh failed: {e:#}"));
        }));
        registration = Some(reg);
    }

    let output = Output::start(mode);
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel::<Command>();
    let stdin_tty = std::io::stdin().is_terminal();
    let escapes = !args.no_escapes && (args.escapes || stdin_tty);
    let hub = (!args.no_data).then(|| InputHub::new(INPUT_HISTORY));
    let stdin_task = if hub.is_some() || escapes {
        Some(tokio::spawn(read_stdin(
            hub.clone(),
            escapes,
            cmd_tx.clone(),
            events.clone(),
        )))
    } else {
        None
    };

    let (established_tx, established_rx) = watch::channel(0u32);
    let (script_done_tx, script_done_rx) = watch::channel(steps.is_none());
    let script_task = steps.map(|steps| {
        tokio::spawn(run_script(
            steps,
            cmd_tx.clone(),
            established_rx.clone(),
            script_done_tx,
        ))
    });

    let (reports_tx, reports_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        ua: ua.clone(),
        events: events.clone(),
        output: output.clone(),
        input: hub,
        data: !args.no_data,
        wait_after_eof: settings.wait_after_eof,
        script_done: script_done_rx,
        reports: reports_tx,
        router,
    });

    let mut call = Call {
        shared,
        service,
        answer_timeout: settings.answer_timeout,
        sessions: BTreeMap::new(),
        dialogs: HashMap::new(),
        established: established_tx,
        exit: crate::EXIT_OK,
        answered: false,
        cancelled: None,
    };
    let result = call.run(cmd_rx, reports_rx).await;

    for task in [stdin_task, script_task].into_iter().flatten() {
        task.abort();
    }
    output.close().await;
    if let Some(task) = refresher {
        task.abort();
    }
    if let Some(reg) = registration {
        // The binding of this process goes with it; a relay that does not answer only
        // delays the exit briefly.
        let limit = ua.transaction_timeout().min(Duration::from_secs(2));
        if let Ok(Err(e)) =
            tokio::time::timeout(limit, async { reg.lock().await.unregister().await }).await
        {
            tracing::info!(error = %e, "unregister failed");
        }
    }
    result
}

struct Call {
    shared: Arc<Shared>,
    service: ServiceRequest,
    answer_timeout: Duration,
    sessions: BTreeMap<u32, mpsc::UnboundedSender<SessionInput>>,
    dialogs: HashMap<DialogId, u32>,
    established: watch::Sender<u32>,
    exit: u8,
    answered: bool,
    cancelled: Option<Cancelled>,
}

impl Call {
    fn ua(&self) -> &Ua {
        &self.shared.ua
    }

    fn events(&self) -> &Events {
        &self.shared.events
    }

    /// Our SDP offer (docs/protocol.md): the terminal is the active side, port 9.
    fn offer(&self) -> AppSdp {
        let mut sdp = AppSdp::new(self.ua().local_ip(), 9, Setup::Active);
        // On a TLS SIP leg the data connection must be TLS too (TCP/TLS, RFC 4572 §7).
        sdp.tls = crate::data::tls_required();
        sdp.session_name = "relay".into();
        sdp.service = Some(self.service.name.clone());
        sdp
    }

    fn invite(
        &self,
        call_id: &str,
        from_tag: &str,
        cseq: u32,
        offer: &AppSdp,
    ) -> anyhow::Result<Request> {
        let domain = &self.ua().account().domain;
        let uri_text = self.service.uri(domain);
        // sip-core's parser: the domain may be an IPv6 reference (`sip:echo@[::1]`).
        let uri = Uri::parse(&uri_text)
            .with_context(|| format!("{uri_text} is not a valid Request-URI"))?;
        Ok(self.ua().request(
            Method::Invite,
            &uri,
            &format!("<{uri_text}>"),
            call_id,
            from_tag,
            cseq,
            vec![
                headers::other("P-Preferred-Service", self.service.header_value()),
                headers::allow(),
                headers::content_type_header("application/sdp"),
            ],
            offer.to_string().into_bytes(),
        ))
    }

    async fn run(
        &mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut reports: mpsc::UnboundedReceiver<Report>,
    ) -> anyhow::Result<u8> {
        let offer = self.offer();
        let call_id = message::new_call_id(&self.ua().local_ip().to_string());
        let from_tag = message::new_tag();
        let mut cseq = 1;
        let mut invite = self.invite(&call_id, &from_tag, cseq, &offer)?;
        let relay = self.ua().relay();
        let what = format!("INVITE {}", invite.uri);
        let mut tx: Option<ClientTx> = Some(self.ua().send(invite.clone(), relay)?);
        let mut creds = Vec::new();
        let ring_deadline = tokio::time::Instant::now() + self.answer_timeout;
        // After the first 2xx, other forks' 2xx come within 64·T1 (Timer M); after a
        // CANCEL, its 487 within as long.
        let mut window_deadline: Option<tokio::time::Instant> = None;
        let mut interrupts = 0u32;
        let mut shutdown = Shutdown::new();
        let mut script_done = self.shared.script_done.clone();

        loop {
            // With every session over, the call is done, unless the script still waits for
            // sessions that other forks may yet bring within the fork window (Timer M).
            let script_waits = !*script_done.borrow();
            if self.answered
                && self.sessions.is_empty()
                && !(script_waits && window_deadline.is_some())
            {
                return Ok(self.exit);
            }
            let ringing = !self.answered && self.cancelled.is_none();
            tokio::select! {
                ev = next(&mut tx) => {
                    let Some(ev) = ev else {
                        tx = None;
                        if !self.answered {
                            return Err(Failure::NoAnswer(format!("{what}: the transaction ended without an answer")).into());
                        }
                        continue;
                    };
                    let resp = match ev {
                        ClientEvent::Response(r) => r,
                        ClientEvent::TimedOut => {
                            tx = None;
                            if self.answered { continue; }
                            return Err(Failure::NoAnswer(format!("{what}: no answer from the relay (timeout)")).into());
                        }
                        ClientEvent::Failed(e) => {
                            tx = None;
                            if self.answered { continue; }
                            anyhow::bail!("{what}: {e}");
                        }
                    };
                    let (code, reason) = headers::status(&resp);
                    match code {
                        100..=199 => {
                            if !self.answered {
                                self.events().emit(Event::Provisional { status: code, reason });
                            }
                        }
                        200..=299 => {
                            self.on_2xx(&invite, resp, &offer).await;
                            if window_deadline.is_none() || self.cancelled.is_some() {
                                window_deadline = Some(tokio::time::Instant::now() + self.ua().transaction_timeout());
                            }
                            if self.cancelled == Some(Cancelled::ByUser) {
                                // The answer crossed our CANCEL: hang up what was established.
                                self.dispatch(Action::Bye(Target::All), None);
                            }
                            self.cancelled = None;
                        }
                        401 | 407 if !self.answered && self.cancelled.is_none() => {
                            match self.ua().authenticate(&invite, &resp) {
                                Ok(h) => {
                                    creds.push(h);
                                    cseq += 1;
                                    let mut next_invite = self.invite(&call_id, &from_tag, cseq, &offer)?;
                                    for c in &creds {
                                        next_invite = with_credentials(next_invite, c.clone());
                                    }
                                    invite = next_invite;
                                    tx = Some(self.ua().send(invite.clone(), relay)?);
                                }
                                Err(AuthError::Rejected { status, realm }) => {
                                    return Err(Failure::AuthFailed(format!(
                                        "authentication failed: the relay refused the credentials of {} for realm {realm:?} ({status} {reason})",
                                        self.ua().account().user
                                    )).into());
                                }
                                Err(AuthError::NoChallenge(why)) => {
                                    self.events().emit(Event::Refused { status: code, reason: reason.clone() });
                                    return Err(Failure::Refused { what, status: code, reason: format!("{reason} ({why})") }.into());
                                }
                            }
                        }
                        _ => {
                            tx = None;
                            if self.answered {
                                continue;
                            }
                            return match self.cancelled {
                                Some(Cancelled::ByUser) => Ok(crate::EXIT_OK),
                                Some(Cancelled::NoAnswer) => Err(Failure::NoAnswer(format!(
                                    "{what}: no answer within {} s ({code} {reason})", self.answer_timeout.as_secs())).into()),
                                None => {
                                    self.events().emit(Event::Refused { status: code, reason: reason.clone() });
                                    Err(Failure::from_status(&what, code, &reason).into())
                                }
                            };
                        }
                    }
                }
                _ = tokio::time::sleep_until(ring_deadline), if ringing => {
                    self.cancel(&invite, Cancelled::NoAnswer);
                    window_deadline = Some(tokio::time::Instant::now() + self.ua().transaction_timeout());
                }
                changed = script_done.changed(), if script_waits => {
                    if changed.is_err() {
                        // The script is gone: it waits for nothing any more.
                        script_done = watch::channel(true).1;
                    }
                }
                _ = sleep_opt(window_deadline), if window_deadline.is_some() => {
                    window_deadline = None;
                    tx = None;
                    if !self.answered {
                        return match self.cancelled {
                            Some(Cancelled::ByUser) => Ok(crate::EXIT_OK),
                            _ => Err(Failure::NoAnswer(format!("{what}: no answer")).into()),
                        };
                    }
                }
                Some((action, done)) = commands.recv() => {
                    if !self.answered && matches!(action, Action::Bye(_)) {
                        self.cancel(&invite, Cancelled::ByUser);
                        window_deadline = Some(tokio::time::Instant::now() + self.ua().transaction_timeout());
                        if let Some(d) = done { let _ = d.send(()); }
                    } else {
                        self.dispatch(action, done);
                    }
                }
                Some(report) = reports.recv() => {
                    self.sessions.remove(&report.id);
                    self.exit = self.exit.max(report.exit);
                }
                _ = shutdown.recv() => {
                    interrupts += 1;
                    if interrupts > 1 {
                        self.events().notice("interrupted again: leaving without waiting");
                        return Ok(crate::EXIT_INTERRUPTED);
                    }
                    if self.answered {
                        self.dispatch(Action::Bye(Target::All), None);
                    } else {
                        self.cancel(&invite, Cancelled::ByUser);
                        window_deadline = Some(tokio::time::Instant::now() + self.ua().transaction_timeout());
                    }
                }
            }
        }
    }

    /// Sends a CANCEL for the INVITE (RFC 3261 §9.1); its 487 ends the loop.
    fn cancel(&mut self, invite: &Request, why: Cancelled) {
        if self.cancelled.is_some() {
            return;
        }
        self.cancelled = Some(why);
        match cancel_for(invite) {
            Ok(cancel) => match self.ua().send(cancel, self.ua().relay()) {
                Ok(mut tx) => {
                    tokio::spawn(async move { while tx.recv().await.is_some() {} });
                }
                Err(e) => tracing::warn!(error = %e, "CANCEL not sent"),
            },
            Err(e) => tracing::warn!(error = %e, "cannot build CANCEL"),
        }
    }

    /// A 2xx: ACK it; a new To tag is a new session, a known one a retransmission.
    async fn on_2xx(&mut self, invite: &Request, resp: Response, offer: &AppSdp) {
        let Some(id) = DialogId::of_response(&resp) else {
            tracing::warn!("2xx without a To tag ignored");
            return;
        };
        if let Some(n) = self.dialogs.get(&id) {
            if let Some(s) = self.sessions.get(n) {
                let _ = s.send(SessionInput::Stray2xx(resp));
            }
            return;
        }
        let dialog = match Dialog::uac(invite, &resp) {
            Ok(d) => d,
            Err(e) => {
                self.events()
                    .notice(format!("a 2xx could not make a dialog ({e}): ignored"));
                return;
            }
        };
        let via = self.ua().via().clone();
        let ack = match dialog.ack_for_2xx(invite, &via, Vec::new(), Vec::new()) {
            Ok(a) => a,
            Err(e) => {
                self.events().notice(format!("cannot ACK a 2xx ({e})"));
                return;
            }
        };
        let peer = self.ua().peer_for(&dialog.next_hop_uri());
        let n = self.dialogs.len() as u32 + 1;
        self.dialogs.insert(id.clone(), n);
        self.answered = true;
        let (code, reason) = headers::status(&resp);
        self.events().emit(Event::Established {
            session: n,
            status: code,
            reason,
            service: self.service.to_string(),
            call_id: id.call_id.clone(),
            remote_tag: id.remote_tag.clone(),
        });
        self.shared.output.sessions(n).await;
        // The session is routed to before the ACK leaves: the relay may send an in-dialog
        // request as soon as it has the ACK. It starts once the ACK is out: a BYE of its
        // (a data token refused at once) must not overtake the ACK.
        let (ack_out, ack_out_rx) = oneshot::channel();
        let sender = session::spawn(
            self.shared.clone(),
            Start {
                id: n,
                dialog,
                invite: invite.clone(),
                ack: ack.clone(),
                answer: resp.body.clone(),
                service: self.service.clone(),
                offer: offer.clone(),
                acked: ack_out_rx,
            },
        );
        self.ua().send_ack(ack, peer).await;
        let _ = ack_out.send(());
        self.sessions.insert(n, sender);
        let _ = self.established.send(n);
    }

    /// Hands an action to the sessions it targets; `done` is told when all have done it.
    fn dispatch(&mut self, action: Action, done: Option<oneshot::Sender<()>>) {
        let target = match &action {
            Action::Change(t, _) | Action::Transfer(t, _) | Action::Bye(t) | Action::Status(t) => {
                *t
            }
            Action::Help => {
                self.events().notice(escape::HELP);
                if let Some(d) = done {
                    let _ = d.send(());
                }
                return;
            }
            Action::Wait(_) | Action::Sessions(_) => {
                if let Some(d) = done {
                    let _ = d.send(());
                }
                return;
            }
        };
        let mut waits = Vec::new();
        for (id, s) in &self.sessions {
            if target.includes(*id) {
                let (tx, rx) = oneshot::channel();
                if s.send(SessionInput::Command(action.clone(), tx)).is_ok() {
                    waits.push(rx);
                }
            }
        }
        if waits.is_empty() {
            let which = match target {
                Target::All => "no live session".to_string(),
                Target::Session(n) => format!("no live session {n}"),
            };
            self.events().notice(which);
        }
        tokio::spawn(async move {
            for w in waits {
                let _ = w.await;
            }
            if let Some(d) = done {
                let _ = d.send(());
            }
        });
    }
}

async fn next(tx: &mut Option<ClientTx>) -> Option<ClientEvent> {
    match tx {
        Some(t) => t.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Ctrl-C (SIGINT) and, on Unix, SIGTERM: listened to from creation on, so a signal that
/// arrives while the program is busy is not lost.
pub struct Shutdown {
    #[cfg(unix)]
    signals: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Shutdown {
    /// Starts listening.
    pub fn new() -> Shutdown {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let signals = match (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) {
                (Ok(i), Ok(t)) => Some((i, t)),
                _ => None,
            };
            Shutdown { signals }
        }
        #[cfg(not(unix))]
        {
            Shutdown {}
        }
    }

    /// The next signal.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some((int, term)) = self.signals.as_mut() {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Reads stdin: data into the hub, `~` escape lines (when on) into commands.
async fn read_stdin(
    hub: Option<Arc<InputHub>>,
    escapes: bool,
    commands: mpsc::UnboundedSender<Command>,
    events: Events,
) {
    let mut stdin = tokio::io::stdin();
    let mut filter = EscapeFilter::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match stdin.read(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "stdin read failed");
                0
            }
        };
        let pieces = if n == 0 {
            filter.finish()
        } else if escapes {
            filter.feed(&buf[..n])
        } else {
            vec![Piece::Data(buf[..n].to_vec())]
        };
        for piece in pieces {
            match piece {
                Piece::Data(d) => {
                    if let Some(h) = &hub {
                        h.push(Bytes::from(d)).await;
                    }
                }
                Piece::Command(Ok(action)) => {
                    let _ = commands.send((action, None));
                }
                Piece::Command(Err(e)) => events.notice(e.to_string()),
            }
        }
        if n == 0 {
            if let Some(h) = &hub {
                h.finish();
            }
            return;
        }
    }
}

/// Runs the `--then` steps from the first established session on; marks the script done.
async fn run_script(
    steps: Vec<Step>,
    commands: mpsc::UnboundedSender<Command>,
    mut established: watch::Receiver<u32>,
    done: watch::Sender<bool>,
) {
    if established.wait_for(|n| *n >= 1).await.is_err() {
        return;
    }
    for step in steps {
        tokio::time::sleep(step.delay).await;
        match step.action {
            Action::Wait(d) => tokio::time::sleep(d).await,
            Action::Sessions(n) => {
                if established.wait_for(|c| *c >= n).await.is_err() {
                    return;
                }
            }
            action => {
                let (tx, rx) = oneshot::channel();
                if commands.send((action, Some(tx))).is_err() {
                    return;
                }
                let _ = rx.await;
            }
        }
    }
    let _ = done.send(true);
}
