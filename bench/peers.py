"""lime-mqtt against llama.cpp on the same weights, in one run.

llama.cpp is built once from the source tree inside the llama-cpp-python source
distribution (``llama-bench`` and the RPC server) into a cache folder, and the float32
safetensors folder lime-mqtt runs is converted to an F32 GGUF with llama.cpp's own
``convert_hf_to_gguf.py`` (needs ``sentencepiece``), so both run the very same weights.
Then four configurations take turns, round after round, so that machine noise hits them
alike, all with the same prompt length, generated length and one thread per process:

- llama.cpp, one process: ``llama-bench -p N -n M -t 1``;
- llama.cpp RPC: ``llama-bench --rpc ... -ngl 99 -ts 1/1/...`` over ``--stages`` RPC
  servers on 127.0.0.1 (each ``-t 1``): every layer, the output layer and the KV cache go
  to the servers in even shares of layers (SmolLM2 on 4: 8, 8, 8, 6 + output); the local
  process keeps only the token embeddings (checked in one verbose run first);
- lime-mqtt's engine in one process (bench/tpot.py's ``engine_runner``);
- lime-mqtt with ``--stages`` device agents as separate processes on a local Mosquitto
  (equal split, 1 torch thread each).

The prompt is a text that tokenizes to exactly ``--prompt-tokens`` ids; both lime-mqtt
configurations must give the same token ids. Medians of ms per output token and of
prompt tokens/s, and the ratios lime single / llama.cpp single and lime stages /
llama.cpp RPC, are printed and written to bench/results/peers.json.

    .venv/bin/python bench/peers.py [--rounds 3] [--prompt-tokens 128] [--tokens 64] [--stages 4]
    .venv/bin/python bench/peers.py --build-only        # just build llama.cpp and convert the model
    .venv/bin/python bench/peers.py --cache DIR          # build into DIR instead of the default

The first run downloads the sdist (pip), builds llama.cpp (5-11 minutes on two cores) and
converts the model (under half a minute); later runs find them in the cache.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tpot import engine_runner, interleaved_rounds

from lime_mqtt.cli.cluster import DeviceSpec, ProcessCluster
from lime_mqtt.client import ask_final
from lime_mqtt.model.builtin import resolve_model
from lime_mqtt.transport.mosquitto import LocalBroker

LLAMA_CPP_PYTHON = "0.3.36"
DEFAULT_CACHE = Path.home() / ".cache" / "lime-mqtt" / "peers" / f"llama.cpp-{LLAMA_CPP_PYTHON}"
CMAKE_OPTIONS = [
    "-DGGML_RPC=ON", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DCMAKE_BUILD_TYPE=Release",
]
RPC_TARGETS = ("rpc-server", "ggml-rpc-server")  # the name changed between llama.cpp versions
# Any long plain text will do: it is cut to the prompt length in tokens.
TEXT = (
    "A closed cooling loop moves heat from a machine to a cooler with a pump, pipes, a heat exchanger and an "
    "expansion vessel. When the pressure in such a loop falls, the cause is most often a leak: a fitting that "
    "has worked loose, a cracked hose, a worn pump seal or a corroded joint in the heat exchanger. Air in the "
    "loop is the next suspect, since trapped air compresses and makes the pressure swing as the pump runs. An "
    "expansion vessel whose membrane has failed or whose pre-charge has been lost cannot take up the changes in "
    "volume as the coolant warms and cools, so the pressure drops when the loop is cold. A pump that cavitates "
    "because its inlet pressure is too low also loses head, which the gauges show as a drop on the outlet side. "
    "Finally, a relief valve that opens too early or does not close again lets coolant out of the loop. A good "
    "check starts with the pressure gauge readings, cold and warm, then looks for wet spots and white deposits "
    "along the pipes, bleeds the air at the high points, checks the pre-charge of the expansion vessel with the "
    "loop empty, and listens to the pump for the crackling noise of cavitation. Each of these steps takes only "
    "a few minutes and rules out one cause after the other, so that the repair can start with the right part. "
) * 4


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_logged(cmd: list[str], logfile: Path, what: str, env: dict[str, str] | None = None,
               cwd: Path | None = None, poll_s: float = 15.0) -> None:
    """Run ``cmd`` with its output in ``logfile``, printing progress (its last line) every
    ``poll_s``; raise with the log's tail if it fails."""
    started = time.monotonic()
    log(f"{what}: {' '.join(cmd)}  (log: {logfile})")
    with logfile.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
        try:
            while True:
                try:
                    proc.wait(timeout=poll_s)
                    break
                except subprocess.TimeoutExpired:
                    last = _last_line(logfile)
                    log(f"{what}: {time.monotonic() - started:.0f} s  {last[:100]}")
        finally:
            if proc.poll() is None:
                _kill_group(proc)
    if proc.returncode:
        tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{what} failed (exit {proc.returncode}); the end of {logfile}:\n{tail}")
    log(f"{what}: done in {time.monotonic() - started:.0f} s")


def _last_line(path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = path.read_bytes()[-4000:].decode(errors="replace").replace("\r", "\n").splitlines()
        lines = [line.strip() for line in lines if line.strip()]
        if lines:
            return lines[-1]
    return ""


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    """End ``proc`` and whatever it started (it runs in its own session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def build_llama_cpp(cache: Path) -> dict[str, Path]:
    """Download, unpack and build llama.cpp in ``cache``, skipping the steps already done;
    the paths of ``llama-bench``, the RPC server and ``convert_hf_to_gguf.py``."""
    started = time.monotonic()
    cache.mkdir(parents=True, exist_ok=True)
    source = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    tree, build = source / "vendor" / "llama.cpp", cache / "build"
    bench, rpc = build / "bin" / "llama-bench", None
    for name in RPC_TARGETS:
        if (build / "bin" / name).exists():
            rpc = build / "bin" / name
    if bench.exists() and rpc is not None:
        log(f"llama.cpp: built already in {build}")
        return {"llama-bench": bench, "rpc-server": rpc, "convert": tree / "convert_hf_to_gguf.py"}
    missing = [tool for tool in ("cmake", "cc", "c++") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"building llama.cpp needs {', '.join(missing)}: install them first "
                         "(Debian: apt-get install -y cmake build-essential)")

    if not (tree / "CMakeLists.txt").exists():
        sdists = sorted(cache.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
        if not sdists:
            run_logged([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(cache)],
                       cache / "download.log", "download llama-cpp-python sdist")
            sdists = sorted(cache.glob("llama_cpp_python-*.tar.gz"))
            if not sdists:
                raise RuntimeError(f"pip download left no llama_cpp_python-*.tar.gz in {cache}")
        log(f"unpack {sdists[-1].name}")
        with tarfile.open(sdists[-1]) as tar:
            tar.extractall(cache, filter="tar")
        if not (tree / "CMakeLists.txt").exists():
            raise RuntimeError(f"the sdist has no {tree.relative_to(cache)}/CMakeLists.txt")
    else:
        log(f"llama.cpp source: unpacked already in {tree}")

    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    if not (build / "CMakeCache.txt").exists():
        run_logged(["cmake", "-S", str(tree), "-B", str(build), *generator, *CMAKE_OPTIONS],
                   cache / "configure.log", "cmake configure")
    else:
        log(f"cmake: configured already in {build}")
    targets = subprocess.run(["cmake", "--build", str(build), "--target", "help"], capture_output=True,
                             text=True, check=True).stdout
    names = {m.group(1) for m in re.finditer(r"^(?:\.\.\. )?([\w.-]+)(?::|\s|$)", targets, re.M)}
    rpc_target = next((t for t in RPC_TARGETS if t in names), None)
    if rpc_target is None or "llama-bench" not in names:
        raise RuntimeError(f"no target llama-bench or {' / '.join(RPC_TARGETS)} in {build}: is GGML_RPC on?")
    log(f"the RPC server's target is {rpc_target}")
    jobs = str(os.cpu_count() or 1)
    run_logged(["cmake", "--build", str(build), "--target", "llama-bench", rpc_target, "-j", jobs],
               cache / "build.log", "cmake build")
    rpc = build / "bin" / rpc_target
    for path in (bench, rpc):
        if not path.exists():
            raise RuntimeError(f"the build made no {path}")
    log(f"llama.cpp: ready in {time.monotonic() - started:.0f} s")
    return {"llama-bench": bench, "rpc-server": rpc, "convert": tree / "convert_hf_to_gguf.py"}


def convert_to_gguf(convert: Path, folder: Path, out: Path) -> Path:
    """The safetensors ``folder`` as an F32 GGUF at ``out`` (once; cached)."""
    if out.exists():
        log(f"GGUF: converted already, {out}")
        return out
    missing = []
    for module in ("sentencepiece", "numpy", "torch", "transformers"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise SystemExit(f"convert_hf_to_gguf.py needs {', '.join(missing)}: "
                         f"{sys.executable} -m pip install {' '.join(missing)}")
    partial = out.with_suffix(".part")
    # The converter puts the tree's own gguf-py first on sys.path (unless NO_LOCAL_GGUF is set).
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    run_logged([sys.executable, str(convert), str(folder), "--outtype", "f32", "--outfile", str(partial)],
               out.parent / "convert.log", "convert to F32 GGUF", env=env)
    partial.rename(out)
    return out


try:  # looked up here, not between fork and exec
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when this script dies, even by SIGKILL."""
    if _prctl is not None:
        _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    """Whether a socket listens on ``port`` (read from /proc: a test connection would be a client)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                return True
    return False


@contextlib.contextmanager
def rpc_servers(binary: Path, count: int, threads: int, log_dir: Path, timeout_s: float = 30.0) -> Iterator[list[str]]:
    """``count`` RPC servers on 127.0.0.1, each on its own port with ``threads`` threads;
    their ``host:port`` while the block runs; all stopped after it, whatever happens."""
    procs: list[subprocess.Popen[bytes]] = []
    endpoints: list[str] = []
    try:
        for i in range(count):
            port = free_port()
            logfile = log_dir / f"rpc-server-{i}.log"
            with logfile.open("wb") as out:
                procs.append(subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port), "-t", str(threads)],
                                              stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              start_new_session=True, preexec_fn=_die_with_parent))
            endpoints.append(f"127.0.0.1:{port}")
        deadline = time.monotonic() + timeout_s
        for i, (proc, endpoint) in enumerate(zip(procs, endpoints, strict=True)):
            logfile = log_dir / f"rpc-server-{i}.log"
            while not _listening(int(endpoint.rsplit(":", 1)[1])):  # its log is block-buffered
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"RPC server {i} did not start on {endpoint} (exit {proc.poll()}): "
                                       f"{logfile.read_text(errors='replace')[-2000:]}")
                time.sleep(0.1)
        log(f"{count} RPC servers ({threads} thread(s) each) on {', '.join(endpoints)}")
        yield endpoints
    finally:
        for proc in procs:
            if proc.poll() is None:
                _kill_group(proc)


class AnyTokens:
    """What a llama-bench run gives for token ids: it generates from random tokens and
    samples nothing, so there is nothing to compare; equal to any list, so that
    ``interleaved_rounds`` checks the tokens of the lime-mqtt configurations only."""

    def __eq__(self, other: object) -> bool:
        return True

    def __ne__(self, other: object) -> bool:
        return False

    def __bool__(self) -> bool:  # never the reference that the others are held to
        return False

    __hash__ = None  # type: ignore[assignment]


def llama_bench(binary: Path, gguf: Path, prompt: int, tokens: int, extra: list[str], logfile: Path,
                repetitions: int = 1, timeout_s: float = 600.0) -> list[dict[str, Any]]:
    """One llama-bench run (``-o json``): its result rows; its stderr is appended to ``logfile``."""
    cmd = [str(binary), "-m", str(gguf), "-p", str(prompt), "-n", str(tokens), "-t", str(THREADS),
           "-r", str(repetitions), "-o", "json", *extra]
    with logfile.open("a") as err:
        err.write(f"\n$ {' '.join(cmd)}\n")
        err.flush()
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True,
                              timeout=timeout_s, preexec_fn=_die_with_parent)
    if done.returncode:
        raise RuntimeError(f"llama-bench failed (exit {done.returncode}): {' '.join(cmd)}; see {logfile}:\n"
                           + "\n".join(logfile.read_text(errors="replace").splitlines()[-20:]))
    rows = json.loads(done.stdout)
    if not isinstance(rows, list) or not rows:
        raise RuntimeError(f"llama-bench printed no results: {done.stdout[:500]!r}")
    return rows


def llama_runner(binary: Path, gguf: Path, prompt: int, tokens: int, extra: list[str], logfile: Path,
                 pp_tps: list[float]) -> Callable[[], tuple[float, Any]]:
    """llama-bench's tg test as ms per token (1000 / tokens per second); the pp test's
    tokens per second are appended to ``pp_tps``."""

    def run() -> tuple[float, Any]:
        rows = llama_bench(binary, gguf, prompt, tokens, extra, logfile)
        tg = next(r for r in rows if r["n_gen"] == tokens and r["n_prompt"] == 0)
        pp = next(r for r in rows if r["n_prompt"] == prompt and r["n_gen"] == 0)
        pp_tps.append(float(pp["avg_ts"]))
        return 1000.0 / float(tg["avg_ts"]), AnyTokens()

    return run


def check_rpc_split(binary: Path, gguf: Path, extra: list[str], endpoints: list[str], logfile: Path) -> dict[str, Any]:
    """Where llama.cpp puts the model with ``extra`` (one short verbose run): the layers of
    each device, and each buffer's size. Raises unless every layer is on an RPC server and
    each server has some."""
    before = logfile.stat().st_size if logfile.exists() else 0
    llama_bench(binary, gguf, 8, 1, [*extra, "-v", "--no-warmup"], logfile)
    text = logfile.read_text(errors="replace")[before:]
    layers: dict[str, list[int]] = {}
    for m in re.finditer(r"layer\s+(\d+) assigned to device (\S+?),", text):
        layers.setdefault(m.group(2), []).append(int(m.group(1)))
    buffers: dict[str, float] = {}  # the largest of the run's contexts (one per test)
    for m in re.finditer(r"(\S+) (model|KV|compute) buffer size\s*=\s*([\d.]+) MiB", text):
        key = f"{m.group(1)} {m.group(2)}"
        buffers[key] = max(buffers.get(key, 0.0), float(m.group(3)))
    offloaded = re.search(r"offloaded (\d+)/(\d+) layers to GPU", text)
    # Layer index n_layer is llama.cpp's "output layer" (final norm and lm head); the token
    # embeddings always stay on the local CPU (its CPU_Mapped model buffer).
    output = max((i for v in layers.values() for i in v), default=None)
    split = {"layers_by_device": {d: _ranges([i for i in v if i != output]) for d, v in layers.items()},
             "output_layer_on": next((d for d, v in layers.items() if output in v), None),
             "buffers_mib": dict(sorted(buffers.items())), "offloaded": offloaded.group(0) if offloaded else None}
    on_rpc = {d for d in layers if d.startswith("RPC")}
    if not offloaded or offloaded.group(1) != offloaded.group(2):
        raise RuntimeError(f"llama.cpp did not offload every layer to the RPC servers: {split}")
    if layers and (len(on_rpc) != len(endpoints) or set(layers) != on_rpc):
        raise RuntimeError(f"the layers are not all on the {len(endpoints)} RPC servers: {split}")
    return split


def _ranges(values: list[int]) -> str:
    values = sorted(set(values))
    return f"{values[0]}-{values[-1]} ({len(values)})" if values else ""


def prompt_text(tokenizer: Any, count: int) -> tuple[str, list[int]]:
    """A text that the tokenizer turns into exactly ``count`` ids (as the coordinator will),
    and those ids."""
    ids = tokenizer(TEXT)["input_ids"]
    if len(ids) < count + 8:
        raise SystemExit(f"the built-in text gives only {len(ids)} tokens; --prompt-tokens {count} is too many")
    special = len(tokenizer("a")["input_ids"]) - len(tokenizer("a", add_special_tokens=False)["input_ids"])
    for cut in range(count - special, count - special + 8):  # a cut inside a word may tokenize differently
        text = tokenizer.decode(ids[:cut], skip_special_tokens=True)
        again = tokenizer(text)["input_ids"]
        if len(again) == count:
            return text, [int(i) for i in again]
    raise RuntimeError(f"found no cut of the text that tokenizes to {count} ids")


def lime_cluster_runner(broker: str, name: str, prompt: str, prompt_tokens: int, tokens: int,
                        pp_tps: list[float]) -> Callable[[], tuple[float, list[int]]]:
    """Like bench/tpot.py's cluster_runner, with this prompt; the time to the first token
    (from the request's arrival at the coordinator) as prompt tokens/s into ``pp_tps``."""

    def run() -> tuple[float, list[int]]:
        request = {"prompt": prompt, "max_tokens": tokens, "stream": False}
        final = asyncio.run(ask_final(broker, name, request))
        if final.get("type") != "final":
            raise RuntimeError(f"{name}: {final}")
        if final["usage"]["prompt_tokens"] != prompt_tokens or len(final["token_ids"]) != tokens:
            raise RuntimeError(f"{name}: {final['usage']} is not {prompt_tokens} prompt tokens and {tokens} tokens")
        pp_tps.append(prompt_tokens * 1000 / final["timings"]["ttft_ms"])
        return final["timings"]["tpot_ms"], final["token_ids"]

    return run


def lime_engine_runner(folder: Path, ids: list[int], tokens: int,
                       pp_tps: list[float]) -> Callable[[], tuple[float, list[int]]]:
    """bench/tpot.py's engine_runner; the prefill (with the first token's argmax) is the run's
    time less the decode steps that it reports, as prompt tokens/s into ``pp_tps``."""
    import torch

    run_engine = engine_runner(folder, torch.tensor([ids]), tokens)

    def run() -> tuple[float, list[int]]:
        started = time.perf_counter()
        ms, out = run_engine()
        prefill_s = time.perf_counter() - started - ms * (tokens - 1) / 1000
        pp_tps.append(len(ids) / prefill_s)
        return ms, out

    return run


THREADS = 1  # per process, everywhere (bench/tpot.py's engine_runner runs at 1 torch thread)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def main() -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as every lime-mqtt process (see bench/tpot.py)
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop servers and cluster
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="a built-in model of lime_mqtt.model.builtin")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=64, help="generated tokens per run")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds, after one warm-up round")
    parser.add_argument("--stages", type=int, default=4, help="RPC servers, and lime-mqtt device agents")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help=f"where llama.cpp is built and the GGUF kept (default {DEFAULT_CACHE})")
    parser.add_argument("--build-only", action="store_true", help="build llama.cpp, convert the model, stop")
    parser.add_argument("--out", default="bench/results/peers.json")
    args = parser.parse_args()
    if args.tokens < 2 or args.prompt_tokens < 1 or args.stages < 1 or args.rounds < 1:
        parser.error("--tokens must be at least 2, and --prompt-tokens, --stages and --rounds at least 1")

    started = time.monotonic()
    tools = build_llama_cpp(args.cache.expanduser())
    build_s = time.monotonic() - started
    folder = resolve_model(args.model)
    gguf = convert_to_gguf(tools["convert"], folder, args.cache.expanduser() / f"{args.model}-f32.gguf")
    if args.build_only:
        return 0

    from transformers import AutoTokenizer

    prompt, ids = prompt_text(AutoTokenizer.from_pretrained(folder), args.prompt_tokens)
    log(f"prompt: {len(ids)} tokens, {len(prompt)} characters")
    log_dir = Path(tempfile.mkdtemp(prefix="lime-peers-"))
    bench_log = log_dir / "llama-bench.log"
    stages = args.stages
    names = {"lime_single": "lime-mqtt engine, 1 process", "lime_stages": f"lime-mqtt, {stages} stages",
             "llama_single": "llama.cpp, 1 process", "llama_rpc": f"llama.cpp RPC, {stages} servers"}
    pp: dict[str, list[float]] = {name: [] for name in names.values()}
    split_ts = "/".join(["1"] * stages)
    with LocalBroker() as broker, contextlib.ExitStack() as stack:
        endpoints = stack.enter_context(rpc_servers(tools["rpc-server"], stages, THREADS, log_dir))
        rpc_args = ["--rpc", ",".join(endpoints), "-ngl", "99", "-ts", split_ts]
        split = check_rpc_split(tools["llama-bench"], gguf, rpc_args, endpoints, bench_log)
        log(f"llama.cpp RPC split: {split['offloaded']}; layers {split['layers_by_device']}, output layer on "
            f"{split['output_layer_on']}")
        name = "peers"
        devices = [DeviceSpec(f"{name}-dev{i}", 1600 // stages + 100, THREADS) for i in range(stages)]
        procs = stack.enter_context(ProcessCluster(broker.url, name, str(folder), devices, log_dir / name,
                                                   planner_args=("--strategy", "equal")))
        plan = procs.wait_ready()
        if len(plan.stages) != stages:
            raise RuntimeError(f"the plan has {len(plan.stages)} stages, not {stages}: {plan}")
        lime_split = [f"{s.device_id}: layers {s.start}-{s.stop - 1}{' +embed' if s.embed else ''}"
                      f"{' +head' if s.head else ''}" for s in plan.stages]
        log(f"lime-mqtt plan: {lime_split}")
        runners: dict[str, Callable[[], tuple[float, Any]]] = {
            names["lime_single"]: lime_engine_runner(folder, ids, args.tokens, pp[names["lime_single"]]),
            names["lime_stages"]: lime_cluster_runner(broker.url, name, prompt, len(ids), args.tokens,
                                                      pp[names["lime_stages"]]),
            names["llama_single"]: llama_runner(tools["llama-bench"], gguf, args.prompt_tokens, args.tokens, [],
                                                bench_log, pp[names["llama_single"]]),
            names["llama_rpc"]: llama_runner(tools["llama-bench"], gguf, args.prompt_tokens, args.tokens, rpc_args,
                                             bench_log, pp[names["llama_rpc"]]),
        }
        rounds_started = time.monotonic()
        times = interleaved_rounds(runners, args.rounds)
        rounds_s = time.monotonic() - rounds_started
        if times is None:
            return 1

    pp = {n: v[1:] for n, v in pp.items()}  # without the warm-up round, as the times
    summary = [{"configuration": n, "ms_per_token_median": statistics.median(t), "runs_ms": t,
                "prompt_tokens_per_s_median": _median(pp[n]), "prompt_runs_tokens_per_s": pp[n]}
               for n, t in times.items()]

    def ratio(a: str, b: str) -> dict[str, Any]:
        ta, tb = times[names[a]], times[names[b]]
        return {"of": names[a], "to": names[b], "ratio": statistics.median(ta) / statistics.median(tb),
                "per_round_median": statistics.median(x / y for x, y in zip(ta, tb, strict=True))}

    ratios = {"lime_single/llama_single": ratio("lime_single", "llama_single"),
              f"lime_{stages}_stages/llama_rpc_{stages}": ratio("lime_stages", "llama_rpc")}
    print(f"\n{'configuration':32s} {'ms/token (median)':>18s} {'prompt tok/s (median)':>22s}")
    for row in summary:
        pps = row["prompt_tokens_per_s_median"]
        print(f"{row['configuration']:32s} {row['ms_per_token_median']:18.2f} "
              f"{pps if pps is None else f'{pps:.1f}':>22}")
    for key, r in ratios.items():
        print(f"{key:32s} {r['ratio']:.3f} (median of per-round ratios {r['per_round_median']:.3f})")
    report = {
        "model": args.model, "gguf": str(gguf), "llama_cpp_python": LLAMA_CPP_PYTHON,
        "prompt_tokens": len(ids), "tokens": args.tokens, "rounds": args.rounds, "threads_per_process": THREADS,
        "stages": stages, "summary": summary, "ratios": ratios,
        "llama_cpp_rpc": {"args": rpc_args[2:], "endpoints": endpoints, "split": split},
        "lime_plan": lime_split,
        "notes": [
            "llama.cpp ms/token = 1000 / llama-bench tg tokens/s (tg runs from an empty context, pp is a separate "
            "test; both on random tokens); lime-mqtt ms/token = mean step time after the first token, after the "
            f"{len(ids)}-token prompt",
            "lime-mqtt engine prompt tokens/s: the prefill forward (with the first token's argmax); lime-mqtt "
            "stages: prompt tokens / time to first token at the coordinator",
        ],
        "rounds_s": round(rounds_s, 1), "build_or_check_s": round(build_s, 1),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "logs": str(log_dir),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.out}; rounds took {rounds_s:.0f} s; logs in {log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
