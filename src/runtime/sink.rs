//! The end of the outbound stack: hands encoded publishes to the connection
//! and resolves when the broker confirms them.
//!
//! Every publish is confirmed before it resolves: QoS 1 by the broker's PUBACK,
//! QoS 2 by its PUBCOMP, QoS 0 once written to the connection. While the
//! connection is down, publishes wait in the bounded offline buffer and go
//! out, in order, once it is back. The sink only ever *tries* to put a request
//! into rumqttc's channel and buffers when it is full, so a handler that
//! publishes cannot deadlock the runtime.
//!
//! Every attempt is logged at `DEBUG` with its topic, QoS, retain flag and
//! correlation id (the envelope's id, which the outbound encode layer puts on
//! the request; the heartbeat, which is not an envelope, has none).

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use tokio::sync::oneshot;
use tower::Service;

use super::outbox::{Outbox, Outgoing};
use crate::{
    correlation::CorrelationId, layers::outbound::packet_size, publisher::PublishError,
    request::Request,
};

/// See the [module docs](self).
#[derive(Clone)]
pub(crate) struct Sink {
    outbox: Arc<Outbox>,
    max_packet_size: usize,
    metrics: Arc<[SinkMetrics; 3]>,
    counts: Arc<PublishCounts>,
}

/// Publishes sent and confirmed, for `Stats`.
#[derive(Debug, Default)]
pub(crate) struct PublishCounts {
    pub(crate) sent: std::sync::atomic::AtomicU64,
    pub(crate) confirmed: std::sync::atomic::AtomicU64,
}

/// What the sink counts per QoS, through the `metrics` facade.
struct SinkMetrics {
    sent: metrics::Counter,
    confirmed: metrics::Counter,
    duration: metrics::Histogram,
}

impl SinkMetrics {
    fn new(qos: &'static str) -> Self {
        use crate::metrics as names;
        Self {
            sent: metrics::counter!(names::SENT_MESSAGES, names::SYSTEM => "mqtt", names::QOS => qos),
            confirmed: metrics::counter!(
                names::CONFIRMED_MESSAGES,
                names::SYSTEM => "mqtt",
                names::QOS => qos
            ),
            duration: metrics::histogram!(
                names::OPERATION_DURATION,
                names::SYSTEM => "mqtt",
                names::OPERATION => "publish",
                names::QOS => qos
            ),
        }
    }
}

impl Sink {
    pub(crate) fn new(outbox: Arc<Outbox>, max_packet_size: usize) -> Self {
        Self {
            outbox,
            max_packet_size,
            metrics: Arc::new(["0", "1", "2"].map(SinkMetrics::new)),
            counts: Arc::default(),
        }
    }

    /// What this sink (and its clones) sent and had confirmed.
    pub(crate) fn counts(&self) -> Arc<PublishCounts> {
        self.counts.clone()
    }

    fn start(
        &self,
        req: &Request<Bytes>,
    ) -> Result<impl Future<Output = Result<(), PublishError>> + Send + 'static, PublishError> {
        let topic = req.topic().as_str();
        // The outbound stack's size guard checks the same; this catches what
        // reaches the sink past it (the heartbeat).
        let size = packet_size(topic, req.body().len());
        if size > self.max_packet_size {
            return Err(PublishError::TooLarge {
                topic: topic.to_owned(),
                size,
                max: self.max_packet_size,
            });
        }
        let correlation_id = req.correlation_id().map_or("", CorrelationId::as_str);
        tracing::debug!(
            %topic,
            qos = u8::from(req.qos()),
            retain = req.retain(),
            %correlation_id,
            bytes = req.body().len(),
            "publishing"
        );
        let (tx, rx) = oneshot::channel();
        let message = Outgoing {
            topic: topic.to_owned(),
            qos: req.qos(),
            retain: req.retain(),
            payload: req.body().clone(),
            properties: req.shared_properties().cloned(),
        };
        self.outbox.send(message, Some(tx))?;
        let (metrics, counts) = (self.metrics.clone(), self.counts.clone());
        let qos = usize::from(u8::from(req.qos()));
        counts
            .sent
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        metrics[qos].sent.increment(1);
        let sent_at = std::time::Instant::now();
        Ok(async move {
            match rx.await {
                Ok(Ok(())) => {
                    counts
                        .confirmed
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let metrics = &metrics[qos];
                    metrics.confirmed.increment(1);
                    metrics.duration.record(sent_at.elapsed());
                    Ok(())
                }
                Ok(Err(err)) => Err(err.into()),
                Err(_) => Err(PublishError::Closed),
            }
        })
    }
}

impl Service<Request<Bytes>> for Sink {
    type Response = ();
    type Error = PublishError;
    type Future = Pin<Box<dyn Future<Output = Result<(), PublishError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        match self.start(&req) {
            Ok(fut) => Box::pin(fut),
            Err(err) => Box::pin(std::future::ready(Err(err))),
        }
    }
}
