"""mectl repo clone / pull / sync and their protocol commands, on real daemons with real git.

A repository added on this node is cloned from its working repository (the daemon's "source"),
with no network involved. Repositories learnt from peers are written into megaengine.db while
the daemon is stopped (as in test_nodes.py) to drive the deferred-reply machinery of repo.sync.

test_has_updates_then_pull_then_up_to_date relies on the daemon noticing new commits in a local
repository and signing a new ref state (daemon/watch.c): only then does `repo list` say
HAS UPDATES.
"""
import os
import socket
import time

import pytest

import meclient
from conftest import MECTL
from test_nodes import did_repo, insert_external_repo, insert_node, new_node, parse_table

WATCH_TIMEOUT = 20.0  # generous bound for the watcher to sign a new state


def git(repo_factory, cwd, *args, check=True):
    return repo_factory.git(cwd, *args, check=check)


def make_source(git_repo, name="proj"):
    """main (3 commits), develop and feature/x (one commit each on top of main), a lightweight
    and an annotated tag, a tag on develop, and HEAD on develop (not main)."""
    src = git_repo(name=name, commits=3, branches=("develop", "feature/x"), tags=("v0.1",),
                   annotated_tags=("v1.0",))
    git_repo.git(src, "checkout", "-q", "develop")
    git_repo.git(src, "tag", "-a", "-m", "on develop", "v1.1-dev")
    return src


def refs_of(git_repo, repo, prefixes=("refs/heads", "refs/tags")):
    out = git_repo.git(repo, "for-each-ref", *prefixes, "--format=%(objectname) %(refname)")
    return sorted(tuple(line.split(" ", 1)) for line in out.splitlines() if line)


def clone_branches(git_repo, clone):
    """{branch: upstream} of the clone's local branches."""
    out = git_repo.git(clone, "for-each-ref", "refs/heads",
                       "--format=%(refname:short) %(upstream:short)")
    return dict(line.split(" ", 1) if " " in line else (line, "") for line in out.splitlines())


def commit(git_repo, repo, fname, text, msg):
    (repo / fname).write_text(text)
    git_repo.git(repo, "add", fname)
    git_repo.git(repo, "commit", "-q", "-m", msg)
    return git_repo.git(repo, "rev-parse", "HEAD")


def repo_entry(d, rid):
    return {r["id"]: r for r in d.mectl("repo", "list", json=True).json["repos"]}[rid]


def wait_state(d, rid, want, timeout=WATCH_TIMEOUT):
    t0 = time.monotonic()
    while True:
        e = repo_entry(d, rid)
        if e["state"] == want:
            return e
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"{rid} did not become {want!r} within {timeout} s (needs the watcher "
                        f"to sign new states): {e}")
        time.sleep(0.1)


@pytest.fixture
def local(daemon, git_repo):
    src = make_source(git_repo)
    rid = daemon.mectl("repo", "add", src, json=True).json["id"]
    return daemon, src, rid


# ---- clone -----------------------------------------------------------------------------------

def test_clone_local_repository(local, git_repo, tmp_path):
    d, src, rid = local
    out = tmp_path / "work" / "proj"
    r = d.mectl("repo", "clone", "--repo-id", rid, "--output", out)
    assert r.stdout.startswith(f"Cloned proj into {out}\n"), r.stdout
    assert "Checked out branch develop\n" in r.stdout
    assert "3 branches, 3 tags" in r.stdout, r.stdout
    assert r.stderr == "", "no progress and no warning: stderr is not a terminal"

    # Same branches and tags as the source, each branch tracking origin's.
    assert refs_of(git_repo, out) == refs_of(git_repo, src)
    assert clone_branches(git_repo, out) == {
        "main": "origin/main", "develop": "origin/develop", "feature/x": "origin/feature/x"}
    assert git_repo.git(out, "symbolic-ref", "HEAD") == "refs/heads/develop"
    assert git_repo.git(out, "status", "--porcelain") == ""
    assert (out / "develop.txt").read_text() == "develop\n"
    assert git_repo.git(out, "cat-file", "-t", "v1.0") == "tag"
    assert git_repo.git(out, "cat-file", "-t", "v0.1") == "commit"
    git_repo.git(out, "fsck", "--strict", "--no-dangling")
    assert git_repo.git(out, "remote", "get-url", "origin") == str(src.resolve())
    assert git_repo.git(out, "config", "megaengine.repoid") == rid

    # The daemon knows the working copy.
    e = repo_entry(d, rid)
    assert [c["path"] for c in e["clones"]] == [str(out)]
    assert e["clones"][0]["seq"] == e["ref_seq"] > 0

    # Plain git works on it afterwards.
    head = commit(git_repo, src, "later.txt", "later\n", "later on develop")
    git_repo.git(out, "pull", "-q", "--ff-only")
    assert git_repo.git(out, "rev-parse", "HEAD") == head


def test_clone_positional_and_json(local, git_repo, tmp_path):
    d, src, rid = local
    (tmp_path / "empty").mkdir()  # an existing empty directory is fine
    j = d.mectl("repo", "clone", rid, "empty", cwd=tmp_path, json=True).json
    out = tmp_path / "empty"
    assert j["id"] == rid and j["name"] == "proj" and j["path"] == str(out)
    assert j["source"] == str(src.resolve()) and j["branch"] == "develop"
    assert j["head_guessed"] is False and j["branches"] == 3 and j["tags"] == 3
    assert j["warning"] is None
    assert j["seq"] == repo_entry(d, rid)["ref_seq"]
    assert refs_of(git_repo, out) == refs_of(git_repo, src)


@pytest.mark.parametrize("what", ["file inside", "hidden file inside", "a regular file"])
def test_clone_refuses_non_empty_output(local, tmp_path, what):
    d, src, rid = local
    target = tmp_path / "taken"
    if what == "a regular file":
        target.write_text("mine\n")
    else:
        target.mkdir()
        (target / (".keep" if what.startswith("hidden") else "notes.txt")).write_text("mine\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    inside = sorted(os.listdir(target)) if target.is_dir() else None

    r = d.mectl("repo", "clone", rid, target, check=False)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "refusing to clone" in r.stderr and "EEXIST" in r.stderr, r.stderr
    assert r.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if inside is not None:
        assert sorted(os.listdir(target)) == inside
        assert (target / inside[0]).read_text() == "mine\n"
    else:
        assert target.read_text() == "mine\n"
    assert repo_entry(d, rid)["clones"] == []


def unknown_repo_id():
    _, pk = new_node()
    return did_repo(os.urandom(20).hex(), pk)


def test_clone_errors(daemon, tmp_path):
    r = daemon.mectl("repo", "clone", unknown_repo_id(), tmp_path / "a", check=False)
    assert r.returncode == 1 and "ENOTFOUND" in r.stderr, r.stderr
    r = daemon.mectl("repo", "clone", "did:repo:../../etc", tmp_path / "b", check=False)
    assert r.returncode == 1 and "EBADID" in r.stderr, r.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---- pull ------------------------------------------------------------------------------------

def test_pull_fast_forwards_every_branch(local, git_repo, tmp_path):
    d, src, rid = local
    out = tmp_path / "c"
    d.mectl("repo", "clone", rid, out)
    old_dev = git_repo.git(out, "rev-parse", "develop")
    new_dev = commit(git_repo, src, "d2.txt", "d2\n", "more on develop")
    git_repo.git(src, "checkout", "-q", "main")
    new_main = commit(git_repo, src, "m2.txt", "m2\n", "more on main")
    git_repo.git(src, "checkout", "-q", "-b", "topic")
    new_topic = commit(git_repo, src, "t.txt", "t\n", "topic")
    git_repo.git(src, "tag", "v2.0")
    git_repo.git(src, "checkout", "-q", "develop")

    # From a subdirectory, without --repo-id: the clone remembers its id.
    sub = out / "subdir"
    sub.mkdir()
    r = d.mectl("repo", "pull", cwd=sub)
    lines = r.stdout.splitlines()
    assert lines[0] == f"Pulled into {out} from {src.resolve()}", r.stdout
    row = {ln.split()[0]: ln for ln in lines[1:]}
    assert f"updated {old_dev[:7]}..{new_dev[:7]}" in row["develop"] and "(checked out)" in \
        row["develop"]
    assert "updated" in row["main"] and "up to date" in row["feature/x"]
    assert "new branch" in row["topic"]
    assert git_repo.git(out, "rev-parse", "HEAD") == new_dev
    assert (out / "d2.txt").read_text() == "d2\n"
    assert git_repo.git(out, "rev-parse", "main") == new_main
    assert git_repo.git(out, "rev-parse", "topic") == new_topic
    assert clone_branches(git_repo, out)["topic"] == "origin/topic"
    assert git_repo.git(out, "rev-parse", "v2.0") == new_topic
    assert git_repo.git(out, "status", "--porcelain") == ""
    git_repo.git(out, "fsck", "--strict", "--no-dangling")

    # Again: nothing to do, and JSON says so.
    j = d.mectl("repo", "pull", "--repo-id", rid, "--path", out, json=True).json
    assert {b["name"]: b["status"] for b in j["branches"]} == {
        "develop": "up to date", "main": "up to date", "feature/x": "up to date",
        "topic": "up to date"}
    assert j["refused"] == [] and j["tracked"] is True and j["path"] == str(out)


def test_pull_keeps_a_local_tag(local, git_repo, tmp_path):
    d, src, rid = local
    out = tmp_path / "c"
    d.mectl("repo", "clone", rid, out)
    git_repo.git(out, "tag", "-f", "v0.1", "develop")  # the user moved a tag
    mine = git_repo.git(out, "rev-parse", "v0.1")
    r = d.mectl("repo", "pull", "--path", out)
    assert "1 local tag differs from origin's: left as it is" in r.stdout, r.stdout
    assert git_repo.git(out, "rev-parse", "v0.1") == mine


def test_pull_dirty_tree_is_refused(local, git_repo, tmp_path):
    d, src, rid = local
    out = tmp_path / "c"
    d.mectl("repo", "clone", rid, out)
    head = git_repo.git(out, "rev-parse", "HEAD")
    commit(git_repo, src, "develop.txt", "changed upstream\n", "upstream change")
    (out / "develop.txt").write_text("my local edit\n")

    r = d.mectl("repo", "pull", "--path", out, check=False)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "EDIRTY" in r.stderr and "commit or stash" in r.stderr, r.stderr
    assert "not updated: the working tree has local changes (EDIRTY)" in r.stdout, r.stdout
    assert git_repo.git(out, "rev-parse", "HEAD") == head
    assert git_repo.git(out, "symbolic-ref", "HEAD") == "refs/heads/develop"
    assert (out / "develop.txt").read_text() == "my local edit\n"
    assert git_repo.git(out, "status", "--porcelain") == "M develop.txt"  # (stripped)
    # Not recorded as up to date: the working copy lacks the new commit.
    j = d.mectl("repo", "pull", "--path", out, json=True, check=False).json
    assert j["refused"] == ["develop"] and j["tracked"] is False
    assert {b["name"]: b["status"] for b in j["branches"]}["develop"] == "dirty"

    # Once the change is gone, the same pull goes through.
    git_repo.git(out, "checkout", "--", "develop.txt")
    d.mectl("repo", "pull", "--path", out)
    assert (out / "develop.txt").read_text() == "changed upstream\n"


def test_pull_diverged_branch_is_left_alone(local, git_repo, tmp_path):
    d, src, rid = local
    out = tmp_path / "c"
    d.mectl("repo", "clone", rid, out)
    git_repo.git(src, "checkout", "-q", "main")
    upstream = commit(git_repo, src, "u.txt", "u\n", "upstream on main")
    git_repo.git(src, "checkout", "-q", "develop")
    new_dev = commit(git_repo, src, "d3.txt", "d3\n", "upstream on develop")
    git_repo.git(out, "checkout", "-q", "main")
    mine = commit(git_repo, out, "mine.txt", "mine\n", "my commit on main")
    git_repo.git(out, "checkout", "-q", "develop")

    r = d.mectl("repo", "pull", "--path", out, check=False)
    assert r.returncode == 1
    assert "EDIVERGED" in r.stderr, r.stderr
    row = {ln.split()[0]: ln for ln in r.stdout.splitlines()[1:]}
    assert "diverged: left as is (EDIVERGED)" in row["main"], r.stdout
    assert git_repo.git(out, "rev-parse", "main") == mine
    git_repo.git(out, "cat-file", "-e", mine)
    assert git_repo.git(out, "rev-parse", "origin/main") == upstream
    # The other branches still moved.
    assert git_repo.git(out, "rev-parse", "develop") == new_dev
    j = d.mectl("repo", "pull", "--path", out, json=True, check=False).json
    assert j["refused"] == ["main"] and j["tracked"] is False


def test_pull_outside_a_working_copy(daemon, tmp_path):
    r = daemon.mectl("repo", "pull", cwd=tmp_path, check=False)
    assert r.returncode == 1 and "ENOTREPO" in r.stderr, r.stderr


def test_pull_needs_an_id_when_not_a_megaengine_clone(daemon, git_repo):
    plain = git_repo(name="plain")
    r = daemon.mectl("repo", "pull", "--path", plain, check=False)
    assert r.returncode == 2 and "needs ID" in r.stderr, r.stderr


def test_has_updates_then_pull_then_up_to_date(local, git_repo, tmp_path):
    """Depends on the watcher (daemon/watch.c) signing the new state of the source."""
    d, src, rid = local
    out = tmp_path / "c"
    d.mectl("repo", "clone", rid, out)
    assert repo_entry(d, rid)["state"] == "up to date"
    seq0 = repo_entry(d, rid)["ref_seq"]
    new = commit(git_repo, src, "n.txt", "n\n", "new on develop")

    e = wait_state(d, rid, "HAS UPDATES")
    assert e["ref_seq"] > seq0 and e["clones"][0]["seq"] == seq0
    cols = ["ID", "NAME", "CREATOR", "STATE", "LAST SYNC"]
    rows = {x["ID"]: x for x in parse_table(d.mectl("repo", "list").stdout, cols)}
    assert rows[rid]["STATE"] == "HAS UPDATES" and rows[rid]["CREATOR"] == "you"

    d.mectl("repo", "pull", "--path", out)
    assert git_repo.git(out, "rev-parse", "HEAD") == new
    e = repo_entry(d, rid)
    assert e["state"] == "up to date" and e["clones"][0]["seq"] == e["ref_seq"]


# ---- sync ------------------------------------------------------------------------------------

def test_sync_of_a_local_repository_succeeds_at_once(local):
    d, src, rid = local
    r = d.mectl("repo", "sync", rid)
    assert r.stdout == f"proj ({rid}): up to date\n", r.stdout
    j = d.mectl("repo", "sync", "--repo-id", rid, json=True).json
    assert j["id"] == rid and j["state"] == "up to date" and j["mirror_seq"] == j["ref_seq"] > 0
    assert j["last_sync"] is None


def test_working_copy_that_disappears_is_forgotten(local, tmp_path):
    d, src, rid = local
    out = tmp_path / "gone"
    d.mectl("repo", "clone", rid, out)
    assert [c["path"] for c in repo_entry(d, rid)["clones"]] == [str(out)]
    import shutil
    shutil.rmtree(out)
    assert repo_entry(d, rid)["clones"] == []


# ---- protocol: argument validation -----------------------------------------------------------

BAD_IDS = ["", "nope", "did:repo:z../../etc/passwd", "../did:repo:zabc", "did:repo:z0OIl",
           "did:repo:z" + "1" * 44 + "/x"]


@pytest.mark.parametrize("cmd", ["repo.sync", "repo.clone", "repo.pull", "repo.track"])
def test_new_commands_validate_arguments(local, cmd, tmp_path):
    d, src, rid = local
    extra = {"path": str(tmp_path), "seq": 0} if cmd == "repo.track" else {}
    with meclient.connect(str(d.socket)) as c:
        def err(args):
            with pytest.raises(meclient.MeError) as e:
                c.request(cmd, args)
            return e.value.name

        assert err({}) == "EARG"
        assert err({**extra, "repo_id": 7}) == "EARG"
        assert err({**extra, "repo_id": b"did:repo"}) == "EARG"
        assert err({**extra, "repo_id": "did:repo:z" + "1" * 200}) == "EARG"
        assert err({**extra, "repo_id": rid, "bogus": 1}) == "EARG"
        for bad in BAD_IDS:
            assert err({**extra, "repo_id": bad}) == "EBADID", bad
        assert err({**extra, "repo_id": unknown_repo_id()}) == "ENOTFOUND"
        if cmd in ("repo.pull", "repo.track"):
            assert err({**extra, "repo_id": rid, "path": "relative/dir"}) == "EARG"
            assert err({**extra, "repo_id": rid, "path": 5}) == "EARG"
        if cmd == "repo.track":
            assert err({"repo_id": rid, "path": str(tmp_path)}) == "EARG"  # no seq
            for seq in (-1, "1", 1.5, None):
                assert err({"repo_id": rid, "path": str(tmp_path), "seq": seq}) == "EARG", seq
            assert err({"repo_id": rid, "path": "/a/../etc", "seq": 0}) == "EARG"
            assert err({"repo_id": rid, "path": str(tmp_path), "seq": 2 ** 62}) == "EARG"
        # Still serving, on the same connection.
        assert c.request("repo.show", {"repo_id": rid})["id"] == rid


def test_track_records_a_working_copy(local, tmp_path):
    d, src, rid = local
    seq = repo_entry(d, rid)["ref_seq"]
    with meclient.connect(str(d.socket)) as c:
        r = c.request("repo.track", {"repo_id": rid, "path": str(tmp_path), "seq": seq - 1})
        assert r["id"] == rid and r["state"] == "HAS UPDATES"
        shown = c.request("repo.show", {"repo_id": rid})
        assert shown["clones"] == [{"path": str(tmp_path), "seq": seq - 1}]
        assert shown["state"] == "HAS UPDATES"
        r = c.request("repo.track", {"repo_id": rid, "path": str(tmp_path), "seq": seq})
        assert r["state"] == "up to date"
        assert c.request("repo.show", {"repo_id": rid})["clones"] == [
            {"path": str(tmp_path), "seq": seq}]


def test_clone_reply_describes_the_source(local, git_repo):
    d, src, rid = local
    with meclient.connect(str(d.socket)) as c:
        r = c.request("repo.clone", {"repo_id": rid})
        assert r["id"] == rid and r["name"] == "proj" and r["source"] == str(src.resolve())
        assert r["head"] == "refs/heads/develop" and r["is_external"] is False
        assert r["seq"] == c.request("repo.show", {"repo_id": rid})["ref_seq"]
        assert r["warning"] is None and r["tracked_seq"] == 0
        assert sorted((x["oid"], x["name"]) for x in r["refs"]) == refs_of(git_repo, src)
        p = c.request("repo.pull", {"repo_id": rid, "path": "/nowhere"})
        assert p["tracked_seq"] == 0 and p["source"] == r["source"]


# ---- deferred replies (repositories learnt from peers) ---------------------------------------

@pytest.fixture
def external(daemon_factory):
    """A daemon with an identity that knows one external repository nobody serves."""
    d = daemon_factory.start()
    d.mectl("auth", "init")
    d.stop()
    peer, peer_pk = new_node()
    insert_node(d.root, peer, "bob", "192.0.2.7:9000")
    rid, _ = insert_external_repo(d.root, peer, peer_pk, "theirs",
                                  [("refs/heads/main", "ab" * 20)])
    d = daemon_factory.start(d.root)
    yield d, rid
    if not d.stopped:
        d.stop()


def final_replies(conn, ids, timeout):
    """Reads frames until every id in ids has its final reply or timeout passes; returns
    ({id: final reply}, [progress frames], order of final ids). Checks that no frame of a
    request follows its final reply."""
    finals, progress, order = {}, [], []
    deadline = time.monotonic() + timeout
    while len(finals) < len(ids):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            f = conn.read_frame(timeout=left)
        except TimeoutError:
            break
        assert f.get("id") not in finals, f"a frame after the final reply: {f}"
        if f.get("kind") == "progress":
            progress.append(f)
        elif f.get("id") in ids:
            finals[f["id"]] = f
            order.append(f["id"])
    return finals, progress, order


def test_deferred_requests_are_bounded_and_cancelled_on_disconnect(external):
    d, rid = external
    n = 17  # one more than CONTROL_MAX_DEFERRED
    c = meclient.connect(str(d.socket))
    body = b"".join(meclient.frame(meclient.pack(meclient.request_obj(
        "repo.sync", {"repo_id": rid}, i))) for i in range(1, n + 1))
    c.send_raw(body)  # one write: the daemon reads all 17 at once
    finals, progress, order = final_replies(c, set(range(1, n + 1)), timeout=3.0)
    assert n in finals, "the last request is answered at once when the others wait"
    before = order[:order.index(n)]
    last = finals[n]
    if not before:
        # All 16 were still waiting: the 17th is refused.
        assert last["kind"] == "error" and last["error"]["name"] == "EBUSY", last
    else:
        assert last["kind"] == "error" and last["error"]["name"] != "EBUSY", last
    for f in finals.values():  # nobody serves it: no success
        assert f["kind"] == "error", f
        assert f["error"]["name"] in ("EBUSY", "EUNAVAIL", "ENOKEY"), f
    for p in progress:
        assert p["id"] in range(1, n + 1) and set(p["progress"]) == {"done", "total"}, p
        assert p["progress"]["total"] == 0 or p["progress"]["done"] <= p["progress"]["total"]
        assert p["id"] != n, "the refused request has no progress"
    # Hang up with whatever is still pending; the daemon carries on.
    c.close()
    with meclient.connect(str(d.socket)) as c2:
        st = c2.request("node.status")
        assert st["control_connections"] >= 1
        assert c2.request("repo.show", {"repo_id": rid})["id"] == rid
        # A second client asking for the same repository is served on its own.
        rid2 = c2.send_request("repo.sync", {"repo_id": rid})
        f2, _, _ = final_replies(c2, {rid2}, timeout=1.0)
        if rid2 in f2:
            assert f2[rid2]["kind"] == "error" and f2[rid2]["error"]["name"] in \
                ("EUNAVAIL", "ENOKEY"), f2
    # Abrupt resets too (RST instead of FIN).
    for _ in range(3):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(d.socket))
        s.sendall(meclient.frame(meclient.pack(meclient.request_obj(
            "repo.clone", {"repo_id": rid}, 1))))
        s.close()
    with meclient.connect(str(d.socket)) as c3:
        assert c3.request("repo.show", {"repo_id": rid})["state"] in (
            "not fetched", "queued", "syncing", "failed")
    d.stop()  # clean stop (ASan: no leak, no use after free)


def test_external_repository_listing(external):
    d, rid = external
    e = repo_entry(d, rid)
    assert e["creator_alias"] == "bob" and e["mirror_seq"] == 0 and e["clones"] == []
    assert e["state"] in ("not fetched", "queued", "syncing", "failed")
    assert e["last_sync"] is None
    cols = ["ID", "NAME", "CREATOR", "STATE", "LAST SYNC"]
    rows = {x["ID"]: x for x in parse_table(d.mectl("repo", "list").stdout, cols)}
    assert rows[rid]["CREATOR"] == "bob" and rows[rid]["LAST SYNC"] == "-"
    # Nothing to clone from yet: clone fails and writes nothing.
    out = d.root.parent / "never"
    r = d.mectl("--timeout", "5", "repo", "clone", rid, out, check=False, timeout=60)
    # EUNAVAIL, or (when the sync plane keeps the request queued for a holder to appear) no
    # reply within --timeout.
    assert (r.returncode == 1 and "EUNAVAIL" in r.stderr) or \
        (r.returncode == 3 and "no reply" in r.stderr), (r.returncode, r.stderr)
    assert not out.exists()
