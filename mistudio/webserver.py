"""The web server: daphne, with request bodies refused at the headers and fed to the app lazily.

Plain daphne lets Twisted read the whole body (to a temp file), then pushes all of it into the
application's queue at once: a 300 MB POST costs gigabytes of memory before any view can say no,
even an anonymous one. Here (`python -m mistudio.webserver`, same arguments as `daphne`):

- at the headers, a body larger than the route allows (body_limit) gets 413, and a body over
  ANONYMOUS_BODY_MAX without a session cookie gets 401 when login is required, before a byte of
  it is read; the connection is then closed;
- a chunked body is counted as it streams and cut off with 413 once it passes the limit;
- an accepted body reaches the application in BODY_CHUNK pieces, each queued only when the
  application has taken the previous ones (at most QUEUE_DEPTH in memory), so an upload streams
  to Django's spooled temp file in bounded memory.

The limits are settings (README): MISTUDIO_REQUEST_MAX_MB for every route,
MISTUDIO_DATASET_UPLOAD_MAX_MB for the dataset upload routes.
"""

from __future__ import annotations

import asyncio
import json
import sys
from http.cookies import SimpleCookie

from daphne import server as daphne_server
from daphne.cli import CommandLineInterface
from daphne.http_protocol import HTTPFactory, WebRequest
from django.conf import settings

UPLOAD_PATHS = ("/api/datasets", "/datasets/upload")
OPEN_PATHS = ("/admin/login/", "/accounts/login/")
ANONYMOUS_BODY_MAX = 64 * 1024  # a login form, a small JSON refusal: never an upload
MULTIPART_SLACK = 64 * 1024  # a multipart body carries a few hundred bytes besides the file
BODY_CHUNK = 1024 * 1024
QUEUE_DEPTH = 4


def body_limit(method: str, path: str) -> int:
    """The largest request body (bytes) the route `path` takes."""
    if method == "POST" and path.rstrip("/") in UPLOAD_PATHS:
        return settings.DATASET_UPLOAD_MAX_BYTES + MULTIPART_SLACK
    return settings.REQUEST_BODY_MAX_BYTES


def refusal(method: str, path: str, length: int | None, cookies: dict) -> tuple[int, str] | None:
    """(status, message) when a request must be refused from its headers alone; None if not.
    `length`: Content-Length (None for a chunked body)."""
    limit = body_limit(method, path)
    if length is not None and length > limit:
        return 413, (
            f"The request body is {length:,} bytes; this route takes at most {limit:,}"
            " (MISTUDIO_DATASET_UPLOAD_MAX_MB for uploads, MISTUDIO_REQUEST_MAX_MB otherwise)."
        )
    big = length is None or length > ANONYMOUS_BODY_MAX
    anonymous = settings.SESSION_COOKIE_NAME not in cookies
    if settings.LOGIN_REQUIRED and big and anonymous and not path.startswith(OPEN_PATHS):
        return 401, "Sign in first."
    return None


class BoundedRequest(WebRequest):
    """daphne's request with the checks above."""

    refused = False
    body_seen = 0
    limit = 0

    def gotLength(self, length):  # noqa: N802 - Twisted's name
        super().gotLength(length)
        method = (self.channel._command or b"").decode("ascii", "replace").upper()
        path = (self.channel._path or b"").split(b"?", 1)[0].decode("ascii", "replace")
        self.limit = body_limit(method, path)
        cookies = {}
        for raw in self.requestHeaders.getRawHeaders(b"cookie") or []:
            jar = SimpleCookie()
            try:
                jar.load(raw.decode("latin-1"))
            except Exception:  # noqa: BLE001 - a malformed cookie header is no session
                continue
            cookies.update({k: v.value for k, v in jar.items()})
        answer = refusal(method, path, length, cookies)
        if answer is not None:
            self.refuse(*answer)

    def handleContentChunk(self, data):  # noqa: N802 - Twisted's name
        if self.refused:
            return
        self.body_seen += len(data)
        if self.body_seen > self.limit:
            self.refuse(413, f"The request body passed {self.limit:,} bytes, this route's limit.")
            return
        super().handleContentChunk(data)

    def refuse(self, status: int, message: str) -> None:
        """Answer `status` with a JSON {detail, code} at once and close the connection."""
        self.refused = True
        reason = {401: b"Unauthorized", 413: b"Content Too Large"}.get(status, b"Refused")
        code = {401: "unauthenticated", 413: "too_large"}.get(status, "refused")
        body = json.dumps({"detail": message, "code": code}).encode()
        head = (
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % (status, reason, len(body))
        )
        transport = self.channel.transport
        if transport is not None:
            transport.write(head + body)
            transport.loseConnection()

    def requestReceived(self, command, path, version):  # noqa: N802 - Twisted's name
        if self.refused:
            return  # answered at the headers; the app never sees it
        super().requestReceived(command, path, version)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Twisted would read a whole multipart/form body into memory to parse it for us
        self._parsePOSTFormSubmission = False

    def process(self):
        """daphne's process with the body withheld (daphne sees a body that reads as closed,
        so it queues none), then fed lazily by feed_body once the application exists.
        Websocket upgrades (whose body daphne replays) go through unchanged."""
        if self.requestHeaders.hasHeader(b"Upgrade"):
            return super().process()
        body, self.content = self.content, _Withheld(self.content)
        deferred = super().process()

        def feed(result):
            self.content = body
            if self.application_queue is not None and not body.closed:
                asyncio.ensure_future(self.feed_body(body, self.application_queue))
            return result

        return deferred.addCallback(feed)

    def _gone(self, body) -> bool:
        return body.closed or bool(self.finished) or bool(getattr(self, "_disconnected", False))

    async def feed_body(self, body, queue: asyncio.Queue) -> None:
        """Put the body into the application's queue BODY_CHUNK at a time, waiting while
        QUEUE_DEPTH pieces are still untaken; stops when the request ends."""
        body.seek(0, 0)
        while True:
            while queue.qsize() >= QUEUE_DEPTH:
                if self._gone(body):
                    return
                await asyncio.sleep(0.002)
            if self._gone(body):
                return
            chunk = body.read(BODY_CHUNK)
            more = len(chunk) == BODY_CHUNK
            queue.put_nowait({"type": "http.request", "body": chunk, "more_body": more})
            if not more:
                return


class _Withheld:
    """Stands in for the body while daphne's process() runs: seekable, and closed as far as
    daphne's body loop can tell, so it queues nothing (feed_body sends the real body)."""

    closed = True

    def __init__(self, real):
        self.real = real

    def seek(self, *args):
        return self.real.seek(*args)

    def close(self) -> None:
        self.real.close()


class BoundedHTTPFactory(HTTPFactory):
    def buildProtocol(self, addr):  # noqa: N802 - Twisted's name
        protocol = super().buildProtocol(addr)
        protocol.requestFactory = BoundedRequest
        return protocol


def main(argv: list[str] | None = None) -> None:
    """daphne's command line with BoundedRequest as the request class."""
    daphne_server.HTTPFactory = BoundedHTTPFactory
    CommandLineInterface().run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
