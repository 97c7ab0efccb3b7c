//! Shared by the inbox's tests: a migrated schema of its own per test in
//! the test database, and a minimal event type.
#![allow(dead_code)]

use outbox_inbox::{migrate, InboxConfig, InboxEvent, OrderKey};
use sqlx::postgres::{PgPool, PgPoolOptions};
use uuid::Uuid;

pub fn database_url() -> String {
    std::env::var("OUTBOX_TEST_DATABASE_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A schema of its own, migrated, dropped by [`TestSchema::drop`].
pub struct TestSchema {
    pub config: InboxConfig,
    pub pool: PgPool,
}

impl TestSchema {
    pub async fn new() -> TestSchema {
        Self::with(|_| {}).await
    }

    pub async fn with(adjust: impl FnOnce(&mut InboxConfig)) -> TestSchema {
        let mut config = InboxConfig::schema(&format!(
            "inbox_t_{}",
            &Uuid::new_v4().simple().to_string()[..12]
        ));
        adjust(&mut config);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(&database_url())
            .await
            .expect("connect to the test database (set OUTBOX_TEST_DATABASE_URL)");
        let mut conn = pool.acquire().await.expect("conn");
        migrate(&mut conn, &config).await.expect("migrate");
        TestSchema { config, pool }
    }

    pub fn schema(&self) -> &str {
        &self.config.schema
    }

    pub async fn drop(self) {
        let _ = sqlx::raw_sql(&format!("drop schema if exists {} cascade", self.schema()))
            .execute(&self.pool)
            .await;
        self.pool.close().await;
    }
}

/// An event as a test makes it: id, time, optional order key.
#[derive(Debug, Clone)]
pub struct Ev {
    pub id: Uuid,
    pub at_ms: Option<i64>,
    pub aggregate: Option<(String, String, i64)>,
}

impl Ev {
    pub fn new(id: Uuid, at_ms: i64) -> Ev {
        Ev {
            id,
            at_ms: Some(at_ms),
            aggregate: None,
        }
    }

    pub fn of(id: Uuid, at_ms: i64, agg: &str, position: i64) -> Ev {
        Ev {
            id,
            at_ms: Some(at_ms),
            aggregate: Some(("order".into(), agg.into(), position)),
        }
    }
}

impl InboxEvent for Ev {
    fn event_id(&self) -> Uuid {
        self.id
    }
    fn event_time_ms(&self) -> Option<i64> {
        self.at_ms
    }
    fn order_key(&self) -> Option<OrderKey<'_>> {
        self.aggregate.as_ref().map(|(t, a, p)| OrderKey {
            aggregate_type: t,
            aggregate_id: a,
            position: *p,
        })
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

pub const DAY_MS: i64 = 86_400_000;
