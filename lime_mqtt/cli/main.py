"""The ``lime-mqtt`` command: one subcommand per role, plus ``ask``, ``plan`` and ``demo``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lime_mqtt.cli.progress import terminal_bars
from lime_mqtt.cli.settings import Settings, load_settings
from lime_mqtt.core.errors import ConfigError, LimeError
from lime_mqtt.planning.cost import MIN_LINK_CHUNK, PREFILL_LINK_BUDGET_MS

if TYPE_CHECKING:
    from lime_mqtt.client import Broker

log = logging.getLogger("lime_mqtt")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", help="mqtt://host:port (env LIME_BROKER; default mqtt://127.0.0.1:1883)")
    parser.add_argument("--cluster", help="cluster name (env LIME_CLUSTER; default 'default')")
    parser.add_argument("--model", help="model folder or built-in name: smollm2, tiny (env LIME_MODEL)")
    parser.add_argument("--config", help="settings file (TOML; env LIME_CONFIG)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING (env LIME_LOG_LEVEL; default INFO)")
    parser.add_argument("--username", help="MQTT user name, role/name with a broker folder (env LIME_USERNAME); "
                        "the password comes from --password-file, LIME_PASSWORD or the settings file, never argv")
    parser.add_argument("--password-file", help="a file whose first line is the password (env LIME_PASSWORD_FILE)")
    parser.add_argument("--ca-file", help="the CA that signed the broker's certificate (env LIME_CA_FILE)")
    parser.add_argument("--cert-file", help="a client certificate, for a broker that asks for one (env LIME_CERT_FILE)")
    parser.add_argument("--key-file", help="the client certificate's key (env LIME_KEY_FILE)")
    parser.add_argument("--insecure", action="store_true", default=None,
                        help="allow plaintext mqtt:// to a host that is not this machine (env LIME_INSECURE)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lime-mqtt", description="Run one language model across several devices through an MQTT broker."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from lime_mqtt.cli import broker_cmd  # init, add, rotate, remove, run, insecure-loopback

    broker_cmd.add_parser(sub, _common)

    p = sub.add_parser("planner", help="watch devices and publish the plan")
    _common(p)
    p.add_argument("--name", help="this planner's name: it publishes as planner/NAME (default: its user name's, "
                   "else main)")
    p.add_argument("--quorum", type=int, default=1, help="devices to wait for before the first plan")
    p.add_argument("--standby", action="store_true",
                   help="stand by while another planner is there; take over (from its retained plan) when it goes")
    p.add_argument("--settle", type=float, default=1.0, help="seconds of quiet membership before planning")
    p.add_argument("--heartbeat-timeout", type=float, default=15.0,
                   help="take a planned device that sends no status or telemetry for this many seconds for "
                   "lost (0: only its last will counts)")
    p.add_argument("--trusted-ends", action="store_true",
                   help="put the first stage (it sees token ids) and the last (it chooses them) only on devices "
                   "marked trusted (docs/security.md)")
    p.add_argument("--context-tokens", type=int, default=512,
                   help="KV cache to reserve per sequence, in tokens (default 512)")
    p.add_argument("--sequences", type=int, default=1, help="sequences served at once (default 1)")
    p.add_argument("--objective", choices=["latency", "throughput"], default="latency",
                   help="minimise time per token of one sequence, or the busiest stage's time (bursty load)")
    p.add_argument("--reserve-mb", type=float, default=32.0,
                   help="working memory kept free on every device besides weights and KV cache (default 32)")
    p.add_argument("--no-interleave", action="store_true",
                   help="one contiguous segment per device, even where an interleaved plan is predicted faster")
    p.add_argument("--strategy", choices=["optimal", "memory", "equal"], default="optimal",
                   help="optimal: searched under the cost model; memory/equal: contiguous splits in "
                   "device-id order proportional to memory or even (baselines)")

    p = sub.add_parser("coordinator", help="serve requests from the request topic")
    _common(p)
    p.add_argument("--name", help="this coordinator's name: it answers as coordinator/NAME (default: its user "
                   "name's, else a random one)")
    p.add_argument("--step-timeout", type=float, default=60.0, help="seconds to wait for one step")
    p.add_argument("--step-retry", type=float, default=5.0, help="resend a step with no answer after this")
    p.add_argument("--ready-timeout", type=float, default=30.0, help="seconds a request waits for devices")
    p.add_argument("--replan-timeout", type=float, default=60.0,
                   help="when a device of the plan leaves: seconds requests in flight wait for a new plan "
                   "before they get a 'capacity_lost' error (sooner if the planner says it cannot plan)")
    p.add_argument("--max-concurrent", type=int, default=8,
                   help="requests generated at once (also bounded by the plan's KV capacity)")
    p.add_argument("--max-waiting", type=int, default=1024,
                   help="requests that may wait for a turn; more get an 'overloaded' error")
    p.add_argument("--max-request-bytes", type=int, default=1024 * 1024,
                   help="the largest request message; larger ones get 'request_too_large' (default 1 MiB)")
    p.add_argument("--max-prompt-tokens", type=int,
                   help="the longest prompt, in tokens; longer ones get 'prompt_too_long' (default: the context)")
    p.add_argument("--client-rate", type=float, default=32.0,
                   help="messages per second one client may send, sustained; more are dropped with a "
                   "'rate_limited' error (default 32)")
    p.add_argument("--client-burst", type=int, default=256,
                   help="messages one client may send at once before --client-rate applies (default 256)")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="cut prompts longer than this many tokens into chunks of this size, so that other "
                   "requests' decode steps pass between them (0: never cut)")
    p.add_argument("--prefill-link-ms", type=float, default=PREFILL_LINK_BUDGET_MS,
                   help="cut finer where one chunk's activations would take longer than this to cross the "
                   "slowest link of the plan, as the devices measured it (a power of two of at least "
                   f"{MIN_LINK_CHUNK} tokens; default {PREFILL_LINK_BUDGET_MS:.0f} ms, 0: links do not matter)")
    p.add_argument("--telemetry-interval", type=float, default=5.0,
                   help="seconds between its telemetry reports: requests in flight, errors, latencies")
    p.add_argument("--no-chain", action="store_true",
                   help="send every decode step from the coordinator, instead of the last stage starting the "
                   "next one itself (one more hop per token; docs/architecture.md)")
    p.add_argument("--no-weight-source", action="store_true",
                   help="do not serve the model's tensors to devices that fetch them over MQTT")

    p = sub.add_parser("device", help="run a device agent")
    _common(p)
    p.add_argument("--max-activation-mb", type=float, default=64.0,
                   help="the largest step message (hidden states) this device takes; larger ones are dropped "
                   "unread (default 64)")
    p.add_argument("--device-id", help="unique name of this device (or device_id in the settings file)")
    p.add_argument("--leave-timeout", type=float, default=30.0,
                   help="on SIGTERM: seconds to serve on while the cluster replans without this device")
    p.add_argument("--memory-mb", type=int, help="memory budget for weights and KV cache, above the "
                   "process baseline (or memory_mb in the settings file)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--kv-ttl", type=float, default=600.0, help="free a request's KV cache after this idle time")
    p.add_argument("--telemetry-interval", type=float, default=5.0,
                   help="seconds between telemetry reports (also the device's heartbeat)")
    p.add_argument("--link-interval", type=float, default=30.0,
                   help="measure the link to the broker again this often while serving, seconds (0: never); a "
                        "change is published in the status, and the planner may plan around it")
    p.add_argument("--torch-device", default="cpu",
                   help="cpu: the engine's kernels are CPU code (docs/engine.md); other devices are refused")
    p.add_argument("--no-measure", action="store_true", help="skip measuring compute, disk and link at start")
    p.add_argument("--weights-from-broker", action="store_true",
                   help="this device has no model files: --model names the model (e.g. smollm2-135m-instruct), "
                   "and its config and the tensors of its layers come over MQTT from a weight source, "
                   "cached under $LIME_MQTT_CACHE/received")
    p.add_argument("--serve-weights", action="store_true",
                   help="also be a weight source for devices that fetch theirs over MQTT")
    p.add_argument("--trusted", action="store_true",
                   help="this device may see token ids and text: the planner's --trusted-ends puts the first "
                   "and last stage only on such devices (or trusted = true in the settings file)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="run up to this many (at most 32) sequences' decode steps waiting at this device as one "
                   "batch; a sequence's answer is the same bits alone or in any batch (1: no batching; "
                   "docs/engine.md#batching)")
    p.add_argument("--emulate-layer-delay-ms", type=float, default=0.0,
                   help="benchmarks: make every layer this much slower, as a slower device would be "
                   "(the measurement at start sees it; the planner is not told)")

    p = sub.add_parser("ask", help="send one request and stream the answer")
    _common(p)
    p.add_argument("--client", help="the client name it asks as, client/NAME (default: its user name's, else "
                   "default)")
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[])
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--json", action="store_true", help="print every message as JSON")

    p = sub.add_parser("plan", help="print the current plan as a table")
    _common(p)
    p.add_argument("--explain", action="store_true",
                   help="add each stage's memory and predicted milliseconds per token, and the total")
    p.add_argument("--timeout", type=float, default=5.0)

    p = sub.add_parser("status", help="the plan, the planner's word, coordinators and each device's state")
    _common(p)
    p.add_argument("--wait", type=float, default=6.0,
                   help="seconds to collect telemetry (devices report every 5 s by default; 0: status only)")
    p.add_argument("--json", action="store_true", help="print it as JSON")
    p.add_argument("--watch", action="store_true", help="keep showing it, redrawn as the cluster changes")
    p.add_argument("--interval", type=float, default=1.0, help="with --watch: at most one redraw per this many s")

    p = sub.add_parser("http", help="an OpenAI-compatible API, a live dashboard and /metrics for the cluster")
    _common(p)
    p.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT to serve on (default 127.0.0.1:8080)")
    p.add_argument("--api-keys", metavar="FILE",
                   help="TOML file of API keys, each mapped to a client identity's settings file "
                        "(docs/http.md); without it, calls go out under this command's own identity")
    p.add_argument("--view-config", metavar="FILE",
                   help="settings file of the identity the dashboard and /metrics read the cluster as "
                        "(an operator on a secure broker; default: this command's own)")
    p.add_argument("--allow-open", action="store_true",
                   help="listen beyond loopback without API keys (anyone who reaches the port may ask)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one answer may take")

    p = sub.add_parser("rig", help="a cluster on this machine with each device behind a shaped network link (root)")
    rig = p.add_subparsers(dest="rig_command", required=True)
    up = rig.add_parser("up", help="start it (until Ctrl-C or SIGTERM, then it removes everything)")
    _common(up)
    up.add_argument("--name", default="lab", help="1 to 6 letters or digits (default lab)")
    up.add_argument("--devices", type=int, default=3)
    up.add_argument("--memory-mb", type=int, default=200, help="each device's budget")
    up.add_argument("--up-mbit", type=float, default=100.0, help="each device's upload, Mbit/s")
    up.add_argument("--down-mbit", type=float, default=100.0, help="each device's download, Mbit/s")
    up.add_argument("--rtt-ms", type=float, default=5.0, help="round trip added to each device's link")
    down = rig.add_parser("down", help="remove what a rig left behind (if its `up` was killed)")
    _common(down)
    down.add_argument("--name", default="lab")

    p = sub.add_parser("demo", help="broker, planner, coordinator and devices in one go; asks one question")
    _common(p)
    p.add_argument("--devices", type=int, default=3)
    p.add_argument("--question", default="What is the boiling point of water at sea level? Answer in one sentence.")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--insecure-loopback", action="store_true",
                   help="run an anonymous, plaintext broker on 127.0.0.1 instead of the TLS broker with an "
                   "identity per role (generated on the first run)")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(
        args.config, broker=args.broker, cluster=args.cluster, model=args.model, log_level=args.log_level,
        username=args.username, password_file=args.password_file, ca_file=args.ca_file, cert_file=args.cert_file,
        key_file=args.key_file, insecure=args.insecure,
    )


def _run_service(main: Callable[[], Awaitable[Any]]) -> int:
    """Run ``main`` until it ends or SIGTERM/SIGINT arrives; then let it clean up."""

    async def runner() -> Any:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            return await main()
        except asyncio.CancelledError:
            log.info("stopped by signal")
            return 0

    result = asyncio.run(runner())
    return int(result) if isinstance(result, int) else 0


def _cmd_broker(args: argparse.Namespace, settings: Settings) -> int:
    from lime_mqtt.cli import broker_cmd

    return broker_cmd.run(args, settings)


def _cmd_planner(args: argparse.Namespace, settings: Settings) -> int:
    from lime_mqtt.model.builtin import resolve_model
    from lime_mqtt.planner.service import PlannerService

    service = PlannerService(
        settings.transport(), settings.cluster, resolve_model(settings.model, terminal_bars), quorum=args.quorum,
        settle_s=args.settle, context_tokens=args.context_tokens, sequences=args.sequences,
        objective=args.objective, strategy=args.strategy, reserve_mb=args.reserve_mb,
        interleaving=not args.no_interleave, heartbeat_timeout_s=args.heartbeat_timeout,
        trusted_ends=args.trusted_ends, name=args.name, standby=args.standby,
    )
    return _run_service(service.run)


def _cmd_coordinator(args: argparse.Namespace, settings: Settings) -> int:
    from lime_mqtt.coordinator.service import Coordinator
    from lime_mqtt.core.protocol import Limits
    from lime_mqtt.model.builtin import resolve_model

    if args.prefill_chunk < 0:
        raise ConfigError("--prefill-chunk must be 0 (never cut) or a number of tokens")
    if not math.isfinite(args.prefill_link_ms) or args.prefill_link_ms < 0:
        raise ConfigError("--prefill-link-ms must be 0 (links do not matter) or a number of milliseconds")
    folder = resolve_model(settings.model, terminal_bars)
    try:
        Limits(args.max_request_bytes, args.max_prompt_tokens, args.client_rate, args.client_burst)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None

    async def main() -> None:
        coordinator = Coordinator(
            settings.transport(), settings.cluster, folder, step_timeout_s=args.step_timeout,
            step_retry_s=args.step_retry,
            ready_timeout_s=args.ready_timeout, replan_timeout_s=args.replan_timeout,
            max_concurrent=args.max_concurrent, max_waiting=args.max_waiting, prefill_chunk=args.prefill_chunk,
            prefill_link_ms=args.prefill_link_ms, serve_weights=not args.no_weight_source, name=args.name,
            limits=Limits(args.max_request_bytes, args.max_prompt_tokens, args.client_rate, args.client_burst),
            telemetry_s=args.telemetry_interval, chain=not args.no_chain, freeze_heap=True,
        )
        await coordinator.run()

    return _run_service(main)


def _own_name(settings: Settings, role: str) -> str | None:
    """The name in the settings' user name ``{role}/{name}``, when it is of ``role``."""
    from lime_mqtt.core.topics import Identity

    try:
        identity = Identity.parse(settings.username or "")
    except ValueError:
        return None
    return identity.name if identity.role == role else None


def _cmd_device(args: argparse.Namespace, settings: Settings) -> int:
    from lime_mqtt.device.agent import DeviceAgent
    from lime_mqtt.model.builtin import resolve_model

    device_id = args.device_id or settings.device_id or _own_name(settings, "device")
    memory_mb = args.memory_mb or settings.memory_mb
    if not device_id or not memory_mb:
        raise ConfigError("a device needs --device-id and --memory-mb (or device_id and memory_mb in --config)")
    if args.weights_from_broker:
        from lime_mqtt.model.builtin import received_folder

        folder = received_folder(Path(settings.model).name)
    else:
        folder = resolve_model(settings.model, terminal_bars)

    async def main() -> None:
        agent = DeviceAgent(
            settings.transport(), settings.cluster, device_id, memory_mb, folder,
            kv_ttl_s=args.kv_ttl, telemetry_s=args.telemetry_interval, threads=args.threads or settings.threads,
            torch_device=args.torch_device,
            measure=not args.no_measure, layer_delay_ms=args.emulate_layer_delay_ms, max_batch=args.max_batch,
            fetch_weights=args.weights_from_broker, serve_weights=args.serve_weights,
            trusted=args.trusted or settings.trusted, max_activation_bytes=int(args.max_activation_mb * 1024 * 1024),
            bars=terminal_bars, link_interval_s=args.link_interval, freeze_heap=True,
        )
        try:
            async with asyncio.TaskGroup() as tasks:
                serving = tasks.create_task(agent.run(), name=f"{device_id}-serve")
                leaving: list[asyncio.Task[None]] = []

                async def leave() -> None:
                    await agent.leave(args.leave_timeout)
                    serving.cancel()

                # SIGTERM: leave cleanly (hand the work over, then go); SIGINT (Ctrl-C): go now.
                def on_sigterm() -> None:
                    if not leaving:  # a second SIGTERM does not start a second leave
                        leaving.append(tasks.create_task(leave(), name=f"{device_id}-leave"))

                asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_sigterm)
        except ExceptionGroup as group:
            raise group.exceptions[0] from None  # the agent's own error, for the CLI to report
        log.info("%s stopped", device_id)

    return _run_service(main)


def _request_from_args(args: argparse.Namespace) -> dict[str, Any]:
    request: dict[str, Any] = {
        "max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
        "top_k": args.top_k, "stop": args.stop,
    }
    if args.seed is not None:
        request["seed"] = args.seed
    if args.chat:
        request["messages"] = [{"role": "user", "content": args.prompt}]
    else:
        request["prompt"] = args.prompt
    return request


async def stream_answer(broker: Broker, cluster: str, request: dict[str, Any], timeout_s: float,
                        as_json: bool = False, client: str | None = None) -> int:
    """Print an answer as it streams; return 0 on success, 1 on an error message. Stopped
    (Ctrl-C), it cancels the request, so the devices free its KV cache at once."""
    import uuid

    from lime_mqtt.client import ask, cancel

    request = {"id": f"ask-{uuid.uuid4().hex[:12]}", **request}
    try:
        return await _print_answer(ask(broker, cluster, request, timeout_s=timeout_s, client=client), as_json)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await cancel(broker, cluster, request["id"], client=client)
        raise


async def _print_answer(messages: AsyncIterator[dict[str, Any]], as_json: bool) -> int:
    async for message in messages:
        if as_json:
            print(json.dumps(message), flush=True)
        elif message["type"] == "chunk":
            print(message["text"], end="", flush=True)
        elif message["type"] == "queued":
            print(f"[waiting for KV-cache room: place {message['position']} in the queue]", file=sys.stderr,
                  flush=True)
        elif message["type"] == "final":
            t, u = message["timings"], message["usage"]
            print(f"\n[{message['finish_reason']}: {u['completion_tokens']} tokens, "
                  f"first token {t['ttft_ms']:.0f} ms, {t['tpot_ms']:.1f} ms/token]", flush=True)
        if message["type"] == "error":
            err = message["error"]
            print(f"error {err['code']}: {err['message']}", file=sys.stderr, flush=True)
            return 1
    return 0


def _cmd_ask(args: argparse.Namespace, settings: Settings) -> int:
    return _run_service(
        lambda: stream_answer(settings.transport(), settings.cluster, _request_from_args(args), args.timeout, args.json,
                              args.client)
    )


def _cmd_plan(args: argparse.Namespace, settings: Settings) -> int:
    from lime_mqtt.core.plan import Plan
    from lime_mqtt.core.topics import Topics
    from lime_mqtt.planning.plan import format_plan
    async def main() -> int:
        topics = Topics(settings.cluster)
        async with settings.transport().connection() as conn:
            await conn.subscribe(topics.all_plans)
            try:
                async with asyncio.timeout(args.timeout):
                    async for message in conn.messages():
                        if message.payload:
                            print(format_plan(Plan.from_json(message.payload), explain=args.explain))
                            return 0
            except TimeoutError:
                pass
        print(f"no plan on {topics.all_plans} after {args.timeout:.0f} s", file=sys.stderr)
        return 1

    return _run_service(main)


def _cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from lime_mqtt.cli.status import format_status, gather_status, status_json, watch_status

    if args.watch:
        if args.json:
            raise ConfigError("--watch shows a table; --json prints one snapshot")
        return _run_service(lambda: watch_status(settings.transport(), settings.cluster, args.interval,
                                                 clear=sys.stdout.isatty()))

    async def main() -> int:
        view = await gather_status(settings.transport(), settings.cluster, args.wait)
        if args.json:
            print(json.dumps(status_json(view), indent=2))
        else:
            print(format_status(view))
        return 0

    return _run_service(main)


def _cmd_http(args: argparse.Namespace, settings: Settings) -> int:
    from lime_mqtt.cli.settings import api_keys
    from lime_mqtt.http.service import HttpBridge

    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--listen {args.listen!r}: give HOST:PORT")
    keys = api_keys(args.api_keys, settings) if args.api_keys else None
    view = load_settings(args.view_config, broker=settings.broker, cluster=settings.cluster).transport() \
        if args.view_config else settings.transport()
    bridge = HttpBridge(view, settings.cluster, host=host.strip("[]"), port=int(port), client=settings.transport(),
                        keys=keys, allow_open=args.allow_open, timeout_s=args.timeout)
    return _run_service(bridge.run)


def _cmd_rig(args: argparse.Namespace, settings: Settings) -> int:
    from lime_mqtt.cli.rig import Link, Rig, RigDevice, down_by_name
    from lime_mqtt.model.builtin import resolve_model

    if args.rig_command == "down":
        removed = down_by_name(args.name)
        print("\n".join(removed) if removed else f"rig {args.name}: nothing left to remove")
        return 0
    link = Link(args.up_mbit, args.down_mbit, args.rtt_ms)
    devices = [RigDevice(f"{args.name}-{i}", args.memory_mb, link) for i in range(args.devices)]
    rig = Rig(args.name, str(resolve_model(settings.model, terminal_bars)), devices, cluster=args.cluster)

    def stop_starting(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # Rig.up removes what it made so far, then this ends the command

    signal.signal(signal.SIGTERM, stop_starting)
    plan = rig.up()
    print(f"rig {args.name}: {len(plan.stages)} stages ready; cluster {rig.cluster} on {rig.broker.url}; "
          f"logs in {rig.log_dir}\n{rig.describe()}", flush=True)
    try:
        # Blocked only now: the rig's processes, started already, keep their own signals.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        rig.down()
        print(f"rig {args.name}: removed", flush=True)
    return 0


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from lime_mqtt.cli.demo import run_demo

    return run_demo(settings, devices=args.devices, question=args.question, max_tokens=args.max_tokens,
                    secure=not args.insecure_loopback)


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "broker": _cmd_broker,
    "status": _cmd_status,
    "planner": _cmd_planner,
    "coordinator": _cmd_coordinator,
    "device": _cmd_device,
    "ask": _cmd_ask,
    "plan": _cmd_plan,
    "http": _cmd_http,
    "rig": _cmd_rig,
    "demo": _cmd_demo,
}


def main(argv: list[str] | None = None) -> int:
    # Idle OpenMP threads must sleep, not spin: several lime processes share the cores of
    # a small device, and a spinning idle stage slows the busy one (docs/operations.md).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Weights in 2 MB pages: fewer TLB misses on a memory-bound decode (8% faster here).
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
        # The demo talks to a person on stdout: only warnings from its own process.
        level = "WARNING" if args.command == "demo" and not args.log_level else settings.log_level.upper()
        logging.basicConfig(
            level=level,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        logging.getLogger("httpx").setLevel(logging.WARNING)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        return COMMANDS[args.command](args, settings)
    except LimeError as exc:
        print(f"lime-mqtt {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
