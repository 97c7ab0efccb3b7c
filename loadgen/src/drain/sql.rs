//! The drain's SQL, built from the validated schema name.

/// One chunk of the backlog, generated server-side: rows `g` of
/// `generate_series($6, $7, $8)`, aggregate `g % $2` with type
/// `$1[(g % $2) % n]` (as in `run`), payload `{"seq": g, "pad": $4}`,
/// header `loadgen_run = $5`. Positions follow `g` within a statement.
pub fn load_chunk(schema: &str) -> String {
    format!(
        "insert into {schema}.outbox (aggregate_type, aggregate_id, event_type, payload, headers)
         select ($1::text[])[((g % $2) % cardinality($1::text[])) + 1],
                (g % $2)::text,
                $3,
                jsonb_build_object('seq', g, 'pad', $4::text),
                jsonb_build_object('loadgen_run', $5::text)
         from generate_series($6::bigint, $7::bigint, $8::bigint) g"
    )
}

/// Fresh statistics after the bulk load, so the engine's first fetches
/// are planned on a table of millions of rows rather than an empty one,
/// as they would be for a backlog that built up over time.
pub fn analyze(schema: &str) -> String {
    format!("analyze {schema}.outbox")
}

/// Live rows in the outbox's partitions, from the statistics collector:
/// an estimate that lags up to a second, cheap enough to read every
/// second without slowing the drain (a `count(*)` would scan millions of
/// rows).
pub const LIVE_ROWS: &str = "select coalesce(sum(n_live_tup), 0)::bigint
     from pg_stat_user_tables where schemaname = $1 and relname like 'outbox\\_p%'";

/// Rows in the outbox, exactly (before the drain starts).
pub fn count(schema: &str) -> String {
    format!("select count(*) from {schema}.outbox")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_name_the_schema() {
        assert!(load_chunk("bench").starts_with("insert into bench.outbox ("));
        assert_eq!(analyze("bench"), "analyze bench.outbox");
        assert!(LIVE_ROWS.contains(r"'outbox\_p%'"));
    }
}
