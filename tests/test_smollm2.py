"""Lossless on the real SmolLM2-135M-Instruct: the cluster equals plain transformers, token for token."""

from __future__ import annotations

from pathlib import Path

import pytest

from lime_mqtt.transport.mosquitto import LocalBroker
from tests.helpers import in_process_cluster, prompt_ids, reference_greedy

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What does a pressure relief valve do? Answer briefly."}]
PROMPT = "The three most common causes of a conveyor belt stopping are"

# memory budgets in MB: 1, 2, 3 and 4 stages, even and uneven
BUDGETS = {
    "1 stage": [1000],
    "2 even": [400, 400],
    "2 uneven": [250, 600],
    "3 even": [300, 300, 300],
    "4 even": [260, 260, 260, 260],
    "4 uneven": [300, 150, 170, 400],
}


@pytest.mark.parametrize("name", list(BUDGETS))
async def test_smollm2_cluster_is_token_identical(
    broker: LocalBroker, cluster_name: str, smollm2_model: Path, name: str
) -> None:
    memory = BUDGETS[name]
    async with in_process_cluster(broker.url, cluster_name, smollm2_model, memory) as cluster:
        sizes = [s.stop - s.start for s in cluster.plan.stages]
        assert len(sizes) == len(memory)
        if "uneven" in name:
            assert len(set(sizes)) > 1
        chat = await cluster.final({"messages": QUESTION, "max_tokens": 24})
        plain = await cluster.final({"prompt": PROMPT, "max_tokens": 16})
    assert chat["type"] == "final" and plain["type"] == "final"
    assert chat["token_ids"] == reference_greedy(smollm2_model, prompt_ids(smollm2_model, messages=QUESTION), 24)
    assert plain["token_ids"] == reference_greedy(smollm2_model, prompt_ids(smollm2_model, PROMPT), 16)
    assert chat["text"].strip()


async def test_smollm2_last_stage_logits_match_single_process(
    broker: LocalBroker, cluster_name: str, smollm2_model: Path
) -> None:
    import torch

    from tests.helpers import reference_logits

    async with in_process_cluster(broker.url, cluster_name, smollm2_model, BUDGETS["4 uneven"]) as cluster:
        final = await cluster.final({"prompt": PROMPT, "max_tokens": 3, "return_logits": True, "stream": False})
    expected = reference_logits(smollm2_model, prompt_ids(smollm2_model, PROMPT), len(final["logits"]))
    assert len(final["logits"]) == 3
    # Within 1e-4: the engine's kernels sum each product in another order than torch's.
    for got, want in zip(final["logits"], expected, strict=True):
        assert torch.allclose(torch.tensor(got), want, atol=1e-4, rtol=0)


async def test_smollm2_chunked_prefill_is_token_identical(
    broker: LocalBroker, cluster_name: str, smollm2_model: Path
) -> None:
    """A chat prompt cut into 8-token chunks on 3 uneven stages."""
    ids = prompt_ids(smollm2_model, messages=QUESTION)
    assert len(ids) > 3 * 8
    async with in_process_cluster(broker.url, cluster_name, smollm2_model, [250, 400, 300], prefill_chunk=8) as cluster:
        chat = await cluster.final({"messages": QUESTION, "max_tokens": 24})
    assert chat["token_ids"] == reference_greedy(smollm2_model, ids, 24)
