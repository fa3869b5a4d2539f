"""Hostile transfers: a daemon fetching from a peer that lies, and a daemon serving a peer that
abuses it. The peer is me-peer (tests/mepeer.c, mepeer-*.c) on the real QUIC transport.

Fetching from a liar (test_hostile_serve): me-peer creates a repository of its own (made with the
git CLI; its did:repo comes from the root commit and me-peer's key, as the daemon computes it),
announces it to a fresh daemon V and is V's only holder. It serves each announced state as
--serve says; SIGUSR1 makes it sign a newer state and serve that with the next mode. Every
variant goes through four states:
  0  the variant, V has no mirror yet     -> rejected; no mirror, sync columns untouched
  1  honest                               -> V's mirror equals the repository (a transfer cut
                                             in the middle resumes where it stopped)
  2  the variant, after new commits, a new branch and a deleted tag (an update with haves)
                                          -> rejected; the mirror and sync columns as after 1
  3  honest                               -> V's mirror equals the repository again
After each rejection: the reason is in V's database row (sync_error), repo list and log;
$ROOT/tmp holds no leftover (a transfer cut in the middle keeps exactly its partial bundle, for
the resume); nothing was written outside $ROOT; V still answers. At the end an honest daemon W
that knows only V gets the repository from V, and V and W stop cleanly.

test_hostile_relay: the creator is a daemon A; me-peer learns A's repository (the creator's
genuine signed state) and a full bundle from A by gossip and a transfer, then serves it, bad, to
V. V rejects it and recovers through an honest daemon W that knows A.

test_server_*: me-peer opens transfer streams to a daemon and sends garbage, an unrequested
Start, a traversal id, two requests, 20001 haves, an oversized frame, idle streams, 5 streams at
once, requests for unknown repositories, and resumes; the daemon resets or refuses each, drops
idle streams after 15 s, keeps serving honest requests (git bundle verify accepts what it sends)
and stops cleanly.

Abuse of the requester's scheduling: slow peers (a byte every 2 s, or no answer) must not hold
every fetch slot; a peer squatting someone else's did:repo must not keep a node from the real
creator's repository; a ref state of 3000 refs replicates.

The database is read read-only with sqlite3 (columns repo list does not show); node status's
"sync" counters are checked when present.
"""
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BUILD_DIR, git
from test_peers_hostile import MePeer, start_node

MEPEER = BUILD_DIR / "tests" / "me-peer"
STALL_WAIT = 45.0  # the daemon gives up on a transfer after 15 s without data

# mode -> reason V records (its database row's sync_error and its log). Rejections found by
# the verifier after the whole bundle arrived are marked True.
VARIANTS = {
    "tampered": ("bad pack", True),
    "refs-differ": ("refs differ from the signed ref state", True),
    "wrong-signer": ("ref state not signed by the repository's creator", False),
    "claim-creator": ("ref state not signed by the repository's creator", False),
    "other-repo": ("the bundle is for another repository", False),
    "id-traversal": ("malformed transfer message", False),
    "huge-size": ("over the limit", False),
    "past-size": ("data past the announced size", False),
    "done-digest": ("bundle digest mismatch", False),
    "bad-digest": ("bundle digest mismatch", False),
    "short": ("transfer ended before the announced size", False),
    "done-first": ("transfer ended before the announced size", False),
    "data-first": ("transfer message out of order", False),
    "two-starts": ("transfer message out of order", False),
    "garbage": ("malformed transfer message", False),
    "error": ("refused: ENOTFOUND", False),
    "stall": ("transfer stalled", False),
    "reset": ("closed (reset by the peer", False),
}
SLOW = {"stall"}               # the daemon waits 15 s for data
PARTIAL = {"stall", "reset"}   # half the bundle arrived: the daemon keeps it to resume


@pytest.fixture(scope="module", autouse=True)
def _mepeer_built():
    if not os.access(MEPEER, os.X_OK):
        pytest.fail(f"missing {MEPEER}: build first (ninja -C {BUILD_DIR})")


@pytest.fixture
def peers(daemon_factory):
    started = []

    def start(*args):
        p = MePeer(daemon_factory, args)
        started.append(p)
        return p
    yield start
    for p in started:
        p.kill()


# ---- helpers ---------------------------------------------------------------------------------

def wait_for(pred, what, timeout=20.0, interval=0.05):
    """Polls pred() until it returns something true, and returns that. what (a string, or a
    function giving one, called only on failure) says what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for "
                        f"{what() if callable(what) else what}")
        time.sleep(interval)


def b58(rid):
    return rid[len("did:repo:"):]


def mirror_path(d, rid):
    return d.root / "repos" / f"{b58(rid)}.git"


def mirror_refs(d, rid, env):
    """[(oid, name)] of the mirror's branches and tags, or None without a mirror."""
    p = mirror_path(d, rid)
    if not p.exists():
        return None
    out = git(p, "for-each-ref", "refs/heads", "refs/tags",
              "--format=%(objectname) %(refname)", env=env)
    return [tuple(ln.split(" ", 1)) for ln in out.splitlines() if ln]


def assert_fsck(path, env):
    r = subprocess.run(["git", "fsck", "--strict", "--no-dangling"], cwd=path, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, f"git fsck in {path}: {r.stdout}{r.stderr}"


def mirror_head(d, rid, env):
    return git(mirror_path(d, rid), "symbolic-ref", "HEAD", env=env)


def assert_mirror_is(d, rid, repos, repo):
    """The mirror holds exactly the repository's branches and tags, its HEAD, and is sound."""
    want = sorted(repos.refs(repo), key=lambda r: r[1])
    assert mirror_refs(d, rid, repos.env) == want
    assert mirror_head(d, rid, repos.env) == git(repo, "symbolic-ref", "HEAD", env=repos.env)
    assert_fsck(mirror_path(d, rid), repos.env)


def db_row(d, rid):
    """The daemon's row for rid (read-only), or None."""
    con = sqlite3.connect(f"file:{d.root / 'megaengine.db'}?mode=ro", uri=True, timeout=10)
    try:
        con.row_factory = sqlite3.Row
        r = con.execute("SELECT * FROM repos WHERE id = ?", (rid,)).fetchone()
        return dict(r) if r else None
    finally:
        con.close()


SYNC_COLS = ("mirror_seq", "last_sync_ms")
KEPT_COLS = ("name", "creator", "description", "path", "is_external", "root_commit")


def db_refs(d, rid):
    con = sqlite3.connect(f"file:{d.root / 'megaengine.db'}?mode=ro", uri=True, timeout=10)
    try:
        return sorted((oid, name) for name, oid in con.execute(
            "SELECT ref_name, oid FROM refs WHERE repo_id = ?", (rid,)))
    finally:
        con.close()


def wait_signed(d, rid, repos, repo):
    """Waits until the creator d has signed the repository's current refs."""
    want = sorted(repos.refs(repo))
    wait_for(lambda: (db_row(d, rid) or {}).get("ref_seq", 0) > 0 and db_refs(d, rid) == want,
             lambda: f"{d.root} to sign the refs of {repo}: {db_refs(d, rid)} vs {want}")
    return db_row(d, rid)["ref_seq"]


def tmp_files(d):
    t = d.root / "tmp"
    return sorted(p.name for p in t.iterdir()) if t.exists() else []


def wait_tmp_empty(d):
    """The state is recorded a moment before the received file is removed (or kept in the
    series): under ASan a test can look in between, so it waits for tmp to empty."""
    wait_for(lambda: tmp_files(d) == [], lambda: f"{d.root}/tmp to empty: {tmp_files(d)}")


def repo_entry(d, rid):
    """rid's entry in `mectl --json repo list`."""
    got = [r for r in d.mectl("repo", "list", json=True).json["repos"] if r["id"] == rid]
    assert len(got) == 1, got
    return got[0]


def fetch_failures(d, rid, did):
    return d.stderr().count(f"sync: fetch of {rid} from {did} failed: ")


def sync_stats(d):
    """node status's sync counters, or None while the daemon does not report them."""
    s = d.mectl("node", "status", json=True).json.get("sync")
    return s if isinstance(s, dict) else None


def tree(root):
    """Every path under root (no symlinks followed)."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            out.add(os.path.join(dirpath, n))
    return out


class Outside:
    """What exists around a data root: its parent's tree minus the root itself, the working
    directory and /tmp's top level. Nothing may appear there."""

    def __init__(self, d):
        self.root = str(d.root)
        self.parent = d.root.parent
        self.before = self.snap()

    def snap(self):
        inner = {p for p in tree(self.parent) if not (p == self.root or
                                                       p.startswith(self.root + "/"))}
        return inner | {str(p) for p in Path.cwd().iterdir()} | \
            {str(p) for p in Path("/tmp").iterdir() if p.name in ("x", "x.git", "x.bundle")}

    def assert_unchanged(self):
        new = self.snap() - self.before
        assert not new, f"written outside {self.root}: {sorted(new)}"


def json_lines(p):
    return [json.loads(ln) for ln in p.stdout().splitlines() if ln.startswith("{")]


def announced(p, gen):
    """(repo id, seq) me-peer announced for generation gen, or None."""
    for ln in p.lines("announced"):
        kv = dict(x.split("=", 1) for x in ln[3:] if "=" in x)
        if kv.get("generation") == str(gen):
            return ln[1], int(ln[2].split("=", 1)[1])
    return None


def next_generation(p, gen):
    p.proc.send_signal(signal.SIGUSR1)
    return wait_for(lambda: announced(p, gen),
                    lambda: f"me-peer to announce state {gen}\n{p.info()}")


def wait_mirror_seq(d, rid, seq, what, timeout=30.0):
    wait_for(lambda: (db_row(d, rid) or {}).get("mirror_seq") == seq,
             lambda: f"{what() if callable(what) else what}: mirror at state {seq}\n"
                     f"row: {db_row(d, rid)}\nlog:\n{d.stderr()[-4000:]}",
             timeout=timeout)


def wait_rejected(d, rid, did, n0, reason, timeout):
    """Waits until d has failed one more fetch of rid from did, recorded the reason in its row
    and has no fetch of it running."""
    wait_for(lambda: fetch_failures(d, rid, did) > n0,
             lambda: f"{did} rejected\nlog:\n{d.stderr()[-4000:]}", timeout=timeout)
    wait_for(lambda: reason in ((db_row(d, rid) or {}).get("sync_error") or ""),
             lambda: f"sync_error with '{reason}'\nrow: {db_row(d, rid)}\n"
                     f"log:\n{d.stderr()[-3000:]}", timeout=timeout)
    line = [ln for ln in d.stderr().splitlines()
            if f"sync: fetch of {rid} from {did} failed: " in ln][-1]
    assert reason in line, line


def make_repo(git_repo):
    return git_repo(commits=3, branches=("dev", "feature/one"), tags=("v1",),
                    annotated_tags=("v2",))


def change_repo(git_repo, repo):
    """New commits on main, a new branch, a deleted tag: an update with a deletion."""
    (repo / "file.txt").write_text("changed\n" * 100)
    git_repo.git(repo, "commit", "-qam", "update")
    git_repo.git(repo, "branch", "topic")
    git_repo.git(repo, "tag", "-d", "v1")


def assert_alive(d):
    assert d.proc.poll() is None, f"daemon exited\n{d.stderr()}"
    assert d.mectl("node", "status", json=True).json["did"]


# ---- fetching from a liar --------------------------------------------------------------------

def reject_stage(v, p, rid, mode, n0, before, outside, env):
    """One rejected state (after n0 earlier failures): returns after checking everything the
    module docstring lists."""
    reason = VARIANTS[mode][0]
    wait_rejected(v, rid, p.did, n0, reason, STALL_WAIT if mode in SLOW else 20.0)
    row = db_row(v, rid)
    for c in SYNC_COLS:
        assert row[c] == before["row"][c], (c, row, before["row"])
    # What mectl shows: the reason, and the mirror's state as before.
    e = repo_entry(v, rid)
    assert reason in (e["error"] or ""), e
    assert e["state"] in ("failed", "queued"), e
    assert e["mirror_seq"] == before["row"]["mirror_seq"], e
    last = before["row"]["last_sync_ms"]
    assert e["last_sync"] == (last // 1000 if last else None), e
    for c in KEPT_COLS:
        if before["row"] is not None and c in before["row"]:
            assert row[c] == before["row"][c], (c, row, before["row"])
    if before["refs"] is None:
        # A first fetch that fails leaves no mirror behind.
        assert not mirror_path(v, rid).exists(), \
            f"rejected first fetch left {mirror_path(v, rid)}: {mirror_refs(v, rid, env)}"
    else:
        assert mirror_refs(v, rid, env) == before["refs"]
        assert_fsck(mirror_path(v, rid), env)
    if mode in PARTIAL:
        # The partial bundle stays for a resume, and nothing else.
        at = int(p.lines("cut")[-1][3].split("=", 1)[1])
        parts = tmp_files(v)
        assert len(parts) == 1 and parts[0].startswith(b58(rid) + ".") and \
            parts[0].endswith(".part"), parts
        assert (v.root / "tmp" / parts[0]).stat().st_size == at
    else:
        assert tmp_files(v) == [], tmp_files(v)
    outside.assert_unchanged()
    assert_alive(v)


@pytest.mark.parametrize("mode", list(VARIANTS))
def test_hostile_serve(mode, daemon_factory, peers, git_repo):
    verified = VARIANTS[mode][1]
    env = git_repo.env
    v, v_did = start_node(daemon_factory, "victim")
    outside = Outside(v)
    repo = make_repo(git_repo)
    stats0 = sync_stats(v)
    p = peers("--dial", f"{v_did}@127.0.0.1:{v.port}", "--repo-path", repo,
              "--serve", f"{mode},honest,{mode},honest", "--wait", "300")
    rid, seq0 = wait_for(lambda: announced(p, 0), lambda: f"me-peer to announce\n{p.info()}")

    # 0: the variant, first fetch.
    reject_stage(v, p, rid, mode, 0, {"row": {c: 0 for c in SYNC_COLS}, "refs": None},
                 outside, env)
    row = db_row(v, rid)
    assert row["is_external"] == 1 and row["ref_seq"] == seq0, row
    assert row["creator"] == p.did, row

    # 1: honest. After a stall the transfer resumes where it stopped.
    _, seq1 = next_generation(p, 1)
    wait_mirror_seq(v, rid, seq1, "state 1")
    assert_mirror_is(v, rid, git_repo, repo)
    wait_tmp_empty(v)
    if mode in PARTIAL:
        req = p.lines("request")[-1]
        at = int(p.lines("cut")[0][3].split("=", 1)[1])
        assert "resume=1" in req and f"offset={at}" in req, p.info()
        assert f"offset={at}" in p.lines("start")[-1], p.info()
    before = {"row": db_row(v, rid), "refs": mirror_refs(v, rid, env)}
    assert before["row"]["sync_error"] == ""

    # 2: the variant again, on an update the mirror has the prerequisites of.
    change_repo(git_repo, repo)
    n0 = fetch_failures(v, rid, p.did)
    _, seq2 = next_generation(p, 2)
    reject_stage(v, p, rid, mode, n0, before, outside, env)
    assert "haves=0" not in p.lines("request")[-1], p.info()
    assert db_row(v, rid)["ref_seq"] == seq2

    # 3: honest again: the update, the deleted tag gone.
    _, seq3 = next_generation(p, 3)
    wait_mirror_seq(v, rid, seq3, "state 3")
    assert_mirror_is(v, rid, git_repo, repo)
    assert "refs/tags/v1" not in [r[1] for r in mirror_refs(v, rid, env)]
    wait_tmp_empty(v)
    assert db_row(v, rid)["sync_error"] == ""
    e = repo_entry(v, rid)
    assert e["state"] == "up to date" and e["error"] is None, e

    stats = sync_stats(v)
    if stats is not None:
        assert stats["fetches_failed"] - stats0["fetches_failed"] >= 2, stats
        assert stats["fetches_ok"] - stats0["fetches_ok"] >= 2, stats
        if verified:
            assert stats["rejected_bundles"] - stats0["rejected_bundles"] == 2, stats

    # V serves an honest peer that knows only V.
    w, _ = start_node(daemon_factory, "witness",
                      ["--bootstrap-node", f"{v_did}@127.0.0.1:{v.port}"])
    wait_mirror_seq(w, rid, seq3, "W from V")
    assert_mirror_is(w, rid, git_repo, repo)
    outside.assert_unchanged()
    assert p.proc.poll() is None, p.info()
    p.stop()
    w.stop()
    v.stop()


def test_file_name_is_informational(daemon_factory, peers, git_repo):
    """A Start whose file_name is "../../x" but whose bundle is honest is accepted: the name
    is never used as a path, so nothing named x appears anywhere."""
    v, v_did = start_node(daemon_factory, "victim")
    outside = Outside(v)
    repo = make_repo(git_repo)
    p = peers("--dial", f"{v_did}@127.0.0.1:{v.port}", "--repo-path", repo,
              "--serve", "file-traversal", "--wait", "120")
    rid, seq0 = wait_for(lambda: announced(p, 0), lambda: f"me-peer to announce\n{p.info()}")
    wait_mirror_seq(v, rid, seq0, "file-traversal")
    assert_mirror_is(v, rid, git_repo, repo)
    wait_tmp_empty(v)
    outside.assert_unchanged()
    names = {str(x) for x in tree(v.root) if os.path.basename(x) in ("x", "x.git")}
    assert not names, names
    p.stop()
    v.stop()


# ---- relaying a daemon's repository, badly ---------------------------------------------------

RELAY_VARIANTS = ["tampered", "refs-differ", "claim-creator", "other-repo", "past-size"]


@pytest.mark.parametrize("mode", RELAY_VARIANTS + ["honest"])
def test_hostile_relay(mode, daemon_factory, peers, git_repo):
    env = git_repo.env
    a, a_did = start_node(daemon_factory, "alpha")
    repo = make_repo(git_repo)
    rid = a.mectl("repo", "add", repo, json=True).json["id"]
    wait_signed(a, rid, git_repo, repo)
    v, v_did = start_node(daemon_factory, "victim")
    outside = Outside(v)
    p = peers("--dial", f"{a_did}@127.0.0.1:{a.port}", "--dial", f"{v_did}@127.0.0.1:{v.port}",
              "--relay", rid, "--serve", f"{mode},honest", "--wait", "300")
    wait_for(lambda: p.lines("relaying"), lambda: f"me-peer to fetch from A\n{p.info()}")
    relay = [j for j in json_lines(p) if j.get("relay")]
    assert relay and relay[0]["result"] == "done" and relay[0]["signature_ok"], p.info()
    seq = relay[0]["seq"]

    if mode == "honest":
        # The control: V takes the creator's repository from a relay.
        wait_mirror_seq(v, rid, seq, "honest relay")
        assert_mirror_is(v, rid, git_repo, repo)
    else:
        reject_stage(v, p, rid, mode, 0, {"row": {c: 0 for c in SYNC_COLS}, "refs": None},
                     outside, env)
        row = db_row(v, rid)
        assert row["creator"] == a_did and row["ref_seq"] == seq, row
        # The creator is unharmed, and an honest W that knows A gets the repository; V learns
        # W holds it and recovers.
        next_generation(p, 1)
        w, _ = start_node(daemon_factory, "witness",
                          ["--bootstrap-node", f"{a_did}@127.0.0.1:{a.port}",
                           "--bootstrap-node", f"{v_did}@127.0.0.1:{v.port}"])
        wait_mirror_seq(w, rid, seq, "W from A")
        assert_mirror_is(w, rid, git_repo, repo)
        wait_mirror_seq(v, rid, seq, "V recovers")
        assert_mirror_is(v, rid, git_repo, repo)
        w.stop()
    assert tmp_files(v) == []
    outside.assert_unchanged()
    assert not (a.root / "repos").exists() or not mirror_path(a, rid).exists()
    p.stop()
    v.stop()
    a.stop()


# ---- abusing a daemon's server ---------------------------------------------------------------

@pytest.fixture
def server(daemon_factory, git_repo):
    """A daemon serving one repository it created: (daemon, did, repo id, repo path)."""
    a, a_did = start_node(daemon_factory, "server")
    repo = make_repo(git_repo)
    rid = a.mectl("repo", "add", repo, json=True).json["id"]
    wait_signed(a, rid, git_repo, repo)
    return a, a_did, rid, repo


def fetch(peers, a, a_did, rid, *extra, wait="30"):
    """Runs me-peer --fetch to completion; returns (me-peer, its JSON lines)."""
    p = peers("--dial", f"{a_did}@127.0.0.1:{a.port}", "--fetch", rid, "--wait", wait, *extra)
    assert p.wait(float(wait) + 15) == 0, p.info()
    return p, json_lines(p)


def assert_series_of(res, repo, git_repo, check_in):
    """The bundles of one transfer (res, a JSON line) verify with git one after the other,
    each on top of the ones before, in check_in (a bare repository holding what the requester
    had), and leave exactly the repository's branches and tags."""
    assert res["result"] == "done" and res["bundles"] >= 1, res
    for b in res["series"]:
        assert b["ok"], res
        git_repo.git(check_in, "bundle", "verify", b["file"])
        git_repo.git(check_in, "fetch", "-q", "--prune", b["file"],
                     "+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*")
    heads = git_repo.git(check_in, "bundle", "list-heads", res["series"][-1]["file"])
    got = sorted(tuple(ln.split(" ", 1)) for ln in heads.splitlines())
    assert got == sorted(git_repo.refs(repo)), heads
    assert sorted(git_repo.refs(check_in)) == sorted(git_repo.refs(repo))


def assert_serves_honestly(peers, a, a_did, rid, repo, git_repo, tmp):
    """An honest request without haves gets the repository's whole series: returns its JSON
    line."""
    out = tmp / "honest.bundle"
    p, res = fetch(peers, a, a_did, rid, "--out", out)
    assert [r["result"] for r in res] == ["done"], p.info()
    r = res[0]
    assert r["signature_ok"] and r["repo_id_ok"] and r["creator"] == a_did, r
    assert r["series"][0]["offset"] == 0
    assert r["received"] == sum(b["total_size"] for b in r["series"]), r
    for b in r["series"]:
        assert Path(b["file"]).stat().st_size == b["total_size"]
    check = tmp / f"check-{len(list(tmp.glob('check-*')))}"
    git_repo.git(tmp, "init", "-q", "--bare", check)
    assert_series_of(r, repo, git_repo, check)
    return r


SERVER_ABUSE = {
    # xsend -> what the daemon does with the stream
    "garbage": "reset",
    "start": "reset",
    "traversal": "reset",
    "two": "reset",
    "huge-haves": "reset",
    "oversize": "reset",
}


@pytest.mark.parametrize("kind", list(SERVER_ABUSE))
def test_server_abuse(kind, server, peers, git_repo, tmp_path):
    a, a_did, rid, repo = server
    outside = Outside(a)
    stats0 = sync_stats(a)
    p, res = fetch(peers, a, a_did, rid, "--xsend", kind)
    assert len(res) == 1, p.info()
    r = res[0]
    assert r["result"] == SERVER_ABUSE[kind], p.info()
    assert r["app_error"] == 0x101, p.info()  # the frame was refused
    if kind != "two":  # the first of two requests may be answered before the second arrives
        assert not r["start"], p.info()
    assert_alive(a)
    stats = sync_stats(a)
    if stats is not None:
        assert stats["serves_ok"] == stats0["serves_ok"], stats
    assert_serves_honestly(peers, a, a_did, rid, repo, git_repo, tmp_path)
    assert not mirror_path(a, rid).exists()
    assert not (a.root / "tmp").exists() or tmp_files(a) == []
    outside.assert_unchanged()
    a.stop()


def test_server_unknown_repositories(server, peers, git_repo, tmp_path, daemon_factory):
    a, a_did, rid, repo = server
    # An id nobody has.
    p, res = fetch(peers, a, a_did, "random")
    assert [(r["result"], r["code"], r["message"]) for r in res] == \
        [("error", -10, "unknown repository")], p.info()
    # One the daemon knows (learnt by gossip) but holds no copy of.
    other = git_repo(name="other", commits=2)
    q = peers("--dial", f"{a_did}@127.0.0.1:{a.port}", "--repo-path", other, "--serve", "silent",
              "--wait", "60")
    orid, _ = wait_for(lambda: announced(q, 0), lambda: f"me-peer to announce\n{q.info()}")
    wait_for(lambda: db_row(a, orid) is not None, "A to learn the other repository")
    p, res = fetch(peers, a, a_did, orid)
    assert [(r["result"], r["code"]) for r in res] == [("error", -10)], p.info()
    assert res[0]["message"] == "no up-to-date copy here", p.info()
    q.stop()
    assert_serves_honestly(peers, a, a_did, rid, repo, git_repo, tmp_path)
    a.stop()


def test_server_resume(server, peers, git_repo, tmp_path):
    a, a_did, rid, repo = server
    full = assert_serves_honestly(peers, a, a_did, rid, repo, git_repo, tmp_path)
    data = (tmp_path / "honest.bundle").read_bytes()
    half = len(data) // 2
    part = tmp_path / "part.bundle"
    part.write_bytes(data[:half])
    p, res = fetch(peers, a, a_did, rid, "--resume", f"{full['digest']}:{half}", "--out", part)
    assert [r["result"] for r in res] == ["done"], p.info()
    assert res[0]["offset"] == half and res[0]["received"] == len(data) - half, p.info()
    assert res[0]["computed_digest"] == full["digest"]
    assert part.read_bytes() == data
    # A resume token for other bytes: the daemon starts over.
    other = tmp_path / "other.bundle"
    other.write_bytes(b"\0" * half)
    p, res = fetch(peers, a, a_did, rid, "--resume", f"{'ab' * 32}:{half}", "--out", other)
    assert [(r["result"], r["offset"]) for r in res] == [("done", 0)], p.info()
    assert other.read_bytes() == data
    # An offset past the end of the bundle: the daemon starts over too.
    p, res = fetch(peers, a, a_did, rid, "--resume", f"{full['digest']}:{len(data) + 1}",
                   "--out", other)
    assert [(r["result"], r["offset"]) for r in res] == [("done", 0)], p.info()
    a.stop()


def test_server_update_is_small(server, peers, git_repo, tmp_path):
    """A request with haves gets only what the requester lacks: a bundle git accepts on top of
    the old state, a small fraction of the whole on the wire."""
    a, a_did, rid, repo = server
    # Grow the history so the whole is clearly larger than an update.
    for i in range(5):
        (repo / f"big{i}.bin").write_bytes(os.urandom(100_000))
        git_repo.git(repo, "add", ".")
        git_repo.git(repo, "commit", "-qm", f"big {i}")
    old = tmp_path / "old"
    git_repo.git(tmp_path, "clone", "-q", "--mirror", repo, old)
    wait_signed(a, rid, git_repo, repo)
    whole = assert_serves_honestly(peers, a, a_did, rid, repo, git_repo, tmp_path)
    tips = sorted({oid for oid, _ in git_repo.refs(repo)})
    (repo / "file.txt").write_text("one more line\n")
    git_repo.git(repo, "commit", "-qam", "one commit")
    wait_signed(a, rid, git_repo, repo)
    out = tmp_path / "update.bundle"
    args = ["--out", out]
    for t in tips:
        args += ["--have", t]
    p, res = fetch(peers, a, a_did, rid, *args)
    assert [r["result"] for r in res] == ["done"], p.info()
    upd = res[0]
    assert upd["seq"] > whole["seq"]
    assert upd["bytes_in"] < 8192 and upd["bytes_in"] * 20 < whole["bytes_in"], (upd, whole)
    assert_series_of(upd, repo, git_repo, old)
    a.stop()


def test_server_limits(daemon_factory, peers, git_repo, tmp_path):
    """Five streams at once from one peer: the fifth cannot even open (4 streams per peer);
    of the four requests, two are served at a time and the others refused with EBUSY."""
    a, a_did = start_node(daemon_factory, "server")
    repo = git_repo(commits=1)
    (repo / "big.bin").write_bytes(os.urandom(6_000_000))
    git_repo.git(repo, "add", ".")
    git_repo.git(repo, "commit", "-qm", "big")
    rid = a.mectl("repo", "add", repo, json=True).json["id"]
    wait_signed(a, rid, git_repo, repo)
    out = tmp_path / "s.bundle"
    # warm the daemon's bundle cache: the four requests then all find it ready
    _, res = fetch(peers, a, a_did, rid, "--out", out, wait="60")
    assert [r["result"] for r in res] == ["done"]
    p, res = fetch(peers, a, a_did, rid, "--streams", "5", "--out", out, wait="60")
    by = {r["stream"]: r for r in res}
    assert sorted(by) == [0, 1, 2, 3, 4], p.info()
    assert by[4]["result"] == "open-failed" and by[4]["error"] == "EBUSY", p.info()
    results = sorted((by[i]["result"], by[i]["code"]) for i in range(4))
    assert results == [("done", 0), ("done", 0), ("error", -20), ("error", -20)], p.info()
    for i in range(4):
        if by[i]["result"] == "done":
            assert by[i]["computed_digest"] == by[i]["digest"]
        else:
            assert by[i]["message"] == "too many transfers at once"
    stats = sync_stats(a)
    if stats is not None:
        assert stats["serves_refused"] >= 2, stats
    a.stop()


def test_server_idle_streams(server, peers, git_repo, tmp_path, daemon_factory):
    """A peer holding four idle streams open does not keep the daemon from serving others."""
    a, a_did, rid, repo = server
    p = peers("--dial", f"{a_did}@127.0.0.1:{a.port}", "--fetch", rid, "--xsend", "silent",
              "--streams", "4", "--wait", "120")
    wait_for(lambda: len(p.lines("opened")) == 4, lambda: f"me-peer to open 4 streams\n{p.info()}")
    w, _ = start_node(daemon_factory, "witness",
                      ["--bootstrap-node", f"{a_did}@127.0.0.1:{a.port}"])
    seq = wait_for(lambda: (db_row(w, rid) or {}).get("ref_seq"), "W to learn the repository")
    wait_mirror_seq(w, rid, seq, "W from A")
    assert_mirror_is(w, rid, git_repo, repo)
    assert p.proc.poll() is None, p.info()
    assert_serves_honestly(peers, a, a_did, rid, repo, git_repo, tmp_path)
    p.stop()
    w.stop()
    a.stop()


def test_large_ref_state_replicates(daemon_factory, git_repo):
    """A repository with 3000 long tag names (a ref state of about 200 KB, within the 1 MiB
    gossip and transfer-message limits) replicates: its Start message must fit a frame."""
    a, a_did = start_node(daemon_factory, "alpha")
    repo = git_repo(commits=1)
    head = git_repo.git(repo, "rev-parse", "HEAD")
    lines = "".join(f"create refs/tags/release-candidate-version-{i:05d} {head}\n"
                    for i in range(3000))
    subprocess.run(["git", "update-ref", "--stdin"], cwd=repo, input=lines, text=True,
                   check=True, env=git_repo.env)
    rid = a.mectl("repo", "add", repo, json=True).json["id"]
    b, _ = start_node(daemon_factory, "beta", ["--bootstrap-node", f"{a_did}@127.0.0.1:{a.port}"])
    seq = wait_for(lambda: (db_row(b, rid) or {}).get("ref_seq"), "B to learn the repository")
    wait_mirror_seq(b, rid, seq, lambda: f"B from A\nA's log:\n{a.stderr()[-3000:]}")
    assert_mirror_is(b, rid, git_repo, repo)
    b.stop()
    a.stop()


def test_server_drops_idle_streams(server, peers, git_repo, tmp_path):
    """Peers that open streams and never finish their request (3 bytes of a frame header) are
    dropped like any transfer without data for 15 s: eight of them, four streams each, fill the
    daemon's 32 slots for a moment, not for ever."""
    a, a_did, rid, repo = server
    idle = [peers("--dial", f"{a_did}@127.0.0.1:{a.port}", "--fetch", rid, "--xsend", "partial",
                  "--streams", "4", "--wait", "300") for _ in range(8)]
    for p in idle:
        wait_for(lambda: len(p.lines("opened")) == 4, lambda: f"4 streams\n{p.info()}")
    for p in idle:
        wait_for(lambda: len(json_lines(p)) == 4,
                 lambda: f"the daemon to drop me-peer's idle streams\n{p.info()}\n"
                         f"{a.stderr()[-2000:]}", timeout=STALL_WAIT)
        assert {r["result"] for r in json_lines(p)} == {"reset"}, p.info()
    assert_serves_honestly(peers, a, a_did, rid, repo, git_repo, tmp_path)
    for p in idle:
        p.stop()
    a.stop()


@pytest.mark.parametrize("mode", ["trickle", "silent"])
def test_slow_peers_do_not_block_replication(mode, daemon_factory, peers, git_repo):
    """Four peers, each serving a repository of its own, slowly: one byte every 2 s (never
    quiet for 15 s, never done), or no answer at all to the request (the daemon waits 5 minutes
    for a Start). They must not keep a daemon from replicating an honest repository."""
    v, v_did = start_node(daemon_factory, "victim")
    slow = [peers("--dial", f"{v_did}@127.0.0.1:{v.port}",
                  "--repo-path", git_repo(name=f"slow{i}", commits=2),
                  "--serve", mode, "--wait", "300") for i in range(4)]
    for p in slow:
        wait_for(lambda: p.lines("trickling") or p.lines("served"),
                 lambda: f"V to fetch from me-peer\n{p.info()}")
    a, _ = start_node(daemon_factory, "alpha",
                      ["--bootstrap-node", f"{v_did}@127.0.0.1:{v.port}"])
    repo = make_repo(git_repo)
    rid = a.mectl("repo", "add", repo, json=True).json["id"]
    seq = wait_signed(a, rid, git_repo, repo)
    wait_for(lambda: db_row(v, rid) is not None, "V to learn the honest repository")
    wait_mirror_seq(v, rid, seq, f"V from A while four peers {mode}", timeout=60.0)
    assert_mirror_is(v, rid, git_repo, repo)
    for p in slow:
        p.stop()
    a.stop()
    v.stop()


def test_squatted_repository_id(daemon_factory, peers, git_repo):
    """A peer that announces someone else's did:repo as its own (a state it signs itself) to a
    node that has not heard of the repository yet is caught when the first fetch checks the id
    against the root commit; it must not keep that node from the genuine creator's repository."""
    a, a_did = start_node(daemon_factory, "alpha")
    repo = make_repo(git_repo)
    rid = a.mectl("repo", "add", repo, json=True).json["id"]
    seq = wait_signed(a, rid, git_repo, repo)
    v, v_did = start_node(daemon_factory, "victim")
    p = peers("--dial", f"{v_did}@127.0.0.1:{v.port}", "--repo-path", repo, "--squat", rid,
              "--serve", "honest", "--wait", "300")
    wait_for(lambda: announced(p, 0), lambda: f"me-peer to announce\n{p.info()}")
    # The first fetch proves the claim false: the repository as learnt from the squatter is
    # forgotten (it was never fetched) and the squatter's claim is ignored from then on.
    wait_for(lambda: f"{p.did} is not the creator of {rid}" in v.stderr(),
             lambda: f"V to refute the squatter\nlog:\n{v.stderr()[-3000:]}", timeout=20.0)
    assert "no root commit of this history gives the repository id" in v.stderr()
    wait_for(lambda: db_row(v, rid) is None, "V to forget the squatted repository")
    assert not mirror_path(v, rid).exists()
    # An honest W that knows the creator gets the repository and tells V it holds it.
    w, _ = start_node(daemon_factory, "witness",
                      ["--bootstrap-node", f"{a_did}@127.0.0.1:{a.port}",
                       "--bootstrap-node", f"{v_did}@127.0.0.1:{v.port}"])
    wait_mirror_seq(w, rid, seq, "W from A")
    wait_mirror_seq(v, rid, seq, "V from W or A, despite the squatter", timeout=40.0)
    assert_mirror_is(v, rid, git_repo, repo)
    assert repo_entry(v, rid)["creator"] == a_did
    p.stop()
    w.stop()
    v.stop()
    a.stop()


def test_max_repo_size(daemon_factory, peers, git_repo):
    """An honest bundle larger than the requester's --max-repo-size is refused at its Start,
    before any of it is written."""
    v, v_did = start_node(daemon_factory, "victim", ["--max-repo-size", "4K"])
    outside = Outside(v)
    repo = git_repo(commits=1)
    (repo / "big.bin").write_bytes(os.urandom(50_000))
    git_repo.git(repo, "add", ".")
    git_repo.git(repo, "commit", "-qm", "big")
    p = peers("--dial", f"{v_did}@127.0.0.1:{v.port}", "--repo-path", repo, "--serve", "honest",
              "--wait", "120")
    rid, _ = wait_for(lambda: announced(p, 0), lambda: f"me-peer to announce\n{p.info()}")
    wait_rejected(v, rid, p.did, 0, "is over the limit of 4096 (--max-repo-size)", 20.0)
    start = p.lines("start")[-1]
    assert int(start[4].split("=", 1)[1]) > 4096, p.info()
    assert not mirror_path(v, rid).exists()
    wait_tmp_empty(v)
    outside.assert_unchanged()
    assert_alive(v)
    p.stop()
    v.stop()


def test_series_keeps_verified_bundles(daemon_factory, peers, git_repo):
    """A transfer of two bundles whose second is not newer than the first: the first (a
    complete signed state, verified) stays applied, the second is refused, the mirror is sound
    and V serves what it has."""
    v, v_did = start_node(daemon_factory, "victim")
    outside = Outside(v)
    repo = make_repo(git_repo)
    p = peers("--dial", f"{v_did}@127.0.0.1:{v.port}", "--repo-path", repo, "--serve", "repeat",
              "--wait", "120")
    rid, seq0 = wait_for(lambda: announced(p, 0), lambda: f"me-peer to announce\n{p.info()}")
    wait_for(lambda: fetch_failures(v, rid, p.did) > 0, lambda: f"V to refuse\n{v.stderr()}")
    assert "failed: offered state is not newer than the mirror" in v.stderr()
    wait_mirror_seq(v, rid, seq0, "the first bundle applied")
    assert_mirror_is(v, rid, git_repo, repo)
    wait_tmp_empty(v)
    outside.assert_unchanged()
    w, _ = start_node(daemon_factory, "witness",
                      ["--bootstrap-node", f"{v_did}@127.0.0.1:{v.port}"])
    wait_mirror_seq(w, rid, seq0, "W from V")
    assert_mirror_is(w, rid, git_repo, repo)
    p.stop()
    w.stop()
    v.stop()
