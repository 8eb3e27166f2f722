//! Rules (claim 2): ordered conditions over the request data that decide the service
//! contents (service id, selection strategy, service parameters) and the client information
//! (subscriber class, tariff plan), in the spirit of IMS initial filter criteria.
//!
//! A rule has a `match` part and a `set` part:
//!
//! ```toml
//! [[rules]]
//! name = "hd-video-office-hours"
//! match = { method = "INVITE", ruri_user = "^video$", ruri_params = { quality = "^hd$" },
//!           from_user = "^(alice|bob)$", headers = { "User-Agent" = "^relay-client/" },
//!           sdp = "^m=application \\d+ TCP", preferred_service = "video", time = "08:00-18:00" }
//! set = { service = "video", strategy = "least-sessions", params = { quality = "hd" },
//!         class = "business", plan = "premium" }
//!
//! [[rules]]
//! name = "default"
//! default = true
//! ```
//!
//! * Every condition present must hold (and); a list (`method`, `time`) holds when one of its
//!   entries does (or). Regular expressions search anywhere in the value unless anchored
//!   with `^`/`$`; `sdp` is matched line by line (multi-line mode, CRLF aware).
//! * `ruri_params`/`headers` map a name (case-insensitive) to a regular expression over its
//!   value; a parameter without a value reads as the empty string. A header condition holds
//!   when any header of that name matches.
//! * `time` is one or more `HH:MM-HH:MM` ranges of local time (the configured UTC offset),
//!   start included, end excluded; a range may wrap midnight (`22:00-06:00`), `24:00` ends
//!   the day.
//! * Rules are tried in order and the first match wins. When rules are configured, the last
//!   one must be the explicit default (`default = true`, no `match`); with no rules at all
//!   the built-in default applies.
//! * What a rule does not set keeps its default: the service is the Request-URI user, the
//!   strategy is the service's configured strategy (`first` if it has none), the parameters
//!   are the Request-URI's, the class and plan are the subscriber's.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Deserializer};

use crate::directory::Strategy;

/// The name reported in a [`Decision`] when no rules are configured.
pub const BUILTIN_DEFAULT: &str = "builtin-default";

/// Seconds in a day.
const DAY: u32 = 24 * 3600;

/// URI parameters of RFC 3261 §19.1.1 that are transport or routing matters, never service
/// parameters: they are not copied into [`Decision::params`].
const SIP_URI_PARAMS: [&str; 6] = ["transport", "user", "method", "ttl", "maddr", "lr"];

/// One `[[rules]]` entry of the configuration, as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuleConfig {
    /// A unique name, reported in the decision and in logs.
    pub name: String,
    /// Marks the default rule: it matches every request and must be the last.
    pub default: bool,
    /// The conditions; all must hold.
    #[serde(rename = "match")]
    pub when: MatchConfig,
    /// What the rule decides.
    pub set: SetConfig,
}

/// The `match` part of a rule: conditions over the request data.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MatchConfig {
    /// Request methods, e.g. `"INVITE"` or `["INVITE", "MESSAGE"]` (case-sensitive).
    #[serde(deserialize_with = "one_or_many")]
    pub method: Vec<String>,
    /// A regular expression over the Request-URI user (the service name as asked).
    pub ruri_user: Option<String>,
    /// Request-URI parameter name to regular expression over its value.
    pub ruri_params: BTreeMap<String, String>,
    /// A regular expression over the From URI's user.
    pub from_user: Option<String>,
    /// Header name to regular expression over its value.
    pub headers: BTreeMap<String, String>,
    /// A regular expression over the SDP body (multi-line mode).
    pub sdp: Option<String>,
    /// A regular expression over the `P-Preferred-Service` value (RFC 6050).
    pub preferred_service: Option<String>,
    /// Time-of-day ranges `HH:MM-HH:MM` in the configured UTC offset.
    #[serde(deserialize_with = "one_or_many")]
    pub time: Vec<String>,
}

impl MatchConfig {
    fn is_empty(&self) -> bool {
        self == &MatchConfig::default()
    }
}

/// The `set` part of a rule: the service contents and client information it decides.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SetConfig {
    /// The service id (default: the Request-URI user).
    pub service: Option<String>,
    /// The selection strategy (default: the service's).
    pub strategy: Option<Strategy>,
    /// Service parameters, added to (and overriding) the Request-URI's.
    pub params: BTreeMap<String, String>,
    /// The subscriber class (default: the subscriber's).
    pub class: Option<String>,
    /// The tariff plan (default: the subscriber's).
    pub plan: Option<String>,
}

/// Accepts `"x"` as well as `["x", "y"]`.
fn one_or_many<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged, expecting = "a string or a list of strings")]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(one) => vec![one],
        OneOrMany::Many(many) => many,
    })
}

/// A problem with one rule, named by its key path (`rules[2].match.ruri_user`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("key `{key}`: {message}")]
pub struct RuleError {
    /// The configuration key at fault.
    pub key: String,
    /// What is wrong and what was expected.
    pub message: String,
}

/// Every problem found in the rules, in order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct RuleErrors(pub Vec<RuleError>);

impl fmt::Display for RuleErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

/// The request data the rules look at, filled by the session layer from the request and
/// the authenticated subscriber.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestFacts {
    /// The request method (`INVITE`).
    pub method: String,
    /// The Request-URI user: the service as asked (`video` in `sip:video@relay`).
    pub ruri_user: String,
    /// The Request-URI parameters, in order; `None` for a parameter without a value.
    pub ruri_params: Vec<(String, Option<String>)>,
    /// The From URI's user (may be left empty when no rule reads it: [`RuleSet::needs`]).
    pub from_user: String,
    /// Every header as (name, value), full names (the wire layer expands compact ones); may
    /// be left empty when no rule reads headers.
    pub headers: Vec<(String, String)>,
    /// The SDP body as text, empty when there is none (or when no rule reads it).
    pub sdp: String,
    /// The `P-Preferred-Service` value, if the request has one.
    pub preferred_service: Option<String>,
    /// The subscriber's tariff plan: the decision's plan unless a rule sets one.
    pub plan: String,
    /// The subscriber's class: the decision's class unless a rule sets one.
    pub class: String,
}

/// What the rules decided for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The rule that matched ([`BUILTIN_DEFAULT`] with no rules configured).
    pub rule_name: String,
    /// The service id to search servers for; empty when neither a rule nor the
    /// Request-URI names one.
    pub service: String,
    /// How to order the servers found.
    pub strategy: Strategy,
    /// The service parameters to pass on.
    pub params: BTreeMap<String, String>,
    /// The subscriber class.
    pub subscriber_class: String,
    /// The tariff plan to bill by.
    pub plan: String,
}

/// A time-of-day range in seconds since local midnight, `start` included, `end` excluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeRange {
    /// First second of the range.
    pub start: u32,
    /// First second after the range (`86400` for the end of the day).
    pub end: u32,
}

impl TimeRange {
    /// Parses `HH:MM-HH:MM` (`24:00` allowed as an end). Start and end must differ.
    pub fn parse(text: &str) -> Result<TimeRange, String> {
        let expected = || format!("expected a range like 08:00-18:00, got {text:?}");
        let (start, end) = text.split_once('-').ok_or_else(expected)?;
        let clock = |part: &str, allow_24: bool| -> Option<u32> {
            let (h, m) = part.trim().split_once(':')?;
            if h.is_empty() || h.len() > 2 || m.len() != 2 {
                return None;
            }
            let h: u32 = h.parse().ok()?;
            let m: u32 = m.parse().ok()?;
            let ok = m < 60 && (h < 24 || (allow_24 && h == 24 && m == 0));
            ok.then_some(h * 3600 + m * 60)
        };
        let start = clock(start, false).ok_or_else(expected)?;
        let end = clock(end, true).ok_or_else(expected)?;
        if start == end {
            return Err(format!(
                "{text:?} is empty; write 00:00-24:00 for the whole day"
            ));
        }
        Ok(TimeRange { start, end })
    }

    /// Whether `second_of_day` (local) falls in the range; a range whose end is before its
    /// start wraps midnight.
    pub fn contains(&self, second_of_day: u32) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&second_of_day)
        } else {
            second_of_day >= self.start || second_of_day < self.end
        }
    }
}

/// Seconds since UTC midnight at `time` (for [`RuleSet::evaluate`]).
pub fn utc_seconds_of_day(time: SystemTime) -> u32 {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // The remainder is below 86400 and so fits.
    u32::try_from(secs % u64::from(DAY)).unwrap_or(0)
}

#[derive(Debug)]
struct Rule {
    name: String,
    methods: Vec<String>,
    ruri_user: Option<Regex>,
    ruri_params: Vec<(String, Regex)>,
    from_user: Option<Regex>,
    headers: Vec<(String, Regex)>,
    sdp: Option<Regex>,
    preferred_service: Option<Regex>,
    times: Vec<TimeRange>,
    set: SetConfig,
}

impl Rule {
    fn matches(&self, facts: &RequestFacts, local_second: u32) -> bool {
        let any_header = |name: &str, re: &Regex| {
            facts
                .headers
                .iter()
                .any(|(n, v)| n.eq_ignore_ascii_case(name) && re.is_match(v))
        };
        let param = |name: &str, re: &Regex| {
            facts.ruri_params.iter().any(|(n, v)| {
                n.eq_ignore_ascii_case(name) && re.is_match(v.as_deref().unwrap_or(""))
            })
        };
        (self.methods.is_empty() || self.methods.contains(&facts.method))
            && self
                .ruri_user
                .as_ref()
                .is_none_or(|re| re.is_match(&facts.ruri_user))
            && self.ruri_params.iter().all(|(n, re)| param(n, re))
            && self
                .from_user
                .as_ref()
                .is_none_or(|re| re.is_match(&facts.from_user))
            && self.headers.iter().all(|(n, re)| any_header(n, re))
            && self.sdp.as_ref().is_none_or(|re| re.is_match(&facts.sdp))
            && self.preferred_service.as_ref().is_none_or(|re| {
                facts
                    .preferred_service
                    .as_deref()
                    .is_some_and(|v| re.is_match(v))
            })
            && (self.times.is_empty() || self.times.iter().any(|t| t.contains(local_second)))
    }
}

/// Whether `s` is a non-empty RFC 3261 token (service, parameter and header names).
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b))
}

/// The compiled, validated rules. Cheap to evaluate from many tasks at once (`&self`).
#[derive(Debug, Default)]
pub struct RuleSet {
    rules: Vec<Rule>,
    needs: FactNeeds,
    utc_offset_secs: i32,
    service_strategies: HashMap<String, Strategy>,
}

/// Which of the costlier request facts some rule looks at: a fact no rule reads need not be
/// gathered for every INVITE.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FactNeeds {
    /// Some rule matches the From user.
    pub from_user: bool,
    /// Some rule matches headers.
    pub headers: bool,
    /// Some rule matches the SDP body.
    pub sdp: bool,
}

impl RuleSet {
    /// Which costlier facts the rules read ([`RequestFacts::from_user`], `headers`, `sdp`);
    /// the others may be left empty.
    pub fn needs(&self) -> FactNeeds {
        self.needs
    }

    /// Compiles and validates `rules`, reporting every problem with its key path
    /// (`rules[i].…`).
    pub fn compile(rules: &[RuleConfig]) -> Result<RuleSet, RuleErrors> {
        let mut errors = Vec::new();
        let mut compiled = Vec::with_capacity(rules.len());
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (i, config) in rules.iter().enumerate() {
            let key = |field: &str| format!("rules[{i}].{field}");
            let mut err = |field: &str, message: String| {
                errors.push(RuleError {
                    key: key(field),
                    message,
                })
            };
            if config.name.trim().is_empty() {
                err("name", "every rule needs a name".into());
            } else if let Some(first) = names.insert(&config.name, i) {
                err(
                    "name",
                    format!(
                        "duplicate rule name `{}` (also rules[{first}])",
                        config.name
                    ),
                );
            }
            if config.default {
                if i + 1 != rules.len() {
                    err(
                        "default",
                        "the default rule must be the last rule (rules after it would never match)"
                            .into(),
                    );
                }
                if !config.when.is_empty() {
                    err(
                        "match",
                        "the default rule matches every request and takes no conditions".into(),
                    );
                }
            } else if config.when.is_empty() {
                err(
                    "match",
                    "a rule without conditions matches everything: give it conditions, or make it the last rule with `default = true`"
                        .into(),
                );
            }

            let mut regex = |field: &str, pattern: &str, multi_line: bool| -> Option<Regex> {
                match RegexBuilder::new(pattern)
                    .multi_line(multi_line)
                    .crlf(multi_line)
                    .build()
                {
                    Ok(re) => Some(re),
                    Err(e) => {
                        // regex's syntax errors span several lines; the last says what.
                        let text = e.to_string();
                        let what = text.lines().last().unwrap_or_default();
                        let what = what.trim().trim_start_matches("error: ");
                        err(
                            field,
                            format!("invalid regular expression {pattern:?}: {what}"),
                        );
                        None
                    }
                }
            };
            let when = &config.when;
            let ruri_user = when
                .ruri_user
                .as_deref()
                .and_then(|p| regex("match.ruri_user", p, false));
            let from_user = when
                .from_user
                .as_deref()
                .and_then(|p| regex("match.from_user", p, false));
            let sdp = when
                .sdp
                .as_deref()
                .and_then(|p| regex("match.sdp", p, true));
            let preferred_service = when
                .preferred_service
                .as_deref()
                .and_then(|p| regex("match.preferred_service", p, false));
            let mut ruri_params = Vec::new();
            for (name, pattern) in &when.ruri_params {
                let field = format!("match.ruri_params.{name}");
                if let Some(re) = regex(&field, pattern, false) {
                    ruri_params.push((name.clone(), re));
                }
            }
            let mut headers = Vec::new();
            for (name, pattern) in &when.headers {
                let field = format!("match.headers.{name}");
                if let Some(re) = regex(&field, pattern, false) {
                    headers.push((name.clone(), re));
                }
            }
            for (name, _) in ruri_params.iter().chain(headers.iter()) {
                if !is_token(name) {
                    err(
                        "match",
                        format!("`{name}` is not a valid parameter or header name"),
                    );
                }
            }
            for (j, method) in when.method.iter().enumerate() {
                if !is_token(method) || method.bytes().any(|b| b.is_ascii_lowercase()) {
                    err(
                        &format!("match.method[{j}]"),
                        format!("expected an upper-case SIP method like INVITE, got {method:?}"),
                    );
                }
            }
            let mut times = Vec::new();
            for (j, text) in when.time.iter().enumerate() {
                match TimeRange::parse(text) {
                    Ok(range) => times.push(range),
                    Err(message) => err(&format!("match.time[{j}]"), message),
                }
            }
            if let Some(service) = &config.set.service {
                if !is_token(service) {
                    err(
                        "set.service",
                        format!("expected a service name (a SIP token), got {service:?}"),
                    );
                }
            }
            for name in config.set.params.keys() {
                if !is_token(name) {
                    err(
                        "set.params",
                        format!("`{name}` is not a valid parameter name"),
                    );
                }
            }
            for (field, value) in [
                ("set.class", &config.set.class),
                ("set.plan", &config.set.plan),
            ] {
                if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                    err(field, "must not be empty".into());
                }
            }
            compiled.push(Rule {
                name: config.name.clone(),
                methods: when.method.clone(),
                ruri_user,
                ruri_params,
                from_user,
                headers,
                sdp,
                preferred_service,
                times,
                set: config.set.clone(),
            });
        }
        if let Some(last) = rules.last() {
            if !last.default {
                errors.push(RuleError {
                    key: "rules".into(),
                    message: "no default rule: end the rules with one that has `default = true`"
                        .into(),
                });
            }
        }
        if errors.is_empty() {
            let needs = FactNeeds {
                from_user: compiled.iter().any(|r| r.from_user.is_some()),
                headers: compiled.iter().any(|r| !r.headers.is_empty()),
                sdp: compiled.iter().any(|r| r.sdp.is_some()),
            };
            Ok(RuleSet {
                rules: compiled,
                needs,
                ..RuleSet::default()
            })
        } else {
            Err(RuleErrors(errors))
        }
    }

    /// Sets the offset of the local time the `time` ranges are written in.
    pub fn with_utc_offset(mut self, seconds: i32) -> RuleSet {
        self.utc_offset_secs = seconds;
        self
    }

    /// Sets each service's own strategy, used when the matching rule sets none.
    pub fn with_service_strategies(mut self, strategies: HashMap<String, Strategy>) -> RuleSet {
        self.service_strategies = strategies;
        self
    }

    /// The number of configured rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether no rules are configured (the built-in default applies).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rule names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|rule| rule.name.as_str())
    }

    /// Runs the rules over `facts` at `utc_second_of_day` (seconds since UTC midnight, see
    /// [`utc_seconds_of_day`]) and returns the decision of the first rule that matches.
    pub fn evaluate(&self, facts: &RequestFacts, utc_second_of_day: u32) -> Decision {
        let local = (i64::from(utc_second_of_day) + i64::from(self.utc_offset_secs))
            .rem_euclid(i64::from(DAY));
        let local = u32::try_from(local).unwrap_or(0);
        let matched = self.rules.iter().find(|rule| rule.matches(facts, local));
        let empty = SetConfig::default();
        let (rule_name, set) = match matched {
            Some(rule) => (rule.name.as_str(), &rule.set),
            None => (BUILTIN_DEFAULT, &empty),
        };
        let service = set
            .service
            .clone()
            .unwrap_or_else(|| facts.ruri_user.clone());
        let strategy = set
            .strategy
            .or_else(|| self.service_strategies.get(&service).copied())
            .unwrap_or_default();
        let mut params: BTreeMap<String, String> = facts
            .ruri_params
            .iter()
            .filter(|(name, _)| !SIP_URI_PARAMS.iter().any(|p| p.eq_ignore_ascii_case(name)))
            .map(|(name, value)| (name.clone(), value.clone().unwrap_or_default()))
            .collect();
        params.extend(set.params.iter().map(|(k, v)| (k.clone(), v.clone())));
        Decision {
            rule_name: rule_name.to_owned(),
            service,
            strategy,
            params,
            subscriber_class: set.class.clone().unwrap_or_else(|| facts.class.clone()),
            plan: set.plan.clone().unwrap_or_else(|| facts.plan.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn rules(text: &str) -> Vec<RuleConfig> {
        #[derive(Deserialize)]
        struct Doc {
            rules: Vec<RuleConfig>,
        }
        toml::from_str::<Doc>(text).unwrap().rules
    }

    fn compile(text: &str) -> RuleSet {
        RuleSet::compile(&rules(text)).unwrap()
    }

    fn errors(text: &str) -> Vec<RuleError> {
        RuleSet::compile(&rules(text)).unwrap_err().0
    }

    fn invite(service: &str) -> RequestFacts {
        RequestFacts {
            method: "INVITE".into(),
            ruri_user: service.into(),
            from_user: "alice".into(),
            plan: "basic".into(),
            class: "standard".into(),
            ..RequestFacts::default()
        }
    }

    const NOON: u32 = 12 * 3600;

    /// A rule set where rule `hit` has the condition under test, then the default.
    fn one(condition: &str) -> RuleSet {
        compile(&format!(
            "[[rules]]\nname = \"hit\"\nmatch = {{ {condition} }}\nset = {{ plan = \"gold\" }}\n\
             [[rules]]\nname = \"default\"\ndefault = true\n"
        ))
    }

    fn hits(set: &RuleSet, facts: &RequestFacts, at: u32) -> bool {
        set.evaluate(facts, at).rule_name == "hit"
    }

    #[test]
    fn no_rules_gives_the_builtin_default() {
        let set = RuleSet::compile(&[]).unwrap();
        let mut facts = invite("echo");
        facts.ruri_params = vec![("quality".into(), Some("hd".into())), ("lr".into(), None)];
        let d = set.evaluate(&facts, NOON);
        assert_eq!(d.rule_name, BUILTIN_DEFAULT);
        assert_eq!(d.service, "echo");
        assert_eq!(d.strategy, Strategy::First);
        assert_eq!(d.plan, "basic");
        assert_eq!(d.subscriber_class, "standard");
        assert_eq!(d.params, BTreeMap::from([("quality".into(), "hd".into())]));
    }

    #[test]
    fn service_strategy_applies_when_the_rule_sets_none() {
        let set = RuleSet::compile(&[])
            .unwrap()
            .with_service_strategies(HashMap::from([("echo".into(), Strategy::RoundRobin)]));
        assert_eq!(
            set.evaluate(&invite("echo"), NOON).strategy,
            Strategy::RoundRobin
        );
        assert_eq!(
            set.evaluate(&invite("clock"), NOON).strategy,
            Strategy::First
        );
    }

    #[test]
    fn method_condition() {
        let set = one("method = [\"MESSAGE\", \"INVITE\"]");
        assert!(hits(&set, &invite("echo"), NOON));
        let set = one("method = \"MESSAGE\"");
        assert!(!hits(&set, &invite("echo"), NOON));
    }

    #[test]
    fn ruri_user_condition() {
        let set = one("ruri_user = \"^vid\"");
        assert!(hits(&set, &invite("video"), NOON));
        assert!(!hits(&set, &invite("echo"), NOON));
    }

    #[test]
    fn ruri_params_condition() {
        let set = one("ruri_params = { quality = \"^hd$\", mono = \"\" }");
        let mut facts = invite("video");
        facts.ruri_params = vec![("QUALITY".into(), Some("hd".into())), ("mono".into(), None)];
        assert!(hits(&set, &facts, NOON));
        facts.ruri_params[0].1 = Some("sd".into());
        assert!(!hits(&set, &facts, NOON));
        facts.ruri_params = vec![("quality".into(), Some("hd".into()))];
        assert!(
            !hits(&set, &facts, NOON),
            "a missing parameter fails the condition"
        );
    }

    #[test]
    fn from_user_condition() {
        let set = one("from_user = \"^bob$\"");
        assert!(!hits(&set, &invite("echo"), NOON));
        let mut facts = invite("echo");
        facts.from_user = "bob".into();
        assert!(hits(&set, &facts, NOON));
    }

    #[test]
    fn header_condition_is_case_insensitive_on_names_and_any_header_counts() {
        let set = one("headers = { \"user-agent\" = \"^relay-client/\" }");
        let mut facts = invite("echo");
        facts.headers = vec![
            ("User-Agent".into(), "other/1".into()),
            ("User-Agent".into(), "relay-client/0.1".into()),
        ];
        assert!(hits(&set, &facts, NOON));
        facts.headers.pop();
        assert!(!hits(&set, &facts, NOON));
    }

    #[test]
    fn needs_name_the_costly_facts_some_rule_reads_and_only_those() {
        let none = FactNeeds {
            from_user: false,
            headers: false,
            sdp: false,
        };
        assert_eq!(RuleSet::compile(&[]).unwrap().needs(), none);
        assert_eq!(one("ruri_user = \"^echo$\"").needs(), none);
        assert_eq!(
            one("from_user = \"^bob$\"").needs(),
            FactNeeds {
                from_user: true,
                ..none
            }
        );
        assert_eq!(
            one("headers = { \"user-agent\" = \"x\" }").needs(),
            FactNeeds {
                headers: true,
                ..none
            }
        );
        assert_eq!(
            one("sdp = \"TCP\"").needs(),
            FactNeeds { sdp: true, ..none }
        );
    }

    #[test]
    fn sdp_condition_matches_lines_of_a_crlf_body() {
        let set = one("sdp = \"^m=application \\\\d+ TCP$\"");
        let mut facts = invite("echo");
        facts.sdp = "v=0\r\nm=application 9 TCP\r\nc=IN IP4 127.0.0.1\r\n".into();
        assert!(hits(&set, &facts, NOON));
        facts.sdp = "v=0\r\nm=audio 9 RTP/AVP 0\r\n".into();
        assert!(!hits(&set, &facts, NOON));
    }

    #[test]
    fn preferred_service_condition() {
        let set = one("preferred_service = \"^video$\"");
        let mut facts = invite("echo");
        assert!(
            !hits(&set, &facts, NOON),
            "absent header fails the condition"
        );
        facts.preferred_service = Some("video".into());
        assert!(hits(&set, &facts, NOON));
    }

    #[test]
    fn time_condition_with_offset_and_midnight_wrap() {
        let set = one("time = [\"08:00-12:00\", \"22:00-02:00\"]");
        let facts = invite("echo");
        assert!(hits(&set, &facts, 8 * 3600));
        assert!(!hits(&set, &facts, 12 * 3600), "end is excluded");
        assert!(hits(&set, &facts, 23 * 3600));
        assert!(hits(&set, &facts, 3600));
        assert!(!hits(&set, &facts, 3 * 3600));
        // At UTC+02:00, 07:00 UTC is 09:00 local.
        let shifted = one("time = \"08:00-12:00\"").with_utc_offset(2 * 3600);
        assert!(hits(&shifted, &facts, 7 * 3600));
        assert!(!hits(&shifted, &facts, 11 * 3600));
        // At UTC-05:00, 02:00 UTC is 21:00 local the day before.
        let west = one("time = \"20:00-22:00\"").with_utc_offset(-5 * 3600);
        assert!(hits(&west, &facts, 2 * 3600));
    }

    #[test]
    fn all_conditions_must_hold() {
        let set = one("ruri_user = \"^echo$\", from_user = \"^bob$\"");
        assert!(!hits(&set, &invite("echo"), NOON));
    }

    #[test]
    fn first_match_wins_and_set_overrides_defaults() {
        let set = compile(
            r#"
            [[rules]]
            name = "premium-echo"
            match = { ruri_user = "^echo$", from_user = "^alice$" }
            set = { service = "echo-hd", strategy = "least-sessions", params = { quality = "hd" }, class = "gold", plan = "premium" }
            [[rules]]
            name = "any-echo"
            match = { ruri_user = "^echo" }
            set = { strategy = "round-robin" }
            [[rules]]
            name = "default"
            default = true
            "#,
        );
        let mut facts = invite("echo");
        facts.ruri_params = vec![("quality".into(), Some("sd".into()))];
        let d = set.evaluate(&facts, NOON);
        assert_eq!(d.rule_name, "premium-echo");
        assert_eq!(d.service, "echo-hd");
        assert_eq!(d.strategy, Strategy::LeastSessions);
        assert_eq!(
            d.params["quality"], "hd",
            "the rule's parameter overrides the URI's"
        );
        assert_eq!(d.subscriber_class, "gold");
        assert_eq!(d.plan, "premium");

        facts.from_user = "bob".into();
        let d = set.evaluate(&facts, NOON);
        assert_eq!(d.rule_name, "any-echo");
        assert_eq!(d.service, "echo");
        assert_eq!(d.strategy, Strategy::RoundRobin);
        assert_eq!(d.plan, "basic");

        let d = set.evaluate(&invite("clock"), NOON);
        assert_eq!(d.rule_name, "default");
        assert_eq!(d.service, "clock");
        assert_eq!(
            set.names().collect::<Vec<_>>(),
            ["premium-echo", "any-echo", "default"]
        );
    }

    #[test]
    fn validation_names_the_key() {
        let keys =
            |text: &str| -> Vec<String> { errors(text).into_iter().map(|e| e.key).collect() };
        assert_eq!(
            keys("[[rules]]\nname = \"a\"\nmatch = { ruri_user = \"(\" }\n[[rules]]\nname = \"d\"\ndefault = true"),
            ["rules[0].match.ruri_user"]
        );
        assert_eq!(
            keys("[[rules]]\nname = \"a\"\nmatch = { headers = { Subject = \"[\" } }\n[[rules]]\nname = \"d\"\ndefault = true"),
            ["rules[0].match.headers.Subject"]
        );
        assert_eq!(
            keys("[[rules]]\nname = \"a\"\nmatch = { time = [\"08:00-18:00\", \"25:00-26:00\"] }\n[[rules]]\nname = \"d\"\ndefault = true"),
            ["rules[0].match.time[1]"]
        );
        assert_eq!(
            keys("[[rules]]\nname = \"a\"\nmatch = { method = \"invite\" }\n[[rules]]\nname = \"d\"\ndefault = true"),
            ["rules[0].match.method[0]"]
        );
        assert_eq!(
            keys("[[rules]]\nname = \"d\"\ndefault = true\n[[rules]]\nname = \"a\"\nmatch = { method = \"INVITE\" }"),
            ["rules[0].default", "rules"]
        );
        assert_eq!(
            keys("[[rules]]\nname = \"a\"\n[[rules]]\nname = \"a\"\ndefault = true"),
            ["rules[0].match", "rules[1].name"]
        );
        assert_eq!(
            keys("[[rules]]\nname = \"a\"\nmatch = { method = \"INVITE\" }\nset = { service = \"a b\" }"),
            ["rules[0].set.service", "rules"]
        );
        assert_eq!(
            keys("[[rules]]\nname = \"\"\ndefault = true\nmatch = { method = \"INVITE\" }"),
            ["rules[0].name", "rules[0].match"]
        );
        let message = errors("[[rules]]\nname = \"a\"\nmatch = { time = \"9-5\" }\n[[rules]]\nname = \"d\"\ndefault = true")
            .remove(0)
            .to_string();
        assert!(
            message.contains("rules[0].match.time[0]") && message.contains("08:00-18:00"),
            "{message}"
        );
    }

    #[test]
    fn time_ranges_parse_strictly() {
        assert_eq!(
            TimeRange::parse("00:00-24:00").unwrap(),
            TimeRange { start: 0, end: DAY }
        );
        assert_eq!(
            TimeRange::parse("8:30-17:45").unwrap(),
            TimeRange {
                start: 8 * 3600 + 1800,
                end: 17 * 3600 + 2700
            }
        );
        for bad in [
            "",
            "08:00",
            "08:00-08:00",
            "24:00-01:00",
            "08:60-09:00",
            "08-09",
            "a:bc-01:00",
            "08:00-24:01",
        ] {
            assert!(TimeRange::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn seconds_of_day_from_system_time() {
        let t = UNIX_EPOCH + std::time::Duration::from_secs(3 * 86400 + 3723);
        assert_eq!(utc_seconds_of_day(t), 3723);
    }
}
