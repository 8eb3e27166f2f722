//! `appsrv-agent`: runs beside an application server. Reads the configuration (`--config`
//! and flags; see `--help` and `examples/appsrv.toml`), opens the SIP endpoint and the data
//! gateway, registers with the relay and serves until SIGTERM or Ctrl-C, then ends the live
//! sessions with BYE, sends the charges still queued and unregisters.
//!
//! Errors go to standard error as `appsrv-agent: <what>`, with exit status 1 (2 for a bad
//! command line, from clap).

use std::io::{self, IsTerminal};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use clap::Parser;
use sip_core::endpoint::{Endpoint, EndpointConfig};
use sip_core::transport::TransportConfig;
use sip_core::uri::Uri;
use sip_core::Transport;
use tokio::sync::{mpsc, watch};
use tracing::info;
use tracing_subscriber::EnvFilter;

use appsrv_agent::auth::ClientAuth;
use appsrv_agent::backoff::Backoff;
use appsrv_agent::charging::{self, ChargerConfig, EventIds, Spool};
use appsrv_agent::config::{Config, Flags, LogFormat};
use appsrv_agent::gateway::{Gateway, Timeouts, TokenTable};
use appsrv_agent::inquiry::RelaySources;
use appsrv_agent::registration::{self, Registration, RegistrationHandle, RegistrationParams};
use appsrv_agent::session::{Core, CoreParts};

/// How long each step of the shutdown may take: BYEs, charges, unregistration.
const SHUTDOWN_STEP: Duration = Duration::from_secs(5);
/// First and longest registration retry delays.
const REGISTER_RETRY: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));

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

async fn run(config: Config) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let relay_transport = match config.relay.uri.transport().and_then(Transport::from_name) {
        Some(Transport::Tcp) => Transport::Tcp,
        _ => Transport::Udp,
    };

    // SIP, UDP and TCP on the same address.
    let listen = config.sip.listen;
    let endpoint_config = EndpointConfig {
        transport: TransportConfig {
            udp: vec![listen],
            tcp: vec![listen],
            ..TransportConfig::default()
        },
        ..EndpointConfig::default()
    };
    let (endpoint, sip_events) = Endpoint::bind(endpoint_config)
        .await
        .with_context(|| format!("opening SIP on {listen} (sip.listen)"))?;
    let sip_addr = endpoint
        .local_addr(relay_transport)
        .ok_or_else(|| anyhow!("no {relay_transport} socket on {listen}"))?;
    let sent_by = appsrv_agent::config::host_port(&config.sip.advertise, sip_addr.port());
    let transport_param = match relay_transport {
        Transport::Tcp => ";transport=tcp",
        _ => "",
    };
    let contact = Uri::parse(&format!(
        "sip:{}@{sent_by}{transport_param}",
        config.relay.account
    ))
    .map_err(|e| anyhow!("cannot make our Contact URI from sip.advertise: {e}"))?;
    let aor = Uri::parse(&format!(
        "sip:{}@{}",
        config.relay.account, config.relay.domain
    ))
    .map_err(|e| anyhow!("cannot make the address of record from relay.domain: {e}"))?;

    let relay = RelaySources::of_uri(&config.relay.uri)
        .await
        .map_err(|e| anyhow!(e))
        .context("relay.uri")?;

    // The data gateway.
    let tokens = Arc::new(TokenTable::new(config.data.token_ttl));
    let (gateway_tx, gateway_rx) = mpsc::unbounded_channel();
    let gateway = Gateway::bind(
        config.data.listen,
        tokens.clone(),
        gateway_tx,
        Timeouts {
            handshake: config.data.handshake_timeout,
            backend_connect: config.data.backend_connect_timeout,
        },
    )
    .await
    .with_context(|| {
        format!(
            "opening the data gateway on {} (data.listen)",
            config.data.listen
        )
    })?;
    let data_addr = SocketAddr::new(config.data.advertise, gateway.local_addr()?.port());

    let (stop_core, core_stopped) = watch::channel(false);
    let (stop_charging, charging_stopped) = watch::channel(false);
    let (stop_registration, registration_stopped) = watch::channel(false);

    // Charging.
    let (charges, charging_task) = if config.billing.bytes_per_charge > 0 {
        let spool = match &config.billing.spool_dir {
            Some(dir) => Some(Spool::open(dir).with_context(|| {
                format!(
                    "opening the charge spool {} (billing.spool_dir)",
                    dir.display()
                )
            })?),
            None => None,
        };
        let charger = ChargerConfig {
            endpoint: endpoint.clone(),
            relay: config.relay.uri.clone(),
            charge_uri: config.billing.charge_uri.clone(),
            aor: aor.clone(),
            sent_by: sent_by.clone(),
            unit_price: config.billing.price_per_block,
            currency: config.billing.currency.clone(),
            retry_initial: config.billing.retry_initial,
            retry_max: config.billing.retry_max,
            spool,
            flush_timeout: SHUTDOWN_STEP,
        };
        let auth = ClientAuth::new(&config.relay.account, config.relay.password.clone());
        let (sink, task) = charging::spawn(
            charger,
            auth,
            EventIds::new(&config.relay.account),
            charging_stopped,
        );
        (Some(sink), Some(task))
    } else {
        (None, None)
    };

    // Registration.
    let (registration, registration_task) = if config.relay.register {
        let names: Vec<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
        let registrar = Uri::parse(&format!("sip:{}", config.relay.domain))
            .map_err(|e| anyhow!("cannot make the registrar URI from relay.domain: {e}"))?;
        let params = RegistrationParams {
            registrar,
            aor: aor.clone(),
            contact: contact.clone(),
            contact_params: RegistrationParams::service_params(&names, config.capacity),
            expires: config.relay.expires,
        };
        let reg = Registration::new(
            params,
            ClientAuth::new(&config.relay.account, config.relay.password.clone()),
            Backoff::new(REGISTER_RETRY.0, REGISTER_RETRY.1),
            Instant::now(),
        );
        let driver = registration::Driver {
            endpoint: endpoint.clone(),
            relay: config.relay.uri.clone(),
            sent_by: sent_by.clone(),
            unregister_timeout: SHUTDOWN_STEP,
        };
        let (handle, task) = registration::spawn(reg, driver, registration_stopped);
        (handle, Some(task))
    } else {
        (RegistrationHandle::disabled(), None)
    };

    // The session core and the gateway.
    let core = Core::new(CoreParts {
        config: config.clone(),
        endpoint: endpoint.clone(),
        relay,
        registration,
        tokens,
        charges,
        contact: contact.clone(),
        sent_by: sent_by.clone(),
        data_addr,
    });
    let core_task =
        tokio::spawn(core.run(sip_events, gateway_rx, core_stopped.clone(), SHUTDOWN_STEP));
    let gateway_task = tokio::spawn(gateway.run(core_stopped));

    let services: Vec<String> = config
        .services
        .iter()
        .map(|s| format!("{}={}", s.name, s.backend))
        .collect();
    info!(
        sip = %sip_addr,
        data = %data_addr,
        contact = %contact,
        relay = %config.relay.uri,
        services = ?services,
        "appsrv-agent ready"
    );

    let signal = wait_for_signal().await?;
    info!(signal, "shutting down");
    // 1. Sessions: BYE each, close the data connections, stop accepting.
    stop_core.send_replace(true);
    let _ = core_task.await;
    let _ = gateway_task.await;
    // 2. Charges still queued go out.
    stop_charging.send_replace(true);
    if let Some(task) = charging_task {
        let _ = task.await;
    }
    // 3. The registration is removed.
    stop_registration.send_replace(true);
    if let Some(task) = registration_task {
        let _ = task.await;
    }
    info!("stopped");
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
