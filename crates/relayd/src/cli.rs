//! The command line: `relayd [--config FILE] [run | check-config | user … | billing … | ctl …]`,
//! and the file editing behind `relayd user add` and `relayd user remove`.
//!
//! Users added from the command line go to the configuration's `users_file` (a separate
//! TOML file of `[[users]]`, relative to the configuration file), which the command rewrites
//! whole: the main configuration file, with its comments, is never touched. Only the digest
//! HA1 hashes are stored, never the password; the hashing function is handed in by the
//! caller (sip-core's digest module).

use std::fmt;
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{Config, ConfigError, UserConfig, UsersFile};
use crate::rules::is_token;

/// `relayd`: the service relay server.
#[derive(Debug, Parser)]
#[command(
    name = "relayd",
    version,
    about = "The service relay: authenticates terminals, finds application servers for the services they ask, relays the sessions and bills them.",
    after_help = "With no command, `run`. With no --config, built-in defaults: UDP and TCP on 127.0.0.1:5060, data in ./relayd-data.\nSee examples/relayd.toml for every configuration key."
)]
pub struct Cli {
    /// The configuration file (TOML). Without it, the built-in defaults.
    #[arg(short, long, global = true, env = "RELAYD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Check the configuration, print a summary and exit (as `check-config`).
    #[arg(long)]
    pub check: bool,

    /// What to do.
    #[command(subcommand)]
    pub command: Option<Command>,
}

impl Cli {
    /// The command to carry out: `--check` means `check-config`, none means `run`.
    pub fn effective_command(&self) -> Command {
        match (&self.command, self.check) {
            (_, true) => Command::CheckConfig,
            (Some(command), false) => command.clone(),
            (None, false) => Command::Run,
        }
    }
}

/// The subcommands.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Run the relay (the default).
    Run,
    /// Check the configuration (types, references, rules), print a summary and exit:
    /// status 0 when it is good, 1 with the file, key and reason when it is not.
    CheckConfig,
    /// Manage subscribers in the users file (`users_file` in the configuration).
    #[command(subcommand)]
    User(UserCommand),
    /// Read the billing records: reports and exports.
    #[command(subcommand)]
    Billing(BillingCommand),
    /// Ask the running relay, through its admin API (`[admin]` of the same configuration
    /// file): live sessions, registrations, the directory, drain, reload.
    Ctl(CtlArgs),
    /// Show a recent call as a ladder (terminal | relay | servers, with the relay's
    /// decisions), from the running relay's trace through its admin API; or, with
    /// `--follow`, print messages and decisions as they happen.
    Trace(TraceArgs),
}

/// `relayd trace …`
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct TraceArgs {
    /// The call's Call-ID (the terminal's or a server leg's).
    #[arg(required_unless_present = "follow", conflicts_with = "follow")]
    pub call_id: Option<String>,
    /// Print new messages and decisions as they happen, until interrupted.
    #[arg(long)]
    pub follow: bool,
    /// Draw the ladder as SVG instead of text.
    #[arg(long, conflicts_with = "follow")]
    pub svg: bool,
}

/// `relayd ctl …`
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct CtlArgs {
    /// Print the API's JSON answer instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to ask.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// The requests of `relayd ctl`.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum CtlCommand {
    /// List the live sessions (id, Call-ID, subscriber, service, server, duration).
    Sessions,
    /// End a live session: BYE to both sides, billed with end cause `admin`.
    End {
        /// The session id (as `ctl sessions` lists it).
        session_id: String,
    },
    /// List the registrations (terminals and application servers).
    Registrations,
    /// Remove a user's registration: one contact, or all of them.
    Unregister {
        /// The user (or application-server account).
        user: String,
        /// The contact URI to remove; all of the user's without it.
        contact: Option<String>,
    },
    /// Drain an application server: no new sessions, its live ones finish.
    Drain {
        /// The server's name, account or URI.
        server: String,
    },
    /// Take a drained application server back.
    Undrain {
        /// The server's name, account or URI.
        server: String,
    },
    /// Show the directory: servers, their services, health, load; the services.
    Directory,
    /// Read the configuration file again (as SIGHUP does); live calls go on.
    Reload,
}

/// `relayd user …`
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum UserCommand {
    /// Add a subscriber, or replace one of the users file. Reads the password from the
    /// first line of standard input and stores only its digest HA1 hashes (MD5 and
    /// SHA-256) for the configured realm.
    Add(UserAddArgs),
    /// Remove a subscriber from the users file.
    Remove(UserRemoveArgs),
}

/// Arguments of `relayd user add`.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct UserAddArgs {
    /// The user name (the digest username and the user part of the address of record).
    pub name: String,
    /// The tariff plan (one named by the [[tariffs]]).
    #[arg(long)]
    pub plan: String,
    /// The services subscribed to, separated by commas; `*` for every service.
    #[arg(long, value_delimiter = ',', required = true)]
    pub services: Vec<String>,
    /// The subscriber class.
    #[arg(long, default_value = "standard")]
    pub class: String,
}

/// Arguments of `relayd user remove`.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct UserRemoveArgs {
    /// The user name.
    pub name: String,
}

/// `relayd billing …`
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum BillingCommand {
    /// Totals of the billing records, grouped.
    Report(ReportArgs),
    /// Every billing record, in a machine-readable format.
    Export(ExportArgs),
}

/// What a billing report groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GroupBy {
    /// One line per subscriber.
    Subscriber,
    /// One line per service.
    Service,
    /// One line per application server.
    Server,
}

/// The format of a billing export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// Comma-separated values with a header line (RFC 4180).
    Csv,
    /// One JSON object per line.
    Jsonl,
}

/// Arguments of `relayd billing report`.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct ReportArgs {
    /// Records from this time on (UTC unless an offset is given): 2024-05-01 or
    /// 2024-05-01T08:00:00Z.
    #[arg(long, value_name = "TIME")]
    pub since: Option<Timestamp>,
    /// Records before this time.
    #[arg(long, value_name = "TIME")]
    pub until: Option<Timestamp>,
    /// What to group the totals by.
    #[arg(long, value_enum, default_value_t = GroupBy::Subscriber)]
    pub by: GroupBy,
}

/// Arguments of `relayd billing export`.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct ExportArgs {
    /// The output format.
    #[arg(long, value_enum, default_value_t = ExportFormat::Csv)]
    pub format: ExportFormat,
    /// Which records: session records (time billing) or charge records (application
    /// billing).
    #[arg(long, value_enum, default_value_t = RecordsArg::Sessions)]
    pub records: RecordsArg,
    /// Records from this time on (as for `report`).
    #[arg(long, value_name = "TIME")]
    pub since: Option<Timestamp>,
    /// Records before this time.
    #[arg(long, value_name = "TIME")]
    pub until: Option<Timestamp>,
    /// Write to this file instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// Which records `relayd billing export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RecordsArg {
    /// Session records (time billing).
    Sessions,
    /// Charge records (application billing).
    Charges,
}

/// A point in time as seconds since the Unix epoch (UTC), read from the command line as
/// `YYYY-MM-DD` (midnight UTC) or `YYYY-MM-DDTHH:MM[:SS]` with an optional `Z` or `±HH:MM`
/// (UTC without one); a space may replace the `T`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub i64);

/// A time the command line could not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected a date like 2024-05-01 or a time like 2024-05-01T08:00:00Z, got {0:?}")]
pub struct BadTimestamp(pub String);

/// Days from 1970-01-01 to the given civil date (proleptic Gregorian; H. Hinnant's
/// algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

impl FromStr for Timestamp {
    type Err = BadTimestamp;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadTimestamp(s.to_owned());
        let number = |t: &str, len: usize| -> Result<i64, BadTimestamp> {
            if t.len() != len || !t.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            t.parse().map_err(|_| bad())
        };
        let text = s.trim();
        let (date, time) = match text.find(['T', 't', ' ']) {
            Some(i) => (&text[..i], Some(&text[i + 1..])),
            None => (text, None),
        };
        let mut parts = date.split('-');
        let (Some(y), Some(m), Some(d), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let (year, month, day) = (number(y, 4)?, number(m, 2)?, number(d, 2)?);
        if !(1..=12).contains(&month) || !(1..=days_in_month(year, month)).contains(&day) {
            return Err(bad());
        }
        let mut seconds = days_from_civil(year, month, day) * 86_400;
        if let Some(time) = time {
            let (clock, offset) = if let Some(clock) = time.strip_suffix(['Z', 'z']) {
                (clock, 0)
            } else if let Some(i) = time.rfind(['+', '-']) {
                let sign = if time.as_bytes()[i] == b'-' { -1 } else { 1 };
                let (oh, om) = time[i + 1..].split_once(':').ok_or_else(bad)?;
                let (oh, om) = (number(oh, 2)?, number(om, 2)?);
                if oh > 18 || om > 59 {
                    return Err(bad());
                }
                (&time[..i], sign * (oh * 3600 + om * 60))
            } else {
                (time, 0)
            };
            let fields: Vec<&str> = clock.split(':').collect();
            let (h, m, sec) = match fields.as_slice() {
                [h, m] => (number(h, 2)?, number(m, 2)?, 0),
                [h, m, sec] => (number(h, 2)?, number(m, 2)?, number(sec, 2)?),
                _ => return Err(bad()),
            };
            if h > 23 || m > 59 || sec > 60 {
                return Err(bad());
            }
            seconds += h * 3600 + m * 60 + sec - offset;
        }
        Ok(Timestamp(seconds))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "@{}", self.0)
    }
}

/// The hash algorithms a user's HA1 is stored for (RFC 7616 §3.4.2, RFC 8760).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlgorithm {
    /// MD5, for older clients.
    Md5,
    /// SHA-256, preferred.
    Sha256,
}

/// Computes `H(user:realm:password)` in hex for an algorithm: sip-core's digest `ha1`.
pub type Ha1Fn<'a> = &'a dyn Fn(HashAlgorithm, &str, &str, &str) -> String;

/// A plain function computing an HA1, as [`Ha1Fn`] takes.
pub type Ha1Hasher = fn(HashAlgorithm, &str, &str, &str) -> String;

/// Why `relayd user add` or `relayd user remove` did nothing.
#[derive(Debug, thiserror::Error)]
pub enum UserFileError {
    /// The configuration names no users file.
    #[error("{}: no users_file is set; add `users_file = \"users.toml\"` to it so that `relayd user` has a file to write", .0.display())]
    NoUsersFile(PathBuf),
    /// The user is written in the main configuration file, which is never rewritten.
    #[error("user `{name}` is defined in {}; change it there", file.display())]
    InConfigFile {
        /// The user.
        name: String,
        /// The configuration file.
        file: PathBuf,
    },
    /// The name is taken by an application-server account.
    #[error("`{0}` is an application-server account")]
    IsServerAccount(String),
    /// An argument is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// The user to remove is not in the users file.
    #[error("user `{name}` is not in {}", file.display())]
    NotFound {
        /// The user.
        name: String,
        /// The users file.
        file: PathBuf,
    },
    /// The configuration or users file could not be read, or the result would not be a
    /// valid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The users file could not be written.
    #[error("{}: cannot write", file.display())]
    Write {
        /// The file.
        file: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
}

/// What `relayd user add` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserAdded {
    /// The users file written.
    pub file: PathBuf,
    /// Whether a user of that name was replaced (rather than added).
    pub replaced: bool,
}

/// Reads a password: the first line of `input`, without its line ending. When `prompt` is
/// given it is written to standard error first (the input is not hidden).
pub fn read_password(input: &mut dyn BufRead, prompt: Option<&str>) -> io::Result<String> {
    if let Some(prompt) = prompt {
        let mut stderr = io::stderr();
        write!(stderr, "{prompt}")?;
        stderr.flush()?;
    }
    let mut line = String::new();
    input.read_line(&mut line)?;
    let password = line.trim_end_matches(['\r', '\n']).to_owned();
    if password.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no password on standard input",
        ));
    }
    Ok(password)
}

const USERS_FILE_HEADER: &str =
    "# Subscribers managed by `relayd user add` / `relayd user remove`.\n\
# This file is rewritten whole by those commands: comments added here are lost.\n\
# Only digest HA1 hashes are stored; they are bound to the realm";

/// The users file `relayd user` edits, or why there is none.
pub fn users_file_for(config: &Config) -> Result<PathBuf, UserFileError> {
    config
        .users_file_path()
        .ok_or_else(|| UserFileError::NoUsersFile(config.file_name()))
}

fn write_users(path: &Path, users: &UsersFile, realm: &str) -> Result<(), UserFileError> {
    let write_error = |source: io::Error| UserFileError::Write {
        file: path.to_path_buf(),
        source,
    };
    let body = toml::to_string(users)
        .map_err(|e| write_error(io::Error::new(io::ErrorKind::InvalidData, e)))?;
    let text = format!("{USERS_FILE_HEADER} \"{realm}\".\n\n{body}");
    // Mode 0600 (the hashes are as good as passwords for the realm), written beside,
    // fsynced, renamed, directory fsynced: a crash leaves the old file or the new, never
    // half of one (issue 14, finding 11).
    crate::private_files::write_atomic(path, text.as_bytes()).map_err(write_error)
}

/// Checks the result of an edit the way a start-up would, before anything is written.
fn check_result(config: &Config, users: &UsersFile) -> Result<(), UserFileError> {
    let mut after = config.clone();
    after.managed_users = users.users.clone();
    after.validate()?;
    Ok(())
}

/// `relayd user add`: adds `args.name` to the users file of `config` with the HA1 hashes
/// of `password` for the configured realm (computed by `ha1`), or replaces the entry of
/// that name. The users file is re-read first, so that users added since `config` was
/// loaded are kept.
pub fn user_add(
    config: &Config,
    args: &UserAddArgs,
    password: &str,
    ha1: Ha1Fn<'_>,
) -> Result<UserAdded, UserFileError> {
    let path = users_file_for(config)?;
    let name = args.name.as_str();
    if !is_token(name) {
        return Err(UserFileError::Invalid(format!(
            "{name:?} is not a valid user name (letters, digits and -.!%*_+`'~)"
        )));
    }
    if config.users.iter().any(|u| u.name == name) {
        return Err(UserFileError::InConfigFile {
            name: name.to_owned(),
            file: config.file_name(),
        });
    }
    if config.server_account(name).is_some() {
        return Err(UserFileError::IsServerAccount(name.to_owned()));
    }
    if !config.plan_known(&args.plan) {
        let (plans, _) = config.tariff_plans();
        return Err(UserFileError::Invalid(format!(
            "--plan {}: no tariff for this plan (plans: {})",
            args.plan,
            plans.into_iter().collect::<Vec<_>>().join(", ")
        )));
    }
    let known = config.service_names();
    for service in &args.services {
        if service != "*" && !known.contains(service.as_str()) {
            return Err(UserFileError::Invalid(format!(
                "--services: unknown service `{service}` (services: {})",
                known.iter().copied().collect::<Vec<_>>().join(", ")
            )));
        }
    }
    if password.is_empty() {
        return Err(UserFileError::Invalid("the password is empty".into()));
    }

    let realm = &config.relay.realm;
    let user = UserConfig {
        name: name.to_owned(),
        password: None,
        ha1_md5: Some(ha1(HashAlgorithm::Md5, name, realm, password)),
        ha1_sha256: Some(ha1(HashAlgorithm::Sha256, name, realm, password)),
        digest_algorithms: None,
        plan: args.plan.clone(),
        class: args.class.clone(),
        services: args.services.clone(),
    };
    let mut file = UsersFile::load(&path)?;
    let replaced = match file.users.iter_mut().find(|u| u.name == name) {
        Some(existing) => {
            // A new password keeps the algorithms the operator chose for the user.
            let digest_algorithms = existing.digest_algorithms.take();
            *existing = UserConfig {
                digest_algorithms,
                ..user
            };
            true
        }
        None => {
            file.users.push(user);
            false
        }
    };
    check_result(config, &file)?;
    write_users(&path, &file, realm)?;
    Ok(UserAdded {
        file: path,
        replaced,
    })
}

/// `relayd user remove`: removes `name` from the users file of `config`, returning the
/// file written.
pub fn user_remove(config: &Config, name: &str) -> Result<PathBuf, UserFileError> {
    let path = users_file_for(config)?;
    if config.users.iter().any(|u| u.name == name) {
        return Err(UserFileError::InConfigFile {
            name: name.to_owned(),
            file: config.file_name(),
        });
    }
    let mut file = UsersFile::load(&path)?;
    let before = file.users.len();
    file.users.retain(|u| u.name != name);
    if file.users.len() == before {
        return Err(UserFileError::NotFound {
            name: name.to_owned(),
            file: path,
        });
    }
    check_result(config, &file)?;
    write_users(&path, &file, &config.relay.realm)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("relayd").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn default_command_is_run_and_check_flag_is_check_config() {
        assert_eq!(parse(&[]).effective_command(), Command::Run);
        let cli = parse(&["--config", "x.toml", "--check"]);
        assert_eq!(cli.config, Some(PathBuf::from("x.toml")));
        assert_eq!(cli.effective_command(), Command::CheckConfig);
        let cli = parse(&["check-config", "--config", "y.toml"]);
        assert_eq!(
            cli.config,
            Some(PathBuf::from("y.toml")),
            "--config is global"
        );
        assert_eq!(cli.effective_command(), Command::CheckConfig);
    }

    #[test]
    fn user_add_arguments() {
        let cli = parse(&[
            "user",
            "add",
            "carol",
            "--plan",
            "basic",
            "--services",
            "echo,clock",
        ]);
        let Some(Command::User(UserCommand::Add(args))) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(args.name, "carol");
        assert_eq!(args.services, ["echo", "clock"]);
        assert_eq!(args.class, "standard");
        assert!(
            Cli::try_parse_from(["relayd", "user", "add", "carol", "--plan", "basic"]).is_err()
        );
    }

    #[test]
    fn billing_arguments() {
        let cli = parse(&[
            "billing",
            "report",
            "--since",
            "2024-05-01",
            "--by",
            "server",
        ]);
        let Some(Command::Billing(BillingCommand::Report(args))) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(args.since, Some(Timestamp(1_714_521_600)));
        assert_eq!(args.until, None);
        assert_eq!(args.by, GroupBy::Server);
        let cli = parse(&["billing", "export", "--format", "jsonl", "-o", "out.jsonl"]);
        let Some(Command::Billing(BillingCommand::Export(args))) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(args.format, ExportFormat::Jsonl);
        assert_eq!(args.output, Some(PathBuf::from("out.jsonl")));
        assert!(Cli::try_parse_from(["relayd", "billing", "export", "--format", "xml"]).is_err());
        assert!(
            Cli::try_parse_from(["relayd", "billing", "report", "--since", "yesterday"]).is_err()
        );
    }

    #[test]
    fn timestamps() {
        let t = |s: &str| s.parse::<Timestamp>().map(|t| t.0);
        assert_eq!(t("1970-01-01"), Ok(0));
        assert_eq!(t("2000-03-01"), Ok(951_868_800));
        assert_eq!(t("2024-02-29T12:30:15Z"), Ok(1_709_209_815));
        assert_eq!(t("2024-02-29 12:30"), Ok(1_709_209_800));
        assert_eq!(t("2024-02-29T14:30:15+02:00"), Ok(1_709_209_815));
        assert_eq!(t("2024-02-29T07:30:15-05:00"), Ok(1_709_209_815));
        assert_eq!(t("1969-12-31T23:59:59Z"), Ok(-1));
        for bad in [
            "",
            "2023-02-29",
            "2024-13-01",
            "2024-1-01",
            "2024-01-01T25:00",
            "2024-01-01T10",
            "2024-01-01T10:00+2",
            "01/02/2024",
        ] {
            assert!(t(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn password_is_one_line() {
        let mut input: &[u8] = b"s3cret\r\nrest\n";
        assert_eq!(read_password(&mut input, None).unwrap(), "s3cret");
        let mut empty: &[u8] = b"\n";
        assert!(read_password(&mut empty, None).is_err());
    }

    fn fake_ha1(algorithm: HashAlgorithm, user: &str, realm: &str, password: &str) -> String {
        let digit = match algorithm {
            HashAlgorithm::Md5 => 32,
            HashAlgorithm::Sha256 => 64,
        };
        // Deterministic, hex, of the right length, and depending on every input.
        let seed = format!("{user}:{realm}:{password}").len() % 10;
        seed.to_string().repeat(digit)
    }

    fn setup(users_file: bool) -> (tempfile::TempDir, Config) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relayd.toml");
        let users_line = if users_file {
            "users_file = \"users.toml\"\n"
        } else {
            ""
        };
        std::fs::write(
            &path,
            format!(
                "{users_line}[relay]\nrealm = \"relay.test\"\n[[services]]\nname = \"echo\"\n[[services]]\nname = \"clock\"\n\
                 [[tariffs]]\nname = \"basic\"\nplan = \"basic\"\nrate = 1\ncurrency = \"EUR\"\n[[users]]\nname = \"alice\"\npassword = \"a\"\nplan = \"basic\"\n\
                 [[server_accounts]]\nname = \"as1\"\npassword = \"s\"\n"
            ),
        )
        .unwrap();
        let config = Config::load(&path).unwrap();
        (dir, config)
    }

    fn add_args(name: &str, plan: &str, services: &[&str]) -> UserAddArgs {
        UserAddArgs {
            name: name.into(),
            plan: plan.into(),
            services: services.iter().map(|s| s.to_string()).collect(),
            class: "standard".into(),
        }
    }

    #[test]
    fn user_add_writes_only_hashes_and_the_config_reloads() {
        let (dir, config) = setup(true);
        let added = user_add(
            &config,
            &add_args("carol", "basic", &["echo"]),
            "carol-pw",
            &fake_ha1,
        )
        .unwrap();
        assert_eq!(added.file, dir.path().join("users.toml"));
        assert!(!added.replaced);
        let text = std::fs::read_to_string(&added.file).unwrap();
        assert!(!text.contains("carol-pw"), "{text}");
        assert!(!text.contains("password"), "{text}");
        assert!(text.contains("relay.test"), "{text}");

        let reloaded = Config::load(&dir.path().join("relayd.toml")).unwrap();
        let carol = reloaded.user("carol").unwrap();
        let expected = fake_ha1(HashAlgorithm::Md5, "carol", "relay.test", "carol-pw");
        assert_eq!(carol.ha1_md5.as_deref(), Some(expected.as_str()));
        assert_eq!(carol.ha1_sha256.as_ref().map(String::len), Some(64));
        assert_eq!(carol.services, ["echo"]);

        // Adding again replaces, and keeps the others.
        user_add(
            &reloaded,
            &add_args("dave", "basic", &["*"]),
            "d",
            &fake_ha1,
        )
        .unwrap();
        let again = user_add(
            &reloaded,
            &add_args("carol", "basic", &["echo", "clock"]),
            "new",
            &fake_ha1,
        )
        .unwrap();
        assert!(again.replaced);
        let reloaded = Config::load(&dir.path().join("relayd.toml")).unwrap();
        let names: Vec<&str> = reloaded
            .managed_users
            .iter()
            .map(|u| u.name.as_str())
            .collect();
        assert_eq!(names, ["carol", "dave"]);
        assert_eq!(reloaded.user("carol").unwrap().services, ["echo", "clock"]);

        let removed = user_remove(&reloaded, "carol").unwrap();
        assert_eq!(removed, dir.path().join("users.toml"));
        let reloaded = Config::load(&dir.path().join("relayd.toml")).unwrap();
        assert!(reloaded.user("carol").is_none() && reloaded.user("dave").is_some());
        assert!(matches!(
            user_remove(&reloaded, "carol"),
            Err(UserFileError::NotFound { .. })
        ));
        assert!(!dir.path().join("users.toml.tmp").exists());
    }

    /// Issue 14, finding 11: the users file holds digest hashes, as good as passwords for
    /// the realm; it was created readable by every local user.
    #[test]
    fn the_users_file_is_readable_by_its_owner_only() {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        let (dir, config) = setup(true);
        let path = dir.path().join("users.toml");
        user_add(
            &config,
            &add_args("carol", "basic", &["echo"]),
            "pw",
            &fake_ha1,
        )
        .unwrap();
        assert_eq!(mode(&path), 0o600, "a new users file");
        // One an older relayd wrote 0644: rewritten without the others' read.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let config = Config::load(&dir.path().join("relayd.toml")).unwrap();
        user_remove(&config, "carol").unwrap();
        assert_eq!(mode(&path) & 0o007, 0, "{:o}", mode(&path));
    }

    #[test]
    fn user_add_refuses_bad_requests_and_writes_nothing() {
        let (dir, config) = setup(true);
        let refuse = |args: UserAddArgs| user_add(&config, &args, "pw", &fake_ha1).unwrap_err();
        assert!(matches!(
            refuse(add_args("alice", "basic", &["echo"])),
            UserFileError::InConfigFile { .. }
        ));
        assert!(matches!(
            refuse(add_args("as1", "basic", &["echo"])),
            UserFileError::IsServerAccount(_)
        ));
        let message = refuse(add_args("carol", "gold", &["echo"])).to_string();
        assert!(
            message.contains("--plan gold") && message.contains("basic"),
            "{message}"
        );
        let message = refuse(add_args("carol", "basic", &["video"])).to_string();
        assert!(message.contains("unknown service `video`"), "{message}");
        assert!(matches!(
            refuse(add_args("ca rol", "basic", &["echo"])),
            UserFileError::Invalid(_)
        ));
        assert!(user_add(
            &config,
            &add_args("carol", "basic", &["echo"]),
            "",
            &fake_ha1
        )
        .is_err());
        assert!(!dir.path().join("users.toml").exists());
        assert!(matches!(
            user_remove(&config, "alice"),
            Err(UserFileError::InConfigFile { .. })
        ));
    }

    #[test]
    fn user_add_needs_a_users_file() {
        let (_dir, config) = setup(false);
        let message = user_add(
            &config,
            &add_args("carol", "basic", &["echo"]),
            "pw",
            &fake_ha1,
        )
        .unwrap_err()
        .to_string();
        assert!(message.contains("users_file"), "{message}");
    }
}
