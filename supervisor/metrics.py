"""Prometheus metrics of ksleepd (GET /metrics on the HTTP face)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ksleep.worker.names import STATES, state_name

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """Event metrics are observed as they happen; gauges and totals are read from the lifecycle at scrape."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.wake_seconds = Histogram("ksleep_wake_seconds", "Duration of wakes", buckets=_LATENCY, registry=self.registry)
        self.sleep_seconds = Histogram("ksleep_sleep_seconds", "Duration of sleeps", buckets=_LATENCY, registry=self.registry)
        self.ttft_seconds = Histogram("ksleep_ttft_seconds", "Request arrival to first token, wake included",
                                      buckets=_LATENCY, registry=self.registry)
        self.request_seconds = Histogram("ksleep_request_seconds", "Request arrival to last token",
                                         buckets=_LATENCY, registry=self.registry)
        self.tokens = Counter("ksleep_generated_tokens", "Tokens generated", registry=self.registry)
        self.errors = Counter("ksleep_request_errors", "Requests that ended with an error, by status code",
                              ["code"], registry=self.registry)
        self._collector: _LifecycleCollector | None = None

    def watch(self, lifecycle) -> None:
        """Report `lifecycle`'s gauges and totals (one collector for every model, labelled `model`)."""
        if self._collector is None:
            self._collector = _LifecycleCollector()
            self.registry.register(self._collector)
        self._collector.lifecycles.append(lifecycle)

    def error(self, code_name: str) -> None:
        self.errors.labels(code=code_name).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _LifecycleCollector:
    def __init__(self):
        self.lifecycles: list = []

    def collect(self):
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for lc in self.lifecycles:
            now, model = lc.snapshot(), lc.config.name  # every figure of a model from one reading

            def add(kind, name: str, doc: str, value: float, **extra: str) -> None:
                if name not in families:
                    families[name] = kind(name, doc, labels=["model", *extra])
                families[name].add_metric([model, *extra.values()], value)

            current = state_name(now.state)
            for state in STATES:
                add(GaugeMetricFamily, "ksleep_state", "1 for the model's current state", 1.0 if state == current else 0.0,
                    state=state)
            for name, (doc, value) in _gauges(now).items():
                add(GaugeMetricFamily, name, doc, value)
            for name, doc, value in (("ksleep_sleeps", "Sleeps", now.sleeps_total), ("ksleep_wakes", "Wakes", now.wakes_total),
                                     ("ksleep_worker_restarts", "Workers restarted after dying", now.restarts),
                                     ("ksleep_weight_updates", "UpdateWeights applied", now.weights.number)):
                add(CounterMetricFamily, name, doc, value)
        yield from families.values()


def _gauges(now) -> dict[str, tuple[str, float]]:
    latest, info = now.latest, now.worker_info
    gauges = {
        "ksleep_sleep_level": ("Sleep level (0 when awake)", now.sleep_level),
        "ksleep_in_flight_requests": ("Generate calls streaming or waiting", now.in_flight),
        "ksleep_device_total_bytes": ("Device memory", info.memory.device_total_bytes if info else 0),
        "ksleep_pool_bytes": ("The shared-memory weight pool", now.pool_bytes),
        "ksleep_weight_bytes": ("The model's weights", info.memory.weight_bytes if info else 0),
    }
    if latest is not None and latest.device_used is not None:  # absent while readings fail
        gauges["ksleep_device_used_bytes"] = ("Device memory used, device-wide", latest.device_used)
    if latest is not None and latest.worker_device is not None:
        gauges["ksleep_worker_device_bytes"] = ("The worker process's device memory", latest.worker_device)
    batch = now.batch
    if batch is not None:
        gauges.update({
            "ksleep_requests_running": ("Requests in the worker's batch", batch.running),
            "ksleep_requests_waiting": ("Requests queued for the batch or for KV cache room", batch.waiting),
            "ksleep_kv_cache_bytes": ("Device bytes of the batch KV cache, mapped or not", batch.kv_cache_bytes),
            "ksleep_kv_cache_mapped_bytes": ("Device bytes of the KV cache on the device now (mapped as requests "
                                             "need it; none while asleep)", batch.kv_mapped_bytes),
            "ksleep_kv_cache_tokens": ("Positions the KV cache holds", batch.kv_cache_tokens),
            "ksleep_kv_cache_usage": ("Share of the KV cache reserved by running requests",
                                      batch.kv_used_tokens / batch.kv_cache_tokens if batch.kv_cache_tokens else 0.0),
        })
    return gauges
