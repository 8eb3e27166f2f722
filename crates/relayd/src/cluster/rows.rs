//! How shared state is stored and announced: a user's bindings as one JSON row with
//! absolute expiry times, and the `NOTIFY` payload. Plain data, no database.

use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::directory::HealthChange;
use crate::registrar::Binding;

/// Milliseconds of the Unix epoch at `at`, reading `now` and `wall` as the same moment.
pub fn epoch_ms(at: Instant, now: Instant, wall: SystemTime) -> i64 {
    let wall_ms = wall
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    let ahead = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    if at >= now {
        wall_ms.saturating_add(ahead(at - now))
    } else {
        wall_ms.saturating_sub(ahead(now - at))
    }
}

/// The instant at `ms` milliseconds of the Unix epoch, reading `now` and `wall` as the same
/// moment. A time before what `Instant` can hold is `now` (it has passed anyway).
pub fn instant_of(ms: i64, now: Instant, wall: SystemTime) -> Instant {
    let wall_ms = epoch_ms(now, now, wall);
    let delta = ms.saturating_sub(wall_ms);
    let span = Duration::from_millis(delta.unsigned_abs());
    if delta >= 0 {
        now.checked_add(span).unwrap_or(now)
    } else {
        now.checked_sub(span).unwrap_or(now)
    }
}

/// One binding as stored in `relayd.registrations.bindings` (a JSON array of these).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBinding {
    /// The Contact without `expires` ([`Binding::contact_text`]).
    pub contact: String,
    /// The services an application server offers (empty for a terminal).
    pub services: Vec<String>,
    /// Its capacity, if it said.
    pub capacity: Option<u32>,
    /// The Call-ID of the REGISTER that last updated it.
    pub call_id: String,
    /// Its CSeq number.
    pub cseq: u32,
    /// When it ends, in milliseconds of the Unix epoch.
    pub expires_ms: i64,
}

/// The JSON array stored for `bindings`, and the latest expiry among them (0 when none).
pub fn encode_bindings(
    bindings: &[Binding],
    now: Instant,
    wall: SystemTime,
) -> Result<(String, i64), serde_json::Error> {
    let stored: Vec<StoredBinding> = bindings
        .iter()
        .map(|b| StoredBinding {
            contact: b.contact_text(),
            services: b.services.clone(),
            capacity: b.capacity,
            call_id: b.call_id.clone(),
            cseq: b.cseq,
            expires_ms: epoch_ms(b.expires_at, now, wall),
        })
        .collect();
    let latest = stored.iter().map(|s| s.expires_ms).max().unwrap_or(0);
    Ok((serde_json::to_string(&stored)?, latest))
}

/// The bindings of `user` read back from their stored JSON. Those that cannot be read are
/// reported, the others kept.
pub fn decode_bindings(
    user: &str,
    json: &str,
    now: Instant,
    wall: SystemTime,
) -> Result<(Vec<Binding>, Vec<String>), serde_json::Error> {
    let stored: Vec<StoredBinding> = serde_json::from_str(json)?;
    let mut bindings = Vec::with_capacity(stored.len());
    let mut errors = Vec::new();
    for s in stored {
        match Binding::restore(
            user,
            &s.contact,
            s.services,
            s.capacity,
            &s.call_id,
            s.cseq,
            instant_of(s.expires_ms, now, wall),
        ) {
            Ok(b) => bindings.push(b),
            Err(e) => errors.push(e),
        }
    }
    Ok((bindings, errors))
}

/// What a `NOTIFY` on [`super::CHANNEL`] announces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Note {
    /// The relay that made the change.
    pub node: String,
    /// What changed.
    #[serde(flatten)]
    pub what: Noted,
}

/// The change announced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Noted {
    /// The bindings of `user` changed: read its row again.
    Bindings {
        /// The user.
        user: String,
    },
    /// The server at `uri` went up or down.
    Health {
        /// The server's URI.
        uri: String,
        /// Up (true) or down.
        up: bool,
    },
    /// An authentication attempt failed.
    #[serde(rename = "auth-failure")]
    AuthFailure {
        /// The user, when it exists.
        user: Option<String>,
        /// The source address.
        source: IpAddr,
        /// Its weight (by transport).
        weight: u32,
    },
}

impl Noted {
    /// The health change of a [`Noted::Health`].
    pub fn health_change(up: bool) -> HealthChange {
        if up {
            HealthChange::Up
        } else {
            HealthChange::Down
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registrar::{RegisterRequest, Registrar, RegistrarPolicy, Role};

    #[test]
    fn an_instant_survives_the_trip_through_epoch_milliseconds() {
        let now = Instant::now();
        let wall = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let later = now + Duration::from_millis(90_500);
        assert_eq!(epoch_ms(later, now, wall), 1_800_000_090_500);
        assert_eq!(instant_of(1_800_000_090_500, now, wall), later);
        // Read on another relay whose `Instant` runs elsewhere but whose wall clock agrees.
        let other_now = now + Duration::from_secs(7);
        let other_wall = wall + Duration::from_secs(7);
        assert_eq!(instant_of(1_800_000_090_500, other_now, other_wall), later);
        // In the past.
        assert_eq!(
            epoch_ms(now, now + Duration::from_secs(2), wall),
            1_799_999_998_000
        );
    }

    fn registered(contact: &str, role: Role<'_>) -> Vec<Binding> {
        let registrar = Registrar::new(RegistrarPolicy::default(), 1);
        let request = RegisterRequest {
            contacts: vec![contact.to_owned()],
            expires: Some("600".to_owned()),
            call_id: "c1@term".to_owned(),
            cseq: 7,
            source: None,
        };
        match registrar.register("alice", role, &request, Instant::now()) {
            Ok(ok) => ok.bindings,
            Err(e) => panic!("register: {e}"),
        }
    }

    #[test]
    fn bindings_come_back_as_they_were_registered() {
        let allowed = vec!["echo".to_owned(), "video".to_owned()];
        let bindings = registered(
            "\"Echo \\\"one\\\"\" <sip:echo@127.0.0.1:5090;transport=tcp>;services=\"echo,video\";capacity=3;q=0.5",
            Role::AppServer {
                allowed_services: Some(&allowed),
            },
        );
        let now = Instant::now();
        let wall = SystemTime::now();
        let (json, latest) = encode_bindings(&bindings, now, wall).unwrap_or_default();
        assert_eq!(latest, epoch_ms(bindings[0].expires_at, now, wall));
        let (back, errors) = decode_bindings("alice", &json, now, wall).unwrap_or_default();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(back.len(), 1);
        let (b, orig) = (&back[0], &bindings[0]);
        assert_eq!(b.uri_text, orig.uri_text);
        assert_eq!(b.display_name, orig.display_name);
        assert_eq!(b.params, orig.params);
        assert_eq!(b.services, ["echo", "video"]);
        assert_eq!(b.capacity, Some(3));
        assert_eq!((b.call_id.as_str(), b.cseq), ("c1@term", 7));
        assert_eq!(b.q_millis(), 500);
        let server = |b: &Binding| b.dynamic_server().map(|d| (d.uri, d.services, d.capacity));
        assert_eq!(server(b), server(orig));
        assert_eq!(b.source, None);
        // Millisecond precision.
        let drift = b.expires_at.max(orig.expires_at) - b.expires_at.min(orig.expires_at);
        assert!(drift < Duration::from_millis(1), "{drift:?}");
    }

    #[test]
    fn a_stored_contact_that_cannot_be_read_is_reported_and_the_rest_kept() {
        let json = r#"[{"contact":"<sip:a@127.0.0.1>","services":[],"capacity":null,"call_id":"x","cseq":1,"expires_ms":1},
                       {"contact":"not a contact <","services":[],"capacity":null,"call_id":"x","cseq":1,"expires_ms":1}]"#;
        let (back, errors) =
            decode_bindings("bob", json, Instant::now(), SystemTime::now()).unwrap_or_default();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].user, "bob");
        assert_eq!(errors.len(), 1);
        assert!(decode_bindings("bob", "{", Instant::now(), SystemTime::now()).is_err());
    }

    #[test]
    fn notes_read_back_and_a_strange_one_is_an_error() {
        let note = Note {
            node: "relay-a".to_owned(),
            what: Noted::Health {
                uri: "sip:echo@127.0.0.1:5090".to_owned(),
                up: false,
            },
        };
        let text = serde_json::to_string(&note).unwrap_or_default();
        assert_eq!(serde_json::from_str::<Note>(&text).ok(), Some(note));
        let text = r#"{"node":"b","kind":"bindings","user":"alice"}"#;
        assert_eq!(
            serde_json::from_str::<Note>(text).ok().map(|n| n.what),
            Some(Noted::Bindings {
                user: "alice".to_owned()
            })
        );
        let text = r#"{"node":"b","kind":"auth-failure","user":null,"source":"::1","weight":50}"#;
        assert_eq!(
            serde_json::from_str::<Note>(text).ok().map(|n| n.what),
            Some(Noted::AuthFailure {
                user: None,
                source: IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
                weight: 50
            })
        );
        assert!(serde_json::from_str::<Note>(r#"{"node":"b","kind":"sessions"}"#).is_err());
    }
}
