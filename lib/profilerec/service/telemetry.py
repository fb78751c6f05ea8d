"""The service's Prometheus metrics, exported through Ray's metrics endpoint on every node.

Scrape each node's metrics port (`ray start --metrics-export-port`, or the `metrics_export_port`
of `ray.init`); the names below appear there with Ray's `ray_` prefix, e.g.
`ray_profilerec_events_accepted_total`. Events per second is `rate()` of the accepted counter.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

LATENCY_BOUNDARIES = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]


class ShardMetrics:
    """What a profile shard actor reports: events applied, update latency, users held."""

    def __init__(self, shard: int):
        self.tags = {"shard": str(shard)}
        self.accepted = Counter("profilerec_events_accepted", "events accepted (logged and applied)", ("shard",))
        self.duplicates = Counter("profilerec_events_duplicate", "events ignored as repeats of an event id", ("shard",))
        self.update_seconds = Histogram("profilerec_update_seconds",
                                        "time to log and apply one batch of events in a shard",
                                        LATENCY_BOUNDARIES, ("shard",))
        self.users = Gauge("profilerec_users_held", "users whose profile a shard holds in memory", ("shard",))

    def batch_applied(self, result: dict[str, int], seconds: float, users: int) -> None:
        """Record one `apply` call."""
        if result["accepted"]:
            self.accepted.inc(result["accepted"], self.tags)
        if result["duplicates"]:
            self.duplicates.inc(result["duplicates"], self.tags)
        self.update_seconds.observe(seconds, self.tags)
        self.users.set(users, self.tags)


class IngressMetrics:
    """What the HTTP ingress reports: recommendation latency and rejected requests."""

    def __init__(self):
        self.recommend_seconds = Histogram("profilerec_recommendation_seconds",
                                           "time to answer a recommendation request in the ingress",
                                           LATENCY_BOUNDARIES)
        self.rejected = Counter("profilerec_requests_rejected", "requests answered with a 4xx", ("status",))
