//! An event as the relay reads it from the outbox.

use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo, PgValueFormat, PgValueRef};
use sqlx::{Decode, Encode, Postgres, Type};
use uuid::Uuid;

/// One row of the outbox, ready to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    /// Place in the partition's order; assigned by the database at insert.
    pub position: i64,
    /// The event id consumers deduplicate on.
    pub id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    /// The JSON payload, as bytes, published unchanged.
    pub payload: Vec<u8>,
    /// A JSON object of string values, if the row has headers.
    pub headers: Option<Vec<u8>>,
    /// Per-row topic override.
    pub topic: Option<String>,
    /// Creation time, in milliseconds since the epoch.
    pub created_at_ms: i64,
}

/// JSON(B) read as its bytes, without parsing it into a tree: the relay
/// passes payloads through, so a parse per event would be wasted work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonBytes(pub Vec<u8>);

const JSONB_VERSION: u8 = 1;

impl Type<Postgres> for JsonBytes {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_name("jsonb")
    }
}

impl<'r> Decode<'r, Postgres> for JsonBytes {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        let bytes = value.as_bytes()?;
        match value.format() {
            PgValueFormat::Binary => match bytes.split_first() {
                Some((&JSONB_VERSION, json)) => Ok(JsonBytes(json.to_vec())),
                Some((v, _)) => Err(format!("unsupported jsonb format version {v}").into()),
                None => Err("empty jsonb value".into()),
            },
            PgValueFormat::Text => Ok(JsonBytes(bytes.to_vec())),
        }
    }
}

impl Encode<'_, Postgres> for JsonBytes {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        buf.push(JSONB_VERSION);
        buf.extend_from_slice(&self.0);
        Ok(IsNull::No)
    }
}

/// An event for tests of the relay: `position`, an id derived from it, the
/// given aggregate, an empty JSON payload.
pub fn test_event(position: i64, aggregate_id: &str) -> OutboxEvent {
    OutboxEvent {
        position,
        id: Uuid::from_u128(position as u128),
        aggregate_type: "test".into(),
        aggregate_id: aggregate_id.into(),
        event_type: "Test".into(),
        payload: b"{}".to_vec(),
        headers: None,
        topic: None,
        created_at_ms: 0,
    }
}
