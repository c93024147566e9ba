"""Prometheus metrics, owned by the app (one registry per app, no module globals).

Request counts by endpoint and status come from the HTTP middleware; latency histograms and token counters
from the engine bridge, per request; the engine's state (running and waiting requests, KV-cache use per pool,
prefix-cache hit rate, preemptions, failed steps) is read when Prometheus scrapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engine.core import EngineCore

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5)


class _EngineCollector(Collector):
    def __init__(self, engine: Callable[[], EngineCore | None]) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        engine = self.engine()
        if engine is None:
            return
        # The engine's last snapshot: a scrape never waits for a step nor reads the engine's live state.
        stats = engine.stats()
        yield GaugeMetricFamily(
            "gpt_oss_requests_running", "Requests in the running batch.", value=stats.num_running
        )
        yield GaugeMetricFamily(
            "gpt_oss_requests_waiting", "Requests queued for the engine.", value=stats.num_waiting
        )
        yield GaugeMetricFamily(
            "gpt_oss_kv_cache_usage_ratio",
            "Share of KV-cache blocks in use in the fuller of the two pools (admission stops at 1).",
            value=stats.kv_cache_usage,
        )
        # Per pool, under a name of its own: the unlabelled ratio above keeps its one series.
        pools = GaugeMetricFamily(
            "gpt_oss_kv_cache_pool_usage_ratio",
            "Share of KV-cache blocks in use, per pool: full attention (whole contexts) and sliding window.",
            labels=["pool"],
        )
        pools.add_metric(["full"], stats.kv_full_usage)
        pools.add_metric(["sliding"], stats.kv_sliding_usage)
        yield pools
        yield CounterMetricFamily(
            "gpt_oss_preemptions",
            "Requests preempted for lack of KV blocks (recomputed later).",
            value=stats.num_preemptions,
        )
        yield CounterMetricFamily(
            "gpt_oss_engine_failed_steps",
            "Engine steps that failed as a whole, ending every request in them.",
            value=stats.num_failed_steps,
        )
        yield GaugeMetricFamily(
            "gpt_oss_prefix_cache_hit_ratio",
            "Prompt tokens served from the prefix cache.",
            value=stats.prefix_cache_hit_rate,
        )


class Metrics:
    def __init__(self, engine: Callable[[], EngineCore | None]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "gpt_oss_http_requests",
            "HTTP requests by endpoint and status.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "gpt_oss_time_to_first_token_seconds",
            "Time to the first output token.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.time_per_output_token = Histogram(
            "gpt_oss_time_per_output_token_seconds",
            "Mean time between output tokens, per request.",
            buckets=_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.e2e_latency = Histogram(
            "gpt_oss_e2e_request_latency_seconds",
            "Time from admission to the last token.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "gpt_oss_prompt_tokens", "Prompt tokens processed.", registry=self.registry
        )
        self.generation_tokens = Counter(
            "gpt_oss_generation_tokens", "Output tokens generated.", registry=self.registry
        )
        self.parse_anomalies = Counter(
            "gpt_oss_harmony_parse_anomalies",
            "Malformed harmony in the model's output that the parser read past (a header read as text, a "
            "stray control token...): rare from the published models, a sign of trouble in a fine-tune.",
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(engine))

    def observe_request(
        self, *, prompt_tokens: int, output_tokens: int, ttft: float | None, e2e: float
    ) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(output_tokens)
        self.e2e_latency.observe(e2e)
        if ttft is not None:
            self.time_to_first_token.observe(ttft)
            if output_tokens > 1:
                self.time_per_output_token.observe((e2e - ttft) / (output_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
