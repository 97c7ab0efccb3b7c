//! Claiming a batch: the one statement that records "group G processed
//! these event ids" and says which of them are new. It runs inside the
//! consumer's transaction, so the record commits (or rolls back) with the
//! consumer's own writes.
//!
//! Why a duplicate cannot slip through:
//! - A copy already committed, in any segment, is found by the
//!   `not exists` over the whole partitioned table.
//! - A copy still in flight in another transaction (two consumers of a
//!   group racing during a hand-over) is invisible to that check, but it
//!   carries the same event time, so both rows go to the same segment
//!   with the same key: the second insert waits on the unique index for
//!   the first transaction, then does nothing if it committed (and
//!   inserts if it rolled back). Exactly one of the two applies.
//!
//! The race guarantee needs both copies to carry the same event time:
//! true for the engine's messages (CreateTime = the outbox row's
//! `created_at`, identical on every re-send). On a topic set to
//! LogAppendTime, or with times outside the segment window, two *racing*
//! copies can land in different segments; copies that do not overlap in
//! time are still caught by the `not exists`.

use std::collections::HashSet;

use sqlx::PgConnection;
use uuid::Uuid;

use crate::error::InboxError;
use crate::schema::check_identifier;

/// Where a stale-event check finds an event's order: its aggregate and
/// its position (the engine's `position` header). Positions come from one
/// sequence, so per aggregate with serialized writers they follow commit
/// order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderKey<'a> {
    pub aggregate_type: &'a str,
    pub aggregate_id: &'a str,
    pub position: i64,
}

/// What the inbox needs to know of a message.
pub trait InboxEvent {
    /// The event id (the `id` header).
    fn event_id(&self) -> Uuid;
    /// The event's time in epoch milliseconds (the Kafka message
    /// timestamp, CreateTime); `None` files it under the time of the
    /// claim, which loses the race guarantee for that event.
    fn event_time_ms(&self) -> Option<i64>;
    /// Aggregate and position, for [`Inbox::reject_stale`]; events without
    /// one are never stale.
    fn order_key(&self) -> Option<OrderKey<'_>> {
        None
    }
}

/// The inbox's verdict on one message of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// First time for this group: apply it.
    Apply,
    /// Already processed by this group (or earlier in the same batch).
    Duplicate,
    /// New, but older than an event already applied for its aggregate;
    /// recorded as processed, not to be applied (only with
    /// [`Inbox::reject_stale`]).
    Stale,
}

/// The verdicts of a batch, in the batch's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub verdicts: Vec<Verdict>,
}

impl Claim {
    pub fn count(&self, v: Verdict) -> usize {
        self.verdicts.iter().filter(|x| **x == v).count()
    }

    /// The messages to apply, in the batch's order.
    pub fn to_apply<'a, M>(&self, batch: &'a [M]) -> Vec<&'a M> {
        batch
            .iter()
            .zip(&self.verdicts)
            .filter(|(_, v)| **v == Verdict::Apply)
            .map(|(m, _)| m)
            .collect()
    }
}

/// An event time clamped into the segment window (so every event has a
/// segment; null window bounds leave it as is and make a missing
/// migration fail loudly instead of skipping events).
fn event_at(s: &str) -> String {
    format!(
        "least(greatest(coalesce(to_timestamp(e.at_ms::float8 / 1000), now()),
                        (select oldest from {s}.inbox_window)),
               (select newest from {s}.inbox_window) - interval '1 microsecond')"
    )
}

/// How the claim functions keep every lookup one index probe per event
/// and segment, whatever the statistics say. With a plan made while
/// today's segment was small (cached for the session, or made before
/// autovacuum analyzed the segment), PostgreSQL 15 turned `not exists`
/// into merge, hash or materialized nested-loop anti joins, and
/// `event_id = any(ids)` into a scan of the group, each reading every id
/// of the group for each batch (measured: 20-56 ms a batch at 30,000 to
/// 100,000 ids, growing with the table). `offset 0` keeps the `not
/// exists` a correlated subplan (a subquery with an offset is never
/// flattened into a join), and disabled sequential and bitmap scans make
/// its probes index scans. Disabled paths add a large constant to the
/// cost, which would trigger JIT compilation (about 150 ms a call,
/// measured), hence `jit = off`.
const CLAIM_SETTINGS: &str = "set jit = off set enable_seqscan = off set enable_bitmapscan = off";

/// The claim functions, created (or replaced) by `migrate`:
///
/// `inbox_claim(group, ids uuid[], event_times_ms int8[]) returns setof
/// uuid`: records the ids for the group and returns those that were new.
/// A null time files the event under `now()`.
///
/// `inbox_claim_stale(group, ids, times, aggregate_types text[],
/// aggregate_ids text[], positions int8[]) returns table (event_id uuid,
/// fresh boolean)`: the same claim, plus for each event whose position
/// is above the newest applied for its aggregate (and above those before
/// it in the batch) a row `(id, true)`; the claimed ids come as
/// `(id, null)`. Apply an event when it is both claimed and fresh. It
/// also moves each aggregate's newest position forward; `for update`
/// makes a consumer overlapping another on one aggregate wait and read
/// the position the other committed.
pub fn claim_functions_sql(s: &str) -> [String; 2] {
    let at = event_at(s);
    [
        format!(
            "create or replace function {s}.inbox_claim(
    p_group text, p_ids uuid[], p_at_ms int8[]) returns setof uuid
language plpgsql {CLAIM_SETTINGS} as $body$
begin
    return query
    insert into {s}.inbox as i (consumer_group, event_id, event_at)
    select p_group, e.id, {at}
      from unnest(p_ids, p_at_ms) as e(id, at_ms)
     where not exists (select 1 from {s}.inbox x
                        where x.consumer_group = p_group and x.event_id = e.id offset 0)
     order by e.id
    on conflict do nothing
    returning i.event_id;
end
$body$"
        ),
        format!(
            "create or replace function {s}.inbox_claim_stale(
    p_group text, p_ids uuid[], p_at_ms int8[],
    p_types text[], p_aggs text[], p_positions int8[])
returns table (event_id uuid, fresh boolean)
language plpgsql {CLAIM_SETTINGS} as $body$
#variable_conflict use_column
begin
    return query
    with input as (
        select e.id, {at} as at, e.agg_type, e.agg_id, e.pos,
               coalesce(e.pos > greatest(p.position, max(e.pos) over (
                   partition by e.agg_type, e.agg_id order by e.n
                   rows between unbounded preceding and 1 preceding)), true) as fresh
          from unnest(p_ids, p_at_ms, p_types, p_aggs, p_positions)
               with ordinality as e(id, at_ms, agg_type, agg_id, pos, n)
          left join lateral (
               select a.position from {s}.inbox_aggregates a
                where a.consumer_group = p_group
                  and a.aggregate_type = e.agg_type and a.aggregate_id = e.agg_id
                  for update) p on true
    ),
    claimed as (
        insert into {s}.inbox as i (consumer_group, event_id, event_at)
        select p_group, n.id, n.at from input n
         where not exists (select 1 from {s}.inbox x
                            where x.consumer_group = p_group and x.event_id = n.id offset 0)
         order by n.id
        on conflict do nothing
        returning i.event_id
    ),
    newest as (
        insert into {s}.inbox_aggregates as a
               (consumer_group, aggregate_type, aggregate_id, position, event_id)
        select distinct on (agg_type, agg_id) p_group, agg_type, agg_id, pos, id from input
         where fresh and pos is not null and agg_type is not null and agg_id is not null
         order by agg_type, agg_id, pos desc
        on conflict (consumer_group, aggregate_type, aggregate_id) do update
           set position = excluded.position, event_id = excluded.event_id, applied_at = now()
         where a.position < excluded.position
    )
    select c.event_id, null::boolean from claimed c
    union all
    select n.id, true from input n where n.fresh;
end
$body$"
        ),
    ]
}

/// The statement a consumer runs: `$1` group, `$2` ids, `$3` event
/// times (epoch ms, null = now); returns the ids that are new.
pub fn claim_sql(s: &str) -> String {
    format!("select event_id from {s}.inbox_claim($1, $2, $3) as c(event_id)")
}

/// As [`claim_sql`], plus `$4` aggregate types, `$5` aggregate ids, `$6`
/// positions (nulls: no order key): `(id, null)` for each claimed id,
/// `(id, true)` for each fresh one.
pub fn claim_stale_sql(s: &str) -> String {
    format!("select event_id, fresh from {s}.inbox_claim_stale($1, $2, $3, $4, $5, $6)")
}

/// The inbox of one consumer group.
#[derive(Debug, Clone)]
pub struct Inbox {
    schema: String,
    group: String,
    claim: String,
    claim_stale: Option<String>,
}

impl Inbox {
    /// The inbox in `schema` (migrated with [`crate::migrate`]) for
    /// `consumer_group`: use the Kafka group id, so every instance of
    /// the group shares the record.
    pub fn new(schema: &str, consumer_group: &str) -> Result<Inbox, InboxError> {
        check_identifier("schema", schema)?;
        if consumer_group.is_empty() {
            return Err(InboxError::Config {
                field: "consumer_group",
                reason: "must not be empty".into(),
            });
        }
        Ok(Inbox {
            schema: schema.to_string(),
            group: consumer_group.to_string(),
            claim: claim_sql(schema),
            claim_stale: None,
        })
    }

    /// Also reject events older than the newest applied for their
    /// aggregate (last-writer-wins consumers): they come back as
    /// [`Verdict::Stale`].
    pub fn reject_stale(mut self) -> Inbox {
        self.claim_stale = Some(claim_stale_sql(&self.schema));
        self
    }

    pub fn group(&self) -> &str {
        &self.group
    }

    /// Records the batch as processed by this group and says, per
    /// message, whether to apply it. One round trip. Must run inside the
    /// transaction that applies the messages: if that transaction rolls
    /// back, the record goes with it.
    pub async fn claim<M: InboxEvent>(
        &self,
        conn: &mut PgConnection,
        batch: &[M],
    ) -> Result<Claim, InboxError> {
        if batch.is_empty() {
            return Ok(Claim {
                verdicts: Vec::new(),
            });
        }
        let ids: Vec<Uuid> = batch.iter().map(InboxEvent::event_id).collect();
        let times: Vec<Option<i64>> = batch.iter().map(InboxEvent::event_time_ms).collect();
        // Ids the database calls new, and of those the ones to apply.
        let (new, fresh): (HashSet<Uuid>, HashSet<Uuid>) = match &self.claim_stale {
            None => {
                let new: HashSet<Uuid> = sqlx::query_scalar(&self.claim)
                    .bind(&self.group)
                    .bind(&ids)
                    .bind(&times)
                    .fetch_all(&mut *conn)
                    .await?
                    .into_iter()
                    .collect();
                (new.clone(), new)
            }
            Some(sql) => {
                let keys: Vec<Option<OrderKey<'_>>> =
                    batch.iter().map(InboxEvent::order_key).collect();
                let types: Vec<Option<&str>> =
                    keys.iter().map(|k| k.map(|k| k.aggregate_type)).collect();
                let aggs: Vec<Option<&str>> =
                    keys.iter().map(|k| k.map(|k| k.aggregate_id)).collect();
                let positions: Vec<Option<i64>> =
                    keys.iter().map(|k| k.map(|k| k.position)).collect();
                let rows: Vec<(Uuid, Option<bool>)> = sqlx::query_as(sql)
                    .bind(&self.group)
                    .bind(&ids)
                    .bind(&times)
                    .bind(&types)
                    .bind(&aggs)
                    .bind(&positions)
                    .fetch_all(&mut *conn)
                    .await?;
                let new = rows
                    .iter()
                    .filter(|(_, f)| f.is_none())
                    .map(|(id, _)| *id)
                    .collect();
                let fresh = rows
                    .iter()
                    .filter(|(_, f)| f.is_some())
                    .map(|(id, _)| *id)
                    .collect();
                (new, fresh)
            }
        };
        Ok(Claim {
            verdicts: verdicts(&ids, &new, &fresh),
        })
    }
}

/// Per message: the first copy of a new id is applied (or stale), every
/// other copy is a duplicate.
fn verdicts(ids: &[Uuid], new: &HashSet<Uuid>, fresh: &HashSet<Uuid>) -> Vec<Verdict> {
    let mut seen = HashSet::with_capacity(ids.len());
    ids.iter()
        .map(|id| {
            if !seen.insert(*id) || !new.contains(id) {
                Verdict::Duplicate
            } else if fresh.contains(id) {
                Verdict::Apply
            } else {
                Verdict::Stale
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_id_in_a_batch_is_applied_once() {
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let new: HashSet<Uuid> = [a, b].into();
        let fresh: HashSet<Uuid> = [a].into();
        assert_eq!(
            verdicts(&[a, c, a, b], &new, &fresh),
            vec![
                Verdict::Apply,
                Verdict::Duplicate,
                Verdict::Duplicate,
                Verdict::Stale
            ]
        );
    }

    #[test]
    fn bad_names_are_refused() {
        assert!(Inbox::new("Bad-Schema", "g").is_err());
        assert!(Inbox::new("public", "").is_err());
        assert!(Inbox::new("public", "g").is_ok());
    }
}
