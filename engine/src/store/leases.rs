//! Leases and node registrations in PostgreSQL. Expiry is judged by the
//! database's clock (`now()`), the one clock every node shares.

use std::time::Duration;

use sqlx::postgres::{PgPool, PgRow};
use sqlx::Row;

use crate::cluster::{Acquired, LeaseStore, LeaseView, Member, Registration};
use crate::error::StoreError;
use crate::relay::{Claim, Mode};
use crate::store::Names;

struct Sql {
    register: String,
    registered_expiry: String,
    heartbeat: String,
    live_nodes: String,
    leases: String,
    acquire: String,
    renew: String,
    keep: String,
    release: String,
    deregister: String,
    slot_owner: String,
}

pub struct PgLeaseStore {
    pool: PgPool,
    sql: Sql,
}

impl PgLeaseStore {
    pub fn new(pool: PgPool, names: &Names) -> Self {
        let nodes = names.table("outbox_nodes");
        let leases = names.table("outbox_leases");
        // The heartbeat's and the renewal's updates, with their parameters
        // named by the caller: `keep` runs both in one statement.
        let touch_node = |node: &str, incarnation: &str, ttl: &str| {
            format!(
                "update {nodes} set heartbeat_at = now(),
                        expires_at = now() + {ttl} * interval '1 millisecond'
                  where node_id = {node} and incarnation = {incarnation}"
            )
        };
        let extend_leases = |partitions: &str, incarnation: &str, ttl: &str| {
            format!(
                "update {leases} set expires_at = now() + {ttl} * interval '1 millisecond'
                  where partition = any({partitions}) and incarnation = {incarnation}"
            )
        };
        let sql = Sql {
            register: format!(
                "insert into {nodes} as n (node_id, incarnation, expires_at)
                 values ($1, $2, now() + $3 * interval '1 millisecond')
                 on conflict (node_id) do update
                    set incarnation = excluded.incarnation, started_at = now(),
                        heartbeat_at = now(), expires_at = excluded.expires_at
                    where n.expires_at < now() or n.incarnation = excluded.incarnation
                 returning node_id"
            ),
            registered_expiry: format!(
                "select greatest(extract(epoch from expires_at - now()), 0)::float8
                 from {nodes} where node_id = $1"
            ),
            heartbeat: touch_node("$1", "$2", "$3"),
            live_nodes: format!(
                "select node_id from {nodes} where expires_at > now() order by node_id"
            ),
            leases: format!(
                "select partition, case when expires_at > now() then owner end, mode
                 from {leases} order by partition"
            ),
            // Until when the previous owner's messages may land: the quiet
            // time it left at release, or, if its lease expired, the expiry
            // plus its delivery timeout plus a margin. The row lock of the
            // first CTE makes concurrent acquirers queue; the second sees
            // the lease taken and updates nothing.
            acquire: format!(
                "with prev as (
                    select partition,
                           case when owner is null then coalesce(quiet_until, now())
                                else expires_at + (delivery_ms + $6) * interval '1 millisecond'
                           end as quiet_until
                      from {leases}
                     where partition = $1
                       and (owner is null or expires_at is null or expires_at <= now())
                     for update
                 )
                 update {leases} l
                    set owner = $2, incarnation = $3, epoch = l.epoch + 1,
                        expires_at = now() + $4 * interval '1 millisecond', acquired_at = now(),
                        delivery_ms = $5, quiet_until = null
                   from prev
                  where l.partition = prev.partition
                 returning l.epoch,
                           greatest(extract(epoch from prev.quiet_until - now()) * 1000, 0)::float8,
                           l.mode"
            ),
            renew: format!(
                "{} returning partition, epoch, mode",
                extend_leases("$1", "$2", "$3")
            ),
            // The heartbeat and the renewal in one statement (one commit),
            // the renewal only if the registration held. The first column
            // says whether it did; a row per lease renewed (none: null).
            keep: format!(
                "with hb as ({} returning 1),
                 r as ({} and exists (select 1 from hb) returning partition, epoch, mode)
                 select exists (select 1 from hb), r.partition, r.epoch, r.mode
                   from (select 1) one left join r on true",
                touch_node("$1", "$2", "$3"),
                extend_leases("$4", "$2", "$3")
            ),
            release: format!(
                "update {leases} set owner = null, expires_at = null,
                        quiet_until = now() + $4 * interval '1 millisecond'
                  where partition = $1 and epoch = $2 and incarnation = $3"
            ),
            deregister: format!("delete from {nodes} where node_id = $1 and incarnation = $2"),
            slot_owner: format!(
                "select case when expires_at > now() then owner end from {cdc}",
                cdc = names.table("outbox_cdc")
            ),
        };
        Self { pool, sql }
    }
}

/// Added to a previous owner's delivery timeout before a takeover sends:
/// librdkafka scans for timed-out messages about once a second, and a
/// request on the wire needs a moment to land or die.
pub const TAKEOVER_MARGIN: Duration = Duration::from_secs(2);

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The claim of a row `partition, epoch, mode` starting at column `at`
/// that a renewal returned; `None` for the null row of a renewal that
/// renewed nothing.
fn renewed_claim(row: &PgRow, at: usize, member: &Member) -> Result<Option<Claim>, StoreError> {
    let Some(partition) = row.try_get::<Option<i32>, _>(at)? else {
        return Ok(None);
    };
    Ok(Some(Claim {
        partition: partition as u32,
        epoch: row.try_get(at + 1)?,
        incarnation: member.incarnation,
        mode: Mode::from_db(row.try_get::<Option<&str>, _>(at + 2)?)?,
    }))
}

impl LeaseStore for PgLeaseStore {
    async fn register(&self, member: &Member, ttl: Duration) -> Result<Registration, StoreError> {
        let row = sqlx::query(&self.sql.register)
            .bind(&member.node_id)
            .bind(member.incarnation)
            .bind(millis(ttl))
            .fetch_optional(&self.pool)
            .await?;
        if row.is_some() {
            return Ok(Registration::Registered);
        }
        let secs: f64 = sqlx::query(&self.sql.registered_expiry)
            .bind(&member.node_id)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| r.try_get(0))
            .transpose()?
            .unwrap_or(0.0);
        Ok(Registration::Taken {
            expires_in: Duration::from_secs_f64(secs.max(0.0)),
        })
    }

    async fn heartbeat(&self, member: &Member, ttl: Duration) -> Result<bool, StoreError> {
        let done = sqlx::query(&self.sql.heartbeat)
            .bind(&member.node_id)
            .bind(member.incarnation)
            .bind(millis(ttl))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn live_nodes(&self) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(&self.sql.live_nodes)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
    }

    async fn leases(&self) -> Result<Vec<LeaseView>, StoreError> {
        let rows = sqlx::query(&self.sql.leases).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                Ok(LeaseView {
                    partition: r.try_get::<i32, _>(0)? as u32,
                    owner: r.try_get(1)?,
                    mode: Mode::from_db(r.try_get::<Option<&str>, _>(2)?)?,
                })
            })
            .collect()
    }

    async fn acquire(
        &self,
        member: &Member,
        partition: u32,
        ttl: Duration,
        delivery_timeout: Duration,
    ) -> Result<Option<Acquired>, StoreError> {
        let row = sqlx::query(&self.sql.acquire)
            .bind(partition as i32)
            .bind(&member.node_id)
            .bind(member.incarnation)
            .bind(millis(ttl))
            .bind(delivery_timeout.as_millis() as i64)
            .bind(TAKEOVER_MARGIN.as_millis() as i64)
            .fetch_optional(&self.pool)
            .await?;
        let Some(r) = row else { return Ok(None) };
        let quiet_ms: f64 = r.try_get(1)?;
        Ok(Some(Acquired {
            claim: Claim {
                partition,
                epoch: r.try_get(0)?,
                incarnation: member.incarnation,
                mode: Mode::from_db(r.try_get::<Option<&str>, _>(2)?)?,
            },
            ttl,
            quiet_for: Duration::from_secs_f64(quiet_ms.max(0.0) / 1000.0),
        }))
    }

    async fn renew(
        &self,
        member: &Member,
        claims: &[Claim],
        ttl: Duration,
    ) -> Result<Vec<Claim>, StoreError> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let partitions: Vec<i32> = claims.iter().map(|c| c.partition as i32).collect();
        let rows = sqlx::query(&self.sql.renew)
            .bind(&partitions)
            .bind(member.incarnation)
            .bind(millis(ttl))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .filter_map(|r| renewed_claim(r, 0, member).transpose())
            .collect()
    }

    async fn keep(
        &self,
        member: &Member,
        claims: &[Claim],
        ttl: Duration,
    ) -> Result<Option<Vec<Claim>>, StoreError> {
        let partitions: Vec<i32> = claims.iter().map(|c| c.partition as i32).collect();
        let rows = sqlx::query(&self.sql.keep)
            .bind(&member.node_id)
            .bind(member.incarnation)
            .bind(millis(ttl))
            .bind(&partitions)
            .fetch_all(&self.pool)
            .await?;
        let registered = match rows.first() {
            Some(r) => r.try_get::<bool, _>(0)?,
            None => return Err(StoreError::Schema("lease renewal returned no row".into())),
        };
        if !registered {
            return Ok(None);
        }
        let renewed = rows
            .iter()
            .filter_map(|r| renewed_claim(r, 1, member).transpose())
            .collect::<Result<_, _>>()?;
        Ok(Some(renewed))
    }

    async fn release(&self, claim: &Claim, quiet: Duration) -> Result<(), StoreError> {
        sqlx::query(&self.sql.release)
            .bind(claim.partition as i32)
            .bind(claim.epoch)
            .bind(claim.incarnation)
            .bind(millis(quiet))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn slot_owner(&self) -> Result<Option<String>, StoreError> {
        let row = sqlx::query(&self.sql.slot_owner)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?.flatten())
    }

    async fn deregister(&self, member: &Member) -> Result<(), StoreError> {
        sqlx::query(&self.sql.deregister)
            .bind(&member.node_id)
            .bind(member.incarnation)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
