"""Time per output token: single process vs the cluster with 2 and 4 stages, in one run.

Every configuration generates the same greedy answer to the same prompt; the script
checks that the token ids agree, repeats each measurement, and prints medians and the
ratios to the single-process engine. Results go to bench/results/tpot.json.

    .venv/bin/python bench/tpot.py [--model smollm2] [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lime_mqtt.broker import LocalBroker
from lime_mqtt.client import ask_final
from lime_mqtt.cluster import DeviceSpec, ProcessCluster
from lime_mqtt.model.builtin import resolve_model

PROMPT = "Explain in a few sentences why a pump in a cooling loop might lose pressure."


class Clock:
    """A logits processor that only notes when each token's logits are ready."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: object, scores: object) -> object:
        self.stamps.append(time.perf_counter())
        return scores


def single_process(folder: Path, tokens: int, repeats: int) -> tuple[list[float], list[int]]:
    """Plain transformers greedy generation: per-token decode time, from timestamps per step."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    results, out_ids = [], []
    for _ in range(repeats + 1):  # the first run warms up
        clock = Clock()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                 logits_processor=[clock])
        stamps = clock.stamps
        out_ids = out[0, ids.shape[1]:].tolist()
        results.append((stamps[-1] - stamps[0]) * 1000 / (len(stamps) - 1))
    return results[1:], out_ids


def cluster(broker: str, folder: Path, stages: int, tokens: int, repeats: int, log_dir: Path,
            ) -> tuple[list[float], list[int]]:
    devices = [DeviceSpec(f"bench-{stages}-{i}", 400) for i in range(stages)]
    name = f"bench{stages}"
    with ProcessCluster(broker, name, str(folder), devices, log_dir / name) as procs:
        plan = procs.wait_ready()
        assert len(plan.stages) == stages, plan
        results, out_ids = [], []
        for _ in range(repeats + 1):
            request = {"prompt": PROMPT, "max_tokens": tokens, "stream": False, "stop": []}
            final = asyncio.run(ask_final(broker, name, request))
            assert final["type"] == "final", final
            out_ids = final["token_ids"]
            results.append(final["timings"]["tpot_ms"])
    return results[1:], out_ids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--out", default="bench/results/tpot.json")
    args = parser.parse_args()
    folder = resolve_model(args.model)
    report: dict[str, object] = {"model": args.model, "tokens": args.tokens, "repeats": args.repeats}
    single, reference = single_process(folder, args.tokens, args.repeats)
    report["single_ms"] = single
    rows = [("single process (transformers)", statistics.median(single), 1.0)]
    log_dir = Path(tempfile.mkdtemp(prefix="lime-bench-"))
    with LocalBroker() as broker:
        for stages in args.stages:
            times, ids = cluster(broker.url, folder, stages, args.tokens, args.repeats, log_dir)
            n = min(len(ids), len(reference))
            if ids[:n] != reference[:n]:
                print(f"{stages} stages: tokens differ from the single process!", file=sys.stderr)
                return 1
            report[f"cluster_{stages}_ms"] = times
            rows.append((f"cluster, {stages} stages", statistics.median(times),
                         statistics.median(times) / statistics.median(single)))
    print(f"{'configuration':34s} {'ms/token (median)':>18s} {'ratio':>7s}")
    for name, ms, ratio in rows:
        print(f"{name:34s} {ms:18.2f} {ratio:7.3f}")
    report["summary"] = [{"configuration": n, "ms_per_token": m, "ratio": r} for n, m, r in rows]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
