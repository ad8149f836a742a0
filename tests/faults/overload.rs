//! Overload at real sizes, on the path a service takes (`tower_mqtt::serve`
//! with its configuration's stack), through a proxy that checks the
//! acknowledgement order:
//!
//! - 3,000 QoS 1 messages at 1,000/s into a 10 ms handler on one topic, with a
//!   5 s keep-alive, plain and with 32 KiB payloads: the consumer falls 2,000
//!   behind and reads only as fast as it handles;
//! - the same with the connection cut every 3 s (8 cuts);
//! - a 20,000-message backlog drained by a 5 ms handler with the default
//!   keep-alive.
//!
//! Each must lose nothing, handle nothing twice, lose no connection the test
//! did not cut, hold no more than the pending limit, and acknowledge in
//! receive order on every connection.

use std::sync::atomic::AtomicU64;

use super::*;

/// One overload scenario.
#[derive(Clone, Copy, Debug)]
struct Overload {
    /// Messages published.
    messages: usize,
    /// Published per second; `None`: all before the consumer connects (a
    /// backlog).
    rate: Option<u32>,
    /// How long the handler takes.
    handler: Duration,
    keep_alive: Option<Duration>,
    /// Bytes of padding in each payload.
    padding: usize,
    /// Cut the connection this often, this many times.
    cuts: Option<(Duration, usize)>,
}

impl Overload {
    /// `messages` at `per_second` into a 10 ms handler, keep-alive 5 s.
    const fn at_rate(messages: usize, per_second: u32) -> Overload {
        Overload {
            messages,
            rate: Some(per_second),
            handler: Duration::from_millis(10),
            keep_alive: Some(Duration::from_secs(5)),
            padding: 0,
            cuts: None,
        }
    }

    /// `messages` waiting before the consumer connects, into a 5 ms handler,
    /// with the default keep-alive.
    const fn backlog(messages: usize) -> Overload {
        Overload {
            messages,
            rate: None,
            handler: Duration::from_millis(5),
            keep_alive: None,
            padding: 0,
            cuts: None,
        }
    }
}

const TOPIC: &str = "faults/overload";

fn payload(seq: usize, padding: usize) -> Vec<u8> {
    Envelope::new(
        "fault.good",
        json!({ "seq": seq, "pad": "x".repeat(padding) }),
    )
    .unwrap()
    .to_vec()
}

/// Publishes `messages` in order at QoS 1, `rate` per second (as fast as the
/// broker takes them without one), and returns once every one is confirmed.
async fn feed(url: String, messages: usize, padding: usize, rate: Option<u32>) {
    let (host, port) = support::host_port(&url);
    let mut options = MqttOptions::new(support::unique_id("overload-feed"), host, port);
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 128);
    let acked = Arc::new(AtomicU64::new(0));
    let poller = {
        let acked = acked.clone();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(err) => panic!("the feed lost its broker: {err}"),
                }
            }
        })
    };
    let mut tick = rate.map(|rate| tokio::time::interval(Duration::from_secs(1) / rate));
    for seq in 0..messages {
        if let Some(tick) = &mut tick {
            tick.tick().await;
        }
        client
            .publish(TOPIC, WireQoS::AtLeastOnce, false, payload(seq, padding))
            .await
            .expect("queue PUBLISH");
    }
    let total = u64::try_from(messages).unwrap();
    tokio::time::timeout(STREAM_WAIT, async {
        while acked.load(Ordering::Relaxed) < total {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the broker confirmed the feed's {messages} publishes"));
    poller.abort();
}

/// Runs one scenario and asserts everything the module docs promise.
#[allow(clippy::too_many_lines)] // one scenario, read top to bottom
async fn overload(case: Overload) {
    if !have_mosquitto() {
        return;
    }
    // Room for the whole backlog in the offline session's queue.
    let broker = Mosquitto::start_with_config("max_queued_messages 100000\n").await;
    let proxy = Arc::new(Proxy::start(broker.addr()).await);
    let ledger = Ledger::default();
    let order = Arc::new(Mutex::new(Vec::with_capacity(case.messages)));
    let handler = {
        let (ledger, order) = (ledger.clone(), order.clone());
        move |req: Request<Envelope>| {
            let (ledger, order) = (ledger.clone(), order.clone());
            async move {
                tokio::time::sleep(case.handler).await;
                if let Some(seq) = req.body().data()["seq"].as_u64() {
                    order.lock().unwrap().push(seq);
                }
                ledger.record(req.body());
            }
        }
    };
    let mut cfg = config(&proxy.url(), "overload").with_clean_session(false);
    if let Some(keep_alive) = case.keep_alive {
        cfg = cfg.with_keep_alive(keep_alive);
    }
    let limit = cfg.max_pending;
    let serve = |cfg: Config| {
        tower_mqtt::serve(cfg, Router::new().route(TOPIC, handler.clone()))
            .spawn()
            .unwrap()
    };

    let started = Instant::now();
    let running = if case.rate.is_some() {
        let running = serve(cfg);
        tokio::time::timeout(WAIT, running.ready())
            .await
            .expect("ready")
            .expect("subscribed");
        feed(broker.url(), case.messages, case.padding, case.rate).await;
        running
    } else {
        // The session exists, then the backlog piles up while it is away.
        let session = serve(cfg.clone());
        tokio::time::timeout(WAIT, session.ready())
            .await
            .expect("ready")
            .expect("subscribed");
        assert!(session.shutdown().await.disconnected_cleanly);
        feed(broker.url(), case.messages, case.padding, None).await;
        serve(cfg)
    };
    let cutter = case.cuts.map(|(every, times)| {
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let mut cut = 0;
            for _ in 0..times {
                tokio::time::sleep(every).await;
                if proxy.connections() > 0 {
                    proxy.cut().await;
                    cut += 1;
                }
            }
            cut
        })
    });
    let all = ledger
        .wait_unique(case.messages, Duration::from_secs(240))
        .await;
    let cuts = match cutter {
        Some(cutter) => cutter.await.unwrap(),
        None => 0,
    };
    // A marker after everything: once it is handled, every redelivery sent
    // before it on the connection has been seen too.
    let marker = case.messages + 1_000_000;
    support::publish_raw(
        &broker.url(),
        TOPIC,
        good(marker).to_vec(),
        WireQoS::AtLeastOnce,
        false,
    )
    .await;
    let marker_seq = u64::try_from(marker).unwrap();
    let marker_handled = tokio::time::timeout(WAIT, async {
        while !ledger.counts.lock().unwrap().contains_key(&marker_seq) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .is_ok();

    let elapsed = started.elapsed();
    let stats = running.stats();
    let (lost, twice) = ledger.tally(case.messages);
    let report = proxy.ack_report();
    let in_order = {
        let order = order.lock().unwrap();
        order.windows(2).all(|pair| pair[0] < pair[1])
    };
    eprintln!(
        "FIGURES overload {case:?}: handled={} lost={} twice={} cuts={cuts} \
         connections={} failures={} recoveries={} peak_pending={} limit={limit} \
         redelivered={} duplicates={} read_pauses={} acks={} ack_violations={} \
         unsolicited_acks={} in_order={in_order} elapsed_ms={}",
        case.messages - lost.len(),
        lost.len(),
        twice.len(),
        stats.connections,
        stats.connection_failures,
        stats.recoveries,
        stats.peak_pending,
        stats.redelivered,
        stats.duplicates,
        stats.read_pauses,
        report.totals.client_acks.total(),
        report.violations(),
        report.unsolicited(),
        elapsed.as_millis(),
    );
    assert!(
        all && lost.is_empty(),
        "lost {}: {:?}; {stats:?}",
        lost.len(),
        &lost[..lost.len().min(20)]
    );
    assert!(twice.is_empty(), "handled twice: {twice:?}; {stats:?}");
    assert!(marker_handled, "the marker after the overload was handled");
    assert!(in_order, "the topic's messages were handled in order");
    assert_eq!(
        (stats.connection_failures, stats.recoveries),
        (u64::try_from(cuts).unwrap(), 0),
        "no connection lost but those the test cut: {stats:?}"
    );
    assert!(
        stats.peak_pending <= u64::try_from(limit).unwrap(),
        "held at most the pending limit: {stats:?}"
    );
    proxy.assert_acks_in_order();
    assert_eq!(
        report.unsolicited(),
        0,
        "no stale acknowledgement: {report}"
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_with_a_short_keep_alive_keeps_its_connection_and_handles_each_once() {
    overload(Overload::at_rate(3_000, 1_000)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_of_32_kib_messages_keeps_its_connection_and_handles_each_once() {
    overload(Overload {
        padding: 32 * 1024,
        ..Overload::at_rate(3_000, 1_000)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_cut_every_three_seconds_handles_each_once() {
    overload(Overload {
        cuts: Some((Duration::from_secs(3), 8)),
        ..Overload::at_rate(3_000, 1_000)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_twenty_thousand_drains_through_a_slow_handler_on_one_connection() {
    overload(Overload::backlog(20_000)).await;
}

/// The floor: 1 s is the shortest keep-alive rumqttc takes (it panics below,
/// and configuration refuses it); 5 s on MQTT 5, whose client asserts that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_with_the_shortest_keep_alive_keeps_its_connection() {
    let shortest = if support::on_v5() { 5 } else { 1 };
    overload(Overload {
        keep_alive: Some(Duration::from_secs(shortest)),
        ..Overload::at_rate(1_500, 1_000)
    })
    .await;
}
