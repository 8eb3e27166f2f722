//! `relayd`, the relay server: reads the configuration and dispatches the command line.
//!
//! `relayd [--config FILE] [run]` runs the relay; `check-config` (or `--check`) validates
//! the configuration and prints a summary; `user add|remove` edits the users file;
//! `billing report|export` reads the billing records. Errors go to standard error as
//! `relayd: <file>: key `<key>`: <what was expected>` with exit status 1.

use std::io::{self, IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use tracing_subscriber::EnvFilter;

use billing::backend::AnyStore;
use billing::report;
use billing::store::Period;
use relayd::cli::{self, BillingCommand, Cli, Command, Ha1Hasher, UserCommand};
use relayd::config::{Config, LogFormat};
use relayd::dispatch;
use relayd::{admin, health, metrics, reload};
use sip_core::digest;

/// jemalloc instead of glibc's malloc: every SIP message is parsed into, and serialized
/// from, many small allocations (under sipp load glibc's malloc/free took 13 % of relayd's
/// CPU), and a relay's memory must come back after a peak of calls: jemalloc's background
/// thread gives freed pages back to the system after its decay time (10 s), where glibc and
/// mimalloc kept them (docs/performance.md). The `system-allocator` feature keeps the
/// system's, for heap profilers that only see malloc (heaptrack, scripts/bench-memory.sh).
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("relayd: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The configuration of `--config`, or the built-in defaults without it.
fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    let config = match path {
        Some(path) => Config::load(path)?,
        None => {
            let config = Config::default();
            config.validate()?;
            config
        }
    };
    Ok(config)
}

fn dispatch(cli: &Cli) -> anyhow::Result<()> {
    // `ctl` reads only [admin]: it must work while the rest of the file is being edited
    // (a `ctl reload` of a bad file is refused by the relay, which says why).
    if let Command::Ctl(args) = cli.effective_command() {
        return ctl(cli.config.as_deref(), &args);
    }
    if let Command::Trace(args) = cli.effective_command() {
        let Some(file) = cli.config.as_deref() else {
            anyhow::bail!(
                "relayd trace needs the relay's configuration file (--config) for its [admin] section"
            );
        };
        return relayd::trace_command::run(file, &args, &mut io::stdout().lock());
    }
    let config = load_config(cli.config.as_deref())?;
    match cli.effective_command() {
        Command::Run => run(config),
        Command::CheckConfig => check_config(&config),
        Command::User(UserCommand::Add(args)) => {
            let Some(ha1) = ha1_function() else {
                anyhow::bail!("user add: HA1 hashing is not wired to sip-core's digest module yet")
            };
            // Fail on the arguments before asking for a password.
            cli::users_file_for(&config)?;
            let prompt = format!("Password for {}@{}: ", args.name, config.relay.realm);
            let prompt = io::stdin().is_terminal().then_some(prompt.as_str());
            let password = cli::read_password(&mut io::stdin().lock(), prompt)
                .context("reading the password from standard input")?;
            let added = cli::user_add(&config, &args, &password, &ha1)?;
            let verb = if added.replaced { "replaced" } else { "added" };
            println!("{verb} {} in {}", args.name, added.file.display());
            Ok(())
        }
        Command::User(UserCommand::Remove(args)) => {
            let file = cli::user_remove(&config, &args.name)?;
            println!("removed {} from {}", args.name, file.display());
            Ok(())
        }
        Command::Billing(BillingCommand::Report(args)) => billing_report(&config, &args),
        Command::Billing(BillingCommand::Export(args)) => billing_export(&config, &args),
        Command::Ctl(args) => ctl(cli.config.as_deref(), &args),
        Command::Trace(_) => unreachable!("handled above"),
    }
}

/// `relayd ctl`: one request to the running relay's admin API, at the address and with the
/// token of the configuration file's `[admin]`.
fn ctl(config: Option<&Path>, args: &cli::CtlArgs) -> anyhow::Result<()> {
    let Some(file) = config else {
        anyhow::bail!(
            "relayd ctl needs the relay's configuration file (--config) for its [admin] section"
        );
    };
    let (addr, token) = relayd::ctl::admin_of(file)?;
    let (status, answer) =
        relayd::ctl::send(addr, &token, &relayd::ctl::request_of(&args.command))?;
    if !(200..300).contains(&status) {
        anyhow::bail!("{}", relayd::ctl::refusal(status, &answer));
    }
    if args.json {
        println!("{answer:#}");
    } else {
        print!("{}", relayd::ctl::render(&args.command, &answer));
    }
    Ok(())
}

/// The HA1 function of `relayd user add`: `H(user:realm:password)` in hex.
fn ha1_function() -> Option<Ha1Hasher> {
    Some(|algorithm, user, realm, password| {
        let algorithm = match algorithm {
            cli::HashAlgorithm::Md5 => digest::Algorithm::Md5,
            cli::HashAlgorithm::Sha256 => digest::Algorithm::Sha256,
        };
        digest::ha1(algorithm, user, realm, password)
    })
}

/// The billing store of the configuration (`[storage]`), opened read-only for reports:
/// on PostgreSQL it holds every relay's records.
fn open_store(config: &Config) -> anyhow::Result<AnyStore> {
    relayd::billing_control::open_read_only(&config.storage.billing_backend(), &config.file_name())
}

fn period(since: Option<cli::Timestamp>, until: Option<cli::Timestamp>) -> anyhow::Result<Period> {
    let since_ms = since.map_or(i64::MIN, |t| t.0.saturating_mul(1000));
    let until_ms = until.map_or(i64::MAX, |t| t.0.saturating_mul(1000));
    Period::new(since_ms, until_ms).context("--since must be before --until")
}

/// `relayd billing report`: totals per subscriber, service or server.
fn billing_report(config: &Config, args: &cli::ReportArgs) -> anyhow::Result<()> {
    let store = open_store(config)?;
    let by = match args.by {
        cli::GroupBy::Subscriber => report::GroupBy::Subscriber,
        cli::GroupBy::Service => report::GroupBy::Service,
        cli::GroupBy::Server => report::GroupBy::Server,
    };
    let totals = report::totals(&store, period(args.since, args.until)?, by)
        .context("computing the report")?;
    print!("{}", report::format_totals(&totals, by));
    Ok(())
}

/// `relayd billing export`: records as CSV or JSON lines.
fn billing_export(config: &Config, args: &cli::ExportArgs) -> anyhow::Result<()> {
    let store = open_store(config)?;
    let format = match args.format {
        cli::ExportFormat::Csv => report::ExportFormat::Csv,
        cli::ExportFormat::Jsonl => report::ExportFormat::JsonLines,
    };
    let kind = match args.records {
        cli::RecordsArg::Sessions => report::RecordKind::Sessions,
        cli::RecordsArg::Charges => report::RecordKind::Charges,
    };
    let period = period(args.since, args.until)?;
    match &args.output {
        Some(path) => {
            let file = std::fs::File::create(path)
                .with_context(|| format!("creating {}", path.display()))?;
            let mut out = io::BufWriter::new(file);
            report::export(&store, period, kind, format, &mut out).context("exporting records")?;
            out.flush()
                .with_context(|| format!("writing {}", path.display()))?;
        }
        None => {
            let stdout = io::stdout();
            let mut out = io::BufWriter::new(stdout.lock());
            report::export(&store, period, kind, format, &mut out).context("exporting records")?;
            out.flush().context("writing the export")?;
        }
    }
    Ok(())
}

/// `relayd check-config`: everything `run` checks before it opens a socket.
fn check_config(config: &Config) -> anyhow::Result<()> {
    config
        .build_directory()
        .context("building the service directory")?;
    config.build_rules().context("compiling the rules")?;
    print!("{}", config.summary());
    println!("configuration OK");
    Ok(())
}

fn init_logging(config: &Config) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::builder()
            .parse(&directives)
            .context("RUST_LOG")?,
        _ => EnvFilter::builder().parse(&config.log.level)?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        // Colour only for a person at a terminal, not for log files or the journal.
        .with_ansi(io::stderr().is_terminal());
    let installed = match config.log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))
}

/// `relayd run`: serves SIP until SIGTERM or Ctrl-C, then ends live sessions cleanly
/// (BYE on both legs, billed with cause `relay-shutdown`).
fn run(config: Config) -> anyhow::Result<()> {
    init_logging(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let source = config.file_name();
    let (relay, writer) = dispatch::start(config).await?;
    tracing::info!(
        config = %source.display(),
        addresses = ?relay.endpoint.transports().local_addrs(),
        realm = %relay.realm,
        services = ?relay.directory.services(),
        billing = %relay.billing.location(),
        node = %relay.billing.node(),
        "relayd serving"
    );
    let touch =
        std::time::Duration::from_secs(u64::from(relay.config.billing.touch_interval_secs.max(1)));
    let mut tasks = vec![
        tokio::spawn(health::probe_loop(relay.clone())),
        tokio::spawn(health::expiry_loop(relay.clone())),
        tokio::spawn(relay.billing.clone().touch_loop(touch)),
    ];
    // Relays sharing a database close a dead one's sessions once its lease has expired;
    // a lone SQLite relay has nobody else's to close.
    if relay.config.storage.backend == relayd::config::StorageBackendKind::Postgres {
        let lease =
            std::time::Duration::from_secs(u64::from(relay.config.storage.lease_secs.max(1)));
        tasks.push(tokio::spawn(relay.billing.clone().claim_loop(touch, lease)));
    }
    if let Some(addr) = relay.config.metrics.listen {
        let relay = relay.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = metrics::serve(relay, addr).await {
                tracing::warn!(error = %format!("{e:#}"), "metrics endpoint not available");
            }
        }));
    }
    if let Some(addr) = relay.config.admin.listen {
        let token = relay
            .config
            .admin
            .load_token(&relay.config.base_dir())
            .map_err(|(key, message)| {
                anyhow::anyhow!("{}: key `{key}`: {message}", source.display())
            })?
            .context("[admin] listen needs a token")?;
        let relay = relay.clone();
        let max = relay.config.admin.max_connections;
        tasks.push(tokio::spawn(async move {
            if let Err(e) = admin::serve(relay, addr, token, max).await {
                tracing::warn!(error = %format!("{e:#}"), "admin listener not available");
            }
        }));
    }
    tasks.push(tokio::spawn(reload_on_hangup(relay.clone())));
    wait_for_signal().await?;
    tracing::info!(
        sessions = relay.billing.live_sessions(),
        "shutting down: ending live sessions"
    );
    relay.sessions.shutdown_all();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while !relay.sessions.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Give the BYEs a moment on the wire before the sockets close.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    for t in tasks {
        t.abort();
    }
    drop(relay);
    tokio::task::spawn_blocking(move || writer.shutdown())
        .await
        .context("stopping the billing writer")?
        .context("stopping the billing writer")?;
    tracing::info!("relayd stopped");
    Ok(())
}

/// Reloads the configuration on each SIGHUP (see `relayd::reload`).
async fn reload_on_hangup(relay: std::sync::Arc<relayd::relay::Relay>) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => signal,
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler: reload with `relayd ctl reload`");
            return;
        }
    };
    while hangup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the configuration");
        let relay = relay.clone();
        // The reload logs what it did or why it refused the file.
        let _ = tokio::task::spawn_blocking(move || reload::reload(&relay)).await;
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => {}
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
    }
    Ok(())
}
