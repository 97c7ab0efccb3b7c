//! The replication stream of the slot holder: `START_REPLICATION` on the
//! outbox's slot with `pgoutput`, every committed transaction's outbox
//! inserts decoded into events and handed to the [`Hub`], and the slot
//! confirmed as far as the hub allows (never past an event that is not on
//! the broker).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use pgwire_replication::{
    Lsn as WireLsn, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::cdc::hub::{Decoded, DecodedTx, Hub};
use crate::cdc::pgoutput::{self, Column, Message, Value};
use crate::cdc::slot::{lsn_text, SlotStore};
use crate::config::DatabaseUrl;
use crate::error::{ConfigError, StoreError};
use crate::event::OutboxEvent;
use crate::ops::metrics as m;

/// Why the stream ended.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("replication connection: {0}")]
    Wire(#[from] pgwire_replication::PgWireError),
    #[error(transparent)]
    Decode(#[from] pgoutput::DecodeError),
    #[error("outbox row in the stream: {0}")]
    Row(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the server ended the replication stream")]
    Ended,
}

/// Where and how to stream.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    pub url: DatabaseUrl,
    pub schema: String,
    pub status_interval: Duration,
    pub application_name: String,
    /// The outbox's partition count (the stream computes each event's).
    pub shards: u32,
}

/// The replication connection's settings from a `postgres://` URL.
pub fn replication_config(
    url: &DatabaseUrl,
    slot: &str,
    publication: &str,
) -> Result<ReplicationConfig, ConfigError> {
    let field = "cdc.database_url";
    let parsed = url::Url::parse(url.expose())
        .map_err(|e| ConfigError::new(field, format!("{url}: {e}")))?;
    let host = parsed.host_str().unwrap_or("localhost").to_owned();
    let user = match parsed.username() {
        "" => "postgres".to_owned(),
        u => percent_decode(u),
    };
    let password = parsed.password().map(percent_decode).unwrap_or_default();
    let database = parsed.path().trim_start_matches('/');
    let database = if database.is_empty() {
        user.clone()
    } else {
        percent_decode(database)
    };
    let mut tls = TlsConfig::disabled();
    for (k, v) in parsed.query_pairs() {
        if k == "sslmode" {
            tls = match v.as_ref() {
                "disable" | "allow" | "prefer" => TlsConfig::disabled(),
                "require" => TlsConfig::require(),
                "verify-ca" => TlsConfig::verify_ca(None),
                "verify-full" => TlsConfig::verify_full(None),
                other => {
                    return Err(ConfigError::new(
                        field,
                        format!("sslmode={other} is not one of disable, allow, prefer, require, verify-ca, verify-full"),
                    ))
                }
            };
        }
    }
    let cfg = ReplicationConfig::new(host, user, password, database, slot, publication)
        .with_port(parsed.port().unwrap_or(5432))
        .with_tls(tls)
        // Text values render the same whatever the server's defaults.
        .with_options("-c datestyle=ISO -c timezone=UTC -c extra_float_digits=3");
    Ok(cfg)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let Some(Ok(b)) = s.get(i + 1..i + 3).map(|h| u8::from_str_radix(h, 16)) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where each outbox column is in a relation's tuples.
#[derive(Debug, Clone)]
struct Layout {
    position: usize,
    id: usize,
    aggregate_type: usize,
    aggregate_id: usize,
    event_type: usize,
    payload: usize,
    headers: usize,
    topic: usize,
    created_at: usize,
    /// The generated `shard` column, if the stream carries it (PostgreSQL
    /// 15 does not publish generated columns; then it is computed).
    shard: Option<usize>,
    txid: usize,
}

impl Layout {
    /// The layout of an outbox segment of `schema`, or `None` for any other
    /// relation.
    fn of(schema: &str, namespace: &str, name: &str, columns: &[Column]) -> Option<Layout> {
        let ours = namespace == schema
            && (name == "outbox"
                || name
                    .strip_prefix("outbox_r")
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())));
        if !ours {
            return None;
        }
        let at = |col: &str| columns.iter().position(|c| c.name == col);
        Some(Layout {
            position: at("position")?,
            id: at("id")?,
            aggregate_type: at("aggregate_type")?,
            aggregate_id: at("aggregate_id")?,
            event_type: at("event_type")?,
            payload: at("payload")?,
            headers: at("headers")?,
            topic: at("topic")?,
            created_at: at("created_at")?,
            shard: at("shard"),
            txid: at("txid")?,
        })
    }

    fn decode(&self, tuple: &[Value], shards: u32) -> Result<Decoded, String> {
        let text = |i: usize, col: &str| -> Result<Option<&[u8]>, String> {
            match tuple.get(i) {
                Some(Value::Text(b)) => Ok(Some(b.as_slice())),
                Some(Value::Null) => Ok(None),
                Some(other) => Err(format!("column {col} arrived as {other:?}, not as text")),
                None => Err(format!("column {col} missing from the tuple")),
            }
        };
        let required = |i: usize, col: &str| -> Result<&[u8], String> {
            text(i, col)?.ok_or_else(|| format!("column {col} is null"))
        };
        let string = |i: usize, col: &str| -> Result<String, String> {
            String::from_utf8(required(i, col)?.to_vec()).map_err(|e| format!("{col}: {e}"))
        };
        let number = |i: usize, col: &str| -> Result<i64, String> {
            let s = string(i, col)?;
            i64::from_str(&s).map_err(|e| format!("{col} = {s:?}: {e}"))
        };
        let txid = {
            let s = string(self.txid, "txid")?;
            u64::from_str(&s).map_err(|e| format!("txid = {s:?}: {e}"))?
        };
        let id = {
            let s = string(self.id, "id")?;
            Uuid::parse_str(&s).map_err(|e| format!("id = {s:?}: {e}"))?
        };
        let created = string(self.created_at, "created_at")?;
        let event = OutboxEvent {
            position: number(self.position, "position")?,
            id,
            aggregate_type: string(self.aggregate_type, "aggregate_type")?,
            aggregate_id: string(self.aggregate_id, "aggregate_id")?,
            event_type: string(self.event_type, "event_type")?,
            payload: required(self.payload, "payload")?.to_vec(),
            headers: text(self.headers, "headers")?.map(<[u8]>::to_vec),
            topic: text(self.topic, "topic")?
                .map(|b| String::from_utf8(b.to_vec()).map_err(|e| format!("topic: {e}")))
                .transpose()?,
            created_at_ms: timestamp_ms(&created)
                .ok_or_else(|| format!("created_at = {created:?} is not an ISO timestamp"))?,
        };
        let shard = match self.shard {
            Some(i) => {
                let s = number(i, "shard")?;
                u32::try_from(s).map_err(|_| format!("shard = {s}"))?
            }
            None => crate::cdc::shard::shard_of(&event.aggregate_id, shards),
        };
        Ok(Decoded { shard, txid, event })
    }
}

/// Milliseconds since the epoch of a `timestamptz` in ISO style with a
/// UTC offset: `2026-12-01 14:11:10.123456+00`.
pub fn timestamp_ms(text: &str) -> Option<i64> {
    let (date, rest) = text.split_once(' ')?;
    let mut d = date.splitn(3, '-');
    let year: i64 = d.next()?.parse().ok()?;
    let month: i64 = d.next()?.parse().ok()?;
    let day: i64 = d.next()?.parse().ok()?;
    // The offset starts at the last '+' or '-' of the time part.
    let split = rest.rfind(['+', '-'])?;
    let (time, offset) = rest.split_at(split);
    let mut t = time.splitn(3, ':');
    let hour: i64 = t.next()?.parse().ok()?;
    let minute: i64 = t.next()?.parse().ok()?;
    let sec_text = t.next()?;
    let (secs, frac) = sec_text.split_once('.').unwrap_or((sec_text, ""));
    let second: i64 = secs.parse().ok()?;
    let millis: i64 = if frac.is_empty() {
        0
    } else {
        let f: String = frac.chars().chain("000".chars()).take(3).collect();
        f.parse().ok()?
    };
    let sign = if offset.starts_with('-') { -1 } else { 1 };
    let mut o = offset[1..].splitn(3, ':');
    let off_h: i64 = o.next()?.parse().ok()?;
    let off_m: i64 = o.next().map_or(Some(0), |m| m.parse().ok())?;
    let valid = (1..=12).contains(&month)
        && (1..=31).contains(&day)
        && (0..24).contains(&hour)
        && (0..60).contains(&minute)
        && (0..61).contains(&second);
    if !valid {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let utc = ((days * 24 + hour) * 60 + minute) * 60 + second - sign * (off_h * 3600 + off_m * 60);
    Some(utc * 1000 + millis)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Microseconds between 1970-01-01 and PostgreSQL's epoch, 2000-01-01.
const PG_EPOCH_US: i64 = 946_684_800_000_000;

/// Seconds from a PostgreSQL timestamp (µs since 2000-01-01) to now.
pub fn seconds_since_pg_epoch(us: i64) -> f64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64);
    ((now - PG_EPOCH_US - us) as f64 / 1e6).max(0.0)
}

/// A transaction being decoded.
struct Open {
    events: Vec<Decoded>,
}

/// Streams until `stop` or an error. Starts at the slot's confirmed
/// position, with the hub's queues rebuilt from the marks.
pub async fn run(
    spec: &StreamSpec,
    store: &SlotStore,
    hub: &Arc<Hub>,
    stop: CancellationToken,
) -> Result<(), StreamError> {
    let Some(state) = store.state().await? else {
        return Err(
            StoreError::Schema(format!("replication slot {} does not exist", store.slot)).into(),
        );
    };
    let confirmed = state.confirmed_flush;
    let streaming = store.streaming_marks().await?;
    let mut cfg = replication_config(&spec.url, &store.slot, &store.publication)
        .map_err(StoreError::from)?
        .with_start_lsn(WireLsn(confirmed))
        .with_ack_lsn(WireLsn(confirmed))
        .with_status_interval(spec.status_interval)
        .with_wakeup_interval(Duration::from_secs(2))
        .with_application_name(spec.application_name.clone());
    cfg.buffer_events = 8192;
    let mut client = ReplicationClient::connect(cfg).await?;
    client.wait_started().await?;
    let generation = hub.restart(confirmed, streaming);
    tracing::info!(slot = %store.slot, from = %lsn_text(confirmed), generation, "replication stream started");
    let result = pump(spec, hub, &mut client, confirmed, stop).await;
    hub.stop();
    client.stop();
    let _ = tokio::time::timeout(Duration::from_secs(5), client.shutdown()).await;
    result
}

async fn pump(
    spec: &StreamSpec,
    hub: &Arc<Hub>,
    client: &mut ReplicationClient,
    confirmed: u64,
    stop: CancellationToken,
) -> Result<(), StreamError> {
    let mut relations: HashMap<u32, Option<Layout>> = HashMap::new();
    let mut open: Option<Open> = None;
    let mut reported = confirmed;
    let heartbeat_prefix = format!("outbox.heartbeat.{}", spec.schema);
    let mut tick = tokio::time::interval(spec.status_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let events_total = metrics::counter!(m::CDC_EVENTS_TOTAL);
    let received = metrics::gauge!(m::CDC_RECEIVED_LSN);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(()),
            _ = hub.wait_for_room() => {}
        }
        let event = tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(()),
            _ = tick.tick() => None,
            e = client.recv() => Some(e?.ok_or(StreamError::Ended)?),
        };
        match event {
            None => {}
            Some(ReplicationEvent::Begin { .. }) => {
                open = Some(Open { events: Vec::new() });
            }
            Some(ReplicationEvent::XLogData { data, wal_end, .. }) => {
                received.set(wal_end.0 as f64);
                hub.set_received(wal_end.0);
                match pgoutput::decode(&data)? {
                    Message::Relation {
                        id,
                        namespace,
                        name,
                        columns,
                        ..
                    } => {
                        let layout = Layout::of(&spec.schema, &namespace, &name, &columns);
                        if layout.is_none()
                            && namespace == spec.schema
                            && name.starts_with("outbox")
                        {
                            tracing::error!(relation = %name, "an outbox relation in the stream lacks the outbox's columns; its rows are not relayed by CDC");
                        }
                        relations.insert(id, layout);
                    }
                    Message::Insert { relation, tuple } => {
                        if let (Some(Some(layout)), Some(tx)) =
                            (relations.get(&relation), open.as_mut())
                        {
                            tx.events.push(
                                layout
                                    .decode(&tuple, spec.shards)
                                    .map_err(StreamError::Row)?,
                            );
                        }
                    }
                    _ => {}
                }
            }
            Some(ReplicationEvent::Commit {
                lsn,
                end_lsn,
                commit_time_micros,
            }) => {
                let events = open.take().map(|o| o.events).unwrap_or_default();
                let n = events.len();
                hub.commit(DecodedTx {
                    commit_lsn: lsn.0,
                    end_lsn: end_lsn.0,
                    commit_us: commit_time_micros,
                    events,
                });
                metrics::gauge!(m::CDC_RECEIVED_LAG_SECONDS)
                    .set(seconds_since_pg_epoch(commit_time_micros));
                events_total.increment(n as u64);
                received.set(end_lsn.0 as f64);
                hub.set_received(end_lsn.0);
            }
            // Between transactions, a keepalive or our heartbeat says how
            // far decoding got: with nothing in flight, that far is done.
            Some(ReplicationEvent::KeepAlive { wal_end, .. }) if open.is_none() => {
                hub.idle_at(wal_end.0);
            }
            Some(ReplicationEvent::Message {
                transactional: false,
                lsn,
                prefix,
                ..
            }) if open.is_none() && prefix == heartbeat_prefix => {
                hub.idle_at(lsn.0);
            }
            Some(ReplicationEvent::KeepAlive { .. } | ReplicationEvent::Message { .. }) => {}
            Some(ReplicationEvent::StoppedAt { .. }) => return Ok(()),
        }
        let c = hub.confirmable();
        if c > reported {
            client.update_applied_lsn(WireLsn(c));
            reported = c;
            metrics::gauge!(m::CDC_CONFIRMED_LSN).set(c as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_timestamps_in_utc_become_epoch_millis() {
        assert_eq!(timestamp_ms("1970-01-01 00:00:00+00"), Some(0));
        assert_eq!(timestamp_ms("1970-01-01 00:00:01.5+00"), Some(1500));
        assert_eq!(
            timestamp_ms("2026-12-01 14:11:10.123456+00"),
            Some(1_796_134_270_123)
        );
        assert_eq!(
            timestamp_ms("2026-12-01 16:11:10.123+02"),
            Some(1_796_134_270_123)
        );
        assert_eq!(
            timestamp_ms("2000-02-29 00:00:00-05:30"),
            Some(951_802_200_000)
        );
        for bad in [
            "",
            "2026-12-01",
            "2026-13-01 00:00:00+00",
            "x 00:00:00+00",
            "2026-12-01 25:00:00+00",
        ] {
            assert_eq!(timestamp_ms(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn only_the_outbox_segments_of_the_schema_are_decoded() {
        let cols: Vec<Column> = [
            "position",
            "id",
            "aggregate_type",
            "aggregate_id",
            "event_type",
            "payload",
            "headers",
            "topic",
            "created_at",
            "shard",
            "txid",
        ]
        .iter()
        .map(|n| Column {
            key: false,
            name: (*n).into(),
            type_oid: 25,
            type_modifier: -1,
        })
        .collect();
        assert!(Layout::of("app", "app", "outbox_r3", &cols).is_some());
        assert!(Layout::of("app", "app", "outbox", &cols).is_some());
        assert!(Layout::of("app", "other", "outbox_r3", &cols).is_none());
        assert!(Layout::of("app", "app", "outbox_leases", &cols).is_none());
        assert!(Layout::of("app", "app", "outbox_r", &cols).is_none());
        assert!(Layout::of("app", "app", "outbox_r1", &cols[1..]).is_none());
        let layout = Layout::of("app", "app", "outbox_r0", &cols).expect("layout");
        let t = |s: &str| Value::Text(s.as_bytes().to_vec());
        let tuple = vec![
            t("7"),
            t("0190d6a4-0000-7000-8000-000000000001"),
            t("order"),
            t("o-1"),
            t("Created"),
            t("{\"a\": 1}"),
            Value::Null,
            Value::Null,
            t("1970-01-01 00:00:01+00"),
            t("3"),
            t("1234"),
        ];
        let d = layout.decode(&tuple, 16).expect("decoded");
        assert_eq!((d.shard, d.txid, d.event.position), (3, 1234, 7));
        let without_shard = Layout::of(
            "app",
            "app",
            "outbox_r0",
            &[&cols[..9], &cols[10..]].concat(),
        )
        .expect("a layout without the generated column");
        let mut short = tuple.clone();
        short.remove(9);
        let d = without_shard.decode(&short, 16).expect("decoded");
        assert_eq!(d.shard, crate::cdc::shard::shard_of("o-1", 16));
        assert_eq!(d.event.created_at_ms, 1000);
        assert_eq!(d.event.payload, b"{\"a\": 1}");
        let mut broken = tuple.clone();
        broken[0] = Value::Null;
        assert!(layout.decode(&broken, 16).unwrap_err().contains("position"));
        broken = tuple.clone();
        broken[10] = t("x");
        assert!(layout.decode(&broken, 16).unwrap_err().contains("txid"));
        assert!(layout.decode(&tuple[..5], 16).is_err());
    }

    #[test]
    fn replication_settings_come_from_the_url() {
        let url = DatabaseUrl::new("postgres://app:s%40cret@db.example:6543/shop?sslmode=require");
        let cfg = replication_config(&url, "slot", "pub").expect("config");
        assert_eq!(cfg.host, "db.example");
        assert_eq!(cfg.port, 6543);
        assert_eq!(cfg.user, "app");
        assert_eq!(cfg.password, "s@cret");
        assert_eq!(cfg.database, "shop");
        assert!(cfg.tls.mode.requires_tls());
        let bad = DatabaseUrl::new("postgres://h/db?sslmode=sometimes");
        assert!(replication_config(&bad, "s", "p").is_err());
    }
}
