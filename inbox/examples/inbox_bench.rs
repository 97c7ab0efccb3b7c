//! Benchmark: events per second through the read model's consumer with
//! and without the inbox, in batches, on the same database in the same
//! run (rounds alternate, so drift hits both alike). No broker: both
//! sides would pay the same Kafka cost, which only dilutes the ratio; this
//! measures what the inbox adds to the database transaction.
//!
//! ```sh
//! cargo run --release -p outbox-inbox --example inbox_bench -- \
//!     --events 100000 --batch 500 --rounds 5 --out bench-results/inbox
//! ```
//! writes `<out>.json` (the data) and `<out>.md` (rendered from it).

#[path = "shared/read_model.rs"]
mod read_model;

use std::error::Error;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use outbox_inbox::{Handler, Inbox, InboxConfig, InboxEvent, OrderKey};
use read_model::{Applicable, ReadModel};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use uuid::Uuid;

struct Ev {
    id: Uuid,
    at_ms: i64,
    aggregate: String,
    seq: i64,
    position: i64,
}

impl InboxEvent for Ev {
    fn event_id(&self) -> Uuid {
        self.id
    }
    fn event_time_ms(&self) -> Option<i64> {
        Some(self.at_ms)
    }
    fn order_key(&self) -> Option<OrderKey<'_>> {
        Some(OrderKey {
            aggregate_type: "order",
            aggregate_id: &self.aggregate,
            position: self.position,
        })
    }
}

impl Applicable for Ev {
    fn aggregate(&self) -> &str {
        &self.aggregate
    }
    fn seq(&self) -> Option<i64> {
        Some(self.seq)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// The read model alone, one transaction per batch.
    Bare,
    /// Through `Inbox::process`: claim + the same read model.
    Inbox,
    /// As `Inbox`, with stale-event rejection.
    InboxStale,
    /// For the breakdown only, not a safe inbox: the same insert without
    /// the check of the other segments (`on conflict` alone).
    OneSegment,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Bare => "no inbox",
            Mode::Inbox => "inbox",
            Mode::InboxStale => "inbox + stale check",
            Mode::OneSegment => "insert only, no cross-segment check (breakdown)",
        }
    }
    fn key(self) -> &'static str {
        match self {
            Mode::Bare => "bare",
            Mode::Inbox => "inbox",
            Mode::InboxStale => "inbox_stale",
            Mode::OneSegment => "one_segment_insert",
        }
    }
}

struct Args {
    events: usize,
    batch: usize,
    rounds: usize,
    aggregates: usize,
    out: Option<String>,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        events: 100_000,
        batch: 500,
        rounds: 5,
        aggregates: 1_000,
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let num = |v: String| {
            v.parse::<usize>()
                .map_err(|_| format!("{v:?} is not a number"))
        };
        match flag.as_str() {
            "--events" => a.events = num(value()?)?,
            "--batch" => a.batch = num(value()?)?,
            "--rounds" => a.rounds = num(value()?)?,
            "--aggregates" => a.aggregates = num(value()?)?,
            "--out" => a.out = Some(value()?),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if a.events == 0 || a.batch == 0 || a.rounds == 0 || a.aggregates == 0 {
        return Err("--events, --batch, --rounds and --aggregates must be positive".into());
    }
    Ok(a)
}

/// `n` new events over `aggregates` aggregates, seq and position rising.
fn events(n: usize, aggregates: usize, first_seq: i64) -> Vec<Ev> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    (0..n)
        .map(|i| Ev {
            id: Uuid::now_v7(),
            at_ms: now,
            aggregate: format!("a{}", i % aggregates),
            seq: first_seq + (i / aggregates) as i64,
            position: first_seq * aggregates as i64 + i as i64,
        })
        .collect()
}

async fn run_once(
    pool: &PgPool,
    mode: Mode,
    inbox: &Inbox,
    stale: &Inbox,
    batch: &[Ev],
    size: usize,
) -> Result<Duration, Box<dyn Error>> {
    let mut model = ReadModel::new(Duration::ZERO);
    let start = Instant::now();
    for chunk in batch.chunks(size) {
        match mode {
            Mode::Bare => {
                let mut tx = pool.begin().await?;
                let all: Vec<&Ev> = chunk.iter().collect();
                model.handle(&mut tx, &all).await?;
                tx.commit().await?;
            }
            Mode::Inbox => {
                inbox.process(pool, chunk, &mut model).await?;
            }
            Mode::InboxStale => {
                stale.process(pool, chunk, &mut model).await?;
            }
            Mode::OneSegment => {
                let mut tx = pool.begin().await?;
                let ids: Vec<Uuid> = chunk.iter().map(|e| e.id).collect();
                let new: std::collections::HashSet<Uuid> = sqlx::query_scalar(
                    "insert into inbox (consumer_group, event_id, event_at)
                     select 'one', id, now() from unnest($1::uuid[]) as e(id) order by id
                     on conflict do nothing returning event_id",
                )
                .bind(&ids)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
                let apply: Vec<&Ev> = chunk.iter().filter(|e| new.contains(&e.id)).collect();
                model.handle(&mut tx, &apply).await?;
                tx.commit().await?;
            }
        }
    }
    Ok(start.elapsed())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn run() -> Result<(), Box<dyn Error>> {
    let a = args()?;
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await?;
    let postgres: String = sqlx::query_scalar("select version()")
        .fetch_one(&pool)
        .await?;
    let schema = format!("inbox_bench_{}", &Uuid::new_v4().simple().to_string()[..8]);
    outbox_inbox::migrate(&mut *pool.acquire().await?, &InboxConfig::schema(&schema)).await?;
    // The read model's table is unqualified: the bench schema first.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .after_connect({
            let schema = schema.clone();
            move |conn, _| {
                let sql = format!("set search_path = {schema}");
                Box::pin(async move {
                    sqlx::query(&sql).execute(&mut *conn).await?;
                    if std::env::var("BENCH_EXPLAIN").is_ok() {
                        sqlx::query("load 'auto_explain'")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("set auto_explain.log_min_duration = 20")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("set auto_explain.log_analyze = on")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("set auto_explain.log_nested_statements = on")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            }
        })
        .connect(&url)
        .await?;
    read_model::create(&pool).await?;
    let inbox = Inbox::new(&schema, "bench")?;
    let stale = Inbox::new(&schema, "bench_stale")?.reject_stale();

    let modes = [Mode::Bare, Mode::Inbox, Mode::InboxStale, Mode::OneSegment];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    // Round 0 warms up and is not counted.
    let mut seq = 0i64;
    for round in 0..=a.rounds {
        for (m, mode) in modes.iter().enumerate() {
            let evs = events(a.events, a.aggregates, seq);
            seq += (a.events / a.aggregates) as i64 + 1;
            let took = run_once(&pool, *mode, &inbox, &stale, &evs, a.batch).await?;
            let eps = a.events as f64 / took.as_secs_f64();
            eprintln!("round {round} {:<20} {eps:>9.0} events/s", mode.name());
            if round > 0 {
                rates[m].push(eps);
            }
        }
    }
    let inbox_rows: i64 = sqlx::query_scalar(&format!("select count(*) from {schema}.inbox"))
        .fetch_one(&pool)
        .await?;
    sqlx::query(&format!("drop schema {schema} cascade"))
        .execute(&pool)
        .await?;

    let med: Vec<f64> = rates.iter().map(|r| median(r.clone())).collect();
    let mut json = String::from("{\n");
    let _ = writeln!(json, "  \"events_per_round\": {},", a.events);
    let _ = writeln!(json, "  \"batch\": {},", a.batch);
    let _ = writeln!(json, "  \"aggregates\": {},", a.aggregates);
    let _ = writeln!(json, "  \"rounds\": {},", a.rounds);
    let _ = writeln!(json, "  \"inbox_rows_at_end\": {inbox_rows},");
    let _ = writeln!(json, "  \"postgres\": {:?},", postgres);
    json.push_str("  \"events_per_sec\": {\n");
    for (m, mode) in modes.iter().enumerate() {
        let list: Vec<String> = rates[m].iter().map(|r| format!("{r:.0}")).collect();
        let _ = writeln!(
            json,
            "    \"{}\": {{\"median\": {:.0}, \"rounds\": [{}]}}{}",
            mode.key(),
            med[m],
            list.join(", "),
            if m + 1 < modes.len() { "," } else { "" }
        );
    }
    json.push_str("  },\n");
    let _ = writeln!(
        json,
        "  \"inbox_over_bare\": {:.3},\n  \"inbox_stale_over_bare\": {:.3},\n  \"one_segment_insert_over_bare\": {:.3}\n}}",
        med[1] / med[0],
        med[2] / med[0],
        med[3] / med[0]
    );
    let mut md = format!(
        "| consumer | events/s (median of {} rounds) | vs no inbox |\n|---|---|---|\n",
        a.rounds
    );
    for (m, mode) in modes.iter().enumerate() {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} % |",
            mode.name(),
            med[m],
            100.0 * med[m] / med[0]
        );
    }
    let _ = writeln!(
        md,
        "\n{} events per round, batches of {}, {} aggregates, one connection; {}.",
        a.events, a.batch, a.aggregates, postgres
    );
    print!("{md}");
    if let Some(out) = a.out {
        std::fs::write(format!("{out}.json"), &json)?;
        std::fs::write(format!("{out}.table.md"), &md)?;
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("inbox_bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
