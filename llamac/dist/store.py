"""A tiny TCP key-value store for the rendezvous: rank 0 serves it at MASTER_ADDR:MASTER_PORT, the
others connect (retrying until the timeout) and wait for keys (the NCCL unique id).

One request per connection, each a length-prefixed JSON object: {"op": "set", "key", "value"}
or {"op": "get", "key", "timeout"}; a get waits on the server until the key is set.
"""
from __future__ import annotations

import json
import socket
import struct
import threading
import time

from llamac.errors import LlamacError

_LEN = struct.Struct("!I")


def _send(sock: socket.socket, obj) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(_LEN.pack(len(data)) + data)


def _recv(sock: socket.socket):
    def exactly(n):
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("the store closed the connection")
            buf += chunk
        return buf
    (n,) = _LEN.unpack(exactly(_LEN.size))
    return json.loads(exactly(n))


class TCPStore:
    """`TCPStore(addr, port, is_server)`: set(key, str) / get(key, timeout) -> str."""

    def __init__(self, addr: str, port: int, is_server: bool, timeout: float = 300.0):
        self.addr, self.port, self.timeout = addr, int(port), float(timeout)
        self.data: dict[str, str] = {}
        self.cond = threading.Condition()
        self.server = None
        if is_server:
            self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self.server.bind(("" if addr in ("", "0.0.0.0") else addr, self.port))
            except OSError as exc:
                self.server.close()
                raise LlamacError(f"rank 0 cannot serve the rendezvous at {addr}:{port} ({exc.strerror or exc}): "
                                  "set MASTER_PORT to a free port (and MASTER_ADDR to this host)") from None
            self.server.listen(64)
            threading.Thread(target=self._serve, args=(self.server,), name="llamac-store", daemon=True).start()

    # ------------------------------------------------------------ server side
    def _serve(self, server: socket.socket):
        while True:
            try:
                conn, _ = server.accept()
            except OSError:         # closed
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket):
        with conn:
            try:
                req = _recv(conn)
                if req["op"] == "set":
                    self._set_local(req["key"], req["value"])
                    _send(conn, {"ok": True})
                else:
                    _send(conn, {"value": self._get_local(req["key"], float(req["timeout"]))})
            except (OSError, ConnectionError, ValueError, KeyError):
                return

    def _set_local(self, key: str, value: str):
        with self.cond:
            self.data[key] = value
            self.cond.notify_all()

    def _get_local(self, key: str, timeout: float):
        with self.cond:
            self.cond.wait_for(lambda: key in self.data, timeout=timeout)
            return self.data.get(key)

    # ------------------------------------------------------------ both sides
    def set(self, key: str, value: str):
        if self.server is not None:
            return self._set_local(key, value)
        self._request({"op": "set", "key": key, "value": value}, self.timeout)

    def get(self, key: str, timeout: float | None = None) -> str:
        timeout = self.timeout if timeout is None else float(timeout)
        value = (self._get_local(key, timeout) if self.server is not None else
                 self._request({"op": "get", "key": key, "timeout": timeout}, timeout + 10)["value"])
        if value is None:
            raise LlamacError(f"the rendezvous at {self.addr}:{self.port} had no {key!r} after {timeout:.0f} s "
                              "(rank 0 did not start or failed before it)")
        return value

    def _request(self, req: dict, wait: float) -> dict:
        """Send one request, retrying the connection for the store's timeout (rank 0 may start
        later than this rank); the answer may take `wait` seconds (a get waits on the server)."""
        deadline = time.monotonic() + self.timeout
        delay = 0.05
        while True:
            try:
                conn = socket.create_connection((self.addr, self.port), timeout=max(0.1, deadline - time.monotonic()))
                break
            except OSError as exc:
                if time.monotonic() + delay > deadline:
                    raise LlamacError(f"cannot reach the rendezvous at {self.addr}:{self.port} within "
                                      f"{self.timeout:.0f} s ({exc.strerror or exc}): is rank 0 running, and are "
                                      "MASTER_ADDR / MASTER_PORT right?") from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        with conn:
            conn.settimeout(wait)
            try:
                _send(conn, req)
                return _recv(conn)
            except (OSError, ConnectionError) as exc:
                raise LlamacError(f"the rendezvous at {self.addr}:{self.port} broke off ({exc})") from None

    def close(self):
        if self.server is not None:
            try:
                self.server.shutdown(socket.SHUT_RDWR)     # wakes the accept() in the serving thread
            except OSError:
                pass
            self.server.close()
            self.server = None
