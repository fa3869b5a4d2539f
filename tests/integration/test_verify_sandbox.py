"""Bundles that trip libgit2's indexer (docs/security.md, "libgit2") never harm the daemon: the
verification runs in a child process with hard limits (daemon/verify.c).

A hostile holder (me-peer, --serve file) creates a repository of its own, announces it to a fresh
daemon V and serves, for a correctly signed state, a crafted bundle: the header has exactly the
signed refs, the pack is well formed (zlib entries, SHA-1 trailer) but holds one of
  loop    a REF_DELTA that resolves to a blob the pack already has: libgit2 1.5's indexer loops
          for ever, allocating
  expand  a 64 KiB blob of zeros and a delta announcing a result of almost 2 GiB, filled by
          one-byte copy instructions (64 KiB each): libgit2 allocates the announced size
  leak    a chain of OFS_DELTAs each giving back the 4 MiB blob they start from: libgit2 leaks
          every resolved object (252 MiB per transfer)
A few hundred bytes each. Every variant goes through four states, like test_sync_hostile:
  0  crafted, V has no mirror     -> rejected with the verifier's reason; no mirror left
  1  honest                       -> V's mirror equals the repository
  2  crafted again, after changes -> rejected; the mirror exactly as after 1 (refs, packs, no
                                     temporary directory or lock), git fsck clean
  3  honest                       -> the update replicates
After each rejection: the reason in V's row and `mectl repo list`, $ROOT/tmp empty, no verifier
process left, V answers. At the end V's peak resident size (VmHWM) grew by less than what any
of these bundles makes libgit2 take.
"""
import os
import struct
import zlib
import hashlib
from pathlib import Path

import pytest

from test_sync_hostile import (
    Outside, announced, assert_alive, assert_fsck, assert_mirror_is, change_repo, db_row,
    fetch_failures, make_repo, mirror_path, mirror_refs, next_generation, repo_entry, tmp_files, wait_for,
    wait_mirror_seq, wait_tmp_empty, SYNC_COLS, MEPEER,
)
from test_peers_hostile import start_node

MEM_REASON = "verifier exceeded its memory limit (1024 MiB)"
# what V records for each crafted bundle (the child's or the watchdog's words)
ATTACKS = {
    "loop": (MEM_REASON,),
    "expand": (MEM_REASON,),
    # libgit2 gives up on this pack (the leaked memory goes with the verifier); on a mirror,
    # under ASan, it can also spin until the CPU limit
    "leak": ("bad pack: no REF_DELTA found", "verifier timed out (CPU limit of 60 s)"),
}
REJECT_WAIT = 180.0          # the loop takes the verifier to 1 GiB first (slower under ASan)
HWM_GROWTH_MAX = 128 << 20   # each bundle makes libgit2 take more than this


@pytest.fixture(scope="module", autouse=True)
def _mepeer_built():
    if not os.access(MEPEER, os.X_OK):
        pytest.fail(f"missing {MEPEER}")


# ---- crafted packs ---------------------------------------------------------------------------

OBJ_BLOB, OFS_DELTA, REF_DELTA = 3, 6, 7


def varint(n):
    """A delta header's size: 7 bits a byte, least significant first."""
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def entry_header(kind, size):
    out = bytearray([kind << 4 | (size & 0x0F)])
    size >>= 4
    while size:
        out[-1] |= 0x80
        out.append(size & 0x7F)
        size >>= 7
    return bytes(out)


def ofs_encoding(dist):
    """OFS_DELTA's distance back to its base, git's offset varint."""
    out = [dist & 0x7F]
    dist >>= 7
    while dist:
        dist -= 1
        out.insert(0, 0x80 | (dist & 0x7F))
        dist >>= 7
    return bytes(out)


def copy_op(offset, size):
    """A delta copy instruction (size < 2^24; 0 stands for 64 KiB)."""
    op, args = 0x80, bytearray()
    for i in range(4):
        if (offset >> (8 * i)) & 0xFF:
            op |= 1 << i
            args.append((offset >> (8 * i)) & 0xFF)
    for i in range(3):
        if (size >> (8 * i)) & 0xFF:
            op |= 0x10 << i
            args.append((size >> (8 * i)) & 0xFF)
    return bytes([op]) + bytes(args)


def blob_oid(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).digest()


def pack(entries):
    """entries: (kind, data, base) with base an oid (REF_DELTA) or None (OFS_DELTA: the
    previous entry)."""
    out = bytearray(b"PACK" + struct.pack(">II", 2, len(entries)))
    prev = None
    for kind, data, base in entries:
        start = len(out)
        out += entry_header(kind, len(data))
        if kind == OFS_DELTA:
            out += ofs_encoding(start - prev)
        elif kind == REF_DELTA:
            out += base
        out += zlib.compress(data, 9)
        prev = start
    return bytes(out + hashlib.sha1(out).digest())


def crafted_pack(attack):
    if attack == "loop":
        b = b"megaengine verify sandbox: a blob twice\n"
        delta = varint(len(b)) + varint(len(b)) + copy_op(0, len(b))
        return pack([(OBJ_BLOB, b, None), (REF_DELTA, delta, blob_oid(b))])
    if attack == "expand":
        base = bytes(64 << 10)
        n = (1 << 31) - (64 << 10)
        delta = varint(len(base)) + varint(n) + b"\x80" * (n >> 16)
        return pack([(OBJ_BLOB, base, None), (OFS_DELTA, delta, None)])
    assert attack == "leak"
    base = bytes(4 << 20)
    delta = varint(len(base)) + varint(len(base)) + copy_op(0, len(base))
    return pack([(OBJ_BLOB, base, None)] + [(OFS_DELTA, delta, None)] * 63)


def write_bundle(path, refs, attack):
    """A v2 bundle whose header lists exactly refs [(oid, name)] and whose pack is crafted."""
    head = "# v2 git bundle\n" + "".join(f"{o} {n}\n" for o, n in sorted(refs, key=lambda r: r[1]))
    data = head.encode() + b"\n" + crafted_pack(attack)
    Path(path).write_bytes(data)
    return len(data)


# ---- the daemon's processes and memory -------------------------------------------------------

def children(pid):
    out = []
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(x) for x in (t / "children").read_text().split()]
        except FileNotFoundError:
            pass
    return out


def vm_hwm(pid):
    for ln in Path(f"/proc/{pid}/status").read_text().splitlines():
        if ln.startswith("VmHWM:"):
            return int(ln.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def assert_mirror_clean(d, rid, packs):
    """No temporary directory or lock left in the mirror, and the packs of before."""
    m = mirror_path(d, rid)
    left = [p.name for p in m.iterdir() if p.name.startswith("me-incoming-")]
    assert not left, left
    locks = [str(p) for p in m.rglob("*.lock")]
    assert not locks, locks
    assert sorted(p.name for p in (m / "objects" / "pack").iterdir()) == packs


def reason_of(d, rid, reasons):
    err = (db_row(d, rid) or {}).get("sync_error") or ""
    return next((r for r in reasons if r in err), None)


def reject(v, p, rid, attack, n0, row_before, refs_before, packs_before, outside, env):
    reason = wait_for(lambda: fetch_failures(v, rid, p.did) > n0 and
                      reason_of(v, rid, ATTACKS[attack]),
                      lambda: f"V to reject the {attack} bundle with one of {ATTACKS[attack]}\n"
                              f"row: {db_row(v, rid)}\nlog:\n{v.stderr()[-4000:]}",
                      timeout=REJECT_WAIT)
    line = [ln for ln in v.stderr().splitlines()
            if f"sync: fetch of {rid} from {p.did} failed: " in ln][-1]
    assert "rejected: verifier" in line or "rejected: bad pack" in line, line
    wait_for(lambda: not children(v.proc.pid),
             lambda: f"the verifier of V to be gone: {children(v.proc.pid)}", timeout=30)
    row = db_row(v, rid)
    for c in SYNC_COLS:
        assert row[c] == row_before[c], (c, row, row_before)
    e = repo_entry(v, rid)
    assert reason in (e["error"] or ""), e
    assert e["mirror_seq"] == row_before["mirror_seq"], e
    if refs_before is None:
        assert not mirror_path(v, rid).exists(), mirror_refs(v, rid, env)
    else:
        assert mirror_refs(v, rid, env) == refs_before
        assert_mirror_clean(v, rid, packs_before)
        assert_fsck(mirror_path(v, rid), env)
    assert tmp_files(v) == [], tmp_files(v)
    outside.assert_unchanged()
    assert_alive(v)


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_crafted_bundle(attack, daemon_factory, peers, git_repo, tmp_path):
    env = git_repo.env
    v, v_did = start_node(daemon_factory, "victim")
    outside = Outside(v)
    hwm0 = vm_hwm(v.proc.pid)
    repo = make_repo(git_repo)
    bundle = tmp_path / f"{attack}.bundle"
    size = write_bundle(bundle, git_repo.refs(repo), attack)
    assert size < 64 << 10, size
    p = peers("--dial", f"{v_did}@127.0.0.1:{v.port}", "--repo-path", repo,
              "--serve", "file,honest,file,honest", "--bundle-file", bundle, "--wait", "900")
    rid, seq0 = wait_for(lambda: announced(p, 0), lambda: f"me-peer to announce\n{p.info()}")

    # 0: crafted, first fetch.
    reject(v, p, rid, attack, 0, {c: 0 for c in SYNC_COLS}, None, None, outside, env)
    assert "start file" in p.stdout(), p.info()

    # 1: honest.
    _, seq1 = next_generation(p, 1)
    wait_mirror_seq(v, rid, seq1, "state 1")
    assert_mirror_is(v, rid, git_repo, repo)
    row1, refs1 = db_row(v, rid), mirror_refs(v, rid, env)
    packs1 = sorted(x.name for x in (mirror_path(v, rid) / "objects" / "pack").iterdir())

    # 2: crafted again, on the mirror.
    change_repo(git_repo, repo)
    write_bundle(bundle, git_repo.refs(repo), attack)
    n0 = fetch_failures(v, rid, p.did)
    next_generation(p, 2)
    reject(v, p, rid, attack, n0, row1, refs1, packs1, outside, env)

    # 3: honest again.
    _, seq3 = next_generation(p, 3)
    wait_mirror_seq(v, rid, seq3, "state 3")
    assert_mirror_is(v, rid, git_repo, repo)
    wait_tmp_empty(v)
    e = repo_entry(v, rid)
    assert e["state"] == "up to date" and e["error"] is None, e

    grew = vm_hwm(v.proc.pid) - hwm0
    assert grew < HWM_GROWTH_MAX, f"V's peak resident size grew by {grew >> 20} MiB"
    p.stop()
    v.stop()


@pytest.fixture
def peers(daemon_factory):
    from test_peers_hostile import MePeer
    started = []

    def start(*args):
        q = MePeer(daemon_factory, [str(a) for a in args])
        started.append(q)
        return q
    yield start
    for q in started:
        q.kill()
