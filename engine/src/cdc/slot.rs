//! The database side of CDC: the publication and the replication slot, the
//! slot's lease (one reader at a time, fenced by an epoch like the
//! partitions' leases), the slot's health, the marks of CDC partitions, and
//! the recovery from a lost slot. Plain SQL on the engine's pool; the
//! stream itself is [`crate::cdc::stream`].

use std::time::Duration;

use sqlx::postgres::PgPool;
use sqlx::Row;

use crate::cdc::hub::Covered;
use crate::cdc::snapshot::Snapshot;
use crate::cluster::Member;
use crate::config::validate_identifier;
use crate::error::StoreError;
use crate::relay::Claim;
use crate::store::leases::TAKEOVER_MARGIN;
use crate::store::Names;

/// The replication slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotState {
    pub confirmed_flush: u64,
    pub restart: u64,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: String,
    pub active_pid: Option<i32>,
    /// `pg_current_wal_lsn()` when it was read.
    pub current: u64,
}

impl SlotState {
    /// The slot cannot stream what it should any more.
    pub fn is_lost(&self) -> bool {
        self.wal_status == "lost"
    }
}

/// Parses `pg_lsn` text (`16/B374D848`).
pub fn parse_lsn(text: &str) -> Result<u64, StoreError> {
    let bad = || StoreError::Schema(format!("not a pg_lsn: {text:?}"));
    let (hi, lo) = text.split_once('/').ok_or_else(bad)?;
    let hi = u64::from_str_radix(hi, 16).map_err(|_| bad())?;
    let lo = u64::from_str_radix(lo, 16).map_err(|_| bad())?;
    if hi > u32::MAX as u64 || lo > u32::MAX as u64 {
        return Err(bad());
    }
    Ok(hi << 32 | lo)
}

/// `pg_lsn` text of `lsn`.
pub fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// The server cannot decode logical changes: names the setting.
pub async fn require_logical(pool: &PgPool) -> Result<(), StoreError> {
    let level: String = sqlx::query_scalar("select current_setting('wal_level')")
        .fetch_one(pool)
        .await?;
    if level == "logical" {
        Ok(())
    } else {
        Err(StoreError::Schema(format!(
            "the CDC source needs wal_level = logical, and this server has wal_level = {level} \
             (set it in postgresql.conf and restart PostgreSQL, or run with --source poll)"
        )))
    }
}

/// A partition's polling mark as stored: everything `lo` sees, and of what
/// `hi` adds, everything up to (`pos`, `id`).
#[derive(Debug, Clone)]
pub struct PollMark {
    pub lo: String,
    pub hi: Option<String>,
    pub pos: Option<i64>,
    pub id: Option<uuid::Uuid>,
}

impl PollMark {
    /// What the mark covers, for the hub.
    pub fn covered(&self) -> Result<Covered, StoreError> {
        let parse = |s: &str| Snapshot::parse(s).map_err(|e| StoreError::Schema(e.to_string()));
        let window = match (&self.hi, self.pos, self.id) {
            (Some(hi), Some(pos), Some(id)) => Some((parse(hi)?, (pos, id))),
            _ => None,
        };
        Ok(Covered {
            snapshot: Some(parse(&self.lo)?),
            window,
            upto: None,
        })
    }
}

/// The slot, publication and marks of one outbox.
#[derive(Clone)]
pub struct SlotStore {
    pool: PgPool,
    names: Names,
    pub slot: String,
    pub publication: String,
}

impl SlotStore {
    pub fn new(
        pool: PgPool,
        names: &Names,
        slot: &str,
        publication: &str,
    ) -> Result<Self, StoreError> {
        validate_identifier("cdc.slot", slot)?;
        validate_identifier("cdc.publication", publication)?;
        Ok(Self {
            pool,
            names: names.clone(),
            slot: slot.to_owned(),
            publication: publication.to_owned(),
        })
    }

    fn leases(&self) -> String {
        self.names.table("outbox_leases")
    }

    fn cdc(&self) -> String {
        self.names.table("outbox_cdc")
    }

    /// Creates what CDC needs if it is missing: the publication (inserts
    /// of the outbox's segments only: truncating a segment and deleting
    /// nothing stay out of the stream) and the slot, whose creation waits
    /// for its consistent point. Returns whether the slot was created.
    pub async fn ensure(&self) -> Result<bool, StoreError> {
        require_logical(&self.pool).await?;
        let outbox = self.names.table("outbox");
        let exists: bool =
            sqlx::query_scalar("select exists (select 1 from pg_publication where pubname = $1)")
                .bind(&self.publication)
                .fetch_one(&self.pool)
                .await?;
        if !exists {
            let create = format!(
                "create publication {} for table {outbox}
                 with (publish = 'insert', publish_via_partition_root = false)",
                self.publication
            );
            if let Err(error) = sqlx::query(&create).execute(&self.pool).await {
                // Another node created it meanwhile.
                if !is_duplicate(&error) {
                    return Err(error.into());
                }
            }
        }
        let created = if self.state().await?.is_some() {
            false
        } else {
            match sqlx::query("select pg_create_logical_replication_slot($1, 'pgoutput')")
                .bind(&self.slot)
                .execute(&self.pool)
                .await
            {
                Ok(_) => true,
                Err(error) if is_duplicate(&error) => false,
                Err(error) => return Err(error.into()),
            }
        };
        sqlx::query(&format!(
            "update {} set slot = $1, publication = $2 where id = 1",
            self.cdc()
        ))
        .bind(&self.slot)
        .bind(&self.publication)
        .execute(&self.pool)
        .await?;
        Ok(created)
    }

    /// The slot, or `None` if there is none.
    pub async fn state(&self) -> Result<Option<SlotState>, StoreError> {
        let row = sqlx::query(
            "select confirmed_flush_lsn::text, restart_lsn::text, coalesce(wal_status, 'lost'),
                    active_pid, pg_current_wal_lsn()::text
               from pg_replication_slots where slot_name = $1",
        )
        .bind(&self.slot)
        .fetch_optional(&self.pool)
        .await?;
        let Some(r) = row else { return Ok(None) };
        let lsn = |v: Option<String>| v.map(|t| parse_lsn(&t)).transpose();
        Ok(Some(SlotState {
            confirmed_flush: lsn(r.try_get(0)?)?.unwrap_or(0),
            restart: lsn(r.try_get(1)?)?.unwrap_or(0),
            wal_status: r.try_get(2)?,
            active_pid: r.try_get(3)?,
            current: lsn(r.try_get(4)?)?.unwrap_or(0),
        }))
    }

    /// Takes the slot's lease if it is free or expired (or already this
    /// process's), bumping its epoch.
    pub async fn acquire(&self, member: &Member, ttl: Duration) -> Result<Option<i64>, StoreError> {
        let epoch = sqlx::query_scalar(&format!(
            "update {} set owner = $1, incarnation = $2, epoch = epoch + 1,
                    expires_at = now() + $3 * interval '1 millisecond', acquired_at = now()
              where id = 1 and (owner is null or expires_at is null or expires_at <= now()
                                or incarnation = $2)
             returning epoch",
            self.cdc()
        ))
        .bind(&member.node_id)
        .bind(member.incarnation)
        .bind(ttl.as_secs_f64() * 1000.0)
        .fetch_optional(&self.pool)
        .await?;
        Ok(epoch)
    }

    /// Extends the slot's lease; false if it was lost.
    pub async fn renew(
        &self,
        member: &Member,
        epoch: i64,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(&format!(
            "update {} set expires_at = now() + $3 * interval '1 millisecond'
              where id = 1 and incarnation = $1 and epoch = $2",
            self.cdc()
        ))
        .bind(member.incarnation)
        .bind(epoch)
        .bind(ttl.as_secs_f64() * 1000.0)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn release(&self, member: &Member, epoch: i64) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "update {} set owner = null, expires_at = null
              where id = 1 and incarnation = $1 and epoch = $2",
            self.cdc()
        ))
        .bind(member.incarnation)
        .bind(epoch)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Ends the walsender of a previous slot holder (a slot takes one
    /// reader at a time); true if there was one.
    pub async fn terminate_reader(&self) -> Result<bool, StoreError> {
        // Only a walsender: a normal backend holds the slot while it
        // creates it (another node's start-up), and must not be ended.
        let ended: Option<bool> = sqlx::query_scalar(
            "select pg_terminate_backend(s.active_pid)
               from pg_replication_slots s
               join pg_stat_activity a on a.pid = s.active_pid
              where s.slot_name = $1 and a.backend_type = 'walsender'",
        )
        .bind(&self.slot)
        .fetch_optional(&self.pool)
        .await?;
        Ok(ended.unwrap_or(false))
    }

    /// The slot is gone or lost: a new one is made, and every CDC
    /// partition catches up from the table again (at least once: what the
    /// old slot had streamed but its marks did not cover is sent again).
    /// Their leases are ended with the time their messages may still land,
    /// so no reader of the old stream sends alongside the new one.
    pub async fn recover(&self) -> Result<(), StoreError> {
        if let Some(state) = self.state().await? {
            if let Some(pid) = state.active_pid {
                sqlx::query("select pg_terminate_backend($1)")
                    .bind(pid)
                    .execute(&self.pool)
                    .await?;
            }
            sqlx::query("select pg_drop_replication_slot($1)")
                .bind(&self.slot)
                .execute(&self.pool)
                .await?;
        }
        self.ensure().await?;
        let mut tx = self.pool.begin().await?;
        sqlx::query(&format!(
            "update {} set owner = null, epoch = epoch + 1, cdc_streaming = false,
                    cdc_lsn = null, cdc_ord = null,
                    quiet_until = greatest(coalesce(quiet_until, now()),
                        coalesce(expires_at, now()) + (delivery_ms + $1) * interval '1 millisecond'),
                    expires_at = null
              where mode = 'cdc'",
            self.leases()
        ))
        .bind(TAKEOVER_MARGIN.as_millis() as i64)
        .execute(&mut *tx)
        .await?;
        sqlx::query(&format!(
            "update {} set recoveries = recoveries + 1 where id = 1",
            self.cdc()
        ))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The partitions in CDC mode.
    pub async fn cdc_partitions(&self) -> Result<Vec<u32>, StoreError> {
        let rows: Vec<i32> = sqlx::query_scalar(&format!(
            "select partition from {} where mode = 'cdc' order by partition",
            self.leases()
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|p| p as u32).collect())
    }

    /// The CDC partitions that stream, with what their marks cover.
    pub async fn streaming_marks(&self) -> Result<Vec<(u32, Covered)>, StoreError> {
        let rows = sqlx::query(&format!(
            "select partition, mark_lo::text, mark_hi::text, mark_pos, mark_id,
                    cdc_lsn::text, cdc_ord
               from {} where mode = 'cdc' and cdc_streaming",
            self.leases()
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let mark = PollMark {
                    lo: r.try_get(1)?,
                    hi: r.try_get(2)?,
                    pos: r.try_get(3)?,
                    id: r.try_get(4)?,
                };
                let lsn: Option<String> = r.try_get(5)?;
                let ord: Option<i32> = r.try_get(6)?;
                let mut covered = mark.covered()?;
                covered.upto = match (lsn, ord) {
                    (Some(l), Some(o)) => Some((parse_lsn(&l)?, o.max(0) as u32)),
                    _ => None,
                };
                Ok((r.try_get::<i32, _>(0)? as u32, covered))
            })
            .collect()
    }

    /// A snapshot and a WAL position after it (every transaction the
    /// snapshot sees committed before that position), and a heartbeat in
    /// the WAL that keeps an idle slot moving.
    pub async fn heartbeat(&self) -> Result<(Snapshot, u64), StoreError> {
        let row = sqlx::query(
            "select pg_current_snapshot()::text, pg_current_wal_insert_lsn()::text,
                    pg_logical_emit_message(false, $1, '')::text",
        )
        .bind(format!("outbox.heartbeat.{}", self.names.schema))
        .fetch_one(&self.pool)
        .await?;
        let snapshot: String = row.try_get(0)?;
        let lsn: String = row.try_get(1)?;
        Ok((
            Snapshot::parse(&snapshot).map_err(|e| StoreError::Schema(e.to_string()))?,
            parse_lsn(&lsn)?,
        ))
    }

    /// Everything `snapshot` sees is published for the streaming CDC
    /// partitions of `claims` (the slot is confirmed past it): their marks
    /// move there, so polling (after a switch back) and the truncation of
    /// published segments start from it. Marks only move forward.
    pub async fn advance_marks(
        &self,
        claims: &[Claim],
        snapshot: &Snapshot,
    ) -> Result<u64, StoreError> {
        if claims.is_empty() {
            return Ok(0);
        }
        let partitions: Vec<i32> = claims.iter().map(|c| c.partition as i32).collect();
        let epochs: Vec<i64> = claims.iter().map(|c| c.epoch).collect();
        let incarnations: Vec<uuid::Uuid> = claims.iter().map(|c| c.incarnation).collect();
        let done = sqlx::query(&format!(
            "update {} l set mark_lo = $4::text::pg_snapshot, mark_hi = null,
                    mark_pos = null, mark_id = null
               from unnest($1::int[], $2::int8[], $3::uuid[]) as c(partition, epoch, incarnation)
              where l.partition = c.partition and l.epoch = c.epoch
                and l.incarnation = c.incarnation and l.mode = 'cdc' and l.cdc_streaming
                and pg_snapshot_xmax(l.mark_lo) <= pg_snapshot_xmax($4::text::pg_snapshot)",
            self.leases()
        ))
        .bind(&partitions)
        .bind(&epochs)
        .bind(&incarnations)
        .bind(snapshot.as_str())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// How many times the slot was recovered.
    pub async fn recoveries(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(&format!(
            "select recoveries from {} where id = 1",
            self.cdc()
        ))
        .fetch_one(&self.pool)
        .await?)
    }
}

/// Switches `partitions` (all of them if `None`) to relay `mode`, while
/// nodes run; returns the partitions that changed.
///
/// One statement per switch: the mode changes, the epoch is bumped (the
/// current owner's next fetch, acknowledgement or renewal is refused, so it
/// stops), and the lease is ended with the time its messages may still
/// land, which the next owner waits out. A partition switched to CDC starts
/// by catching up from the table (from its polling mark) and then streams;
/// one switched to polling polls from its last CDC mark (a snapshot the
/// slot is confirmed past), so events streamed after that mark are sent
/// again: at least once, in order. Switching to CDC first makes the
/// publication and the slot (waiting for the slot's consistent point).
pub async fn switch(
    store: &SlotStore,
    mode: crate::relay::Mode,
    partitions: Option<&[u32]>,
) -> Result<Vec<u32>, StoreError> {
    if mode == crate::relay::Mode::Cdc {
        store.ensure().await?;
    }
    let all: Vec<i32>;
    let chosen: Option<Vec<i32>> = partitions.map(|p| p.iter().map(|p| *p as i32).collect());
    let ids = match &chosen {
        Some(ids) => ids,
        None => {
            all = sqlx::query_scalar(&format!("select partition from {}", store.leases()))
                .fetch_all(&store.pool)
                .await?;
            &all
        }
    };
    let known: Vec<i32> = sqlx::query_scalar(&format!(
        "select partition from {} where partition = any($1)",
        store.leases()
    ))
    .bind(ids)
    .fetch_all(&store.pool)
    .await?;
    if let Some(missing) = ids.iter().find(|p| !known.contains(p)) {
        return Err(StoreError::Schema(format!(
            "the outbox has no partition {missing} (partitions are 0 to {})",
            known.iter().max().copied().unwrap_or(-1).max(0)
        )));
    }
    let changed: Vec<i32> = sqlx::query_scalar(&format!(
        "update {} set mode = $2, epoch = epoch + 1, cdc_streaming = false,
                cdc_lsn = null, cdc_ord = null,
                quiet_until = greatest(coalesce(quiet_until, now()),
                    case when owner is not null and expires_at > now()
                         then now() + (delivery_ms + $3) * interval '1 millisecond'
                         else coalesce(expires_at + (delivery_ms + $3) * interval '1 millisecond', now())
                    end),
                owner = null, expires_at = null
          where partition = any($1) and mode is distinct from $2
         returning partition",
        store.leases()
    ))
    .bind(ids)
    .bind(mode.as_str())
    .bind(TAKEOVER_MARGIN.as_millis() as i64)
    .fetch_all(&store.pool)
    .await?;
    let mut changed: Vec<u32> = changed.into_iter().map(|p| p as u32).collect();
    changed.sort_unstable();
    Ok(changed)
}

/// The object exists: `duplicate_object`, or `unique_violation` when two
/// sessions create the same publication at once (the second insert into
/// `pg_publication` hits its name's unique index).
fn is_duplicate(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("42710" | "23505")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_round_trip_through_their_text() {
        for lsn in [0u64, 1, 0x16_B374_D848, u32::MAX as u64, u64::MAX] {
            assert_eq!(parse_lsn(&lsn_text(lsn)).expect("lsn"), lsn);
        }
        assert_eq!(parse_lsn("16/B374D848").expect("lsn"), 0x16_B374_D848);
        for bad in ["", "1", "x/1", "1/", "100000000/0"] {
            assert!(parse_lsn(bad).is_err(), "{bad:?}");
        }
    }
}
