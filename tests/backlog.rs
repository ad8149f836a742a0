//! The dispatcher under a backlog, against a real mosquitto: what a service
//! sees after an outage, when a persistent session hands over everything the
//! broker queued at once. Every test asserts counts and states read from
//! `Stats`, never timings.
//!
//! `TOWER_MQTT_BACKLOG` sets the size of the big backlog (default 50,000).

mod support;

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use serde_json::json;
use support as probe;
use support::{Mosquitto, Proxy, QoS as WireQoS};
use tower_mqtt::{
    config::Config, Ack, AckOrder, Client, Envelope, HandlerError, Publisher, Request, Router,
    Subscription,
};

const WAIT: Duration = Duration::from_secs(30);

/// A broker that keeps every queued message of an offline persistent session.
async fn broker() -> Mosquitto {
    Mosquitto::start_with_config("max_queued_messages 0\nlog_type error\n").await
}

fn config(url: &str, client_id: &str) -> Config {
    support::service_config(url, "backlog")
        .with_client_id(client_id)
        .with_clean_session(false)
}

fn backlog_size() -> usize {
    std::env::var("TOWER_MQTT_BACKLOG")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(50_000)
}

/// Publishes `count` envelopes with `data.seq` 0.. at QoS 1 as fast as the
/// broker confirms them, keeping up to 100 in flight.
async fn publish_backlog(url: &str, topic: &str, count: usize) {
    let (host, port) = probe::host_port(url);
    let mut options = rumqttc::MqttOptions::new(probe::unique_id("backlog-pub"), host, port);
    options
        .set_inflight(100)
        .set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 1000);
    let topic = topic.to_owned();
    let sender = tokio::spawn(async move {
        for seq in 0..count {
            let env =
                Envelope::new("bench.load", json!({"seq": seq, "pad": "x".repeat(64)})).unwrap();
            client
                .publish(topic.clone(), WireQoS::AtLeastOnce, false, env.to_vec())
                .await
                .unwrap();
        }
        client
    });
    support::await_pubacks(&mut eventloop, count, WAIT).await;
    let client = sender.await.unwrap();
    client.disconnect().await.unwrap();
    while !matches!(
        tokio::time::timeout(WAIT, eventloop.poll()).await,
        Ok(Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_)) | Err(_)
    ) {}
}

/// Records each `data.seq` handled.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<u64>>>);

impl Seen {
    fn record(&self, req: &Request<Envelope>) {
        let seq = req.body().data()["seq"].as_u64().expect("seq");
        self.0.lock().unwrap().push(seq);
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    /// (distinct, handled more than once)
    fn distinct_and_twice(&self) -> (usize, usize) {
        let all = self.0.lock().unwrap();
        let distinct: HashSet<u64> = all.iter().copied().collect();
        (distinct.len(), all.len() - distinct.len())
    }

    async fn wait_for(&self, count: usize, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.len() < count {
            assert!(
                tokio::time::Instant::now() < deadline,
                "handled {} of {count}",
                self.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Creates the persistent session with its subscription, then leaves.
async fn create_session(url: &str, client_id: &str, router: Router) {
    let running = tower_mqtt::serve(config(url, client_id), router)
        .spawn()
        .unwrap();
    tokio::time::timeout(WAIT, running.ready())
        .await
        .unwrap()
        .expect("subscribed");
    let report = running.shutdown().await;
    assert!(report.disconnected_cleanly);
}

#[tokio::test]
async fn a_big_backlog_is_handled_exactly_once_within_the_pending_limit() {
    let broker = broker().await;
    let url = broker.url();
    let client_id = probe::unique_id("backlog");
    let count = backlog_size();
    let seen = Seen::default();
    let router = {
        let seen = seen.clone();
        Router::new().route("bench/#", move |req: Request<Envelope>| {
            seen.record(&req);
            std::future::ready(())
        })
    };
    create_session(&url, &client_id, router.clone()).await;
    publish_backlog(&url, "bench/load", count).await;

    let running = tower_mqtt::serve(
        config(&url, &client_id).with_max_pending(500, 64 << 20),
        router,
    )
    .spawn()
    .unwrap();
    seen.wait_for(count, Duration::from_secs(300)).await;
    let stats = running.stats();
    let report = running.shutdown().await;
    let (distinct, twice) = seen.distinct_and_twice();
    assert_eq!((distinct, twice), (count, 0), "{stats:?}");
    assert!(stats.peak_pending <= 500, "{stats:?}");
    assert!(
        stats.read_pauses > 0,
        "a backlog this size must pause reading: {stats:?}"
    );
    assert_eq!(
        stats.withheld, 0,
        "nothing needed reading while paused: {stats:?}"
    );
    assert_eq!(report.stats.connections, 1, "no keepalive loss: {stats:?}");
}

/// A handler that replies to every message and awaits the broker's PUBACK:
/// the poll loop must read on while paused, and what it reads past the limit
/// comes back through a deliberate reconnect.
#[tokio::test]
async fn handlers_awaiting_their_own_publishes_neither_deadlock_nor_lose() {
    let broker = broker().await;
    let url = broker.url();
    let client_id = probe::unique_id("replying");
    let count = 3000;
    let seen = Seen::default();
    let publisher: Arc<Mutex<Option<Publisher>>> = Arc::default();
    let router = {
        let (seen, publisher) = (seen.clone(), publisher.clone());
        Router::new().route("jobs/#", move |req: Request<Envelope>| {
            let (seen, publisher) = (seen.clone(), publisher.clone());
            async move {
                let publisher = publisher.lock().unwrap().clone();
                if let Some(publisher) = publisher {
                    let reply = Envelope::reply_to(req.body(), "jobs.done", json!({})).unwrap();
                    publisher
                        .send(Request::builder("done/x").body(reply).unwrap())
                        .await?;
                }
                seen.record(&req);
                Ok::<_, tower_mqtt::BoxError>(())
            }
        })
    };
    create_session(&url, &client_id, router.clone()).await;
    publish_backlog(&url, "jobs/run", count).await;

    let client = Client::new(config(&url, &client_id).with_max_pending(50, 64 << 20)).unwrap();
    *publisher.lock().unwrap() = Some(client.publisher());
    let running = client.serve(router).spawn().unwrap();
    seen.wait_for(count, Duration::from_secs(300)).await;
    let stats = running.shutdown().await.stats;
    let (distinct, twice) = seen.distinct_and_twice();
    assert_eq!(distinct, count, "{stats:?}");
    assert_eq!(
        twice, 0,
        "dedup and ordered acks keep redeliveries out: {stats:?}"
    );
    assert!(stats.peak_pending <= 50, "{stats:?}");
    assert_eq!(
        stats.withheld > 0,
        stats.recoveries > 0,
        "every withholding ends in a recovery: {stats:?}"
    );
}

#[tokio::test]
async fn under_topic_order_a_held_topic_delays_neither_handling_nor_acknowledgement_of_another() {
    let broker = broker().await;
    let url = broker.url();
    let proxy = Proxy::start(broker.addr()).await;
    let client_id = probe::unique_id("hol");
    let config =
        |url: &str, client_id: &str| config(url, client_id).with_ack_order(AckOrder::Topic);
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let seen = Seen::default();
    let router = {
        let (seen, gate) = (seen.clone(), gate.clone());
        Router::new().route("work/+", move |req: Request<Envelope>| {
            let (seen, gate) = (seen.clone(), gate.clone());
            async move {
                if req.topic() == "work/slow" {
                    gate.acquire().await.unwrap().forget();
                }
                seen.record(&req);
            }
        })
    };
    let running = tower_mqtt::serve(config(&proxy.url(), &client_id), router.clone())
        .spawn()
        .unwrap();
    tokio::time::timeout(WAIT, running.ready())
        .await
        .unwrap()
        .expect("subscribed");
    let send = |topic: &'static str, seq: u64| {
        let url = url.clone();
        async move {
            let env = Envelope::new("work.item", json!({"seq": seq})).unwrap();
            probe::publish_raw(&url, topic, env.to_vec(), WireQoS::AtLeastOnce, false).await;
        }
    };
    send("work/slow", 0).await;
    for seq in 1..=20 {
        send("work/fast", seq).await;
    }
    seen.wait_for(20, WAIT).await;
    // Every fast message is handled while slow is held; are they acknowledged?
    // Let the acks leave, then "kill" the service: cut it off, never to return.
    tokio::time::timeout(WAIT, async {
        while running.stats().pending > 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("only the held message stays pending");
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.refuse();
    proxy.cut().await;
    let _ = running.shutdown().await;

    // The same session again: only the held message comes back.
    let again = Seen::default();
    let router = {
        let again = again.clone();
        Router::new().route("work/+", move |req: Request<Envelope>| {
            again.record(&req);
            std::future::ready(())
        })
    };
    let running = tower_mqtt::serve(config(&url, &client_id), router)
        .spawn()
        .unwrap();
    again.wait_for(1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        *again.0.lock().unwrap(),
        [0],
        "only work/slow was unacknowledged"
    );
    running.shutdown().await;
}

#[tokio::test]
async fn in_receive_order_a_held_message_holds_back_every_later_acknowledgement() {
    let broker = broker().await;
    let url = broker.url();
    let proxy = Proxy::start(broker.addr()).await;
    let client_id = probe::unique_id("receive-order");
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let seen = Seen::default();
    let router = {
        let (seen, gate) = (seen.clone(), gate.clone());
        Router::new().route("work/+", move |req: Request<Envelope>| {
            let (seen, gate) = (seen.clone(), gate.clone());
            async move {
                if req.topic() == "work/slow" {
                    gate.acquire().await.unwrap().forget();
                }
                seen.record(&req);
            }
        })
    };
    let running = tower_mqtt::serve(config(&proxy.url(), &client_id), router)
        .spawn()
        .unwrap();
    tokio::time::timeout(WAIT, running.ready())
        .await
        .unwrap()
        .expect("subscribed");
    let send = |topic: &'static str, seq: u64| {
        let url = url.clone();
        async move {
            let env = Envelope::new("work.item", json!({"seq": seq})).unwrap();
            probe::publish_raw(&url, topic, env.to_vec(), WireQoS::AtLeastOnce, false).await;
        }
    };
    send("work/slow", 0).await;
    for seq in 1..=10 {
        send("work/fast", seq).await;
    }
    // Handling is not held: every fast message runs while slow is held.
    seen.wait_for(10, WAIT).await;
    assert_eq!(
        proxy.client_acks(),
        0,
        "no acknowledgement overtakes the held one: {}",
        proxy.ack_report()
    );
    proxy.refuse();
    proxy.cut().await;
    let _ = running.shutdown().await;

    // The same session again: all eleven come back (dedup in this new
    // process does not know them), since none was acknowledged.
    let again = Seen::default();
    let router = {
        let again = again.clone();
        Router::new().route("work/+", move |req: Request<Envelope>| {
            again.record(&req);
            std::future::ready(())
        })
    };
    let running = tower_mqtt::serve(config(&url, &client_id), router)
        .spawn()
        .unwrap();
    again.wait_for(11, WAIT).await;
    let mut back = again.0.lock().unwrap().clone();
    back.sort_unstable();
    assert_eq!(back, (0..=10).collect::<Vec<u64>>());
    proxy.assert_acks_in_order();
    running.shutdown().await;
}

#[tokio::test]
async fn ack_on_receipt_is_not_delivered_again_after_a_crash() {
    let broker = broker().await;
    let url = broker.url();
    let proxy = Proxy::start(broker.addr()).await;
    let client_id = probe::unique_id("receipt");
    let started = Arc::new(AtomicUsize::new(0));
    let hang = {
        let started = started.clone();
        move |_req: Request<Envelope>| {
            started.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>()
        }
    };
    let router = Router::new()
        .route(
            Subscription::new("llm/request").ack(Ack::OnReceipt),
            hang.clone(),
        )
        .route("jobs/run", hang);
    let running = tower_mqtt::serve(config(&proxy.url(), &client_id), router)
        .drain_timeout(Duration::from_millis(100))
        .spawn()
        .unwrap();
    tokio::time::timeout(WAIT, running.ready())
        .await
        .unwrap()
        .expect("subscribed");
    for topic in ["llm/request", "jobs/run"] {
        let env = Envelope::new("x.y", json!({"seq": 1})).unwrap();
        probe::publish_raw(&url, topic, env.to_vec(), WireQoS::AtLeastOnce, false).await;
    }
    tokio::time::timeout(WAIT, async {
        while started.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("both handlers started");
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.refuse();
    proxy.cut().await;
    let _ = running.shutdown().await;

    let mut probe_session = ResumedSession::connect(&url, &client_id);
    let topics = probe_session.collect(Duration::from_secs(2)).await;
    assert_eq!(
        topics,
        ["jobs/run"],
        "the receipt-acked message is not redelivered"
    );
}

#[tokio::test]
async fn only_the_failed_route_is_retried() {
    let broker = broker().await;
    let url = broker.url();
    let wide = Arc::new(AtomicUsize::new(0));
    let narrow = Arc::new(AtomicUsize::new(0));
    let router = {
        let (wide, narrow) = (wide.clone(), narrow.clone());
        Router::new()
            .route("orders/#", move |_req: Request<Envelope>| {
                wide.fetch_add(1, Ordering::SeqCst);
                std::future::ready(())
            })
            .route("orders/new", move |_req: Request<Envelope>| {
                let attempt = narrow.fetch_add(1, Ordering::SeqCst);
                std::future::ready(if attempt == 0 {
                    Err(HandlerError::new("flaky store"))
                } else {
                    Ok(())
                })
            })
    };
    let running = tower_mqtt::serve(
        config(&url, &probe::unique_id("retry")).with_clean_session(true),
        router,
    )
    .spawn()
    .unwrap();
    tokio::time::timeout(WAIT, running.ready())
        .await
        .unwrap()
        .expect("subscribed");
    let env = Envelope::new("orders.new", json!({"seq": 1})).unwrap();
    probe::publish_raw(
        &url,
        "orders/new",
        env.to_vec(),
        WireQoS::AtLeastOnce,
        false,
    )
    .await;
    tokio::time::timeout(WAIT, async {
        while running.stats().handled < 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("handled after a retry");
    assert_eq!(
        narrow.load(Ordering::SeqCst),
        2,
        "the failed route ran again"
    );
    assert_eq!(
        wide.load(Ordering::SeqCst),
        1,
        "the route that succeeded did not"
    );
    let stats = running.shutdown().await.stats;
    assert_eq!((stats.handled, stats.failed), (1, 0));
}

/// A plain rumqttc session resumed under a client id, to see what the broker
/// still holds for it.
struct ResumedSession {
    eventloop: rumqttc::EventLoop,
    _client: rumqttc::AsyncClient,
}

impl ResumedSession {
    fn connect(url: &str, client_id: &str) -> Self {
        let (host, port) = probe::host_port(url);
        let mut options = rumqttc::MqttOptions::new(client_id, host, port);
        options.set_clean_session(false);
        let (client, eventloop) = rumqttc::AsyncClient::new(options, 10);
        Self {
            eventloop,
            _client: client,
        }
    }

    async fn collect(&mut self, quiet: Duration) -> Vec<String> {
        let mut topics = Vec::new();
        while let Ok(event) = tokio::time::timeout(quiet, self.eventloop.poll()).await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) =
                event.expect("resumed session")
            {
                topics.push(p.topic);
            }
        }
        topics
    }
}
