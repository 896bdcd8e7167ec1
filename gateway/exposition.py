"""`GET /metrics`: the Prometheus scrape, off unless ``GATEWAY_METRICS`` is on.

Who may read it: with ``GATEWAY_METRICS_TOKEN`` set, a request bearing it (``Authorization: Bearer …``);
without one, only a loopback client (a Prometheus on the same host), since the series name models,
endpoints and traffic. Off, the path does not exist (404).

What is kept in memory comes from gateway.metrics (added up over every process's files in
multiprocess mode); the flex queue is counted from the database at scrape time.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterator

from django.conf import settings
from django.db.models import Count, Q
from django.http import Http404, HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.http import require_GET
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from gateway.metrics import MULTIPROCESS
from gateway.models import HELD_STATES, InferenceRequest, JobState


class FlexQueueCollector(Collector):
    """Queued and running flex jobs per model, read from the queue itself (one query per scrape)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = timezone.now()
        rows = (
            InferenceRequest.objects.filter(service_tier="flex", state__in=(JobState.PENDING, *HELD_STATES))
            .values("model_alias")
            .annotate(
                queued=Count("pk", filter=Q(state=JobState.PENDING)),
                # A lapsed lease is a worker that died: its job is queued again, not in flight.
                in_flight=Count("pk", filter=Q(state__in=HELD_STATES, lease_expires_at__gt=now)),
            )
        )
        queued = GaugeMetricFamily("dwctl_flex_queue_depth", "Flex jobs waiting for a worker.", labels=["model"])
        in_flight = GaugeMetricFamily("dwctl_flex_in_flight", "Flex jobs a live worker is running.", labels=["model"])
        for row in rows:
            queued.add_metric([row["model_alias"]], row["queued"])
            in_flight.add_metric([row["model_alias"]], row["in_flight"])
        yield queued
        yield in_flight


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def scrape() -> bytes:
    """Every series, in Prometheus's text format."""
    scraped = CollectorRegistry(auto_describe=True)
    scraped.register(FlexQueueCollector())
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(scraped)
        return generate_latest(scraped)
    return generate_latest(REGISTRY) + generate_latest(scraped)


@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    if not settings.GATEWAY_METRICS:
        raise Http404("Metrics are off (GATEWAY_METRICS).")
    token = settings.GATEWAY_METRICS_TOKEN
    if token:
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), token.encode()):
            response = HttpResponse("A valid bearer token (GATEWAY_METRICS_TOKEN) is required.\n", status=401)
            response["WWW-Authenticate"] = 'Bearer realm="metrics"'
            return response
    elif not is_loopback(request.META.get("REMOTE_ADDR", "")):
        return HttpResponse("Without GATEWAY_METRICS_TOKEN only loopback clients may read metrics.\n", status=403)
    return HttpResponse(scrape(), content_type=CONTENT_TYPE_LATEST)
