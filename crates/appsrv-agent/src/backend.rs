//! Service backends: where the data gateway sends a terminal's bytes once its token is
//! accepted.
//!
//! A backend is either built in (`builtin:echo` returns what it gets, `builtin:clock` writes
//! the UTC time once a second) or an existing TCP server (`tcp://host:port`). Either way
//! [`Backend::open`] gives one byte stream per data connection; the built-in services run as
//! tasks on the far end of an in-memory pipe, so the gateway splices every backend alike.
//!
//! Both built-ins honour half-close: when the terminal stops sending (its input reaches end of
//! file) they finish and close their side, which ends the data connection.

use std::fmt;
use std::io;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::net::TcpStream;
use tracing::debug;

/// The size of the in-memory pipe between the gateway and a built-in service.
const PIPE_BYTES: usize = 64 * 1024;

/// A service backend, as written in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// `builtin:echo`: returns every byte it receives.
    Echo,
    /// `builtin:clock`: writes the current UTC time (RFC 3339) as a line once a second.
    Clock,
    /// `tcp://host:port`: an existing TCP server.
    Tcp {
        /// Host name or IP address.
        host: String,
        /// TCP port.
        port: u16,
    },
}

/// Why a backend string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} (expected builtin:echo, builtin:clock or tcp://host:port)")]
pub struct BackendParseError(String);

impl FromStr for Backend {
    type Err = BackendParseError;

    fn from_str(s: &str) -> Result<Backend, BackendParseError> {
        let s = s.trim();
        if let Some(name) = s.strip_prefix("builtin:") {
            return match name {
                "echo" => Ok(Backend::Echo),
                "clock" => Ok(Backend::Clock),
                other => Err(BackendParseError(format!(
                    "unknown built-in service {other:?}"
                ))),
            };
        }
        let Some(rest) = s.strip_prefix("tcp://") else {
            return Err(BackendParseError(format!("unknown backend {s:?}")));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) => (host, port),
            None => return Err(BackendParseError(format!("{s:?} has no port"))),
        };
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() || host.contains(['/', '@', ' ']) {
            return Err(BackendParseError(format!("{s:?} has no valid host")));
        }
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| BackendParseError(format!("{s:?} has no valid port")))?;
        Ok(Backend::Tcp {
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backend::Echo => f.write_str("builtin:echo"),
            Backend::Clock => f.write_str("builtin:clock"),
            Backend::Tcp { host, port } if host.contains(':') => write!(f, "tcp://[{host}]:{port}"),
            Backend::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
        }
    }
}

/// A byte stream to a backend, whatever its kind.
pub trait BackendIo: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> BackendIo for T {}

/// One data connection's stream to its backend.
pub type BackendStream = Box<dyn BackendIo>;

impl Backend {
    /// Opens a stream to the backend for one data connection: starts a built-in service, or
    /// connects to the TCP server within `connect_timeout`.
    pub async fn open(&self, connect_timeout: Duration) -> io::Result<BackendStream> {
        match self {
            Backend::Echo => Ok(Box::new(spawn_builtin(echo))),
            Backend::Clock => Ok(Box::new(spawn_builtin(clock))),
            Backend::Tcp { host, port } => {
                let connect = TcpStream::connect((host.as_str(), *port));
                let stream = tokio::time::timeout(connect_timeout, connect)
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
                stream.set_nodelay(true)?;
                Ok(Box::new(stream))
            }
        }
    }
}

/// Runs a built-in service on one end of a pipe and returns the other end.
fn spawn_builtin<F, Fut>(service: F) -> DuplexStream
where
    F: FnOnce(DuplexStream) -> Fut,
    Fut: std::future::Future<Output = io::Result<()>> + Send + 'static,
{
    let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
    let task = service(theirs);
    tokio::spawn(async move {
        if let Err(e) = task.await {
            debug!(error = %e, "built-in service ended with an error");
        }
    });
    ours
}

/// `builtin:echo`: writes back what it reads; closes its side at end of input.
async fn echo(stream: DuplexStream) -> io::Result<()> {
    let (mut rx, mut tx) = tokio::io::split(stream);
    tokio::io::copy(&mut rx, &mut tx).await?;
    tx.shutdown().await
}

/// `builtin:clock`: a line with the UTC time now and once a second after, until the peer
/// stops sending (end of input) or stops reading (write error). What it reads is ignored.
async fn clock(stream: DuplexStream) -> io::Result<()> {
    let (mut rx, mut tx) = tokio::io::split(stream);
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sink = [0u8; 1024];
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                let line = format!("{}\n", rfc3339(SystemTime::now()));
                tx.write_all(line.as_bytes()).await?;
            }
            read = rx.read(&mut sink) => {
                if read? == 0 {
                    return tx.shutdown().await;
                }
            }
        }
    }
}

/// A time as an RFC 3339 UTC timestamp with second precision, `2024-05-01T12:00:00Z`.
/// Times before 1970 are written as the epoch.
pub fn rfc3339(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's
/// `civil_from_days`, for non-negative counts).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn parses_and_prints_backends() {
        assert_eq!("builtin:echo".parse::<Backend>().unwrap(), Backend::Echo);
        assert_eq!("builtin:clock".parse::<Backend>().unwrap(), Backend::Clock);
        let tcp: Backend = "tcp://127.0.0.1:7000".parse().unwrap();
        assert_eq!(
            tcp,
            Backend::Tcp {
                host: "127.0.0.1".into(),
                port: 7000
            }
        );
        assert_eq!(tcp.to_string(), "tcp://127.0.0.1:7000");
        let v6: Backend = "tcp://[::1]:7000".parse().unwrap();
        assert_eq!(v6.to_string(), "tcp://[::1]:7000");
        for bad in [
            "builtin:chat",
            "echo",
            "tcp://host",
            "tcp://:7000",
            "tcp://h:0",
            "tcp://h:99999",
            "udp://h:1",
        ] {
            let err = bad.parse::<Backend>().unwrap_err();
            assert!(
                err.to_string().contains("expected builtin:echo"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        let at = |s: u64| rfc3339(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_709_210_096), "2024-02-29T12:34:56Z");
        assert_eq!(at(4_102_444_799), "2099-12-31T23:59:59Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00Z"
        );
    }

    #[tokio::test]
    async fn echo_returns_bytes_and_closes_after_input_ends() {
        let mut stream = Backend::Echo.open(Duration::from_secs(1)).await.unwrap();
        stream.write_all(b"hello, echo").await.unwrap();
        stream.shutdown().await.unwrap();
        let mut back = Vec::new();
        stream.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"hello, echo");
    }

    #[tokio::test(start_paused = true)]
    async fn clock_writes_a_line_per_second_until_input_ends() {
        let mut stream = Backend::Clock.open(Duration::from_secs(1)).await.unwrap();
        let mut buf = vec![0u8; 256];
        let mut text = String::new();
        while text.matches('\n').count() < 3 {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "clock closed early");
            text.push_str(std::str::from_utf8(&buf[..n]).unwrap());
        }
        for line in text.lines().take(3) {
            assert_eq!(line.len(), 20, "{line:?}");
            assert!(
                line.ends_with('Z') && line.as_bytes()[10] == b'T',
                "{line:?}"
            );
        }
        stream.shutdown().await.unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
    }

    #[tokio::test]
    async fn tcp_backend_connects_or_fails() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let backend = Backend::Tcp {
            host: "127.0.0.1".into(),
            port,
        };
        let accept = tokio::spawn(async move { listener.accept().await.unwrap() });
        let mut stream = backend.open(Duration::from_secs(5)).await.unwrap();
        let (mut server, _) = accept.await.unwrap();
        stream.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        server.read_exact(&mut one).await.unwrap();
        assert_eq!(&one, b"x");
        drop(server);
        // A port nobody listens on: take one, then free it.
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = free.local_addr().unwrap().port();
        drop(free);
        let dead = Backend::Tcp {
            host: "127.0.0.1".into(),
            port,
        };
        assert!(dead.open(Duration::from_secs(5)).await.is_err());
    }
}
