"""Prometheus metrics (a node's --metrics-port and the dashboard's /metrics) and OpenTelemetry."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families

import koban
from helpers import TESTS_DIR, subprocess_env, wait_until
from koban.contrib.otel import META_KEY, instrument
from koban.contrib.prometheus import PrometheusMetrics
from koban.web import TokenAuth, dashboard
from web.conftest import NodeThread, free_port, serve
from web.opsapp import FLAKY, GREET, build, enqueue

TOKEN = "metrics-token-0123456"


@pytest.fixture
def nodes() -> Iterator[list[NodeThread]]:
    started: list[NodeThread] = []
    yield started
    for node in started:
        node.stop()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} from Prometheus text."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


def state_of(app: koban.Koban, job_id: int | None) -> str | None:
    job = app.get_job(job_id or 0)
    return str(job.state) if job else None


def test_node_metrics_count_executions_and_read_the_database(
    pg_url: str, nodes: list[NodeThread]
) -> None:
    app = build(pg_url)
    metrics = PrometheusMetrics()
    node_app = build(pg_url)
    metrics.attach(node_app.telemetry)
    node_app.extra_plugins.append(metrics.plugin(node_app, interval=0.2))
    server = metrics.serve(free_port(), "127.0.0.1")
    url = f"http://127.0.0.1:{server.server_port}/metrics"
    try:
        ok = [enqueue(app, GREET, {"n": n}) for n in range(2)]
        bad = enqueue(app, FLAKY, {"to": "x", "fail": True})
        waiting = enqueue(app, GREET, {}, schedule_in=3600)
        nodes.append(NodeThread(node_app).start())
        wait_until(lambda: state_of(app, bad.id) == "discarded", what="the failing job to fail")
        wait_until(lambda: all(state_of(app, j.id) == "completed" for j in ok))

        def scraped() -> str | None:
            text = httpx.get(url).text
            done = value(text, "koban_jobs", queue="default", state="completed")
            failed = value(text, "koban_jobs", queue="mailers", state="discarded")
            return text if (done, failed) == (2, 1) else None

        text = wait_until(scraped, what="the gauges to show 2 completed and 1 discarded job")
        assert value(
            text, "koban_job_executions_total", queue="default", worker=GREET, outcome="completed"
        ) == 2  # fmt: skip
        assert value(
            text, "koban_job_executions_total", queue="mailers", worker=FLAKY, outcome="discarded"
        ) == 1  # fmt: skip
        assert value(text, "koban_job_errors_total", queue="mailers", worker=FLAKY) == 1
        assert value(text, "koban_job_duration_seconds_count", queue="default", worker=GREET) == 2
        assert value(text, "koban_job_queue_wait_seconds_count", queue="mailers") == 1
        assert value(text, "koban_jobs", queue="default", state="scheduled") == 1
        assert value(text, "koban_jobs", queue="mailers", state="discarded") == 1
        assert value(text, "koban_queue_depth", queue="default") == 0
        assert value(text, "koban_jobs_counts_exact") == 1
        if hasattr(app, "alist_nodes"):
            assert value(text, "koban_nodes_live") == 1
        assert waiting.id
    finally:
        server.shutdown()
        app.engine.close_sync()


def test_dashboard_serves_metrics_behind_auth(pg_url: str) -> None:
    app = build(pg_url)
    enqueue(app, GREET, {})
    enqueue(app, GREET, {}, queue="mailers")
    with serve(dashboard(build(pg_url), auth=TokenAuth(TOKEN))) as base:
        assert httpx.get(base + "/metrics").status_code == 401
        response = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        assert value(response.text, "koban_jobs", queue="default", state="available") == 1
        assert value(response.text, "koban_queue_depth", queue="mailers") == 1
    app.engine.close_sync()


def test_koban_start_metrics_port(pg_url: str, tmp_path: Any) -> None:
    app = build(pg_url)
    enqueue(app, GREET, {})
    port = free_port()
    log = open(tmp_path / "node.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "koban.cli", "start", "--app", "web.opsapp:app",
         "--metrics-port", str(port), "--metrics-addr", "127.0.0.1", "--metrics-interval", "0.2"],
        env=subprocess_env(pg_url), cwd=str(TESTS_DIR), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:

        def scraped() -> str | None:
            if proc.poll() is not None:
                raise AssertionError((tmp_path / "node.log").read_text())
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            except httpx.TransportError:
                return None
            ran = value(
                text, "koban_job_executions_total", queue="default", worker=GREET,
                outcome="completed",
            )  # fmt: skip
            done = value(text, "koban_jobs", queue="default", state="completed")
            return text if ran == 1 and done == 1 else None

        wait_until(scraped, what="the node's metrics to show the completed job")
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()
        app.engine.close_sync()


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


@pytest.mark.parametrize("as_child", [False, True])
def test_execution_spans_link_to_the_enqueuing_span(
    pg_url: str, nodes: list[NodeThread], spans: Any, as_child: bool
) -> None:
    provider, exporter = spans
    app = build(pg_url)
    instrument(app, tracer_provider=provider)
    node_app = build(pg_url)
    instrument(node_app, tracer_provider=provider, as_child=as_child)
    tracer = provider.get_tracer("test")

    with tracer.start_as_current_span("POST /signup") as request_span:
        ok = enqueue(app, GREET, {"user": 7})
        bad = enqueue(app, FLAKY, {"to": "x", "fail": True})
    enqueued = request_span.get_span_context()
    untraced = enqueue(app, GREET, {"user": 8})
    assert "traceparent" in ok.meta[META_KEY]
    assert META_KEY not in untraced.meta

    nodes.append(NodeThread(node_app).start())
    wait_until(lambda: state_of(app, bad.id) == "discarded" and state_of(app, ok.id) == "completed")

    def job_spans() -> dict[int, Any] | None:
        found = {
            s.attributes["koban.job.id"]: s
            for s in exporter.get_finished_spans()
            if s.name.startswith("koban.job ")
        }
        return found if len(found) == 3 else None

    by_id = wait_until(job_spans, what="three execution spans")
    good, failed, plain = by_id[ok.id], by_id[bad.id], by_id[untraced.id]
    for span in (good, failed):
        assert span.kind is SpanKind.CONSUMER
        assert [link.context.span_id for link in span.links] == [enqueued.span_id]
        if as_child:
            assert span.parent is not None and span.parent.span_id == enqueued.span_id
            assert span.context.trace_id == enqueued.trace_id
        else:
            assert span.parent is None
    assert good.name == f"koban.job {GREET}"
    assert good.attributes["koban.job.queue"] == "default"
    assert good.attributes["koban.job.attempt"] == 1
    assert good.attributes["koban.job.outcome"] == "completed"
    assert good.status.status_code is StatusCode.UNSET
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes["koban.job.outcome"] == "discarded"
    exception = [e for e in failed.events if e.name == "exception"]
    assert exception and exception[0].attributes["exception.type"] == "RuntimeError"
    assert "mail server said no" in exception[0].attributes["exception.stacktrace"]
    assert plain.links == () or list(plain.links) == []
    assert plain.parent is None
    app.engine.close_sync()


def test_worker_spans_nest_under_the_execution_span(
    pg_url: str, nodes: list[NodeThread], spans: Any
) -> None:
    provider, exporter = spans
    inner_tracer = provider.get_tracer("worker")

    def charge(job: koban.Job) -> None:
        with inner_tracer.start_as_current_span("charge card"):
            pass

    app = build(pg_url)
    app.worker(charge)
    instrument(app, tracer_provider=provider)
    job = app.enqueue(
        app.resolve_worker(charge.__module__ + "." + charge.__qualname__).target.new({})
    )
    nodes.append(NodeThread(app).start())
    wait_until(lambda: state_of(app, job.id) == "completed")
    finished = wait_until(
        lambda: {s.name: s for s in exporter.get_finished_spans()}
        if len(exporter.get_finished_spans()) >= 2 else None
    )  # fmt: skip
    outer = next(s for n, s in finished.items() if n.startswith("koban.job "))
    inner = finished["charge card"]
    assert inner.parent is not None and inner.parent.span_id == outer.context.span_id
    assert trace.get_current_span().get_span_context().is_valid is False
