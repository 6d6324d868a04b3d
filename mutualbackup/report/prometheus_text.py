"""Metric families as plain values, their Prometheus text exposition, and the /metrics server.

prometheus_client formats each sample in Python at some 12 µs; a federation of
1 000 sources × 2 replicas exports about 50 000 samples, which made a scrape take
most of a second. Here a family is a list of rows and the text format (0.0.4) is
written directly, about ten times faster. :mod:`metrics` also converts the same
families into prometheus_client objects (its collector), and a test checks that
both expositions hold the same samples.
"""

from __future__ import annotations

import gzip
import logging
import math
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable, Sequence

log = logging.getLogger("mutualbackup.report.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Family:
    """One metric: ``name`` as exposed (a counter's ends in ``_total``), ``kind`` gauge, counter or histogram.

    Rows of a gauge or counter are ``(label values, value)``; rows of a histogram are
    ``(label values, [(upper bound, cumulative count), ...], count, sum)`` (without +Inf).
    """

    name: str
    kind: str
    help: str
    labels: tuple[str, ...] = ()
    rows: list[tuple] = field(default_factory=list)

    def add(self, values: Sequence[str], value: float) -> None:
        self.rows.append((tuple(values), value))

    def add_histogram(self, values: Sequence[str], buckets: Sequence[tuple[float, int]], count: int, total: float) -> None:
        self.rows.append((tuple(values), list(buckets), count, total))


def format_number(value: float) -> str:
    """A sample value as Prometheus reads it (``+Inf``, ``NaN``, integers without a decimal point)."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def format_bound(bound: float) -> str:
    """A histogram bucket's ``le`` (``10.0``, ``+Inf``), as prometheus_client writes it."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def _escape(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")
    return value


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    return ",".join(f'{name}="{_escape(value)}"' for name, value in zip(names, values))


class TextCache:
    """What one server's scrapes have in common, kept between them: each label set's text, and each
    histogram row's lines (a replica's duration histogram is 14 lines that change only when one of its
    backups ends). Bounded: emptied when it holds far more than one scrape needs. Thread-safe enough: a
    lost race writes the same text twice."""

    def __init__(self) -> None:
        self.labels: dict[tuple[tuple[str, ...], tuple[str, ...]], str] = {}
        self.histograms: dict[tuple, str] = {}
        self.used = 0

    def trim(self) -> None:
        if len(self.labels) + len(self.histograms) > 4 * max(self.used, 1000):
            self.labels.clear()
            self.histograms.clear()


def render_text(families: Iterable[Family], cache: TextCache | None = None) -> bytes:
    """The Prometheus text exposition (format 0.0.4) of ``families``.

    The same replica's labels appear in a dozen families: each label set is written once per call (once
    per server with ``cache``, which keeps histogram rows too)."""
    cache = cache or TextCache()
    out: list[str] = []
    written = cache.labels
    histograms = cache.histograms
    rows = 0

    def labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
        text = written.get((names, values))
        if text is None:
            text = written[(names, values)] = _labels(names, values)
        return text

    for family in families:
        name, names = family.name, family.labels
        rows += len(family.rows)
        out.append(f"# HELP {name} {_escape_help(family.help)}\n")
        out.append(f"# TYPE {name} {family.kind}\n")
        if family.kind == "histogram":
            for values, buckets, count, total in family.rows:
                key = (name, names, values, tuple(buckets), count, total)
                chunk = histograms.get(key)
                if chunk is None:
                    chunk = histograms[key] = _histogram_row(name, labels(names, values), buckets, count, total)
                out.append(chunk)
        elif names:
            for values, value in family.rows:
                out.append(f"{name}{{{labels(names, values)}}} {format_number(value)}\n")
        else:
            for values, value in family.rows:
                out.append(f"{name} {format_number(value)}\n")
    cache.used = rows
    cache.trim()
    return "".join(out).encode("utf-8")


def _histogram_row(name: str, base: str, buckets: Sequence[tuple[float, int]], count: int, total: float) -> str:
    head = f"{name}_bucket{{{base}{',' if base else ''}le=\""
    lines = [f'{head}{format_bound(bound)}"}} {cumulative}\n' for bound, cumulative in buckets]
    braces = f"{{{base}}}" if base else ""
    lines.append(f'{head}+Inf"}} {count}\n{name}_sum{braces} {format_number(total)}\n{name}_count{braces} {count}\n')
    return "".join(lines)


class _Handler(BaseHTTPRequestHandler):
    server: _MetricsServer

    def do_GET(self) -> None:  # noqa: N802 — the http.server API
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self._send(404, b"not found: the metrics are at /metrics\n", "text/plain; charset=utf-8")
            return
        try:
            body = render_text(self.server.families(), self.server.cache)
        except Exception:  # a broken scrape must not kill the server thread
            log.exception("cannot compute the metrics")
            self._send(500, b"cannot compute the metrics; see the coordinator's log\n", "text/plain; charset=utf-8")
            return
        self._send(200, body, CONTENT_TYPE)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        gzipped = "gzip" in (self.headers.get("Accept-Encoding") or "")
        if gzipped:
            body = gzip.compress(body, compresslevel=1)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if gzipped:
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 — scrapes are not worth a log line
        pass


class _MetricsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], families: Callable[[], Iterable[Family]], family: int):
        self.address_family = family
        self.families = families
        self.cache = TextCache()
        super().__init__(address, _Handler)


def start_metrics_server(
    address: str, port: int, families: Callable[[], Iterable[Family]]
) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Serve ``families()`` at ``http://ADDRESS:PORT/metrics`` from a daemon thread.

    Returns ``(server, thread)`` like prometheus_client's ``start_http_server``; stop it
    with ``server.shutdown()``. Raises OSError when the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    server = _MetricsServer((address, port), families, family)
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    return server, thread
