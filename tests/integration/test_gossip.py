"""Gossip between real daemons on loopback: announcements travel over QUIC across several hops,
nodes reconnect after a restart from what megaengine.db remembers, one connection per pair.

Every node listens on its own loopback address (127.0.0.x) with a free UDP port, has its
identity created before it starts ('mectl auth init' works without a daemon) and re-announces
every GOSSIP_INTERVAL seconds. Nothing leaves 127.0.0.0/8.
"""
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import time

import pytest

import conftest
from conftest import Daemon, MEGAENGINED, run_mectl

GOSSIP_INTERVAL = 1     # seconds, --gossip-interval of every node here
CONVERGE_TIMEOUT = 20.0  # seconds: the generous bound every propagation is checked against
DID_KEY_RE = re.compile(r"did:key:z6Mk[1-9A-HJ-NP-Za-km-z]+")
B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def pk_of(did):
    """The Ed25519 public key in a did:key:z6Mk... (base58btc of 0xed 0x01 + key)."""
    n = 0
    for ch in did[len("did:key:z"):]:
        n = n * 58 + B58.index(ch)
    raw = n.to_bytes(34, "big")
    assert raw[:2] == b"\xed\x01", did
    return raw[2:]


# States of a repository learnt by gossip: the sync plane fetches it at once, so a test that is
# about gossip may see any step of that.
EXTERNAL_STATES = ("not fetched", "queued", "syncing", "verifying", "up to date")


def free_udp_port(ip):
    fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


class Node:
    """One megaengined with a fixed identity, root and listen address, restartable."""

    def __init__(self, factory, alias, ip, port=None):
        self.factory = factory
        self.alias = alias
        self.ip = ip
        self.port = port or free_udp_port(ip)
        self.addr = f"[{ip}]:{self.port}" if ":" in ip else f"{ip}:{self.port}"
        self.root = factory.new_root()
        self.d = None
        self.new_identity()

    def new_identity(self):
        shutil.rmtree(self.root, ignore_errors=True)
        r = run_mectl(["--root", self.root, "auth", "init"], self.factory.env, json=True)
        self.did = r.json["did"]
        self.pk = pk_of(self.did)

    @property
    def bootstrap(self):
        return f"{self.did}@{self.addr}"

    def launcher(self):
        """What the daemon's command line starts with, before the daemon itself."""
        return []

    def start(self, boots=(), extra=(), wait=True, interval=GOSSIP_INTERVAL):
        """Starts the daemon: --addr is always this node's own address; boots are Nodes."""
        argv = self.launcher() + [
            str(MEGAENGINED), "--root", str(self.root), "--addr", self.addr, "--alias", self.alias,
            "--gossip-interval", str(interval), "--log-level", "debug"]
        for b in boots:
            argv += ["--bootstrap-node", b.bootstrap]
        argv += [str(a) for a in extra]
        errpath = self.factory._logpath()
        with open(errpath, "wb") as errf:
            proc = subprocess.Popen(argv, env=self.factory.env, stdin=subprocess.DEVNULL,
                                    stdout=errf, stderr=errf)
        self.d = Daemon(self.factory, self.root, self.root / conftest.SOCKET_NAME, proc, errpath,
                        self.port, self.factory.env, argv, custom_socket=False)
        self.factory.daemons.append(self.d)
        if wait:
            self.d.wait_ready()
        return self

    def mectl(self, *args, **kw):
        return self.d.mectl(*args, **kw)

    def j(self, *args):
        return self.d.mectl(*args, json=True).json

    def peers(self):
        return self.j("peer", "list")["peers"]

    def peer_dids(self):
        return [p["did"] for p in self.peers()]

    def nodes(self):
        return {n["id"]: n for n in self.j("node", "list")["nodes"]}

    def repos(self):
        return {r["id"]: r for r in self.j("repo", "list")["repos"]}

    def log_tail(self, n=40):
        lines = [ln for ln in self.d.stderr().splitlines() if "control: pid" not in ln]
        return "\n".join(lines[-n:])


def wait_for(check, what, nodes=(), timeout=CONVERGE_TIMEOUT, step=0.1):
    """Polls check() -> (ok, state) until ok; returns the seconds it took. On timeout fails with
    the last state and the tail of each node's log."""
    t0 = time.monotonic()
    while True:
        ok, state = check()
        if ok:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            logs = "\n".join(f"--- {n.alias} ({n.did}) log tail:\n{n.log_tail()}" for n in nodes)
            pytest.fail(f"{what}: not within {timeout:.0f} s; last state: {state!r}\n{logs}")
        time.sleep(step)


def has_peers(node, *others):
    def check():
        dids = node.peer_dids()
        return all(o.did in dids for o in others), dids
    return check


def assert_no_duplicate_peers(*nodes):
    for n in nodes:
        dids = n.peer_dids()
        assert len(dids) == len(set(dids)), f"{n.alias} has duplicate connections: {dids}"
        assert n.did not in dids, f"{n.alias} is connected to itself: {dids}"


def chain(daemon_factory, base_ip, b_key_above_c=None):
    """A <- B <- C: B bootstraps to A, C only knows B. Returns the started nodes once both
    bootstrap links are up. b_key_above_c True/False fixes how B's and C's keys compare (it
    decides which of two connections between them survives)."""
    a = Node(daemon_factory, "alpha", f"{base_ip}1")
    b = Node(daemon_factory, "bravo", f"{base_ip}2")
    c = Node(daemon_factory, "charlie", f"{base_ip}3")
    while b_key_above_c is not None and (b.pk > c.pk) != b_key_above_c:
        c.new_identity()
    a.start()
    b.start([a])
    c.start([b])
    wait_for(has_peers(b, a), "B connected to A", [a, b])
    wait_for(has_peers(c, b), "C connected to B", [b, c])
    return a, b, c


def repo_reached(node, rid, creator):
    def check():
        r = node.repos().get(rid)
        return r is not None and r["creator"] == creator.did, r
    return check


# ---- (a) three hops ------------------------------------------------------------------------

def test_chain_propagates_node_and_repo(daemon_factory, git_repo):
    a, b, c = chain(daemon_factory, "127.0.1.")
    path = git_repo(name="alpha-project", commits=3, branches=("dev", "feature/x"),
                    tags=("v0.1",), annotated_tags=("v1.0",))
    t0 = time.monotonic()
    added = a.j("repo", "add", path, "--description", "from alpha")
    rid = added["id"]

    def c_knows_a():
        n = c.nodes().get(a.did)
        r = c.repos().get(rid)
        return n is not None and r is not None, (n, r)
    wait_for(c_knows_a, "A and its repository reach C", [a, b, c])
    elapsed = time.monotonic() - t0
    print(f"\nrepo add on A -> listed on C (2 hops, --gossip-interval {GOSSIP_INTERVAL}): "
          f"{elapsed:.2f} s")

    n = c.nodes()[a.did]
    assert n["alias"] == "alpha"
    assert n["addresses"] == [a.addr], "the listen address is announced, not 0.0.0.0"
    assert n["version"] and n["node_type"] == 1
    assert time.time() * 1000 - 60_000 < n["last_seen"] <= time.time() * 1000 + 1000

    r = c.repos()[rid]
    assert r["state"] in EXTERNAL_STATES and r["is_external"] is True and r["mine"] is False
    assert r["creator"] == a.did and r["creator_alias"] == "alpha"
    assert r["name"] == "alpha-project" and r["description"] == "from alpha"
    assert r["path"] == ""
    cols = c.mectl("repo", "list").stdout
    line = next(ln for ln in cols.splitlines() if ln.startswith(rid))
    assert any(st in line for st in EXTERNAL_STATES) and "alpha" in line  # CREATOR shows the alias

    shown = c.j("repo", "show", rid)
    want = sorted(({"name": ref, "oid": oid} for oid, ref in git_repo.refs(path)),
                  key=lambda x: x["name"])
    assert sorted(shown["refs"], key=lambda x: x["name"]) == want
    assert len(want) == 5  # main, dev, feature/x, v0.1, v1.0
    assert shown["head"] == added["head"] == "refs/heads/main"

    # B, the relay, has it too; A does not list its own repository twice or as external.
    # C may have dialed A already (it learns A's address from B), and then A's announcement
    # can reach C directly before B has recorded it: wait for B rather than assume the order.
    wait_for(repo_reached(b, rid, a), "the repository reaches B", [a, b])
    assert b.repos()[rid]["state"] in EXTERNAL_STATES
    mine = a.repos()[rid]
    assert mine["state"] == "up to date" and mine["mine"] is True
    assert len(a.repos()) == 1
    assert a.did not in a.nodes(), "a node does not list itself"
    # C learnt A and dials it (max-outbound): still one connection per pair everywhere.
    wait_for(has_peers(c, a, b), "C connected to A as well", [a, c])
    assert_no_duplicate_peers(a, b, c)


# ---- (b), (c) restart of the middle node ----------------------------------------------------

@pytest.mark.parametrize("how,b_key_above_c", [
    ("sigterm", None),
    ("sigkill", False),
    # C dialed B, so C holds a C->B link. After kill -9, B restarts and dials C; of two links
    # between them the one dialed by the smaller key wins, which here is C's stale one: C must
    # notice that B restarted (stateless reset) instead of waiting for its idle timeout.
    ("sigkill", True),
], ids=["sigterm", "sigkill", "sigkill-stale-link-preferred"])
def test_restarted_node_rejoins(daemon_factory, git_repo, how, b_key_above_c):
    base = {"sigterm": "127.0.2.", "sigkill": "127.0.3."}[how]
    if b_key_above_c:
        base = "127.0.4."
    a, b, c = chain(daemon_factory, base, b_key_above_c)

    def b_knows_both():
        ns = b.nodes()
        return a.did in ns and c.did in ns, sorted(ns)
    wait_for(b_knows_both, "B knows A and C", [a, b, c])

    if how == "sigterm":
        b.d.stop(signal.SIGTERM)
    else:
        b.d.kill()
    restarted_ms = time.time() * 1000
    b.start()  # same root, same address, no --bootstrap-node
    assert "--bootstrap-node" not in b.d.argv
    t = wait_for(has_peers(b, a, c), "restarted B reconnected to A and C", [a, b, c])
    print(f"\n{how}: restarted B connected to A and C after {t:.2f} s")

    def fresh_link_to_b(node):
        # After SIGKILL the old connection may linger on A and C until noticed dead: the one
        # listed must be the new one.
        def check():
            p = {x["did"]: x for x in node.peers()}.get(b.did)
            return p is not None and p["since"] >= restarted_ms - 50, p
        return check
    wait_for(fresh_link_to_b(a), "A has a new connection to B", [a, b])
    wait_for(fresh_link_to_b(c), "C has a new connection to B", [b, c])
    assert_no_duplicate_peers(a, b, c)

    rid = c.j("repo", "add", git_repo(name=f"after-{how}"))["id"]
    t = wait_for(repo_reached(a, rid, c), "C's new repository reaches A", [a, b, c])
    wait_for(repo_reached(b, rid, c), "C's new repository reaches restarted B", [a, b, c])
    print(f"{how}: repo added on C listed on A after {t:.2f} s")
    assert a.repos()[rid]["state"] in EXTERNAL_STATES
    assert a.repos()[rid]["creator_alias"] == "charlie"


# ---- (d) peer.list fields, one connection per pair ------------------------------------------

def test_one_connection_per_pair(daemon_factory):
    """Three nodes that all bootstrap to each other, started together: every pair dials both
    ways at once, and exactly one connection per pair survives."""
    nodes = [Node(daemon_factory, name, f"127.0.0.4{i}")
             for i, name in enumerate(("xray", "yankee", "zulu"), 1)]
    t_start = time.time() * 1000
    for n in nodes:
        n.start([o for o in nodes if o is not n], wait=False)
    for n in nodes:
        n.d.wait_ready()
    for n in nodes:
        wait_for(has_peers(n, *[o for o in nodes if o is not n]), f"{n.alias} meshed", nodes)
    by_did = {n.did: n for n in nodes}

    time.sleep(1.0)  # let any duplicate still being resolved go
    first = {n.did: {p["did"]: p for p in n.peers()} for n in nodes}
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        for n in nodes:
            ps = n.peers()
            dids = [p["did"] for p in ps]
            assert sorted(dids) == sorted(o.did for o in nodes if o is not n), (n.alias, ps)
            for p in ps:
                assert p["since"] == first[n.did][p["did"]]["since"], \
                    f"{n.alias}: connection to {by_did[p['did']].alias} was replaced: {p}"
        time.sleep(0.3)

    now = time.time() * 1000
    for n in nodes:
        for p in n.peers():
            assert set(p) == {"did", "address", "direction", "rtt_ms", "since"}, p
            assert DID_KEY_RE.fullmatch(p["did"]), p
            other = by_did[p["did"]]
            # One UDP socket per listen address: dialing and accepting use the same port.
            assert p["address"] == other.addr, p
            assert p["direction"] in ("inbound", "outbound"), p
            assert isinstance(p["rtt_ms"], (int, float)) and 0 <= p["rtt_ms"] < 2000, p
            assert isinstance(p["since"], int) and t_start - 1000 <= p["since"] <= now + 1000, p
            back = {q["did"]: q for q in other.peers()}[n.did]
            assert {p["direction"], back["direction"]} == {"inbound", "outbound"}, (p, back)
            assert abs(back["since"] - p["since"]) < 5000, (p, back)
        st = n.j("node", "status")
        assert st["peers"] == 2 and st["nodes"] == 2
        assert all(x["connected"] for x in n.j("node", "list")["nodes"])


# ---- (e) --max-outbound 0 --------------------------------------------------------------------

def test_max_outbound_zero_stays_alone(daemon_factory):
    """No bootstrap and --max-outbound 0: the node dials nobody, not even a live node its
    catalogue remembers."""
    live = Node(daemon_factory, "live", "127.0.0.51").start()
    lone = Node(daemon_factory, "lone", "127.0.0.52")
    lone.start()
    lone.d.stop()
    con = sqlite3.connect(lone.root / "megaengine.db", timeout=5)
    try:
        with con:
            now = int(time.time())
            con.execute("INSERT INTO nodes (id, alias, addresses, node_type, version, created_at,"
                        " updated_at, last_seen) VALUES (?, 'live', ?, 1, '0.1.0', ?, ?, ?)",
                        (live.did, live.addr, now, now, now * 1000))
    finally:
        con.close()
    lone.start(extra=["--max-outbound", "0"])
    deadline = time.monotonic() + 3 * GOSSIP_INTERVAL + 1.5
    while time.monotonic() < deadline:
        assert lone.j("node", "status")["peers"] == 0, lone.peers()
        time.sleep(0.25)
    assert lone.j("peer", "list") == {"peers": []}
    assert live.j("peer", "list") == {"peers": []}
    assert [n["connected"] for n in lone.j("node", "list")["nodes"]] == [False]
    assert "peer connected" not in lone.d.stderr()


# ---- (f) announced addresses ----------------------------------------------------------------

def test_announced_addresses(daemon_factory):
    hub = Node(daemon_factory, "hub", "127.0.0.61").start()
    # Listens on the wildcard: announces this host's addresses with its port, never 0.0.0.0.
    wild = Node(daemon_factory, "wild", "0.0.0.0", port=free_udp_port("0.0.0.0"))
    wild.start([hub])
    # Announces what it is told to. --max-outbound 0 keeps it from dialing what it learns.
    told = Node(daemon_factory, "told", "127.0.0.63")
    told.start([hub], ["--announce-addr", "127.0.0.99:1234", "--max-outbound", "0"])

    def hub_knows():
        ns = hub.nodes()
        return wild.did in ns and told.did in ns, ns
    wait_for(hub_knows, "the hub learns both announcements", [hub, wild, told])
    ns = hub.nodes()
    assert ns[told.did]["addresses"] == ["127.0.0.99:1234"]
    wa = ns[wild.did]["addresses"]
    assert wa, ns[wild.did]
    for addr in wa:
        ip, port = addr.rsplit(":", 1)
        assert int(port) == wild.port, wa
        assert ip.strip("[]") not in ("0.0.0.0", "::"), wa
        socket.inet_pton(socket.AF_INET, ip)  # a wildcard on IPv4 announces IPv4 addresses

    def spokes_know_hub():
        w, t = wild.nodes().get(hub.did), told.nodes().get(hub.did)
        return w is not None and t is not None, (w, t)
    wait_for(spokes_know_hub, "both spokes learn the hub", [hub, wild, told])
    assert wild.nodes()[hub.did]["addresses"] == [hub.addr]
    assert told.nodes()[hub.did]["addresses"] == [hub.addr]

    def told_known_to_wild():
        n = wild.nodes().get(told.did)
        return n is not None, n
    wait_for(told_known_to_wild, "the relayed announcement reaches the other spoke",
             [hub, wild, told])
    assert wild.nodes()[told.did]["addresses"] == ["127.0.0.99:1234"]
    # The real address the connection comes from is what peer.list shows.
    assert {p["did"]: p["address"] for p in hub.peers()}[told.did] == told.addr


# ---- --max-outbound caps the connections a node opens to nodes it learnt of -----------------

def test_max_outbound_caps_dials(daemon_factory):
    """Nine spokes that bootstrap to one hub, each with --max-outbound 2: every spoke learns
    the eight others from the hub's relays, yet opens at most 2 + 1 (its bootstrap)
    connections; the hub, with no bootstrap, at most 2."""
    hub = Node(daemon_factory, "hub", "127.0.0.81").start(extra=["--max-outbound", "2"])
    spokes = [Node(daemon_factory, f"s{i}", f"127.0.0.{90 + i}") for i in range(9)]
    for s in spokes:
        s.start([hub], ["--max-outbound", "2"], wait=False)
    for s in spokes:
        s.d.wait_ready()
    every = [hub] + spokes

    def all_known():
        missing = {n.alias: len(every) - 1 - len(n.nodes()) for n in every}
        return not any(missing.values()), missing
    wait_for(all_known, "every node learns every other", every)
    time.sleep(4 * GOSSIP_INTERVAL)  # let the dials that follow settle

    for n in every:
        out = [p for p in n.peers() if p["direction"] == "outbound"]
        cap = 2 + (0 if n is hub else 1)
        assert len(out) <= cap, (f"{n.alias} opened {len(out)} connections, more than "
                                 f"--max-outbound 2 + bootstrap: {out}")
    assert_no_duplicate_peers(*every)


# ---- IPv6 ----------------------------------------------------------------------------------

def test_ipv6_peers(daemon_factory, git_repo):
    """QUIC over [::1]: a node listening on IPv6 and IPv4 is joined over IPv6, and gossip
    carries its repository and its IPv6 address."""
    a = Node(daemon_factory, "six-a", "::1")
    a.start(extra=["--addr", f"127.0.0.71:{free_udp_port('127.0.0.71')}"])
    b = Node(daemon_factory, "six-b", "::1").start(boots=[a])
    rid = a.j("repo", "add", git_repo(name="ipv6"))["id"]
    wait_for(lambda: (rid in b.repos(), None), "A's repository on B over IPv6", [a, b])
    peer = {p["did"]: p for p in b.peers()}[a.did]
    assert peer["address"] == a.addr and peer["direction"] == "outbound", peer
    assert a.addr in b.nodes()[a.did]["addresses"], b.nodes()[a.did]
