//! The typed API for Rust applications: enqueue many events in one round
//! trip, inside the caller's transaction.
//!
//! ```no_run
//! # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! use outbox_engine::{Enqueuer, NewEvent};
//! let outbox = Enqueuer::new("public")?;
//! let mut tx = pool.begin().await?;
//! sqlx::query("update orders set status = 'paid' where id = 42").execute(&mut *tx).await?;
//! outbox
//!     .enqueue(&mut tx, &[NewEvent::new("order", "42", "OrderPaid", &serde_json::json!({"total": 10}))?])
//!     .await?;
//! tx.commit().await?;
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;

use serde::Serialize;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::config::validate_identifier;
use crate::error::ConfigError;

/// An event to enqueue.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// The event id; a time-ordered UUIDv7 unless set.
    pub id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    /// The payload as JSON text.
    pub payload: String,
    pub headers: BTreeMap<String, String>,
    /// Publish to this topic instead of `<prefix><aggregate_type>`.
    pub topic: Option<String>,
}

impl NewEvent {
    /// An event with `payload` serialized to JSON.
    pub fn new(
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        payload: &impl Serialize,
    ) -> Result<Self, serde_json::Error> {
        Ok(Self::from_json(
            aggregate_type,
            aggregate_id,
            event_type,
            serde_json::to_string(payload)?,
        ))
    }

    /// An event whose payload is already JSON text (checked by the database).
    pub fn from_json(
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        payload_json: String,
    ) -> Self {
        Self {
            id: Uuid::now_v7(),
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            event_type: event_type.into(),
            payload: payload_json,
            headers: BTreeMap::new(),
            topic: None,
        }
    }

    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key.into(), value.into());
        self
    }

    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }

    pub fn id(mut self, id: Uuid) -> Self {
        self.id = id;
        self
    }
}

/// Inserts events into the outbox of one schema.
#[derive(Debug, Clone)]
pub struct Enqueuer {
    sql: String,
}

impl Enqueuer {
    pub fn new(schema: &str) -> Result<Self, ConfigError> {
        validate_identifier("schema", schema)?;
        // Arrays, one round trip for the whole slice; `with ordinality`
        // keeps positions in slice order.
        let sql = format!(
            "insert into {schema}.outbox
                (id, aggregate_type, aggregate_id, event_type, payload, headers, topic)
             select id, aggregate_type, aggregate_id, event_type, payload::jsonb, headers::jsonb, topic
               from unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[])
                    with ordinality
                    as e(id, aggregate_type, aggregate_id, event_type, payload, headers, topic, n)
              order by n"
        );
        Ok(Self { sql })
    }

    /// Enqueues `events` in the caller's transaction (or connection), in order.
    pub async fn enqueue(
        &self,
        conn: &mut PgConnection,
        events: &[NewEvent],
    ) -> Result<(), sqlx::Error> {
        if events.is_empty() {
            return Ok(());
        }
        let n = events.len();
        let mut ids = Vec::with_capacity(n);
        let mut types = Vec::with_capacity(n);
        let mut agg_ids = Vec::with_capacity(n);
        let mut event_types = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        let mut headers = Vec::with_capacity(n);
        let mut topics = Vec::with_capacity(n);
        for e in events {
            ids.push(e.id);
            types.push(e.aggregate_type.as_str());
            agg_ids.push(e.aggregate_id.as_str());
            event_types.push(e.event_type.as_str());
            payloads.push(e.payload.as_str());
            headers.push(if e.headers.is_empty() {
                None
            } else {
                Some(
                    serde_json::to_string(&e.headers)
                        .map_err(|err| sqlx::Error::Encode(err.into()))?,
                )
            });
            topics.push(e.topic.as_deref());
        }
        sqlx::query(&self.sql)
            .bind(&ids)
            .bind(&types)
            .bind(&agg_ids)
            .bind(&event_types)
            .bind(&payloads)
            .bind(&headers)
            .bind(&topics)
            .execute(conn)
            .await?;
        Ok(())
    }
}
