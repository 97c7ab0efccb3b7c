//! The drain's loading SQL: the application side of the benchmark, which
//! fills the outbox server-side (5M rows sent from loadgen through the
//! engine's `Enqueuer` would take minutes of loading for nothing the
//! drain measures). Built from the validated schema name; what the drain
//! reads of the engine's state goes through [`crate::engine_state`].

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_name_the_schema() {
        assert!(load_chunk("bench").starts_with("insert into bench.outbox ("));
        assert_eq!(analyze("bench"), "analyze bench.outbox");
    }
}
