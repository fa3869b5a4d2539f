"""Faults injected into real daemons replicating real git repositories over real QUIC.

- kill -9 of the receiving or the serving daemon at random moments of a series of transfers
  (a seeded RNG; the seed is printed, ME_FAULT_SEED=N replays it);
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
from conftest import Daemon, MEGAENGINED, git
from test_gossip import Node, wait_for
from test_sync import mirror_of, refs_of

ASAN = "asan" in str(conftest.BUILD_DIR)
SEED = int(os.environ.get("ME_FAULT_SEED") or time.time_ns() % (1 << 32))
KILL_TRANSFERS = 12 if ASAN else 24
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
    def check():
        m = mirror_of(node, rid)
        if not (m / "HEAD").exists():
            return False, "no mirror yet"
        have, want = refs_of(m, env), refs_of(src, env)
        return have == want, {"mirror": have, "creator": want, "repo": node.repos().get(rid)}
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
            f"kill {i} ({victim.alias}, {when}): mirror refs are neither the old nor the new " \
            f"state\nmirror: {have}\nold: {old}\nnew: {new}"
        stayed_old += have == old
        assert_integrity(victim)
        fsck(src, env)

        if victim is a:
            a.start()
        else:
            b.start([a])
        dt = wait_for(synced(b, rid, src, env), f"transfer {i} completes after kill -9 of "
                      f"{victim.alias} {when}", [a, b], timeout=COMPLETE_TIMEOUT)
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
    st = b.j("node", "status")["sync"]
    print(f"faults: kill -9: {KILL_TRANSFERS} transfers, {sum(kills.values())} kills "
          f"(sender {kills['alpha']}, receiver {kills['bravo']}; {mid} with a partial bundle "
          f"on disk, {stayed_old} left the mirror at the old state), corruptions 0, "
          f"fetches_ok {st['fetches_ok']}, {time.monotonic() - t0:.1f} s, seed {SEED}")


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
