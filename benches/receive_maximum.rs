//! Does the broker respect an MQTT 5 client's Receive Maximum? Measured
//! against the harness's own mosquitto.
//!
//! ```sh
//! cargo bench --bench receive_maximum      # about 20 seconds
//! ```
//!
//! A raw rumqttc MQTT 5 client with manual acknowledgements connects with
//! Receive Maximum `N` and subscribes at QoS 1; a second client publishes
//! 200 messages to it. The consumer acknowledges nothing for a second and
//! counts what it received, then acknowledges the first 5 and counts again a
//! second later. A broker that respects the window sends `N`, then `N + 5`.
//! The table shows both counts for each `N`, and what the runtime relies on
//! follows from it (docs/RELIABILITY.md): on mosquitto 2.0.11 the window
//! holds only until acknowledgements flow, so an MQTT 5 client keeps its own
//! pending bound and pauses reading as an MQTT 3.1.1 client does.

// The e2e harness's broker; this bench needs only part of it.
#[allow(dead_code)]
#[path = "e2e/broker.rs"]
mod broker;

use std::time::Duration;

use rumqttc::v5::{
    mqttbytes::{
        v5::{Packet, Publish},
        QoS,
    },
    AsyncClient, Event, EventLoop, MqttOptions,
};

const MESSAGES: usize = 200;
const ACKED: usize = 5;

fn main() {
    let broker = broker::Broker::start().expect("start mosquitto");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    println!("broker: mosquitto {}", broker.version());
    println!(
        "{:>16} | {:>22} | {:>26}",
        "receive maximum", "received, none acked", "received after 5 acks"
    );
    for window in [10u16, 20, 50] {
        let (before, after) = runtime.block_on(case(broker.port(), window));
        let verdict = if before <= usize::from(window) && after <= usize::from(window) + ACKED {
            "respected"
        } else {
            "exceeded"
        };
        println!("{window:>16} | {before:>22} | {after:>26}  {verdict}");
    }
}

/// Reads for a second, keeping the publishes.
async fn read_for(events: &mut EventLoop, received: &mut Vec<Publish>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while let Ok(event) = tokio::time::timeout_at(deadline, events.poll()).await {
        if let Event::Incoming(Packet::Publish(publish)) = event.expect("connected") {
            received.push(publish);
        }
    }
}

/// The counts before and after the first acknowledgements.
async fn case(port: u16, window: u16) -> (usize, usize) {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let topic = format!("rm/{id}");
    let mut options = MqttOptions::new(format!("rm-sub-{id}"), "127.0.0.1", port);
    options.set_manual_acks(true);
    options.set_receive_maximum(Some(window));
    let (consumer, mut events) = AsyncClient::new(options, 1024);
    consumer
        .subscribe(topic.clone(), QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    // Until the SUBACK, so that every message is sent to this subscription.
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = events.poll().await.expect("connect") {
            break;
        }
    }
    let publisher = {
        let mut options = MqttOptions::new(format!("rm-pub-{id}"), "127.0.0.1", port);
        options.set_outgoing_inflight_upper_limit(100);
        let (client, mut eventloop) = AsyncClient::new(options, 1024);
        let topic = topic.clone();
        tokio::spawn(async move {
            tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
            for n in 0..MESSAGES {
                client
                    .publish(topic.clone(), QoS::AtLeastOnce, false, n.to_string())
                    .await
                    .expect("publish");
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        })
    };
    let mut received = Vec::new();
    read_for(&mut events, &mut received).await;
    let before = received.len();
    for publish in received.iter().take(ACKED) {
        consumer.ack(publish).await.expect("ack");
    }
    read_for(&mut events, &mut received).await;
    publisher.abort();
    let _ = consumer.disconnect().await;
    (before, received.len())
}
