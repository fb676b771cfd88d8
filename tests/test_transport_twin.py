"""The in-memory transport twin (lime_mqtt/transport/memory.py).

One contract runs against both the twin and a real Mosquitto (``transport`` fixture);
the faults only the twin can make on demand (drop, partition, broker stop) are tested
on the twin alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from lime_mqtt.core.errors import TransportError
from lime_mqtt.transport.base import Connection, LastWill, Message, Transport
from lime_mqtt.transport.memory import MemoryBroker, MemoryConnection, topic_matches
from lime_mqtt.transport.mosquitto import LocalBroker
from lime_mqtt.transport.mqtt import MqttTransport, _plain_publish

WAIT_S = 5.0


async def next_message(messages: AsyncIterator[Message], timeout_s: float = WAIT_S) -> Message:
    async with asyncio.timeout(timeout_s):
        return await anext(messages)


async def until_marker(messages: AsyncIterator[Message], marker: str) -> list[Message]:
    """Everything received up to and including the message on topic ``marker``."""
    got: list[Message] = []
    while not got or got[-1].topic != marker:
        got.append(await next_message(messages))
    return got


# -- the contract, on both implementations --------------------------------------------


@pytest.fixture(params=["memory", pytest.param("mosquitto", marks=pytest.mark.integration)])
def transport(request: pytest.FixtureRequest) -> Transport:
    if request.param == "memory":
        return MemoryBroker()
    return MqttTransport(request.getfixturevalue("broker").url)


async def test_plus_and_hash_filters(transport: Transport, cluster_name: str) -> None:
    p = cluster_name
    async with transport.connection() as sub, transport.connection() as pub:
        messages = sub.messages()
        await sub.subscribe(f"{p}/a/+", f"{p}/b/#")
        for topic in ("a/x", "a/x/y", "a", "a/", "b", "b/x/y", "c/x", "bb/x", "b/end"):
            await pub.publish(f"{p}/{topic}", topic, qos=1)
        got = await until_marker(messages, f"{p}/b/end")
    assert [m.topic.removeprefix(f"{p}/") for m in got] == ["a/x", "a/", "b", "b/x/y", "b/end"]
    assert [m.payload for m in got] == [b"a/x", b"a/", b"b", b"b/x/y", b"b/end"]  # str payloads, encoded


async def test_retained_message_goes_to_later_subscribers_until_cleared(
    transport: Transport, cluster_name: str
) -> None:
    topic = f"{cluster_name}/r/plan"
    async with transport.connection() as pub, transport.connection() as early, transport.connection() as late:
        await pub.publish(topic, b"v1", qos=1, retain=True)
        early_messages = early.messages()
        await early.subscribe(topic)
        first = await next_message(early_messages)
        assert (first.topic, first.payload, first.retain) == (topic, b"v1", True)

        await pub.publish(topic, b"v2", qos=1, retain=True)  # live: retain flag off
        live = await next_message(early_messages)
        assert (live.payload, live.retain) == (b"v2", False)

        await pub.publish(topic, b"", qos=1, retain=True)  # clears it; still sent to live subscribers
        cleared = await next_message(early_messages)
        assert (cleared.payload, cleared.retain) == (b"", False)

        late_messages = late.messages()
        await late.subscribe(f"{cluster_name}/r/#")
        await pub.publish(f"{cluster_name}/r/marker", b"m", qos=1)
        assert (await next_message(late_messages)).topic == f"{cluster_name}/r/marker"


async def test_live_messages_are_not_marked_retained(transport: Transport, cluster_name: str) -> None:
    async with transport.connection() as sub, transport.connection() as pub:
        messages = sub.messages()
        await sub.subscribe(f"{cluster_name}/#")
        await pub.publish(f"{cluster_name}/plain", b"1", qos=1)
        await pub.publish(f"{cluster_name}/kept", b"2", qos=1, retain=True)
        got = [await next_message(messages), await next_message(messages)]
        await pub.publish(f"{cluster_name}/kept", b"", qos=1, retain=True)  # leave no retained message behind
    assert [(m.payload, m.retain) for m in got] == [(b"1", False), (b"2", False)]


@pytest.mark.parametrize("qos", [0, 1])
async def test_response_topic_and_correlation_data_round_trip(
    transport: Transport, cluster_name: str, qos: int
) -> None:
    requests, replies = f"{cluster_name}/req", f"{cluster_name}/reply/c1"
    async with transport.connection() as server, transport.connection() as client:
        server_messages, client_messages = server.messages(), client.messages()
        await server.subscribe(requests)
        await client.subscribe(replies)
        await client.publish(requests, b"ping", qos=qos, response_topic=replies, correlation_data=b"\x00id-7")
        request = await next_message(server_messages)
        assert (request.payload, request.response_topic, request.correlation_data) == (b"ping", replies, b"\x00id-7")
        assert request.response_topic is not None
        await server.publish(request.response_topic, b"pong", qos=qos, correlation_data=request.correlation_data)
        reply = await next_message(client_messages)
    assert (reply.topic, reply.payload, reply.correlation_data, reply.response_topic) == (
        replies, b"pong", b"\x00id-7", None)


async def test_qos0_and_qos1_arrive_in_publish_order(transport: Transport, cluster_name: str) -> None:
    topic = f"{cluster_name}/seq"
    async with transport.connection() as sub, transport.connection() as pub:
        messages = sub.messages()
        await sub.subscribe(topic, qos=1)
        sent = [(f"{i}".encode(), 0 if i < 20 else 1) for i in range(40)]
        for payload, qos in sent:
            await pub.publish(topic, payload, qos=qos)
        got = [await next_message(messages) for _ in sent]
    assert [m.payload for m in got] == [payload for payload, _ in sent]


async def test_qos0_payloads_larger_than_the_socket_takes_arrive_whole_and_in_order(
    transport: Transport, cluster_name: str,
) -> None:
    # A QoS 0 publish writes its packet at once and leaves the rest to the connection when
    # the socket is full: the small ones published right behind a large one wait for it.
    topic = f"{cluster_name}/big"
    sizes = [32 << 20, 10, 3 << 20, 0, 1, 200_000, 5] * 2
    sent = [bytes([i]) * n for i, n in enumerate(sizes)]
    async with transport.connection() as sub, transport.connection() as pub:
        messages = sub.messages()
        await sub.subscribe(topic, qos=0)
        for payload in sent:
            await pub.publish(topic, payload, qos=0)
        got = [await next_message(messages, timeout_s=30) for _ in sent]
    assert [len(m.payload) for m in got] == sizes
    assert [m.payload for m in got] == sent


async def test_unsubscribe_stops_delivery(transport: Transport, cluster_name: str) -> None:
    noisy, marker = f"{cluster_name}/noisy", f"{cluster_name}/marker"
    async with transport.connection() as sub, transport.connection() as pub:
        messages = sub.messages()
        await sub.subscribe(noisy, marker)
        await pub.publish(noisy, b"before", qos=1)
        assert (await next_message(messages)).payload == b"before"
        await sub.unsubscribe(noisy)
        await pub.publish(noisy, b"after", qos=1)
        await pub.publish(marker, b"m", qos=1)
        assert (await next_message(messages)).topic == marker


@pytest.fixture
def once_transport(request: pytest.FixtureRequest, transport: Transport) -> Transport:
    if isinstance(transport, MqttTransport):
        request.applymarker(pytest.mark.xfail(
            strict=True, reason="Mosquitto 2.0.11 sends one copy per matching subscription (MQTT 5 allows it), "
                                "even with allow_duplicate_messages false"))
    return transport


async def test_message_matched_by_two_subscriptions_arrives_once(once_transport: Transport, cluster_name: str) -> None:
    p = cluster_name
    async with once_transport.connection() as sub, once_transport.connection() as pub:
        messages = sub.messages()
        await sub.subscribe(f"{p}/o/#", f"{p}/o/+", f"{p}/o/x")
        await pub.publish(f"{p}/o/x", b"once", qos=1)
        await pub.publish(f"{p}/o/end/z", b"m", qos=1)  # matched by o/# alone
        got = [await next_message(messages), await next_message(messages)]
    assert [m.topic for m in got] == [f"{p}/o/x", f"{p}/o/end/z"]


# -- the twin alone -------------------------------------------------------------------


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), [
    ("a/b", "a/b", True),
    ("a/b", "a/c", False),
    ("a/b", "a/b/c", False),
    ("a/+", "a/b", True),
    ("a/+", "a/", True),
    ("a/+", "a", False),
    ("a/+", "a/b/c", False),
    ("+/b", "a/b", True),
    ("+/+", "/b", True),
    ("a/+/c", "a/b/c", True),
    ("a/+/c", "a/b/d", False),
    ("a/#", "a", True),
    ("a/#", "a/b", True),
    ("a/#", "a/b/c", True),
    ("a/#", "ab", False),
    ("a/#", "b/a", False),
    ("#", "a/b/c", True),
    ("#", "/", True),
    ("+/#", "a", True),
    ("#", "$SYS/broker", False),
    ("+/broker", "$SYS/broker", False),
    ("$SYS/#", "$SYS/broker", True),
    ("a/b/", "a/b", False),
])
def test_topic_matches(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


def test_memory_broker_is_a_transport() -> None:
    broker = MemoryBroker()
    assert isinstance(broker, Transport)
    assert isinstance(broker.connection("c"), Connection)


async def test_repr_shows_state() -> None:
    broker = MemoryBroker()
    async with broker.connection("a") as a, broker.connection("b", reconnect=True) as b:
        await a.publish("t/kept", b"1", retain=True)
        assert repr(broker) == "MemoryBroker(up, 2 clients, 1 retained)"
        assert repr(a) == "MemoryConnection('a', memory, connected)"
        await broker.stop()
        assert repr(broker) == "MemoryBroker(down, 0 clients, 1 retained)"
        assert repr(b) == "MemoryConnection('b', memory, reconnecting)"
        assert repr(a) == "MemoryConnection('a', memory, closed)"
        broker.start()
        await b.wait_connected(WAIT_S)
        assert repr(broker) == "MemoryBroker(up, 1 clients, 1 retained)"
    assert repr(b) == "MemoryConnection('b', memory, closed)"
    assert broker.clients == frozenset()


async def test_wildcards_in_publish_topics_and_bad_filters_are_refused() -> None:
    broker = MemoryBroker()
    async with broker.connection() as conn:
        for topic in ("a/+", "a/#", "#", ""):
            with pytest.raises(TransportError):
                await conn.publish(topic, b"x")
        for topic_filter in ("a/#/b", "a/b#", "a+/b", ""):
            with pytest.raises(TransportError):
                await conn.subscribe(topic_filter)
    with pytest.raises(TransportError):
        await broker.connection(will=LastWill("will/+", b"x")).__aenter__()


async def test_last_will_is_published_on_drop() -> None:
    broker = MemoryBroker()
    plain, kept = LastWill("w/plain", b"plain-gone", retain=False), LastWill("w/kept", b"kept-gone", retain=True)
    async with broker.connection("watcher") as watcher, \
            broker.connection("p", will=plain) as p, broker.connection("k", will=kept) as k:
        messages = watcher.messages()
        await watcher.subscribe("w/#")
        broker.drop("p")
        broker.drop("k")
        got = [await next_message(messages), await next_message(messages)]
        assert [(m.topic, m.payload, m.retain) for m in got] == [
            ("w/plain", b"plain-gone", False), ("w/kept", b"kept-gone", False)]
        assert (broker.retained("w/plain"), broker.retained("w/kept")) == (None, b"kept-gone")
        assert broker.clients == {"watcher"}
        for dropped in (p, k):
            assert not dropped.connected
            with pytest.raises(TransportError, match="lost"):
                await next_message(dropped.messages())
            with pytest.raises(TransportError):
                await dropped.publish("x", b"1")
            with pytest.raises(TransportError):
                await dropped.wait_connected(WAIT_S)  # at once: it does not reconnect
        async with broker.connection() as late:
            late_messages = late.messages()
            await late.subscribe("w/#")
            retained = await next_message(late_messages)
            assert (retained.topic, retained.retain) == ("w/kept", True)
    with pytest.raises(KeyError):
        broker.drop("p")


async def test_clean_exit_publishes_no_will() -> None:
    broker = MemoryBroker()
    async with broker.connection("watcher") as watcher:
        messages = watcher.messages()
        await watcher.subscribe("w/#")
        async with broker.connection("c", will=LastWill("w/c", b"gone", retain=True)) as c:
            await c.publish("w/hello", b"hi")
        await watcher.publish("w/marker", b"m")
        assert [m.topic for m in await until_marker(messages, "w/marker")] == ["w/hello", "w/marker"]
    assert broker.retained("w/c") is None


async def test_reconnect_after_drop_restores_subscriptions_and_calls_hook() -> None:
    broker = MemoryBroker()
    hooked = asyncio.Event()

    async def on_reconnect() -> None:
        assert conn.connected  # the hook runs on the new connection, subscriptions restored
        await conn.publish("status/c", b"back", retain=True)
        hooked.set()

    async with broker.connection("c", reconnect=True, on_reconnect=on_reconnect) as conn, \
            broker.connection("pub") as pub:
        messages = conn.messages()
        await conn.subscribe("in/#")
        broker.drop("c")
        assert not conn.connected
        async with asyncio.timeout(WAIT_S):
            await hooked.wait()
        assert conn.connected and broker.clients == {"c", "pub"}
        assert broker.retained("status/c") == b"back"
        await pub.publish("in/1", b"after", qos=1)
        assert (await next_message(messages)).payload == b"after"


async def test_a_failing_reconnect_hook_is_logged_and_reconnecting_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    broker = MemoryBroker()
    calls: list[int] = []
    called = asyncio.Event()

    async def on_reconnect() -> None:
        calls.append(1)
        called.set()
        raise RuntimeError("hook broke")

    async with broker.connection("c", reconnect=True, on_reconnect=on_reconnect) as conn:
        for _ in range(2):
            called.clear()
            broker.drop("c")
            async with asyncio.timeout(WAIT_S):
                await called.wait()
        assert conn.connected and calls == [1, 1]
    failures = [r for r in caplog.records if r.name == "lime_mqtt.transport.memory" and r.exc_info]
    assert len(failures) == 2 and "hook broke" in str(failures[0].exc_info)


async def test_session_keeps_qos1_messages_while_partitioned() -> None:
    broker = MemoryBroker()
    async with broker.connection("s", reconnect=True, session_expiry_s=60) as sess, \
            broker.connection("n", reconnect=True) as nosess, broker.connection("pub") as pub:
        sess_messages, nosess_messages = sess.messages(), nosess.messages()
        await sess.subscribe("jobs/#")
        await nosess.subscribe("jobs/#")
        broker.partition("s")
        broker.partition("n")
        await pub.publish("jobs/1", b"one", qos=1)
        await pub.publish("jobs/0", b"zero", qos=0)  # QoS 0: not kept for a client that is away
        await pub.publish("jobs/2", b"two", qos=1)
        with pytest.raises(TransportError):
            await broker.connection("s").__aenter__()  # partitioned ids are refused
        broker.heal("s")
        broker.heal("n")
        await sess.wait_connected(WAIT_S)
        await nosess.wait_connected(WAIT_S)
        await pub.publish("jobs/marker", b"m", qos=1)
        assert [m.payload for m in await until_marker(sess_messages, "jobs/marker")] == [b"one", b"two", b"m"]
        assert [m.payload for m in await until_marker(nosess_messages, "jobs/marker")] == [b"m"]


async def test_session_expires() -> None:
    now = [0.0]
    broker = MemoryBroker(clock=lambda: now[0])
    async with broker.connection("s", reconnect=True, session_expiry_s=10) as sess, broker.connection("pub") as pub:
        messages = sess.messages()
        await sess.subscribe("jobs/#")
        broker.partition("s")
        now[0] = 11.0
        await pub.publish("jobs/late", b"late", qos=1)
        broker.heal("s")
        await sess.wait_connected(WAIT_S)
        await pub.publish("jobs/marker", b"m", qos=1)  # subscriptions restored by the client
        assert [m.payload for m in await until_marker(messages, "jobs/marker")] == [b"m"]


async def test_publish_waits_while_down_then_is_sent() -> None:
    """As the MQTT connection does (checked on Mosquitto): QoS 0 and 1 both wait and go out."""
    broker = MemoryBroker()
    async with broker.connection("r", reconnect=True) as conn, broker.connection("pub", reconnect=True) as watcher:
        messages = watcher.messages()
        await watcher.subscribe("out/#")
        await broker.stop()
        pending = [asyncio.create_task(conn.publish("out/q1", b"1", qos=1)),
                   asyncio.create_task(conn.publish("out/q0", b"0", qos=0))]
        for _ in range(3):
            await asyncio.sleep(0)
        assert not any(task.done() for task in pending)
        with pytest.raises(TransportError, match="no connection"):
            await conn.wait_connected(0.001)
        broker.start()
        async with asyncio.timeout(WAIT_S):
            await asyncio.gather(*pending)
        await watcher.wait_connected(WAIT_S)
        assert sorted([(await next_message(messages)).payload for _ in pending]) == [b"0", b"1"]


async def test_broker_restart() -> None:
    broker = MemoryBroker()
    hooked = asyncio.Event()

    async def on_reconnect() -> None:
        hooked.set()

    async with broker.connection("plain", will=LastWill("will/plain", b"gone", retain=False)) as plain, \
            broker.connection("r", reconnect=True, on_reconnect=on_reconnect) as rconn, \
            broker.connection("s", reconnect=True, session_expiry_s=60) as sess, \
            broker.connection("pub", reconnect=True) as pub:
        plain_messages, r_messages, s_messages = plain.messages(), rconn.messages(), sess.messages()
        await rconn.subscribe("live/#", "will/#")
        await sess.subscribe("live/#")
        await pub.publish("live/kept", b"k", qos=1, retain=True)
        assert (await next_message(r_messages)).payload == b"k"
        broker.partition("s")
        await pub.publish("live/queued", b"q", qos=1)  # queued for s: the restart loses it
        assert (await next_message(r_messages)).payload == b"q"

        await broker.restart()
        # Wills go out while every client is still connected, as Mosquitto stops.
        assert (await next_message(r_messages)).topic == "will/plain"
        with pytest.raises(TransportError, match="stopped"):
            await next_message(plain_messages)
        with pytest.raises(TransportError):
            await plain.publish("live/x", b"x")

        async with asyncio.timeout(WAIT_S):
            await hooked.wait()
        await pub.wait_connected(WAIT_S)
        retained_again = await next_message(r_messages)  # re-subscribing sends retained messages again
        assert (retained_again.topic, retained_again.retain) == ("live/kept", True)
        await pub.publish("live/new", b"new", qos=1)
        assert (await next_message(r_messages)).payload == b"new"

        broker.heal("s")
        await sess.wait_connected(WAIT_S)
        await pub.publish("live/marker", b"m", qos=1)
        got = await until_marker(s_messages, "live/marker")
        # live before the partition, retained again on re-subscribing; b"q" went with the session
        assert [(m.payload, m.retain) for m in got] == [(b"k", False), (b"k", True), (b"m", False)]
        assert broker.retained("live/kept") == b"k"
        assert broker.clients == {"r", "s", "pub"}


async def test_connecting_while_stopped_fails() -> None:
    broker = MemoryBroker()
    await broker.stop()
    with pytest.raises(TransportError, match="stopped"):
        async with broker.connection("c"):
            pass
    broker.start()
    async with broker.connection("c") as conn:
        assert conn.connected


async def test_exit_ends_the_reconnect_task() -> None:
    broker = MemoryBroker()
    async with broker.connection("r", reconnect=True) as conn:
        await broker.stop()
        assert any(t.get_name() == "r-reconnect" for t in asyncio.all_tasks())
    assert not conn.connected
    assert not any(t.get_name() == "r-reconnect" for t in asyncio.all_tasks())
    broker.start()
    assert broker.clients == frozenset()


async def test_duplicate_client_id_takes_over(caplog: pytest.LogCaptureFixture) -> None:
    broker = MemoryBroker()
    async with broker.connection("watcher") as watcher, \
            broker.connection("dup", will=LastWill("w/dup", b"old-gone", retain=False)) as old:
        messages = watcher.messages()
        await watcher.subscribe("w/#")
        with caplog.at_level(logging.WARNING, "lime_mqtt.transport.memory"):
            async with broker.connection("dup", will=LastWill("w/dup", b"new-gone", retain=False)) as new:
                assert (await next_message(messages)).payload == b"old-gone"
                assert "taken over" in caplog.text
                with pytest.raises(TransportError, match="taken over"):
                    await next_message(old.messages())
                assert new.connected and not old.connected and broker.clients == {"watcher", "dup"}
                new_messages = new.messages()
                await new.subscribe("w/#")
                await watcher.publish("w/marker", b"m")
                assert (await next_message(new_messages)).topic == "w/marker"
        await watcher.publish("w/end", b"e")  # the new one left cleanly: no will
        assert [m.topic for m in await until_marker(messages, "w/end")] == ["w/marker", "w/end"]


async def test_copy_per_subscription_as_mosquitto() -> None:
    broker = MemoryBroker(copy_per_subscription=True)
    async with broker.connection() as conn:
        messages = conn.messages()
        await conn.subscribe("o/#", "o/+")
        await conn.publish("o/x", b"x")
        await conn.publish("o/end/z", b"m")
        assert [m.topic for m in await until_marker(messages, "o/end/z")] == ["o/x", "o/x", "o/end/z"]


async def test_a_connection_is_a_memory_connection() -> None:
    async with MemoryBroker().connection("c") as conn:
        assert isinstance(conn, MemoryConnection) and conn.client_id == "c"


# -- the MQTT connection's own reading of plain QoS 0 messages ------------------------


def test_plain_qos0_publish_packets_are_read_without_paho() -> None:
    """_plain_publish reads a QoS 0 PUBLISH without properties (topic, payload, retain) and
    leaves every other packet to paho: QoS 1 and 2, properties, a short or bad packet."""
    topic = b"lime/v2/c/device/a/to/device/b/stage/1"

    def packet(properties: bytes = b"\x00", payload: bytes = b"\x01\x02", name: bytes = topic) -> bytearray:
        return bytearray(len(name).to_bytes(2, "big") + name + properties + payload)

    assert _plain_publish(0x30, packet()) == Message(topic.decode(), b"\x01\x02", retain=False)
    assert _plain_publish(0x31, packet(payload=b"")) == Message(topic.decode(), b"", retain=True)
    assert _plain_publish(0x32, packet()) is None  # QoS 1 (two more bytes: its id)
    assert _plain_publish(0x34, packet()) is None  # QoS 2
    assert _plain_publish(0x30, packet(properties=b"\x05\x08\x00\x02r/")) is None  # a response topic
    assert _plain_publish(0x30, bytearray(b"\x00\x10abc")) is None  # shorter than its topic
    assert _plain_publish(0x30, bytearray(b"\x00")) is None
    assert _plain_publish(0x30, packet(name=b"\xff\xfe")) is None  # not UTF-8: paho says what it is


@pytest.mark.integration
async def test_plain_qos0_messages_skip_paho_and_arrive_as_the_others(
    broker: LocalBroker, cluster_name: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Through Mosquitto: plain QoS 0 messages (live and retained) take _plain_publish,
    messages with properties or QoS 1 take paho's way, and all arrive alike, in order."""
    import lime_mqtt.transport.mqtt as mqtt_module

    plain: list[Message] = []

    def spy(command: int, packet: bytearray) -> Message | None:
        message = _plain_publish(command, packet)
        if message is not None:
            plain.append(message)
        return message

    monkeypatch.setattr(mqtt_module, "_plain_publish", spy)
    transport = MqttTransport(broker.url)
    p = cluster_name
    async with transport.connection() as pub:
        await pub.publish(f"{p}/kept", b"kept", qos=1, retain=True)
        async with transport.connection() as sub:
            messages = sub.messages()
            await sub.subscribe(f"{p}/#", qos=0)
            await pub.publish(f"{p}/a", b"plain", qos=0)
            await pub.publish(f"{p}/b", b"asking", qos=0, response_topic=f"{p}/r", correlation_data=b"7")
            await pub.publish(f"{p}/c", b"", qos=0)
            got = [await next_message(messages) for _ in range(4)]
        await pub.publish(f"{p}/kept", b"", qos=1, retain=True)  # leave no retained message behind
    assert [(m.topic.removeprefix(f"{p}/"), m.payload, m.retain, m.response_topic, m.correlation_data)
            for m in got] == [("kept", b"kept", True, None, None), ("a", b"plain", False, None, None),
                              ("b", b"asking", False, f"{p}/r", b"7"), ("c", b"", False, None, None)]
    assert [m.payload for m in plain] == [b"kept", b"plain", b""]  # the one with properties went through paho
