"""A forwarding HTTP proxy on loopback that injects transient failures between tensorstore and
an object-store server (moto's S3 server, fake-gcs-server), for the tests of failed saves.

    with FaultProxy(s3_server.endpoint, flavor='s3') as proxy:
      proxy.inject(Fault('status', status=503, method='PUT', every=3, limit=4))
      ...  # point AWS_ENDPOINT_URL_S3 (or TENSORSTORE_GCS_HTTP_URL) at proxy.endpoint
      assert proxy.injected['status 503'] == 4

Each ``Fault`` matches requests by method and by a substring of the unquoted path and query
(``'run/1/commit_success.txt'`` matches S3's ``/bucket/run/1/commit_success.txt`` and GCS's
``?name=run%2F1%2Fcommit_success.txt``). It skips the first ``after`` matches, then acts on
every ``every``-th one, at most ``limit`` times (None: for ever). A periodic fault (``every`` > 1)
lets the retry of a request it hit pass, so tensorstore's retries always get through. Its
``kind``:

- ``status``: answers ``status`` (503, 429, 500, ...) with the error body the server's flavour
  sends (S3 XML, GCS JSON); the request never reaches the server.
- ``reset_request``: reads the request head and resets the connection (TCP RST) before the body
  is read; the server never sees it.
- ``reset_response``: forwards the request (the server applies it), then sends half of the
  response and resets the connection: the client cannot know the request took effect.
- ``delay``: waits ``delay_s`` seconds, then forwards.
- ``hang``: holds the request (never forwarded) until ``release()`` or ``delay_s`` seconds,
  then resets the connection: a request in flight when a writer is killed.
- ``die``: the server dies: this request's connection and every other is reset, and new ones
  are refused (``stop``).

The schedule is deterministic (counted per fault, under a lock). ``injected`` counts what was
done (``'status 503'``, ``'reset_request'``, ...), ``requests`` every request by method, so a
test can assert that its faults really happened; ``wait_for(label)`` waits until one was. A
process that cannot reach this object (a subprocess) sends ``GET /__fault_proxy__/clear`` to
remove every fault, or ``GET /__fault_proxy__/injected`` for the counts as JSON. Standard
library only.
"""

from __future__ import annotations

import collections
import dataclasses
import http.client
import http.server
import json
import socket
import struct
import threading
import time
import urllib.parse
from typing import Any

_HOP_BY_HOP = frozenset(('connection', 'keep-alive', 'proxy-authenticate', 'proxy-authorization',
                         'te', 'trailers', 'transfer-encoding', 'upgrade', 'expect',
                         'content-length'))
_CONTROL = '/__fault_proxy__/'
_REASONS = {429: ('SlowDown', 'rateLimitExceeded', 'Too many requests; reduce your request rate.'),
            500: ('InternalError', 'backendError',
                  'We encountered an internal error. Please try again.'),
            502: ('InternalError', 'backendError', 'Bad gateway.'),
            503: ('SlowDown', 'backendError', 'Service unavailable; please reduce your request '
                  'rate.'),
            504: ('RequestTimeout', 'backendError', 'Gateway timeout.')}


@dataclasses.dataclass
class Fault:
  """One rule of the schedule (see the module docstring)."""
  kind: str
  status: int = 503
  method: str | None = None
  path_contains: str | None = None
  every: int = 1
  after: int = 0
  limit: int | None = None
  delay_s: float = 0.0
  matched: int = 0
  done: int = 0
  _hit: set[tuple[str, str]] = dataclasses.field(default_factory=set)

  def __post_init__(self) -> None:
    if self.kind not in ('status', 'reset_request', 'reset_response', 'delay', 'hang', 'die'):
      raise ValueError(f'unknown fault kind {self.kind!r}')
    if self.every < 1:
      raise ValueError('every must be >= 1')

  @property
  def label(self) -> str:
    return f'status {self.status}' if self.kind == 'status' else self.kind

  def _take(self, method: str, path: str) -> bool:
    """Whether this request gets the fault (counts the match)."""
    if self.method is not None and method != self.method:
      return False
    if self.path_contains is not None and self.path_contains not in path:
      return False
    if self.limit is not None and self.done >= self.limit:
      return False
    if self.every > 1 and (method, path) in self._hit:
      self._hit.discard((method, path))  # Its retry passes: a periodic fault fails no request
      return False                       # twice in a row.
    self.matched += 1
    if self.matched <= self.after or (self.matched - self.after) % self.every:
      return False
    self.done += 1
    self._hit.add((method, path))
    return True


class FaultProxy:
  """The proxy: ``endpoint`` is its URL; forwards to ``upstream`` (``http://host:port``)."""

  def __init__(self, upstream: str, flavor: str):
    if flavor not in ('s3', 'gs'):
      raise ValueError(f'flavor must be s3 or gs, got {flavor!r}')
    parsed = urllib.parse.urlsplit(upstream)
    self.upstream = (parsed.hostname or '127.0.0.1', parsed.port or 80)
    self.flavor = flavor
    self.faults: list[Fault] = []
    self.injected: collections.Counter[str] = collections.Counter()
    self.requests: collections.Counter[str] = collections.Counter()
    self.log: list[tuple[str, str, str]] = []  # (method, path, what happened)
    self._lock = threading.Lock()
    self._connections: set[socket.socket] = set()
    self._changed = threading.Condition(self._lock)
    self._released = threading.Event()
    self._stopped = False
    self._server = _Server(('127.0.0.1', 0), _handler_class(self))
    self.endpoint = f'http://127.0.0.1:{self._server.server_address[1]}'
    self._thread = threading.Thread(target=self._server.serve_forever, name='fault-proxy',
                                    kwargs={'poll_interval': 0.05}, daemon=True)
    self._thread.start()

  def inject(self, *faults: Fault) -> None:
    """Adds faults to the schedule."""
    with self._lock:
      self.faults.extend(faults)

  def clear(self) -> None:
    """Removes every fault (requests pass through from now on) and releases held ones."""
    with self._lock:
      self.faults.clear()
    self.release()

  def release(self) -> None:
    """Ends every ``hang`` now (those requests fail; later ones hang again)."""
    self._released.set()
    self._released = threading.Event()

  def wait_for(self, label: str, count: int = 1, timeout: float = 60) -> None:
    """Waits until ``count`` faults labelled ``label`` were injected."""
    with self._changed:
      if not self._changed.wait_for(lambda: self.injected[label] >= count, timeout):
        raise TimeoutError(f'fault proxy: {label!r} injected {self.injected[label]} times, '
                           f'not {count}, in {timeout} s; requests: {dict(self.requests)}')

  def total_injected(self) -> int:
    with self._lock:
      return sum(count for label, count in self.injected.items() if label != 'delay')

  def stop(self) -> None:
    """Closes the listener (new connections are refused) and resets every open connection,
    as a server that died does."""
    with self._lock:
      if self._stopped:
        return
      self._stopped = True
    self._server.shutdown()
    self._server.server_close()
    self._thread.join(10)
    self.release()
    with self._lock:
      connections, self._connections = list(self._connections), set()
    for sock in connections:
      try:  # Wakes the handler blocked reading it (close alone waits for its file objects).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
      except OSError:
        pass

  def __enter__(self) -> FaultProxy:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.stop()

  def _choose(self, method: str, path: str) -> Fault | None:
    path = urllib.parse.unquote(path)
    with self._lock:
      self.requests[method] += 1
      for fault in self.faults:
        if fault._take(method, path):
          self.injected[fault.label] += 1
          self._changed.notify_all()
          self.log.append((method, path, fault.label))
          return fault
      self.log.append((method, path, 'forwarded'))
      return None

  def error_body(self, status: int) -> tuple[bytes, str]:
    """What the server's flavour says with ``status``: S3's XML error, GCS's JSON error."""
    s3_code, gcs_reason, message = _REASONS.get(status, ('InternalError', 'backendError',
                                                         'Error.'))
    if self.flavor == 's3':
      body = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>'
              f'{s3_code}</Code><Message>{message}</Message><RequestId>FAULTPROXY</RequestId>'
              '<HostId>fault-proxy</HostId></Error>')
      return body.encode(), 'application/xml'
    return json.dumps({'error': {'code': status, 'message': message, 'errors': [
        {'domain': 'global', 'reason': gcs_reason, 'message': message}]}}).encode(), \
        'application/json; charset=UTF-8'


class _Server(http.server.ThreadingHTTPServer):
  daemon_threads = True

  def handle_error(self, request: Any, client_address: Any) -> None:
    pass  # Broken connections are what this proxy is for; the tests check the outcomes.


def _reset(sock: socket.socket) -> None:
  """Closes ``sock`` with a TCP RST (linger 0) instead of an orderly FIN."""
  try:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
  except OSError:
    pass
  sock.close()


def _handler_class(proxy: FaultProxy) -> type[http.server.BaseHTTPRequestHandler]:

  class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name.
      pass

    def setup(self) -> None:
      super().setup()
      # Without it, Nagle's algorithm and delayed ACKs cost ~40 ms per response.
      self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
      with proxy._lock:
        proxy._connections.add(self.connection)

    def finish(self) -> None:
      with proxy._lock:
        proxy._connections.discard(self.connection)
      try:
        super().finish()
      except OSError:
        pass

    def handle_expect_100(self) -> bool:
      return True  # Answered in _serve, once the schedule says whether the body is wanted.

    def _serve(self) -> None:
      method, path = self.command, self.path
      if path.startswith(_CONTROL):
        self._control(path[len(_CONTROL):])
        return
      fault = proxy._choose(method, path)
      if fault is not None and fault.kind in ('reset_request', 'hang', 'die'):
        if fault.kind == 'hang':
          proxy._released.wait(fault.delay_s)
        elif fault.kind == 'die':
          threading.Thread(target=proxy.stop, daemon=True).start()
        self.close_connection = True
        _reset(self.connection)
        return
      if self.headers.get('Expect', '').lower() == '100-continue':
        self.send_response_only(100)
        self.end_headers()
      body = self._read_body()
      if fault is not None and fault.kind == 'status':
        data, content_type = proxy.error_body(fault.status)
        self.send_response_only(fault.status)
        self.send_header('Content-Type', content_type)
        self.send_header('Content-Length', str(len(data)))
        if fault.status in (429, 503):
          self.send_header('Retry-After', '0')
        self.end_headers()
        if method != 'HEAD':
          self.wfile.write(data)
        return
      if fault is not None and fault.kind == 'delay':
        time.sleep(fault.delay_s)
      status, reason, headers, data = self._forward(method, path, body)
      if fault is not None and fault.kind == 'reset_response':
        # The first half of the response as it would go out (head and body), then a reset.
        head = ''.join([f'HTTP/1.1 {status} {reason}\r\n'] +
                       [f'{name}: {value}\r\n' for name, value in headers] + ['\r\n'])
        whole = head.encode('latin-1') + (b'' if method == 'HEAD' else data)
        try:
          self.wfile.write(whole[:len(whole) // 2])
          self.wfile.flush()
        except OSError:
          pass
        self.close_connection = True
        _reset(self.connection)
        return
      self.send_response_only(status, reason)
      for name, value in headers:
        self.send_header(name, value)
      self.end_headers()
      if method != 'HEAD':
        self.wfile.write(data)

    def _control(self, command: str) -> None:
      if command == 'clear':
        proxy.clear()
      elif command != 'injected':
        self.send_error(404)
        return
      with proxy._lock:
        data = json.dumps(dict(proxy.injected)).encode()
      self.send_response_only(200)
      self.send_header('Content-Type', 'application/json')
      self.send_header('Content-Length', str(len(data)))
      self.end_headers()
      self.wfile.write(data)

    def _read_body(self) -> bytes | None:
      if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
        parts: list[bytes] = []
        while True:
          size = int(self.rfile.readline().split(b';')[0].strip(), 16)
          if size == 0:
            while self.rfile.readline() not in (b'\r\n', b'\n', b''):
              pass
            return b''.join(parts)
          parts.append(self.rfile.read(size))
          self.rfile.readline()
      length = self.headers.get('Content-Length')
      return self.rfile.read(int(length)) if length is not None else None

    def _forward(self, method: str, path: str, body: bytes | None
                 ) -> tuple[int, str, list[tuple[str, str]], bytes]:
      conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
      try:
        conn.connect()
        assert conn.sock is not None
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        headers = {name: value for name, value in self.headers.items()
                   if name.lower() not in _HOP_BY_HOP}
        if body is None and method in ('PUT', 'POST', 'PATCH'):
          body = b''
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
      finally:
        conn.close()
      out = [(name, value) for name, value in response.getheaders()
             if name.lower() not in _HOP_BY_HOP]
      if method == 'HEAD' or response.status in (204, 304):
        length = response.getheader('Content-Length')
        if length is not None:
          out.append(('Content-Length', length))
      else:
        out.append(('Content-Length', str(len(data))))
      return response.status, response.reason, out, data

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _serve

  return Handler
