"""Prometheus metrics on GET /metrics: requests, latencies, predictions by model version, training jobs by
state (the training queue is `status="queued"`) and by project, project-bound models loaded or not, background predictions waiting (the prediction queue), predict
jobs' counts, and each project's latest `tandem report` (edit rates, minutes saved, auto-accept)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.responses import Response


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("tandem_http_requests_total", "HTTP requests", ["route", "method", "status"],
                                registry=self.registry)
        self.latency = Histogram("tandem_http_request_seconds", "HTTP request latency", ["route"],
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 100),
                                 registry=self.registry)
        self.predictions = Counter("tandem_predictions_total", "Task predictions returned", ["model_version", "outcome"],
                                   registry=self.registry)
        self.jobs = Gauge("tandem_training_jobs", "Training jobs by state", ["status"], registry=self.registry)
        self.project_jobs = Gauge("tandem_project_training_jobs", "Training jobs by project and state",
                                  ["project", "status"], registry=self.registry)
        self.ready = Gauge("tandem_model_ready", "1 when a model is loaded", registry=self.registry)
        self.project_loaded = Gauge("tandem_project_model_loaded", "1 when a model bound to the project is loaded "
                                    "(0 while it loads, or when it failed to load: /health?project= says why)",
                                    ["project", "role"], registry=self.registry)
        self.deferred = Gauge("tandem_deferred_predictions", "Tasks waiting for a background prediction",
                              registry=self.registry)
        self.pool_models = Gauge("tandem_pool_models", "Project-bound models loaded in the model pool",
                                 registry=self.registry)
        self.pool_bytes = Gauge("tandem_pool_bytes", "Estimated memory of the models in the pool",
                                registry=self.registry)

    def render(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class MetricsMiddleware:
    """Plain ASGI (Starlette's BaseHTTPMiddleware costs about a millisecond a request)."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def capture(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(path, scope["method"], str(status["code"])).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - start)


class PredictJobCollector:
    """The newest predict jobs' counts at each scrape, read from their rows (any replica's job shows):
    `tandem_predict_job_tasks{job, project, state="done"|"failed"|"remaining"}`."""

    def __init__(self, source) -> None:
        self.source = source  # () -> job records with .id, .project_id, .progress

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily("tandem_predict_job_tasks", "Tasks of recent predict jobs by state",
                                   labels=["job", "project", "state"])
        for job in self.source():
            for name in ("done", "failed", "remaining"):
                family.add_metric([str(job.id), str(job.project_id), name], float((job.progress or {}).get(name, 0)))
        yield family


def reports_dir(home):
    """Where `tandem report` keeps each project's latest report as JSON (TANDEM_HOME/reports)."""
    from pathlib import Path

    return Path(home) / "reports"


class ReportCollector:
    """The latest `tandem report` of each project (TANDEM_HOME/reports/project-N.json, any replica sharing the home)
    at each scrape: pre-annotation edit rates and region counts per model version, minutes saved, auto-accept's
    threshold, bound and coverage. A report that cannot be read is skipped (the next `tandem report` rewrites it)."""

    RATES = ("unchanged", "modified", "deleted", "missed", "choice_accept")
    COUNTS = ("unchanged", "moved", "relabelled", "deleted", "missed")

    def __init__(self, folder) -> None:
        self.folder = folder

    def _reports(self):
        import json
        from pathlib import Path

        folder = Path(self.folder)
        for path in sorted(folder.glob("project-*.json")) if folder.is_dir() else []:
            try:
                report = json.loads(path.read_text())
                yield str(report["project"]), report
            except (OSError, ValueError, KeyError):
                continue

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        rates = GaugeMetricFamily("tandem_preannotation_rate", "Share of pre-annotated regions a human kept, modified "
                                  "or deleted (missed: of final regions; choice_accept: of choices), from tandem report",
                                  labels=["project", "model_version", "kind"])
        regions = GaugeMetricFamily("tandem_preannotation_regions", "Pre-annotated regions by what the human did",
                                    labels=["project", "model_version", "kind"])
        saved = GaugeMetricFamily("tandem_minutes_saved", "Estimated human minutes saved against labelling from "
                                  "scratch (effort model), per model version on every reviewed task it "
                                  "pre-annotated: versions share tasks, so do not sum them (see "
                                  "tandem_project_minutes_saved)", labels=["project", "model_version"])
        total = GaugeMetricFamily("tandem_project_minutes_saved", "Estimated human minutes saved on the project, "
                                  "each reviewed task counted once with the version shown (tandem report's total)",
                                  labels=["project"])
        auto = GaugeMetricFamily("tandem_auto_accept", "Auto-accept calibration: threshold, bound on the false-accept "
                                 "rate, coverage (absent while off)", labels=["project", "value"])
        for project, report in self._reports():
            for version, s in (report.get("versions") or {}).items():
                for kind in self.RATES:
                    value = (s.get("rates") or {}).get(kind)
                    if value is not None:
                        rates.add_metric([project, version, kind], float(value))
                for kind in self.COUNTS:
                    regions.add_metric([project, version, kind], float((s.get("counts") or {}).get(kind, 0)))
                saved.add_metric([project, version], float(s.get("saved_minutes", 0.0)))
            if "saved_minutes" in (report.get("total") or {}):
                total.add_metric([project], float(report["total"]["saved_minutes"]))
            calibration = report.get("auto_accept") or {}
            if calibration.get("threshold") is not None:  # off: no threshold, and its bound and coverage mean nothing
                for name in ("threshold", "bound", "coverage"):
                    if calibration.get(name) is not None:
                        auto.add_metric([project, name], float(calibration[name]))
        yield from (rates, regions, saved, total, auto)
