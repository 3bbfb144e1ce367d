"""Prometheus metrics of ksleepd (GET /metrics on the HTTP face)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ksleep.v1 import common_pb2 as S

from ksleep.worker.names import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, STATES, state_name

VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                     40.0, 80.0, 160.0, 640.0, 2560.0)
VLLM_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
VLLM_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                        480.0, 960.0, 1920.0, 7680.0)
VLLM_FINISH = {FINISH_EOS: "stop", FINISH_STOP: "stop", FINISH_LENGTH: "length"}  # vLLM's FinishReason words
# vllm:engine_sleep_state: awake; weights_offloaded = its level 1 (weights in host memory); discard_all = level 2
VLLM_SLEEP_STATES = ("awake", "weights_offloaded", "discard_all")
VLLM_SLEEP_DOC = ("Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is awake; "
                  "weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.")
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
        # vLLM's names, labels and buckets (vllm/v1/metrics/loggers.py), so that its dashboards and routers read
        # ksleep as they read vLLM: one engine ("0") per model
        labels = ["model_name", "engine"]
        self.vllm_ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                                   labels, buckets=VLLM_TTFT_BUCKETS, registry=self.registry)
        self.vllm_itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                                  labels, buckets=VLLM_ITL_BUCKETS, registry=self.registry)
        self.vllm_e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                                  labels, buckets=VLLM_LATENCY_BUCKETS, registry=self.registry)
        self.vllm_prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", labels,
                                          registry=self.registry)
        self.vllm_generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.",
                                              labels, registry=self.registry)
        self.vllm_success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                    [*labels, "finished_reason"], registry=self.registry)

    def watch(self, lifecycle) -> None:
        """Report `lifecycle`'s gauges and totals (one collector for every model, labelled `model`)."""
        if self._collector is None:
            self._collector = _LifecycleCollector()
            self.registry.register(self._collector)
        self._collector.lifecycles.append(lifecycle)

    def request_done(self, model: str, ttft: float, total: float, gaps: list[float], prompt_tokens: int,
                     completion_tokens: int, finish: str | None, replica: int = 0) -> None:
        """A request that ended with its last token (measured in ksleepd: arrival to first and last token)."""
        self.ttft_seconds.observe(ttft)
        self.request_seconds.observe(total)
        self.tokens.inc(completion_tokens)
        engine = (model, str(replica))
        self.vllm_ttft.labels(*engine).observe(ttft)
        self.vllm_e2e.labels(*engine).observe(total)
        itl = self.vllm_itl.labels(*engine)
        for gap in gaps:
            itl.observe(gap)
        self.vllm_prompt_tokens.labels(*engine).inc(prompt_tokens)
        self.vllm_generation_tokens.labels(*engine).inc(completion_tokens)
        self.vllm_success.labels(*engine, VLLM_FINISH.get(finish, "stop")).inc()

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

            replica = str(lc.replica)

            def add(kind, name: str, doc: str, value: float, **extra: str) -> None:
                if name not in families:
                    families[name] = kind(name, doc, labels=["model", "replica", *extra])
                families[name].add_metric([model, replica, *extra.values()], value)

            def vllm(kind, name: str, doc: str, value: float, **extra: str) -> None:
                if name not in families:
                    families[name] = kind(name, doc, labels=["model_name", "engine", *extra])
                families[name].add_metric([model, replica, *extra.values()], value)

            current = state_name(now.state)
            for state in STATES:
                add(GaugeMetricFamily, "ksleep_state", "1 for the model's current state", 1.0 if state == current else 0.0,
                    state=state)
            for name, (doc, value) in _gauges(now).items():
                add(GaugeMetricFamily, name, doc, value)
            awake = now.state == S.STATE_AWAKE
            level = 0 if awake else max(1, now.sleep_level)
            for state, on in zip(VLLM_SLEEP_STATES, (awake, not awake and level == 1, not awake and level >= 2)):
                vllm(GaugeMetricFamily, "vllm:engine_sleep_state", VLLM_SLEEP_DOC, 1.0 if on else 0.0, sleep_state=state)
            batch = now.batch
            vllm(GaugeMetricFamily, "vllm:num_requests_running", "Number of requests in model execution batches.",
                 batch.running if batch is not None else 0)
            # queued for the batch, or (not yet in the worker) for a wake
            vllm(GaugeMetricFamily, "vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                 max(batch.waiting, now.in_flight - batch.running) if batch is not None else now.in_flight)
            vllm(GaugeMetricFamily, "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                 batch.kv_used_tokens / batch.kv_cache_tokens if batch is not None and batch.kv_cache_tokens else 0.0)
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
