"""Live progress for tools/qwenimage_queue.py: ComfyUI's /ws websocket, read with the standard library.

ComfyUI reports sampler steps only over its websocket (/history is written when a prompt ends,
/queue says only "running"), so this module speaks just enough of RFC 6455 to read those
messages: the upgrade handshake, unmasked server frames (text, binary previews, fragments,
ping / close) and masked client frames for pong / close. No extension is offered, so ComfyUI
never compresses. Anything unexpected closes the socket and the caller falls back to polling.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import ssl
import struct
import time
import urllib.parse

_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455's fixed key suffix
_TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x1, 0x2, 0x8, 0x9, 0xA
_MAX_HEADER = 65536
PRINT_EVERY = 1.0  # seconds between step lines for one node (its first and last step always print)


def accept_key(key: str) -> str:
    """The Sec-WebSocket-Accept a server must answer to ``key`` (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1((key + _GUID).encode()).digest()).decode()


class WebSocketError(Exception):
    pass


class WebSocket:
    """A client connection; ``recv`` returns one whole message (str or bytes) or None on timeout."""

    def __init__(self, url: str, timeout: float = 5.0):
        u = urllib.parse.urlsplit(url)
        secure = u.scheme in ("wss", "https")
        port = u.port or (443 if secure else 80)
        sock = socket.create_connection((u.hostname, port), timeout=timeout)
        if secure:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=u.hostname)
        self.sock = sock
        self.buf = bytearray()
        self._fragments: list[bytes] = []
        self._fragment_op = 0
        self.upgraded = False  # a close frame only goes to a peer that speaks websocket
        try:
            self._handshake(u, port, timeout)
            self.upgraded = True
        except BaseException:
            self.close()
            raise

    def _handshake(self, u, port: int, timeout: float) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        request = (f"GET {path} HTTP/1.1\r\nHost: {u.hostname}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self.sock.sendall(request.encode())
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buf:
            if len(self.buf) > _MAX_HEADER or not self._fill(deadline):
                raise WebSocketError("no websocket handshake reply")
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        self.buf = bytearray(rest)  # a first frame may follow the headers in the same packet
        lines = head.decode("latin-1").split("\r\n")
        if len(lines[0].split()) < 2 or lines[0].split()[1] != "101":
            raise WebSocketError(f"the server answered {lines[0]!r} instead of switching to a websocket")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if headers.get("sec-websocket-accept") != accept_key(key):
            raise WebSocketError("bad Sec-WebSocket-Accept in the handshake reply")

    def _fill(self, deadline: float) -> bool:
        """Read more bytes; False on timeout. Raises WebSocketError when the peer closed."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except (socket.timeout, TimeoutError):
            return False
        if not data:
            raise WebSocketError("the server closed the connection")
        self.buf += data
        return True

    def _frame(self):
        """(fin, opcode, payload) of the first whole frame in the buffer, or None."""
        b = self.buf
        if len(b) < 2:
            return None
        n, pos = b[1] & 0x7F, 2
        if n == 126:
            if len(b) < 4:
                return None
            n, pos = struct.unpack(">H", b[2:4])[0], 4
        elif n == 127:
            if len(b) < 10:
                return None
            n, pos = struct.unpack(">Q", b[2:10])[0], 10
        mask = None
        if b[1] & 0x80:  # servers do not mask, but accept it
            if len(b) < pos + 4:
                return None
            mask, pos = bytes(b[pos:pos + 4]), pos + 4
        if len(b) < pos + n:
            return None
        fin, op = bool(b[0] & 0x80), b[0] & 0x0F
        payload = bytes(b[pos:pos + n])
        del b[:pos + n]
        if mask:
            payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
        return fin, op, payload

    def recv(self, timeout: float):
        deadline = time.monotonic() + timeout
        while True:
            frame = self._frame()
            if frame is None:
                if not self._fill(deadline):
                    return None
                continue
            fin, op, payload = frame
            if op == _PING:
                self.send(_PONG, payload)
            elif op == _CLOSE:
                raise WebSocketError("the server closed the websocket")
            elif op in (_TEXT, _BINARY, 0x0):  # 0x0: a continuation of a fragmented message
                if op != 0x0:
                    self._fragment_op, self._fragments = op, []
                self._fragments.append(payload)
                if fin:
                    data = b"".join(self._fragments)
                    self._fragments = []
                    return data.decode("utf-8", "replace") if self._fragment_op == _TEXT else data

    def send(self, op: int, payload: bytes = b"") -> None:
        n = len(payload)
        if n < 126:
            head = struct.pack(">BB", 0x80 | op, 0x80 | n)
        elif n < 1 << 16:
            head = struct.pack(">BBH", 0x80 | op, 0x80 | 126, n)
        else:
            head = struct.pack(">BBQ", 0x80 | op, 0x80 | 127, n)
        mask = os.urandom(4)  # clients must mask every frame
        self.sock.sendall(head + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(payload)))

    def close(self) -> None:
        if self.sock is None:
            return
        if self.upgraded:
            try:
                self.send(_CLOSE, struct.pack(">H", 1000))  # 1000: normal closure
            except OSError:
                pass
        try:
            self.sock.close()
        except OSError:
            pass
        self.sock = None


class Progress:
    """Prints what ComfyUI reports for our prompt: the node it runs and the sampler's steps.

    Connects before the prompt is queued (ComfyUI sends a client's progress only to that
    client's socket). When the websocket cannot be opened it says so once, and the caller's
    polling still shows the queue state and the result."""

    def __init__(self, base_url: str, client_id: str, prompt: dict, quiet: bool = False, out=print):
        self.prompt, self.quiet, self.out = prompt, quiet, out
        self.prompt_id = None
        self.ws = None
        self._last_step: dict = {}
        url = base_url.replace("https://", "wss://", 1).replace("http://", "ws://", 1) + f"/ws?clientId={client_id}"
        try:
            self.ws = WebSocket(url)
        except (OSError, WebSocketError, ValueError) as err:
            self._say(f"  (no live step progress: {url} did not open ({err}); showing the queue state only)")

    def _say(self, line: str) -> None:
        if not self.quiet:
            self.out(line, flush=True)

    def _node(self, node_id) -> str:
        class_type = (self.prompt.get(str(node_id)) or {}).get("class_type")
        return f"node {node_id} ({class_type})" if class_type else f"node {node_id}"

    def pump(self, seconds: float) -> None:
        """Handle what arrives within ``seconds`` (or just wait that long without a socket)."""
        if self.ws is None:
            time.sleep(seconds)
            return
        deadline = time.monotonic() + seconds
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                msg = self.ws.recv(remaining)
            except (OSError, WebSocketError) as err:
                self._say(f"  (live progress stopped: {err}; still polling)")
                self.close()
                time.sleep(max(0.0, deadline - time.monotonic()))
                return
            if msg is None:
                return
            if isinstance(msg, str):  # binary frames are previews
                self.handle(msg)

    def handle(self, text: str) -> None:
        try:
            event = json.loads(text)
        except ValueError:
            return
        data = event.get("data") if isinstance(event, dict) else None
        if not isinstance(data, dict) or self.prompt_id is None or data.get("prompt_id") != self.prompt_id:
            return
        kind = event.get("type")
        if kind == "executing" and data.get("node") is not None:
            self._say(f"  running {self._node(data['node'])}")
        elif kind == "execution_cached" and data.get("nodes"):
            self._say(f"  cached: {', '.join(str(n) for n in data['nodes'])}")
        elif kind == "progress":
            node, value, top = data.get("node"), data.get("value"), data.get("max")
            now = time.monotonic()
            last = self._last_step.get(node)
            if last is None or value == top or now - last >= PRINT_EVERY:
                self._last_step[node] = now
                self._say(f"  {self._node(node)}: step {value}/{top}")

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()
            self.ws = None
