//! The application-data connection (docs/protocol.md, "Data connection"): TCP to the data
//! endpoint of the SDP answer, the session token as the first line, `OK` back from the
//! gateway (or `ERR <reason>`), then bytes both ways.
//!
//! When the answer's m-line says `TCP/TLS` (RFC 4572 §7) the connection runs TLS first,
//! verifying the gateway's certificate against `--ca` and the answer's `c=` address
//! (RFC 5922 §7.1), and only then sends the token. When the SIP leg is TLS an answer without
//! `TCP/TLS` is refused ([`tls_required`]): the token never crosses a network in clear.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sip_core::tls::TlsSetup;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// The data connection's stream: TCP, or TLS over TCP.
pub trait DataStream: AsyncRead + AsyncWrite + Unpin + Send + fmt::Debug {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + fmt::Debug> DataStream for T {}

/// The client's TLS settings for data connections, and whether the SIP leg is TLS.
static TLS: std::sync::OnceLock<(TlsSetup, bool)> = std::sync::OnceLock::new();

/// Sets the trusted CAs for `TCP/TLS` data connections (from `--ca`), and whether the SIP
/// leg is TLS (then only `TCP/TLS` data endpoints are used). The first call wins.
pub fn configure_tls(setup: TlsSetup, sip_leg_is_tls: bool) {
    let _ = TLS.set((setup, sip_leg_is_tls));
}

/// Whether the SIP leg is TLS, so the data connection must be too.
pub fn tls_required() -> bool {
    TLS.get().is_some_and(|(_, required)| *required)
}

/// Whether TLS data connections can be made (`--ca` given).
pub fn tls_available() -> bool {
    TLS.get().is_some()
}

use crate::input::InputSub;
use crate::output::Output;

/// The longest line the gateway may answer the token with.
const MAX_REPLY: usize = 1024;

/// Why the data connection could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataError {
    /// TCP connect failed.
    Connect(String),
    /// The gateway refused the token: `ERR <reason>`.
    Refused(String),
    /// The connection closed before `OK`.
    ClosedBeforeOk,
    /// No `OK` in time.
    Timeout,
    /// Something else than `OK` or `ERR …`, or an I/O error.
    Protocol(String),
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataError::Connect(e) => write!(f, "cannot connect: {e}"),
            DataError::Refused(r) => write!(f, "token refused by the gateway: ERR {r}"),
            DataError::ClosedBeforeOk => f.write_str("connection closed before OK"),
            DataError::Timeout => f.write_str("no OK from the gateway in time"),
            DataError::Protocol(e) => write!(f, "unexpected reply: {e}"),
        }
    }
}

impl std::error::Error for DataError {}

/// Connects, presents the token and waits for `OK`. Returns the stream and any bytes the
/// gateway sent after the `OK` line in the same read.
///
/// With `tls` the connection runs TLS first (the handshake within the same `limit`).
pub async fn open(
    addr: SocketAddr,
    token: &str,
    tls: bool,
    limit: Duration,
) -> Result<(Box<dyn DataStream>, Vec<u8>), DataError> {
    let work = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| DataError::Connect(format!("{addr}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let mut stream: Box<dyn DataStream> = if tls {
            let Some((setup, _)) = TLS.get() else {
                return Err(DataError::Connect(format!(
                    "{addr} asks TLS (TCP/TLS): give --ca FILE to verify it"
                )));
            };
            // The gateway's certificate must name the address the answer gave (RFC 5922
            // §7.1: the identity is the host the connection was meant for).
            let name = rustls_name(addr);
            let stream = setup
                .connector()
                .connect(name, tcp)
                .await
                .map_err(|e| DataError::Connect(format!("{addr}: TLS: {e}")))?;
            Box::new(stream)
        } else {
            Box::new(tcp)
        };
        stream
            .write_all(format!("{token}\n").as_bytes())
            .await
            .map_err(io_error)?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 512];
        loop {
            if let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let line = String::from_utf8_lossy(&line);
                let line = line.trim_end_matches(['\r', '\n']);
                return if line == "OK" {
                    Ok((stream, buf))
                } else if let Some(reason) = line.strip_prefix("ERR") {
                    Err(DataError::Refused(reason.trim().to_string()))
                } else {
                    Err(DataError::Protocol(format!("{:?}", truncate(line))))
                };
            }
            if buf.len() > MAX_REPLY {
                return Err(DataError::Protocol("reply line too long".into()));
            }
            let n = stream.read(&mut chunk).await.map_err(io_error)?;
            if n == 0 {
                return Err(DataError::ClosedBeforeOk);
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(limit, work)
        .await
        .unwrap_or(Err(DataError::Timeout))
}

fn rustls_name(addr: SocketAddr) -> sip_core::tls::ServerName<'static> {
    sip_core::tls::ServerName::IpAddress(addr.ip().into())
}

/// A reset or broken pipe before `OK` is the gateway closing on us.
fn io_error(e: std::io::Error) -> DataError {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
    match e.kind() {
        ConnectionReset | ConnectionAborted | BrokenPipe => DataError::ClosedBeforeOk,
        _ => DataError::Protocol(e.to_string()),
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

/// Byte counters of a session's data, across reconnections.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes written to the server.
    pub sent: AtomicU64,
    /// Bytes read from the server.
    pub received: AtomicU64,
}

/// How a pipe ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PipeEnd {
    /// The server closed its side (after our input ended, or on its own).
    ServerClosed {
        /// Whether our input had ended (and was half-closed) before.
        input_done: bool,
    },
    /// Our input ended and the server did not finish within the wait.
    WaitExpired,
    /// A read or write failed.
    Failed(String),
}

/// Pipes input to the server and the server to the output until the server closes, or
/// until `wait_after_eof` after our input ended (the write side is shut down at input EOF
/// so the server sees it). `input` is `None` for a connection that sends nothing.
pub async fn pipe(
    stream: Box<dyn DataStream>,
    leftover: Vec<u8>,
    input: Option<Arc<InputSub>>,
    output: Output,
    session: u32,
    counters: Arc<Counters>,
    wait_after_eof: Duration,
) -> PipeEnd {
    let (mut rd, mut wr) = tokio::io::split(stream);
    if !leftover.is_empty() {
        counters
            .received
            .fetch_add(leftover.len() as u64, Ordering::Relaxed);
        output.write(session, Bytes::from(leftover)).await;
    }
    let c_out = counters.clone();
    let writer = async move {
        if let Some(input) = input {
            while let Some(chunk) = input.next().await {
                wr.write_all(&chunk).await?;
                c_out.sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        }
        wr.shutdown().await?;
        // Keep the write half alive (dropping it is fine after shutdown).
        Ok::<_, std::io::Error>(wr)
    };
    let reader = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = rd.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            counters.received.fetch_add(n as u64, Ordering::Relaxed);
            output
                .write(session, Bytes::copy_from_slice(&buf[..n]))
                .await;
        }
    };
    tokio::pin!(writer, reader);
    tokio::select! {
        r = &mut reader => match r {
            Ok(()) => PipeEnd::ServerClosed { input_done: false },
            Err(e) => PipeEnd::Failed(e.to_string()),
        },
        w = &mut writer => match w {
            Err(e) => PipeEnd::Failed(e.to_string()),
            Ok(_wr) => match tokio::time::timeout(wait_after_eof, &mut reader).await {
                Ok(Ok(())) => PipeEnd::ServerClosed { input_done: true },
                Ok(Err(e)) => PipeEnd::Failed(e.to_string()),
                Err(_) => PipeEnd::WaitExpired,
            },
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::input::InputHub;
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::TcpListener;

    /// A gateway that checks the token line, then echoes until EOF.
    async fn gateway(token: &'static str, greeting: &'static str) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut s = BufReader::new(s);
            let mut line = String::new();
            s.read_line(&mut line).await.unwrap();
            if line.trim_end() != token {
                s.get_mut().write_all(b"ERR unknown token\n").await.unwrap();
                return;
            }
            s.get_mut().write_all(greeting.as_bytes()).await.unwrap();
            let mut buf = [0u8; 1024];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                s.get_mut().write_all(&buf[..n]).await.unwrap();
            }
        });
        addr
    }

    #[tokio::test]
    async fn token_ok_then_echo_round_trip() {
        let addr = gateway("tok1", "OK\nhello ").await;
        let (stream, leftover) = open(addr, "tok1", false, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(leftover, b"hello ");
        let hub = InputHub::new(1024);
        let sub = Arc::new(hub.subscribe());
        hub.push(Bytes::from_static(b"hi\n")).await;
        hub.finish();
        let (client, mut server) = tokio::io::duplex(1024);
        let out = Output::start_on(crate::output::Mode::Auto, client);
        let counters = Arc::new(Counters::default());
        let end = pipe(
            stream,
            leftover,
            Some(sub),
            out.clone(),
            1,
            counters.clone(),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(end, PipeEnd::ServerClosed { input_done: true });
        out.close().await;
        drop(out);
        let mut got = String::new();
        server.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "hello hi\n");
        assert_eq!(counters.sent.load(Ordering::Relaxed), 3);
        assert_eq!(counters.received.load(Ordering::Relaxed), 9);
    }

    #[tokio::test]
    async fn refusals_are_told_apart() {
        let addr = gateway("right", "OK\n").await;
        assert_eq!(
            open(addr, "wrong", false, Duration::from_secs(5))
                .await
                .unwrap_err(),
            DataError::Refused("unknown token".into())
        );
        // A listener that closes at once.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            drop(s);
        });
        assert_eq!(
            open(a, "t", false, Duration::from_secs(5))
                .await
                .unwrap_err(),
            DataError::ClosedBeforeOk
        );
        // Nothing listening.
        let free = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(matches!(
            open(free, "t", false, Duration::from_secs(5)).await,
            Err(DataError::Connect(_))
        ));
    }
}
