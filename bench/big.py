"""A 1B-class model on 4 device processes, each with memory for about a third of it.

The bench makes its own model once: a Llama with Llama-3.2-1B's shapes (16 layers,
hidden 2048, 32 query and 8 KV heads, vocabulary 128256, tied head) and random
bfloat16 weights (about 2.5 GB of safetensors), with the tiny byte-level tokenizer of
lime_mqtt/model/tiny.py, cached under ``--cache`` and reused when complete. It then
starts a local Mosquitto, the planner, the coordinator and 4 device agents (separate
processes, 1 torch thread each), each with a memory budget of a third of the model's
bytes plus the planner's working memory and KV cache, asks a few greedy requests one
after another, and reads each device's retained status: its layers, the weight bytes
it holds, its anonymous memory above its own baseline, and the matrix-vector bandwidth
it measured at start. The bytes every token must read divided by that bandwidth give
a lower bound on the time per token (the stages back to back, no overhead, every byte
read once at the measured rate); the share of that bound reached is bound / measured.
A table is printed and JSON written to bench/results/big.json.

    .venv/bin/python bench/big.py [--tokens 32] [--rounds 3] [--cache DIR]
    # a smoke test at tiny shapes (about a minute):
    .venv/bin/python bench/big.py --cache /tmp/bench-tiny --layers 8 --hidden 256 --intermediate 512 \\
        --heads 4 --kv-heads 2 --vocab 1024 --tokens 8 --rounds 1 --out /tmp/big.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_CACHE = Path.home() / ".cache" / "lime-mqtt" / "models" / "bench-llama-1b-bf16"
MIB = 1024 * 1024
MARKER = ".complete"
TOKENIZER_VOCAB = 384  # the tiny byte-level tokenizer's own vocabulary (lime_mqtt/model/tiny.py)
PROMPT_TEXT = (
    "The pump in hall three reports a pressure of 4.2 bar. Close valve V-17 before starting the "
    "maintenance of the cooling loop. Summarise the shift report: two alarms, one false, no injuries. "
    "The conveyor belt stopped at 14:32 because of an overload on motor M2."
)


# ----- the model folder ---------------------------------------------------------------------------


def model_shapes(args: argparse.Namespace) -> dict[str, Any]:
    """The LlamaConfig keyword arguments (Llama-3.2-1B's shapes unless overridden)."""
    head_dim = args.head_dim or args.hidden // args.heads
    return {
        "hidden_size": args.hidden, "intermediate_size": args.intermediate, "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads, "head_dim": head_dim,
        "vocab_size": args.vocab, "tie_word_embeddings": True, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        "max_position_embeddings": args.max_positions, "seed": args.seed, "std": 0.02, "dtype": "bfloat16",
    }


def ensure_model(folder: Path, shapes: dict[str, Any]) -> Path:
    """The model folder: reused if its marker says it is complete with these shapes, else
    written (into a sibling folder first, then renamed, so that a folder is either whole or
    absent)."""
    marker = folder / MARKER
    if marker.is_file():
        found = json.loads(marker.read_text())
        if found != shapes:
            raise SystemExit(f"{folder} holds a model of other shapes ({found}); pass another --cache or delete it")
        print(f"model: reusing {folder}", flush=True)
        return folder
    if folder.exists():
        raise SystemExit(f"{folder} exists but has no {MARKER} marker (not a complete model this bench wrote); "
                         "delete it or pass another --cache")
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    started = time.perf_counter()
    print(f"model: writing {folder} ...", flush=True)
    try:
        write_model(partial, shapes)
        partial.rename(folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    print(f"model: written in {time.perf_counter() - started:.0f} s", flush=True)
    return folder


def write_model(folder: Path, shapes: dict[str, Any]) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lime_mqtt.model.tiny import TINY_CHAT_TEMPLATE, _train_tokenizer

    if shapes["vocab_size"] < TOKENIZER_VOCAB:
        raise SystemExit(f"--vocab must be at least {TOKENIZER_VOCAB} (the tokenizer's ids)")
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=_train_tokenizer(vocab_size=TOKENIZER_VOCAB),
        bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    config_args = {k: v for k, v in shapes.items() if k not in ("seed", "std")}
    config = LlamaConfig(**config_args, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    # Built on the meta device, then given bfloat16 memory: no float32 copy of the model ever exists.
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("the head is not tied to the embedding after to_empty")
    generator = torch.Generator().manual_seed(shapes["seed"])
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied matrix is listed once
            if param.dim() > 1:
                param.normal_(0.0, shapes["std"], generator=generator)
            else:
                param.fill_(1.0)  # RMSNorm weights, as a trained model starts
            if not torch.isfinite(param).all():
                raise RuntimeError(f"{name} is not finite")
    model.eval()
    folder.mkdir(parents=True)
    model.save_pretrained(folder, max_shard_size="1GB")
    tokenizer.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    del model
    (folder / MARKER).write_text(json.dumps(shapes, indent=1) + "\n")  # last: the folder is complete


def make_prompt(folder: Path, tokens: int) -> tuple[str, int]:
    """A prompt of about ``tokens`` token ids under the model's tokenizer."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    words = (PROMPT_TEXT + " ") * (1 + tokens)
    text = ""
    for word in words.split():
        text = f"{text} {word}".strip()
        if len(tokenizer.encode(text).ids) >= tokens:
            break
    return text, len(tokenizer.encode(text).ids)


# ----- measuring ----------------------------------------------------------------------------------


async def one_request(broker: str, cluster: str, prompt: str, tokens: int, stream: bool) -> dict[str, Any]:
    """One greedy request: the final message's timings (the coordinator's clock: ``ttft_ms``
    from the request's arrival to the first token, ``tpot_ms`` the mean of the later steps),
    and the whole request on the client's clock. (The first chunk is no first-token clock
    here: random byte-level tokens often end inside a UTF-8 character, and the text stream
    holds them back.)"""
    from lime_mqtt.client import ask

    request = {"prompt": prompt, "max_tokens": tokens, "temperature": 0.0, "stream": stream}
    sent = time.perf_counter()
    final: dict[str, Any] = {}
    chunks = 0
    async for message in ask(broker, cluster, request):
        chunks += message.get("type") == "chunk"
        final = message
    if final.get("type") != "final":
        raise RuntimeError(f"the request failed: {final}")
    return {
        "timings": final["timings"], "token_ids": final["token_ids"], "usage": final["usage"],
        "finish_reason": final["finish_reason"], "chunks": chunks,
        "client_total_ms": (time.perf_counter() - sent) * 1000,
    }


def matvec_rates(hidden: int, threads: int, big_mib: int) -> dict[str, float]:
    """This process's own matrix-vector rates, once the cluster is gone: torch float32 at the
    size the devices measure (32 MiB, a check of their figure; it may fit in the CPU's last
    level cache), torch float32 and the engine's bfloat16 kernel (the weights' format) on a
    ``big_mib`` matrix, larger than any cache."""
    import torch

    from lime_mqtt.model.kernels import PackedWeight, linear
    from lime_mqtt.model.measure import measure_matvec

    torch.set_num_threads(threads)
    vector = torch.randn(1, hidden)

    def rate(run: Any, nbytes: int) -> float:
        run()
        times = []
        for _ in range(5):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
        return nbytes / statistics.median(times) / 1e9

    def torch_f32() -> float:
        matrix = torch.full((big_mib * MIB // (4 * hidden), hidden), 0.01)
        return rate(lambda: torch.nn.functional.linear(vector, matrix), matrix.nbytes)

    def engine_bf16() -> float:
        packed = PackedWeight.of(torch.full((big_mib * MIB // (2 * hidden), hidden), 0.01, dtype=torch.bfloat16))
        return rate(lambda: linear(vector, packed), packed.nbytes)

    # one matrix at a time
    rates = {"torch_f32_32mib_gb_s": measure_matvec(hidden), "torch_f32_big_gb_s": torch_f32(),
             "engine_bf16_big_gb_s": engine_bf16()}
    rates["big_mib"] = big_mib
    return rates


# ----- the run ------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"the model folder (default {DEFAULT_CACHE})")
    shapes = parser.add_argument_group("model shapes (Llama-3.2-1B's by default; smaller ones for smoke tests)")
    shapes.add_argument("--layers", type=int, default=16)
    shapes.add_argument("--hidden", type=int, default=2048)
    shapes.add_argument("--intermediate", type=int, default=8192)
    shapes.add_argument("--heads", type=int, default=32)
    shapes.add_argument("--kv-heads", type=int, default=8)
    shapes.add_argument("--head-dim", type=int, help="default: hidden / heads (64)")
    shapes.add_argument("--vocab", type=int, default=128256)
    shapes.add_argument("--max-positions", type=int, default=2048)
    shapes.add_argument("--seed", type=int, default=0)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--budget-mb", type=int,
                        help="each device's memory budget (default: a third of the model's bytes, rounded up, plus "
                        "the planner's working memory and the KV cache of every layer)")
    parser.add_argument("--device-threads", type=int, default=1, help="torch threads of each device agent")
    parser.add_argument("--strategy", choices=["optimal", "memory", "equal"], default="optimal")
    parser.add_argument("--context-tokens", type=int, default=256, help="KV cache the planner reserves per sequence")
    parser.add_argument("--reserve-mb", type=float, default=32.0, help="the planner's working memory per device")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--no-stream", action="store_true", help="ask for the final message only, no chunks")
    parser.add_argument("--rounds", type=int, default=3, help="measured requests (after one warm-up request)")
    parser.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for the cluster")
    parser.add_argument("--matvec-mib", type=int, default=1024,
                        help="the matrix of this process's own matrix-vector measurement after the run")
    parser.add_argument("--logs", type=Path, help="the processes' logs (default: a new temporary folder)")
    parser.add_argument("--out", default="bench/results/big.json")
    return parser.parse_args()


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so that every context manager stops its processes


def main() -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    signal.signal(signal.SIGTERM, _on_sigterm)
    args = parse_args()
    if args.rounds < 1 or args.tokens < 2:
        raise SystemExit("--rounds must be at least 1 and --tokens at least 2")
    shapes = model_shapes(args)
    folder = ensure_model(args.cache.expanduser().resolve(), shapes)

    from lime_mqtt.cli.cluster import DeviceSpec, ProcessCluster, device_statuses
    from lime_mqtt.device.memory import AnonPeakSampler
    from lime_mqtt.model.checkpoint import Checkpoint
    from lime_mqtt.planning.plan import format_plan
    from lime_mqtt.transport.mosquitto import LocalBroker

    checkpoint = Checkpoint(folder)
    total = checkpoint.total_bytes
    third_mb = math.ceil(total / 3 / MIB)
    kv_all = checkpoint.kv_bytes_per_token_per_layer() * args.context_tokens * checkpoint.num_layers
    kv_mb = math.ceil(kv_all / MIB)
    budget_mb = args.budget_mb or third_mb + math.ceil(args.reserve_mb) + kv_mb
    print(f"model: {total / MIB:.0f} MiB of weights ({checkpoint.num_layers} layers, embedding "
          f"{checkpoint.embed_bytes / MIB:.0f} MiB, tied head); budget per device {budget_mb} MiB = a third "
          f"{third_mb} + working memory {math.ceil(args.reserve_mb)} + KV cache of all layers for "
          f"{args.context_tokens} tokens {kv_mb}" + (" (given by --budget-mb)" if args.budget_mb else ""), flush=True)
    prompt, prompt_tokens = make_prompt(folder, args.prompt_tokens)

    cluster = "big"
    ids = [f"big-dev{i}" for i in range(args.devices)]
    devices = [DeviceSpec(d, budget_mb, args.device_threads) for d in ids]
    log_dir = args.logs or Path(tempfile.mkdtemp(prefix="lime-bench-big-"))
    print(f"logs: {log_dir}", flush=True)
    planner_args = ("--strategy", args.strategy, "--context-tokens", str(args.context_tokens),
                    "--reserve-mb", str(args.reserve_mb))
    runs: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(LocalBroker())
        procs = ProcessCluster(broker.url, cluster, str(folder), devices, log_dir, planner_args=planner_args)
        stack.callback(procs.stop)  # registered before the first process starts: all of them are stopped
        procs.start()
        started = time.perf_counter()
        plan = procs.wait_ready(timeout_s=args.ready_timeout)
        print(f"cluster ready in {time.perf_counter() - started:.0f} s", flush=True)
        print(format_plan(plan, explain=True) + "\n", flush=True)
        if len({s.device_id for s in plan.stages}) < len(ids):
            print(f"note: the plan uses {len({s.device_id for s in plan.stages})} of the {len(ids)} devices",
                  flush=True)
        sampler = AnonPeakSampler([procs.processes[d].pid for d in ids], period_s=0.05)  # slow: no disturbance
        reference: list[int] | None = None
        for round_ in range(args.rounds + 1):  # round 0 warms up
            run = asyncio.run(one_request(broker.url, cluster, prompt, args.tokens, not args.no_stream))
            reference = reference or run["token_ids"]
            run.update(round=round_, warmup=round_ == 0, same_tokens=run["token_ids"] == reference)
            runs.append(run)
            note = "" if run["same_tokens"] else ", tokens differ from the first answer's!"
            print(f"{'warm-up' if round_ == 0 else f'round {round_}'}: {len(run['token_ids'])} tokens "
                  f"({run['finish_reason']}), prompt {run['usage']['prompt_tokens']} tokens, "
                  f"ttft {run['timings']['ttft_ms']:.1f} ms, tpot {run['timings']['tpot_ms']:.2f} ms{note}", flush=True)
        peaks = sampler.stop()
        statuses = asyncio.run(device_statuses(broker.url, cluster, ids))
        codes = procs.stop()
    missing = sorted(set(ids) - set(statuses))
    if missing:
        print(f"no status from {missing}", file=sys.stderr)
    rates = matvec_rates(int(checkpoint.config_dict["hidden_size"]), args.device_threads, args.matvec_mib)

    # ----- the bound: every byte a token needs, read once at each device's measured rate -----
    measured = [r for r in runs if not r["warmup"]]
    tpot = statistics.median(r["timings"]["tpot_ms"] for r in measured)
    ttft = statistics.median(r["timings"]["ttft_ms"] for r in measured)
    rows: list[dict[str, Any]] = []
    for device_id in ids:
        status = statuses.get(device_id, {})
        stages = plan.stages_of(device_id)
        embed_only = any(s.embed for s in stages) and not any(s.head for s in stages)
        weight_bytes = int(status.get("weight_bytes", 0))
        # the layers it streams now (its status; more than planned if its memory ran short), else the plan's
        streamed = sorted(status.get("streamed", [i for s in stages for i in s.streamed]))
        streamed_bytes = sum(checkpoint.layer_bytes(i) for i in streamed)
        # A token reads all it holds, its streamed layers, but of an embedding (not also the
        # head here) only one row.
        read = weight_bytes + streamed_bytes
        if embed_only:
            read -= checkpoint.embed_bytes - checkpoint.embed_bytes // int(checkpoint.config_dict["vocab_size"])
        capabilities = status.get("capabilities") or {}
        gb_s = capabilities.get("matvec_gb_s")
        anon, base = status.get("anon_mb"), status.get("baseline_anon_mb")
        pid = status.get("pid")
        rows.append({
            "device_id": device_id, "layers": status.get("layers", [(s.start, s.stop) for s in stages]),
            "embed": any(s.embed for s in stages), "head": any(s.head for s in stages),
            "streamed_layers": streamed, "streamed_layers_planned": sorted(i for s in stages for i in s.streamed),
            "weight_bytes": weight_bytes, "plan_weight_bytes": sum(s.weight_bytes for s in stages),
            "streamed_bytes": streamed_bytes, "read_bytes_per_token": read, "param_count": status.get("param_count"),
            "above_baseline_mb": None if anon is None or base is None else round(anon - base, 1),
            "peak_above_baseline_mb": (round(peaks[pid] / MIB - base, 1) if pid in peaks and peaks[pid] and base
                                       is not None else None),
            "budget_mb": budget_mb, "matvec_gb_s": gb_s, "capabilities": capabilities,
            "bound_ms": read / (gb_s * 1e9) * 1000 if gb_s and read else 0.0,
            "bound_ms_engine_bf16": read / (rates["engine_bf16_big_gb_s"] * 1e9) * 1000 if read else 0.0,
            "status_state": status.get("state"), "exit_code": codes.get(device_id),
        })
    read_total = sum(r["read_bytes_per_token"] for r in rows)
    held_total = sum(r["weight_bytes"] for r in rows)
    bound = sum(r["bound_ms"] for r in rows)
    bound_bf16 = sum(r["bound_ms_engine_bf16"] for r in rows)
    # The brief's first reading: the sum of all weight_bytes (the embedding counted on the first device too).
    bound_held = sum(r["weight_bytes"] / (r["matvec_gb_s"] * 1e9) * 1000 for r in rows if r["matvec_gb_s"])

    print(f"\n{'device':10s} {'layers':18s} {'embed':>5s} {'head':>4s} {'weight MiB':>10s} {'above base MiB':>14s} "
          f"{'peak above MiB':>14s} {'budget MiB':>10s} {'params M':>8s} {'matvec GB/s':>11s} {'bound ms':>8s}")
    for r in rows:
        layers = (",".join(f"[{a},{b})" for a, b in r["layers"]) or "-") + (
            f" {len(r['streamed_layers'])} str." if r["streamed_layers"] else "")
        above = "-" if r["above_baseline_mb"] is None else f"{r['above_baseline_mb']:.0f}"
        peak = "-" if r["peak_above_baseline_mb"] is None else f"{r['peak_above_baseline_mb']:.0f}"
        gb_s = "-" if r["matvec_gb_s"] is None else f"{r['matvec_gb_s']:.2f}"
        params = "-" if not r["param_count"] else f"{r['param_count'] / 1e6:.1f}"
        print(f"{r['device_id']:10s} {layers:18s} {'yes' if r['embed'] else '':>5s} {'yes' if r['head'] else '':>4s} "
              f"{r['weight_bytes'] / MIB:10.1f} {above:>14s} {peak:>14s} {r['budget_mb']:10d} {params:>8s} {gb_s:>11s} "
              f"{r['bound_ms']:8.2f}")
    share = bound / tpot if tpot else None
    print(f"\ntime per output token (median of {len(measured)}): {tpot:.2f} ms; time to first token {ttft:.1f} ms "
          f"(prompt {prompt_tokens} tokens)")
    print(f"bytes read per token {read_total / MIB:.1f} MiB (weights held {held_total / MIB:.1f} MiB; streamed layers "
          f"(str.) are read too; of the embedding on a device without the head, one row per token)")
    print(f"bound at the devices' measured matvec rate: {bound:.2f} ms per token; share reached "
          f"{(share or 0) * 100:.1f}%")
    print(f"with the weights held counted whole (the embedding too): bound {bound_held:.2f} ms, share "
          f"{bound_held / tpot * 100:.1f}%")
    print(f"this process after the run, {args.device_threads} thread(s): torch float32 matvec "
          f"{rates['torch_f32_32mib_gb_s']:.2f} GB/s at 32 MiB (the devices' measurement), "
          f"{rates['torch_f32_big_gb_s']:.2f} GB/s at {args.matvec_mib} MiB; the engine's bfloat16 kernel "
          f"{rates['engine_bf16_big_gb_s']:.2f} GB/s at {args.matvec_mib} MiB: bound at that rate "
          f"{bound_bf16:.2f} ms, share {bound_bf16 / tpot * 100:.1f}%")
    if any(code != 0 for code in codes.values()):
        print(f"exit codes: {codes}", file=sys.stderr)

    report = {
        "model": {"folder": str(folder), "shapes": shapes, "total_bytes": total, "embed_bytes": checkpoint.embed_bytes},
        "settings": {"devices": args.devices, "budget_mb": budget_mb, "third_mb": third_mb, "kv_mb": kv_mb,
                     "reserve_mb": args.reserve_mb, "context_tokens": args.context_tokens,
                     "strategy": args.strategy, "device_threads": args.device_threads, "tokens": args.tokens,
                     "stream": not args.no_stream,
                     "rounds": args.rounds, "prompt": prompt, "prompt_tokens": prompt_tokens},
        "plan": plan.model_dump(mode="json"),
        "devices": rows,
        "runs": [{k: v for k, v in r.items() if k != "token_ids"} | {"tokens": len(r["token_ids"])} for r in runs],
        "summary": {
            "tpot_ms_median": tpot, "ttft_ms_median": ttft,
            "client_total_ms_median": statistics.median(r["client_total_ms"] for r in measured),
            "read_bytes_per_token": read_total, "held_weight_bytes": held_total,
            "bound_ms": bound, "share": share,
            "bound_ms_held_bytes": bound_held, "share_held_bytes": bound_held / tpot if tpot else None,
            "bench_matvec": rates, "bound_ms_engine_bf16": bound_bf16,
            "share_engine_bf16": bound_bf16 / tpot if tpot else None,
            "all_rounds_same_tokens": all(r["same_tokens"] for r in runs), "exit_codes": codes,
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
