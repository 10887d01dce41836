"""An OTLP/HTTP trace receiver for tests: the services export their spans to it over HTTP, as
they would to Jaeger, and the test reads what arrived (raw bodies, or decoded spans)."""

from __future__ import annotations

import gzip
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from runtime import tracing
from runtime.tracing import SpanRecord

TRACES_PATH = "/v1/traces"


class OtlpReceiver:
    """Accepts OTLP/HTTP protobuf trace exports on 127.0.0.1 and keeps each body, decompressed;
    :meth:`spans` decodes them."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                if self.path != TRACES_PATH:
                    self.send_response(404)
                    self.end_headers()
                    return
                with receiver.lock:
                    receiver.bodies.append(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def requests(self) -> int:
        with self.lock:
            return len(self.bodies)

    def raw(self) -> list[bytes]:
        with self.lock:
            return list(self.bodies)

    def spans(self) -> list[SpanRecord]:
        return [span for body in self.raw() for span in tracing.spans_from_otlp(body)]

    def trace_of(self, tx_id: str) -> list[SpanRecord]:
        """Every span of the trace whose spans carry ``tx_id``."""
        spans = self.spans()
        trace_ids = {s.trace_id for s in spans if s.attributes.get("tx_id") == tx_id}
        return [s for s in spans if s.trace_id in trace_ids]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
