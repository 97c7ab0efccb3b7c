//! The writers' SQL, as the application under load writes it, each
//! statement built once from the validated schema name: its business
//! table, and the plain insert into the outbox of `--mode sql`. (What
//! loadgen reads of the engine's own tables goes through the engine's
//! library: [`crate::engine_state`].)

pub const SERVER_VERSION: &str = "select version()";

/// The business table every transaction writes a row to, beside its events.
pub fn create_orders(schema: &str) -> String {
    format!(
        "create table if not exists {schema}.loadgen_orders (
            id uuid primary key,
            aggregate_id text not null,
            amount bigint not null,
            created_at timestamptz not null default now()
        )"
    )
}

pub fn insert_order(schema: &str) -> String {
    format!("insert into {schema}.loadgen_orders (id, aggregate_id, amount) values ($1, $2, $3)")
}

/// Parameters bound per event by [`insert_events`].
pub const PARAMS_PER_EVENT: usize = 6;

/// A plain multi-row insert of `n` events, as an application without the
/// engine's library would write it: `(id, aggregate_type, aggregate_id,
/// event_type, payload, headers)` per row.
pub fn insert_events(schema: &str, n: usize) -> String {
    let mut sql = format!(
        "insert into {schema}.outbox (id, aggregate_type, aggregate_id, event_type, payload, headers) values "
    );
    for i in 0..n {
        let p = i * PARAMS_PER_EVENT;
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!(
            "(${}, ${}, ${}, ${}, ${}::jsonb, ${}::jsonb)",
            p + 1,
            p + 2,
            p + 3,
            p + 4,
            p + 5,
            p + 6
        ));
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_row_insert_numbers_its_parameters() {
        let sql = insert_events("public", 2);
        assert!(sql.starts_with("insert into public.outbox (id, aggregate_type"));
        assert!(sql.ends_with(
            "values ($1, $2, $3, $4, $5::jsonb, $6::jsonb), ($7, $8, $9, $10, $11::jsonb, $12::jsonb)"
        ));
    }
}
