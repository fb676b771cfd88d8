"""End to end on the generated configuration: a broker folder from ``BrokerFolder.init``
(the code behind ``lime-mqtt broker init``), Mosquitto with its TLS listener, passwords and
ACL, and planner, coordinator and devices as processes, each with its own identity file.

What the ACL and the receivers do together: two clients of one cluster cannot read or
cancel each other's requests; a device cannot publish a plan or an activation under
another device's name; a stage ignores an activation from a device the plan does not put
before it; and a component whose publish the broker refuses says so and stops.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from lime_mqtt.broker import BrokerFolder
from lime_mqtt.cli.cluster import DeviceSpec, ProcessCluster
from lime_mqtt.client import ask, cancel
from lime_mqtt.core.errors import PublishRefused
from lime_mqtt.core.messages import decode_device_telemetry
from lime_mqtt.core.plan import Plan
from lime_mqtt.core.topics import Identity, Topics
from lime_mqtt.core.wire import Sampling, Step
from lime_mqtt.transport import connect
from lime_mqtt.transport.mosquitto import SecureBroker, free_port
from tests.helpers import prompt_ids, reference_greedy

pytestmark = pytest.mark.e2e

CLUSTER = "plant"
REQUEST = {"id": "shared-id", "prompt": "Close valve V-17 before starting the maintenance", "max_tokens": 24}


@pytest.fixture
def folder() -> BrokerFolder:
    base = Path(tempfile.mkdtemp(prefix="lime-secure-"))
    base.chmod(0o755)  # Mosquitto runs as its own user
    folder = BrokerFolder(base / "broker")
    folder.init(CLUSTER, ["broker.test"], port=free_port(), bind="127.0.0.1", devices=["dev0", "dev1", "spare"],
                clients=["a", "b"])
    return folder


def test_a_cluster_on_the_generated_configuration_keeps_every_sender_in_its_place(
    folder: BrokerFolder, tiny_model: Path, tmp_path: Path
) -> None:
    # Each layer 2 ms slower: b's 400-token answer takes seconds, so that its cancel (sent
    # after its first message) surely comes before the end (at full speed it did not, once).
    devices = [DeviceSpec(d, 10, 1, ("--no-measure", "--telemetry-interval", "1", "--emulate-layer-delay-ms", "2"))
               for d in ("dev0", "dev1")]
    with SecureBroker(folder) as broker, ProcessCluster(
        broker.url, CLUSTER, str(tiny_model), devices, tmp_path / "logs", identities=folder,
        planner_args=("--strategy", "equal", "--reserve-mb", "0"),
    ) as procs:
        plan = procs.wait_ready(timeout_s=90)
        outcome = asyncio.run(_scenario(broker, plan, str(tiny_model)))
        codes = procs.stop()
    expected = reference_greedy(tiny_model, prompt_ids(tiny_model, REQUEST["prompt"]), REQUEST["max_tokens"])
    a_final, a_stream, b_saw, b_own, b_refused, spare_refused, impostors = outcome
    assert a_final["type"] == "final" and a_final["token_ids"] == expected, a_final  # b's cancel changed nothing
    assert "".join(m["text"] for m in a_stream if m["type"] == "chunk") == a_final["text"]
    assert b_saw == []  # subscribed to a's answers and its own, it received only its own
    assert b_own["type"] == "error" and b_own["error"]["code"] == "cancelled"  # its own cancel works
    assert "Not authorized" in b_refused
    assert all("Not authorized" in reason for reason in spare_refused), spare_refused
    assert len(spare_refused) == 3
    assert impostors >= 1  # dev1 dropped the activation that spare sent it
    assert all(code == 0 for code in codes.values()), codes


async def _scenario(broker: SecureBroker, plan: Plan, model: str) -> tuple:  # type: ignore[type-arg]
    topics = Topics(CLUSTER)
    a, b = broker.transport("client", "a"), broker.transport("client", "b")
    async with connect(b) as spy:
        # a's answers (the ACL lets b subscribe, then delivers nothing) and b's own (the control)
        await spy.subscribe(topics.answers_inbox("a"), topics.answers_inbox("b"), qos=1)
        saw = []
        stream = ask(a, CLUSTER, REQUEST, timeout_s=60)
        a_stream = [await anext(stream)]
        await cancel(b, CLUSTER, REQUEST["id"])  # b's cancel of the same id, on b's own topic
        try:  # and on a's topic, which the ACL does not let b write
            await spy.publish(topics.requests("a"), json.dumps({"cancel": REQUEST["id"]}).encode(), qos=1)
            b_refused = ""
        except PublishRefused as exc:
            b_refused = exc.reason
        a_stream += [m async for m in stream]
        # b's own long request, which b cancels: it gets its own answer on its own topics ...
        # (Its cancel goes on b's connection already open: a new one costs a TLS handshake and
        # a login, time in which a fast cluster could finish the answer.)
        b_stream = ask(b, CLUSTER, {**REQUEST, "max_tokens": 400}, timeout_s=60)
        first = await anext(b_stream)
        await cancel(b, CLUSTER, REQUEST["id"], connection=spy)
        b_own = [first, *[m async for m in b_stream]][-1]
        # The spy receives b's final answer after anything of a's (one broker, in order).
        messages = spy.messages()
        async with asyncio.timeout(20):
            while not saw or json.loads(saw[-1].payload)["type"] not in ("final", "error"):
                saw.append(await anext(messages))
        await messages.aclose()

    spare = broker.transport("device", "spare")
    hidden = torch.zeros(1, 2, _hidden_size(model))
    step = Step("spoof", 0, plan.epoch, 0, hidden=hidden, sampling=Sampling(), reply="main").encode()
    first, second = plan.stages[0].device_id, plan.stages[1].device_id
    refused = []
    async with connect(spare) as conn:
        for topic, payload in [(topics.plan("main"), plan.to_json()),  # only a planner publishes plans
                               (topics.stage_in(Identity("device", first), second, 1), step),  # under first's name
                               (topics.device_status(first), b"{}")]:
            try:
                await conn.publish(topic, payload, qos=1)
            except PublishRefused as exc:
                refused.append(exc.reason)
        # Under its own name the broker takes it; the second stage drops it (the plan puts `first` before it).
        await conn.publish(topics.stage_in(Identity("device", "spare"), second, 1), step, qos=1)
    impostors = await _impostors_seen(broker, second)
    to = [getattr(topics.parse(m.topic), "to", None) for m in saw]
    return a_stream[-1], a_stream, [t for t in to if t != Identity("client", "b")], b_own, b_refused, refused, \
        impostors


def _hidden_size(model: str) -> int:
    return int(json.loads((Path(model) / "config.json").read_text())["hidden_size"])


async def _impostors_seen(broker: SecureBroker, device_id: str) -> int:
    """The device's impostor count once its telemetry shows one (read as operator/admin)."""
    topics = Topics(CLUSTER)
    async with connect(broker.transport("operator", "admin")) as conn:
        await conn.subscribe(topics.device_telemetry(device_id), qos=0)
        async with asyncio.timeout(20):
            async for message in conn.messages():
                telemetry = decode_device_telemetry(message.payload, device_id)
                if telemetry.impostors:
                    return telemetry.impostors
    return 0


def test_a_component_whose_publish_the_broker_refuses_says_so_and_stops(folder: BrokerFolder, tiny_model: Path) -> None:
    """A device started with its identity but for another cluster: the ACL lets device/spare
    write only under lime/v2/plant/device/spare, so its first status is refused; the agent
    reports the topic and the broker's reason and exits with an error."""
    with SecureBroker(folder) as broker:
        done = subprocess.run(
            [sys.executable, "-m", "lime_mqtt.cli", "device", "--config", str(folder.identity_file("device", "spare")),
             "--broker", broker.url, "--cluster", "elsewhere", "--memory-mb", "10", "--model", str(tiny_model),
             "--no-measure"],
            capture_output=True, text=True, timeout=120,
        )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "lime/v2/elsewhere/device/spare/status" in done.stderr and "Not authorized" in done.stderr, done.stderr


def test_the_http_bridge_asks_under_the_identity_its_api_key_maps_to(
    folder: BrokerFolder, tiny_model: Path, tmp_path: Path
) -> None:
    """On the generated TLS configuration: the bridge runs as client/b, reads the cluster as
    operator/admin, and its one API key maps to client/a's identity file. A call with the
    key is answered as client a would be; the dashboard's data shows the devices."""
    import urllib.request

    import openai

    keys = tmp_path / "keys.toml"
    keys.write_text(f'[[key]]\nkey = "sk-a-0123456789abcdef"\nconfig = "{folder.identity_file("client", "a")}"\n')
    devices = [DeviceSpec(d, 10, 1, ("--no-measure",)) for d in ("dev0", "dev1")]
    with SecureBroker(folder) as broker, ProcessCluster(
        broker.url, CLUSTER, str(tiny_model), devices, tmp_path / "logs", identities=folder,
        planner_args=("--strategy", "equal", "--reserve-mb", "0"),
    ) as procs:
        procs.wait_ready(timeout_s=90)
        url = procs.start_bridge(free_port(), "--api-keys", str(keys), "--view-config",
                                 str(folder.identity_file("operator", "admin")), identity=("client", "b"))
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-a-0123456789abcdef", max_retries=0, timeout=60)
        reply = api.completions.create(model=tiny_model.name, prompt=REQUEST["prompt"], max_tokens=12)
        direct = asyncio.run(_final_as(broker.transport("client", "a"), {"prompt": REQUEST["prompt"],
                                                                          "max_tokens": 12}))
        with urllib.request.urlopen(f"{url}/api/cluster", timeout=10) as response:
            seen = json.loads(response.read())
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="sk-b-wrong-key-0000", max_retries=0).models.list()
    assert direct["type"] == "final"
    assert reply.choices[0].text == direct["text"]
    states = {d["id"]: d["state"] for d in seen["devices"]}  # read as operator/admin: client b could not
    assert states == {"dev0": "ready", "dev1": "ready"}
    assert seen["plan"] is not None and [s["device"] for s in seen["plan"]["stages"]] == ["dev0", "dev1"]


async def _final_as(transport: object, request: dict) -> dict:  # type: ignore[type-arg]
    from lime_mqtt.client import ask_final

    return await ask_final(transport, CLUSTER, request)  # type: ignore[arg-type]
