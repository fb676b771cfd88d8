"""Faults: devices killed mid-answer (SIGKILL, separate processes, a real Mosquitto).

An accepted request is answered in full, token-identical to a fault-free run, or gets a
clear error; never silence, never a half answer passed off as whole.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import pytest

from lime_mqtt.cli.cluster import DeviceSpec, ProcessCluster, wait_for_ready_plan
from lime_mqtt.client import ask, ask_final
from lime_mqtt.core.topics import Topics
from lime_mqtt.planning.plan import Plan
from lime_mqtt.transport import connect
from lime_mqtt.transport.mosquitto import LocalBroker
from tests.helpers import prompt_ids, reference_greedy, wait_until

pytestmark = pytest.mark.e2e  # every test here runs device agents as separate processes


async def retained_plan(broker: str, cluster: str) -> Plan:
    async with connect(broker) as conn:
        await conn.subscribe(Topics(cluster).plan())
        async with asyncio.timeout(10):
            async for message in conn.messages():
                return Plan.from_json(message.payload)
    raise AssertionError("no plan")


async def watch(broker: str, cluster: str, request: dict[str, Any], log: list[tuple[float, dict]]) -> dict:
    """Ask with streaming; every message with its arrival time goes to ``log``; the final one is returned."""
    async for message in ask(broker, cluster, request, timeout_s=180):
        log.append((time.perf_counter(), message))
        if message["type"] in ("final", "error"):
            return message
    raise AssertionError("the answer stream ended without a final message")


def assert_stream_is_the_answer(log: list[tuple[float, dict]], final: dict) -> None:
    """No gap, no repeat: the streamed chunks, in order, are exactly the final answer."""
    chunks = [m for _, m in log if m["type"] == "chunk"]
    assert [c["index"] for c in chunks] == list(range(len(chunks)))
    assert [t for c in chunks for t in c["token_ids"]] == final["token_ids"]
    assert "".join(c["text"] for c in chunks) == final["text"]


def tokens_so_far(log: list[tuple[float, dict]]) -> int:
    return sum(len(m["token_ids"]) for _, m in log if m["type"] == "chunk")


QUESTION = [{"role": "user", "content": "What does a pressure relief valve do? Answer in two sentences."}]


@pytest.mark.slow
def test_sigkill_of_one_of_four_devices_mid_answer_loses_nothing(
    broker: LocalBroker, cluster_name: str, smollm2_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    devices = [DeviceSpec(f"k{i}", 300, 1) for i in range(4)]
    with ProcessCluster(broker.url, cluster_name, str(smollm2_model), devices, tmp_path,
                        planner_args=("--strategy", "equal")) as procs:
        plan = procs.wait_ready(timeout_s=300)
        assert len(plan.stages) == 4
        request = {"messages": QUESTION, "max_tokens": 40, "stream": True}

        async def run() -> tuple[dict, dict, list, float]:
            fault_free = await ask_final(broker.url, cluster_name, {**request, "stream": False}, timeout_s=180)
            log: list[tuple[float, dict]] = []
            answer = asyncio.create_task(watch(broker.url, cluster_name, request, log))
            await wait_until(lambda: tokens_so_far(log) >= 12 or answer.done(), timeout_s=120)
            victim = plan.stages[2].device_id  # a middle stage
            killed_at = time.perf_counter()
            procs.kill(victim)
            final = await answer
            return fault_free, final, log, killed_at

        fault_free, final, log, killed_at = asyncio.run(run())
        after = asyncio.run(retained_plan(broker.url, cluster_name))
        coordinator_log = (tmp_path / "coordinator.log").read_text()
    assert final["type"] == "final", f"{final}\n{procs.log_tail()}"
    assert final["token_ids"] == fault_free["token_ids"]
    assert final["token_ids"] == reference_greedy(smollm2_model, prompt_ids(smollm2_model, messages=QUESTION), 40)
    assert_stream_is_the_answer(log, final)
    assert after.epoch > plan.epoch and len(after.stages) == 3
    assert plan.stages[2].device_id not in {s.device_id for s in after.stages}
    assert "replaying" in coordinator_log
    next_token = min(t for t, m in log if t > killed_at and m["type"] == "chunk")
    with capsys.disabled():  # in the test run's output, not only on failure
        print(f"\nfrom the SIGKILL to the next token: {(next_token - killed_at) * 1000:.0f} ms; "
              f"plan {plan.epoch} -> {after.epoch}; {len(final['token_ids'])} tokens")


CHAOS_REQUESTS = [
    {"prompt": "Valve V-17 is", "max_tokens": 40},
    {"prompt": "The compressor on line 2", "max_tokens": 32},
    {"prompt": "Shift report:", "max_tokens": 36, "temperature": 0.8, "seed": 11},
    {"prompt": "Pump P-3 pressure reading", "max_tokens": 28, "temperature": 1.1, "top_k": 20, "seed": 5},
]


def test_chaos_ten_runs_each_killing_a_random_device_with_four_requests_in_flight(
    broker: LocalBroker, cluster_name: str, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each run: 4 requests in flight, a random device SIGKILLed at a random step of the
    first; all answers complete and equal the fault-free ones; then the device comes back
    and the planner takes it in again, for the next run."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    print(f"chaos seed {seed}")
    # 4 ms per layer: a token takes long enough that a kill lands mid-answer.
    devices = {f"c{i}": DeviceSpec(f"c{i}", 10, 1, ("--emulate-layer-delay-ms", "4")) for i in range(4)}
    with ProcessCluster(broker.url, cluster_name, str(tiny_model), list(devices.values()), tmp_path,
                        planner_args=("--strategy", "equal", "--reserve-mb", "0"),
                        coordinator_args=("--step-retry", "2")) as procs:
        procs.wait_ready(timeout_s=180)

        async def ask_all() -> list[dict]:
            return list(await asyncio.gather(*[
                ask_final(broker.url, cluster_name, {**r, "stream": False}, timeout_s=120) for r in CHAOS_REQUESTS
            ]))

        expected = asyncio.run(ask_all())
        for request, answer in zip(CHAOS_REQUESTS, expected, strict=True):
            assert answer["type"] == "final", answer
            if "temperature" not in request:
                assert answer["token_ids"] == reference_greedy(tiny_model, prompt_ids(tiny_model, request["prompt"]),
                                                               request["max_tokens"])
        kills: list[tuple[str, int]] = []
        for run in range(10):
            victim, at_token = rng.choice(sorted(devices)), rng.randrange(1, 25)

            async def chaos(victim: str = victim, at_token: int = at_token) -> list[dict]:
                logs: list[list[tuple[float, dict]]] = [[] for _ in CHAOS_REQUESTS]
                answers = [asyncio.create_task(watch(broker.url, cluster_name, {**r, "stream": True}, log))
                           for r, log in zip(CHAOS_REQUESTS, logs, strict=True)]
                await wait_until(lambda: tokens_so_far(logs[0]) >= at_token or answers[0].done(), timeout_s=60)
                procs.kill(victim)
                finals = list(await asyncio.gather(*answers))
                for log, final in zip(logs, finals, strict=True):
                    if final["type"] == "final":
                        assert_stream_is_the_answer(log, final)
                return finals

            finals = asyncio.run(chaos())
            kills.append((victim, at_token))
            print(f"run {run}: killed {victim} at token {at_token} of the first request")
            for request, want, got in zip(CHAOS_REQUESTS, expected, finals, strict=True):
                assert got["type"] == "final", f"run {run} (seed {seed}, kills {kills}): {got}\n{procs.log_tail()}"
                assert got["token_ids"] == want["token_ids"], (run, seed, kills, request)
            procs.start_device(devices[victim])  # it comes back; the planner adopts it
            back = asyncio.run(wait_for_ready_plan(broker.url, cluster_name, timeout_s=120, quorum=4))
            assert victim in {s.device_id for s in back.stages}
    with capsys.disabled():  # in the test run's output, not only on failure
        print(f"\nchaos seed {seed}: {len(kills)} kills (device, at token) {kills}, "
              f"{4 * len(kills)} answers all correct")


def test_when_the_rest_cannot_hold_the_model_the_client_gets_a_clear_error(
    broker: LocalBroker, cluster_name: str, tiny_model: Path, tmp_path: Path
) -> None:
    # Two devices that each hold only part of the model (embedding and head do not fit in one).
    devices = [DeviceSpec(f"h{i}", 1, 1, ("--emulate-layer-delay-ms", "4")) for i in range(2)]
    with ProcessCluster(broker.url, cluster_name, str(tiny_model), devices, tmp_path,
                        planner_args=("--reserve-mb", "0"),
                        coordinator_args=("--replan-timeout", "30")) as procs:
        plan = procs.wait_ready(timeout_s=180)
        assert len(plan.stages) == 2

        async def run() -> tuple[dict, float, dict, float]:
            log: list[tuple[float, dict]] = []
            answer = asyncio.create_task(watch(broker.url, cluster_name, {"prompt": "Valve", "max_tokens": 200,
                                                                          "stream": True}, log))
            await wait_until(lambda: tokens_so_far(log) >= 5 or answer.done(), timeout_s=60)
            killed_at = time.perf_counter()
            procs.kill(plan.stages[1].device_id)
            final = await answer
            waited = time.perf_counter() - killed_at
            asked = time.perf_counter()
            refused = await ask_final(broker.url, cluster_name, {"prompt": "Valve", "max_tokens": 4}, timeout_s=60)
            return final, waited, refused, time.perf_counter() - asked

        final, waited, refused, refused_in = asyncio.run(run())
    assert final["type"] == "error", final
    assert final["error"]["code"] == "capacity_lost"
    assert plan.stages[1].device_id in final["error"]["message"] and "cannot hold" in final["error"]["message"]
    assert waited < 20, waited  # the planner's word, not the 30 s replan timeout
    assert refused["type"] == "error" and refused["error"]["code"] == "no_capacity", refused
    assert refused_in < 5, refused_in
    print(f"error {waited:.1f} s after the kill: {final['error']['message']}; a new request refused in "
          f"{refused_in:.2f} s")
    assert json.dumps(final)  # a plain JSON message a factory system can parse


def test_a_broker_restart_mid_answer_loses_nothing(tiny_model: Path, tmp_path: Path) -> None:
    """Mosquitto stops (SIGTERM) mid-answer and comes back 1 s later on the same port:
    every component reconnects, the retained plan is still there, a request the broker
    accepted just before it stopped is answered, and the answer in flight completes,
    token-identical, with nothing missing or repeated in its stream."""
    devices = [DeviceSpec(f"r{i}", 10, 1, ("--emulate-layer-delay-ms", "4")) for i in range(3)]
    prompt, max_tokens = "Valve V-17 is", 120
    with LocalBroker() as own_broker:  # its own folder: Mosquitto (user mosquitto) can write there
        cluster = "restart"
        with ProcessCluster(own_broker.url, cluster, str(tiny_model), devices, tmp_path / "logs",
                            planner_args=("--strategy", "equal", "--reserve-mb", "0"),
                            coordinator_args=("--step-retry", "2")) as procs:
            plan = procs.wait_ready(timeout_s=180)

            async def run() -> tuple[dict, list, float, dict]:
                log: list[tuple[float, dict]] = []
                request = {"prompt": prompt, "max_tokens": max_tokens, "stream": True}
                answer = asyncio.create_task(watch(own_broker.url, cluster, request, log))
                await wait_until(lambda: tokens_so_far(log) >= 10 or answer.done(), timeout_s=60)
                topics = Topics(cluster)
                async with connect(own_broker.url) as observer:  # sees what the broker accepted
                    await observer.subscribe(topics.requests("default"), qos=1)
                    other = asyncio.create_task(ask_final(own_broker.url, cluster, {"prompt": "Pump", "max_tokens": 8},
                                                          timeout_s=120))
                    async with asyncio.timeout(30):
                        async for message in observer.messages():
                            if json.loads(message.payload).get("prompt") == "Pump":
                                break
                stopped = time.perf_counter()
                await asyncio.get_running_loop().run_in_executor(None, own_broker.restart, 1.0)
                return await answer, log, stopped, await other

            final, log, stopped, other = asyncio.run(run())
            after = asyncio.run(retained_plan(own_broker.url, cluster))
    assert final["type"] == "final", f"{final}\n{procs.log_tail()}"
    assert final["token_ids"] == reference_greedy(tiny_model, prompt_ids(tiny_model, prompt), max_tokens)
    assert_stream_is_the_answer(log, final)
    assert tokens_so_far([e for e in log if e[0] < stopped]) < len(final["token_ids"])  # it was mid-answer
    assert other["type"] == "final" and other["token_ids"] == reference_greedy(
        tiny_model, prompt_ids(tiny_model, "Pump"), 8)
    assert after.epoch == plan.epoch  # the retained plan survived
    resumed = min(t for t, m in log if t > stopped and m["type"] == "chunk")
    print(f"broker down about 1 s; the next token came {(resumed - stopped):.2f} s after it stopped")


def test_sigterm_on_a_device_hands_its_work_over_and_it_leaves(
    broker: LocalBroker, cluster_name: str, tiny_model: Path, tmp_path: Path
) -> None:
    """SIGTERM mid-answer: the device says "leaving", serves on until the planner has a plan
    without it, then says "offline" and exits 0; the answer completes, token-identical."""
    import signal

    devices = [DeviceSpec(f"t{i}", 10, 1, ("--emulate-layer-delay-ms", "4")) for i in range(3)]
    prompt, max_tokens = "Valve V-17 is", 80
    states: list[str] = []
    with ProcessCluster(broker.url, cluster_name, str(tiny_model), devices, tmp_path,
                        planner_args=("--strategy", "equal", "--reserve-mb", "0")) as procs:
        plan = procs.wait_ready(timeout_s=180)
        leaver = plan.stages[1].device_id
        process = procs.processes[leaver]

        async def run() -> tuple[dict, list]:
            async def follow_status() -> None:
                async with connect(broker.url) as conn:
                    await conn.subscribe(Topics(cluster_name).device_status(leaver))
                    async for message in conn.messages():
                        states.append(json.loads(message.payload)["state"] if message.payload else "gone")

            follower = asyncio.create_task(follow_status())
            log: list[tuple[float, dict]] = []
            answer = asyncio.create_task(watch(broker.url, cluster_name, {"prompt": prompt, "max_tokens": max_tokens,
                                                                          "stream": True}, log))
            await wait_until(lambda: tokens_so_far(log) >= 10 or answer.done(), timeout_s=60)
            process.send_signal(signal.SIGTERM)
            final = await answer
            await wait_until(lambda: process.poll() is not None, timeout_s=60)
            await wait_until(lambda: states[-1:] == ["offline"], timeout_s=10)
            follower.cancel()
            return final, log

        final, log = asyncio.run(run())
        after = asyncio.run(retained_plan(broker.url, cluster_name))
    assert final["type"] == "final", final
    assert final["token_ids"] == reference_greedy(tiny_model, prompt_ids(tiny_model, prompt), max_tokens)
    assert_stream_is_the_answer(log, final)
    assert process.returncode == 0
    assert "leaving" in states and states[-1] == "offline", states
    assert leaver not in {s.device_id for s in after.stages} and after.epoch > plan.epoch


def test_a_device_that_hangs_is_taken_for_lost_by_its_missed_heartbeats(
    broker: LocalBroker, cluster_name: str, tiny_model: Path, tmp_path: Path
) -> None:
    """SIGSTOP: the process hangs with its connection open, so no last will comes. Its
    telemetry (every 0.5 s here) stops; after 2 s the planner takes it for lost and plans
    without it, and the answer completes, token-identical. After SIGCONT it is heard from
    again and planned back in."""
    import signal

    devices = [DeviceSpec(f"s{i}", 10, 1, ("--emulate-layer-delay-ms", "4", "--telemetry-interval", "0.5"))
               for i in range(3)]
    prompt, max_tokens = "Valve V-17 is", 120
    with ProcessCluster(broker.url, cluster_name, str(tiny_model), devices, tmp_path,
                        planner_args=("--strategy", "equal", "--reserve-mb", "0", "--heartbeat-timeout", "2")) as procs:
        plan = procs.wait_ready(timeout_s=180)
        hung = plan.stages[1].device_id

        plans: list[Plan] = []

        async def follow_plans() -> None:
            async with connect(broker.url) as conn:
                await conn.subscribe(Topics(cluster_name).plan())
                async for message in conn.messages():
                    plans.append(Plan.from_json(message.payload))

        async def run() -> tuple[dict, list, float]:
            follower = asyncio.create_task(follow_plans())
            log: list[tuple[float, dict]] = []
            answer = asyncio.create_task(watch(broker.url, cluster_name, {"prompt": prompt, "max_tokens": max_tokens,
                                                                          "stream": True}, log))
            await wait_until(lambda: tokens_so_far(log) >= 10 or answer.done(), timeout_s=60)
            stopped = time.perf_counter()
            procs.processes[hung].send_signal(signal.SIGSTOP)
            try:
                final = await answer
            finally:
                procs.processes[hung].send_signal(signal.SIGCONT)
                follower.cancel()
            return final, log, stopped

        final, log, stopped = asyncio.run(run())
        back = asyncio.run(wait_for_ready_plan(broker.url, cluster_name, timeout_s=60, quorum=3))
    assert final["type"] == "final", final
    assert final["token_ids"] == reference_greedy(tiny_model, prompt_ids(tiny_model, prompt), max_tokens)
    assert_stream_is_the_answer(log, final)
    assert any(p.epoch > plan.epoch and hung not in {s.device_id for s in p.stages} for p in plans), plans
    assert hung in {s.device_id for s in back.stages}
    resumed = min(t for t, m in log if t > stopped and m["type"] == "chunk")
    print(f"hung device: the next token came {resumed - stopped:.2f} s after SIGSTOP")


async def test_closing_a_connection_to_a_frozen_broker_ends(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A broker that stops reading (SIGSTOP: hung, swapped out) while data waits to be sent:
    closing the connection ends CLOSE_TIMEOUT_S later, with a warning, and its socket is
    closed (aiomqtt alone gives up after 10 s and leaves the socket open)."""
    import signal

    from lime_mqtt.transport.mqtt import CLOSE_TIMEOUT_S

    with LocalBroker(folder=tmp_path / "broker") as broker:
        conn = broker.transport().connection()
        await conn.__aenter__()
        broker.process.send_signal(signal.SIGSTOP)
        try:
            paho = conn._client._client
            chunk = bytes(1 << 20)
            for _ in range(64):  # far more than the loopback socket buffers hold
                await conn.publish("frozen/load", chunk)
            assert paho.want_write()  # unsent data is queued: the DISCONNECT goes behind it
            started = time.perf_counter()
            await asyncio.wait_for(conn.__aexit__(None, None, None), CLOSE_TIMEOUT_S + 10)
            took = time.perf_counter() - started
        finally:
            broker.process.send_signal(signal.SIGCONT)
    assert CLOSE_TIMEOUT_S - 0.5 < took < CLOSE_TIMEOUT_S + 5, took
    assert any("DISCONNECT" in r.getMessage() and "closing the socket" in r.getMessage() for r in caplog.records)
    assert paho.socket() is None
