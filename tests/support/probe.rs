//! Independent observers of the wire: plain rumqttc (no tower-mqtt) and `mosquitto_sub`.
//!
//! Assert what a broker actually carried with these, not with the code under test.
//!
//! ```ignore
//! let mut probe = Probe::subscribe(&broker.url(), "orders/#").await;
//! publish_raw(&broker.url(), "orders/1", b"{}".to_vec(), QoS::AtLeastOnce, false).await;
//! let publish = probe.next(Duration::from_secs(5)).await.expect("a publish");
//! assert_eq!(publish.payload, &b"{}"[..]);
//! ```

use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS,
    SubscribeReasonCode,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::mosquitto::{find_binary, skip_without};

/// How long connecting, subscribing and acknowledging may take.
const DEADLINE: Duration = Duration::from_secs(10);
/// Largest packet the probe clients accept or send (mosquitto's own limit is 256 MiB).
const MAX_PACKET: usize = 64 * 1024 * 1024;

/// A publish as a subscriber received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ReceivedPublish {
    /// The topic it was published to.
    pub(crate) topic: String,
    /// The payload bytes, unchanged.
    pub(crate) payload: Bytes,
    /// The QoS it was delivered at (the lower of publish and subscription QoS).
    pub(crate) qos: QoS,
    /// The retain flag as delivered (set only for retained messages sent on subscribe).
    pub(crate) retain: bool,
    /// The DUP flag (a redelivery).
    pub(crate) dup: bool,
}

impl ReceivedPublish {
    /// The payload as UTF-8.
    ///
    /// # Panics
    ///
    /// If the payload is not UTF-8.
    pub(crate) fn payload_str(&self) -> &str {
        std::str::from_utf8(&self.payload).expect("payload is UTF-8")
    }
}

/// A plain rumqttc subscriber that records every publish it receives.
///
/// The probe stops at its first connection error (it does not reconnect: a new
/// connection would have a new, empty session); [`Probe::next`] then returns `None` once
/// the recorded publishes are consumed.
pub(crate) struct Probe {
    client: AsyncClient,
    client_id: String,
    publishes: mpsc::UnboundedReceiver<ReceivedPublish>,
    task: JoinHandle<()>,
}

impl Probe {
    /// Connects with a unique client id and a clean session, subscribes to `filter` at
    /// QoS 1 and returns once the broker has acknowledged the subscription.
    ///
    /// # Panics
    ///
    /// If the connection or the subscription fails, or takes longer than 10 s.
    pub(crate) async fn subscribe(url: &str, filter: &str) -> Probe {
        let client_id = unique_id("probe");
        let (client, eventloop) = AsyncClient::new(options(url, &client_id), 64);
        let (subscribed_tx, subscribed_rx) = oneshot::channel();
        let (publishes_tx, publishes) = mpsc::unbounded_channel();
        let task = tokio::spawn(record(eventloop, subscribed_tx, publishes_tx));
        client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("queue the probe's SUBSCRIBE");
        match tokio::time::timeout(DEADLINE, subscribed_rx).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(reason))) => panic!("probe {client_id} on {url}: {reason}"),
            Ok(Err(closed)) => panic!("probe {client_id} on {url}: no SUBACK ({closed})"),
            Err(elapsed) => {
                panic!("probe {client_id} on {url}: no SUBACK for {filter:?} ({elapsed})")
            }
        }
        Probe {
            client,
            client_id,
            publishes,
            task,
        }
    }

    /// The probe's MQTT client id.
    pub(crate) fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The next publish, or `None` if none arrives within `timeout` (or the probe's
    /// connection ended and everything received was consumed).
    pub(crate) async fn next(&mut self, timeout: Duration) -> Option<ReceivedPublish> {
        tokio::time::timeout(timeout, self.publishes.recv())
            .await
            .ok()
            .flatten()
    }

    /// Up to `n` publishes, waiting at most `timeout` in total; fewer if they do not
    /// arrive in time (assert on the length).
    pub(crate) async fn take(&mut self, n: usize, timeout: Duration) -> Vec<ReceivedPublish> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut received = Vec::with_capacity(n);
        while received.len() < n {
            match tokio::time::timeout_at(deadline, self.publishes.recv()).await {
                Ok(Some(publish)) => received.push(publish),
                Ok(None) | Err(_) => break,
            }
        }
        received
    }

    /// Everything that arrives during `duration` (for asserting that nothing, or nothing
    /// more, arrives).
    pub(crate) async fn collect_for(&mut self, duration: Duration) -> Vec<ReceivedPublish> {
        let deadline = tokio::time::Instant::now() + duration;
        let mut received = Vec::new();
        while let Ok(Some(publish)) = tokio::time::timeout_at(deadline, self.publishes.recv()).await
        {
            received.push(publish);
        }
        received
    }

    /// Whether the probe's connection is still up.
    pub(crate) fn is_connected(&self) -> bool {
        !self.task.is_finished()
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        // Best effort: a DISCONNECT if the event loop gets to it, else the socket closes.
        let _ = self.client.try_disconnect();
        self.task.abort();
    }
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probe")
            .field("client_id", &self.client_id)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

/// Drives a probe's event loop: reports the SUBACK, records publishes, stops at the
/// first error.
async fn record(
    mut eventloop: EventLoop,
    subscribed: oneshot::Sender<Result<(), String>>,
    publishes: mpsc::UnboundedSender<ReceivedPublish>,
) {
    let mut subscribed = Some(subscribed);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let result = if ack.return_codes.contains(&SubscribeReasonCode::Failure) {
                    Err(format!("subscription refused: {:?}", ack.return_codes))
                } else {
                    Ok(())
                };
                if let Some(subscribed) = subscribed.take() {
                    let _ = subscribed.send(result);
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let _ = publishes.send(ReceivedPublish {
                    topic: publish.topic,
                    payload: publish.payload,
                    qos: publish.qos,
                    retain: publish.retain,
                    dup: publish.dup,
                });
            }
            Ok(_) => {}
            Err(err) => {
                match subscribed.take() {
                    Some(subscribed) => {
                        let _ = subscribed.send(Err(format!("connection failed: {err}")));
                    }
                    None => eprintln!("probe: connection ended: {err}"),
                }
                return;
            }
        }
    }
}

/// Publishes one message with a fresh plain rumqttc client and disconnects cleanly.
///
/// Returns once the broker has the message: after PUBACK for QoS 1, PUBCOMP for QoS 2,
/// and for QoS 0 after the broker closed the connection in answer to the DISCONNECT
/// that followed the PUBLISH (so it processed the PUBLISH first).
///
/// # Panics
///
/// If any step fails or takes longer than 10 s.
pub(crate) async fn publish_raw(
    url: &str,
    topic: &str,
    payload: impl Into<Vec<u8>>,
    qos: QoS,
    retain: bool,
) {
    let client_id = unique_id("publish-raw");
    let (client, mut eventloop) = AsyncClient::new(options(url, &client_id), 8);
    client
        .publish(topic, qos, retain, payload)
        .await
        .expect("queue PUBLISH");
    let deadline = Instant::now() + DEADLINE;

    // Published (and acknowledged per its QoS).
    loop {
        let event = poll_until(&mut eventloop, deadline, url, "publishing").await;
        let done = match event {
            Event::Outgoing(Outgoing::Publish(_)) => qos == QoS::AtMostOnce,
            Event::Incoming(Packet::PubAck(_)) => qos == QoS::AtLeastOnce,
            Event::Incoming(Packet::PubComp(_)) => qos == QoS::ExactlyOnce,
            _ => false,
        };
        if done {
            break;
        }
    }

    // Disconnected: the broker closes the socket once it has read the DISCONNECT.
    client.disconnect().await.expect("queue DISCONNECT");
    loop {
        let event = tokio::time::timeout_at(deadline.into(), eventloop.poll()).await;
        match event {
            Ok(Ok(_)) => {}
            Ok(Err(_closed)) => return,
            Err(elapsed) => {
                panic!("publish_raw on {url}: broker did not close after DISCONNECT ({elapsed})")
            }
        }
    }
}

/// Publishes `payloads` to `topic` in order at QoS 1 with one fresh plain rumqttc
/// client (clean session), and returns once the broker acknowledged every one and
/// closed the connection after a DISCONNECT.
///
/// # Panics
///
/// If the connection fails, or nothing moves for 10 s.
pub(crate) async fn publish_all(
    url: &str,
    topic: &str,
    payloads: impl IntoIterator<Item = Vec<u8>>,
) {
    publish_each(
        url,
        payloads
            .into_iter()
            .map(|payload| (topic.to_owned(), payload)),
    )
    .await;
}

/// [`publish_all`], each payload to its own topic.
///
/// # Panics
///
/// If the connection fails, or nothing moves for 10 s.
pub(crate) async fn publish_each(
    url: &str,
    publishes: impl IntoIterator<Item = (String, Vec<u8>)>,
) {
    let publishes: Vec<(String, Vec<u8>)> = publishes.into_iter().collect();
    let count = publishes.len();
    // Room for every request, so that queueing never waits for the event loop.
    let (client, mut eventloop) =
        AsyncClient::new(options(url, &unique_id("publish-all")), count + 8);
    for (topic, payload) in publishes {
        client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("queue PUBLISH");
    }
    await_pubacks(&mut eventloop, count, DEADLINE).await;
    client.disconnect().await.expect("queue DISCONNECT");
    loop {
        match tokio::time::timeout(DEADLINE, eventloop.poll()).await {
            Ok(Ok(_)) => {}
            Ok(Err(_closed)) => return,
            Err(elapsed) => {
                panic!("publish_all on {url}: broker did not close after DISCONNECT ({elapsed})")
            }
        }
    }
}

async fn poll_until(eventloop: &mut EventLoop, deadline: Instant, url: &str, doing: &str) -> Event {
    match tokio::time::timeout_at(deadline.into(), eventloop.poll()).await {
        Ok(Ok(event)) => event,
        Ok(Err(err)) => panic!("publish_raw on {url}: {doing} failed: {}", describe(&err)),
        Err(elapsed) => panic!("publish_raw on {url}: {doing}: {elapsed} after {DEADLINE:?}"),
    }
}

fn describe(err: &ConnectionError) -> String {
    format!("{err} ({err:?})")
}

/// Client options for `mqtt://host:port` (also accepts `tcp://` or a bare `host:port`).
fn options(url: &str, client_id: &str) -> MqttOptions {
    let (host, port) = host_port(url);
    let mut options = MqttOptions::new(client_id, host, port);
    options
        .set_clean_session(true)
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(MAX_PACKET, MAX_PACKET);
    options
}

/// Polls a publisher's `eventloop` until `count` PUBACKs have arrived;
/// panics, saying how many came, if it fails or nothing arrives for `wait`.
pub(crate) async fn await_pubacks(eventloop: &mut EventLoop, count: usize, wait: Duration) {
    let mut acked = 0;
    while acked < count {
        match tokio::time::timeout(wait, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(err)) => panic!("publisher failed after {acked} of {count} acks: {err}"),
            Err(elapsed) => panic!("publisher stalled after {acked} of {count} acks: {elapsed}"),
        }
    }
}

/// Splits `mqtt://host:port[/][?query]` into host and port.
///
/// # Panics
///
/// If the URL has no valid port.
pub(crate) fn host_port(url: &str) -> (String, u16) {
    let rest = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
        .unwrap_or(url);
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let (host, port) = authority
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("no port in broker URL {url:?}"));
    let port = port
        .parse()
        .unwrap_or_else(|_| panic!("bad port in broker URL {url:?}"));
    (host.to_owned(), port)
}

/// A client id unique across tests and processes.
pub(crate) fn unique_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// A publish as printed by `mosquitto_sub`, payload bytes exact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CapturedPublish {
    /// The topic.
    pub(crate) topic: String,
    /// The payload bytes, decoded from `mosquitto_sub`'s hex output.
    pub(crate) payload: Vec<u8>,
    /// The delivered QoS (0, 1 or 2).
    pub(crate) qos: u8,
    /// The retain flag as delivered.
    pub(crate) retain: bool,
}

/// A `mosquitto_sub` process capturing publishes, for checking exact wire payloads with
/// a second, non-Rust client.
///
/// It runs `mosquitto_sub -q 1 -F '%q %r %x %t'`: `%x` prints the payload as hex, so any
/// bytes (newlines, NULs, invalid UTF-8) survive.
///
/// `mosquitto_sub` block-buffers its `-d` debug output on a pipe and flushes only after
/// printing a message, so the SUBACK cannot be observed directly. Instead it also
/// subscribes to a private sentinel topic (`support/mosquitto-sub-ready/<id>`), which
/// [`MosquittoSub::spawn`] publishes to until the sentinel comes back. Sentinels are not
/// captured; a probe subscribed to `#` does see them.
pub(crate) struct MosquittoSub {
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
    sentinel_topic: String,
    count: usize,
    captured: Vec<CapturedPublish>,
    unparsed: Vec<String>,
}

impl MosquittoSub {
    /// Subscribes to `topic` on `127.0.0.1:<port>` at QoS 1, expecting `count` publishes,
    /// and returns once the subscription is active.
    ///
    /// Returns `None` (after printing why) if `mosquitto_sub` is not installed; on CI
    /// that panics instead.
    ///
    /// # Panics
    ///
    /// If `count` is 0, or the subscription is not active within 10 s.
    pub(crate) async fn spawn(port: u16, topic: &str, count: usize) -> Option<MosquittoSub> {
        assert!(count > 0, "MosquittoSub needs a count of at least 1");
        let Some(bin) = find_binary("mosquitto_sub") else {
            skip_without("mosquitto_sub");
            return None;
        };
        let client_id = unique_id("mosquitto-sub");
        let sentinel_topic = format!("support/mosquitto-sub-ready/{client_id}");
        let mut child = Command::new(bin)
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-i", &client_id])
            .args(["-q", "1", "-t", topic, "-t", &sentinel_topic])
            .args(["-F", "%q %r %x %t"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn mosquitto_sub");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let mut sub = MosquittoSub {
            child,
            stdout,
            sentinel_topic,
            count,
            captured: Vec::new(),
            unparsed: Vec::new(),
        };
        if !sub.wait_subscribed(port).await {
            let _ = sub.child.start_kill();
            panic!(
                "mosquitto_sub on port {port} did not subscribe to {topic:?} within {DEADLINE:?}\n{}",
                sub.output().await
            );
        }
        Some(sub)
    }

    /// Publishes the sentinel until it comes back; `false` on timeout or exit.
    async fn wait_subscribed(&mut self, port: u16) -> bool {
        let url = format!("mqtt://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while tokio::time::Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return false;
            }
            publish_raw(&url, &self.sentinel_topic, "", QoS::AtMostOnce, false).await;
            let retry = tokio::time::Instant::now() + Duration::from_millis(200);
            while let Ok(Ok(Some(line))) =
                tokio::time::timeout_at(retry.min(deadline), self.stdout.next_line()).await
            {
                if self.read_line(line) {
                    return true;
                }
            }
        }
        false
    }

    /// Waits until `count` publishes were captured, the process exited, or `timeout`
    /// passed, then stops the process and returns what it captured.
    pub(crate) async fn wait(mut self, timeout: Duration) -> Vec<CapturedPublish> {
        let _ = tokio::time::timeout(timeout, async {
            while self.captured.len() < self.count {
                match self.stdout.next_line().await {
                    Ok(Some(line)) => {
                        self.read_line(line);
                    }
                    Ok(None) | Err(_) => break,
                }
            }
        })
        .await;
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        if self.captured.len() < self.count && !self.unparsed.is_empty() {
            eprintln!("mosquitto_sub printed unparsed lines: {:?}", self.unparsed);
        }
        self.captured
    }

    /// Records one output line; `true` if it was a sentinel.
    fn read_line(&mut self, line: String) -> bool {
        match parse_captured(&line) {
            Some(publish) if publish.topic == self.sentinel_topic => true,
            Some(publish) => {
                self.captured.push(publish);
                false
            }
            None => {
                self.unparsed.push(line);
                false
            }
        }
    }

    /// Unparsed output and stderr, for failure messages.
    async fn output(&mut self) -> String {
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            let _ = tokio::time::timeout(Duration::from_secs(1), pipe.read_to_string(&mut stderr))
                .await;
        }
        format!("{}\n--- stderr ---\n{stderr}", self.unparsed.join("\n"))
    }
}

impl std::fmt::Debug for MosquittoSub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MosquittoSub")
            .field("count", &self.count)
            .field("captured", &self.captured.len())
            .finish_non_exhaustive()
    }
}

/// Parses `"<qos> <retain> <hex payload> <topic>"`.
fn parse_captured(line: &str) -> Option<CapturedPublish> {
    let mut fields = line.splitn(4, ' ');
    let qos = fields.next()?.parse().ok().filter(|qos| *qos <= 2)?;
    let retain = match fields.next()? {
        "0" => false,
        "1" => true,
        _ => return None,
    };
    let payload = decode_hex(fields.next()?)?;
    let topic = fields.next()?.to_owned();
    Some(CapturedPublish {
        topic,
        payload,
        qos,
        retain,
    })
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if hex.len() % 2 != 0 {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}
