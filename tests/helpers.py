"""Helpers for tests: an in-process cluster and the plain-transformers reference."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol

from lime_mqtt.cli.cluster import wait_for_ready_plan
from lime_mqtt.client import ask
from lime_mqtt.coordinator.service import Coordinator
from lime_mqtt.core.topics import Identity, Topics
from lime_mqtt.device.agent import DeviceAgent
from lime_mqtt.device.memory import AnonPeakSampler  # noqa: F401  (tests import it from here)
from lime_mqtt.planner.service import PlannerService
from lime_mqtt.planning.plan import Plan, StagePlan
from lime_mqtt.transport import Transport, connect, transport_for


@dataclass
class RunningCluster:
    broker: str | Transport
    name: str
    plan: Plan
    coordinator: Coordinator
    devices: list[DeviceAgent]

    async def ask(self, request: dict[str, Any], timeout_s: float = 120.0) -> list[dict[str, Any]]:
        return [m async for m in ask(self.broker, self.name, request, timeout_s=timeout_s)]

    async def final(self, request: dict[str, Any], timeout_s: float = 120.0) -> dict[str, Any]:
        return (await self.ask(request, timeout_s))[-1]


class Service(Protocol):
    async def run(self) -> None: ...


@contextlib.asynccontextmanager
async def running(services: dict[str, Service], stop_s: float = 60.0) -> AsyncIterator[None]:
    """Run each service as a named task of one task group for the body of the ``with``.

    A service that crashes cancels the body, and its exception (in an ExceptionGroup) is
    the test's failure, not a timeout of whatever the test was waiting for. On the way
    out every service is cancelled and awaited; one that has not stopped ``stop_s`` later
    fails the test with where each task waits."""
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(_stops_when_told(name, service, stop_s), name=name)
                 for name, service in services.items()]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()


async def _stops_when_told(name: str, service: Service, stop_s: float) -> None:
    """``service.run()``; once cancelled, it has ``stop_s`` to finish, or the test fails
    with where every task of the loop waits (not a silent hang until pytest's timeout)."""
    inner = asyncio.create_task(service.run(), name=f"{name}-run")
    try:
        await asyncio.shield(inner)
    except asyncio.CancelledError:
        inner.cancel()
        done, _ = await asyncio.wait({inner}, timeout=stop_s)
        if not done:
            waits = "\n".join(f"{task.get_name()}: {' -> '.join(await_chain(task))}"
                              for task in asyncio.all_tasks() if not task.done())
            raise RuntimeError(f"{name} did not stop within {stop_s:.0f} s of being cancelled; "
                               f"where each task waits:\n{waits}") from None
        raise


def await_chain(task: asyncio.Task[Any]) -> list[str]:
    """file:line of each coroutine that ``task`` is suspended in, outermost first, and
    the object awaited at the bottom."""
    chain: list[str] = []
    awaited: Any = task.get_coro()
    while awaited is not None:
        frame = next((getattr(awaited, a) for a in ("cr_frame", "gi_frame", "ag_frame") if hasattr(awaited, a)), None)
        if frame is None:  # a future (asyncio's C iterator over one hides which)
            chain.append("a future" if type(awaited).__name__ == "FutureIter" else repr(awaited)[:200])
            break
        chain.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {frame.f_code.co_qualname}")
        awaited = next((getattr(awaited, a) for a in ("cr_await", "gi_yieldfrom", "ag_await") if hasattr(awaited, a)),
                       None)
    return chain


@contextlib.asynccontextmanager
async def in_process_cluster(
    broker: str | Transport, name: str, model: Path, memory_mb: list[int],
    device_options: dict[str, Any] | None = None, planner_options: dict[str, Any] | None = None,
    plan: Plan | None = None, **coordinator_options: Any,
) -> AsyncIterator[RunningCluster]:
    """Planner, coordinator and devices as tasks of this event loop, on a broker: a real
    one (a URL) or the in-memory twin (a ``MemoryBroker``).

    The planner splits by memory unless ``planner_options`` say otherwise; with ``plan``
    there is no planner and that plan is published as the retained plan instead. A
    service that crashes fails the test with its own exception (see :func:`running`).
    """
    transport = transport_for(broker)
    coordinator = Coordinator(transport, name, model, **coordinator_options)
    devices = [DeviceAgent(transport, name, f"dev{i}", mb, model, **(device_options or {}))
               for i, mb in enumerate(memory_mb)]
    services: dict[str, Service] = {"coordinator": coordinator}
    if plan is None:
        options = {"strategy": "memory", "reserve_mb": 0, "context_tokens": 64, **(planner_options or {})}
        services["planner"] = PlannerService(transport, name, model, quorum=len(memory_mb), settle_s=0.2, **options)
    else:
        async with connect(transport) as conn:
            await conn.publish(Topics(name).plan(), plan.to_json(), qos=1, retain=True)
    services.update({d.device_id: d for d in devices})
    async with running(services):
        plan = await wait_for_ready_plan(transport, name, timeout_s=60)
        yield RunningCluster(transport, name, plan, coordinator, devices)


async def wait_until(condition: Any, timeout_s: float = 10.0) -> None:
    """Poll a cheap condition on the event loop until it holds (a condition, not a fixed sleep)."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110  (in-process agents' state has no event to wait on)
            await asyncio.sleep(0.02)


@cache
def _reference_model(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


@cache
def tokenizer_of(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def prompt_ids(folder: Path, prompt: str | None = None, messages: list[dict[str, str]] | None = None) -> list[int]:
    tokenizer = tokenizer_of(folder)
    if messages is not None:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def reference_greedy(folder: Path, ids: list[int], max_new_tokens: int) -> list[int]:
    """Plain transformers greedy generation; the ids after the prompt, EOS not included."""
    import torch

    model = _reference_model(folder)
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, len(ids):].tolist()
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    for i, token in enumerate(new):
        if token in eos_ids:
            return new[:i]
    return new


def reference_logits(folder: Path, ids: list[int], steps: int) -> list[Any]:
    """Logits of the last position at each greedy step, from one full forward per step."""
    import torch

    model = _reference_model(folder)
    out = []
    with torch.inference_mode():
        result = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        cache_ = result.cache if hasattr(result, "cache") else result.past_key_values
        logits = result.logits[0, -1]
        for _ in range(steps):
            out.append(logits)
            token = int(torch.argmax(logits))
            result = model(torch.tensor([[token]]), cache=cache_, use_cache=True)
            logits = result.logits[0, -1]
    return out


TEST_COORDINATOR = "test"  # the coordinator a test plays when it sends steps itself


def fixed_plan(model: Path, spans: list[tuple[int, int]], epoch: int = 1) -> Plan:
    """A plan of one stage per device (dev0, dev1, ...) with room for plenty of KV cache."""
    stages = [StagePlan(stage=i, device_id=f"dev{i}", start=start, stop=stop, embed=i == 0, head=i == len(spans) - 1,
                        weight_bytes=0, kv_tokens=4096) for i, (start, stop) in enumerate(spans)]
    return Plan(epoch=epoch, model=model.name, num_layers=6, stages=stages, strategy="test")


def stage_topic(topics: Topics, plan: Plan, stage: int, sender: Identity | None = None) -> str:
    """Where the sender the plan puts before ``stage`` sends it a step: the coordinator
    ``test`` for stage 0, else the device of the stage before (or ``sender``, to play an
    impostor)."""
    if sender is None:
        sender = (Identity("coordinator", TEST_COORDINATOR) if stage == 0
                  else Identity("device", plan.stages[stage - 1].device_id))
    return topics.stage_in(sender, plan.stages[stage].device_id, stage)
