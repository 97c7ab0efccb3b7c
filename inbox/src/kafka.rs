//! Reading the engine's messages from rdkafka and the consumer loop that
//! commits Kafka offsets only after the database transaction (feature
//! `kafka`).
//!
//! Order of a batch: poll, then [`Inbox::process`] (claim, handler,
//! commit of the database transaction), then the offsets. A crash between
//! the two commits re-reads the batch on restart; the inbox recognises
//! every message of it as a duplicate. Offsets are committed
//! asynchronously (librdkafka keeps them in order); at shutdown, once
//! synchronously.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};
use sqlx::PgPool;
use tracing::{info, warn};
use uuid::Uuid;

use crate::claim::{Inbox, InboxEvent, OrderKey};
use crate::error::{InboxError, ProcessError};
use crate::process::{Handler, Processed};

/// An event as the engine publishes it (README, "What arrives on Kafka").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: Uuid,
    /// Message timestamp, epoch ms (the outbox row's `created_at`).
    pub timestamp_ms: Option<i64>,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The message key: the aggregate id.
    pub key: Option<String>,
    pub aggregate_type: Option<String>,
    pub event_type: Option<String>,
    /// The outbox row's position (`position` header).
    pub position: Option<i64>,
    pub payload: Vec<u8>,
}

impl Event {
    /// Reads the headers the engine sets; fails without a valid `id`.
    pub fn from_message<M: Message>(m: &M) -> Result<Event, InboxError> {
        let malformed = |reason: String| InboxError::Malformed {
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            reason,
        };
        let mut id = None;
        let mut aggregate_type = None;
        let mut event_type = None;
        let mut position = None;
        if let Some(headers) = m.headers() {
            for h in headers.iter() {
                let Some(v) = h.value.and_then(|v| std::str::from_utf8(v).ok()) else {
                    continue;
                };
                match h.key {
                    "id" => {
                        id = Some(
                            Uuid::parse_str(v)
                                .map_err(|e| malformed(format!("id header {v:?}: {e}")))?,
                        )
                    }
                    "aggregate_type" => aggregate_type = Some(v.to_string()),
                    "event_type" => event_type = Some(v.to_string()),
                    "position" => {
                        position = Some(
                            v.parse::<i64>()
                                .map_err(|e| malformed(format!("position header {v:?}: {e}")))?,
                        )
                    }
                    _ => {}
                }
            }
        }
        let id = id.ok_or_else(|| malformed("no id header".into()))?;
        Ok(Event {
            id,
            timestamp_ms: m.timestamp().to_millis(),
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            aggregate_type,
            event_type,
            position,
            payload: m.payload().unwrap_or_default().to_vec(),
        })
    }
}

impl InboxEvent for Event {
    fn event_id(&self) -> Uuid {
        self.id
    }

    fn event_time_ms(&self) -> Option<i64> {
        self.timestamp_ms
    }

    fn order_key(&self) -> Option<OrderKey<'_>> {
        Some(OrderKey {
            aggregate_type: self.aggregate_type.as_deref().unwrap_or(&self.topic),
            aggregate_id: self.key.as_deref()?,
            position: self.position?,
        })
    }
}

/// The next offset to read per partition, from what was polled.
#[derive(Debug, Clone, Default)]
pub struct Offsets {
    next: HashMap<(String, i32), i64>,
}

impl Offsets {
    pub fn note(&mut self, topic: &str, partition: i32, offset: i64) {
        let next = self.next.entry((topic.to_string(), partition)).or_default();
        *next = (*next).max(offset + 1);
    }

    pub fn is_empty(&self) -> bool {
        self.next.is_empty()
    }

    pub fn merge(&mut self, other: &Offsets) {
        for ((t, p), o) in &other.next {
            self.note(t, *p, o - 1);
        }
    }

    /// The list to commit: each partition's next offset.
    pub fn to_list(&self) -> Result<TopicPartitionList, InboxError> {
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in &self.next {
            tpl.add_partition_offset(t, *p, Offset::Offset(*o))?;
        }
        Ok(tpl)
    }
}

/// A consumer with its partitions assigned at the group's committed
/// offsets, checking where each partition resumes.
///
/// The check: the first message read of a partition must be at or below
/// its committed offset. A broker that answers a fetch from inside a
/// record batch with the *next* batch (tansu 0.6.0 does: assigned at
/// offset 1 of a 1,000-message batch, the first message it returned was
/// offset 1,000) would silently skip the rest of that batch. On a gap the
/// reader drops what it read, seeks back (1,000 offsets, then doubling,
/// finally to the beginning) and resumes once it is at or below the
/// committed offset; the inbox recognises the re-read messages. Apache
/// Kafka returns the containing batch and the check never fires (it can
/// on offsets left out by compaction or transaction markers, costing a
/// re-read, never a loss).
pub struct Reader {
    consumer: StreamConsumer,
    resume: HashMap<(String, i32), Resume>,
    /// Partitions rewound because of a gap, for tests and logs.
    pub rewinds: u64,
}

/// A partition not yet read at or below `committed`; the next rewind goes
/// `back` further, or nowhere once at the beginning. Dropped from the
/// reader once the partition has resumed.
#[derive(Debug, Clone, Copy)]
struct Resume {
    committed: i64,
    back: i64,
    at_beginning: bool,
}

/// The first rewind after a gap, in offsets.
const FIRST_REWIND: i64 = 1_000;

impl Reader {
    /// Assigns `partitions` of `topic`, starting at the group's committed
    /// offsets (`auto.offset.reset` decides where a partition without one
    /// starts). Assigning instead of subscribing hands partitions over
    /// explicitly, without a group join. Blocks for the committed offsets
    /// (up to `timeout`).
    pub fn assign(
        consumer: StreamConsumer,
        topic: &str,
        partitions: &[i32],
        timeout: Duration,
    ) -> Result<Reader, InboxError> {
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            tpl.add_partition(topic, *p);
        }
        let committed = consumer.committed_offsets(tpl.clone(), timeout)?;
        let mut resume = HashMap::new();
        for e in committed.elements() {
            if let Offset::Offset(o) = e.offset() {
                resume.insert(
                    (e.topic().to_string(), e.partition()),
                    Resume {
                        committed: o,
                        back: FIRST_REWIND,
                        at_beginning: false,
                    },
                );
            }
        }
        for p in partitions {
            tpl.set_partition_offset(topic, *p, Offset::Stored)?;
        }
        consumer.assign(&tpl)?;
        Ok(Reader {
            consumer,
            resume,
            rewinds: 0,
        })
    }

    pub fn consumer(&self) -> &StreamConsumer {
        &self.consumer
    }

    /// Waits for a first message, then takes what arrives within
    /// `max_wait`, up to `max_messages`.
    pub async fn next_batch(&mut self, opts: BatchOptions) -> Result<Batch, InboxError> {
        let mut batch = Batch::default();
        let deadline = loop {
            let first = self.consumer.recv().await?;
            if admit(&self.consumer, &mut self.resume, &mut self.rewinds, &first)? {
                take(&mut batch, &first);
                break tokio::time::Instant::now() + opts.max_wait;
            }
        };
        while batch.events.len() + batch.malformed < opts.max_messages {
            match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Ok(Ok(m)) => {
                    if admit(&self.consumer, &mut self.resume, &mut self.rewinds, &m)? {
                        take(&mut batch, &m);
                    }
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => break,
            }
        }
        Ok(batch)
    }

    /// Commits `offsets` (each partition's next offset to read).
    pub fn commit(&self, offsets: &Offsets, mode: CommitMode) -> Result<(), InboxError> {
        if offsets.is_empty() {
            return Ok(());
        }
        self.consumer.commit(&offsets.to_list()?, mode)?;
        Ok(())
    }
}

/// Whether a [`Reader`] takes `message`; on a gap, seeks back. On the
/// reader's fields: the consumer stays borrowed by the message being
/// admitted. Once every partition has resumed, `resume` is empty and a
/// message costs no lookup.
fn admit(
    consumer: &StreamConsumer,
    resume: &mut HashMap<(String, i32), Resume>,
    rewinds: &mut u64,
    message: &impl Message,
) -> Result<bool, InboxError> {
    if resume.is_empty() {
        return Ok(true);
    }
    let (topic, partition, offset) = (message.topic(), message.partition(), message.offset());
    let key = (topic.to_string(), partition);
    let Some(state) = resume.get_mut(&key) else {
        return Ok(true);
    };
    let Resume {
        committed,
        back,
        at_beginning,
    } = *state;
    if offset <= committed {
        resume.remove(&key);
        return Ok(true);
    }
    if !at_beginning {
        let target = committed - back;
        let (to, at_beginning) = if target <= 0 {
            (Offset::Beginning, true)
        } else {
            (Offset::Offset(target), false)
        };
        warn!(
            topic,
            partition,
            committed,
            first_read = offset,
            rewind_to = ?to,
            "resumed past the committed offset: rewinding"
        );
        consumer.seek(topic, partition, to, Duration::from_secs(10))?;
        *rewinds += 1;
        *state = Resume {
            committed,
            back: back.saturating_mul(2),
            at_beginning,
        };
    }
    Ok(false)
}

/// How batches are cut.
#[derive(Debug, Clone, Copy)]
pub struct BatchOptions {
    /// Most messages in one transaction.
    pub max_messages: usize,
    /// Longest wait for a batch to fill once it has a message.
    pub max_wait: Duration,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions {
            max_messages: 500,
            max_wait: Duration::from_millis(50),
        }
    }
}

/// Polled messages: the readable events and the offsets they cover
/// (including unreadable ones, which are logged and skipped).
#[derive(Debug, Default)]
pub struct Batch {
    pub events: Vec<Event>,
    pub malformed: usize,
    pub offsets: Offsets,
}

fn take<M: Message>(batch: &mut Batch, m: &M) {
    batch.offsets.note(m.topic(), m.partition(), m.offset());
    match Event::from_message(m) {
        Ok(e) => batch.events.push(e),
        Err(e) => {
            warn!(error = %e, "skipping a message the inbox cannot read");
            batch.malformed += 1;
        }
    }
}

/// The consumer loop: batch, process through the inbox (retrying
/// retriable failures with backoff), then commit the batch's offsets;
/// until `shutdown` resolves, then one synchronous commit. Returns the
/// totals. A handler error is fatal: the batch was rolled back and its
/// offsets are not committed.
pub async fn run<H>(
    reader: &mut Reader,
    pool: &PgPool,
    inbox: &Inbox,
    handler: &mut H,
    opts: BatchOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<Processed, ProcessError<H::Error>>
where
    H: Handler<Event>,
{
    let mut total = Processed::default();
    let mut committed = Offsets::default();
    tokio::pin!(shutdown);
    loop {
        let batch = tokio::select! {
            _ = &mut shutdown => break,
            b = reader.next_batch(opts) => b?,
        };
        let mut backoff = Duration::from_millis(100);
        let done = loop {
            match inbox.process(pool, &batch.events, handler).await {
                Ok(done) => break done,
                Err(e) if e.is_retriable() => {
                    warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "inbox batch failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(3));
                }
                Err(e) => return Err(e),
            }
        };
        total.add(done);
        // Only now: the batch's effects are durable.
        reader.commit(&batch.offsets, CommitMode::Async)?;
        committed.merge(&batch.offsets);
    }
    reader.commit(&committed, CommitMode::Sync)?;
    info!(
        group = inbox.group(),
        applied = total.applied,
        duplicates = total.duplicates,
        stale = total.stale,
        "consumer stopped"
    );
    Ok(total)
}
