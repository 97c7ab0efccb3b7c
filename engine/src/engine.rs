//! The engine wired once: pools, sink, leases, dead letters, readiness, the
//! operations endpoint and the node supervisor. `outbox run` calls
//! [`run`], and so do the tests that start an engine in-process, so they
//! exercise the production wiring.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::cdc::hub::Hub;
use crate::cdc::keeper::Keeper;
use crate::cdc::slot::{self, SlotStore};
use crate::cdc::source::{CdcSide, ModalSource};
use crate::cdc::stream::StreamSpec;
use crate::cluster::node::Node;
use crate::cluster::Member;
use crate::config::{Config, SourceKind};
use crate::error::{ConfigError, SinkError, StoreError};
use crate::ops::{self, readiness::Readiness};
use crate::sink::kafka::KafkaSink;
use crate::sink::Sink;
use crate::store::dead_letters::PgDeadLetters;
use crate::store::leases::PgLeaseStore;
use crate::store::source::PgSource;
use crate::store::{self as pgstore, Names};

/// Why the engine could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot reach Kafka brokers at {brokers}: {error}")]
    Broker { brokers: String, error: SinkError },
    #[error("kafka: {0}")]
    Sink(#[from] SinkError),
    #[error("cannot listen on http.addr {addr}: {error}")]
    Http {
        addr: std::net::SocketAddr,
        error: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(String),
    #[error("{0}")]
    Runtime(String),
}

/// How long readiness checks wait, and how often they run.
const READINESS_PERIOD: Duration = Duration::from_secs(2);
const READINESS_TIMEOUT: Duration = Duration::from_secs(6);
/// How often published ring segments are looked for and truncated.
const HOUSEKEEPING_PERIOD: Duration = Duration::from_secs(1);
/// How long the producer may take to deliver what is left at exit.
const FINAL_FLUSH: Duration = Duration::from_secs(5);

/// Sets the mode of partitions that have none yet, and, on a server with
/// logical decoding, readies the CDC side: the publication and slot (for
/// `source.kind = cdc`), the hub and the slot keeper. A node on a server
/// without it relays polled partitions only; asked for CDC, it refuses to
/// start.
async fn start_cdc(
    config: &Config,
    names: &Names,
    pool: &sqlx::PgPool,
    relay_pool: &sqlx::PgPool,
    partitions: u32,
    member: &Member,
    services: &CancellationToken,
) -> Result<Option<CdcSide>, EngineError> {
    let kind = crate::relay::Mode::from(config.source.kind).as_str();
    let store = SlotStore::new(
        pool.clone(),
        names,
        &config.cdc.slot,
        &config.cdc.publication,
    )?;
    let logical = match (slot::require_logical(pool).await, config.source.kind) {
        (Err(error), SourceKind::Cdc) => return Err(error.into()),
        (logical, _) => logical,
    };
    if config.source.kind == SourceKind::Cdc {
        // Nodes starting together race on the publication and the slot;
        // a passing failure (a connection ended, a lock) is tried again.
        let mut tries = 0;
        let created = loop {
            match store.ensure().await {
                Ok(created) => break created,
                Err(error) if error.is_retriable() && tries < 10 => {
                    tries += 1;
                    tracing::warn!(%error, "could not ready the replication slot; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(error) => return Err(error.into()),
            }
        };
        if created {
            tracing::info!(slot = %store.slot, publication = %store.publication, "created the replication slot");
        }
    }
    let set = sqlx::query(&format!(
        "update {} set mode = $1 where mode is null",
        names.table("outbox_leases")
    ))
    .bind(kind)
    .execute(pool)
    .await
    .map_err(StoreError::from)?;
    if set.rows_affected() > 0 {
        tracing::info!(
            partitions = set.rows_affected(),
            mode = kind,
            "set the relay mode of partitions that had none"
        );
    }
    if let Err(error) = logical {
        tracing::info!(%error, "CDC unavailable on this server: relaying polled partitions only");
        return Ok(None);
    }
    let hub = Arc::new(Hub::new(partitions, config.cdc.buffer_events));
    let keeper = Keeper {
        store,
        hub: Arc::clone(&hub),
        member: member.clone(),
        spec: StreamSpec {
            url: config.cdc_database_url().clone(),
            schema: config.database.schema.clone(),
            status_interval: config.cdc.status_interval(),
            application_name: format!("outbox-cdc/{}", config.cluster.node_id),
            shards: partitions,
        },
        ttl: config.cluster.lease_ttl(),
        tick: config.cluster.heartbeat_interval(),
        heartbeat: config.cdc.heartbeat(),
    };
    tokio::spawn(keeper.run(services.clone()));
    Ok(Some(CdcSide::new(hub, relay_pool.clone(), names)))
}

/// Runs a relay node with `config` until `shutdown` is cancelled, then
/// drains, releases its leases and returns.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), EngineError> {
    config.validate()?;
    let names = Names::new(&config.database.schema)?;
    let app_name = format!("outbox/{}", config.cluster.node_id);
    // Readiness, start-up and the CDC keeper on a small pool apart from the
    // relay's; the partitions' leases have one of their own, on the node's
    // own thread (`run_node_apart`).
    let pool = pgstore::connect_as(&config.database, 3, &app_name, &[]).await?;
    let relay_pool = pgstore::connect_as(
        &config.database,
        config.database.max_connections,
        &app_name,
        pgstore::RELAY_SESSION,
    )
    .await?;
    let partitions = pgstore::partitions(&pool, &names).await?;
    let sink = KafkaSink::new(&config.kafka)?;
    sink.check().await.map_err(|error| EngineError::Broker {
        brokers: config.kafka.brokers.clone(),
        error,
    })?;
    let sink = Arc::new(sink);
    // Everything besides the node stops after the node has drained.
    let services = CancellationToken::new();
    let readiness = Arc::new(Readiness::default());
    readiness.set(true, true);
    if let Some(addr) = config.http.socket_addr()? {
        let metrics = ops::metrics::install().map_err(EngineError::Metrics)?;
        let (listener, bound) = ops::http::bind(addr)
            .await
            .map_err(|error| EngineError::Http { addr, error })?;
        tracing::info!(addr = %bound, "operations endpoint: /metrics /healthz /readyz");
        let state = ops::http::OpsState {
            metrics,
            readiness: Arc::clone(&readiness),
        };
        tokio::spawn(ops::http::serve(listener, state, services.clone()));
    }
    tokio::spawn(ops::readiness::watch(
        Arc::clone(&readiness),
        pool.clone(),
        Arc::clone(&sink),
        READINESS_PERIOD,
        READINESS_TIMEOUT,
        services.clone(),
    ));
    let member = Member {
        node_id: config.cluster.node_id.clone(),
        incarnation: Uuid::now_v7(),
    };
    tracing::info!(node = %member.node_id, partitions, brokers = %config.kafka.brokers, "starting relay node");
    let poll = Arc::new(PgSource::new(relay_pool.clone(), &names, partitions));
    {
        let source = Arc::clone(&poll);
        let (period, stop) = (config.relay.poll_interval(), services.clone());
        tokio::spawn(async move { source.ring_doorbells(period, stop).await });
    }
    let cdc = start_cdc(
        &config,
        &names,
        &pool,
        &relay_pool,
        partitions,
        &member,
        &services,
    )
    .await?;
    let source = Arc::new(ModalSource::new(poll, cdc));
    let node = {
        let sink = Arc::clone(&sink);
        let dead_letters = Arc::new(PgDeadLetters::new(relay_pool.clone(), &names));
        let (relay, cluster) = (config.relay.clone(), config.cluster.clone());
        let spawner = tokio::runtime::Handle::current();
        move |leases| Node {
            member,
            source,
            sink,
            leases,
            dead_letters,
            relay,
            cluster,
            spawner,
        }
    };
    // Housekeeping on its own two connections (a check, and a truncation
    // under its lock): a slow check never holds up a lease renewal.
    let housekeeping_pool = pgstore::connect_as(
        &config.database,
        2,
        &app_name,
        pgstore::HOUSEKEEPING_SESSION,
    )
    .await?;
    tokio::spawn(crate::store::housekeeping::run(
        housekeeping_pool.clone(),
        names.clone(),
        HOUSEKEEPING_PERIOD,
        services.clone(),
    ));
    let result = run_node_apart(node, &config, &app_name, &names, shutdown).await;
    services.cancel();
    result?;
    // Whatever is left was not acknowledged: the next owner sends it again.
    if let Err(error) = sink.flush(FINAL_FLUSH).await {
        tracing::warn!(%error, "the producer still held messages at exit; they will be sent again");
    }
    relay_pool.close().await;
    housekeeping_pool.close().await;
    pool.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Runs the node supervisor on a thread and runtime of its own, with its
/// lease store on connections of its own (made on that runtime, so their
/// I/O is driven there too); workers and samplers still run on the caller's
/// runtime (`node.spawner`). Busy workers then cannot delay a lease renewal:
/// before, 16 workers decoding a 5M backlog's keys on the shared runtime
/// held the node's task back 3 s and more, past the lease's deadline
/// (every worker revoked, 14,000 events sent twice). Kafka clients keep
/// their heartbeat on a thread of its own for the same reason.
async fn run_node_apart<S, K, D, F>(
    node: F,
    config: &Config,
    app_name: &str,
    names: &Names,
    shutdown: CancellationToken,
) -> Result<(), EngineError>
where
    S: crate::relay::EventSource,
    K: Sink,
    D: crate::relay::DeadLetters,
    F: FnOnce(Arc<PgLeaseStore>) -> Node<S, K, PgLeaseStore, D> + Send + 'static,
{
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let database = config.database.clone();
    let (app_name, names) = (app_name.to_string(), names.clone());
    let thread = std::thread::Builder::new()
        .name("outbox-leases".into())
        .spawn(move || {
            let result = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime.block_on(async move {
                    let pool = pgstore::connect_as(&database, 2, &app_name, &[]).await?;
                    let node = node(Arc::new(PgLeaseStore::new(pool.clone(), &names)));
                    let result = node.run(shutdown).await;
                    pool.close().await;
                    result.map_err(EngineError::from)
                }),
                Err(error) => Err(EngineError::Runtime(format!(
                    "cannot start the lease runtime: {error}"
                ))),
            };
            let _ = done_tx.send(result);
        })
        .map_err(|error| EngineError::Runtime(format!("cannot start the lease thread: {error}")))?;
    let result = done_rx.await.unwrap_or_else(|_| {
        Err(EngineError::Runtime(
            "the lease thread ended without a result (it panicked)".into(),
        ))
    });
    // It has sent its result; what is left is the runtime's teardown.
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    result
}
