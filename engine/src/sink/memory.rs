//! A sink that keeps what it is sent in memory, for tests of the relay loop
//! and for benchmarks that leave the broker out.

use std::sync::Mutex;

use crate::error::SinkError;
use crate::event::OutboxEvent;
use crate::sink::{Delivery, DeliveryReport, Sink};

type FailWhen = Box<dyn Fn(&OutboxEvent) -> Option<SinkError> + Send>;

/// Records every event it is sent; can be told to fail events.
#[derive(Default)]
pub struct MemorySink {
    sent: Mutex<Vec<OutboxEvent>>,
    fail: Mutex<Option<FailWhen>>,
}

impl MemorySink {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every event sent so far (including those it failed), in order.
    pub fn sent(&self) -> Vec<OutboxEvent> {
        self.sent.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Makes the sink fail the events for which `f` returns an error.
    pub fn fail_when(&self, f: impl Fn(&OutboxEvent) -> Option<SinkError> + Send + 'static) {
        if let Ok(mut slot) = self.fail.lock() {
            *slot = Some(Box::new(f));
        }
    }
}

impl Sink for MemorySink {
    async fn send(&self, events: &[OutboxEvent]) -> Result<Delivery, SinkError> {
        let poisoned = || SinkError::Transient("memory sink lock poisoned".into());
        let fail = self.fail.lock().map_err(|_| poisoned())?;
        let mut report = DeliveryReport::default();
        for e in events {
            if let Some(err) = fail.as_ref().and_then(|f| f(e)) {
                report.failed.push((e.id, err));
            }
        }
        self.sent
            .lock()
            .map_err(|_| poisoned())?
            .extend_from_slice(events);
        Ok(Delivery::ready(report))
    }

    async fn check(&self) -> Result<(), SinkError> {
        Ok(())
    }
}
