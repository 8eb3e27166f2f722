//! A small application server that embeds appsrv-agent as a library and charges for every
//! request it serves.
//!
//! It delivers the service `quotes`: a terminal sends one request per line — `quote` gets a
//! line of wisdom and costs one unit (`billing.price_per_block` minor units), `bye` ends the
//! session from the server's side (the agent sends BYE), anything else is answered
//! `unknown request` for free. Each quote is charged through [`AgentHandle::charge`] under
//! the server's own event id (`quote-<session>-<n>`) and answered only once the relay has
//! confirmed the charge (or said it is pending). Session events are printed on stdout as JSON
//! lines; the agent's logs go to stderr.
//!
//! The agent is configured like the `appsrv-agent` binary (the same flags and TOML file);
//! the example adds the service `quotes` itself, with a backend of its own on a loopback
//! port that is told who is connected by the JSON preamble.
//!
//! ```sh
//! cargo run -p appsrv-agent --example metered_server -- --config examples/appsrv.toml \
//!     --listen 127.0.0.1:5084 --data-listen 127.0.0.1:7084 --price-per-block 2
//! printf 'quote\nquote\nbye\n' | sip-client -u bob call quotes
//! ```

use std::io::IsTerminal;

use anyhow::Context as _;
use appsrv_agent::agent::Agent;
use appsrv_agent::app_charge::{AppCharge, ReceiptStatus};
use appsrv_agent::backend::Backend;
use appsrv_agent::config::{Config, Flags, ServiceFlag};
use appsrv_agent::handle::AgentHandle;
use appsrv_agent::preamble::{JsonPreamble, PreambleFormat};
use clap::Parser;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

/// The service this server delivers.
const SERVICE: &str = "quotes";

/// What it has to say.
const QUOTES: [&str; 4] = [
    "Simplicity is prerequisite for reliability. (Dijkstra)",
    "Make it work, make it right, make it fast. (Beck)",
    "Premature optimization is the root of all evil. (Knuth)",
    "Talk is cheap. Show me the code. (Torvalds)",
];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut flags = Flags::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();

    // The server's own backend: a loopback port the agent's data gateway connects to, added
    // to the configuration as the service `quotes`, told who is connected by the JSON
    // preamble.
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("opening the quotes backend on 127.0.0.1")?;
    let port = listener.local_addr()?.port();
    flags.services.push(ServiceFlag {
        name: SERVICE.to_string(),
        backend: Backend::Tcp {
            host: "127.0.0.1".to_string(),
            port,
        },
    });
    let mut config = Config::load(&flags)?;
    for service in config.services.iter_mut().filter(|s| s.name == SERVICE) {
        service.preamble = PreambleFormat::Json;
    }
    let price = config.billing.price_per_block;

    let agent = Agent::start(config).await?;
    let handle = agent.handle();
    info!(port, price, "quotes server ready");

    // Session events, as they happen, on stdout.
    let mut events = handle.events();
    tokio::spawn(async move {
        while let Ok(event) = events.recv().await {
            if let Ok(line) = serde_json::to_string(&event) {
                println!("{line}");
            }
        }
    });

    let serving = async {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let handle = handle.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve(handle, stream).await {
                            warn!(error = %e, "quotes connection failed");
                        }
                    });
                }
                Err(e) => warn!(error = %e, "accept failed"),
            }
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        () = serving => {}
        _ = term.recv() => {}
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
    }
    info!("shutting down");
    agent.shutdown().await;
    Ok(())
}

/// The event id of the `n`th quote of a session: letters, digits and `.-` only.
fn event_id(session_id: &str, n: u64) -> String {
    let safe: String = session_id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '.' })
        .take(100)
        .collect();
    format!("quote-{safe}-{n}")
}

/// One data connection: the preamble, then one request per line.
async fn serve(handle: AgentHandle, stream: TcpStream) -> anyhow::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::new(rd).lines();
    let first = lines
        .next_line()
        .await?
        .context("connection closed before the preamble")?;
    let who = JsonPreamble::parse(first.as_bytes())?;
    info!(call_id = %who.session_id, subscriber = %who.subscriber, terminal = %who.terminal, "serving quotes");
    let mut served = 0u64;
    while let Some(request) = lines.next_line().await? {
        match request.trim() {
            "quote" => {
                served += 1;
                let charge = AppCharge {
                    event_id: event_id(&who.session_id, served),
                    session_id: Some(who.session_id.clone()),
                    units: Some(1),
                    description: Some(format!("quote {served}")),
                    ..AppCharge::default()
                };
                let answer = match handle.charge(charge).await {
                    Ok(receipt) => {
                        println!(
                            "{}",
                            serde_json::json!({"charged": receipt.relay_event_id,
                                               "amount": receipt.amount,
                                               "confirmed": receipt.status == ReceiptStatus::Confirmed})
                        );
                        let quote = QUOTES[(served as usize - 1) % QUOTES.len()];
                        format!("{quote}\n")
                    }
                    Err(e) => format!("not served: {e}\n"),
                };
                wr.write_all(answer.as_bytes()).await?;
            }
            "bye" => {
                // The last words: the agent delivers what we wrote before its BYE goes out.
                wr.write_all(b"bye\n").await?;
                match handle
                    .hang_up(&who.session_id, "the terminal said bye")
                    .await
                {
                    Ok(status) => info!(call_id = %who.session_id, ?status, "hung up"),
                    Err(e) => warn!(call_id = %who.session_id, error = %e, "hang-up failed"),
                }
                return Ok(());
            }
            "" => {}
            _ => wr.write_all(b"unknown request\n").await?,
        }
    }
    Ok(())
}
