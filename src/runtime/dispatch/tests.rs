use std::{
    convert::Infallible,
    sync::{atomic::AtomicUsize, Mutex as StdMutex},
    time::Duration,
};

use tokio::sync::{mpsc, Semaphore};

use bytes::Bytes;

use super::*;
use crate::{
    request::{HandledBefore, QoS},
    runtime::wire::Received,
    subscription::{Ack, Overflow},
    Subscription,
};

type Released = mpsc::UnboundedReceiver<(u64, AckPacket)>;

fn limits(max_pending: usize) -> Limits {
    Limits {
        max_in_flight: 8,
        max_pending,
        max_pending_bytes: usize::MAX / 2,
        max_message_size: 1024,
        ack_order: AckOrder::Connection,
        queues: QueueDefaults::default(),
    }
}

fn publish(topic: &str, pkid: u16, qos: QoS) -> Received {
    Received {
        topic: topic.to_owned(),
        payload: Bytes::copy_from_slice(&pkid.to_be_bytes()),
        qos,
        retain: false,
        dup: false,
        pkid,
        properties: None,
    }
}

fn qos1(topic: &str, pkid: u16) -> Received {
    publish(topic, pkid, QoS::AtLeastOnce)
}

/// A service that records (topic, pkid) in handling order, and holds every
/// message on a topic listed in `gated` until a permit is added.
#[derive(Clone)]
struct Recorder {
    seen: Arc<StdMutex<Vec<(String, u16)>>>,
    /// Packet ids of the requests marked [`HandledBefore`].
    marked: Arc<StdMutex<Vec<u16>>>,
    gate: Arc<Semaphore>,
    gated: Arc<[&'static str]>,
}

impl Recorder {
    fn new(gated: &[&'static str]) -> Self {
        Self {
            seen: Arc::default(),
            marked: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
            gated: gated.into(),
        }
    }

    fn seen(&self) -> Vec<(String, u16)> {
        self.seen.lock().unwrap().clone()
    }
}

impl Service<Request<Bytes>> for Recorder {
    type Response = Outcome;
    type Error = Infallible;
    type Future = futures_util::future::BoxFuture<'static, Result<Outcome, Infallible>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let topic = req.topic().as_str().to_owned();
            if this.gated.contains(&topic.as_str()) {
                this.gate.acquire().await.unwrap().forget();
            }
            let pkid = u16::from_be_bytes([req.body()[0], req.body()[1]]);
            if req.extensions().get::<HandledBefore>().is_some() {
                this.marked.lock().unwrap().push(pkid);
            }
            this.seen.lock().unwrap().push((topic, pkid));
            Ok(Outcome::Handled)
        })
    }
}

fn dispatcher(
    router: Router,
    service: Recorder,
    limits: Limits,
) -> (Dispatcher<Recorder>, Arc<Counters>, Released) {
    let (tx, rx) = mpsc::unbounded_channel();
    let counters = Arc::new(Counters::default());
    (
        Dispatcher::new(router, service, limits, counters.clone(), tx),
        counters,
        rx,
    )
}

fn acked(rx: &mut Released) -> Vec<u16> {
    let mut out = Vec::new();
    while let Ok((_, packet)) = rx.try_recv() {
        out.push(packet.pkid);
    }
    out
}

async fn settle<S>(d: &Dispatcher<S>)
where
    S: Service<Request<Bytes>, Response = Outcome> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    for _ in 0..10_000 {
        if d.load().queued == 0 && d.load().running == 0 {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("the dispatcher did not settle: {:?}", d.load());
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

#[tokio::test]
async fn a_topic_runs_in_order_and_every_message_is_acknowledged() {
    let service = Recorder::new(&[]);
    let (d, counters, mut rx) = dispatcher(Router::new(), service.clone(), limits(100_000));
    for pkid in 1..=5000 {
        let topic = if pkid % 2 == 0 { "a" } else { "b" };
        d.push(&qos1(topic, pkid), OverLimit::Withhold);
    }
    settle(&d).await;
    let seen = service.seen();
    assert_eq!(seen.len(), 5000);
    for topic in ["a", "b"] {
        let order: Vec<u16> = seen
            .iter()
            .filter(|(t, _)| t == topic)
            .map(|s| s.1)
            .collect();
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "{topic} out of order"
        );
    }
    let mut acks = acked(&mut rx);
    acks.sort_unstable();
    assert_eq!(acks, (1..=5000).collect::<Vec<u16>>());
    assert_eq!(get(&counters.handled), 5000);
    assert_eq!(d.load(), Load::default());
    assert_eq!(d.lock().lanes.len(), 0, "idle lanes are forgotten");
}

#[tokio::test]
async fn under_topic_order_a_held_topic_delays_neither_handling_nor_acks_of_another() {
    let service = Recorder::new(&["slow"]);
    let limits = Limits {
        ack_order: AckOrder::Topic,
        ..limits(1000)
    };
    let (d, _, mut rx) = dispatcher(Router::new(), service.clone(), limits);
    d.push(&qos1("slow", 1), OverLimit::Withhold);
    for pkid in 2..=50 {
        d.push(&qos1("fast", pkid), OverLimit::Withhold);
    }
    for _ in 0..1000 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        service.seen().len(),
        49,
        "fast is handled while slow is held"
    );
    assert_eq!(acked(&mut rx), (2..=50).collect::<Vec<u16>>());
    service.gate.add_permits(1);
    settle(&d).await;
    assert_eq!(acked(&mut rx), [1]);
}

#[tokio::test]
async fn receive_order_holds_every_ack_behind_the_oldest_but_not_the_handling() {
    let service = Recorder::new(&["slow"]);
    let (d, _, mut rx) = dispatcher(Router::new(), service.clone(), limits(1000));
    d.push(&qos1("slow", 1), OverLimit::Withhold);
    for pkid in 2..=10 {
        d.push(&qos1("fast", pkid), OverLimit::Withhold);
    }
    for _ in 0..1000 {
        tokio::task::yield_now().await;
    }
    assert_eq!(service.seen().len(), 9, "handling is not held");
    assert!(acked(&mut rx).is_empty(), "acks wait for the oldest");
    assert_eq!(
        d.load().pending,
        10,
        "finished messages stay pending until acked"
    );
    service.gate.add_permits(1);
    settle(&d).await;
    assert_eq!(acked(&mut rx), (1..=10).collect::<Vec<u16>>());
}

#[tokio::test]
async fn the_pending_limit_pauses_then_withholds_until_the_next_connection() {
    let service = Recorder::new(&["t"]);
    let (d, counters, mut rx) = dispatcher(Router::new(), service.clone(), limits(4));
    for pkid in 1..=4 {
        d.push(&qos1("t", pkid), OverLimit::Withhold);
    }
    assert!(d.is_full());
    d.push(&publish("t", 0, QoS::AtMostOnce), OverLimit::Withhold);
    assert_eq!(
        get(&counters.dropped_over_limit),
        1,
        "QoS 0 past the limit is dropped"
    );
    d.push(&qos1("t", 5), OverLimit::Withhold);
    assert_eq!(get(&counters.withheld), 1);
    assert!(d.is_withholding());
    service.gate.add_permits(4);
    settle(&d).await;
    assert!(!d.is_full());
    d.push(&qos1("t", 6), OverLimit::Withhold);
    assert_eq!(
        get(&counters.withheld),
        2,
        "withholding lasts until the next connection"
    );
    assert_eq!(
        acked(&mut rx),
        [1, 2, 3, 4],
        "the withheld are not acknowledged"
    );
    assert_eq!(d.released_on_connection(), 4);
    assert_eq!(get(&counters.peak_pending), 4);
    for _ in 0..4 {
        d.ack_written();
    }
    d.connection_lost();
    d.connected(true);
    assert!(!d.is_withholding());
    service.gate.add_permits(1);
    d.push(&qos1("t", 5), OverLimit::Withhold);
    settle(&d).await;
    assert_eq!(service.seen().last(), Some(&("t".to_owned(), 5)));
}

#[tokio::test]
async fn a_clean_session_keeps_what_it_cannot_get_again() {
    let service = Recorder::new(&["t"]);
    let (d, counters, _rx) = dispatcher(Router::new(), service.clone(), limits(2));
    for pkid in 1..=3 {
        d.push(&qos1("t", pkid), OverLimit::Keep);
    }
    assert_eq!(get(&counters.kept_over_limit), 1);
    service.gate.add_permits(3);
    settle(&d).await;
    assert_eq!(service.seen().len(), 3);
}

#[tokio::test]
async fn the_room_signal_comes_below_three_quarters() {
    let service = Recorder::new(&["t"]);
    let (d, _, _rx) = dispatcher(Router::new(), service.clone(), limits(8));
    for pkid in 1..=8 {
        d.push(&qos1("t", pkid), OverLimit::Withhold);
    }
    let room = d.room();
    tokio::pin!(room);
    service.gate.add_permits(1);
    assert!(
        tokio::time::timeout(Duration::from_millis(50), &mut room)
            .await
            .is_err(),
        "7 of 8 pending is not room yet"
    );
    service.gate.add_permits(1);
    tokio::time::timeout(Duration::from_secs(5), room)
        .await
        .expect("6 of 8 pending is room");
}

#[tokio::test]
async fn ack_on_receipt_acknowledges_before_the_handler_runs() {
    let service = Recorder::new(&["llm/request"]);
    let router = Router::new().subscribe(Subscription::new("llm/request").ack(Ack::OnReceipt));
    let (d, _, mut rx) = dispatcher(router, service.clone(), limits(100));
    d.push(&qos1("llm/request", 9), OverLimit::Withhold);
    assert_eq!(acked(&mut rx), [9]);
    assert!(service.seen().is_empty());
    service.gate.add_permits(1);
    settle(&d).await;
    assert_eq!(service.seen().len(), 1);
}

#[tokio::test]
async fn oversized_and_invalid_messages_are_acknowledged_and_counted() {
    let service = Recorder::new(&[]);
    let (d, counters, mut rx) = dispatcher(Router::new(), service.clone(), limits(100));
    let mut big = qos1("cam/frame", 1);
    big.payload = Bytes::from(vec![0; 2048]);
    d.push(&big, OverLimit::Withhold);
    d.push(&qos1("bad/+/topic", 2), OverLimit::Withhold);
    d.push(&qos1("ok", 3), OverLimit::Withhold);
    settle(&d).await;
    assert_eq!(get(&counters.oversized), 1);
    assert_eq!(get(&counters.invalid_topic), 1);
    assert_eq!(service.seen(), [("ok".to_owned(), 3)]);
    assert_eq!(acked(&mut rx), [1, 2, 3]);
}

#[tokio::test]
async fn drop_oldest_drops_the_topics_oldest_waiting_message() {
    let service = Recorder::new(&["cam"]);
    let router = Router::new().subscribe(
        Subscription::new("cam")
            .capacity(2)
            .overflow(Overflow::DropOldest),
    );
    let (d, counters, mut rx) = dispatcher(router, service.clone(), limits(100));
    d.push(&qos1("cam", 1), OverLimit::Withhold);
    while d.load().running == 0 {
        tokio::task::yield_now().await;
    }
    for pkid in 2..=5 {
        d.push(&qos1("cam", pkid), OverLimit::Withhold);
    }
    // 1 runs (held); 2..5 compete for two places: 2 and 3 are dropped.
    assert_eq!(get(&counters.dropped_oldest), 2);
    service.gate.add_permits(3);
    settle(&d).await;
    let handled: Vec<u16> = service.seen().into_iter().map(|s| s.1).collect();
    assert_eq!(handled, [1, 4, 5]);
    assert_eq!(
        acked(&mut rx),
        [1, 2, 3, 4, 5],
        "dropped messages are acknowledged too, in receive order"
    );
}

#[tokio::test]
async fn a_full_block_route_pauses_reading() {
    let service = Recorder::new(&["q"]);
    let router = Router::new().subscribe(Subscription::new("q").capacity(3));
    let (d, _, _rx) = dispatcher(router, service.clone(), limits(100));
    d.push(&qos1("q", 1), OverLimit::Withhold);
    while d.load().running == 0 {
        tokio::task::yield_now().await;
    }
    for pkid in 2..=3 {
        d.push(&qos1("q", pkid), OverLimit::Withhold);
    }
    assert!(!d.is_full(), "one runs, two wait");
    d.push(&qos1("q", 4), OverLimit::Withhold);
    assert!(d.is_full(), "three wait: the route is at capacity");
    service.gate.add_permits(4);
    settle(&d).await;
    assert!(!d.is_full());
}

#[tokio::test]
async fn workers_never_exceed_the_in_flight_limit() {
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (r, p) = (running.clone(), peak.clone());
    let service = tower::service_fn(move |_req: Request<Bytes>| {
        let (r, p) = (r.clone(), p.clone());
        async move {
            let now = r.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(now, Ordering::SeqCst);
            tokio::task::yield_now().await;
            r.fetch_sub(1, Ordering::SeqCst);
            Ok::<_, Infallible>(Outcome::Handled)
        }
    });
    let (tx, _rx) = mpsc::unbounded_channel();
    let counters = Arc::new(Counters::default());
    let d = Dispatcher::new(Router::new(), service, limits(10_000), counters.clone(), tx);
    for pkid in 0..2000u16 {
        d.push(
            &qos1(&format!("t/{}", pkid % 100), pkid + 1),
            OverLimit::Withhold,
        );
    }
    settle(&d).await;
    assert_eq!(get(&counters.handled), 2000);
    assert!(peak.load(Ordering::SeqCst) <= 8);
}

#[tokio::test]
async fn an_unordered_topic_fills_every_worker() {
    let service = Recorder::new(&["t"]);
    let router = Router::new().subscribe(Subscription::new("t").unordered());
    let (d, _, _rx) = dispatcher(router, service.clone(), limits(100));
    for pkid in 1..=20 {
        d.push(&qos1("t", pkid), OverLimit::Withhold);
    }
    for _ in 0..1000 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        d.load().running,
        8,
        "one topic, as many at once as the limit"
    );
    service.gate.add_permits(20);
    settle(&d).await;
    assert_eq!(service.seen().len(), 20);
}

fn redelivered(topic: &str, pkid: u16) -> Received {
    let mut p = qos1(topic, pkid);
    p.dup = true;
    p
}

/// Ends the connection as the poll loop does, with `written` of its
/// acknowledgements on the wire, and starts the next one.
fn reconnect<S>(d: &Dispatcher<S>, written: u64, session_present: bool)
where
    S: Service<Request<Bytes>, Response = Outcome> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    for _ in 0..written {
        d.ack_written();
    }
    d.connection_lost();
    d.connected(session_present);
}

#[tokio::test]
async fn redeliveries_of_held_messages_join_them_across_many_reconnects() {
    // One topic held on a gate: 1 runs, the rest queue; the connection drops
    // five times and each time the broker delivers every unacknowledged
    // message again.
    let service = Recorder::new(&["t"]);
    let (d, counters, mut rx) = dispatcher(Router::new(), service.clone(), limits(100_000));
    let total = 3000u16;
    for pkid in 1..=total {
        d.push(&qos1("t", pkid), OverLimit::Withhold);
    }
    while d.load().running == 0 {
        tokio::task::yield_now().await;
    }
    for _ in 0..5 {
        reconnect(&d, 0, true);
        for pkid in 1..=total {
            d.push(&redelivered("t", pkid), OverLimit::Withhold);
        }
        assert_eq!(
            d.load().pending,
            usize::from(total),
            "a redelivery adds nothing"
        );
    }
    service.gate.add_permits(usize::from(total));
    settle(&d).await;
    let seen: Vec<u16> = service.seen().into_iter().map(|s| s.1).collect();
    assert_eq!(
        seen,
        (1..=total).collect::<Vec<u16>>(),
        "each once, in order"
    );
    assert_eq!(acked(&mut rx), (1..=total).collect::<Vec<u16>>());
    assert_eq!(get(&counters.redelivered), 5 * u64::from(total));
    assert_eq!(get(&counters.peak_pending), u64::from(total));
    assert_eq!(d.load(), Load::default());
}

#[tokio::test]
async fn a_handled_message_whose_ack_never_left_is_acknowledged_not_rerun() {
    let service = Recorder::new(&["slow"]);
    let (d, counters, mut rx) = dispatcher(Router::new(), service.clone(), limits(100));
    d.push(&qos1("slow", 1), OverLimit::Withhold);
    d.push(&qos1("fast", 2), OverLimit::Withhold);
    d.push(&qos1("fast", 3), OverLimit::Withhold);
    for _ in 0..1000 {
        tokio::task::yield_now().await;
    }
    assert_eq!(service.seen().len(), 2, "2 and 3 handled, waiting behind 1");
    reconnect(&d, 0, true);
    // The broker sends them again in its order; 2 and 3 are acknowledged at
    // once, in turn, without running again.
    d.push(&redelivered("slow", 1), OverLimit::Withhold);
    d.push(&redelivered("fast", 2), OverLimit::Withhold);
    d.push(&redelivered("fast", 3), OverLimit::Withhold);
    assert!(acked(&mut rx).is_empty(), "still behind 1");
    service.gate.add_permits(1);
    settle(&d).await;
    assert_eq!(acked(&mut rx), [1, 2, 3]);
    assert_eq!(service.seen().len(), 3);
    assert_eq!(get(&counters.redelivered), 3);
}

#[tokio::test]
async fn released_acks_that_were_not_written_are_recognised_too() {
    let service = Recorder::new(&[]);
    let (d, counters, mut rx) = dispatcher(Router::new(), service.clone(), limits(100));
    for pkid in 1..=4 {
        d.push(&qos1("t", pkid), OverLimit::Withhold);
    }
    settle(&d).await;
    assert_eq!(acked(&mut rx), [1, 2, 3, 4]);
    // Only 1 and 2 reached the wire.
    reconnect(&d, 2, true);
    for pkid in 3..=4 {
        d.push(&redelivered("t", pkid), OverLimit::Withhold);
    }
    assert_eq!(acked(&mut rx), [3, 4]);
    assert_eq!(service.seen().len(), 4, "nothing ran twice");
    assert_eq!(get(&counters.redelivered), 2);
}

#[tokio::test]
async fn a_redelivery_of_a_message_acknowledged_on_the_wire_is_marked_for_dedup() {
    let service = Recorder::new(&[]);
    let (d, _, mut rx) = dispatcher(Router::new(), service.clone(), limits(100));
    for pkid in 1..=3 {
        d.push(&qos1("t", pkid), OverLimit::Withhold);
    }
    settle(&d).await;
    assert_eq!(acked(&mut rx), [1, 2, 3]);
    // All three reached the wire; the broker may have lost the last ones.
    reconnect(&d, 3, true);
    d.push(&redelivered("t", 3), OverLimit::Withhold);
    let mut other = qos1("t", 2);
    other.payload = Bytes::from_static(b"\x00\x02 another message");
    d.push(&other, OverLimit::Withhold);
    settle(&d).await;
    assert_eq!(*service.marked.lock().unwrap(), [3], "only the same bytes");
    assert_eq!(acked(&mut rx), [3, 2], "both handled and acknowledged here");
}

#[tokio::test]
async fn without_a_session_the_old_copies_run_and_nothing_is_acknowledged() {
    let service = Recorder::new(&["t"]);
    let (d, _, mut rx) = dispatcher(Router::new(), service.clone(), limits(100));
    for pkid in 1..=3 {
        d.push(&qos1("t", pkid), OverLimit::Keep);
    }
    reconnect(&d, 0, false);
    // A new session may reuse the ids for new messages.
    d.push(&qos1("t", 1), OverLimit::Keep);
    service.gate.add_permits(4);
    settle(&d).await;
    assert_eq!(service.seen().len(), 4);
    assert_eq!(acked(&mut rx), [1], "only the new connection's message");
}

#[tokio::test]
async fn another_message_under_a_carried_id_is_handled_as_new() {
    let service = Recorder::new(&["t"]);
    let (d, _, mut rx) = dispatcher(Router::new(), service.clone(), limits(100));
    d.push(&qos1("t", 1), OverLimit::Withhold);
    reconnect(&d, 0, true);
    let mut other = qos1("t", 1);
    other.payload = Bytes::from_static(b"another");
    d.push(&other, OverLimit::Withhold);
    assert_eq!(d.load().pending, 2);
    service.gate.add_permits(2);
    settle(&d).await;
    assert_eq!(service.seen().len(), 2);
    assert_eq!(acked(&mut rx), [1]);
}

#[tokio::test]
async fn under_topic_order_a_redelivery_waits_in_its_topics_line() {
    let service = Recorder::new(&["a"]);
    let limits = Limits {
        ack_order: AckOrder::Topic,
        ..limits(100)
    };
    let (d, _, mut rx) = dispatcher(Router::new(), service.clone(), limits);
    d.push(&qos1("a", 1), OverLimit::Withhold);
    reconnect(&d, 0, true);
    d.push(&qos1("b", 2), OverLimit::Withhold);
    d.push(&redelivered("a", 1), OverLimit::Withhold);
    for _ in 0..1000 {
        tokio::task::yield_now().await;
    }
    assert_eq!(acked(&mut rx), [2], "b does not wait for a");
    service.gate.add_permits(1);
    settle(&d).await;
    assert_eq!(acked(&mut rx), [1]);
    assert_eq!(service.seen().len(), 2);
}
