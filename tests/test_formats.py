"""End to end: checkpoints served in their own format by device agents as OS processes.

- SmolLM2 from its GGUF file as shipped (Q4_1 layers, a Q8_0 embedding that is also the
  tied head): token-identical to transformers' model dequantized from the same file,
  and each device's weight memory follows the file's bytes for its layers.
- bfloat16 and float16 safetensors stay in their dtype on every device, through the
  batched decode path, token-identical to transformers in that dtype.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from lime_mqtt.cli.cluster import DeviceSpec, ProcessCluster, device_statuses
from lime_mqtt.client import ask
from lime_mqtt.model.builtin import smollm2_gguf_folder
from lime_mqtt.model.checkpoint import Checkpoint
from lime_mqtt.model.tiny import write_tiny_model
from lime_mqtt.planning.plan import MIB
from lime_mqtt.transport.mosquitto import LocalBroker
from tests.helpers import prompt_ids, reference_greedy

pytestmark = [pytest.mark.e2e]

QUESTION = [{"role": "user", "content": "Name two ways to save energy in a factory."}]


def _ask(broker: str, cluster: str, request: dict) -> list[dict]:
    async def run() -> list[dict]:
        return [m async for m in ask(broker, cluster, request)]

    return asyncio.run(run())


@pytest.mark.slow
def test_smollm2_served_from_its_gguf_file_as_shipped(
    broker: LocalBroker, cluster_name: str, smollm2_model: Path, tmp_path: Path
) -> None:
    folder = smollm2_gguf_folder()
    checkpoint = Checkpoint(folder)
    assert checkpoint.gguf_file is not None
    kinds = {info.dtype for info in checkpoint.tensors.values()}
    assert {"Q4_1", "Q8_0"} <= kinds
    file_bytes = checkpoint.gguf_file.stat().st_size
    assert checkpoint.total_bytes <= file_bytes < checkpoint.total_bytes * 1.05  # the file is its tensors
    devices = [DeviceSpec(f"q-{i}", 100) for i in range(3)]
    with ProcessCluster(broker.url, cluster_name, str(folder), devices, tmp_path / "logs",
                        planner_args=("--strategy", "memory")) as procs:
        plan = procs.wait_ready(timeout_s=180)
        ids = [d.device_id for d in devices]
        loaded = asyncio.run(device_statuses(broker.url, cluster_name, ids))
        assert all(loaded[i]["formats"] in (["Q4_1"], ["Q4_1", "Q8_0"]) for i in ids), loaded
        messages = _ask(broker.url, cluster_name, {"messages": QUESTION, "max_tokens": 24})
        codes = procs.stop()
    final = messages[-1]
    assert final["type"] == "final", (final, procs.log_tail())
    # The reference: transformers' model loaded from the same GGUF file, dequantized
    # (the smollm2 folder is exactly that, saved; its tokenizer is the same).
    expected = reference_greedy(smollm2_model, prompt_ids(smollm2_model, messages=QUESTION), 24)
    assert final["token_ids"] == expected
    assert len(plan.stages) == 3
    ratios = {}
    for stage in plan.stages:
        keys = [k for i in range(stage.start, stage.stop) for k in checkpoint.keys_with_prefix(f"model.layers.{i}.")]
        if stage.start == 0:
            keys.append("model.embed_tokens.weight")
        if stage.stop == checkpoint.num_layers:
            keys += ["model.norm.weight", "model.embed_tokens.weight"]  # the tied head
        expected_bytes = checkpoint.bytes_of(sorted(set(keys)))
        status = loaded[stage.device_id]
        # Measured: the resident anonymous memory that loading its shards added (RssAnon,
        # before and after); and, looser, all its memory above its start-up baseline
        # (that also holds what measuring itself left: a MB or two).
        held = status["loaded_anon_mb"] * MIB
        above = (status["anon_mb"] - status["baseline_anon_mb"]) * MIB
        print(f"{stage.device_id}: layers [{stage.start}, {stage.stop}), file bytes {expected_bytes / MIB:.1f} MiB, "
              f"loading added {held / MIB:.1f} MiB ({held / expected_bytes:.3f}), "
              f"{above / MIB:.1f} MiB above its baseline")
        ratios[stage.device_id] = held / expected_bytes
        assert above <= expected_bytes * 1.1 + 4 * MIB, (stage.device_id, above)
    assert all(0.9 <= r <= 1.1 for r in ratios.values()), ratios
    assert all(code == 0 for code in codes.values()), codes


@pytest.mark.parametrize(("family", "dtype"), [("gemma3_text", "bfloat16"), ("qwen3", "bfloat16"),
                                                 ("llama", "float16")])
def test_half_precision_checkpoints_stay_in_their_dtype_end_to_end(
    broker: LocalBroker, cluster_name: str, tmp_path: Path, family: str, dtype: str
) -> None:
    folder = write_tiny_model(tmp_path / "model", layers=6, family=family, dtype=dtype)
    checkpoint = Checkpoint(folder)
    assert checkpoint.compute_dtype == getattr(torch, dtype)
    devices = [DeviceSpec(f"h-{i}", 2, extra_args=("--max-batch", "8")) for i in range(3)]
    prompts = ["Close valve V-17", "The pump in hall three", "Patients must fast"]
    with ProcessCluster(broker.url, cluster_name, str(folder), devices, tmp_path / "logs",
                        planner_args=("--strategy", "equal", "--reserve-mb", "0", "--sequences", "4")) as procs:
        plan = procs.wait_ready(timeout_s=120)

        async def burst() -> list[list[dict]]:
            async def one(text: str) -> list[dict]:
                return [m async for m in ask(broker.url, cluster_name, {"prompt": text, "max_tokens": 12})]

            return list(await asyncio.gather(*(one(p) for p in prompts)))

        answers = asyncio.run(burst())
        statuses = asyncio.run(device_statuses(broker.url, cluster_name, [d.device_id for d in devices]))
        codes = procs.stop()
    assert len(plan.stages) == 3
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    for text, messages in zip(prompts, answers, strict=True):
        final = messages[-1]
        assert final["type"] == "final", (final, procs.log_tail())
        ids = prompt_ids(folder, text)
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
        want = out[0, len(ids):].tolist()
        eos = model.generation_config.eos_token_id
        want = want[: want.index(eos)] if eos in want else want
        assert final["token_ids"] == want, text
    # Every device held its matrices in the checkpoint's dtype, at 2 bytes per weight
    # (Gemma's norm weights are kept as 1 + w in float32: a few KB more).
    short = {"bfloat16": "BF16", "float16": "F16"}[dtype]
    for stage in plan.stages:
        status = statuses[stage.device_id]
        assert status["formats"] == [short]
        assert 2 * status["param_count"] <= status["weight_bytes"] <= 2.02 * status["param_count"]
    assert all(code == 0 for code in codes.values()), codes
