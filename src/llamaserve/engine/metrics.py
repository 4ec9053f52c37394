"""What the engine thread measures for Prometheus: queue wait, time to first token, inter-token latency and
batch sizes, as histograms labelled with the model.

The engine observes them as it steps (prometheus-client's metrics are thread-safe; an observation is a few
microseconds against a step's milliseconds). They belong to no registry until an app registers `collectors`
in its own (an app's registry is per app, so tests may build several).
"""

from __future__ import annotations

from prometheus_client import Histogram
from prometheus_client.registry import Collector

# Seconds: from a millisecond (a gateway-only route, an idle queue) to minutes (a long queue or stream).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
BATCH_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
BATCH_SEQUENCE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)


class EngineMetrics:
    def __init__(self, model_id: str = "") -> None:
        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, ["model"], buckets=buckets, registry=None)

        self._queue_wait = histogram(
            "llamaserve_engine_queue_wait_seconds",
            "Time a sequence waited from submission to the engine until it got a slot",
            LATENCY_BUCKETS,
        )
        self._ttft = histogram(
            "llamaserve_engine_time_to_first_token_seconds",
            "Time from submission to the engine to a sequence's first sampled token",
            LATENCY_BUCKETS,
        )
        self._itl = histogram(
            "llamaserve_engine_inter_token_latency_seconds",
            "Time between two consecutive tokens of one sequence",
            ITL_BUCKETS,
        )
        self._batch_tokens = histogram(
            "llamaserve_engine_batch_tokens", "Tokens in one llama_decode (decode + prompt chunks)", BATCH_TOKEN_BUCKETS
        )
        self._batch_sequences = histogram(
            "llamaserve_engine_batch_sequences", "Sequences in one llama_decode", BATCH_SEQUENCE_BUCKETS
        )
        self.collectors: list[Collector] = [
            self._queue_wait,
            self._ttft,
            self._itl,
            self._batch_tokens,
            self._batch_sequences,
        ]
        # Children resolved once: the label lookup takes a lock and a dict probe the hot path need not pay.
        self.queue_wait = self._queue_wait.labels(model_id)
        self.ttft = self._ttft.labels(model_id)
        self.itl = self._itl.labels(model_id)
        self.batch_tokens = self._batch_tokens.labels(model_id)
        self.batch_sequences = self._batch_sequences.labels(model_id)
