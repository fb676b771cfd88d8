"""Golden tests: every supported family, in float32 and bfloat16, token-identical to transformers.

Each model is a tiny random one built from transformers' own config class for the
family (lime_mqtt/model/tiny.py switches on what makes the family itself: sliding
windows shorter than the context, soft-capping, partial rotary, biases, q/k norms,
scaled embeddings). The reference is ``generate`` of transformers' model on the same
folder. lime-mqtt's shards run in one process here, chained stage to stage, on uneven
splits of 1 to 4 stages, with decode steps one sequence at a time (batching off) and
both sequences in one batched step (batching on). The cluster across processes and
MQTT is tested elsewhere (test_e2e_processes.py, test_formats.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy
import pytest
import torch

from lime_mqtt.model.adapter import supported_types
from lime_mqtt.model.checkpoint import Checkpoint
from lime_mqtt.model.shard import Shard, ShardSpec
from lime_mqtt.model.tiny import FAMILY_CONFIGS, write_tiny_model

LAYERS = 6
SPLITS = {1: [6], 2: [1, 5], 3: [1, 2, 3], 4: [2, 1, 1, 2]}  # layers per stage, uneven
PROMPTS = [[5, 9, 33, 71, 2, 100, 250, 17, 8, 44, 61, 3], [40, 41, 300, 7, 7, 90, 12]]
NEW_TOKENS = 10
FAMILIES = sorted(FAMILY_CONFIGS)


def test_every_supported_family_has_a_golden_model() -> None:
    assert FAMILIES == supported_types()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    return {}


def _model(models: dict[tuple[str, str], Path], tmp_path_factory: pytest.TempPathFactory, family: str,
           dtype: str) -> Path:
    key = (family, dtype)
    if key not in models:
        models[key] = write_tiny_model(tmp_path_factory.mktemp(f"{family}-{dtype}"), layers=LAYERS, family=family,
                                       dtype=dtype)
    return models[key]


def reference(folder: Path, dtype: str) -> tuple[list[list[int]], list[torch.Tensor]]:
    """transformers' greedy tokens for each prompt, and its logits for the prompt's last position."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    model.generation_config.eos_token_id = None  # always NEW_TOKENS tokens, as the shards make
    tokens, first = [], []
    with torch.inference_mode():
        for prompt in PROMPTS:
            out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True, pad_token_id=0)
            tokens.append(out.sequences[0, len(prompt):].tolist())
            first.append(out.logits[0][0])
    return tokens, first


def pipeline(folder: Path, split: list[int]) -> list[Shard]:
    checkpoint = Checkpoint(folder)
    shards, start = [], 0
    for i, count in enumerate(split):
        shards.append(Shard(checkpoint, ShardSpec(start, start + count, i == 0, i == len(split) - 1)))
        start += count
    return shards


def generate(shards: list[Shard], batched: bool) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens of every prompt through the chained shards; decode steps of both
    prompts in one batched step each (``batched``) or one sequence at a time."""
    caches = [[shard.new_cache() for shard in shards] for _ in PROMPTS]
    outputs: list[list[int]] = [[] for _ in PROMPTS]
    first = []
    for i, prompt in enumerate(PROMPTS):
        x = None
        for j, shard in enumerate(shards):
            x = shard.forward(caches[i][j], 0, tokens=prompt if j == 0 else None, hidden=x)
        assert x is not None
        first.append(x)
        outputs[i].append(int(x.argmax()))
    for _ in range(NEW_TOKENS - 1):
        positions = [len(p) + len(o) - 1 for p, o in zip(PROMPTS, outputs, strict=True)]
        last = [o[-1] for o in outputs]
        if batched:
            xs: list[torch.Tensor] | None = None
            for j, shard in enumerate(shards):
                xs = shard.forward_batch([c[j] for c in caches], positions, 1,
                                         tokens=last if j == 0 else None, hidden=xs)
            assert xs is not None
            logits = xs
        else:
            logits = []
            for i in range(len(PROMPTS)):
                y = None
                for j, shard in enumerate(shards):
                    y = shard.forward(caches[i][j], positions[i], tokens=[last[i]] if j == 0 else None, hidden=y)
                assert y is not None
                logits.append(y)
        for i, row in enumerate(logits):
            outputs[i].append(int(row.argmax()))
    return outputs, first


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_token_identical_to_transformers_on_every_split(
    models: dict[tuple[str, str], Path], tmp_path_factory: pytest.TempPathFactory, family: str, dtype: str
) -> None:
    folder = _model(models, tmp_path_factory, family, dtype)
    want, want_logits = reference(folder, dtype)
    assert len({tuple(t) for t in want}) == 2 and all(len(set(t)) > 2 for t in want), "degenerate reference"
    for stages, split in SPLITS.items():
        shards = pipeline(folder, split)
        assert shards[0].dtype == getattr(torch, dtype)  # held and computed in the checkpoint's dtype
        for batched in (False, True):
            got, logits = generate(shards, batched)
            assert got == want, f"{family} {dtype}: {stages} stages {split}, batching {'on' if batched else 'off'}"
        if dtype == "float32":
            for ours, theirs in zip(logits, want_logits, strict=True):
                scale = max(1.0, float(theirs.abs().max()))
                assert float((ours - theirs).abs().max()) <= 1e-4 * scale


def test_float16_is_token_identical_for_llama(tmp_path: Path) -> None:
    folder = write_tiny_model(tmp_path / "f16", layers=LAYERS, dtype="float16")
    want, _ = reference(folder, "float16")
    for split in (SPLITS[1], SPLITS[3]):
        shards = pipeline(folder, split)
        assert shards[0].dtype == torch.float16
        for batched in (False, True):
            assert generate(shards, batched)[0] == want


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3_text"])
def test_a_batched_step_gives_each_sequence_the_bits_it_gets_alone(
    models: dict[tuple[str, str], Path], tmp_path_factory: pytest.TempPathFactory, family: str, dtype: str
) -> None:
    """A sequence's answer does not depend on the traffic around it: a batched decode step
    of sequences of different lengths gives each the same bits as a batch of it alone."""
    import copy

    folder = _model(models, tmp_path_factory, family, dtype)
    shard = pipeline(folder, SPLITS[1])[0]
    caches, tokens, positions = [], [], []
    for prompt in [*PROMPTS, PROMPTS[0][:3]]:
        cache = shard.new_cache()
        tokens.append(int(shard.forward(cache, 0, prompt).argmax()))
        caches.append(cache)
        positions.append(len(prompt))
    together = shard.forward_batch([copy.deepcopy(c) for c in caches], positions, 1, tokens=tokens)
    for i, cache in enumerate(caches):
        alone = shard.forward_batch([copy.deepcopy(cache)], [positions[i]], 1, tokens=[tokens[i]])[0]
        assert torch.equal(alone, together[i])


def test_a_decode_steps_rotary_rows_are_the_modules_own_bits(tmp_path: Path) -> None:
    # Shard keeps the rotary rows of decode positions (the same for every request); each must
    # be what transformers' rotary module gives for that one position, alone or in a batch.
    from lime_mqtt.model.lean import Rows

    folder = write_tiny_model(tmp_path, layers=2, family="llama", dtype="float32")
    shard = Shard(Checkpoint(folder), ShardSpec(0, 2, True, True))
    assert shard._rotary_static
    probe = torch.zeros(3, shard.config.hidden_size)
    for starts in ([5], [70, 6, 300]):
        rows = Rows([shard.new_cache() for _ in starts], starts, [1] * len(starts), batched=True)
        tables = shard._rotary_tables(probe[: len(starts)], rows)
        cos, sin = next(iter(tables.values()))
        for i, position in enumerate(starts):
            want_cos, want_sin = shard.rotary(probe[:1].view(1, 1, -1), torch.tensor([[position]]))
            assert torch.equal(cos[i, 0], want_cos[0, 0]) and torch.equal(sin[i, 0], want_sin[0, 0])
    assert (None, 6) in shard._rotary_memo and (None, 300 + 31) in shard._rotary_memo


@pytest.mark.parametrize("family", FAMILIES)
def test_all_layers_in_one_kernel_call_give_the_bits_of_a_call_per_layer(
    models: dict[tuple[str, str], Path], tmp_path_factory: pytest.TempPathFactory, family: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A shard whose layers are all held runs them in one kernel call (``FusedLayers``); the
    logits of every step, alone and batched, are the bits of one call per layer. A lone
    sequence's decode step takes the numpy path around that call (``Shard._lone_row``)."""
    folder = _model(models, tmp_path_factory, family, "float32")
    whole, layered = pipeline(folder, SPLITS[1])[0], pipeline(folder, SPLITS[1])[0]
    monkeypatch.setattr(layered, "_fused_whole", lambda tables: None)
    lone_rows: list[Any] = []
    lone_row = whole._lone_row
    monkeypatch.setattr(whole, "_lone_row", lambda *args: lone_rows.append(lone_row(*args)) or lone_rows[-1])
    runs = []
    for shard in (whole, layered):
        caches = [shard.new_cache() for _ in PROMPTS]
        seen = [shard.forward(cache, 0, prompt) for cache, prompt in zip(caches, PROMPTS, strict=True)]
        tokens = [int(logits.argmax()) for logits in seen]
        positions = [len(prompt) for prompt in PROMPTS]
        for _ in range(4):
            alone = shard.forward(caches[0], positions[0], [tokens[0]])
            both = shard.forward_batch(caches, [positions[0] + 1, positions[1]], 1, tokens=[int(alone.argmax()),
                                                                                             tokens[1]])
            seen += [alone, *both]
            tokens = [int(row.argmax()) for row in both]
            positions = [positions[0] + 2, positions[1] + 1]
        runs.append(seen)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    assert whole._whole is not None and whole._whole.count == LAYERS  # the whole shard did run as one call
    assert sum(isinstance(row, numpy.ndarray) for row in lone_rows) >= 4  # the lone steps, after the first
