//! ssh-style escapes on a terminal's stdin: a line that starts with `~` is a command for
//! the client, not data for the server.
//!
//! | line | action |
//! |---|---|
//! | `~c [@N] SERVICE[;p=v…]` | change the service (re-INVITE) |
//! | `~t [@N] SERVICE` | transfer to another server (REFER) |
//! | `~s [@N]` | status |
//! | `~. [@N]` | hang up |
//! | `~?` | help |
//! | `~~…` | a line starting with a literal `~` |
//!
//! A terminal in canonical mode hands over whole lines, so the filter works on lines: bytes
//! at the start of a line that begin with `~` are held until the newline, then read as a
//! command; every other byte passes through untouched.

use crate::script::{parse_action, Action, ScriptError};

/// The help text for `~?`.
pub const HELP: &str = "\
Escapes (at the start of a line):
  ~c [@N] SERVICE[;p=v]  change the service (re-INVITE)
  ~t [@N] SERVICE        transfer to another server (REFER)
  ~s [@N]                status
  ~. [@N]                hang up
  ~?                     this help
  ~~                     send a line starting with ~";

/// What the filter gives back: data for the server, or a command line read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Bytes to send to the server.
    Data(Vec<u8>),
    /// An escape line, read as an action (or why it could not be).
    Command(Result<Action, ScriptError>),
}

/// The longest escape line kept; a longer one is passed on as data.
const MAX_LINE: usize = 1024;

/// Splits stdin into data and escape commands.
#[derive(Debug, Clone)]
pub struct EscapeFilter {
    at_line_start: bool,
    line: Option<Vec<u8>>,
}

impl Default for EscapeFilter {
    fn default() -> Self {
        EscapeFilter::new()
    }
}

impl EscapeFilter {
    /// A filter at the start of a line.
    pub fn new() -> EscapeFilter {
        EscapeFilter {
            at_line_start: true,
            line: None,
        }
    }

    /// Feeds bytes read from stdin.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Piece> {
        let mut out = Vec::new();
        let mut data = Vec::new();
        for &b in bytes {
            if let Some(line) = &mut self.line {
                if b == b'\n' {
                    let line = std::mem::take(line);
                    self.line = None;
                    self.at_line_start = true;
                    match interpret(&line) {
                        Interpreted::Data(mut d) => {
                            d.push(b'\n');
                            data.extend(d);
                        }
                        Interpreted::Command(c) => {
                            if !data.is_empty() {
                                out.push(Piece::Data(std::mem::take(&mut data)));
                            }
                            out.push(Piece::Command(c));
                        }
                    }
                } else if line.len() >= MAX_LINE {
                    data.append(line);
                    data.push(b);
                    self.line = None;
                    self.at_line_start = false;
                } else {
                    line.push(b);
                }
                continue;
            }
            if self.at_line_start && b == b'~' {
                self.line = Some(vec![b]);
                continue;
            }
            data.push(b);
            self.at_line_start = b == b'\n' || b == b'\r';
        }
        if !data.is_empty() {
            out.push(Piece::Data(data));
        }
        out
    }

    /// At end of input: a pending escape line without its newline is read as well.
    pub fn finish(&mut self) -> Vec<Piece> {
        match self.line.take() {
            None => Vec::new(),
            Some(line) => match interpret(&line) {
                Interpreted::Data(d) => vec![Piece::Data(d)],
                Interpreted::Command(c) => vec![Piece::Command(c)],
            },
        }
    }
}

enum Interpreted {
    Data(Vec<u8>),
    Command(Result<Action, ScriptError>),
}

/// Reads one line that starts with `~` (without its newline).
fn interpret(line: &[u8]) -> Interpreted {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.starts_with(b"~~") {
        return Interpreted::Data(line[1..].to_vec());
    }
    let Ok(text) = std::str::from_utf8(line) else {
        return Interpreted::Data(line.to_vec());
    };
    let mut chars = text.chars();
    chars.next(); // the '~'
    let letter = chars.next();
    let rest = chars.as_str().trim();
    let cmd = match letter {
        Some('c') => parse_action(&format!("change {rest}")),
        Some('t') => parse_action(&format!("transfer {rest}")),
        Some('s') => parse_action(&format!("status {rest}")),
        Some('.') => parse_action(&format!("bye {rest}")),
        Some('?') => Ok(Action::Help),
        Some(other) => Err(ScriptError(format!(
            "unknown escape ~{other} (~? for help)"
        ))),
        None => Err(ScriptError(
            "a lone ~ (~? for help, ~~ for a literal ~)".into(),
        )),
    };
    Interpreted::Command(cmd)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::script::Target;
    use crate::service::ServiceRequest;

    fn data(s: &str) -> Piece {
        Piece::Data(s.as_bytes().to_vec())
    }

    #[test]
    fn commands_at_line_start_only() {
        let mut f = EscapeFilter::new();
        let out = f.feed(b"hello ~c x\n~c clock\nmore\n");
        assert_eq!(
            out,
            vec![
                data("hello ~c x\n"),
                Piece::Command(Ok(Action::Change(
                    Target::All,
                    ServiceRequest::parse("clock").unwrap()
                ))),
                data("more\n"),
            ]
        );
    }

    #[test]
    fn split_across_reads_and_all_letters() {
        let mut f = EscapeFilter::new();
        assert!(f.feed(b"~t @2 ec").is_empty());
        let out = f.feed(b"ho\r\n~s\n~.\n~?\n~~tilde\n");
        assert_eq!(
            out[0],
            Piece::Command(Ok(Action::Transfer(
                Target::Session(2),
                ServiceRequest::parse("echo").unwrap()
            )))
        );
        assert_eq!(out[1], Piece::Command(Ok(Action::Status(Target::All))));
        assert_eq!(out[2], Piece::Command(Ok(Action::Bye(Target::All))));
        assert_eq!(out[3], Piece::Command(Ok(Action::Help)));
        assert_eq!(out[4], data("~tilde\n"));
    }

    #[test]
    fn bad_escapes_and_eof() {
        let mut f = EscapeFilter::new();
        let out = f.feed(b"~x\n~c\n");
        assert!(matches!(&out[0], Piece::Command(Err(e)) if e.0.contains("~x")));
        assert!(matches!(&out[1], Piece::Command(Err(_))));
        assert!(f.feed(b"~.").is_empty());
        assert_eq!(
            f.finish(),
            vec![Piece::Command(Ok(Action::Bye(Target::All)))]
        );
        // An over-long line is data, not a command.
        let mut f = EscapeFilter::new();
        let long = format!("~{}\n", "a".repeat(2000));
        let out = f.feed(long.as_bytes());
        let total: usize = out
            .iter()
            .map(|p| match p {
                Piece::Data(d) => d.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(total, long.len());
    }
}
