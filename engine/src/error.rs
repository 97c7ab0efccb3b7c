//! Error types of each layer, with a way to tell what is worth retrying.

use std::fmt;

/// Bad configuration: names the field and says what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {field}: {message}")]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, message: impl fmt::Display) -> Self {
        Self {
            field: field.into(),
            message: message.to_string(),
        }
    }
}

/// Errors of the PostgreSQL store (outbox tables, leases, schema).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The schema in the database does not match what was asked for.
    #[error("{0}")]
    Schema(String),
    /// The store was asked for something that contradicts the configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl StoreError {
    /// Whether the operation may succeed if tried again later (the database
    /// restarted, the network blipped, the pool was busy).
    pub fn is_retriable(&self) -> bool {
        match self {
            StoreError::Database(e) => match e {
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
                | sqlx::Error::WorkerCrashed => true,
                sqlx::Error::Database(db) => {
                    // Class 08 (connection), 40 (serialization/deadlock),
                    // 53 (resources), 57 (operator intervention: shutdown,
                    // restart), 55P03 (lock not available).
                    let code = db.code();
                    let code = code.as_deref().unwrap_or("");
                    code.starts_with("08")
                        || code.starts_with("40")
                        || code.starts_with("53")
                        || code.starts_with("57")
                        || code == "55P03"
                }
                _ => false,
            },
            StoreError::Schema(_) | StoreError::Config(_) => false,
        }
    }
}

/// Errors of a sink (the broker).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// Worth retrying: the broker is away, a queue is full, a leader moved.
    #[error("transient: {0}")]
    Transient(String),
    /// Will fail again however often it is tried: the message is too large,
    /// the topic name is invalid, authorization was refused.
    #[error("permanent: {0}")]
    Permanent(String),
    /// The broker refused a request for its size. That may be the fault of
    /// one event or of a batch of innocent ones: only an event refused on
    /// its own is poison.
    #[error("too large: {0}")]
    TooLarge(String),
}

impl SinkError {
    pub fn is_retriable(&self) -> bool {
        matches!(self, SinkError::Transient(_))
    }
}
