//! The suite's database: dropped and created for each configuration on
//! the server of the given URL, so every run starts from an empty,
//! unbloated outbox.

use anyhow::{Context, Result};
use sqlx::Connection;

use crate::writer;

/// `url` with its database name replaced by `database` (which the caller
/// validated as an identifier); keeps user, password, host, port and
/// query parameters.
pub fn with_database(url: &str, database: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => (&url[..i + 3], &url[i + 3..]),
        None => ("", url),
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let query = match tail.find('?') {
        Some(q) => &tail[q..],
        None => "",
    };
    format!("{scheme}{authority}/{database}{query}")
}

/// Drops (terminating its sessions) and creates `database`.
pub async fn recreate(server_url: &str, database: &str) -> Result<()> {
    let mut conn = writer::connect(server_url).await?;
    sqlx::raw_sql(&format!("drop database if exists {database} with (force)"))
        .execute(&mut conn)
        .await
        .with_context(|| format!("dropping database {database}"))?;
    sqlx::raw_sql(&format!("create database {database}"))
        .execute(&mut conn)
        .await
        .with_context(|| format!("creating database {database}"))?;
    conn.close().await.ok();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_name_is_replaced() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/test", "outbox_bench"),
            "postgres://postgres@127.0.0.1:5432/outbox_bench"
        );
        assert_eq!(
            with_database("postgresql://u:p%2Fw@h/db?sslmode=require", "b"),
            "postgresql://u:p%2Fw@h/b?sslmode=require"
        );
        assert_eq!(with_database("postgres://h:1", "b"), "postgres://h:1/b");
        assert_eq!(
            with_database("postgres://h?application_name=x", "b"),
            "postgres://h/b?application_name=x"
        );
        assert_eq!(
            with_database("postgres:///db?host=/run/pg", "b"),
            "postgres:///b?host=/run/pg"
        );
    }
}
