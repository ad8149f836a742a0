#!/usr/bin/env python3
"""The fleet's side of the memory worker: a real Python client, the fleet's strict envelope.

Usage:
    fleet_client.py HOST PORT [--delivered-at-subscription-qos]
                                drive the memory worker through the broker at HOST:PORT
    fleet_client.py --check     exit 0 when Python and the modules are usable

`--delivered-at-subscription-qos` is for a broker that delivers every message at the
subscription's QoS instead of the lower of that and the published QoS (MQTT 3.1.1
section 3.8.4), as rumqttd 0.20 does: there the QoS a message was published with cannot
be seen, and every message is expected at QoS 1, the QoS this client subscribes with.

It checks the worker's MQTT contract (examples/memory_worker.rs) as the Python services
see it:

(a) the retained `system/health/memory` says ready and `system/character/current` holds
    the character;
(b) after a few `stt/final` and `tts/say` texts, 20 `memory/query` requests are each
    answered once on `memory/results` (QoS 1, type `memory.results`, the request's id,
    data `{query, results: [{document, score}], k}`);
(c) `character/get` is answered on `character/result` (QoS 0, the request's id) with the
    character;
(d) `character/update` changes a trait and the retained `system/character/current`
    follows (read again by a fresh connection);
(e) junk payloads (not JSON, not UTF-8, a JSON array, wrong types, an extra envelope
    key, ...) sent between the queries leave the worker answering on every topic;
(f) every message received from the worker passes `Envelope.model_validate_json` with
    `strict=True, extra="forbid"`, and its data passes a strict model of its topic.

Every wait is bounded. Exit status: 0 when every check passed (one summary line on
stdout), 1 when one failed (the reason on stderr), 2 on bad usage, 3 when Python is
older than 3.11 or aiomqtt 2 / pydantic 2 are missing.
"""

from __future__ import annotations

import sys

MISSING_MODULES = 3

if sys.version_info < (3, 11):
    sys.stderr.write("fleet_client: needs Python 3.11 or newer\n")
    sys.exit(MISSING_MODULES)

try:
    import aiomqtt
    import pydantic
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
except ImportError as missing:
    sys.stderr.write(
        f"fleet_client: module {missing.name!r} is missing: "
        "python3 -m pip install 'aiomqtt>=2' 'pydantic>=2'\n"
    )
    sys.exit(MISSING_MODULES)


def _major(version: str) -> int:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0


if _major(pydantic.VERSION) < 2 or _major(getattr(aiomqtt, "__version__", "0")) < 2:
    sys.stderr.write(
        f"fleet_client: needs aiomqtt>=2 and pydantic>=2, found aiomqtt "
        f"{getattr(aiomqtt, '__version__', '?')} and pydantic {pydantic.VERSION}\n"
    )
    sys.exit(MISSING_MODULES)

import asyncio  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

# ---- The fleet's wire model ----------------------------------------------------------


class Envelope(BaseModel):
    """The fleet's envelope: exactly these five keys, nothing coerced."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: str = Field(pattern=r"^[0-9a-f]{32}$")
    type: str
    ts: float
    source: str
    data: dict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class HealthData(Strict):
    message_id: str
    ok: bool
    event: str
    err: str | None
    timestamp: float


class MemoryResult(Strict):
    document: str
    score: float


class MemoryResults(Strict):
    query: str
    results: list[MemoryResult]
    k: int


# ---- The worker's contract -----------------------------------------------------------

WORKER_SOURCE = "memory-worker"
CLIENT_SOURCE = "fleet-interop"

HEALTH = "system/health/memory"
CHARACTER = "system/character/current"
RESULTS = "memory/results"
CHARACTER_RESULT = "character/result"

# What the worker publishes: topic -> event type.
WORKER_TYPES = {
    HEALTH: "system.health.memory",
    CHARACTER: "system.character.current",
    RESULTS: "memory.results",
    CHARACTER_RESULT: "character.result",
}
# The delivered QoS where the contract fixes it (we subscribe at QoS 1).
WORKER_QOS = {HEALTH: 1, RESULTS: 1, CHARACTER_RESULT: 0}
SUBSCRIBED_QOS = 1
# Set by `--delivered-at-subscription-qos`: every message arrives at SUBSCRIBED_QOS.
DELIVERED_AT_SUBSCRIPTION_QOS = False
DATA_MODELS: dict[str, type[Strict]] = {HEALTH: HealthData, RESULTS: MemoryResults}

# What the worker consumes: topic -> event type.
INPUT_TYPES = {
    "stt/final": "stt.final",
    "tts/say": "tts.say",
    "memory/query": "memory.query",
    "character/get": "character.get",
    "character/update": "character.update",
}

# Documents fed to the store, each with one word no other document has.
FED = [
    ("stt/final", "kettle", "the copper kettle sits in the kitchen"),
    ("stt/final", "Lisbon", "my sister moved to Lisbon"),
    ("stt/final", "Thursday", "the budget meeting moved to Thursday"),
    ("tts/say", "orchids", "I will water the orchids tomorrow"),
    ("tts/say", "telescope", "the telescope arrived this morning"),
]
# Fed after the junk, to show both text topics still feed the store.
FED_AFTER_JUNK = [
    ("stt/final", "Esperanto", "the parrot speaks Esperanto"),
    ("tts/say", "lighthouse", "the lighthouse keeper waved back"),
]
QUERIES = 20
TOP_KS = [1, 2, 3, None]

REPLY_TIMEOUT = 5.0  # seconds for one reply
STORE_TIMEOUT = 10.0  # seconds for fed texts to become searchable
OVERALL_TIMEOUT = 45.0  # seconds for the whole run
TS_SKEW = 600.0  # seconds a worker `ts` may differ from this clock


class ContractError(Exception):
    """The worker broke its contract (or did not answer in time)."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ContractError(message)


def new_id() -> str:
    return uuid.uuid4().hex


def envelope(topic: str, data: Any, request_id: str | None = None) -> tuple[str, bytes]:
    """A fleet envelope for `topic` as the Python services send it."""
    request_id = request_id or new_id()
    body = {
        "id": request_id,
        "type": INPUT_TYPES[topic],
        "ts": time.time(),
        "source": CLIENT_SOURCE,
        "data": data,
    }
    return request_id, json.dumps(body).encode()


def junk() -> list[tuple[str, bytes, str]]:
    """Malformed input: (topic, payload, what it is). None of it decodes into a request
    the worker can act on, except where the worker chooses to ignore an unknown key."""

    def env(topic: str, data: Any) -> bytes:
        return envelope(topic, data)[1]

    extra_key = json.loads(env("memory/query", {"text": "kettle"}))
    extra_key["reply_to"] = "somewhere/else"
    wrong_fields = {
        "id": "not-hex",
        "type": 7,
        "ts": "yesterday",
        "source": None,
        "data": {"text": "kettle"},
    }
    query, update = "memory/query", "character/update"
    return [
        (query, b"this is not json", "not JSON"),
        (query, b'[{"text": "kettle"}]', "a JSON array"),
        (query, env(query, {"text": 42}), "text is a number"),
        ("stt/final", b"\xff\xfe\x00 not utf-8", "not UTF-8"),
        (query, env(query, {"text": "kettle", "top_k": "three"}), "top_k is a string"),
        (update, env(update, {"trait": 5, "value": 1}), "trait is a number"),
        (query, json.dumps(extra_key).encode(), "an extra envelope key"),
        ("tts/say", b"{}", "an object without text"),
        (query, json.dumps(wrong_fields).encode(), "envelope fields of wrong types"),
        ("stt/final", env("stt/final", {"text": ["a", "list"]}), "text is a list"),
        (query, env(query, {"text": "kettle", "top_k": -1}), "top_k is negative"),
        (update, b'"just a string"', "a JSON string"),
        ("character/get", b"null", "JSON null"),
        (query, b"", "an empty payload"),
        (query, b'{"text": ', "truncated JSON"),
        (update, env(update, {"value": 1}), "no trait"),
    ]


# ---- Receiving: every message is validated before anything looks at it ----------------


@dataclass
class Received:
    topic: str
    envelope: Envelope
    data: Any  # the topic's strict model, or the data dict
    qos: int
    retain: bool


def validate(topic: str, payload: Any, qos: int, retain: bool) -> Received:
    """Checks one message from the worker; raises ContractError with the payload."""
    raw = bytes(payload) if isinstance(payload, (bytes, bytearray)) else str(payload).encode()
    shown = raw[:400]
    check(topic in WORKER_TYPES, f"message on unexpected topic {topic!r}: {shown!r}")
    try:
        env = Envelope.model_validate_json(raw)
    except ValidationError as err:
        raise ContractError(
            f"{topic}: the strict Envelope (extra='forbid') rejected {shown!r}:\n{err}"
        ) from None
    check(
        env.type == WORKER_TYPES[topic],
        f"{topic}: type {env.type!r}, expected {WORKER_TYPES[topic]!r}: {shown!r}",
    )
    check(
        env.source == WORKER_SOURCE,
        f"{topic}: source {env.source!r}, expected {WORKER_SOURCE!r}: {shown!r}",
    )
    check(
        abs(env.ts - time.time()) < TS_SKEW,
        f"{topic}: ts {env.ts} is not epoch seconds now: {shown!r}",
    )
    if DELIVERED_AT_SUBSCRIPTION_QOS:
        check(
            qos == SUBSCRIBED_QOS,
            f"{topic}: delivered at QoS {qos} by a broker that delivers at the "
            f"subscription's QoS {SUBSCRIBED_QOS}: {shown!r}",
        )
    elif topic in WORKER_QOS:
        check(
            qos == WORKER_QOS[topic],
            f"{topic}: delivered at QoS {qos}, expected {WORKER_QOS[topic]}: {shown!r}",
        )
    model = DATA_MODELS.get(topic)
    if model is None:
        data: Any = env.data
    else:
        try:
            data = model.model_validate(env.data)
        except ValidationError as err:
            raise ContractError(
                f"{topic}: data does not match {model.__name__}: {shown!r}:\n{err}"
            ) from None
    return Received(topic, env, data, qos, retain)


class Inbox:
    """The worker's messages on one connection, validated, queued per topic."""

    def __init__(self, counts: Counter[str]) -> None:
        self.counts = counts
        self.queues: dict[str, asyncio.Queue[Received]] = {
            topic: asyncio.Queue() for topic in WORKER_TYPES
        }

    async def read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            self.accept(message)

    def accept(self, message: aiomqtt.Message) -> None:
        received = validate(message.topic.value, message.payload, message.qos, message.retain)
        self.counts[received.topic] += 1
        self.queues[received.topic].put_nowait(received)

    async def next(self, topic: str, what: str, timeout: float = REPLY_TIMEOUT) -> Received:
        try:
            async with asyncio.timeout(timeout):
                return await self.queues[topic].get()
        except TimeoutError:
            raise ContractError(f"no {what} on {topic} within {timeout:g} s") from None


class Replies:
    """Replies on one topic, matched to requests by id; each request answered once."""

    def __init__(self, inbox: Inbox, topic: str) -> None:
        self.inbox = inbox
        self.topic = topic
        self.waiting: dict[str, Received] = {}
        self.claimed: set[str] = set()

    async def get(self, request_id: str, what: str, timeout: float = REPLY_TIMEOUT) -> Received:
        deadline = time.monotonic() + timeout
        while request_id not in self.waiting:
            remaining = max(deadline - time.monotonic(), 0.0)
            try:
                reply = await self.inbox.next(self.topic, what, remaining)
            except ContractError:
                raise ContractError(
                    f"no reply on {self.topic} with id {request_id} ({what}) within "
                    f"{timeout:g} s"
                ) from None
            self.hold(reply)
        self.claimed.add(request_id)
        return self.waiting.pop(request_id)

    def unsolicited(self) -> int:
        """Replies to ids this client never asked with (junk the worker accepted), counting
        those still queued."""
        queue = self.inbox.queues[self.topic]
        while not queue.empty():
            self.hold(queue.get_nowait())
        return len(self.waiting)

    def hold(self, reply: Received) -> None:
        reply_id = reply.envelope.id
        check(
            reply_id not in self.claimed and reply_id not in self.waiting,
            f"{self.topic}: a second reply with id {reply_id}: {reply.envelope!r}",
        )
        self.waiting[reply_id] = reply


# ---- The run ---------------------------------------------------------------------------


class FleetClient:
    def __init__(self, host: str, port: int, client: aiomqtt.Client, inbox: Inbox) -> None:
        self.host = host
        self.port = port
        self.client = client
        self.inbox = inbox
        self.results = Replies(inbox, RESULTS)
        self.characters = Replies(inbox, CHARACTER_RESULT)
        self.answered = 0
        self.junk_sent = 0

    async def publish(self, topic: str, payload: bytes) -> None:
        await self.client.publish(topic, payload, qos=1)

    async def send(self, topic: str, data: Any) -> str:
        request_id, payload = envelope(topic, data)
        await self.publish(topic, payload)
        return request_id

    async def query(self, text: str, top_k: int | None) -> str:
        data: dict[str, Any] = {"text": text}
        if top_k is not None:
            data["top_k"] = top_k
        return await self.send("memory/query", data)

    def check_results(self, reply: Received, text: str, top_k: int | None) -> MemoryResults:
        results: MemoryResults = reply.data
        where = f"{RESULTS} id {reply.envelope.id}"
        check(results.query == text, f"{where}: query {results.query!r}, sent {text!r}")
        if top_k is not None:
            check(results.k == top_k, f"{where}: k {results.k}, sent top_k {top_k}")
        check(results.k >= 1, f"{where}: k {results.k}")
        check(
            len(results.results) <= results.k,
            f"{where}: {len(results.results)} results for k={results.k}",
        )
        return results

    async def ask(self, text: str, top_k: int | None, what: str) -> MemoryResults:
        request_id = await self.query(text, top_k)
        reply = await self.results.get(request_id, what)
        return self.check_results(reply, text, top_k)

    async def searchable(self, fed: list[tuple[str, str, str]]) -> None:
        """Waits until every fed document comes back from a query for its word (the text
        topics and `memory/query` are handled side by side, so a query may overtake)."""
        words = " ".join(word for _, word, _ in fed)
        wanted = {document for _, _, document in fed}
        deadline = time.monotonic() + STORE_TIMEOUT
        while True:
            results = await self.ask(words, 10, "a store probe")
            found = {result.document for result in results.results}
            if wanted <= found:
                return
            check(
                time.monotonic() < deadline,
                f"after {STORE_TIMEOUT:g} s a query for {words!r} still misses "
                f"{sorted(wanted - found)} (got {sorted(found)})",
            )
            # Nothing announces that a text was stored; ask again shortly.
            await asyncio.sleep(0.05)

    async def feed(self, fed: list[tuple[str, str, str]]) -> None:
        for topic, _, document in fed:
            await self.send(topic, {"text": document})
        await self.searchable(fed)

    async def retained(self) -> dict[str, Received]:
        """The retained health and character, as a fresh connection reads them."""
        counts = self.inbox.counts
        fresh = Inbox(counts)
        found: dict[str, Received] = {}
        identifier = f"fleet-interop-fresh-{new_id()[:12]}"
        async with aiomqtt.Client(
            self.host, self.port, identifier=identifier, clean_session=True, timeout=REPLY_TIMEOUT
        ) as client:
            await client.subscribe([(HEALTH, SUBSCRIBED_QOS), (CHARACTER, SUBSCRIBED_QOS)])
            try:
                async with asyncio.timeout(REPLY_TIMEOUT):
                    async for message in client.messages:
                        fresh.accept(message)
                        received = fresh.queues[message.topic.value].get_nowait()
                        check(
                            received.retain,
                            f"{received.topic}: a fresh subscriber got a live message first, "
                            f"not the retained one: {received.envelope!r}",
                        )
                        found[received.topic] = received
                        if len(found) == 2:
                            break
            except TimeoutError:
                raise ContractError(
                    f"a fresh subscriber got no retained message on "
                    f"{sorted({HEALTH, CHARACTER} - set(found))} within {REPLY_TIMEOUT:g} s"
                ) from None
        return found

    async def get_character(self, what: str) -> dict:
        request_id = await self.send("character/get", {})
        reply = await self.characters.get(request_id, what)
        return reply.data

    async def run(self) -> str:
        # (a) Retained health and character.
        while True:
            health = await self.inbox.next(HEALTH, "health")
            if health.data.ok and health.data.event == "ready":
                break
        check(health.data.err is None, f"{HEALTH}: ready with err {health.data.err!r}")
        character = (await self.inbox.next(CHARACTER, "character")).data
        check(bool(character), f"{CHARACTER}: the character has no traits")

        # (b) and (e): 20 queries, junk in between, each query answered once.
        await self.feed(FED)
        garbage = junk()
        pending: list[tuple[str, str, str, int | None, str]] = []
        after = "none yet"
        for n in range(QUERIES):
            _, word, document = FED[n % len(FED)]
            top_k = TOP_KS[n % len(TOP_KS)]
            pending.append((await self.query(word, top_k), word, document, top_k, after))
            if n < len(garbage):
                topic, payload, after = garbage[n]
                await self.publish(topic, payload)
                self.junk_sent += 1
                after = f"{after!r} on {topic}"
        for topic, payload, _ in garbage[QUERIES:]:
            await self.publish(topic, payload)
            self.junk_sent += 1
        for request_id, word, document, top_k, after in pending:
            what = f"the query for {word!r}, sent after the junk {after}"
            reply = await self.results.get(request_id, what)
            results = self.check_results(reply, word, top_k)
            check(
                bool(results.results) and results.results[0].document == document,
                f"{RESULTS} id {request_id}: a query for {word!r} did not put the only "
                f"document containing it first: {reply.envelope.data}",
            )
            self.answered += 1

        # Every topic still works after the junk.
        await self.feed(FED_AFTER_JUNK)

        # (c) character/get.
        got = await self.get_character("the character")
        check(got == character, f"{CHARACTER_RESULT}: {got} differs from {CHARACTER}: {character}")

        # (d) character/update -> the retained character follows.
        marker = new_id()
        updates = {"interop_marker": marker}
        existing = next(iter(character))
        updates[existing] = {"set_by": CLIENT_SOURCE, "values": [1, 2.5, None, True]}
        for name, value in updates.items():
            await self.send("character/update", {"trait": name, "value": value})
        while True:
            current = (await self.inbox.next(CHARACTER, "the updated character")).data
            if all(current.get(name) == value for name, value in updates.items()):
                break
        retained = await self.retained()
        check(
            retained[CHARACTER].data == current,
            f"{CHARACTER}: retained {retained[CHARACTER].data}, last published {current}",
        )
        fresh_health = retained[HEALTH].data
        check(
            fresh_health.ok and fresh_health.event == "ready",
            f"{HEALTH}: retained {fresh_health} while the worker runs",
        )
        got = await self.get_character("the updated character")
        check(got == current, f"{CHARACTER_RESULT}: {got}, expected the updated {current}")

        # The worker is still up and answering.
        await self.ask("kettle", 1, "the last query")

        counts = self.inbox.counts
        per_topic = ", ".join(f"{topic} {counts[topic]}" for topic in WORKER_TYPES)
        return (
            f"fleet_client: OK: {sum(counts.values())} envelopes from the worker accepted by "
            f"the strict model ({per_topic}); {self.answered}/{QUERIES} queries answered with "
            f"matching ids; {self.junk_sent} junk payloads survived "
            f"({self.results.unsolicited()} of them answered); character updated and retained"
        )


async def main(host: str, port: int) -> str:
    counts: Counter[str] = Counter()
    inbox = Inbox(counts)
    identifier = f"fleet-interop-{new_id()[:12]}"
    async with asyncio.timeout(OVERALL_TIMEOUT):
        async with aiomqtt.Client(
            host, port, identifier=identifier, clean_session=True, timeout=REPLY_TIMEOUT
        ) as client:
            await client.subscribe([(topic, SUBSCRIBED_QOS) for topic in WORKER_TYPES])
            async with asyncio.TaskGroup() as tasks:
                reader = tasks.create_task(inbox.read(client))
                summary = await FleetClient(host, port, client, inbox).run()
                reader.cancel()
    return summary


def failures(error: BaseException) -> list[str]:
    """The messages of an error, with task groups flattened."""
    if isinstance(error, BaseExceptionGroup):
        return [line for inner in error.exceptions for line in failures(inner)]
    if isinstance(error, ContractError):
        return [str(error)]
    if isinstance(error, TimeoutError):
        return [f"the run took longer than {OVERALL_TIMEOUT:g} s"]
    if isinstance(error, asyncio.CancelledError):
        return []
    return [f"{type(error).__name__}: {error}"]


def cli(argv: list[str]) -> int:
    global DELIVERED_AT_SUBSCRIPTION_QOS  # noqa: PLW0603 - set once, before the run
    if argv == ["--check"]:
        return 0
    flag = "--delivered-at-subscription-qos"
    if len(argv) == 3 and argv[2] == flag:
        DELIVERED_AT_SUBSCRIPTION_QOS = True
        argv = argv[:2]
    if len(argv) != 2 or not argv[1].isdigit():
        sys.stderr.write(f"usage: {sys.argv[0]} HOST PORT [{flag}] | --check\n")
        return 2
    try:
        summary = asyncio.run(main(argv[0], int(argv[1])))
    except Exception as error:  # noqa: BLE001 - every failure becomes a message
        for line in failures(error) or [repr(error)]:
            sys.stderr.write(f"fleet_client: FAIL: {line}\n")
        return 1
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
