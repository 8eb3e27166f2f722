//! `sip-client`: the terminal program of the service relay (DESIGN.md). It registers with
//! the relay, requests a service with an INVITE carrying the service request information
//! and an SDP offer, and pipes stdin and stdout over the data connection the answer names.
//! A live session can be changed (re-INVITE), transferred (REFER) and hung up, from a
//! terminal with `~` escapes or from a script (`--then`).

mod auth;
mod call;
mod config;
mod data;
mod escape;
mod events;
mod failure;
mod headers;
mod input;
mod output;
mod registration;
mod router;
mod script;
mod service;
mod session;
mod ua;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

use crate::config::{Cli, Command, ConfigError, Settings};
use crate::events::{Event, Events};
use crate::failure::Failure;

/// Exit status: done (hung up by either side, or registered).
pub const EXIT_OK: u8 = 0;
/// Exit status: an error not listed below.
pub const EXIT_OTHER: u8 = 1;
/// Exit status: bad usage or configuration (also clap's own status for a bad command line).
pub const EXIT_USAGE: u8 = 2;
/// Exit status: the relay refused (the SIP status is in the message).
pub const EXIT_REFUSED: u8 = 3;
/// Exit status: authentication failed (a second challenge after our credentials).
pub const EXIT_AUTH_FAILED: u8 = 4;
/// Exit status: no answer in time (Timer B/F, 408, or the answer timeout).
pub const EXIT_NO_ANSWER: u8 = 5;
/// Exit status: the data connection failed (connect, `ERR`, closed before `OK`).
pub const EXIT_DATA_FAILED: u8 = 6;
/// Exit status: a second Ctrl-C left without waiting for the hang-up.
pub const EXIT_INTERRUPTED: u8 = 130;

fn init_tracing(verbose: u8, json: bool) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 if json => "off",
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// The exit status and message for an error.
fn classify(e: &anyhow::Error) -> (u8, String) {
    if let Some(f) = e.downcast_ref::<Failure>() {
        return (f.exit_code(), f.to_string());
    }
    if e.downcast_ref::<ConfigError>().is_some() {
        return (EXIT_USAGE, format!("{e:#}"));
    }
    (EXIT_OTHER, format!("{e:#}"))
}

async fn run(cli: Cli, events: Events) -> anyhow::Result<u8> {
    let env = |k: &str| std::env::var(k).ok();
    let call_args = match &cli.command {
        Command::Call(a) => Some(a),
        Command::Register(_) => None,
    };
    let settings = Settings::load(&cli.common, call_args, &env, &mut |w| {
        events.notice(format!("warning: {w}"))
    })?;
    match cli.command {
        Command::Register(args) => register(settings, args.once, events).await,
        Command::Call(args) => call::run(settings, args, events).await,
    }
}

/// `sip-client register`: registers; without `--once`, keeps the binding refreshed until
/// Ctrl-C or SIGTERM, then removes it.
async fn register(settings: Settings, once: bool, events: Events) -> anyhow::Result<u8> {
    let (ua, endpoint_events) = ua::Ua::start(&settings).await?;
    tokio::spawn(router::Router::default().run(ua.clone(), endpoint_events));
    let mut reg = registration::Registration::new(ua, settings.expires, events);
    let granted = reg.register().await?;
    if once {
        return Ok(EXIT_OK);
    }
    let reg = Arc::new(tokio::sync::Mutex::new(reg));
    let mut shutdown = call::Shutdown::new();
    let failed = tokio::select! {
        e = registration::keep_refreshed(reg.clone(), granted) => Some(e),
        _ = shutdown.recv() => None,
    };
    match failed {
        Some(e) => Err(e),
        None => {
            reg.lock().await.unregister().await?;
            Ok(EXIT_OK)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.common.verbose, cli.common.json);
    let events_file = match &cli.common.events_file {
        Some(path) => match std::fs::File::create(path) {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("sip-client: --events-file {}: {e}", path.display());
                return ExitCode::from(EXIT_USAGE);
            }
        },
        None => None,
    };
    let events = Events::new(cli.common.json, events_file);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sip-client: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_OTHER);
        }
    };
    let outcome = runtime.block_on(run(cli, events.clone()));
    // A read of stdin may still be blocked in its thread: do not wait for it.
    runtime.shutdown_background();
    let (code, message) = match outcome {
        Ok(code) => {
            let message = match code {
                EXIT_DATA_FAILED => "data connection failed".to_string(),
                EXIT_INTERRUPTED => "interrupted".to_string(),
                _ => String::new(),
            };
            (code, message)
        }
        Err(e) => classify(&e),
    };
    events.emit(Event::Exit { code, message });
    ExitCode::from(code)
}
