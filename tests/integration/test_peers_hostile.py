"""Hostile peers: a daemon keeps serving its honest peers while a test peer (me-peer, the real
QUIC transport with its own key) sends it forged, replayed, out-of-window, oversized or garbage
input, and certificate mismatches fail the handshake in both directions.

Each gossip case runs on a fresh pair: daemon A and an honest daemon B that bootstraps to A.
me-peer dials A and sends one kind of input; then:
  - A logs "announcement rejected from <me-peer>: <reason>" exactly once per reason (the log is
    rate-limited per reason, the count is not), and nothing is rejected from B;
  - node status --json, when it has a "gossip" object, counts exactly those rejections;
  - A kept the connection to me-peer (it is in A's peer list, me-peer saw no "down"), A still
    answers, B is still connected;
  - nothing forged reached A's node list or repo list;
  - honest gossip still flows: a repository added on B shows up on A.
"""
import os
import signal
import socket
import subprocess
import time

import pytest

from conftest import BUILD_DIR, assert_no_sanitizer

MEPEER = BUILD_DIR / "tests" / "me-peer"
B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
GOSSIP_IVL = "1"  # seconds: B re-announces its repositories quickly
WAIT = 15.0

REJECT_NAMES = ["malformed", "bad signature", "ttl above 16", "timestamp in the future",
                "timestamp too old", "older than the newest from that origin",
                "node announcement from another origin", "ref state not signed by the creator"]


@pytest.fixture(scope="module", autouse=True)
def _mepeer_built():
    if not os.access(MEPEER, os.X_OK):
        pytest.fail(f"missing {MEPEER}: build first (ninja -C {BUILD_DIR})")


def b58encode(data):
    n = int.from_bytes(data, "big")
    out = ""
    while n:
        n, r = divmod(n, 58)
        out = B58[r] + out
    return "1" * (len(data) - len(data.lstrip(b"\0"))) + out


def random_did():
    return "did:key:z" + b58encode(b"\xed\x01" + os.urandom(32))


def udp_free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, what, timeout=WAIT, interval=0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class MePeer:
    """A running me-peer; stdout and stderr go to files next to its root."""

    def __init__(self, factory, args):
        self.dir = factory.new_root().parent
        self.root = self.dir / "peer"
        self.port = udp_free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.out_path = self.dir / "stdout"
        self.err_path = self.dir / "stderr"
        self.argv = [str(MEPEER), "--root", str(self.root), "--addr", self.addr] + \
            [str(a) for a in args]
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(self.argv, env=factory.env, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err)
        self.did = wait_for(self._did, "me-peer to print its did")

    def stdout(self):
        try:
            return self.out_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stderr(self):
        try:
            return self.err_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def lines(self, word):
        return [ln.split() for ln in self.stdout().splitlines() if ln.split()[:1] == [word]]

    def _did(self):
        me = self.lines("me")
        if me:
            return me[0][1]
        if self.proc.poll() is not None:
            pytest.fail(f"me-peer exited {self.proc.returncode}\n{self.info()}")
        return None

    def wait(self, timeout=WAIT):
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"me-peer still running after {timeout} s\n{self.stdout()}")
        assert_no_sanitizer(self.stderr(), "me-peer")
        return rc

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def info(self):
        return f"me-peer {self.argv}\nstdout:\n{self.stdout()}\nstderr:\n{self.stderr()}"


@pytest.fixture
def mepeer(daemon_factory):
    started = []

    def start(*args):
        p = MePeer(daemon_factory, args)
        started.append(p)
        return p
    yield start
    for p in started:
        p.kill()


def start_node(factory, alias, extra=()):
    """A daemon with an identity from the start (auth init before it runs). Returns
    (daemon, did)."""
    root = factory.new_root()
    factory.mectl("--root", root, "auth", "init")
    d = factory.start(root, ["--alias", alias, "--gossip-interval", GOSSIP_IVL, *extra])
    return d, d.mectl("node", "status", json=True).json["did"]


def peer_dids(d):
    return {p["did"] for p in d.mectl("peer", "list", json=True).json["peers"]}


def nodes(d):
    return {n["id"]: n for n in d.mectl("node", "list", json=True).json["nodes"]}


def repos(d):
    return {r["id"]: r for r in d.mectl("repo", "list", json=True).json["repos"]}


def rejected_lines(d, did):
    return [ln for ln in d.stderr().splitlines() if f"announcement rejected from {did}:" in ln]


def gossip_rejected(d):
    """node status --json's gossip.rejected counts, or None while the daemon does not have
    them."""
    st = d.mectl("node", "status", json=True).json
    g = st.get("gossip")
    if g is None:
        return None
    assert isinstance(g, dict) and isinstance(g.get("rejected"), dict), st
    return g["rejected"]


@pytest.fixture
def pair(daemon_factory):
    """A and B connected (B bootstrapped to A)."""
    a, a_did = start_node(daemon_factory, "alpha")
    b, b_did = start_node(daemon_factory, "beta",
                          ["--bootstrap-node", f"{a_did}@127.0.0.1:{a.port}"])
    wait_for(lambda: b_did in peer_dids(a) and a_did in peer_dids(b), "A and B to connect")
    return a, a_did, b, b_did


# kind -> (extra me-peer args, {reason: count}, line A logs that is not a gossip rejection,
#          me-peer's NodeAnnouncement accepted)
CASES = {
    "honest-node": ([], {}, None, True),
    "forged-node": (["--impersonate", "B_ROOT"], {"node announcement from another origin": 1},
                    None, False),
    "forged-sig": ([], {"bad signature": 1}, None, False),
    "replay": ([], {"older than the newest from that origin": 1}, None, True),
    "future": ([], {"timestamp in the future": 1}, None, False),
    "stale": ([], {"timestamp too old": 1}, None, False),
    "ttl": ([], {"ttl above 16": 2}, None, False),
    "ttl-raw255": ([], {"malformed": 1}, "rejected message; closing stream", False),
    "oversize": ([], {}, "frame over the size limit; closing stream", False),
    "garbage": ([], {"malformed": 1}, "rejected message; closing stream", False),
    "forged-refstate": (["--impersonate", "B_DID"], {"ref state not signed by the creator": 1},
                        None, False),
    "flood": (["--count", "200"], {}, None, True),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_hostile_gossip(kind, pair, mepeer, git_repo):
    a, a_did, b, b_did = pair
    extra, reasons, stream_line, accepted = CASES[kind]
    extra = [{"B_ROOT": str(b.root), "B_DID": b_did}.get(x, x) for x in extra]

    p = mepeer("--dial", f"{a_did}@127.0.0.1:{a.port}", "--send", kind, "--wait", "60", *extra)
    wait_for(lambda: p.lines("sent"), f"me-peer to send\n{p.info()}")
    assert p.lines("up")[0][:2] == ["up", a_did], p.info()

    # A's verdict.
    for reason in reasons:
        wait_for(lambda: any(f": {reason}" in ln for ln in rejected_lines(a, p.did)),
                 f"A to log the rejection '{reason}'\nA's log:\n{a.stderr()}")
    if stream_line:
        wait_for(lambda: f"peer {p.did}: {stream_line}" in a.stderr(),
                 f"A to log '{stream_line}'\nA's log:\n{a.stderr()}")
    if accepted:
        wait_for(lambda: nodes(a).get(p.did, {}).get("alias") == "mepeer",
                 f"A to learn me-peer's honest announcement\nA's log:\n{a.stderr()}")
    if kind == "flood":
        # The last announcement of the flood was processed: relayed to B as well.
        wait_for(lambda: p.did in nodes(b), "B to learn me-peer through A")

    if stream_line:
        # A shut only that stream. A sender built on our transport then drops the connection
        # itself (its message stream is gone) and would re-dial: A never closes it.
        wait_for(lambda: f"peer lost: {p.did} (closed by the peer)" in a.stderr()
                 or p.did in peer_dids(a), f"the connection to settle\n{a.stderr()}")
        assert f"peer lost: {p.did} (" not in a.stderr() or \
            f"peer lost: {p.did} (closed by the peer)" in a.stderr(), a.stderr()
    else:
        # The hostile peer is still connected: rejections do not close connections.
        assert p.did in peer_dids(a), f"A dropped me-peer\n{a.stderr()}"
        assert p.proc.poll() is None, p.info()

    # Each reason logged exactly once (suppression is per reason), nothing else rejected.
    lines = rejected_lines(a, p.did)
    for reason in reasons:
        hits = [ln for ln in lines if f"from {p.did}: {reason}" in ln]
        assert len(hits) == 1, f"'{reason}' logged {len(hits)} times:\n" + "\n".join(lines)
    assert len(lines) == len(reasons), "\n".join(lines)
    assert not rejected_lines(a, b_did), a.stderr()
    counts = gossip_rejected(a)
    if counts is not None:
        want = {name: reasons.get(name, 0) for name in REJECT_NAMES}
        assert {name: counts.get(name, 0) for name in REJECT_NAMES} == want, counts

    # A serves, B is still there.
    a.mectl("node", "status")
    assert b_did in peer_dids(a)
    assert a_did in peer_dids(b)

    # Nothing forged in A's catalogue.
    known = nodes(a)
    assert b_did in known and known[b_did]["alias"] == "beta", known
    mepeers = {i: n["alias"] for i, n in known.items() if n["alias"].startswith("mepeer")}
    assert mepeers == ({p.did: "mepeer"} if accepted else {}), known
    if accepted:
        assert known[p.did]["addresses"] == [p.addr], known[p.did]
    names = {r["name"]: r for r in repos(a).values()}
    if kind == "forged-refstate":
        made = {ln[2]: (ln[1], ln[4]) for ln in p.lines("repo")}
        assert made["mepeer-forged"][1] == b_did and made["mepeer-honest"][1] == p.did
        # One ref state not signed by its creator makes the whole announcement a forgery:
        # neither repository is taken, and A does not relay it to B.
        assert made["mepeer-honest"][0] not in repos(a)
        assert made["mepeer-forged"][0] not in repos(a)
        names = {r["name"]: r for r in repos(a).values()}
        assert not [n for n in names if n.startswith("mepeer")], names
        assert made["mepeer-honest"][0] not in repos(b)
        assert made["mepeer-forged"][0] not in repos(b)
        assert "announcement rejected" not in b.stderr(), b.stderr()
    else:
        assert not [n for n in names if n.startswith("mepeer")], names

    # Honest gossip still propagates from B to A.
    rid = b.mectl("repo", "add", git_repo(name=f"after-{kind}"), json=True).json["id"]
    wait_for(lambda: rid in repos(a), f"B's new repository on A\nA's log:\n{a.stderr()}")
    assert repos(a)[rid]["creator"] == b_did

    # me-peer was never disconnected by A (a stream shut by A makes me-peer leave by itself,
    # exit status 0 or 3 depending on who noticed first: only A's side is asserted above).
    rc = p.stop()
    if not stream_line:
        assert rc == 0, p.info()
        assert not [ln for ln in p.lines("down") if ln[1] == a_did], p.info()
    # It heard A's own announcements.
    assert any(ln[1:3] == ["node", a_did] for ln in p.lines("frame")), p.info()
    a.stop()
    b.stop()


# ---- certificate mismatch ------------------------------------------------------------------

def test_daemon_dials_wrong_certificate(daemon_factory, mepeer):
    """A daemon told that did X lives at an address where another key answers refuses the
    handshake, logs why, and keeps running; told the right did, it connects."""
    p = mepeer("--listen", "--wait", "60")
    wait_for(lambda: p.lines("listening"), "me-peer to listen")
    other = random_did()
    a, a_did = start_node(daemon_factory, "alpha", ["--bootstrap-node", f"{other}@{p.addr}"])
    wait_for(lambda: f"peer certificate is for {p.did}, expected {other}" in a.stderr(),
             f"A to refuse me-peer's certificate\nA's log:\n{a.stderr()}")
    assert f"connection to {p.addr} failed" in a.stderr()
    st = a.mectl("node", "status", json=True).json
    assert st["did"] == a_did and st["peers"] == 0
    assert peer_dids(a) == set()

    # The same listener, dialed with its real did, is accepted.
    c, c_did = start_node(daemon_factory, "gamma", ["--bootstrap-node", f"{p.did}@{p.addr}"])
    wait_for(lambda: p.did in peer_dids(c), f"C to connect to me-peer\n{c.stderr()}")
    up = [ln[1] for ln in p.lines("up")]
    assert c_did in up and a_did not in up, p.info()
    assert p.stop() == 0, p.info()
    a.mectl("node", "status")
    a.stop()
    c.stop()


def test_peer_dials_wrong_certificate(daemon_factory, mepeer):
    """me-peer dialing the daemon's address under another did fails (exit 1) on the
    certificate; the daemon keeps running and learns nothing."""
    a, a_did = start_node(daemon_factory, "alpha")
    other = random_did()
    p = mepeer("--dial", f"{other}@127.0.0.1:{a.port}", "--send", "honest-node",
               "--wait", "20")
    assert p.wait() == 1, p.info()
    assert f"peer certificate is for {a_did}, expected {other}" in p.stderr(), p.info()
    assert not p.lines("up") and not p.lines("sent"), p.info()
    st = a.mectl("node", "status", json=True).json
    assert st["peers"] == 0 and st["nodes"] == 0, st
    assert peer_dids(a) == set()

    # Dialed under the right did, the daemon accepts a peer and takes its announcement.
    q = mepeer("--dial", f"{a_did}@127.0.0.1:{a.port}", "--send", "honest-node", "--wait", "60")
    wait_for(lambda: q.did in nodes(a), f"A to learn me-peer\n{q.info()}")
    assert q.stop() == 0, q.info()
    a.stop()
