//! Bad input at the doors: rows that break the SQL contract are refused by
//! the schema with a message naming the rule, and secrets given to the
//! engine never reach its output.

use std::time::Duration;

use outbox_harness::*;

/// Inserts one row; returns the database's error message, if refused.
async fn refused(db: &TestDb, columns: &str, values: &str) -> Option<String> {
    sqlx::query(&format!("insert into outbox ({columns}) values ({values})"))
        .execute(&db.pool)
        .await
        .err()
        .map(|e| e.to_string())
}

#[tokio::test]
async fn rows_that_break_the_contract_are_refused_with_the_rule_named() {
    let db = TestDb::new(2).await;
    let cols = "aggregate_type, aggregate_id, event_type, payload, headers";
    let cases = [
        ("'order', null, 'E', '{}', null", "aggregate_id"),
        (
            "'order', '', 'E', '{}', null",
            "outbox_aggregate_id_not_empty",
        ),
        ("null, '1', 'E', '{}', null", "aggregate_type"),
        (
            "'', '1', 'E', '{}', null",
            "outbox_aggregate_type_not_empty",
        ),
        (
            "'order', '1', 'E', '{}', '[1, 2]'",
            "outbox_headers_object_of_strings",
        ),
        (
            "'order', '1', 'E', '{}', '{\"n\": 1}'",
            "outbox_headers_object_of_strings",
        ),
        (
            "'order', '1', 'E', '{}', '\"text\"'",
            "outbox_headers_object_of_strings",
        ),
        (
            "'order', '1', 'E', '{not json', null",
            "invalid input syntax for type json",
        ),
        ("'order', '1', 'E', null, null", "payload"),
    ];
    for (values, rule) in cases {
        let err = refused(&db, cols, values)
            .await
            .unwrap_or_else(|| panic!("accepted: {values}"));
        assert!(err.contains(rule), "{values}: {err:?} does not name {rule}");
    }
    assert!(
        refused(&db, cols, "'order', '1', 'E', '{}', '{\"a\": \"b\"}'")
            .await
            .is_none()
    );

    // A payload limit set at migrate time.
    let migrate = [
        "migrate",
        "--partitions",
        "2",
        "--max-payload-bytes",
        "1000",
    ];
    succeed(outbox_command(&db).args(migrate), "migrate").await;
    let big = format!(
        "'order', '1', 'E', '{{\"pad\": \"{}\"}}', null",
        "x".repeat(2000)
    );
    let err = refused(&db, cols, &big)
        .await
        .expect("an oversized payload was accepted");
    assert!(err.contains("outbox_payload_size"), "{err}");
    let small = format!(
        "'order', '1', 'E', '{{\"pad\": \"{}\"}}', null",
        "x".repeat(500)
    );
    assert!(refused(&db, cols, &small).await.is_none());
    assert_eq!(db.pending().await, 2, "only the two valid rows are in");
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_output() {
    let db = TestDb::new(1).await;
    // Trust authentication ignores the password, so the node runs normally.
    let url = db.url.replacen(
        "postgres://postgres@",
        "postgres://postgres:pg-s3cret-pw@",
        1,
    );
    assert_ne!(
        url, db.url,
        "test database URL has an unexpected form: {}",
        db.url
    );
    let dir =
        std::env::temp_dir().join(format!("outbox-secrets-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("outbox.toml");
    std::fs::write(
        &cfg,
        "[kafka.properties]\n\"sasl.username\" = \"svc\"\n\"sasl.password\" = \"kafka-s3cret-pw\"\n",
    )
    .unwrap();

    let mut check = outbox_command(&db);
    check.env("DATABASE_URL", &url).arg("check-config");
    check.arg("--config").arg(&cfg).args(["--node-id", "s1"]);
    let out = succeed(&mut check, "check-config").await;
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("sasl.password") && shown.contains("****"),
        "{shown}"
    );

    let log = dir.join("run.log");
    let mut node = node_command(&db, "s1", &unique_prefix())
        .env("DATABASE_URL", &url)
        .env("RUST_LOG", "debug")
        .args(["--config", cfg.to_str().unwrap()])
        .stdout(std::fs::File::create(dir.join("run.out")).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    send_signal(&node, "TERM");
    node.wait().await.unwrap();
    let logged = std::fs::read_to_string(&log).unwrap()
        + &std::fs::read_to_string(dir.join("run.out")).unwrap();
    assert!(
        logged.len() > 1000,
        "the debug log is suspiciously short:\n{logged}"
    );
    for output in [
        shown.to_string(),
        logged,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ] {
        assert!(!output.contains("pg-s3cret-pw"), "database password leaked");
        assert!(!output.contains("kafka-s3cret-pw"), "kafka password leaked");
    }
    db.drop_db().await;
}
