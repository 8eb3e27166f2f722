//! The `--then` mini-language: what to do on a live session without a terminal, and the
//! actions the `~` escapes map to.
//!
//! ```text
//! script := step (';' step)*
//! step   := ['after' DURATION] action
//! action := 'change' [@N] SERVICE[;p=v…] | 'transfer' [@N] SERVICE[;p=v…]
//!         | 'bye' [@N] | 'status' [@N] | 'help' | 'wait' DURATION | 'sessions' N
//! ```
//!
//! Parameters of a service are written joined to it (`change video;quality=hd`), so `;`
//! separates steps only where it follows whitespace or ends a word that is not a service.
//! Steps are split on `;` followed by optional spaces and a keyword (`after`, an action).

use std::fmt;
use std::time::Duration;

use crate::config::parse_duration;
use crate::service::ServiceRequest;

/// Which sessions an action applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Every live session.
    All,
    /// Session number N (1 is the first established).
    Session(u32),
}

impl Target {
    /// Whether session `id` is targeted.
    pub fn includes(self, id: u32) -> bool {
        match self {
            Target::All => true,
            Target::Session(n) => n == id,
        }
    }
}

/// Something to do on the live sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Change the service: re-INVITE with `P-Preferred-Service` (claim 5).
    Change(Target, ServiceRequest),
    /// Transfer to another server: REFER (claim 6).
    Transfer(Target, ServiceRequest),
    /// Hang up: BYE.
    Bye(Target),
    /// Print the sessions' state.
    Status(Target),
    /// Print the list of escapes.
    Help,
    /// Pause the script.
    Wait(Duration),
    /// Wait until this many sessions have been established.
    Sessions(u32),
}

/// One step of a script: a delay, then an action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// How long to wait before the action, from the end of the previous step.
    pub delay: Duration,
    /// The action.
    pub action: Action,
}

/// Why a script or escape line could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptError(pub String);

impl fmt::Display for ScriptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ScriptError {}

const KEYWORDS: [&str; 8] = [
    "after", "change", "transfer", "bye", "status", "help", "wait", "sessions",
];

/// Splits a script into step texts: on `;` when the text after it (spaces skipped) starts
/// with a keyword, so that `change video;quality=hd; bye` keeps the parameter.
fn split_steps(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, c) in text.char_indices() {
        if c != ';' {
            continue;
        }
        let rest = text[i + 1..].trim_start();
        let word = rest
            .split(|c: char| c.is_whitespace() || c == ';')
            .next()
            .unwrap_or_default();
        if rest.is_empty() || KEYWORDS.contains(&word.to_ascii_lowercase().as_str()) {
            out.push(&text[start..i]);
            start = i + 1;
        }
    }
    out.push(&text[start..]);
    out.into_iter().filter(|s| !s.trim().is_empty()).collect()
}

/// Parses a whole `--then` script.
pub fn parse_script(text: &str) -> Result<Vec<Step>, ScriptError> {
    let steps: Vec<Step> = split_steps(text)
        .into_iter()
        .map(|s| parse_step(s).map_err(|e| ScriptError(format!("in {:?}: {e}", s.trim()))))
        .collect::<Result<_, _>>()?;
    if steps.is_empty() {
        return Err(ScriptError("empty script".into()));
    }
    Ok(steps)
}

/// Parses one step, `[after DURATION] action`.
pub fn parse_step(text: &str) -> Result<Step, ScriptError> {
    let text = text.trim();
    let mut words = text.split_whitespace();
    if words
        .next()
        .is_some_and(|w| w.eq_ignore_ascii_case("after"))
    {
        let dur = words
            .next()
            .ok_or_else(|| ScriptError("`after` needs a duration".into()))?;
        let delay = parse_duration(dur).map_err(ScriptError)?;
        let rest: Vec<&str> = words.collect();
        let action = if rest.is_empty() {
            Action::Wait(Duration::ZERO)
        } else {
            parse_action(&rest.join(" "))?
        };
        return Ok(Step { delay, action });
    }
    Ok(Step {
        delay: Duration::ZERO,
        action: parse_action(text)?,
    })
}

/// Parses one action, as written in a script or after an escape's letter.
pub fn parse_action(text: &str) -> Result<Action, ScriptError> {
    let mut words = text.split_whitespace();
    let verb = words
        .next()
        .ok_or_else(|| ScriptError("empty action".into()))?
        .to_ascii_lowercase();
    let mut rest: Vec<&str> = words.collect();
    let target = match rest.first() {
        Some(w) if w.starts_with('@') => {
            let n: u32 = w[1..]
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| ScriptError(format!("{w:?}: a session is @1, @2, …")))?;
            rest.remove(0);
            Target::Session(n)
        }
        _ => Target::All,
    };
    let service = |rest: &[&str]| -> Result<ServiceRequest, ScriptError> {
        match rest {
            [s] => ServiceRequest::parse(s).map_err(|e| ScriptError(e.to_string())),
            [] => Err(ScriptError(format!("`{verb}` needs a service"))),
            _ => Err(ScriptError(format!(
                "`{verb}` takes one service, got {:?}",
                rest.join(" ")
            ))),
        }
    };
    let no_more = |rest: &[&str], action: Action| {
        if rest.is_empty() {
            Ok(action)
        } else {
            Err(ScriptError(format!(
                "unexpected {:?} after `{verb}`",
                rest.join(" ")
            )))
        }
    };
    match verb.as_str() {
        "change" => Ok(Action::Change(target, service(&rest)?)),
        "transfer" => Ok(Action::Transfer(target, service(&rest)?)),
        "bye" | "hangup" => no_more(&rest, Action::Bye(target)),
        "status" => no_more(&rest, Action::Status(target)),
        "help" if target == Target::All => no_more(&rest, Action::Help),
        "wait" if target == Target::All => match rest.as_slice() {
            [d] => Ok(Action::Wait(parse_duration(d).map_err(ScriptError)?)),
            _ => Err(ScriptError("`wait` needs one duration".into())),
        },
        "sessions" if target == Target::All => match rest.as_slice() {
            [n] => n
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .map(Action::Sessions)
                .ok_or_else(|| ScriptError(format!("`sessions` needs a count, got {n:?}"))),
            _ => Err(ScriptError("`sessions` needs one count".into())),
        },
        other => Err(ScriptError(format!(
            "unknown action {other:?} (change, transfer, bye, status, wait, sessions)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn svc(s: &str) -> ServiceRequest {
        ServiceRequest::parse(s).unwrap()
    }

    #[test]
    fn parses_the_issue_example() {
        let steps =
            parse_script("after 2s change clock; after 2s transfer echo; after 1s bye").unwrap();
        assert_eq!(
            steps,
            vec![
                Step {
                    delay: Duration::from_secs(2),
                    action: Action::Change(Target::All, svc("clock"))
                },
                Step {
                    delay: Duration::from_secs(2),
                    action: Action::Transfer(Target::All, svc("echo"))
                },
                Step {
                    delay: Duration::from_secs(1),
                    action: Action::Bye(Target::All)
                },
            ]
        );
    }

    #[test]
    fn params_targets_and_waits() {
        let steps = parse_script(
            "sessions 2;change @2 video;quality=hd;x ; status; wait 300ms; after 50ms; bye @1",
        )
        .unwrap();
        assert_eq!(steps[0].action, Action::Sessions(2));
        assert_eq!(
            steps[1].action,
            Action::Change(Target::Session(2), svc("video;quality=hd;x"))
        );
        assert_eq!(steps[2].action, Action::Status(Target::All));
        assert_eq!(steps[3].action, Action::Wait(Duration::from_millis(300)));
        assert_eq!(
            steps[4],
            Step {
                delay: Duration::from_millis(50),
                action: Action::Wait(Duration::ZERO)
            }
        );
        assert_eq!(steps[5].action, Action::Bye(Target::Session(1)));
        assert!(Target::Session(2).includes(2) && !Target::Session(2).includes(1));
    }

    #[test]
    fn errors_say_what_is_wrong() {
        for (bad, needle) in [
            ("", "empty"),
            ("dance", "unknown action"),
            ("change", "needs a service"),
            ("bye now", "unexpected"),
            ("after soon bye", "duration"),
            ("change @0 echo", "@1"),
            ("transfer a b", "one service"),
            ("sessions x", "count"),
            ("change ec<ho", "service name"),
        ] {
            let e = parse_script(bad).unwrap_err();
            assert!(e.0.contains(needle), "{bad:?}: {e}");
        }
    }
}
