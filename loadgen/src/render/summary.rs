//! `summary.md` of each kind of run: what was run, the results as a
//! table, the charts, the machine. Pure: drawn from the report.

use std::fmt::Write as _;

use crate::cli::{BrokerConfig, DrainConfig, RunConfig};
use crate::report::broker::BrokerResults;
use crate::report::drain::DrainResults;
use crate::report::e2e::{Results, WriteResults};
use crate::report::{AnyReport, Latency, Machine, Report};

/// The summary of any report.
pub fn summary(report: &AnyReport) -> String {
    match report {
        AnyReport::E2e(r) => e2e(r),
        AnyReport::WriteOnly(r) => write_only(r),
        AnyReport::Broker(r) => broker(r),
        AnyReport::Drain(r) => drain(r),
    }
}

/// A two-column Markdown table.
pub fn table(rows: &[(&str, String)]) -> String {
    let mut s = String::from("| metric | value |\n|---|---|\n");
    for (k, v) in rows {
        let _ = writeln!(s, "| {k} | {v} |");
    }
    s
}

/// `p50 / p99 / p99.9 / max` for tables.
fn cells(l: &Latency) -> String {
    format!("{:.2} / {:.2} / {:.2} / {:.2}", l.p50, l.p99, l.p999, l.max)
}

/// The machine in one line.
pub fn machine_line(m: &Machine) -> String {
    let mut s = format!(
        "{} cores, {}, {} {}; {}",
        m.cores, m.cpu_model, m.os, m.kernel, m.postgres_version
    );
    if let Some(b) = &m.broker {
        let _ = write!(s, "; broker {b}");
    }
    let _ = write!(s, "; {}; loadgen {}.", m.rustc, m.loadgen_version);
    s
}

fn describe(c: &RunConfig) -> String {
    let rate = if c.rate > 0.0 {
        format!("{} events/s open loop", c.rate)
    } else {
        "as fast as possible".into()
    };
    format!(
        "`{}` mode, {rate}, {} s, {} writers, {} events/tx, ~{} B payloads, \
         {} aggregates over {}.",
        c.mode,
        c.duration_secs,
        c.writers,
        c.events_per_tx,
        c.payload_bytes,
        c.aggregates,
        c.aggregate_types.join(", "),
    )
}

/// The title, the run's configuration and the engine line of a run's page.
fn heading<R>(report: &Report<RunConfig, R>) -> String {
    let mut s = format!(
        "# loadgen {} `{}` ({})\n\n",
        report.kind, report.name, report.run_id
    );
    let _ = writeln!(s, "{}", describe(&report.config));
    s.push_str(&engine_line(report));
    s.push('\n');
    s
}

fn engine_line<C, R>(r: &Report<C, R>) -> String {
    match &r.engine {
        Some(e) => format!(
            "\nEngine: {} node(s), {} outbox partitions, {} ({}).\n",
            e.nodes, e.partitions, e.version, e.binary
        ),
        None => String::new(),
    }
}

pub fn e2e(report: &Report<RunConfig, Results>) -> String {
    let r = &report.results;
    let mut s = heading(report);
    let lag = match &r.lag {
        Some(l) => format!(
            "max {}, {} at end of load, growth {:.0}/s: {}",
            l.max,
            l.at_end_of_load,
            l.growth_eps,
            if l.bounded { "bounded" } else { "NOT bounded" }
        ),
        None => "–".into(),
    };
    let t = r.timestamp_types;
    let rows = [
        ("committed events", r.committed.to_string()),
        ("transactions", r.transactions.to_string()),
        ("delivered (unique)", r.delivered.to_string()),
        ("lost", r.lost.to_string()),
        ("duplicates", r.duplicates.to_string()),
        ("consumer re-reads", r.consumer_rereads.to_string()),
        ("order violations", r.order_violations.to_string()),
        ("unexpected", r.unexpected.to_string()),
        ("drain complete", r.drain_complete.to_string()),
        (
            "commit rate (events/s)",
            format!("{:.0}", r.commit_rate_eps),
        ),
        ("throughput (events/s)", format!("{:.0}", r.throughput_eps)),
        ("lag (events)", lag),
        (
            "latency commit→receive ms (p50 / p99 / p99.9 / max)",
            cells(&r.latency_ms),
        ),
        (
            "latency to broker ms (p50 / p99 / p99.9 / max)",
            format!(
                "{}: {}",
                r.broker_latency.description,
                cells(&r.broker_latency.latency_ms)
            ),
        ),
        (
            "latency intended→receive ms (p50 / p99 / p99.9 / max)",
            cells(&r.latency_from_intended_ms),
        ),
        (
            "transaction ms (p50 / p99 / p99.9 / max)",
            cells(&r.tx_latency_ms),
        ),
        (
            "message timestamps (log append / create / none)",
            format!("{} / {} / {}", t.log_append_time, t.create_time, t.none),
        ),
        (
            "write / delivery / drain s",
            format!(
                "{:.2} / {:.2} / {:.2}",
                r.write_secs, r.delivery_secs, r.drain_secs
            ),
        ),
    ];
    s.push_str(&table(&rows));
    if let Some(i) = &r.inbox {
        let _ = writeln!(
            s,
            "\nThrough the consumer inbox: duplicates delivered: {}, applied twice: {} \
                 ({} applied, {} skipped as already processed).",
            i.duplicates_delivered, i.applied_twice, i.applied, i.skipped
        );
    }
    if let Some(d) = r.duplicate_samples.first() {
        let _ = writeln!(
                s,
                "\nFirst duplicate: event {} (aggregate {}) at partition {} offset {}, again at partition {} offset {}.",
                d.id, d.key, d.first.partition, d.first.offset, d.again.partition, d.again.offset
            );
    }
    s.push_str(CHARTS);
    let _ = writeln!(s, "\nMachine: {}", machine_line(&report.machine));
    s
}

const CHARTS: &str = "\n![throughput](throughput.svg)\n![lag](lag.svg)\n![latency](latency.svg)\n";

pub fn write_only(report: &Report<RunConfig, WriteResults>) -> String {
    let r = &report.results;
    let mut s = heading(report);
    let rows = [
        ("committed events", r.committed.to_string()),
        ("transactions", r.transactions.to_string()),
        (
            "commit rate (events/s)",
            format!("{:.0}", r.commit_rate_eps),
        ),
        (
            "transaction ms (p50 / p99 / p99.9 / max)",
            cells(&r.tx_latency_ms),
        ),
        ("write s", format!("{:.2}", r.write_secs)),
        (
            "outbox empty after the last commit (s)",
            r.outbox_empty_after_secs
                .map_or("–".into(), |x| format!("{x:.2}")),
        ),
    ];
    s.push_str(&table(&rows));
    s.push_str("\n![throughput](throughput.svg)\n![latency](latency.svg)\n");
    let _ = writeln!(s, "\nMachine: {}", machine_line(&report.machine));
    s
}

pub fn broker(report: &Report<BrokerConfig, BrokerResults>) -> String {
    let c = &report.config;
    let r = &report.results;
    let mut s = format!(
        "# loadgen broker-ceiling `{}` ({})\n\n",
        report.name, report.run_id
    );
    s.push_str(&format!(
        "Messages like the engine's (~{} B JSON payloads, {} keys, {} topics of {} partitions) \
         produced straight to the broker for up to {} s, with the engine's producer settings.\n\n",
        c.payload_bytes,
        c.aggregates,
        c.aggregate_types.len(),
        c.topic_partitions,
        c.duration_secs
    ));
    let rows = [
        ("sent", r.sent.to_string()),
        ("acked", r.acked.to_string()),
        ("failed", r.failed.to_string()),
        ("acked/s", format!("{:.0}", r.acked_per_sec)),
        (
            "send → ack ms (p50 / p99 / p99.9 / max)",
            cells(&r.ack_latency_ms),
        ),
        ("seconds", format!("{:.2}", r.secs)),
    ];
    s.push_str(&table(&rows));
    s.push_str("\n![throughput](throughput.svg)\n![in flight](lag.svg)\n![latency](latency.svg)\n");
    s.push_str(&format!("\nMachine: {}\n", machine_line(&report.machine)));
    s
}

pub fn drain(report: &Report<DrainConfig, DrainResults>) -> String {
    let c = &report.config;
    let r = &report.results;
    let mut s = format!("# loadgen drain `{}` ({})\n\n", report.name, report.run_id);
    s.push_str(&format!(
        "A backlog of {} events (~{} B payloads, {} aggregates) loaded with no engine running, \
         then {} engine node(s) on {} outbox partitions started from a standing start.\n\n",
        c.events, c.payload_bytes, c.aggregates, c.nodes, c.partitions
    ));
    let rows = [
        ("events", r.events.to_string()),
        (
            "drain: engine start → outbox empty (s)",
            format!("{:.2}", r.drain_secs),
        ),
        ("drain rate (events/s)", format!("{:.0}", r.drain_eps)),
        ("drained before the timeout", r.drained.to_string()),
        (
            "delivered (unique, counted by consuming)",
            r.delivered.to_string(),
        ),
        ("lost", r.lost.to_string()),
        ("duplicates", r.duplicates.to_string()),
        ("consumer re-reads", r.consumer_rereads.to_string()),
        ("order violations", r.order_violations.to_string()),
        ("malformed", r.malformed.to_string()),
        (
            "load (s, events/s)",
            format!("{:.1}, {:.0}", r.load_secs, r.load_eps),
        ),
        ("analyze (s)", format!("{:.1}", r.analyze_secs)),
        ("counting by consuming (s)", format!("{:.1}", r.verify_secs)),
        (
            "engine stopped cleanly",
            r.engine_stopped_cleanly.to_string(),
        ),
    ];
    s.push_str(&table(&rows));
    s.push_str(
        "\nThe charts' rates come from `pg_stat_user_tables.n_live_tup`, an estimate that lags \
         up to a second; the drain time is exact (polled every 200 ms).\n\n\
         ![drain rate](throughput.svg)\n![backlog](lag.svg)\n",
    );
    s.push_str(&format!("\nMachine: {}\n", machine_line(&report.machine)));
    s
}
