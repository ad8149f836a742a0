//! The publisher every consumer gets: plain rumqttc, as fast as the broker
//! takes it or paced at a fixed rate.
//!
//! At QoS 1 a message counts as sent when its PUBACK arrives, and rumqttc's
//! in-flight window (100) bounds how many are unconfirmed at once: when it is
//! full the event loop stops taking requests and `publish` waits. At QoS 0 a
//! message counts as sent once rumqttc has written it.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use tokio::time::{timeout, Instant};

use crate::{
    broker::HOST,
    load::{now_epoch, payload},
};

/// Unconfirmed QoS 1 publishes at most (rumqttc's default window).
const IN_FLIGHT: u16 = 100;
/// How long connecting and disconnecting may take.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// What a run of the publisher did.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Fed {
    /// Messages confirmed (QoS 1) or written (QoS 0).
    pub(crate) sent: u64,
    /// Epoch seconds just before the first publish.
    pub(crate) first_epoch: f64,
    /// Epoch seconds when the last one was confirmed or written.
    pub(crate) last_epoch: f64,
}

/// A connected rumqttc publisher.
pub(crate) struct Feeder {
    client: AsyncClient,
    eventloop: EventLoop,
}

impl Feeder {
    /// Connects as `client_id` to the broker on `port`, with a clean session.
    pub(crate) async fn connect(port: u16, client_id: &str) -> Result<Self, String> {
        let mut options = MqttOptions::new(client_id, HOST, port);
        options
            .set_max_packet_size(1 << 20, 1 << 20)
            .set_inflight(IN_FLIGHT)
            .set_keep_alive(Duration::from_secs(60));
        let (client, mut eventloop) = AsyncClient::new(options, 1024);
        // Each message leaves when published, not when Nagle's algorithm
        // lets it: the latency cases time from the publish.
        let mut network = eventloop.network_options();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        let connack = async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                    Ok(_) => {}
                    Err(err) => return Err(format!("publisher connect: {err}")),
                }
            }
        };
        timeout(HANDSHAKE, connack)
            .await
            .map_err(|_| "publisher connect: no CONNACK".to_owned())??;
        Ok(Self { client, eventloop })
    }

    /// Publishes messages `0..count` to `topic` at `qos`, at most `rate` per
    /// second when given, and waits until all are sent or `limit` has passed.
    pub(crate) async fn run(
        &mut self,
        topic: &str,
        qos: QoS,
        count: u64,
        rate: Option<f64>,
        limit: Duration,
    ) -> Result<Fed, String> {
        let Self { client, eventloop } = self;
        let start = Instant::now();
        let first_epoch = now_epoch();
        let feed = async {
            for seq in 0..count {
                if let Some(rate) = rate {
                    let due = start + Duration::from_secs_f64(crate::measure::to_f64(seq) / rate);
                    if due > Instant::now() {
                        tokio::time::sleep_until(due).await;
                    }
                }
                client
                    .publish(topic, qos, false, payload(seq))
                    .await
                    .map_err(|err| format!("publish: {err}"))?;
            }
            Ok::<_, String>(())
        };
        let confirm = async {
            let mut sent = 0;
            while sent < count {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) if qos != QoS::AtMostOnce => sent += 1,
                    Ok(Event::Outgoing(Outgoing::Publish(_))) if qos == QoS::AtMostOnce => {
                        sent += 1;
                    }
                    Ok(_) => {}
                    Err(err) => return Err(format!("publisher connection: {err}")),
                }
            }
            Ok(now_epoch())
        };
        match timeout(limit, async { tokio::try_join!(feed, confirm) }).await {
            Ok(Ok(((), last_epoch))) => Ok(Fed {
                sent: count,
                first_epoch,
                last_epoch,
            }),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(format!("publisher: not all {count} sent within {limit:?}")),
        }
    }

    /// Sends DISCONNECT and waits (briefly) until it is written.
    pub(crate) async fn close(mut self) {
        let _ = self.client.try_disconnect();
        let _ = timeout(HANDSHAKE, async {
            loop {
                match self.eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
}

/// Drops the persistent session of `client_id` by connecting once with a
/// clean session, so a backlog left by a failed case does not stay in the
/// broker for the next one.
pub(crate) async fn discard_session(port: u16, client_id: &str) -> Result<(), String> {
    Feeder::connect(port, client_id).await?.close().await;
    Ok(())
}
