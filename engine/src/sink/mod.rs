//! Where events go. A sink takes a batch, puts its events in flight in
//! order, and reports per batch once the broker acknowledged (or refused)
//! each of them. The relay acknowledges nothing to the source before that.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;
use uuid::Uuid;

use crate::error::SinkError;
use crate::event::OutboxEvent;

#[cfg(feature = "kafka")]
pub mod kafka;
pub mod routing;
pub mod scripted;

/// How one batch may be sent.
#[derive(Debug, Clone, Copy)]
pub struct SendOptions {
    /// No event is handed to the broker at or after this instant (the end
    /// of the lease the batch is sent under).
    pub deadline: Instant,
    /// The producer session of the sender's batches still in flight, if any:
    /// the send is refused if the sink has started another session since,
    /// so that a partition never has batches of two sessions in flight.
    pub session: Option<u64>,
}

/// A batch the sink took.
#[derive(Debug)]
pub struct Sent {
    pub delivery: Delivery,
    /// The producer session the batch went out on.
    pub session: u64,
    /// How many events, from the first, were handed to the broker; the rest
    /// were refused at once (and the delivery reports them failed).
    pub accepted: usize,
}

/// A destination for outbox events.
pub trait Sink: Send + Sync + 'static {
    /// Hands the events of `events` to the broker, in order, without waiting
    /// for acknowledgements. Once an event is refused, none after it is
    /// handed over. Fails only if nothing of the batch was handed over.
    fn send(
        &self,
        events: &[OutboxEvent],
        options: SendOptions,
    ) -> impl Future<Output = Result<Sent, SinkError>> + Send;

    /// Whether the sink can currently reach its broker.
    fn check(&self) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// The longest an event handed to the sink may take to reach the broker
    /// or fail: after that, nothing sent under a lease can still land.
    fn delivery_timeout(&self) -> Duration;

    /// Gives up on everything not yet delivered (a shutdown that stopped
    /// waiting): every batch in flight reports its undelivered events failed.
    fn purge(&self) -> impl Future<Output = ()> + Send;
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
