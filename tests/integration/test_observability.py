"""Observability end to end: `python -m dataflow.run` serves /metrics, the stack's real
Prometheus scrapes it and evaluates our rules, and what it reports makes sense.

A backlog is produced first (so the consumer lag is visibly above zero), then the pipeline
starts while a producer keeps writing; Prometheus must show a process rate above zero while
producing, and the lag back at zero once production stops, with every produced message
counted. The pipeline uses one of the ports Prometheus scrapes (METRICS_PORTS); a lock file
keeps two test runs on one machine from taking the same one.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import pytest
import redis
import yaml
from confluent_kafka import Producer

from dataflow.tools.generator import GeneratorConfig, generate
from tests.integration.conftest import PrometheusApi, PrometheusQuery, TopicFactory, http_get

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "ops/grafana/search-features-dashboard.json"
RULES = ROOT / "ops/prometheus/search-features.rules.yml"
WAIT_S = 90.0
BACKLOG = 100_000
"""Messages waiting before the pipeline starts: several seconds of reading at the compiled
core's rate, so that Prometheus scrapes the lag while it lasts."""
RATE_PER_S = 300


def wait_until(what: str, check: Callable[[], Any], timeout: float = WAIT_S) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(1.0)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def value(result: list[dict[str, Any]]) -> float | None:
    """The value of a one-sample instant-query result, or None if there is none."""
    if len(result) != 1:
        return None
    return float(result[0]["value"][1])


# --- a metrics port of our own -------------------------------------------------------------


def _port_free(port: int) -> bool:
    # Bytewax binds 0.0.0.0, so that is what must be free.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("0.0.0.0", port))  # noqa: S104 (a probe, closed at once)
        except OSError:
            return False
    return True


@pytest.fixture
def metrics_port(metrics_ports: list[int]) -> Iterator[int]:
    """A scraped port no other test holds: locked for the test, and free right now."""
    deadline = time.monotonic() + WAIT_S
    while True:
        for port in metrics_ports:
            lock_path = Path(tempfile.gettempdir()) / f"search-features-metrics-{port}.lock"
            lock: IO[str] = lock_path.open("w")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            if _port_free(port):
                try:
                    yield port
                finally:
                    lock.close()
                return
            lock.close()
        if time.monotonic() > deadline:
            pytest.fail(
                f"none of the scraped metrics ports {metrics_ports} became free within "
                f"{WAIT_S:.0f}s: another pipeline is serving /metrics (`ss -ltnp`)"
            )
        time.sleep(1.0)


# --- Prometheus knows our rules ----------------------------------------------------------


@pytest.fixture(scope="module")
def rules_loaded(prometheus_url: str, prometheus_api: PrometheusApi) -> set[str]:
    """Reload Prometheus so it evaluates the rule file as it is in the working tree."""
    conn = http.client.HTTPConnection(urlsplit(prometheus_url).netloc, timeout=30)
    try:
        conn.request("POST", "/-/reload")
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    assert response.status == 200, f"Prometheus refused to reload: {body[:200]!r}"
    groups = prometheus_api("/api/v1/rules")["data"]["groups"]
    names = {rule["name"] for group in groups for rule in group["rules"]}
    assert "job_topic:search_features_messages:rate1m" in names, (
        "Prometheus did not load ops/prometheus/search-features.rules.yml; "
        f"its groups: {[g['name'] for g in groups]}"
    )
    return names


def test_prometheus_evaluates_every_rule_without_error(
    rules_loaded: set[str], prometheus_api: PrometheusApi
) -> None:
    assert {"SearchFeaturesConsumerLagGrowing", "SearchFeaturesSinkFailures"} <= rules_loaded

    def evaluated() -> list[dict[str, Any]] | None:
        groups = prometheus_api("/api/v1/rules")["data"]["groups"]
        ours = [g for g in groups if g["name"].startswith("search-features")]
        done = all(g["lastEvaluation"] > "2000" for g in ours)  # not the zero time
        return ours if ours and done else None

    groups = wait_until("a first evaluation of our rule groups", evaluated)
    rules = [rule for group in groups for rule in group["rules"]]
    in_file = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    assert len(rules) == len(in_file)
    broken = [(r["name"], r.get("lastError")) for r in rules if r["health"] == "err"]
    assert not broken


def test_every_dashboard_query_runs_on_the_real_prometheus(
    prometheus_query: PrometheusQuery, rules_loaded: set[str]
) -> None:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert len(exprs) > 20
    for expr in exprs:
        # prometheus_query raises unless Prometheus parsed and ran it.
        prometheus_query(expr.replace("$job", "search-features").replace("$__rate_interval", "1m"))


# --- the pipeline under python -m dataflow.run ---------------------------------------------


class Production:
    """Produces generated messages: a backlog at once, then a steady trickle in a thread."""

    def __init__(self, brokers: str, topic: str) -> None:
        self.producer = Producer({"bootstrap.servers": brokers, "linger.ms": 20})
        self.topic = topic
        config = GeneratorConfig(
            seed=11, n_events=10_000_000, span_ms=3_600_000, invalid_fraction=0.01,
            duplicate_fraction=0.01,
        ).resolved()  # fmt: skip
        self.messages = generate(config)
        self.produced = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, name="producer", daemon=True)

    def _on_delivery(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self.failed.append(str(err))

    def send(self, n: int) -> None:
        for _ in range(n):
            msg = next(self.messages)
            while True:
                try:
                    self.producer.produce(
                        self.topic, value=msg.value, key=msg.key, on_delivery=self._on_delivery
                    )
                    break
                except BufferError:
                    self.producer.poll(0.1)
            self.produced += 1
        self.producer.poll(0)

    def _trickle(self) -> None:
        per_tick = RATE_PER_S // 10
        while not self._stop.wait(0.1):
            self.send(per_tick)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> int:
        """Stop, wait for every acknowledgement, return how many messages were produced."""
        self._stop.set()
        self._thread.join(timeout=10)
        assert self.producer.flush(30) == 0, "Kafka did not acknowledge every message"
        assert not self.failed, f"delivery failures: {self.failed[:3]}"
        return self.produced


@contextlib.contextmanager
def pipeline(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dataflow.run"],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=15)


def test_prometheus_sees_the_process_rate_and_the_lag_return_to_zero(  # noqa: PLR0917 (fixtures)
    kafka_brokers: str,
    topic_factory: TopicFactory,
    redis_url: str,
    redis_client: redis.Redis,
    key_prefix: str,
    prometheus_query: PrometheusQuery,
    rules_loaded: set[str],
    metrics_port: int,
    tmp_path: Path,
) -> None:
    topic = topic_factory(2, prefix="obs")
    dlq = topic_factory(1, prefix="obs-dlq")
    instance = f"127.0.0.1:{metrics_port}"
    sel = f'topic="{topic}"'

    def q(expr: str) -> float | None:
        return value(prometheus_query(expr))

    production = Production(kafka_brokers, topic)
    production.send(BACKLOG)  # read after the pipeline starts: the lag must show it
    production.producer.flush(30)
    env = {
        "KAFKA_BROKERS": kafka_brokers,
        "KAFKA_TOPICS": topic,
        "KAFKA_DLQ_TOPIC": dlq,
        "REDIS_URL": redis_url,
        "FEATURE_PREFIX": key_prefix,
        "OPENSEARCH_URL": "",
        "METRICS_ENABLED": "true",
        "BYTEWAX_DATAFLOW_API_PORT": str(metrics_port),
        "LOG_FORMAT": "json",
    }
    log = tmp_path / "pipeline.log"
    try:
        with pipeline(env, log) as proc:

            def serving() -> bool:
                assert proc.poll() is None, f"the pipeline exited with {proc.returncode}"
                with contextlib.suppress(OSError):
                    text = http_get(metrics_port, "/metrics").decode()
                    return any(
                        line.startswith("search_features_consumer_lag{") and sel in line
                        for line in text.splitlines()
                    )
                return False

            wait_until(f"/metrics on port {metrics_port} to show the lag of {topic}", serving)
            production.start()
            wait_until(
                f"Prometheus to scrape {instance}",
                lambda: q(f'up{{job="search-features",instance="{instance}"}}') == 1,
            )
            rate = wait_until(
                "a process rate above 0 in Prometheus while producing",
                lambda: (
                    (q(f"sum(rate(search_features_messages_total{{{sel}}}[30s]))") or 0) > 0
                    and q(f"job_topic:search_features_messages:rate1m{{{sel}}}")
                ),
            )
            assert rate > 0
            assert (q('job:search_features_events:rate1m{job="search-features"}') or 0) > 0
            time.sleep(5)  # a few more seconds of steady production
            produced = production.stop()

            wait_until(
                "the consumer lag back to 0 in Prometheus after production stopped",
                lambda: (
                    q(f"sum(search_features_consumer_lag{{{sel}}})") == 0
                    and q(f"job_topic:search_features_consumer_lag:sum{{{sel}}}") == 0
                ),
            )
            # Sensible numbers: the backlog showed as lag, every message was counted once,
            # features were written, and the clock moved.
            peak = q(f"max_over_time(job_topic:search_features_consumer_lag:sum{{{sel}}}[10m])")
            assert peak is not None and 0 < peak <= produced
            wait_until(
                f"Prometheus to count all {produced} messages",
                lambda: q(f"sum(search_features_messages_total{{{sel}}})") == produced,
            )
            written = q(
                f'search_features_sink_writes_total{{instance="{instance}",sink="redis",'
                'result="success"}'
            )
            assert written is not None and written > 0
            assert next(redis_client.scan_iter(match=f"{key_prefix}:*", count=1000), None)
            clock = q(f'search_features_clock_seconds{{instance="{instance}"}}')
            assert clock is not None and clock > time.time() - 2 * 3600
            dropped = q(
                f'sum(search_features_events_dropped_total{{instance="{instance}",'
                'reason=~"invalid_json|invalid_event|unknown_type|future_timestamp"})'
            )
            assert dropped is not None and 0 < dropped < produced * 0.05
            assert proc.poll() is None, "the pipeline stopped by itself"
    except BaseException:
        print(log.read_text(errors="replace")[-5000:])  # noqa: T201 (shown by pytest on failure)
        raise
