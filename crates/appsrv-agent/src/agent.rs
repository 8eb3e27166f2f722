//! The agent as a whole, for the binary and for a Rust application server that embeds it:
//! [`Agent::start`] opens the SIP endpoint, the data gateway and the control API (when
//! configured), starts charging, registration and the session core, and returns once all of
//! them are serving; [`Agent::handle`] gives the application server its verbs (sessions,
//! events, charges, hang-up); [`Agent::shutdown`] ends the sessions with BYE, sends the
//! charges still queued and unregisters.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use appsrv_agent::agent::Agent;
//! use appsrv_agent::app_charge::AppCharge;
//! use appsrv_agent::config::{Config, Flags};
//!
//! let flags = Flags { config: Some("appsrv.toml".into()), ..Flags::default() };
//! let agent = Agent::start(Config::load(&flags)?).await?;
//! let handle = agent.handle();
//! let mut events = handle.events();
//! while let Ok(event) = events.recv().await {
//!     if let appsrv_agent::events::SessionEvent::Started { session_id, .. } = event {
//!         let charge = AppCharge {
//!             event_id: format!("welcome-{session_id}").replace('@', "."),
//!             session_id: Some(session_id),
//!             amount: Some(5),
//!             ..AppCharge::default()
//!         };
//!         handle.charge(charge).await?;
//!     }
//! }
//! agent.shutdown().await;
//! # Ok(())
//! # }
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sip_core::endpoint::{Endpoint, EndpointConfig};
use sip_core::transport::TransportConfig;
use sip_core::uri::Uri;
use sip_core::Transport;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tracing::info;

use crate::auth::ClientAuth;
use crate::backoff::Backoff;
use crate::charging::{self, ChargerConfig, EventIds, Spool};
use crate::config::{host_port, Config};
use crate::control::ControlServer;
use crate::gateway::{Gateway, PendingCaps, Timeouts, TokenTable};
use crate::handle::{AgentHandle, ChargeDefaults};
use crate::inquiry::RelaySources;
use crate::registration::{self, Registration, RegistrationHandle, RegistrationParams};
use crate::session::{Core, CoreParts};

/// How long each step of the shutdown may take: BYEs, charges, unregistration.
pub const SHUTDOWN_STEP: Duration = Duration::from_secs(5);
/// First and longest registration retry delays.
const REGISTER_RETRY: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));
/// Session events held for a slow listener before it misses some.
const EVENT_BACKLOG: usize = 1024;
/// Commands from the application server waiting for the session core.
const COMMAND_BACKLOG: usize = 256;

/// Why the agent could not start; each names the configuration key behind it.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The SIP endpoint could not be opened.
    #[error("opening SIP on {addr} (sip.listen)")]
    Sip {
        /// The address.
        addr: SocketAddr,
        /// sip-core's error.
        source: sip_core::endpoint::EndpointError,
    },
    /// The SIP endpoint has no socket of the relay's transport.
    #[error("no {transport} socket on {addr} (sip.listen)")]
    NoSocket {
        /// The address.
        addr: SocketAddr,
        /// The relay's transport.
        transport: Transport,
    },
    /// A socket could not be opened.
    #[error("opening {what} on {addr} ({key})")]
    Bind {
        /// What it is for.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The configuration key.
        key: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A URI could not be made from the configuration.
    #[error("cannot make {what} from {key}: {message}")]
    Uri {
        /// Which URI.
        what: &'static str,
        /// The configuration key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The relay's address could not be resolved.
    #[error("relay.uri: {0}")]
    Relay(String),
    /// The charge spool could not be opened.
    #[error("opening the charge spool {dir} (billing.spool_dir)")]
    Spool {
        /// The directory.
        dir: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// A running agent.
pub struct Agent {
    handle: AgentHandle,
    sip_addr: SocketAddr,
    data_addr: SocketAddr,
    control_addr: Option<SocketAddr>,
    stop_core: watch::Sender<bool>,
    stop_charging: watch::Sender<bool>,
    stop_registration: watch::Sender<bool>,
    core_task: JoinHandle<()>,
    gateway_task: JoinHandle<()>,
    control_task: Option<JoinHandle<()>>,
    charging_task: JoinHandle<()>,
    registration_task: Option<JoinHandle<()>>,
}

impl Agent {
    /// Starts the agent on `config` (see [`Config::load`], or build one and adjust it) and
    /// returns once it serves SIP, data and the control API. Registration goes on in the
    /// background (and is retried) when `relay.register` is true. Must be called within a
    /// Tokio runtime.
    pub async fn start(config: Config) -> Result<Agent, StartError> {
        let config = Arc::new(config);
        let relay_transport = if config.tls.is_some() {
            Transport::Tls
        } else {
            match config.relay.uri.transport().and_then(Transport::from_name) {
                Some(Transport::Tcp) => Transport::Tcp,
                _ => Transport::Udp,
            }
        };

        // SIP, UDP and TCP on the same address; TLS on its own when configured (then only
        // requests over it from the relay's certificate are taken: RelaySources).
        let listen = config.sip.listen;
        let endpoint_config = EndpointConfig {
            transport: TransportConfig {
                udp: vec![listen],
                tcp: vec![listen],
                tls: config.tls.iter().map(|t| t.listen).collect(),
                tls_setup: config.tls.as_ref().map(|t| t.setup.clone()),
                ..TransportConfig::default()
            },
            ..EndpointConfig::default()
        };
        let (endpoint, sip_events) =
            Endpoint::bind(endpoint_config)
                .await
                .map_err(|source| StartError::Sip {
                    addr: listen,
                    source,
                })?;
        let sip_addr = endpoint
            .local_addr(relay_transport)
            .ok_or(StartError::NoSocket {
                addr: listen,
                transport: relay_transport,
            })?;
        let sent_by = host_port(&config.sip.advertise, sip_addr.port());
        // Over TLS the Contact is sips: (RFC 5630 §3.1.3), so the relay reaches us over TLS.
        let (scheme, transport_param) = match relay_transport {
            Transport::Tcp => ("sip", ";transport=tcp"),
            Transport::Tls => ("sips", ""),
            Transport::Udp => ("sip", ""),
        };
        let contact = Uri::parse(&format!(
            "{scheme}:{}@{sent_by}{transport_param}",
            config.relay.account
        ))
        .map_err(|e| StartError::Uri {
            what: "our Contact URI",
            key: "sip.advertise",
            message: e.to_string(),
        })?;
        let aor = Uri::parse(&format!(
            "sip:{}@{}",
            config.relay.account, config.relay.domain
        ))
        .map_err(|e| StartError::Uri {
            what: "the address of record",
            key: "relay.domain",
            message: e.to_string(),
        })?;
        // Inquiries come from the relay, or from another relay of the same service.
        let dns = config.relay.dns_client();
        let mut relay = RelaySources::of_uri(&config.relay.uri, &dns)
            .await
            .map_err(StartError::Relay)?;
        for other in &config.relay.others {
            relay = relay.with(
                RelaySources::of_uri(other, &dns)
                    .await
                    .map_err(StartError::Relay)?,
            );
        }
        if config.tls.is_some() {
            // A relay named by a domain: its certificate must name that domain (RFC 5922
            // §7.1), whichever address it resolved to.
            let uris = std::iter::once(&config.relay.uri).chain(&config.relay.others);
            for (uri, (host, entries)) in uris.zip(relay.relays()) {
                if host.parse::<std::net::IpAddr>().is_ok() {
                    continue;
                }
                if let Ok(name) = sip_core::tls::server_name(host) {
                    let port = uri.port().unwrap_or(Transport::Tls.default_port());
                    for (ip, _) in entries {
                        endpoint
                            .transports()
                            .expect_name(SocketAddr::new(*ip, port), name.clone());
                    }
                }
            }
            relay = relay.require_tls(endpoint.transports().clone());
        }

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
        .map_err(|source| StartError::Bind {
            what: "the data gateway",
            addr: config.data.listen,
            key: "data.listen",
            source,
        })?
        .with_pending_caps(PendingCaps {
            overall: config.data.max_pending,
            per_address: config.data.max_pending_per_address,
        });
        // With TLS to the relay, the data connection is TLS too (TCP/TLS in the SDP answer),
        // so the token never crosses in clear.
        let gateway = match &config.tls {
            Some(tls) => match tls.setup.acceptor_without_client_auth() {
                Ok(Some(acceptor)) => gateway.with_tls(acceptor),
                Ok(None) => gateway,
                Err(e) => {
                    return Err(StartError::Uri {
                        what: "the data gateway's TLS settings",
                        key: "tls.certificate",
                        message: e.to_string(),
                    })
                }
            },
            None => gateway,
        };
        let data_port = gateway
            .local_addr()
            .map_err(|source| StartError::Bind {
                what: "the data gateway",
                addr: config.data.listen,
                key: "data.listen",
                source,
            })?
            .port();
        let data_addr = SocketAddr::new(config.data.advertise, data_port);

        let (stop_core, core_stopped) = watch::channel(false);
        let (stop_charging, charging_stopped) = watch::channel(false);
        let (stop_registration, registration_stopped) = watch::channel(false);

        // Charging: always on for the application server's charges; byte blocks only with
        // billing.bytes_per_charge.
        let spool = match &config.billing.spool_dir {
            Some(dir) => Some(Spool::open(dir).map_err(|source| StartError::Spool {
                dir: dir.display().to_string(),
                source,
            })?),
            None => None,
        };
        let spooled = spool.is_some();
        let charger = ChargerConfig {
            endpoint: endpoint.clone(),
            relay: config.relay.uri.clone(),
            dns: config.relay.dns_client(),
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
        let (charge_sink, charging_task) = charging::spawn(
            charger,
            auth,
            EventIds::new(&config.relay.account),
            charging_stopped,
        );
        let byte_charges = (config.billing.bytes_per_charge > 0).then(|| charge_sink.clone());

        // Registration.
        let (registration, registration_task) = if config.relay.register {
            let names: Vec<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
            let registrar = Uri::parse(&format!("sip:{}", config.relay.domain)).map_err(|e| {
                StartError::Uri {
                    what: "the registrar URI",
                    key: "relay.domain",
                    message: e.to_string(),
                }
            })?;
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
                dns: config.relay.dns_client(),
                failover: Default::default(),
            };
            let (handle, task) = registration::spawn(reg, driver, registration_stopped);
            (handle, Some(task))
        } else {
            (RegistrationHandle::disabled(), None)
        };

        // The session core, its events and commands.
        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        let (commands_tx, commands_rx) = mpsc::channel(COMMAND_BACKLOG);
        let handle = AgentHandle::new(
            commands_tx,
            charge_sink,
            events.clone(),
            ChargeDefaults {
                unit_price: config.billing.price_per_block,
                currency: config.billing.currency.clone(),
                confirm_wait: config.billing.confirm_wait,
                spooled,
            },
        );

        // The control API.
        let (control_addr, control_task) = match &config.control {
            Some(control) => {
                let server =
                    ControlServer::bind(control.listen, control.token.clone(), handle.clone())
                        .await
                        .map_err(|source| StartError::Bind {
                            what: "the control API",
                            addr: control.listen,
                            key: "control.listen",
                            source,
                        })?;
                let addr = server.local_addr().map_err(|source| StartError::Bind {
                    what: "the control API",
                    addr: control.listen,
                    key: "control.listen",
                    source,
                })?;
                (
                    Some(addr),
                    Some(tokio::spawn(server.run(core_stopped.clone()))),
                )
            }
            None => (None, None),
        };

        let core = Core::new(CoreParts {
            config: config.clone(),
            endpoint: endpoint.clone(),
            relay,
            registration,
            tokens,
            charges: byte_charges,
            contact: contact.clone(),
            sent_by: sent_by.clone(),
            data_addr,
            events,
        });
        let core_task = tokio::spawn(core.run(
            sip_events,
            gateway_rx,
            commands_rx,
            core_stopped.clone(),
            SHUTDOWN_STEP,
        ));
        let gateway_task = tokio::spawn(gateway.run(core_stopped));

        let services: Vec<String> = config
            .services
            .iter()
            .map(|s| format!("{}={}", s.name, s.backend))
            .collect();
        let control_text = control_addr.map_or("off".to_string(), |a| a.to_string());
        info!(
            sip = %sip_addr,
            data = %data_addr,
            control = %control_text,
            contact = %contact,
            relay = %config.relay.uri,
            services = ?services,
            "appsrv-agent ready"
        );
        Ok(Agent {
            handle,
            sip_addr,
            data_addr,
            control_addr,
            stop_core,
            stop_charging,
            stop_registration,
            core_task,
            gateway_task,
            control_task,
            charging_task,
            registration_task,
        })
    }

    /// The application server's verbs on this agent.
    pub fn handle(&self) -> AgentHandle {
        self.handle.clone()
    }

    /// The SIP address the relay reaches the agent on.
    pub fn sip_addr(&self) -> SocketAddr {
        self.sip_addr
    }

    /// The data gateway's address, as written in SDP answers.
    pub fn data_addr(&self) -> SocketAddr {
        self.data_addr
    }

    /// The control API's address, when it is served.
    pub fn control_addr(&self) -> Option<SocketAddr> {
        self.control_addr
    }

    /// Stops the agent: ends every live session with BYE and closes the data connections
    /// and the control API; then sends the charges still queued (up to
    /// [`SHUTDOWN_STEP`]); then removes the registration.
    pub async fn shutdown(self) {
        // 1. Sessions: BYE each, close the data connections, stop accepting.
        self.stop_core.send_replace(true);
        let _ = self.core_task.await;
        let _ = self.gateway_task.await;
        if let Some(task) = self.control_task {
            let _ = task.await;
        }
        // 2. Charges still queued go out.
        self.stop_charging.send_replace(true);
        let _ = self.charging_task.await;
        // 3. The registration is removed.
        self.stop_registration.send_replace(true);
        if let Some(task) = self.registration_task {
            let _ = task.await;
        }
        info!("stopped");
    }
}
