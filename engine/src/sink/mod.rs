//! Where events go. A sink takes a batch, puts every event of it in flight
//! at once, and reports per batch once the broker acknowledged (or refused)
//! each of them. The relay acknowledges nothing to the source before that.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::oneshot;
use uuid::Uuid;

use crate::error::SinkError;
use crate::event::OutboxEvent;

#[cfg(feature = "kafka")]
pub mod kafka;
pub mod routing;

/// A destination for outbox events.
pub trait Sink: Send + Sync + 'static {
    /// Hands every event of `events` to the sink, in order, without waiting
    /// for acknowledgements. Fails only if the batch could not be started at
    /// all (nothing of it is then in flight that the caller must wait for).
    fn send(
        &self,
        events: &[OutboxEvent],
    ) -> impl Future<Output = Result<Delivery, SinkError>> + Send;

    /// Whether the sink can currently reach its broker.
    fn check(&self) -> impl Future<Output = Result<(), SinkError>> + Send;
}

/// The outcome of one batch: which events were not acknowledged, and why.
#[derive(Debug, Default)]
pub struct DeliveryReport {
    pub failed: Vec<(Uuid, SinkError)>,
}

/// Resolves when every event of a batch is acknowledged or has failed.
#[derive(Debug)]
pub struct Delivery {
    rx: oneshot::Receiver<DeliveryReport>,
}

impl Delivery {
    /// A delivery and the handle its sink completes it with.
    pub fn channel() -> (oneshot::Sender<DeliveryReport>, Delivery) {
        let (tx, rx) = oneshot::channel();
        (tx, Delivery { rx })
    }
}

impl Future for Delivery {
    type Output = Result<DeliveryReport, SinkError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx).poll(cx).map(|r| {
            r.map_err(|_| SinkError::Transient("the sink dropped a batch before reporting".into()))
        })
    }
}
