//! A database of a test's own on a shared server, and what tests read from
//! its outbox tables: the backlog, the lease owners.
//!
//! Every test creates its database (`outbox_t_<random>`) on the server of
//! [`crate::admin_url`] (or, for CDC, [`crate::cdc_admin_url`]) and drops
//! it at its end, so tests run in parallel and never see each other's rows.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

use sqlx::postgres::PgPool;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use outbox_engine::store::schema;
use outbox_engine::StoreError;

use crate::{admin_url, cdc_admin_url, TEST_RING_SHIFT};

/// A database of its own for one test, migrated with `partitions`.
///
/// A test fixture: its methods panic where the server fails them.
pub struct TestDb {
    /// The database's name, `outbox_t_<random>`.
    pub name: String,
    /// Its URL.
    pub url: String,
    /// A pool on it.
    pub pool: PgPool,
    /// The outbox's partitions (0 for [`TestDb::bare`]).
    pub partitions: u32,
    /// The server's administrative URL (where the database was created).
    admin: String,
}

impl TestDb {
    /// A fresh database with an outbox of `partitions` partitions.
    pub async fn new(partitions: u32) -> TestDb {
        TestDb::migrated(TestDb::bare().await, partitions).await
    }

    /// [`TestDb::new`] on the logical-decoding server (for CDC tests).
    pub async fn new_cdc(partitions: u32) -> TestDb {
        let admin = cdc_admin_url().expect(
            "CDC tests need a server with wal_level = logical: run them with deploy/test.sh \
             (it exports CDC_DATABASE_URL) or set OUTBOX_TEST_CDC_DATABASE_URL",
        );
        TestDb::migrated(TestDb::bare_on(&admin).await, partitions).await
    }

    async fn migrated(db: TestDb, partitions: u32) -> TestDb {
        let mut conn = db.pool.acquire().await.expect("conn");
        migrate(&mut conn, partitions).await.expect("migrate");
        drop(conn);
        TestDb { partitions, ..db }
    }

    /// A fresh, empty database.
    pub async fn bare() -> TestDb {
        TestDb::bare_on(&admin_url()).await
    }

    async fn bare_on(admin_url: &str) -> TestDb {
        let name = format!("outbox_t_{}", &Uuid::new_v4().simple().to_string()[..12]);
        let mut admin = PgConnection::connect(admin_url)
            .await
            .expect("connect to the test server (set OUTBOX_TEST_DATABASE_URL)");
        sqlx::raw_sql(&format!("create database {name}"))
            .execute(&mut admin)
            .await
            .expect("create test database");
        let url = url_for(admin_url, &name);
        let pool = PgPool::connect(&url).await.expect("connect test database");
        TestDb {
            name,
            url,
            pool,
            partitions: 0,
            admin: admin_url.to_string(),
        }
    }

    /// Drops the database and the replication slots on it (ending a
    /// walsender still reading one); a failure is ignored, the server keeps
    /// the database.
    pub async fn drop_db(self) {
        self.pool.close().await;
        if let Ok(mut admin) = PgConnection::connect(&self.admin).await {
            // A database with a replication slot cannot be dropped, nor a
            // slot a walsender still reads: an engine that has just stopped
            // may leave one ending. End it, then drop the slot (a few
            // tries: a terminated walsender takes a moment to let go).
            for _ in 0..25 {
                let _ = sqlx::query(
                    "select pg_terminate_backend(active_pid) from pg_replication_slots
                      where database = $1 and active_pid is not null",
                )
                .bind(&self.name)
                .execute(&mut admin)
                .await;
                let _ = sqlx::query(
                    "select pg_drop_replication_slot(slot_name) from pg_replication_slots
                      where database = $1 and not active",
                )
                .bind(&self.name)
                .execute(&mut admin)
                .await;
                let left: Result<i64, _> = sqlx::query_scalar(
                    "select count(*) from pg_replication_slots where database = $1",
                )
                .bind(&self.name)
                .fetch_one(&mut admin)
                .await;
                if left.map_or(true, |n| n == 0) {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            let _ = sqlx::raw_sql(&format!(
                "drop database if exists {} with (force)",
                self.name
            ))
            .execute(&mut admin)
            .await;
        }
    }

    /// Inserts `count` events (aggregate type `order`, event type `E`)
    /// through the SQL contract in one statement; `aggregate` and `payload`
    /// are SQL over `g`, the row's number from 1 (`g::text`, `'{}'`).
    pub async fn insert_series(&self, count: i64, aggregate: &str, payload: &str) {
        sqlx::query(&format!(
            "insert into outbox (aggregate_type, aggregate_id, event_type, payload)
             select 'order', {aggregate}, 'E', {payload} from generate_series(1, {count}) g"
        ))
        .execute(&self.pool)
        .await
        .expect("insert events");
    }

    /// Events not published yet (the rows stay until their ring segment is
    /// truncated).
    pub async fn pending(&self) -> i64 {
        pending(&self.pool).await.expect("count pending events")
    }
}

/// The outbox of the tests in schema `public`: `partitions` partitions,
/// ring segments of 2^[`TEST_RING_SHIFT`] positions.
pub async fn migrate(conn: &mut PgConnection, partitions: u32) -> Result<(), StoreError> {
    let options = schema::MigrateOptions {
        ring_shift: Some(TEST_RING_SHIFT),
        ..schema::MigrateOptions::partitions(partitions)
    };
    schema::migrate(conn, "public", options).await.map(drop)
}

/// Events of the outbox at `pool` not published yet.
pub async fn pending(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("select count(*) from outbox_pending")
        .fetch_one(pool)
        .await
}

/// Live lease counts per owner.
pub async fn owners(db: &TestDb) -> HashMap<String, i64> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "select owner, count(*) from outbox_leases
          where owner is not null and expires_at > now() group by owner",
    )
    .fetch_all(&db.pool)
    .await
    .expect("lease owners");
    rows.into_iter().collect()
}

/// Waits until the live leases are spread as `want` (owner -> count).
pub async fn wait_for_owners(
    db: &TestDb,
    want: &[(&str, i64)],
    timeout: Duration,
) -> HashMap<String, i64> {
    let want: HashMap<String, i64> = want.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let start = Instant::now();
    loop {
        let now = owners(db).await;
        if now == want || start.elapsed() > timeout {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `base` with its database replaced by `db`.
pub fn url_for(base: &str, db: &str) -> String {
    let (head, query) = match base.split_once('?') {
        Some((h, q)) => (h, format!("?{q}")),
        None => (base, String::new()),
    };
    let root = match head.rfind('/') {
        Some(i) if i > "postgres://".len() => &head[..i],
        _ => head,
    };
    format!("{root}/{db}{query}")
}

/// `url` with its `host:port` replaced by `addr` (to go through a proxy).
pub fn url_via(url: &str, addr: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("url has a scheme");
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let userinfo = authority.rfind('@').map(|i| &authority[..=i]).unwrap_or("");
    format!("{scheme}://{userinfo}{addr}{}", &rest[end..])
}

/// The `host:port` of a postgres URL, resolved to an IPv4 address.
pub fn url_addr(url: &str) -> std::io::Result<SocketAddr> {
    let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what);
    let rest = url.split_once("://").ok_or_else(|| invalid("no scheme"))?.1;
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host_port = if host_port.contains(':') {
        host_port.to_string()
    } else {
        format!("{host_port}:5432")
    };
    host_port
        .to_socket_addrs()?
        .find(|a| a.is_ipv4())
        .ok_or_else(|| invalid("no IPv4 address for the database host"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_get_another_database_and_another_address() {
        assert_eq!(
            url_for("postgres://u@h:1/test?sslmode=disable", "x"),
            "postgres://u@h:1/x?sslmode=disable"
        );
        assert_eq!(url_for("postgres://u@h:1", "x"), "postgres://u@h:1/x");
        assert_eq!(
            url_via("postgres://u:p@h:1/db?a=b", "127.0.0.1:9"),
            "postgres://u:p@127.0.0.1:9/db?a=b"
        );
        assert_eq!(
            url_addr("postgres://u@127.0.0.1/db").unwrap(),
            SocketAddr::from(([127, 0, 0, 1], 5432))
        );
    }
}
