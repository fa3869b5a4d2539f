"""Faults injected into real daemons replicating real git repositories over real QUIC.

- kill -9 of the receiving or the serving daemon at random moments of a series of transfers
  (a seeded RNG; the seed is printed, ME_FAULT_SEED=N replays it; ME_FAULT_TRANSFERS=N runs N
  transfers instead of 24, 20 under ASan; ME_FAULT_VERBOSE=1 prints each kill);
- a full disk: the receiver's root on a small tmpfs, remounted larger while the daemon runs;
- partitions and packet loss: daemons in network namespaces joined by a bridge (10.77.0.0/24,
  nothing leaves the namespaces made here), nftables rules dropping the traffic between two
  groups, or 10 % of all packets (numgen random).

After every fault: each mirror passes `git fsck --strict`, its refs are exactly the old or the
new signed state, `PRAGMA integrity_check` (the sqlite3 CLI) says ok, and the transfer completes
once the fault is gone, without restarting a daemon that was not killed. Every test prints a
one-line summary ("faults: ...") with its figures (pytest -s shows them).
"""
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import conftest
from conftest import git
from test_gossip import Node, wait_for
from test_sync import mirror_matches, mirror_of, refs_of

ASAN = "asan" in str(conftest.BUILD_DIR)
SEED = int(os.environ.get("ME_FAULT_SEED") or time.time_ns() % (1 << 32))
KILL_TRANSFERS = int(os.environ.get("ME_FAULT_TRANSFERS") or (20 if ASAN else 24))
COMPLETE_TIMEOUT = 90.0


def integrity(node):
    """`sqlite3 megaengine.db 'PRAGMA integrity_check'` on node's catalogue."""
    db = Path(node.root) / "megaengine.db"
    r = subprocess.run(["sqlite3", str(db), "PRAGMA integrity_check"], capture_output=True,
                       text=True, timeout=60)
    return r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stdout, r.stderr)


def assert_integrity(node):
    ok, out = integrity(node)
    assert ok, f"{node.alias}: PRAGMA integrity_check: {out}"


def fsck(path, env):
    git(path, "fsck", "--strict", "--no-dangling", env=env)


def add_blob_commit(git_repo, path, nbytes, tag):
    (path / f"blob-{tag}.bin").write_bytes(os.urandom(nbytes))
    git_repo.git(path, "add", ".")
    git_repo.git(path, "commit", "-q", "-m", f"blob {tag}")


def parts(node):
    tmp = Path(node.root) / "tmp"
    try:
        return [f for f in tmp.iterdir() if f.name.endswith(".part")]
    except FileNotFoundError:
        return []


def synced(node, rid, src, env):
    """mirror_matches, with the node's row for the repository (its sync error) in the state."""
    match = mirror_matches(node, rid, src, env)

    def check():
        ok, state = match()
        if isinstance(state, dict):
            state["repo"] = node.repos().get(rid)
        return ok, state
    return check


# ---- 1. kill -9 ----------------------------------------------------------------------------

def test_kill_9_sender_or_receiver_at_random_moments(daemon_factory, git_repo):
    env = git_repo.env
    rng = random.Random(SEED)
    print(f"\nfaults: kill -9 seed {SEED} (ME_FAULT_SEED={SEED} replays it)")
    a = Node(daemon_factory, "alpha", "127.0.13.1").start()
    b = Node(daemon_factory, "bravo", "127.0.13.2")
    src = git_repo(name="faulty", commits=3)
    add_blob_commit(git_repo, src, 3 << 20, "base")
    rid = a.j("repo", "add", src)["id"]
    b.start([a])
    t_full = wait_for(synced(b, rid, src, env), "first transfer", [a, b], timeout=60)
    fsck(mirror_of(b, rid), env)

    kills = {"alpha": 0, "bravo": 0}
    mid = 0           # kills while B held a partial bundle
    stayed_old = 0    # mirrors still at the old state after the kill
    t_xfer = min(max(t_full, 0.2), 2.0)
    t0 = time.monotonic()
    for i in range(KILL_TRANSFERS):
        old = refs_of(src, env)
        add_blob_commit(git_repo, src, rng.choice((1, 2, 3)) << 20, i)
        new = refs_of(src, env)
        victim = rng.choice((a, b))
        if rng.random() < 0.5:
            # somewhere between the commit and a while after its transfer would be done
            when = "after the commit"
            time.sleep(rng.uniform(0, 2 * t_xfer))
        else:
            # during the transfer: once B has a partial bundle
            when = "during the transfer"
            deadline = time.monotonic() + 30
            while not parts(b) and time.monotonic() < deadline and \
                    refs_of(mirror_of(b, rid), env) != new:
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.15))
        had_part = any(f.stat().st_size > 0 for f in parts(b) if f.exists())
        victim.d.kill()
        kills[victim.alias] += 1
        mid += had_part

        # right after the kill: nothing half-applied anywhere
        m = mirror_of(b, rid)
        fsck(m, env)
        have = refs_of(m, env)
        assert have in (old, new), \
            f"kill {i} ({victim.alias}, {when}, seed {SEED}): mirror refs are neither the old nor the new " \
            f"state\nmirror: {have}\nold: {old}\nnew: {new}"
        stayed_old += have == old
        assert_integrity(victim)
        fsck(src, env)

        if victim is a:
            a.start()
        else:
            b.start([a])
        dt = wait_for(synced(b, rid, src, env), f"transfer {i} completes after kill -9 of "
                      f"{victim.alias} {when} (seed {SEED})", [a, b], timeout=COMPLETE_TIMEOUT)
        if os.environ.get("ME_FAULT_VERBOSE"):
            print(f"  kill {i}: {victim.alias} {when}, part {had_part}, "
                  f"{'old' if have == old else 'new'}, completed {dt:.2f} s later")
        fsck(m, env)
        assert git(m, "symbolic-ref", "HEAD", env=env) == "refs/heads/main"
    for n in (a, b):
        assert_integrity(n)
    wait_for(lambda: (not parts(b) and not list((Path(b.root) / "tmp").iterdir()),
                      list((Path(b.root) / "tmp").iterdir())),
             "B's partial bundles are gone", [a, b])
    # what B kept through the kills is sound: each bundle of its series verifies, and a newcomer
    # that only B can serve (A stopped) gets the whole history from it
    series = sorted((Path(b.root) / "series" / rid[len("did:repo:z"):]).glob("*.bundle"))
    assert series, "B kept no series"
    for f in series:
        git(mirror_of(b, rid), "bundle", "verify", "-q", f, env=env)
    a.d.stop()
    c = Node(daemon_factory, "charlie", "127.0.13.3").start([b])
    t_c = wait_for(synced(c, rid, src, env), "C gets everything from B", [b, c], timeout=60)
    fsck(mirror_of(c, rid), env)
    assert_integrity(c)
    print(f"faults: kill -9: {KILL_TRANSFERS} transfers, {sum(kills.values())} kills "
          f"(sender {kills['alpha']}, receiver {kills['bravo']}; {mid} with a partial bundle "
          f"on disk, {stayed_old} left the mirror at the old state), corruptions 0, "
          f"{len(series)} bundles in B's series served to a newcomer in {t_c:.1f} s, "
          f"{time.monotonic() - t0:.1f} s, seed {SEED}")


# ---- 2. a full disk -------------------------------------------------------------------------

@pytest.fixture
def tmpfs(daemon_factory):
    """mount(path, size): a tmpfs at path. Teardown stops the daemons whose root is on one
    (SIGTERM, then SIGKILL) and unmounts it, even when the test failed."""
    mounted = []

    def mount(path, size):
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                        str(path)], check=True, capture_output=True)
        mounted.append(path)
        return path

    yield mount
    for d in daemon_factory.daemons:
        if any(Path(d.root) == p or p in Path(d.root).parents for p in mounted) and \
                d.proc.poll() is None:
            d.proc.terminate()
            try:
                d.proc.wait(conftest.STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                d.proc.kill()
                d.proc.wait()
    for p in reversed(mounted):
        subprocess.run(["umount", str(p)], capture_output=True)
        if os.path.ismount(p):
            subprocess.run(["umount", "-l", str(p)], capture_output=True)


def used_bytes(path):
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@pytest.mark.parametrize("room", ["bundle", "mirror"])
def test_full_disk_fails_cleanly_then_succeeds_once_space_is_freed(daemon_factory, git_repo,
                                                                   tmpfs, room):
    """room=bundle: the bundle itself does not fit; room=mirror: the bundle fits, the mirror
    made from it does not."""
    env = git_repo.env
    base = "127.0.14." if room == "bundle" else "127.0.15."
    a = Node(daemon_factory, "alpha", base + "1").start()
    b = Node(daemon_factory, "bravo", base + "2")
    src = git_repo(name="large", commits=2)
    add_blob_commit(git_repo, src, 8 << 20, "x")
    add_blob_commit(git_repo, src, 8 << 20, "y")
    # the root on a small tmpfs, the identity made again on it
    shutil.rmtree(b.root, ignore_errors=True)
    size = "6m" if room == "bundle" else "24m"
    tmpfs(b.root, size)
    b.new_identity()
    rid = a.j("repo", "add", src)["id"]
    b.start([a])

    def failed():
        r = b.repos().get(rid) or {}
        # "queued" while it waits for the next round, with the reason of the last failure
        return r.get("state") in ("failed", "queued") and \
            "no space left" in (r.get("error") or "").lower(), r
    wait_for(failed, "B reports the full disk", [a, b], timeout=60)
    err = b.repos()[rid]["error"]
    assert "no space left" in b.d.stderr().lower(), b.log_tail()
    # the daemon is up and answers, nothing is corrupted, nothing half-written is kept
    assert b.d.proc.poll() is None
    st = b.j("node", "status")["sync"]
    assert st["fetches_failed"] >= 1
    assert st["rejected_bundles"] == 0, "a full disk is not the peer's bad bundle"
    assert_integrity(b)
    m = mirror_of(b, rid)
    if (m / "HEAD").exists():
        fsck(m, env)
        assert refs_of(m, env) == [], "refs of a state whose objects did not fit"
    wait_for(lambda: (not parts(b), parts(b)), "the partial bundle is removed", [a, b])

    # more room, same daemon: a sync now succeeds
    subprocess.run(["mount", "-o", "remount,size=96m", str(b.root)], check=True)
    b.mectl("repo", "sync", rid, timeout=120)
    wait_for(synced(b, rid, src, env), "B mirrors once space is freed", [a, b], timeout=60)
    fsck(m, env)
    assert_integrity(b)
    assert b.repos()[rid]["error"] is None
    print(f"\nfaults: full disk ({room} does not fit in {size}): failed cleanly with "
          f"{err!r}; after remount to 96m the same daemon replicated {used_bytes(b.root)} "
          f"bytes, fsck and integrity_check clean, corruptions 0")


# ---- 3. partitions and packet loss between network namespaces ------------------------------

NET = "10.77.0."


def sh(*argv, check=True):
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=30)
    if check:
        assert r.returncode == 0, f"{' '.join(map(str, argv))}: {r.stderr}"
    return r


class Netns:
    """Network namespaces, one per node, each with a veth to a bridge in a namespace of its
    own: node i is 10.77.0.i/24. Nothing here touches the host's network."""

    def __init__(self, factory):
        self.factory = factory
        self.tag = f"mef{os.getpid() % 100000}"
        self.bridge = f"{self.tag}br"
        self.names = []
        self.nodes = []

    def setup_bridge(self):
        r = sh("ip", "netns", "add", self.bridge, check=False)
        if r.returncode != 0:
            pytest.skip(f"ip netns add is not permitted here: {r.stderr.strip()}")
        self.names.append(self.bridge)
        sh("ip", "-n", self.bridge, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.bridge, "link", "set", "br0", "up")

    def ns(self, i):
        return f"{self.tag}n{i}"

    def node(self, i, alias):
        """Node i in its namespace, listening on 10.77.0.i:9000 (not started)."""
        ns = self.ns(i)
        sh("ip", "netns", "add", ns)
        self.names.append(ns)
        sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}",
           "netns", self.bridge)
        sh("ip", "-n", ns, "addr", "add", f"{NET}{i}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", self.bridge, "link", "set", f"p{i}", "master", "br0", "up")
        n = NsNode(self.factory, alias, f"{NET}{i}", port=9000)
        n.ns = ns
        self.nodes.append(n)
        return n

    def nft(self, node, *script):
        sh("ip", "netns", "exec", node.ns, "nft", *script)

    def partition(self, left, right):
        """Every node drops what comes from the other group (both directions are cut)."""
        for group, other in ((left, right), (right, left)):
            addrs = ", ".join(n.ip for n in other)
            for n in group:
                self.nft(n, "add", "table", "inet", "mepart")
                self.nft(n, "add", "chain", "inet", "mepart", "in",
                         "{ type filter hook input priority 0; policy accept; }")
                self.nft(n, "add", "rule", "inet", "mepart", "in", "ip", "saddr",
                         "{", addrs, "}", "drop")

    def heal(self, nodes):
        for n in nodes:
            self.nft(n, "delete", "table", "inet", "mepart")

    def loss(self, nodes, percent):
        """Each node drops percent % of the packets it receives (numgen random)."""
        for n in nodes:
            self.nft(n, "add", "table", "inet", "meloss")
            self.nft(n, "add", "chain", "inet", "meloss", "in",
                     "{ type filter hook input priority 0; policy accept; }")
            self.nft(n, "add", "rule", "inet", "meloss", "in", "iifname", "eth0", "numgen",
                     "random", "mod", "100", "<", str(percent), "counter", "drop")

    def dropped(self, node, table):
        out = sh("ip", "netns", "exec", node.ns, "nft", "list", "table", "inet", table).stdout
        return sum(int(w.split()[0]) for w in out.split("packets")[1:])

    def cleanup(self):
        for n in self.nodes:
            if n.d is not None and n.d.proc.poll() is None:
                n.d.proc.terminate()
                try:
                    n.d.proc.wait(conftest.STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    n.d.proc.kill()
                    n.d.proc.wait()
        for name in reversed(self.names):
            sh("ip", "netns", "del", name, check=False)


class NsNode(Node):
    """A Node whose daemon runs inside its network namespace (ip netns exec); its control
    socket, a Unix socket in its root, is reached from here as usual."""
    ns = None

    def launcher(self):
        return ["ip", "netns", "exec", self.ns]


@pytest.fixture
def netns(daemon_factory):
    n = Netns(daemon_factory)
    try:
        n.setup_bridge()
        yield n
    finally:
        n.cleanup()


def knows(node, rid):
    def check():
        r = node.repos()
        return rid in r, sorted(r)
    return check


def cross_peers(left, right):
    """Connections between the groups that a node still lists."""
    out = []
    for group, other in ((left, right), (right, left)):
        dids = {o.did for o in other}
        out += [(n.alias, d) for n in group for d in n.peer_dids() if d in dids]
    return out


def test_partition_then_heal_converges_without_restart(daemon_factory, git_repo, netns):
    env = git_repo.env
    n1, n2, n3, n4 = (netns.node(i, a) for i, a in
                      ((1, "alpha"), (2, "bravo"), (3, "charlie"), (4, "delta")))
    n1.start()
    n2.start([n1])
    n3.start([n2])
    n4.start([n3])
    nodes = [n1, n2, n3, n4]
    left, right = [n1, n2], [n3, n4]
    pids = [n.d.pid for n in nodes]
    src = git_repo(name="parted", commits=3)
    add_blob_commit(git_repo, src, 1 << 20, "a")
    rid = n1.j("repo", "add", src)["id"]
    for n in nodes[1:]:
        wait_for(synced(n, rid, src, env), f"{n.alias} mirrors before the partition", nodes,
                 timeout=60)
    before = refs_of(src, env)

    netns.partition(left, right)
    t_part = time.monotonic()
    # on the left: a new commit; on the right: a new repository
    add_blob_commit(git_repo, src, 1 << 20, "b")
    other = git_repo(name="rightside", commits=2)
    qid = n4.j("repo", "add", other)["id"]
    wait_for(synced(n2, rid, src, env), "the commit reaches bravo (same side)", nodes)
    wait_for(synced(n3, qid, other, env), "the new repository reaches charlie (same side)",
             nodes)
    # the connections across time out (idle timeout): the partition is a real one
    wait_for(lambda: (not cross_peers(left, right), cross_peers(left, right)),
             "connections across the partition are gone", nodes, timeout=90)
    for n in right:
        m = mirror_of(n, rid)
        assert refs_of(m, env) == before, f"{n.alias} got the commit across the partition"
        fsck(m, env)
    for n in left:
        assert qid not in n.repos(), f"{n.alias} learnt {qid} across the partition"
    held = time.monotonic() - t_part

    netns.heal(nodes)
    t_heal = time.monotonic()
    for n in right:
        wait_for(synced(n, rid, src, env), f"the commit reaches {n.alias} after the heal",
                 nodes, timeout=120)
    for n in left:
        wait_for(synced(n, qid, other, env), f"the new repository reaches {n.alias} after "
                 f"the heal", nodes, timeout=120)
    converged = time.monotonic() - t_heal
    assert [n.d.pid for n in nodes] == pids and all(n.d.proc.poll() is None for n in nodes), \
        "a daemon restarted"
    for n in nodes:
        for r, s in ((rid, src), (qid, other)):
            if n is not n1 and not (n is n4 and r == qid):
                fsck(mirror_of(n, r), env)
        assert_integrity(n)
    print(f"\nfaults: partition 2|2 held {held:.1f} s (connections across gone), a commit and a "
          f"new repository stayed on their side; healed without a restart, converged in "
          f"{converged:.1f} s; fsck and integrity_check clean, corruptions 0")


def test_ten_percent_packet_loss_still_replicates(daemon_factory, git_repo, netns):
    env = git_repo.env
    a, b = netns.node(1, "alpha"), netns.node(2, "bravo")
    netns.loss([a, b], 10)
    a.start()
    src = git_repo(name="lossy", commits=3)
    add_blob_commit(git_repo, src, 6 << 20, "a")
    rid = a.j("repo", "add", src)["id"]
    t0 = time.monotonic()
    b.start([a])
    wait_for(synced(b, rid, src, env), "B replicates through 10 % loss", [a, b], timeout=150)
    full = time.monotonic() - t0
    add_blob_commit(git_repo, src, 1 << 20, "b")
    wait_for(synced(b, rid, src, env), "B gets a commit through 10 % loss", [a, b],
             timeout=120)
    fsck(mirror_of(b, rid), env)
    assert_integrity(b)
    dropped = netns.dropped(a, "meloss") + netns.dropped(b, "meloss")
    assert dropped > 0, "the loss rule dropped nothing"
    print(f"\nfaults: 10 % packet loss: {dropped} packets dropped; 7 MiB replicated in "
          f"{full:.1f} s and a commit after it; fsck and integrity_check clean, corruptions 0")
