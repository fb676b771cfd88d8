"""The Prometheus endpoint (``/metrics``), with the official client library.

The cluster's figures are read from the telemetry the devices and coordinators publish,
at each scrape, by a custom collector: what Prometheus shows is what the telemetry
says (counters are the components' own, since each started). The bridge adds its own
HTTP figures. Metric names are in docs/http.md.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from lime_mqtt.core.messages import GONE_STATES, Histogram
from lime_mqtt.watch import ClusterWatch


def _buckets_s(histogram: Histogram) -> list[tuple[str, float]]:
    """Per-bucket counts in ms as Prometheus' cumulative buckets in seconds."""
    cumulative, out = 0, []
    for bound, count in zip([*histogram.bounds, float("inf")], histogram.counts, strict=True):
        cumulative += count
        out.append(("+Inf" if bound == float("inf") else repr(bound / 1000), float(cumulative)))
    return out


class ClusterCollector(Collector):
    """Device and coordinator figures from the watch's latest telemetry."""

    def __init__(self, watch: ClusterWatch) -> None:
        self.watch = watch

    def collect(self) -> Iterator[Metric]:
        view = self.watch.view
        device = ["device"]

        def gauge(name: str, doc: str, labels: list[str] = device) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"lime_{name}", doc, labels=labels)

        def counter(name: str, doc: str, labels: list[str] = device) -> CounterMetricFamily:
            return CounterMetricFamily(f"lime_{name}", doc, labels=labels)

        up = gauge("device_up", "1 while the device is a member of the cluster (not offline or in error)")
        budget = gauge("device_memory_budget_bytes", "the device's memory budget for weights and KV cache")
        rss = gauge("device_rss_bytes", "the device process's resident memory")
        kv = gauge("device_kv_tokens", "tokens of KV cache the device holds, all sequences")
        sequences = gauge("device_kv_sequences", "sequences whose KV cache the device holds")
        queue = gauge("device_queue_depth", "messages waiting in the device's work queue")
        busy = gauge("device_busy_ratio", "share of the time between its last two reports the device computed")
        speed = gauge("device_steps_per_second", "steps (tokens of one sequence) run per second, lately")
        steps = counter("device_steps", "steps run")
        compute = counter("device_compute_seconds", "time spent computing layers")
        duplicates = counter("device_duplicate_steps", "late copies of steps dropped")
        impostors = counter("device_impostor_steps", "steps dropped: not from the sender the plan puts first")
        adaptations = counter("device_adaptations", "memory adaptations (layers streamed or held again)")
        for device_id, status in view.devices.items():
            up.add_metric([device_id], 0.0 if status.state in GONE_STATES else 1.0)
            budget.add_metric([device_id], status.memory_mb * 1024 * 1024)
            telemetry = view.telemetry.get(device_id)
            if telemetry is None:
                continue
            rss.add_metric([device_id], telemetry.rss_mb * 1024 * 1024)
            kv.add_metric([device_id], telemetry.kv_tokens)
            sequences.add_metric([device_id], telemetry.kv_sequences)
            queue.add_metric([device_id], telemetry.queue_depth)
            steps.add_metric([device_id], telemetry.steps_done)
            compute.add_metric([device_id], telemetry.compute_s)
            duplicates.add_metric([device_id], telemetry.duplicates)
            impostors.add_metric([device_id], telemetry.impostors)
            adaptations.add_metric([device_id], telemetry.adaptations)
            if (rate := self.watch.rates.get(device_id)) is not None:
                busy.add_metric([device_id], rate.busy)
                speed.add_metric([device_id], rate.steps_per_s)
        yield from (up, budget, rss, kv, sequences, queue, busy, speed, steps, compute, duplicates, impostors,
                    adaptations)

        coordinator = ["coordinator"]
        running = gauge("requests_running", "requests generating now", coordinator)
        waiting = gauge("requests_waiting", "requests waiting for a slot or KV-cache room", coordinator)
        served = counter("requests", "requests that ended, answered or not", coordinator)
        answered = counter("requests_answered", "requests answered in full", coordinator)
        errors = counter("request_errors", "requests that ended in an error, by code", ["coordinator", "code"])
        replays = counter("replays", "token histories replayed on a new plan", coordinator)
        chunks = counter("prefill_chunks", "leading chunks of long prompts, each sent as its own step", coordinator)
        prompt = counter("prompt_tokens", "prompt tokens of answered requests", coordinator)
        completion = counter("completion_tokens", "tokens generated for answered requests", coordinator)
        ttft = HistogramMetricFamily("lime_time_to_first_token_seconds", "from a request's arrival to its "
                                     "first token", labels=coordinator)
        tpot = HistogramMetricFamily("lime_time_per_output_token_seconds", "mean time per token after the "
                                     "first, per request", labels=coordinator)
        for name, figures in view.coordinator_telemetry.items():
            running.add_metric([name], figures.running)
            waiting.add_metric([name], figures.waiting)
            served.add_metric([name], figures.served)
            answered.add_metric([name], figures.answered)
            for code, count in figures.errors.items():
                errors.add_metric([name, code], count)
            replays.add_metric([name], figures.replays)
            chunks.add_metric([name], figures.prefill_chunks)
            prompt.add_metric([name], figures.prompt_tokens)
            completion.add_metric([name], figures.completion_tokens)
            ttft.add_metric([name], _buckets_s(figures.ttft_ms), figures.ttft_ms.sum / 1000)
            tpot.add_metric([name], _buckets_s(figures.tpot_ms), figures.tpot_ms.sum / 1000)
        yield from (running, waiting, served, answered, errors, replays, chunks, prompt, completion, ttft, tpot)

        epoch = GaugeMetricFamily("lime_plan_epoch", "the current plan's epoch (0: no plan)")
        epoch.add_metric([], view.plan.epoch if view.plan else 0)
        stages = GaugeMetricFamily("lime_plan_stages", "stages of the current plan")
        stages.add_metric([], len(view.plan.stages) if view.plan else 0)
        yield from (epoch, stages)


class BridgeMetrics:
    """The registry ``/metrics`` serves: the cluster's figures and the bridge's own."""

    def __init__(self, watch: ClusterWatch) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(ClusterCollector(watch))
        self.http_requests = Counter("lime_http_requests", "HTTP API calls, by endpoint and status",
                                     ["endpoint", "status"], registry=self.registry)
        self.http_in_flight = Gauge("lime_http_in_flight", "API calls being answered now", registry=self.registry)
