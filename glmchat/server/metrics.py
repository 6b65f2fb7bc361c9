"""The server's metrics in Prometheus' text format (GET /metrics).

Counters and histograms are updated by the engine's thread (tokens, time to first token, time
between tokens) and by the app (requests by HTTP status); gauges (queue, running streams, the
prefix cache) are read from the engine when scraped. Written without a client library: the text
format is a few lines per metric.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
INTER_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def _labels(names: tuple[str, ...], values: tuple) -> str:
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, values)) + "}" if names else ""


class Counter:
    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help, labels
        self._values: dict[tuple, float] = defaultdict(float)
        self._lock = threading.Lock()

    def inc(self, amount: float = 1, *labels) -> None:
        with self._lock:
            self._values[labels] += amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            values = sorted(self._values.items()) or ([((), 0.0)] if not self.label_names else [])
        return lines + [f"{self.name}{_labels(self.label_names, k)} {v:g}" for k, v in values]


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, buckets
        self._counts = [0] * (len(buckets) + 1)  # the last: above every bound
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.buckets, value)] += 1
            self._sum += value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative = 0
        for bound, n in zip((*self.buckets, "+Inf"), counts):
            cumulative += n
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {cumulative}')
        return lines + [f"{self.name}_sum {total:g}", f"{self.name}_count {cumulative}"]


def _sample(kind: str, name: str, help: str, value: float) -> list[str]:
    """One metric of one value read at scrape time (a gauge, or a counter kept elsewhere)."""
    return [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {value:g}"]


class Metrics:
    def __init__(self):
        self.requests = Counter("glmchat_requests_total", "HTTP requests to /v1/ answered, by status code.", ("status",))
        self.prompt_tokens = Counter("glmchat_prompt_tokens_total", "Prompt tokens of requests that started generating.")
        self.generation_tokens = Counter("glmchat_generation_tokens_total", "Tokens generated.")
        self.ttft = Histogram("glmchat_time_to_first_token_seconds",
                              "From a request's arrival at the engine to its first token.", TTFT_BUCKETS)
        self.inter_token = Histogram("glmchat_inter_token_seconds",
                                     "Between two consecutive tokens of one request.", INTER_TOKEN_BUCKETS)

    def render(self, engine) -> str:
        prefix = engine.prefix
        lines = [
            *self.requests.render(), *self.prompt_tokens.render(), *self.generation_tokens.render(),
            *self.ttft.render(), *self.inter_token.render(),
            *_sample("gauge", "glmchat_queued_requests", "Requests waiting for their first token.", engine.queued),
            *_sample("gauge", "glmchat_running_requests", "Requests generating (rows of the decode batch).",
                     engine.running),
            *_sample("gauge", "glmchat_prefix_cache_bytes", "Memory held by the prefix cache.", prefix.bytes),
            *_sample("counter", "glmchat_prefix_cache_prompt_tokens_total", "Prompt tokens looked up in the prefix cache.",
                     prefix.prompt_tokens),
            *_sample("counter", "glmchat_prefix_cache_hit_tokens_total", "Prompt tokens served from the prefix cache.",
                     prefix.hit_tokens),
            *_sample("gauge", "glmchat_prefix_cache_hit_rate", "Share of looked-up prompt tokens served from the prefix cache.",
                     prefix.hit_tokens / prefix.prompt_tokens if prefix.prompt_tokens else 0.0),
        ]
        return "\n".join(lines) + "\n"
