//! The inbox's errors: configuration refused up front, database failures
//! (told apart into retriable and fatal), messages that cannot be read, and
//! a handler's own error carried through unchanged.

/// An error of the inbox itself.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    /// A setting that cannot work; names the field.
    #[error("{field}: {reason}")]
    Config { field: &'static str, reason: String },
    /// The inbox tables are missing or not the shape this version expects.
    #[error("inbox schema {schema:?} is not migrated: {reason} (run outbox_inbox::migrate)")]
    NotMigrated { schema: String, reason: String },
    /// A message that does not carry what the inbox needs (an `id` header).
    #[error("malformed message at {topic}/{partition}@{offset}: {reason}")]
    Malformed {
        topic: String,
        partition: i32,
        offset: i64,
        reason: String,
    },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[cfg(feature = "kafka")]
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

impl InboxError {
    /// Whether trying the same batch again can succeed: lost connections,
    /// pool timeouts, serialization failures and deadlocks, a server
    /// shutting down or out of resources. Everything else is fatal.
    pub fn is_retriable(&self) -> bool {
        match self {
            InboxError::Database(e) => is_retriable_sqlx(e),
            #[cfg(feature = "kafka")]
            InboxError::Kafka(_) => true,
            _ => false,
        }
    }
}

/// SQLSTATE classes a retry can cure: 08 connection, 40 transaction
/// rollback (serialization, deadlock), 53 insufficient resources, 57P0x
/// operator intervention (shutdown, crash recovery).
pub(crate) fn is_retriable_sqlx(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            c.starts_with("08")
                || c.starts_with("40")
                || c.starts_with("53")
                || c.starts_with("57P0")
        }),
        _ => false,
    }
}

/// What [`crate::Inbox::process`] can fail with: the inbox, or the
/// handler (its own error type, untouched). Either way the transaction
/// was rolled back: nothing of the batch is recorded or applied.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError<E> {
    #[error(transparent)]
    Inbox(#[from] InboxError),
    #[error("handler: {0}")]
    Handler(E),
}

impl<E> ProcessError<E> {
    /// Retriable inbox errors; a handler error is the handler's to judge.
    pub fn is_retriable(&self) -> bool {
        match self {
            ProcessError::Inbox(e) => e.is_retriable(),
            ProcessError::Handler(_) => false,
        }
    }
}

impl<E> From<sqlx::Error> for ProcessError<E> {
    fn from(e: sqlx::Error) -> Self {
        ProcessError::Inbox(InboxError::Database(e))
    }
}
