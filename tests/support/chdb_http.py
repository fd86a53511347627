"""chDB behind ClickHouse's HTTP interface, so clickhouse-connect can be tested here.

No ClickHouse server can run on the test machine (Debian's is from 2018 and
clickhouse-connect refuses it), so this small endpoint puts the real
ClickHouse engine (chDB, in this process) behind the part of the HTTP
interface that clickhouse-connect uses: the query in the URL and/or the body,
``param_<name>`` server-side parameters, ``default_format``, INSERT data in a
chunked, possibly compressed body, the result in the format asked for, and
errors as ``Code: N. DB::Exception: ...`` with ``X-ClickHouse-Exception-Code``.
It is a stand-in for the server process only; every query runs on ClickHouse.
"""

from __future__ import annotations

import gzip
import json
import re
import tempfile
import threading
import uuid
from email import policy
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qsl, urlparse

_INSERT = re.compile(
    r"^\s*INSERT\s+INTO\s+(?P<target>.+?)\s+FORMAT\s+(?P<format>\w+)\s*$", re.I | re.S
)
_INSERT_PREFIX = re.compile(rb"^\s*INSERT\s+INTO\s", re.I)
_FORMAT = re.compile(r"\bFORMAT\s+(\w+)\s*;?\s*$", re.I)
_CODE = re.compile(r"Code:\s*(\d+)")


def _decompress(body: bytes, encoding: str | None) -> bytes:
    if not encoding or encoding == "identity":
        return body
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "lz4":
        import lz4.frame

        lz4_data: bytes = lz4.frame.decompress(body)
        return lz4_data
    if encoding == "zstd":
        import zstandard

        zstd_data: bytes = zstandard.ZstdDecompressor().decompress(body, max_output_size=1 << 30)
        return zstd_data
    raise ValueError(f"unsupported Content-Encoding {encoding}")


def _form_fields(content_type: str, body: bytes) -> dict[str, str]:
    message = BytesParser(policy=policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    fields: dict[str, str] = {}
    for part in message.iter_parts():
        # clickhouse-connect's form fields: a plain name each, their values as bytes
        name = cast(str, part.get_param("name", header="content-disposition"))
        fields[name] = cast(bytes, part.get_payload(decode=True)).decode()
    return fields


class ChdbHttpServer:
    """A ClickHouse-compatible HTTP endpoint over one chDB session."""

    def __init__(self, session: Any, lock: threading.Lock | None = None) -> None:
        self.session = session
        self.lock = lock or threading.Lock()
        self.spool = Path(tempfile.mkdtemp(prefix="chdb-http-"))
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        endpoint = self

        class Handler(_Handler):
            server_ref = endpoint

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def execute(self, query: str, body: bytes, params: dict[str, str]) -> tuple[bytes, str]:
        """Run one HTTP request's statement; returns the result and its format."""
        bound = {k[len("param_") :]: v for k, v in params.items() if k.startswith("param_")}
        fmt = params.get("default_format", "TabSeparated")
        if not query and _INSERT_PREFIX.match(body):
            # The statement leads the body, the data follows its first line.
            statement, _, body = body.partition(b"\n")
            query = statement.decode()
        insert = _INSERT.match(query) if body and query else None
        if insert:
            # The body is the data: ClickHouse reads it as the INSERT's input.
            data = self.spool / f"{uuid.uuid4().hex}.{insert['format']}"
            data.write_bytes(body)
            try:
                sql = (
                    f"INSERT INTO {insert['target']} SELECT * FROM "
                    f"file('{data}', '{insert['format']}')"
                )
                self._query(sql, "TabSeparated", bound)
            finally:
                data.unlink(missing_ok=True)
            return b"", fmt
        sql = (query + ("\n" if query and body else "") + body.decode()).strip()
        named = _FORMAT.search(sql)
        if named:
            fmt = named.group(1)
            sql = sql[: named.start()].rstrip()
        return self._query(sql, fmt, bound), fmt

    def _query(self, sql: str, fmt: str, params: dict[str, str]) -> bytes:
        with self.lock:
            result = self.session.query(sql, fmt, params=params or None)
        return bytes(result.bytes()) if result is not None else b""


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        """A client killed mid-request (the kill tests do that) is no error of the server's."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class _Handler(BaseHTTPRequestHandler):
    server_ref: ChdbHttpServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read results, not access logs."""

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            raw = b"".join(chunks)
        else:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        return _decompress(raw, self.headers.get("Content-Encoding"))

    def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        url = urlparse(self.path)
        if url.path.rstrip("/") == "/ping":
            self._reply(200, b"Ok.\n", {"Content-Type": "text/plain"})
            return
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        query_id = params.get("query_id") or str(uuid.uuid4())
        try:
            body = self._body() if self.command == "POST" else b""
            content_type = self.headers.get("Content-Type", "")
            if content_type.startswith("multipart/form-data"):
                # Large parameters come as form fields: the query and param_<name>.
                params.update(_form_fields(content_type, body))
                body = b""
            result, fmt = self.server_ref.execute(params.get("query", ""), body, params)
        except Exception as exc:  # the engine's error goes back as ClickHouse sends it
            message = str(exc)
            code = _CODE.search(message)
            self._reply(
                500,
                (
                    message
                    if message.startswith("Code:")
                    else f"Code: 1000. DB::Exception: {message}"
                ).encode(),
                {
                    "Content-Type": "text/plain; charset=UTF-8",
                    "X-ClickHouse-Exception-Code": code.group(1) if code else "1000",
                    "X-ClickHouse-Query-Id": query_id,
                },
            )
            return
        summary = {"read_rows": "0", "written_rows": "0", "result_rows": "0"}
        self._reply(
            200,
            result,
            {
                "Content-Type": "application/octet-stream",
                "X-ClickHouse-Format": fmt,
                "X-ClickHouse-Timezone": "UTC",
                "X-ClickHouse-Server-Display-Name": "chdb",
                "X-ClickHouse-Query-Id": query_id,
                "X-ClickHouse-Summary": json.dumps(summary),
            },
        )
