//! What happened, told to the user: human status lines on stderr, or with `--json` one JSON
//! object per line (on stderr, or in `--events-file` with the human lines kept on stderr).
//! stdout is never used: it is the data pipe.

use std::io::Write;
use std::sync::{Arc, Mutex};

use serde::Serialize;

/// One event. With `--json` it is written as `{"event":"<kebab-name>", …fields}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// A REGISTER was answered 200.
    Registered {
        /// The address of record.
        aor: String,
        /// The Contact registered.
        contact: String,
        /// The lifetime granted, seconds.
        expires: u32,
        /// The SIP status (200).
        status: u16,
    },
    /// The binding was removed (REGISTER with Expires: 0).
    Unregistered {
        /// The SIP status.
        status: u16,
    },
    /// A provisional response to the INVITE.
    Provisional {
        /// The SIP status (100–199).
        status: u16,
        /// Its reason phrase.
        reason: String,
    },
    /// A 2xx arrived (its ACK goes out next): a session exists.
    Established {
        /// Session number (1, 2, … for forks).
        session: u32,
        /// The SIP status.
        status: u16,
        /// Its reason phrase.
        reason: String,
        /// The service requested.
        service: String,
        /// The dialog's Call-ID.
        call_id: String,
        /// The far end's tag (one per fork).
        remote_tag: String,
    },
    /// The answer names no data endpoint (no `m=application … relay-data` with a token).
    NoDataEndpoint {
        /// Session number.
        session: u32,
        /// Why.
        reason: String,
    },
    /// The data connection passed the token check.
    DataConnected {
        /// Session number.
        session: u32,
        /// The data endpoint.
        addr: String,
    },
    /// The data connection could not be opened or was refused (`ERR …`).
    DataFailed {
        /// Session number.
        session: u32,
        /// Why.
        reason: String,
    },
    /// The server finished the data connection.
    DataClosed {
        /// Session number.
        session: u32,
        /// Bytes sent to the server.
        sent: u64,
        /// Bytes received from it.
        received: u64,
    },
    /// A re-INVITE changing the service got its final response.
    Changed {
        /// Session number.
        session: u32,
        /// The service asked for.
        service: String,
        /// The SIP status (2xx: changed; else the session goes on unchanged).
        status: u16,
        /// Its reason phrase.
        reason: String,
    },
    /// Progress of a transfer: the REFER's answer, then each NOTIFY's sipfrag status.
    TransferProgress {
        /// Session number.
        session: u32,
        /// The SIP status reported.
        status: u16,
        /// Its reason phrase.
        reason: String,
    },
    /// A transfer ended: 2xx when the new server took over.
    Transferred {
        /// Session number.
        session: u32,
        /// The service transferred to.
        service: String,
        /// The final SIP status.
        status: u16,
        /// Its reason phrase.
        reason: String,
    },
    /// A session ended.
    Ended {
        /// Session number.
        session: u32,
        /// `local` (we sent BYE) or `remote`.
        by: String,
        /// Why.
        reason: String,
        /// The BYE's final status when we sent it.
        #[serde(skip_serializing_if = "Option::is_none")]
        status: Option<u16>,
    },
    /// The state of a session (`~s`, `status`).
    Status {
        /// Session number.
        session: u32,
        /// The current service.
        service: String,
        /// The dialog's Call-ID.
        call_id: String,
        /// The data connection: `none`, `connecting`, `connected addr`, `closed`.
        data: String,
        /// Bytes sent to the server.
        sent: u64,
        /// Bytes received.
        received: u64,
        /// Seconds since establishment.
        seconds: u64,
    },
    /// The request was refused with a final status.
    Refused {
        /// The SIP status.
        status: u16,
        /// Its reason phrase.
        reason: String,
    },
    /// A note for the user (escape help, a command that could not be done).
    Notice {
        /// The text.
        message: String,
    },
    /// The program ends.
    Exit {
        /// The exit status.
        code: u8,
        /// Why, for a non-zero status.
        #[serde(skip_serializing_if = "String::is_empty")]
        message: String,
    },
}

impl Event {
    /// The human status line.
    pub fn human(&self) -> String {
        match self {
            Event::Registered { aor, expires, .. } => format!("registered {aor} for {expires} s"),
            Event::Unregistered { status } => format!("unregistered ({status})"),
            Event::Provisional { status, reason } => format!("{status} {reason}"),
            Event::Established { session, status, reason, service, .. } => {
                format!("[{session}] established: {status} {reason} ({service})")
            }
            Event::NoDataEndpoint { session, reason } => {
                format!("[{session}] no data endpoint: {reason}")
            }
            Event::DataConnected { session, addr } => format!("[{session}] data connected to {addr}"),
            Event::DataFailed { session, reason } => format!("[{session}] data connection failed: {reason}"),
            Event::DataClosed { session, sent, received } => {
                format!("[{session}] data closed ({sent} bytes sent, {received} received)")
            }
            Event::Changed { session, service, status, reason } => {
                if (200..300).contains(status) {
                    format!("[{session}] changed to {service}: {status} {reason}")
                } else {
                    format!("[{session}] change to {service} refused: {status} {reason}")
                }
            }
            Event::TransferProgress { session, status, reason } => {
                format!("[{session}] transfer: {status} {reason}")
            }
            Event::Transferred { session, service, status, reason } => {
                if (200..300).contains(status) {
                    format!("[{session}] transferred to {service}: {status} {reason}")
                } else {
                    format!("[{session}] transfer to {service} failed: {status} {reason}")
                }
            }
            Event::Ended { session, by, reason, status } => match status {
                Some(s) => format!("[{session}] ended by {by}: {reason} ({s})"),
                None => format!("[{session}] ended by {by}: {reason}"),
            },
            Event::Status { session, service, call_id, data, sent, received, seconds } => format!(
                "[{session}] {service}, up {seconds} s, data {data}, {sent} bytes sent, {received} received, Call-ID {call_id}"
            ),
            Event::Refused { status, reason } => format!("refused: {status} {reason}"),
            Event::Notice { message } => message.clone(),
            Event::Exit { code, message } => {
                if message.is_empty() {
                    format!("exit {code}")
                } else {
                    format!("sip-client: {message}")
                }
            }
        }
    }
}

/// Where events go. Cheap to clone; writes are whole lines under a lock.
#[derive(Clone)]
pub struct Events {
    inner: Arc<Mutex<Sinks>>,
}

/// A place lines are written to.
type Sink = Option<Box<dyn Write + Send>>;

struct Sinks {
    human: Sink,
    json: Sink,
}

impl Events {
    /// Human lines on stderr; with `json`, JSON lines on stderr instead, unless
    /// `events_file` takes them (then human lines stay on stderr).
    pub fn new(json: bool, events_file: Option<std::fs::File>) -> Events {
        let (human, json): (Sink, Sink) = match (json, events_file) {
            (_, Some(f)) => (Some(Box::new(std::io::stderr())), Some(Box::new(f))),
            (true, None) => (None, Some(Box::new(std::io::stderr()))),
            (false, None) => (Some(Box::new(std::io::stderr())), None),
        };
        Events {
            inner: Arc::new(Mutex::new(Sinks { human, json })),
        }
    }

    /// Events written to the given sinks (for tests).
    #[cfg(test)]
    fn to_writers(human: Sink, json: Sink) -> Events {
        Events {
            inner: Arc::new(Mutex::new(Sinks { human, json })),
        }
    }

    /// Tells the user. An event the program's own exit line should not repeat in human
    /// form (exit 0) is written in JSON only.
    pub fn emit(&self, event: Event) {
        tracing::debug!(?event, "event");
        let Ok(mut sinks) = self.inner.lock() else {
            return;
        };
        if let Some(json) = sinks.json.as_mut() {
            if let Ok(line) = serde_json::to_string(&event) {
                let _ = writeln!(json, "{line}");
                let _ = json.flush();
            }
        }
        let quiet = matches!(&event, Event::Exit { message, .. } if message.is_empty());
        if let (Some(human), false) = (sinks.human.as_mut(), quiet) {
            let _ = writeln!(human, "{}", event.human());
            let _ = human.flush();
        }
    }

    /// A notice line.
    pub fn notice(&self, message: impl Into<String>) {
        self.emit(Event::Notice {
            message: message.into(),
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_carry_event_name_status_and_session() {
        let (h, j) = (Buf::default(), Buf::default());
        let events = Events::to_writers(Some(Box::new(h.clone())), Some(Box::new(j.clone())));
        events.emit(Event::Provisional {
            status: 180,
            reason: "Ringing".into(),
        });
        events.emit(Event::Ended {
            session: 2,
            by: "remote".into(),
            reason: "BYE".into(),
            status: None,
        });
        events.emit(Event::Exit {
            code: 0,
            message: String::new(),
        });
        let json = String::from_utf8(j.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = json
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["event"], "provisional");
        assert_eq!(lines[0]["status"], 180);
        assert_eq!(lines[1]["event"], "ended");
        assert_eq!(lines[1]["session"], 2);
        assert!(lines[1].get("status").is_none());
        assert_eq!(lines[2]["event"], "exit");
        let human = String::from_utf8(h.0.lock().unwrap().clone()).unwrap();
        assert_eq!(human, "180 Ringing\n[2] ended by remote: BYE\n");
    }
}
