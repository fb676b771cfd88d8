"""Next-token choice on the last stage: greedy, temperature, top-k, top-p, seeded.

The random generator is seeded from ``(seed, step)`` alone, so a sampled answer does
not depend on which device samples it or on anything it sampled before.
"""

from __future__ import annotations

import torch

from lime_mqtt.core.wire import Sampling

_MASK64 = (1 << 63) - 1


def step_seed(seed: int, step: int) -> int:
    """A per-step seed derived from the request seed (splitmix64-style mixing)."""
    z = (seed * 0x9E3779B97F4A7C15 + step + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & _MASK64


def choose_token(logits: torch.Tensor, sampling: Sampling, step: int) -> int:
    """Pick the next token from one position's logits. ``logits``: [vocab]."""
    if sampling.temperature <= 0.0:
        if logits.dtype == torch.float32 and logits.dim() == 1:
            # numpy's: the first of equal maxima, as torch's; with the caches cold after the
            # head's weights, about a third of torch.argmax's time (80 against 180 us).
            return int(logits.numpy().argmax())
        return int(torch.argmax(logits).item())
    scores = logits.float() / sampling.temperature
    if 0 < sampling.top_k < scores.numel():
        kth = torch.topk(scores, sampling.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p; always keep the best.
        drop = (cumulative - torch.softmax(sorted_scores, dim=-1)) >= sampling.top_p
        drop[0] = False
        scores = scores.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    generator = torch.Generator().manual_seed(step_seed(sampling.seed, step))
    return int(torch.multinomial(probs, 1, generator=generator).item())
