"""A small client for megaengined's control socket, written from docs/control-protocol.md alone.

    c = meclient.connect("/path/to/megaengined.sock")
    c.request("node.status")                  # -> result map, or raises MeError
    c.close()

Besides request(), the Connection has raw helpers for tests: send_raw() (bytes as they are),
send_body() (one frame around given bytes), send_obj() (one frame around a packed object),
send_request() (a request without waiting), read_frame(), request_progress() (a request whose
progress frames are kept) and is_closed().
"""

import select
import socket
import struct
import time

import msgpack

PROTO_VERSION = 1
MAX_REQUEST_BODY = 1 << 20  # 1 MiB
MAX_REPLY_BODY = 16 << 20  # 16 MiB

# The error table of the protocol (code -> name).
ERRORS = {
    -1: "EINTERNAL", -2: "ENOMEM", -3: "EINVAL", -4: "EIO", -5: "EPROTO", -6: "ETOOBIG",
    -7: "EVERSION", -8: "EUNKNOWN", -9: "EARG", -10: "ENOTFOUND", -11: "EEXIST",
    -12: "EPERM", -13: "ENOKEY", -14: "EKEY", -15: "ENOTREPO", -16: "EEMPTY", -17: "EGIT",
    -18: "EDB", -19: "EBADID", -20: "EBUSY", -21: "ECONN", -22: "ETIMEDOUT",
    -23: "ESHUTDOWN",
    -24: "EDIRTY",
    -25: "EDIVERGED",
    -26: "ENOSPC",
    -27: "EUNAVAIL",
    -28: "ECANCELED",
}


class MeError(Exception):
    """An error reply: code (negative int), name ("ENOTFOUND") and message."""

    def __init__(self, code, name, message, reply=None):
        super().__init__(f"{name} ({code}): {message}")
        self.code = code
        self.name = name
        self.message = message
        self.reply = reply


class Closed(ConnectionError):
    """The daemon closed the connection (EOF or ECONNRESET)."""


def pack(obj):
    return msgpack.packb(obj, use_bin_type=True)


def frame(body):
    """Frames raw body bytes: u32 big-endian length || body."""
    return struct.pack(">I", len(body)) + body


def request_obj(cmd, args=None, rid=1, v=PROTO_VERSION):
    return {"v": v, "id": rid, "cmd": cmd, "args": {} if args is None else args}


class Connection:
    def __init__(self, path, timeout=10.0):
        self.path = path
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self.buf = b""
        self.next_id = 1
        self.eof = False

    @classmethod
    def from_socket(cls, sock, timeout=10.0):
        """Wraps an already connected socket."""
        c = cls.__new__(cls)
        c.path, c.timeout, c.sock = None, timeout, sock
        c.buf, c.next_id, c.eof = b"", 1, False
        return c

    # ---- sending ----

    def send_raw(self, data):
        self.sock.sendall(data)

    def send_body(self, body):
        self.send_raw(frame(body))

    def send_obj(self, obj):
        self.send_body(pack(obj))

    def new_id(self):
        rid = self.next_id
        self.next_id = self.next_id + 1 if self.next_id < 0xFFFFFFFF else 1
        return rid

    def send_request(self, cmd, args=None, rid=None, v=PROTO_VERSION):
        """Sends one request without waiting; returns its id."""
        if rid is None:
            rid = self.new_id()
        self.send_obj(request_obj(cmd, args, rid, v))
        return rid

    # ---- receiving ----

    def _fill(self, deadline):
        """Reads more bytes into self.buf. Raises Closed at EOF, TimeoutError at deadline."""
        if self.eof:
            raise Closed("connection closed by megaengined")
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no reply from megaengined")
        r, _, _ = select.select([self.sock], [], [], left)
        if not r:
            raise TimeoutError("no reply from megaengined")
        try:
            chunk = self.sock.recv(1 << 20)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            raise Closed("connection closed by megaengined")
        self.buf += chunk

    def read_frame(self, timeout=None):
        """Returns the next reply frame decoded (a dict). Raises Closed or TimeoutError."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while len(self.buf) < 4:
            self._fill(deadline)
        (n,) = struct.unpack(">I", self.buf[:4])
        if n == 0 or n > MAX_REPLY_BODY:
            raise ValueError(f"bad reply frame length {n}")
        while len(self.buf) < 4 + n:
            self._fill(deadline)
        body, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
        return msgpack.unpackb(body, raw=False)

    def read_reply(self, rid, timeout=None):
        """Returns the final reply frame (kind result or error) for request rid, skipping
        progress frames and frames for other ids. An error with id 0 is also returned."""
        while True:
            r = self.read_frame(timeout)
            if r.get("kind") == "error" and r.get("id") in (rid, 0):
                return r
            if r.get("id") != rid or r.get("kind") == "progress":
                continue
            return r

    @staticmethod
    def result_of(reply):
        if reply.get("kind") == "error":
            e = reply.get("error") or {}
            raise MeError(e.get("code"), e.get("name"), e.get("message"), reply)
        return reply.get("result")

    def request(self, cmd, args=None, v=PROTO_VERSION, timeout=None):
        """Sends a request and returns its result, or raises MeError."""
        rid = self.send_request(cmd, args, v=v)
        return self.result_of(self.read_reply(rid, timeout))

    def request_progress(self, cmd, args=None, timeout=None):
        """Sends a request and returns (result, [its progress maps in arrival order]) once its
        final reply arrives; raises MeError on an error reply. Frames of other ids are
        skipped."""
        rid = self.send_request(cmd, args)
        progress = []
        while True:
            r = self.read_frame(timeout)
            if r.get("kind") == "error" and r.get("id") in (rid, 0):
                return self.result_of(r), progress
            if r.get("id") != rid:
                continue
            if r.get("kind") == "progress":
                progress.append(r.get("progress"))
                continue
            return self.result_of(r), progress

    def is_closed(self, timeout=5.0):
        """True when the daemon closes the connection within timeout (frames still buffered
        are discarded); False if it is still open at the deadline."""
        deadline = time.monotonic() + timeout
        self.buf = b""
        while True:
            try:
                self._fill(deadline)
            except Closed:
                return True
            except TimeoutError:
                return False
            self.buf = b""

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def connect(path, timeout=10.0):
    return Connection(path, timeout)
