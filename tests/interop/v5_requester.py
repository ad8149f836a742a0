#!/usr/bin/env python3
"""An MQTT 5 requester of the memory worker: native request/response, as paho does it.

Usage:
    v5_requester.py HOST PORT [--require-trace-context]
                                ask the memory worker through the broker at HOST:PORT
    v5_requester.py --check     exit 0 when Python and the modules are usable

A Python service on MQTT 5 does not listen on `memory/results` with everyone else: it
names a response topic of its own and correlation data on each request, as paho's
`ResponseTopic` and `CorrelationData` properties, and expects the answer there. This
client checks that the memory worker (examples/memory_worker.rs, connected with
MQTT_PROTOCOL=5) answers that way:

(a) each of the `memory/query` requests, a valid fleet envelope sent with a response
    topic unique to the run (`py/replies/<uuid>`), correlation data that is not UTF-8
    and a W3C `traceparent` user property, is answered once on that response topic,
    with the same correlation data bytes, in an envelope the fleet's strict model
    accepts (fleet_client.py's checks for `memory/results`: type `memory.results`,
    source, QoS 1, data `{query, results, k}`) and with the request's envelope id;
(b) none of those replies arrives on `memory/results`, while a control request without
    a response topic is answered there, by its id and without correlation data (the
    fleet convention), which shows a misrouted reply would be seen;
(c) trace context: whether each reply carries a `traceparent` user property continuing
    its request's trace id. A reply without one is reported as "trace context: absent"
    and fails only with `--require-trace-context`; one with a malformed value, another
    trace id, or a mix of replies with and without fails.

Every wait is bounded. Exit status: 0 when every check passed (one summary line on
stdout), 1 when one failed (the reasons on stderr), 2 on bad usage, 3 when Python is
older than 3.11 or aiomqtt 2 / pydantic 2 are missing (fleet_client.py decides).
"""

from __future__ import annotations

import sys

# Importing fleet_client would otherwise leave a __pycache__ in the source tree.
sys.dont_write_bytecode = True

# The fleet's strict envelope and the worker's contract, with its module checks (exit 3).
import fleet_client as fleet

try:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
except ImportError as missing:
    sys.stderr.write(f"v5_requester: module {missing.name!r} is missing (paho-mqtt 2)\n")
    sys.exit(fleet.MISSING_MODULES)

import asyncio  # noqa: E402
import re  # noqa: E402
import secrets  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import aiomqtt  # noqa: E402

QUERY = "memory/query"
RESULTS = fleet.RESULTS
TRACEPARENT = "traceparent"
# version 00, trace id, parent (span) id, flags; lowercase hex (W3C Trace Context).
TRACEPARENT_FORMAT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")

# (query text, top_k) of each request with a response topic.
QUERIES = [("kettle", 1), ("Lisbon", 2), ("orchids", None), ("telescope", 3), ("budget", 4)]

REPLIES_TIMEOUT = 5.0  # seconds for every reply, from the last request sent
OVERALL_TIMEOUT = 20.0  # seconds for the whole run
# Set by `--require-trace-context`: a reply without a traceparent fails the run.
REQUIRE_TRACE_CONTEXT = False

ContractError = fleet.ContractError
check = fleet.check


@dataclass
class Sent:
    """One request: what its reply must carry back."""

    what: str
    request_id: str
    text: str
    top_k: int | None
    correlation_data: bytes | None
    trace_id: str
    span_id: str


def traceparent() -> tuple[str, str, str]:
    """A new sampled W3C traceparent: (value, trace id, span id)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def user_properties(message: aiomqtt.Message, name: str) -> list[str]:
    pairs = getattr(message.properties, "UserProperty", None) or []
    return [value for key, value in pairs if key == name]


def correlation_data(message: aiomqtt.Message) -> bytes | None:
    data = getattr(message.properties, "CorrelationData", None)
    return None if data is None else bytes(data)


class Requester:
    def __init__(self, client: aiomqtt.Client, response_topic: str) -> None:
        self.client = client
        self.response_topic = response_topic
        self.native: dict[bytes, Sent] = {}  # by correlation data
        self.control: Sent | None = None
        self.answered: dict[str, aiomqtt.Message] = {}  # by request id

    async def send(self, what: str, text: str, top_k: int | None, native: bool) -> Sent:
        data: dict = {"text": text}
        if top_k is not None:
            data["top_k"] = top_k
        request_id, payload = fleet.envelope(QUERY, data)
        fleet.Envelope.model_validate_json(payload)  # what the fleet itself would send
        value, trace_id, span_id = traceparent()
        properties = Properties(PacketTypes.PUBLISH)
        properties.UserProperty = (TRACEPARENT, value)
        corr = None
        if native:
            # Never valid UTF-8 (0xff), with a NUL first: bytes, not text, must come back.
            corr = b"\x00corr-" + str(len(self.native) + 1).encode() + b"\xff\xfe\x80"
            properties.ResponseTopic = self.response_topic
            properties.CorrelationData = corr
        sent = Sent(what, request_id, text, top_k, corr, trace_id, span_id)
        await self.client.publish(QUERY, payload, qos=1, properties=properties)
        return sent

    async def run(self) -> str:
        for n, (text, top_k) in enumerate(QUERIES, 1):
            sent = await self.send(f"request {n} ({text!r})", text, top_k, native=True)
            self.native[sent.correlation_data] = sent
        self.control = await self.send("the control request", "kettle", 2, native=False)

        expected = len(self.native) + 1
        try:
            async with asyncio.timeout(REPLIES_TIMEOUT):
                async for message in self.client.messages:
                    self.accept(message)
                    if len(self.answered) == expected:
                        break
        except TimeoutError:
            missing = [
                sent.what
                for sent in [*self.native.values(), self.control]
                if sent.request_id not in self.answered
            ]
            raise ContractError(
                f"no reply within {REPLIES_TIMEOUT:g} s to {', '.join(missing)}"
            ) from None
        return (
            f"v5_requester: OK: {len(self.native)}/{len(QUERIES)} MQTT 5 requests answered "
            f"once on their response topic {self.response_topic} with their correlation data "
            f"(not UTF-8) and envelope id, accepted by the strict model, none on {RESULTS}; "
            f"the control request without a response topic answered on {RESULTS} by its id; "
            f"{self.trace_context()}"
        )

    def accept(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        # The worker's contract for a memory/results reply, wherever it was delivered.
        try:
            reply = fleet.validate(RESULTS, message.payload, message.qos, message.retain)
        except ContractError as err:
            raise ContractError(f"a reply on {topic}, checked as {RESULTS}'s: {err}") from None
        reply_id = reply.envelope.id
        corr = correlation_data(message)
        shown = bytes(message.payload)[:300]
        if topic == RESULTS:
            natives = {sent.request_id: sent for sent in self.native.values()}
            check(
                reply_id not in natives,
                f"the reply to {natives[reply_id].what if reply_id in natives else ''} "
                f"arrived on {RESULTS}, not on its response topic {self.response_topic}: "
                f"{shown!r}",
            )
            check(
                reply_id == self.control.request_id,
                f"{RESULTS}: a reply with id {reply_id} this client never asked: {shown!r}",
            )
            check(
                corr is None,
                f"{RESULTS}: the reply to the control request (sent without correlation "
                f"data) carries correlation data {corr!r}",
            )
            sent = self.control
        else:
            check(
                topic == self.response_topic,
                f"a reply on {topic!r}, subscribed to {self.response_topic}: {shown!r}",
            )
            check(
                corr is not None,
                f"{topic}: a reply (id {reply_id}) without correlation data: {shown!r}",
            )
            check(
                corr in self.native,
                f"{topic}: correlation data {corr!r} of no request (sent "
                f"{sorted(self.native)!r}): {shown!r}",
            )
            sent = self.native[corr]
            check(
                reply_id == sent.request_id,
                f"{topic}: the reply to {sent.what} (correlation data {corr!r}) has envelope "
                f"id {reply_id}, the request's is {sent.request_id}",
            )
        check(
            sent.request_id not in self.answered,
            f"{topic}: a second reply to {sent.what} (id {reply_id}): {shown!r}",
        )
        results: fleet.MemoryResults = reply.data
        check(
            results.query == sent.text,
            f"{topic}: the reply to {sent.what} has query {results.query!r}",
        )
        if sent.top_k is not None:
            check(
                results.k == sent.top_k,
                f"{topic}: the reply to {sent.what} has k {results.k}, sent top_k {sent.top_k}",
            )
        self.answered[sent.request_id] = message

    def trace_context(self) -> str:
        """What the replies say about trace context; raises on a broken one."""
        sent = {s.request_id: s for s in [*self.native.values(), self.control]}
        carried = 0
        own_spans = 0
        for request_id, message in self.answered.items():
            request = sent[request_id]
            values = user_properties(message, TRACEPARENT)
            if not values:
                continue
            check(
                len(values) == 1,
                f"the reply to {request.what} carries {len(values)} traceparents: {values}",
            )
            parsed = TRACEPARENT_FORMAT.match(values[0])
            check(
                parsed is not None,
                f"the reply to {request.what} carries a malformed traceparent {values[0]!r}",
            )
            check(
                parsed.group(1) == request.trace_id,
                f"the reply to {request.what} carries trace id {parsed.group(1)}, the "
                f"request's is {request.trace_id} ({values[0]!r})",
            )
            carried += 1
            own_spans += parsed.group(2) != request.span_id
        total = len(self.answered)
        if carried == 0:
            check(
                not REQUIRE_TRACE_CONTEXT,
                f"trace context: none of the {total} replies carries a traceparent",
            )
            return f"trace context: absent (none of the {total} replies carries a traceparent)"
        check(
            carried == total,
            f"trace context: {carried} of the {total} replies carry a traceparent, the others "
            "none",
        )
        return (
            f"trace context: propagated ({carried}/{total} replies continue their request's "
            f"trace id, {own_spans} with a span id of their own)"
        )



async def main(host: str, port: int) -> str:
    response_topic = f"py/replies/{fleet.new_id()}"
    identifier = f"v5-requester-{fleet.new_id()[:12]}"
    async with asyncio.timeout(OVERALL_TIMEOUT):
        async with aiomqtt.Client(
            host,
            port,
            identifier=identifier,
            protocol=aiomqtt.ProtocolVersion.V5,
            timeout=REPLIES_TIMEOUT,
        ) as client:
            # RESULTS too: a reply misrouted there must be seen, not missed.
            await client.subscribe([(response_topic, 1), (RESULTS, 1)])
            return await Requester(client, response_topic).run()


def cli(argv: list[str]) -> int:
    global REQUIRE_TRACE_CONTEXT  # noqa: PLW0603 - set once, before the run
    if argv == ["--check"]:
        return 0
    flag = "--require-trace-context"
    if len(argv) == 3 and argv[2] == flag:
        REQUIRE_TRACE_CONTEXT = True
        argv = argv[:2]
    if len(argv) != 2 or not argv[1].isdigit():
        sys.stderr.write(f"usage: {sys.argv[0]} HOST PORT [{flag}] | --check\n")
        return 2
    try:
        summary = asyncio.run(main(argv[0], int(argv[1])))
    except Exception as error:  # noqa: BLE001 - every failure becomes a message
        lines = fleet.failures(error)
        if isinstance(error, TimeoutError):
            lines = [f"the run took longer than {OVERALL_TIMEOUT:g} s"]
        for line in lines or [repr(error)]:
            sys.stderr.write(f"v5_requester: FAIL: {line}\n")
        return 1
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
