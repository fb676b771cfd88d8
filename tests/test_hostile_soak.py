"""A soak of hostile input while the cluster serves: 1,000 malformed or hostile messages at
every topic a role may write (topic layout 2: a client's request topic, a device's own
status, telemetry and weights topics, steps to every stage, tokens to the coordinator, a
coordinator's status and control), from identities that are not in the plan and from the
plan's own devices, on a real Mosquitto. Every component stays alive (a crash would fail
the test through the task group), and a good request gets the same answer as before.

The broker here takes anonymous clients, so that one connection can play every identity;
that no identity can write under another's name is the ACL's part, shown on the generated
configuration in tests/test_broker_secure.py and tests/test_secure_cluster.py."""

from __future__ import annotations

import json
import random
from pathlib import Path

import cbor2
import torch

from lime_mqtt.core.topics import Identity, Topics
from lime_mqtt.core.wire import End, Sampling, Step, Token, tensor_to_wire
from lime_mqtt.transport import connect
from lime_mqtt.transport.mosquitto import LocalBroker
from tests.helpers import in_process_cluster, stage_topic

GOOD = {"prompt": "Why would a cooling pump lose pressure?", "max_tokens": 12}


def _hostile_payloads(rng: random.Random, epoch: int, hidden: int) -> list[bytes]:
    """One of each kind of trouble; the caller cycles through them."""
    step = Step("soak", 0, epoch, 0, tokens=[1, 2], sampling=Sampling(), reply="nowhere").encode()
    huge_shape = dict(cbor2.loads(step))
    huge_shape.pop("tokens")
    huge_shape["hidden"] = {"dtype": "f32", "shape": [1, 2**20, 2**20], "data": b"\x00" * 16}
    wrong_dtype = dict(huge_shape, hidden={**tensor_to_wire(torch.zeros(1, 1, hidden)), "dtype": "pickle"})
    wrong_width = dict(huge_shape, hidden=tensor_to_wire(torch.zeros(1, 1, hidden + 3)))
    old_epoch = Step("soak", 0, max(0, epoch - 1), 0, tokens=[1], sampling=Sampling(), reply="a/b").encode()
    return [
        rng.randbytes(rng.randint(0, 300)),                      # garbage
        step[: rng.randint(1, len(step) - 1)],                   # truncated CBOR
        cbor2.dumps(huge_shape),                                  # a huge shape, a few bytes of data
        cbor2.dumps(wrong_dtype),                                 # a dtype nobody decodes
        cbor2.dumps(wrong_width),                                 # hidden states of another width
        old_epoch,                                                # an old epoch
        Token("soak", 3, epoch, 5, token=7).encode(),             # a token nobody asked for
        End("nobody", epoch).encode(),                            # an end of nothing
        b"[" * 50_000,                                            # deep JSON
        json.dumps({"prompt": "x" * (1 << 20 + 1)}).encode(),     # an oversized request
        json.dumps({"prompt": 5, "max_tokens": "many", "v": 2}).encode(),  # wrong types, wrong version
        json.dumps({"cancel": "someone-else"}).encode(),          # a cancel of a request that is not there
        json.dumps({"v": 1, "device_id": "dev0", "state": "offline"}).encode(),  # another device's status
        json.dumps({"version": 2, "epoch": 10**6, "model": "x"}).encode(),       # a half plan
    ]


async def test_a_thousand_hostile_messages_change_nothing(
    broker: LocalBroker, cluster_name: str, tiny_model: Path
) -> None:
    rng = random.Random(20261201)
    topics = Topics(cluster_name)
    async with in_process_cluster(broker.url, cluster_name, tiny_model, [10, 10]) as cluster:
        before = await cluster.final(GOOD)
        assert before["type"] == "final"
        hidden = int(json.loads((tiny_model / "config.json").read_text())["hidden_size"])
        payloads = _hostile_payloads(rng, cluster.plan.epoch, hidden)
        me, spare = Identity("coordinator", cluster.coordinator.name), Identity("device", "spare")
        dev0, dev1 = Identity("device", "dev0"), Identity("device", "dev1")
        ghost = Identity("coordinator", "ghost")
        targets = [
            # what the plan's own devices may write: steps to the next stage, tokens to the coordinator
            stage_topic(topics, cluster.plan, 1), topics.result("dev1", me.name), topics.result("dev0", me.name),
            # a device outside the plan: steps to every stage, tokens, its own status, telemetry, weights
            stage_topic(topics, cluster.plan, 0, spare), stage_topic(topics, cluster.plan, 1, spare),
            topics.result("spare", me.name), topics.device_status("spare"), topics.device_telemetry("spare"),
            topics.weights_request("spare"), topics.weights_reply(spare, "dev0", "x"),
            stage_topic(topics, cluster.plan, 0, dev1),  # a plan device, at a stage it does not feed
            # clients: their own request topics; another coordinator: its status, control, steps
            topics.requests("default"), topics.requests("mallory"), topics.coordinator_status(ghost.name),
            topics.control(ghost.name), stage_topic(topics, cluster.plan, 0, ghost),
            topics.weights_reply(dev0, "dev1", "x"),
        ]
        async with connect(broker.url) as attacker:
            for i in range(1000):  # QoS 1: the broker has taken every one before the good request goes
                await attacker.publish(targets[i % len(targets)], payloads[i % len(payloads)], qos=1)
        after = await cluster.final(GOOD)
        states = {d.device_id: d.state for d in cluster.devices}
        plan_epoch = cluster.coordinator.plan.epoch if cluster.coordinator.plan else None
    assert after["type"] == "final" and after["token_ids"] == before["token_ids"] and after["text"] == before["text"]
    assert states == {"dev0": "ready", "dev1": "ready"}  # dev0's status on spare's topic changed nothing
    assert plan_epoch == cluster.plan.epoch  # neither did the half plan
