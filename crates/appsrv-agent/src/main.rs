//! `appsrv-agent`: runs beside an application server. Reads the configuration (`--config`
//! and flags; see `--help` and `examples/appsrv.toml`), installs the logger and runs the
//! library's [`Agent`] (SIP endpoint, data gateway, control API, registration) until SIGTERM
//! or Ctrl-C, then ends the live sessions with BYE, sends the charges still queued and
//! unregisters.
//!
//! Errors go to standard error as `appsrv-agent: <what>`, with exit status 1 (2 for a bad
//! command line, from clap).

use std::io::{self, IsTerminal};
use std::process::ExitCode;

use anyhow::{anyhow, Context as _};
use clap::Parser;
use tracing::info;
use tracing_subscriber::EnvFilter;

use appsrv_agent::agent::Agent;
use appsrv_agent::config::{Config, Flags, LogFormat};

fn main() -> ExitCode {
    let flags = Flags::parse();
    let config = match Config::load(&flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("appsrv-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    if flags.check_config {
        print!("{}", config.summary());
        println!("configuration OK");
        return ExitCode::SUCCESS;
    }
    if let Err(e) = init_logging(&config) {
        eprintln!("appsrv-agent: {e:#}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("appsrv-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("appsrv-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &Config) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::builder()
            .parse(&directives)
            .context("RUST_LOG")?,
        _ => EnvFilter::builder()
            .parse(&config.log.level)
            .with_context(|| format!("log.level {:?}", config.log.level))?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(io::stderr().is_terminal())
        .with_writer(io::stderr);
    let installed = match config.log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|e| anyhow!("cannot install the logger: {e}"))
}

/// The agent as a program: the library's [`Agent`] started on the configuration, stopped
/// on SIGTERM or Ctrl-C.
async fn run(config: Config) -> anyhow::Result<()> {
    let agent = Agent::start(config).await?;
    let signal = wait_for_signal().await?;
    info!(signal, "shutting down");
    agent.shutdown().await;
    Ok(())
}

/// Waits for SIGTERM or SIGINT; returns its name.
async fn wait_for_signal() -> anyhow::Result<&'static str> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        tokio::select! {
            _ = term.recv() => Ok("SIGTERM"),
            r = tokio::signal::ctrl_c() => r.map(|()| "SIGINT").context("waiting for Ctrl-C"),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c()
            .await
            .context("waiting for Ctrl-C")?;
        Ok("Ctrl-C")
    }
}
