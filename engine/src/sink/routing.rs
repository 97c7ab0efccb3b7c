//! How an outbox event maps to a message: topic, key and headers. Pure, so
//! every sink routes alike and the rules are tested without a broker.

use std::borrow::Cow;

use crate::config::is_valid_topic_chars;
use crate::error::SinkError;
use crate::event::OutboxEvent;

/// Header carrying the event id, for consumer-side deduplication.
pub const HEADER_ID: &str = "id";
pub const HEADER_EVENT_TYPE: &str = "event_type";
pub const HEADER_AGGREGATE_TYPE: &str = "aggregate_type";
/// Header carrying the outbox row's position (decimal): an order key per
/// aggregate, for consumers that reject stale events (last writer wins).
pub const HEADER_POSITION: &str = "position";

/// Longest topic name Kafka accepts.
pub const MAX_TOPIC_LEN: usize = 249;

/// The topic of an event: its own override, else `<prefix><aggregate_type>`
/// (Debezium's outbox convention with the default prefix `outbox.event.`).
pub fn topic<'a>(event: &'a OutboxEvent, prefix: &str) -> Cow<'a, str> {
    match &event.topic {
        Some(t) => Cow::Borrowed(t),
        None => Cow::Owned(format!("{prefix}{}", event.aggregate_type)),
    }
}

/// Whether `name` is the topic of `event` (as [`topic`] would say), without
/// building the name.
pub fn is_topic_of(event: &OutboxEvent, prefix: &str, name: &str) -> bool {
    match &event.topic {
        Some(t) => t == name,
        None => name
            .strip_prefix(prefix)
            .is_some_and(|rest| rest == event.aggregate_type),
    }
}

/// Whether Kafka would accept `name` as a topic.
pub fn check_topic(name: &str) -> Result<(), SinkError> {
    if name.is_empty() || name.len() > MAX_TOPIC_LEN || name == "." || name == ".." {
        return Err(SinkError::Permanent(format!(
            "invalid topic name {name:?}: must be 1-{MAX_TOPIC_LEN} characters and not . or .."
        )));
    }
    if !is_valid_topic_chars(name) {
        return Err(SinkError::Permanent(format!(
            "invalid topic name {name:?}: only letters, digits, '.', '_' and '-' are allowed"
        )));
    }
    Ok(())
}

/// Calls `f` with each message header of an event, in this order: `id`,
/// `event_type`, `aggregate_type`, `position`, then the row's own headers
/// in key order (jsonb keeps no other); row headers cannot override the
/// engine's four. The id and the position are formatted on the stack.
pub fn for_each_header(
    event: &OutboxEvent,
    mut f: impl FnMut(&str, &[u8]),
) -> Result<(), SinkError> {
    let mut id = [0u8; uuid::fmt::Hyphenated::LENGTH];
    f(
        HEADER_ID,
        event.id.hyphenated().encode_lower(&mut id).as_bytes(),
    );
    f(HEADER_EVENT_TYPE, event.event_type.as_bytes());
    f(HEADER_AGGREGATE_TYPE, event.aggregate_type.as_bytes());
    let mut position = itoa::Buffer::new();
    f(HEADER_POSITION, position.format(event.position).as_bytes());
    if let Some(raw) = &event.headers {
        let map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(raw)
            .map_err(|e| SinkError::Permanent(format!("headers are not a JSON object: {e}")))?;
        for (k, v) in &map {
            let serde_json::Value::String(v) = v else {
                return Err(SinkError::Permanent(format!(
                    "header {k:?} is not a string"
                )));
            };
            if !matches!(
                k.as_str(),
                HEADER_ID | HEADER_EVENT_TYPE | HEADER_AGGREGATE_TYPE | HEADER_POSITION
            ) {
                f(k, v.as_bytes());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    /// The headers `for_each_header` produces, collected.
    fn headers(event: &OutboxEvent) -> Result<Vec<(String, String)>, SinkError> {
        let mut out = Vec::new();
        for_each_header(event, |k, v| {
            out.push((k.to_string(), String::from_utf8_lossy(v).into_owned()))
        })?;
        Ok(out)
    }

    fn event() -> OutboxEvent {
        OutboxEvent {
            position: 1,
            id: Uuid::nil(),
            aggregate_type: "order".into(),
            aggregate_id: "42".into(),
            event_type: "OrderCreated".into(),
            payload: br#"{"total": 10}"#.to_vec(),
            headers: None,
            topic: None,
            created_at_ms: 0,
        }
    }

    #[test]
    fn default_topic_follows_the_debezium_convention() {
        assert_eq!(topic(&event(), "outbox.event."), "outbox.event.order");
        assert_eq!(topic(&event(), ""), "order");
    }

    #[test]
    fn is_topic_of_agrees_with_topic() {
        let mut e = event();
        assert!(is_topic_of(&e, "p.", "p.order"));
        assert!(!is_topic_of(&e, "p.", "p.orders"));
        assert!(!is_topic_of(&e, "p.", "order"));
        e.topic = Some("billing".into());
        assert!(is_topic_of(&e, "p.", "billing"));
        assert!(!is_topic_of(&e, "p.", "p.order"));
    }

    #[test]
    fn row_topic_overrides_the_prefix() {
        let mut e = event();
        e.topic = Some("billing".into());
        assert_eq!(topic(&e, "outbox.event."), "billing");
    }

    #[test]
    fn topic_names_are_checked() {
        assert!(check_topic("outbox.event.order").is_ok());
        assert!(check_topic("bad topic").is_err());
        assert!(check_topic("").is_err());
        assert!(check_topic("..").is_err());
        assert!(check_topic(&"x".repeat(250)).is_err());
        assert!(!check_topic("a/b").unwrap_err().is_retriable());
    }

    #[test]
    fn headers_carry_id_type_and_row_headers() {
        let mut e = event();
        e.headers = Some(
            br#"{"traceparent": "00-abc-01", "id": "spoof", "position": "0", "tenant": "t1"}"#
                .to_vec(),
        );
        let h = headers(&e).unwrap();
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            h,
            vec![
                ("id", "00000000-0000-0000-0000-000000000000"),
                ("event_type", "OrderCreated"),
                ("aggregate_type", "order"),
                ("position", "1"),
                ("tenant", "t1"),
                ("traceparent", "00-abc-01"),
            ]
        );
    }

    #[test]
    fn bad_headers_are_permanent_errors() {
        let mut e = event();
        e.headers = Some(br#"{"n": 1}"#.to_vec());
        assert!(!headers(&e).unwrap_err().is_retriable());
        e.headers = Some(br#"[1]"#.to_vec());
        assert!(!headers(&e).unwrap_err().is_retriable());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn any_event() -> impl Strategy<Value = OutboxEvent> {
            (
                any::<String>(),
                any::<String>(),
                any::<String>(),
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
                proptest::option::of(any::<String>()),
                proptest::option::of(proptest::collection::btree_map(
                    any::<String>(),
                    any::<String>(),
                    0..4,
                )),
                any::<i64>(),
            )
                .prop_map(
                    |(agg_type, agg_id, event_type, raw, topic, map, position)| {
                        OutboxEvent {
                            position,
                            id: Uuid::nil(),
                            aggregate_type: agg_type,
                            aggregate_id: agg_id,
                            event_type,
                            payload: b"{}".to_vec(),
                            // Either arbitrary bytes or a valid object of strings.
                            headers: map
                                .map(|m| serde_json::to_vec(&m).unwrap_or_default())
                                .or(raw),
                            topic,
                            created_at_ms: 0,
                        }
                    },
                )
        }

        proptest! {
            /// No row, however odd, makes the mapping panic; every refusal
            /// is permanent; valid header objects always pass through.
            #[test]
            fn mapping_never_panics(event in any_event(), prefix in "[a-z.]{0,8}") {
                let t = topic(&event, &prefix);
                if let Err(e) = check_topic(&t) {
                    prop_assert!(!e.is_retriable());
                }
                match headers(&event) {
                    Ok(h) => {
                        prop_assert!(h.len() >= 4);
                        prop_assert_eq!(h[0].0.as_str(), HEADER_ID);
                        prop_assert_eq!(h[3].0.as_str(), HEADER_POSITION);
                        prop_assert_eq!(h[3].1.parse::<i64>().ok(), Some(event.position));
                    }
                    Err(e) => prop_assert!(!e.is_retriable()),
                }
            }

            #[test]
            fn string_headers_always_map(map in proptest::collection::btree_map("[a-z]{1,8}", any::<String>(), 0..6)) {
                let mut e = event();
                e.headers = Some(serde_json::to_vec(&map).unwrap());
                let h = headers(&e).unwrap();
                let reserved = map.keys().filter(|k| matches!(k.as_str(), HEADER_ID | HEADER_EVENT_TYPE | HEADER_AGGREGATE_TYPE | HEADER_POSITION)).count();
                prop_assert_eq!(h.len(), 4 + map.len() - reserved);
            }

            #[test]
            fn legal_topic_names_are_accepted(name in "[a-zA-Z0-9._-]{1,249}") {
                prop_assume!(name != "." && name != "..");
                prop_assert!(check_topic(&name).is_ok());
            }
        }
    }
}
