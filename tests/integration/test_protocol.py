"""The control protocol (docs/control-protocol.md) against real daemons, through meclient.py.

Every hostile test ends with check_alive(): the daemon process still runs and `honest`, a client
connected before any test ran, still gets answers.
"""
import grp
import hashlib
import os
import pwd
import re
import shutil
import socket
import stat
import struct
import subprocess
import threading
import time

import msgpack
import pytest

import meclient
from meclient import MeError, frame, pack, request_obj
from protocol_fixtures import (honest, mectl, proto_daemon, proto_env,  # noqa: F401
                               proto_factory, repos)

B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
DID_KEY_RE = re.compile(r"did:key:z6Mk[1-9A-HJ-NP-Za-km-z]+")
DID_REPO_RE = re.compile(r"did:repo:z[1-9A-HJ-NP-Za-km-z]+")
MiB = 1 << 20


def b58encode(data):
    n = int.from_bytes(data, "big")
    out = ""
    while n:
        n, r = divmod(n, 58)
        out = B58[r] + out
    return "1" * (len(data) - len(data.lstrip(b"\0"))) + out


def b58decode(s):
    n = 0
    for ch in s:
        n = n * 58 + B58.index(ch)
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return b"\0" * (len(s) - len(s.lstrip("1"))) + body


def did_repo(root_commit_hex, node_did):
    """The documented formula: did:repo:z + b58(0x16 0x20 || SHA3-256(root oid || pk))."""
    raw = b58decode(node_did[len("did:key:z"):])
    assert raw[:2] == b"\xed\x01" and len(raw) == 34
    digest = hashlib.sha3_256(bytes.fromhex(root_commit_hex) + raw[2:]).digest()
    return "did:repo:z" + b58encode(b"\x16\x20" + digest)


def check_alive(daemon, honest):
    assert daemon.alive(), f"megaengined died:\n{daemon.stderr()}"
    st = honest.request("node.status")
    assert DID_KEY_RE.fullmatch(st["did"])


def expect_error(conn, rid, name, closed=None, timeout=10.0):
    """Reads the next frame: an error reply with this id and name. closed=True: the daemon then
    closes the connection; closed=False: the connection still answers requests."""
    r = conn.read_frame(timeout)
    assert r.get("kind") == "error", r
    assert set(r) == {"v", "id", "kind", "error"}, r
    assert r["v"] == 1 and r["id"] == rid, r
    e = r["error"]
    assert e["name"] == name, r
    assert meclient.ERRORS[e["code"]] == name, r
    assert isinstance(e["message"], str) and e["message"], r
    if closed is True:
        assert conn.is_closed(), "daemon kept the connection open after a bad frame"
    elif closed is False:
        assert conn.request("node.id")["did"].startswith("did:key:z")
    return e


def error_of(conn, cmd, args=None):
    with pytest.raises(MeError) as ei:
        conn.request(cmd, args)
    return ei.value


# ---- happy paths ---------------------------------------------------------------------------

def test_node_status(proto_daemon, honest):
    st = honest.request("node.status")
    assert set(st) >= {"did", "alias", "addresses", "version", "uptime_s", "root", "repos",
                       "nodes", "peers", "control_connections"}
    assert DID_KEY_RE.fullmatch(st["did"])
    assert isinstance(st["alias"], str) and st["alias"]
    assert isinstance(st["addresses"], list) and all(isinstance(a, str) for a in st["addresses"])
    assert any(a.startswith("127.0.0.1:") for a in st["addresses"])
    assert isinstance(st["version"], str) and st["version"]
    for k in ("uptime_s", "repos", "nodes", "peers"):
        assert isinstance(st[k], int) and st[k] >= 0, k
    assert st["root"] == str(proto_daemon.root)
    assert st["control_connections"] >= 1
    with proto_daemon.connect() as c2:
        assert c2.request("node.status")["control_connections"] >= 2


def test_args_absent_or_nil(proto_daemon, honest):
    with proto_daemon.connect() as c:
        c.send_obj({"v": 1, "id": 7, "cmd": "node.id"})
        r = c.read_reply(7)
        assert r["kind"] == "result" and DID_KEY_RE.fullmatch(r["result"]["did"])
        c.send_obj({"v": 1, "id": 8, "cmd": "node.id", "args": None, "extra": [1, 2]})
        assert c.read_reply(8)["kind"] == "result"
    check_alive(proto_daemon, honest)


def test_auth_show_node_id_and_auth_init_existing(honest):
    a = honest.request("auth.show")
    n = honest.request("node.id")
    assert DID_KEY_RE.fullmatch(a["did"]) and a == n
    i = honest.request("auth.init")
    assert i == {"did": a["did"], "created": False}


def test_auth_init_on_fresh_node(proto_factory, repos):
    d = proto_factory.start(with_key=False)
    with d.connect() as c:
        for cmd in ("auth.show", "node.id"):
            e = error_of(c, cmd)
            assert (e.code, e.name) == (-13, "ENOKEY")
        e = error_of(c, "repo.add", {"path": str(repos())})
        assert e.name == "ENOKEY"
        assert c.request("node.status")["did"] is None
        assert c.request("repo.list") == {"repos": []}
        r = c.request("auth.init")
        assert r["created"] is True and DID_KEY_RE.fullmatch(r["did"])
        assert stat.S_IMODE(os.stat(d.root / "keypair").st_mode) == 0o600
        assert c.request("auth.init") == {"did": r["did"], "created": False}
        assert c.request("node.id") == {"did": r["did"]}
        assert c.request("node.status")["did"] == r["did"]


def test_repo_lifecycle(proto_daemon, honest, repos):
    path = repos(commits=3, name="life.git", tags=("v1",))
    node_did = honest.request("node.id")["did"]
    added = honest.request("repo.add", {"path": str(path), "description": "héllo"})
    root_commit = repos.git(path, "rev-list", "--max-parents=0", "HEAD")
    assert added["id"] == did_repo(root_commit, node_did)
    assert DID_REPO_RE.fullmatch(added["id"])
    assert added["name"] == "life"
    assert added["creator"] == node_did and added["mine"] is True
    assert added["description"] == "héllo"
    assert added["path"] == os.path.realpath(path)
    assert added["is_external"] is False and added["state"] == "up to date"
    assert added["root_commit"] == root_commit
    assert added["head"] == "refs/heads/main"
    assert isinstance(added["created_at"], int) and isinstance(added["updated_at"], int)
    refs = repos.git(path, "for-each-ref", "--format=%(refname) %(objectname)",
                     "refs/heads", "refs/tags")
    want = sorted(tuple(l.split()) for l in refs.splitlines())
    assert [(r["name"], r["oid"]) for r in added["refs"]] == want

    shown = honest.request("repo.show", {"repo_id": added["id"]})
    assert shown == added

    listed = honest.request("repo.list")["repos"]
    mine = [r for r in listed if r["id"] == added["id"]]
    assert len(mine) == 1 and "refs" not in mine[0]
    assert mine[0] == {k: v for k, v in added.items() if k != "refs"}
    names = [(r["name"], r["id"]) for r in listed]
    assert names == sorted(names)

    assert honest.request("repo.remove", {"repo_id": added["id"]}) == {"removed": added["id"]}
    for cmd in ("repo.show", "repo.remove"):
        e = error_of(honest, cmd, {"repo_id": added["id"]})
        assert (e.code, e.name) == (-10, "ENOTFOUND")
    assert added["id"] not in [r["id"] for r in honest.request("repo.list")["repos"]]
    assert path.is_dir() and (path / "f.txt").exists()  # files are kept


def test_worked_example_bytes(proto_daemon, honest):
    """The byte-level example of the document, sent byte for byte."""
    req = bytes.fromhex("0000001a84a17601a2696401a3636d64a76e6f64652e6964a46172677380")
    assert req == frame(pack(request_obj("node.id", {}, 1)))
    did = honest.request("node.id")["did"]
    with proto_daemon.connect() as c:
        c.send_raw(req)
        r = c.read_frame()
        assert r == {"v": 1, "id": 1, "kind": "result", "result": {"did": did}}
        # Re-packing gives the daemon's exact bytes (key order, minimal int and str sizes).
        c.send_raw(req)
        raw = b""
        while len(raw) < 4 or len(raw) < 4 + struct.unpack(">I", raw[:4])[0]:
            chunk = c.sock.recv(65536)
            assert chunk
            raw += chunk
        assert raw == frame(pack({"v": 1, "id": 1, "kind": "result", "result": {"did": did}}))
        assert raw[:4] == struct.pack(">I", 90) and raw[36:38] == b"\xd9\x38"


def _fake_daemon(path, reply):
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def run():
        conn, _ = srv.accept()
        conn.recv(65536)
        conn.sendall(reply)
        conn.close()
        srv.close()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_mectl_exit_codes(proto_daemon, proto_env, repos, tmp_path):
    sock = ["--socket", proto_daemon.socket]
    assert mectl(sock + ["node", "status"], proto_env).returncode == 0
    r = mectl(sock + ["--json", "repo", "show", "nope"], proto_env, check=False)
    assert r.returncode == 1 and "EBADID" in r.stderr
    assert '"EBADID"' in r.stdout
    assert mectl(sock + ["repo", "frobnicate"], proto_env, check=False).returncode == 2
    assert mectl(["--socket", tmp_path / "none.sock", "node", "status"], proto_env,
                 check=False).returncode == 3
    fake = str(tmp_path / "fake.sock")
    t = _fake_daemon(fake, b"\0\0\0\0")  # a zero-length frame
    assert mectl(["--socket", fake, "node", "status"], proto_env, check=False).returncode == 4
    t.join(5)


# ---- bad frames: error with id 0, then the daemon hangs up ---------------------------------

@pytest.mark.parametrize("data,name", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "ETOOBIG"),   # garbage: 'GET ' is ~1.2 GB
    (b"\xff\xff\xff\xff", "ETOOBIG"),                     # 4 GiB
    (struct.pack(">I", MiB + 1), "ETOOBIG"),              # 1 MiB + 1
    (struct.pack(">I", MiB + 1) + b"\x90" * 1000, "ETOOBIG"),
    (b"\0\0\0\0", "EPROTO"),                              # zero length
    (b"\0\0\0\0" + frame(pack(request_obj("node.id"))), "EPROTO"),
], ids=["garbage", "4GiB", "1MiB+1", "1MiB+1-with-body", "zero", "zero-then-good"])
def test_bad_frame(proto_daemon, honest, data, name):
    with proto_daemon.connect() as c:
        c.send_raw(data)
        expect_error(c, 0, name, closed=True)
    check_alive(proto_daemon, honest)


def test_bad_frame_after_good_requests_in_separate_writes(proto_daemon, honest):
    with proto_daemon.connect() as c:
        rid = c.send_request("node.id")
        assert c.read_reply(rid)["kind"] == "result"
        c.send_raw(b"\xff\xff\xff\xff")
        expect_error(c, 0, "ETOOBIG", closed=True)
    check_alive(proto_daemon, honest)


def test_exactly_1mib_frame_is_accepted(proto_daemon, honest):
    base = pack({"v": 1, "id": 5, "cmd": "node.id", "args": {}, "pad": ""})
    pad = MiB - len(base) - 4  # the str header grows from 1 to 5 bytes (str32)
    body = pack({"v": 1, "id": 5, "cmd": "node.id", "args": {}, "pad": "x" * pad})
    assert len(body) == MiB
    with proto_daemon.connect() as c:
        c.send_body(body)
        assert c.read_reply(5)["kind"] == "result"
    check_alive(proto_daemon, honest)


def test_truncated_frame_then_close(proto_daemon, honest):
    with proto_daemon.connect() as c:
        good = frame(pack(request_obj("node.id", rid=3)))
        c.send_raw(good[:-5])
        c.sock.shutdown(socket.SHUT_WR)
        assert c.is_closed(), "daemon did not hang up after EOF"
    with proto_daemon.connect() as c:
        c.send_raw(struct.pack(">I", 1000) + b"\x80" * 10)
    check_alive(proto_daemon, honest)


# ---- bad bodies and bad requests: error reply, connection stays open -----------------------

@pytest.mark.parametrize("body,name", [
    (b"\xc1", "EPROTO"),                                            # never-used type byte
    (b"not msgpack at all \xc1", "EPROTO"),
    (pack(request_obj("node.id", rid=9)) + b"\0", "EPROTO"),        # trailing byte
    (pack(request_obj("node.id", rid=9))[:-1], "EPROTO"),           # cut inside the object
    (b"\x91" * 100 + b"\xc0", "ETOOBIG"),                           # 100 nested arrays
    (b"\x81\xa1k" * 100 + b"\xc0", "ETOOBIG"),                      # 100 nested maps
    (b"\x91" * 17 + b"\xc0", "ETOOBIG"),                            # one over the limit
    (b"\xdf\xff\xff\xff\xff", "EPROTO"),                            # map of 2^32-1 entries
    (b"\xdf\xff\xff\xff\xff" + b"\xc0" * 64, "EPROTO"),
    (b"\xdd\xff\xff\xff\xff\xc0", "EPROTO"),                        # array of 2^32-1
    (b"\xdb\xff\xff\xff\xffabc", "EPROTO"),                         # str32 of 4 GiB
    (b"\xd4\x01\x00", "EPROTO"),                                    # fixext1
    (b"\x81\xa1v\xc7\x01\x05x", "EPROTO"),                          # ext8 inside a map
    (b"\xdd\x00\x01\x00\x01" + b"\xc0" * 65537, "ETOOBIG"),          # 65538 objects
], ids=["c1", "text", "trailing", "cut", "deep-arrays", "deep-maps", "depth-17", "map-2^32",
        "map-2^32-padded", "array-2^32", "str-4GiB", "fixext", "ext8", "too-many-objects"])
def test_bad_body(proto_daemon, honest, body, name):
    with proto_daemon.connect() as c:
        c.send_body(body)
        expect_error(c, 0, name, closed=False)
    check_alive(proto_daemon, honest)


def test_limits_are_inclusive(proto_daemon, honest):
    with proto_daemon.connect() as c:
        # 16 nested arrays and 65536 objects pass the frame checks; the request is then refused
        # only because it is not a map.
        c.send_body(b"\x91" * 16 + b"\xc0")
        assert expect_error(c, 0, "EPROTO")["message"] != ""
        c.send_body(b"\xdd\x00\x00\xff\xff" + b"\xc0" * 65535)
        expect_error(c, 0, "EPROTO")
        # request map, args map and 14 nested arrays: depth 16, still accepted
        nested = None
        for _ in range(14):
            nested = [nested]
        c.send_obj(request_obj("node.id", {"x": nested}, rid=4))
        assert expect_error(c, 4, "EARG")["message"] == "unknown argument"
    check_alive(proto_daemon, honest)


@pytest.mark.parametrize("obj,rid,name", [
    ([1, 2, "node.id", {}], 0, "EPROTO"),                                   # array request
    ("node.id", 0, "EPROTO"),
    ({"v": 1, "id": "12", "cmd": "node.id", "args": {}}, 0, "EPROTO"),      # id is a string
    ({"v": 1, "id": -1, "cmd": "node.id", "args": {}}, 0, "EPROTO"),
    ({"v": 1, "id": 1 << 32, "cmd": "node.id", "args": {}}, 0, "EPROTO"),
    ({"v": 1, "cmd": "node.id", "args": {}}, 0, "EPROTO"),                  # no id
    ({"id": 21, "cmd": "node.id", "args": {}}, 21, "EPROTO"),               # no v
    ({"v": "1", "id": 22, "cmd": "node.id", "args": {}}, 22, "EPROTO"),
    ({"v": 2, "id": 23, "cmd": "node.id", "args": {}}, 23, "EVERSION"),
    ({"v": 0, "id": 24, "cmd": "node.id", "args": {}}, 24, "EVERSION"),
    ({"v": 1, "id": 25, "args": {}}, 25, "EPROTO"),                         # no cmd
    ({"v": 1, "id": 26, "cmd": 5, "args": {}}, 26, "EPROTO"),
    ({"v": 1, "id": 27, "cmd": b"node.id", "args": {}}, 27, "EPROTO"),      # bin, not str
    ({"v": 1, "id": 28, "cmd": "node.frobnicate", "args": {}}, 28, "EUNKNOWN"),
    ({"v": 1, "id": 29, "cmd": "", "args": {}}, 29, "EUNKNOWN"),
    ({"v": 1, "id": 30, "cmd": "repo.list", "args": ["x"]}, 30, "EARG"),    # args is a list
    ({"v": 1, "id": 31, "cmd": "repo.list", "args": "x"}, 31, "EARG"),
    ({"v": 1, "id": 32, "cmd": "repo.add", "args": {"path": 5}}, 32, "EARG"),  # path is an int
    ({"v": 1, "id": 33, "cmd": "repo.add", "args": {"path": b"/tmp"}}, 33, "EARG"),
    ({"v": 1, "id": 34, "cmd": "repo.add", "args": {}}, 34, "EARG"),        # missing argument
    ({"v": 1, "id": 35, "cmd": "repo.show", "args": {}}, 35, "EARG"),
    ({"v": 1, "id": 36, "cmd": "repo.remove", "args": None}, 36, "EARG"),
    ({"v": 1, "id": 37, "cmd": "repo.add", "args": {"path": "/tmp", "bogus": "1"}}, 37, "EARG"),
    ({"v": 1, "id": 38, "cmd": "node.status", "args": {"x": 1}}, 38, "EARG"),  # unknown arg
    ({"v": 1, "id": 39, "cmd": "node.status", "args": {1: 1}}, 39, "EARG"),
    ({"v": 1, "id": 40, "cmd": "repo.add", "args": {"path": "/tm\0p"}}, 40, "EARG"),  # NUL
    ({"v": 1, "id": 41, "cmd": "repo.add", "args": {"path": "/" + "a" * 4096}}, 41, "EARG"),
    ({"v": 1, "id": 42, "cmd": "repo.add", "args": {"path": "/tmp", "description": 1}}, 42,
     "EARG"),
    ({"v": 1, "id": 43, "cmd": "repo.add", "args": {"path": "/tmp", "description": "d" * 1025}},
     43, "EARG"),
    ({"v": 1, "id": 44, "cmd": "repo.show", "args": {"repo_id": "z" * 129}}, 44, "EARG"),
    ({"v": 1, "id": 0xFFFFFFFF, "cmd": "nope", "args": {}}, 0xFFFFFFFF, "EUNKNOWN"),
])
def test_bad_request(proto_daemon, honest, obj, rid, name):
    with proto_daemon.connect() as c:
        c.send_body(msgpack.packb(obj, use_bin_type=True, strict_types=False))
        expect_error(c, rid, name, closed=False)
    check_alive(proto_daemon, honest)


def test_bad_requests_on_the_honest_connection(proto_daemon, honest):
    """A bad request does not spoil the connection it came on."""
    for cmd, args, name in [("nope", {}, "EUNKNOWN"), ("repo.add", {}, "EARG"),
                            ("repo.show", {"repo_id": "x"}, "EBADID")]:
        e = error_of(honest, cmd, args)
        assert e.name == name
    with pytest.raises(MeError) as ei:
        honest.request("node.id", v=2)
    assert (ei.value.code, ei.value.name) == (-7, "EVERSION")
    check_alive(proto_daemon, honest)


# ---- repo.add / repo.show failures ---------------------------------------------------------

def test_repo_add_not_a_repository(proto_daemon, honest, repos):
    plain = repos.base / "plain"
    plain.mkdir()
    for p in (plain, repos.base / "does-not-exist", "/proc/self/status"):
        e = error_of(honest, "repo.add", {"path": str(p)})
        assert (e.code, e.name) == (-15, "ENOTREPO"), (p, e)
    check_alive(proto_daemon, honest)


def test_repo_add_subdirectory(proto_daemon, honest, repos):
    path = repos()
    sub = path / "sub" / "dir"
    sub.mkdir(parents=True)
    for p in (sub, path / "sub"):
        e = error_of(honest, "repo.add", {"path": str(p)})
        assert e.name == "ENOTREPO", e
    check_alive(proto_daemon, honest)


def test_repo_add_no_commits(proto_daemon, honest, repos):
    e = error_of(honest, "repo.add", {"path": str(repos(commits=0))})
    assert (e.code, e.name) == (-16, "EEMPTY")
    check_alive(proto_daemon, honest)


def test_repo_add_relative_or_empty_path(proto_daemon, honest):
    for p in ("relative/path", ".", "", "../x"):
        e = error_of(honest, "repo.add", {"path": p})
        assert (e.code, e.name) == (-9, "EARG"), (p, e)
    check_alive(proto_daemon, honest)


@pytest.mark.parametrize("bad", ["nope", "", "did:repo:", "did:repo:z", "did:repo:z0OIl",
                                 "did:key:z6MktwupdmLXVVqTzCw4i46r4uGyosGXRnR3XjN4Zq7oMMsw",
                                 "did:repo:z" + b58encode(b"\x16\x20" + b"\1" * 31),
                                 "did:repo:z" + b58encode(b"\x12\x20" + b"\1" * 32),
                                 "did:repo:z" + "2" * 100])
def test_repo_show_malformed_id(proto_daemon, honest, bad):
    for cmd in ("repo.show", "repo.remove"):
        e = error_of(honest, cmd, {"repo_id": bad})
        assert (e.code, e.name) == (-19, "EBADID"), (cmd, bad, e)
    check_alive(proto_daemon, honest)


def test_repo_show_unknown_id(proto_daemon, honest):
    unknown = "did:repo:z" + b58encode(b"\x16\x20" + hashlib.sha3_256(b"nothing").digest())
    assert DID_REPO_RE.fullmatch(unknown)
    for cmd in ("repo.show", "repo.remove"):
        e = error_of(honest, cmd, {"repo_id": unknown})
        assert (e.code, e.name) == (-10, "ENOTFOUND")
    check_alive(proto_daemon, honest)


def test_repo_add_twice(proto_daemon, honest, repos):
    path = repos(commits=2)
    first = honest.request("repo.add", {"path": str(path)})
    link = repos.base / "link-to-repo"
    link.symlink_to(path)
    for p in (path, str(path) + "/", path / ".git", link):
        e = error_of(honest, "repo.add", {"path": str(p)})
        assert (e.code, e.name) == (-11, "EEXIST"), (p, e)
        assert first["id"] in e.message, e.message
    # A clone has the same root commit, so the same id: refused too, naming the id.
    clone = repos.base / "clone"
    repos.git(repos.base, "clone", "-q", str(path), str(clone))
    e = error_of(honest, "repo.add", {"path": str(clone)})
    assert e.name == "EEXIST" and first["id"] in e.message
    honest.request("repo.remove", {"repo_id": first["id"]})
    check_alive(proto_daemon, honest)


# ---- many requests, many connections --------------------------------------------------------

def test_pipelining_50_in_one_write(proto_daemon, honest, repos):
    added = honest.request("repo.add", {"path": str(repos())})
    reqs, expect = [], {}
    for i in range(50):
        rid = 1000 + i * 7
        kind = i % 5
        if kind == 0:
            reqs.append(request_obj("node.id", rid=rid))
            expect[rid] = ("result", None)
        elif kind == 1:
            reqs.append(request_obj("repo.show", {"repo_id": added["id"]}, rid=rid))
            expect[rid] = ("result", None)
        elif kind == 2:
            reqs.append(request_obj("repo.show", {"repo_id": "bad"}, rid=rid))
            expect[rid] = ("error", "EBADID")
        elif kind == 3:
            reqs.append(request_obj("nope", rid=rid))
            expect[rid] = ("error", "EUNKNOWN")
        else:
            reqs.append(request_obj("repo.list", rid=rid))
            expect[rid] = ("result", None)
    with proto_daemon.connect() as c:
        c.send_raw(b"".join(frame(pack(r)) for r in reqs))
        got = {}
        for _ in range(50):
            r = c.read_frame()
            assert r["id"] not in got, f"two replies for id {r['id']}"
            got[r["id"]] = r
        assert set(got) == set(expect)
        for rid, (kind, name) in expect.items():
            assert got[rid]["kind"] == kind, got[rid]
            if name:
                assert got[rid]["error"]["name"] == name
        assert got[1000 + 7]["result"]["id"] == added["id"]
        assert not c.is_closed(timeout=0.2)
    honest.request("repo.remove", {"repo_id": added["id"]})
    check_alive(proto_daemon, honest)


def test_200_idle_connections(proto_daemon, honest):
    before = honest.request("node.status")["control_connections"]
    conns = []
    try:
        for _ in range(200):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(proto_daemon.socket))
            conns.append(s)
        check_alive(proto_daemon, honest)
        with proto_daemon.connect() as c:
            assert c.request("node.status")["control_connections"] >= before + 201
        # Some of the idle ones are honest too.
        s = conns[123]
        s.sendall(frame(pack(request_obj("node.id", rid=77))))
        assert meclient.Connection.from_socket(s).read_reply(77)["kind"] == "result"
    finally:
        for s in conns:
            s.close()
    check_alive(proto_daemon, honest)


def rss_kib(daemon, field="VmRSS"):
    with open(f"/proc/{daemon.proc.pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {daemon.proc.pid}")


def sanitized():
    """ASan keeps freed memory in quarantine and shadows what it maps: RSS says nothing there."""
    from protocol_fixtures import MEGAENGINED
    with open(MEGAENGINED, "rb") as f:
        return b"__asan_init" in f.read()


def count_closed(socks, timeout=5.0):
    """How many of socks the daemon closed (EOF or reset) within timeout; epoll-based, so
    descriptors above 1,024 are fine."""
    import selectors
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    closed, pending, deadline = 0, set(socks), time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for key, _ in sel.select(0.2):
            s = key.fileobj
            pending.discard(s)
            sel.unregister(s)
            try:
                if s.recv(1) == b"":
                    closed += 1
            except ConnectionResetError:
                closed += 1
    sel.close()
    return closed


def wait_connections_below(client, n, timeout=20.0):
    """Closed connections leave the daemon's count once their close is processed."""
    deadline = time.monotonic() + timeout
    while client.request("node.status")["control_connections"] >= n:
        assert time.monotonic() < deadline, f"closed connections still counted after {timeout} s"
        time.sleep(0.1)


def test_1000_idle_connections_and_the_connection_limit(proto_factory):
    """1,000 idle connections (half of them with a partial frame header pending) cost the daemon
    little memory and do not stop it answering; past CONTROL_MAX_CONNS (1,024) new connections
    are closed at once, with one log line, not one per connection."""
    d = proto_factory.start()
    with d.connect() as honest_c:
        honest_c.request("node.status")
        base = rss_kib(d)
        conns = []
        try:
            for i in range(1000):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(d.socket))
                if i % 2:
                    s.sendall(b"\x00\x00")  # half a length prefix, never finished
                conns.append(s)
            st = honest_c.request("node.status")
            assert st["control_connections"] >= 1001
            grown = rss_kib(d) - base
            if not sanitized():
                # About 4 KiB of read buffer and a libuv handle each.
                assert grown < 16 * 1024, f"1,000 idle connections cost {grown} KiB"
            # Beyond the limit: closed without a reply, the daemon keeps serving.
            extra = []
            for _ in range(60):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(d.socket))
                extra.append(s)
            assert honest_c.request("node.id")  # the daemon has accepted them by now
            refused = count_closed(extra)
            # 1,000 idle + the honest one + (at most) the fixture's own are within 1,024.
            assert 30 <= refused <= 60, refused
            assert honest_c.request("node.id")
        finally:
            for s in conns + extra:
                s.close()
        wait_connections_below(honest_c, 10)
    assert d.alive()
    assert d.stderr().count("too many connections") <= 2, d.stderr()


def test_unfinished_frames_are_bounded_in_all(proto_factory):
    """Forty clients each send 1 MiB - 1 of a 1 MiB frame and stop: what the daemon buffers for
    all of them together stays within CONTROL_MAX_BUFFERED (64 MiB); the client that goes past it
    is dropped, the others and honest clients are served."""
    d = proto_factory.start()
    with d.connect() as honest_c:
        honest_c.request("node.status")
        base = rss_kib(d)
        body = MiB
        conns = []
        try:
            for _ in range(40):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(d.socket))
                s.settimeout(20)
                s.sendall(struct.pack(">I", body) + b"\x00" * (body - 1))
                conns.append(s)
            honest_c.request("node.id")  # all of the above has been read by now
            dropped = count_closed(conns, timeout=3)
            # Each partial frame holds a 2 MiB buffer: 64 MiB take 32 of them.
            assert 4 <= dropped <= 12, dropped
            if not sanitized():
                grown = rss_kib(d, "VmHWM") - base
                assert grown < 96 * 1024, f"unfinished frames cost {grown} KiB"
        finally:
            for s in conns:
                s.close()
        wait_connections_below(honest_c, 10)
    assert "unfinished requests and unread replies" in d.stderr()
    assert d.alive()


def test_clients_that_do_not_read_are_bounded_in_all(proto_factory, repos):
    """Twelve clients pipeline requests and never read: each may leave up to 8 MiB of replies
    unsent, all of them together at most 64 MiB; the daemon's memory stays bounded and it keeps
    answering a client that reads."""
    d = proto_factory.start()
    with d.connect() as watcher:
        watcher.request("repo.add", {"path": str(repos()), "description": "d" * 1024})
        one = len(pack({"v": 1, "id": 1, "kind": "result",
                        "result": watcher.request("repo.list")}))
        base = rss_kib(d)
        n = (7 * MiB) // one  # under the per-connection bound: only the total can stop them
        req = b"".join(frame(pack(request_obj("repo.list", rid=i + 1))) for i in range(n))
        conns = []
        try:
            for _ in range(12):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.connect(str(d.socket))
                s.settimeout(30)
                try:
                    s.sendall(req)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                conns.append(s)
            deadline = time.monotonic() + 30
            while "does not read its replies" not in d.stderr() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert watcher.request("repo.list")["repos"][0]["description"] == "d" * 1024
            if not sanitized():
                grown = rss_kib(d, "VmHWM") - base
                # 64 MiB of replies in all, plus the requests being read and allocator slack.
                assert grown < 112 * 1024, f"unread replies cost {grown} KiB"
        finally:
            for s in conns:
                s.close()
    assert "does not read its replies" in d.stderr()
    assert d.alive()


def test_client_that_does_not_read_is_dropped(proto_factory, repos, proto_env):
    d = proto_factory.start()
    with d.connect() as watcher:
        watcher.request("repo.add", {"path": str(repos()), "description": "d" * 1024})
        one = len(pack({"v": 1, "id": 1, "kind": "result",
                        "result": watcher.request("repo.list")}))
        n = (12 * MiB) // one + 1
        with d.connect() as c:
            c.sock.settimeout(20)
            req = b"".join(frame(pack(request_obj("repo.list", rid=i + 1))) for i in range(n))
            try:
                c.send_raw(req)
            except (BrokenPipeError, ConnectionResetError):
                pass
            assert c.is_closed(timeout=20), "a client that never reads was not dropped"
        assert d.alive()
        assert watcher.request("repo.list")["repos"][0]["description"] == "d" * 1024
    assert "does not read its replies" in d.stderr()


# ---- who may connect -----------------------------------------------------------------------

USER = "metestuser"
GROUP = "metestgrp"

PROBE = r"""
import socket, struct, sys, binascii, errno
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("CONNECT", errno.errorcode.get(e.errno, e.errno)); sys.exit(0)
if len(sys.argv) > 2:
    try:
        s.sendall(binascii.unhexlify(sys.argv[2]))
    except OSError:
        pass
data = b""
end = "EOF"
while True:
    try:
        chunk = s.recv(65536)
    except ConnectionResetError:
        end = "RESET"; break
    except socket.timeout:
        end = "OPEN"; break
    if not chunk:
        break
    data += chunk
    if len(sys.argv) > 2 and len(data) >= 4 and len(data) >= 4 + struct.unpack(">I", data[:4])[0]:
        end = "REPLY"; break
print(end, binascii.hexlify(data).decode())
"""


def run_as_user(sock, request=None):
    py = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else shutil.which("python3")
    argv = ["runuser", "-u", USER, "--", py, "-c", PROBE, str(sock)]
    if request is not None:
        argv.append(request.hex())
    r = subprocess.run(argv, capture_output=True, text=True, cwd="/", timeout=30,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    parts = r.stdout.split()
    if parts[0] == "CONNECT":
        return " ".join(parts), b""
    return parts[0], (bytes.fromhex(parts[1]) if len(parts) > 1 else b"")


def frames_of(data):
    out = []
    while data:
        (n,) = struct.unpack(">I", data[:4])
        out.append(msgpack.unpackb(data[4:4 + n], raw=False))
        data = data[4 + n:]
    return out


def ensure_test_user():
    def sh(*a):
        r = subprocess.run(a, capture_output=True, text=True)
        assert r.returncode == 0, f"{a}: {r.stderr}"
    try:
        pwd.getpwnam(USER)
    except KeyError:
        sh("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER)
    try:
        grp.getgrnam(GROUP)
    except KeyError:
        sh("groupadd", "--system", GROUP)
    if USER not in grp.getgrnam(GROUP).gr_mem:
        sh("usermod", "-a", "-G", GROUP, USER)


def test_other_users_are_refused_unless_in_the_socket_group(proto_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a system user and runs a client as that user")
    if shutil.which("runuser") is None:
        pytest.skip("needs runuser (util-linux) to run a client as another user")
    ensure_test_user()
    req = frame(pack(request_obj("node.id", rid=5)))

    base = proto_factory.base(mode=0o755)
    d = proto_factory.start(base=base)
    os.chmod(d.root, 0o711)
    st = os.stat(d.socket)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == 0
    # The file mode alone keeps the user out...
    end, _ = run_as_user(d.socket)
    assert end == "CONNECT EACCES"
    # ...and with the socket opened up by hand, the daemon's own credential check does.
    os.chmod(d.socket, 0o666)
    end, data = run_as_user(d.socket)
    assert end in ("EOF", "RESET"), (end, data)
    replies = frames_of(data)
    assert len(replies) == 1, replies
    r = replies[0]
    assert r["kind"] == "error" and r["id"] == 0, r
    assert (r["error"]["code"], r["error"]["name"]) == (-12, "EPERM"), r
    # Sending a request first changes nothing.
    end, data = run_as_user(d.socket, req)
    assert end in ("EOF", "RESET", "REPLY") and frames_of(data)[0]["error"]["name"] == "EPERM"
    with d.connect() as c:  # root still may
        did = c.request("node.id")["did"]
    d.stop()

    # Same root, now with --socket-group: the user is a (supplementary) member.
    d2 = proto_factory.start(base=base, root=d.root, with_key=False,
                             extra_args=("--socket-group", GROUP))
    st = os.stat(d2.socket)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == grp.getgrnam(GROUP).gr_gid
    end, data = run_as_user(d2.socket, req)
    assert end == "REPLY", (end, data)
    assert frames_of(data) == [{"v": 1, "id": 5, "kind": "result", "result": {"did": did}}]
