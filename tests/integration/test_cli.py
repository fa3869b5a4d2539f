"""End-to-end tests of mectl and megaengined: real binaries, real daemons, real git repositories.

Exit codes of mectl: 0 success, 1 command failed, 2 usage error, 3 daemon unreachable,
4 protocol error. megaengined: 0 clean stop, 2 bad configuration, 1 refused start.
"""
import hashlib
import os
import re
import signal
import socket
import sqlite3
import stat
import subprocess
import time

import pytest

from conftest import MECTL, MEGAENGINED, SOCKET_NAME, free_port, short_tmpdir

B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
DID_KEY_RE = re.compile(r"did:key:z6Mk[1-9A-HJ-NP-Za-km-z]+")
DID_REPO_RE = re.compile(r"did:repo:z[1-9A-HJ-NP-Za-km-z]+")
KEY_HEADER = "megaengine-keypair-v1"

MECTL_COMMANDS = ["auth init", "auth show", "node id", "node status", "repo add", "repo list",
                  "repo show", "repo remove", "node list", "peer list", "repo sync", "repo clone",
                  "repo pull"]
MECTL_OPTIONS = ["--root", "--socket", "--json", "--timeout", "--help", "--version",
                 "--path", "--description", "--repo-id", "--output", "--progress",
                 "MEGAENGINE_ROOT", "MEGAENGINE_SOCKET"]
DAEMON_OPTIONS = ["--root", "--alias", "--addr", "--bootstrap-node", "--cert-path", "--socket",
                  "--socket-group", "--log-level", "--foreground", "--help", "--version",
                  "MEGAENGINE_ROOT", "MEGAENGINE_LOG"]


# ---- independent implementations of the identifiers ------------------------------------------

def b58encode(data):
    n = int.from_bytes(data, "big")
    out = ""
    while n:
        n, r = divmod(n, 58)
        out = B58_ALPHABET[r] + out
    return "1" * (len(data) - len(data.lstrip(b"\0"))) + out


def read_public_key(root):
    """The public key from ROOT/keypair (common/keys.h: header line, then the 64-byte libsodium
    secret key in lowercase hex, seed || public key)."""
    text = (root / "keypair").read_text()
    lines = text.split("\n")
    assert lines[0] == KEY_HEADER, text
    assert len(lines) == 3 and lines[2] == "", "key file must be exactly two lines"
    assert re.fullmatch(r"[0-9a-f]{128}", lines[1]), "line 2 must be 128 lowercase hex digits"
    return bytes.fromhex(lines[1])[32:]


def did_key(pk):
    return "did:key:z" + b58encode(b"\xed\x01" + pk)


def did_repo(root_oid_hex, pk):
    digest = hashlib.sha3_256(bytes.fromhex(root_oid_hex) + pk).digest()
    return "did:repo:z" + b58encode(b"\x16\x20" + digest)


def test_b58_known_vectors():
    assert b58encode(b"") == ""
    assert b58encode(b"\0\0\x01") == "112"
    assert b58encode(b"hello world") == "StV1DL6CwTryKyV"


def one_did(text, regex=DID_KEY_RE):
    found = set(regex.findall(text))
    assert len(found) == 1, f"expected exactly one id in:\n{text}"
    return found.pop()


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


# ---- help, version, usage errors (no daemon needed) ------------------------------------------

def test_mectl_help(daemon_factory):
    for flag in ("--help", "-h"):
        r = daemon_factory.mectl(flag)
        assert r.stderr == ""
        for word in MECTL_COMMANDS + MECTL_OPTIONS:
            assert word in r.stdout, f"mectl {flag} does not mention {word!r}"
        assert "Exit status" in r.stdout


def test_megaengined_help(daemon_factory):
    for flag in ("--help", "-h"):
        r = subprocess.run([MEGAENGINED, flag], capture_output=True, text=True,
                           env=daemon_factory.env, timeout=10)
        assert r.returncode == 0, r.stderr
        for word in DAEMON_OPTIONS:
            assert word in r.stdout, f"megaengined {flag} does not mention {word!r}"


def test_versions(daemon_factory):
    m = daemon_factory.mectl("--version").stdout
    assert re.fullmatch(r"mectl \d+\.\d+\.\d+ \(control protocol \d+\)\n", m), m
    for flag in ("--version", "-V"):
        r = subprocess.run([MEGAENGINED, flag], capture_output=True, text=True,
                           env=daemon_factory.env, timeout=10)
        assert r.returncode == 0
        assert re.fullmatch(r"megaengined \d+\.\d+\.\d+\n", r.stdout), r.stdout
        assert r.stdout.split()[1] == m.split()[1], "mectl and megaengined versions differ"


@pytest.mark.parametrize("args,needle", [
    ([], "no command"),
    (["bogus"], "unknown command"),
    (["repo"], "needs a subcommand"),
    (["auth"], "needs a subcommand"),
    (["repo", "bogus"], "unknown command"),
    (["--bogus", "repo", "list"], "unknown option"),
    (["-x", "repo", "list"], "unknown option"),
    (["repo", "list", "--bogus"], "has no option"),
    (["repo", "list", "extra"], "unexpected argument"),
    (["repo", "add"], "needs"),
    (["repo", "add", "--path"], "needs a value"),
    (["repo", "show"], "needs"),
    (["repo", "add", "a", "b"], "unexpected argument"),
    (["repo", "add", "a", "--path", "b"], "given twice"),
    (["--timeout", "0", "repo", "list"], "--timeout"),
    (["--timeout", "x", "repo", "list"], "--timeout"),
    (["--root"], "--root needs"),
    (["repo", "sync"], "needs"),
    (["repo", "clone"], "needs"),
    (["repo", "clone", "did:repo:zX"], "needs DIR"),
    (["repo", "clone", "--output", "d"], "needs ID"),
    (["repo", "clone", "a", "b", "c"], "unexpected argument"),
    (["repo", "clone", "a", "b", "--output", "c"], "given twice"),
    (["repo", "sync", "a", "--progress=yes"], "takes no value"),
    (["repo", "pull", "a", "b"], "unexpected argument"),
    (["repo", "pull", "--path"], "needs a value"),
])
def test_mectl_usage_errors(daemon_factory, args, needle):
    r = daemon_factory.mectl(*args, check=False)
    assert r.returncode == 2, (args, r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("mectl: "), r.stderr
    assert needle in r.stderr, r.stderr
    assert "mectl --help" in r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("args,needle", [
    (["--bogus"], "unknown option"),
    (["--log-level", "bogus"], "log level"),
    (["--addr", "1.2.3.4"], "--addr"),
    (["--addr", "1.2.3.4:0"], "--addr"),
    (["--addr", "1.2.3.4:65536"], "--addr"),
    (["--addr", "example.com:9000"], "--addr"),
    (["--bootstrap-node", "nonsense"], "--bootstrap-node"),
    (["--bootstrap-node", "did:key:zBad@127.0.0.1:9000"], "did:key"),
    (["--alias", ""], "--alias"),
    (["--alias", "x" * 64], "--alias"),
    (["stray"], "unexpected argument"),
    (["--socket"], "needs an argument"),
])
def test_megaengined_usage_errors(daemon_factory, args, needle):
    root = daemon_factory.new_root()
    r = daemon_factory.run_daemon(root, args)
    assert r.returncode == 2, (args, r.returncode, r.stderr)
    assert r.stderr.startswith("megaengined: "), r.stderr
    assert needle in r.stderr, r.stderr
    assert not root.exists(), "a rejected configuration must not create the data root"


# ---- identity: seed order, idempotence, permissions ------------------------------------------

def test_auth_init_before_daemon(daemon_factory):
    root = daemon_factory.new_root()
    assert not root.exists()
    r = daemon_factory.mectl("--root", root, "auth", "init")
    assert "Created node identity" in r.stdout
    did = one_did(r.stdout)
    assert "not running" in r.stdout  # says the daemon will pick it up

    assert mode_of(root) == 0o700
    key = root / "keypair"
    assert stat.S_ISREG(os.lstat(key).st_mode)
    assert mode_of(key) == 0o600
    assert did == did_key(read_public_key(root)), "did:key does not match the key file"
    assert not (root / SOCKET_NAME).exists()

    again = daemon_factory.mectl("--root", root, "auth", "init")
    assert "already exists" in again.stdout
    assert one_did(again.stdout) == did
    j = daemon_factory.mectl("--root", root, "auth", "init", json=True).json
    assert j["did"] == did and j["created"] is False
    assert daemon_factory.mectl("--root", root, "auth", "show").stdout.strip() == did
    assert daemon_factory.mectl("--root", root, "node", "id").stdout.strip() == did

    d = daemon_factory.start(root)
    assert d.mectl("auth", "show").stdout == did + "\n"
    # The start notice is written before the loop answers any request.
    assert did in d.stderr(), "the daemon should log its identity when it starts"
    assert d.mectl("node", "id").stdout == did + "\n"
    assert d.mectl("auth", "show", json=True).json == {"did": did}
    j = d.mectl("auth", "init", json=True).json
    assert j == {"did": did, "created": False}
    assert "already exists" in d.mectl("auth", "init").stdout
    assert d.mectl("node", "status", json=True).json["did"] == did
    d.stop()
    assert read_public_key(root) and did == did_key(read_public_key(root))


def test_key_with_open_permissions_is_refused(daemon_factory):
    root = daemon_factory.new_root()
    daemon_factory.mectl("--root", root, "auth", "init")
    os.chmod(root / "keypair", 0o644)

    r = daemon_factory.run_daemon(root)
    assert r.returncode != 0
    assert "permission" in r.stderr.lower(), r.stderr
    assert "keypair" in r.stderr, r.stderr
    assert not (root / SOCKET_NAME).exists()

    r = daemon_factory.mectl("--root", root, "auth", "show", check=False)
    assert r.returncode == 1
    assert "permission" in r.stderr.lower() and "0600" in r.stderr, r.stderr
    r = daemon_factory.mectl("--root", root, "auth", "init", check=False)
    assert r.returncode == 1, "auth init must not silently accept an unsafe key file"
    assert "permission" in r.stderr.lower(), r.stderr

    os.chmod(root / "keypair", 0o600)
    d = daemon_factory.start(root)
    d.stop()


def test_corrupt_key_is_refused(daemon_factory):
    root = daemon_factory.new_root()
    root.mkdir(mode=0o700)
    fd = os.open(root / "keypair", os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, b"megaengine-keypair-v1\n" + b"00" * 64 + b"\n")  # public half mismatch
    os.close(fd)
    r = daemon_factory.run_daemon(root)
    assert r.returncode != 0
    assert "keypair" in r.stderr, r.stderr
    r = daemon_factory.mectl("--root", root, "auth", "show", check=False)
    assert r.returncode == 1 and "EKEY" in r.stderr, r.stderr


def test_daemon_without_key_then_auth_init(daemon_factory, git_repo):
    d = daemon_factory.start()
    assert not (d.root / "keypair").exists()
    repo = git_repo()

    st = d.mectl("node", "status", json=True).json
    assert st["did"] is None
    assert "without an identity" in d.stderr()
    assert "mectl auth init" in d.mectl("node", "status").stdout

    r = d.mectl("repo", "add", repo, check=False)
    assert r.returncode == 1
    assert "mectl auth init" in r.stderr and "ENOKEY" in r.stderr, r.stderr
    r = d.mectl("auth", "show", check=False)
    assert r.returncode == 1 and "mectl auth init" in r.stderr, r.stderr
    assert d.mectl("repo", "list", json=True).json == {"repos": []}

    j = d.mectl("auth", "init", json=True).json
    assert j["created"] is True
    did = j["did"]
    assert DID_KEY_RE.fullmatch(did)
    assert mode_of(d.root / "keypair") == 0o600
    assert did == did_key(read_public_key(d.root))

    # No restart needed.
    r = d.mectl("repo", "add", repo)
    assert one_did(r.stdout, DID_REPO_RE) == did_repo(git_repo.root_commit(repo),
                                                      read_public_key(d.root))
    assert d.mectl("auth", "show").stdout.strip() == did
    assert d.mectl("auth", "init", json=True).json == {"did": did, "created": False}
    d.stop()


# ---- repositories -----------------------------------------------------------------------------

def test_repo_add_id_matches_independent_computation(daemon, git_repo):
    repo = git_repo(name="alpha", commits=3)
    pk = read_public_key(daemon.root)
    expected = did_repo(git_repo.root_commit(repo), pk)

    r = daemon.mectl("repo", "add", "--path", repo)
    assert r.stdout == f"Added repository alpha as {expected}\n"
    j = daemon.mectl("repo", "show", expected, json=True).json
    me = did_key(pk)
    assert j["id"] == expected
    assert j["name"] == "alpha"
    assert j["creator"] == me and j["mine"] is True
    assert j["path"] == str(repo.resolve())
    assert j["root_commit"] == git_repo.root_commit(repo)
    assert j["state"] == "up to date" and j["creator_alias"] == "you"
    assert j["clones"] == [] and j["error"] is None and j["progress"] is None
    assert j["last_sync"] is None and j["mirror_seq"] == j["ref_seq"]


def test_repo_add_positional_relative_path(daemon, git_repo, tmp_path):
    repo = git_repo(name="beta", commits=2)
    other = tmp_path / "elsewhere"
    other.mkdir()
    rel = os.path.relpath(repo, other)
    assert not os.path.isabs(rel)
    j = daemon.mectl("repo", "add", rel, json=True, cwd=other).json
    assert j["id"] == did_repo(git_repo.root_commit(repo), read_public_key(daemon.root))
    assert j["path"] == str(repo.resolve())
    assert j["name"] == "beta"
    # Refs come back with the add reply too.
    assert sorted((x["oid"], x["name"]) for x in j["refs"]) == sorted(git_repo.refs(repo))

    # --path=VALUE form, with a trailing slash, from inside the repository: same repository.
    r = daemon.mectl("repo", "add", "--path=./", cwd=repo, check=False)
    assert r.returncode == 1 and "already added" in r.stderr, r.stderr


def test_repo_add_twice(daemon, git_repo):
    repo = git_repo(commits=1)
    rid = one_did(daemon.mectl("repo", "add", repo).stdout, DID_REPO_RE)
    r = daemon.mectl("repo", "add", "--path", repo, check=False)
    assert r.returncode == 1
    assert "already added" in r.stderr and rid in r.stderr and "EEXIST" in r.stderr, r.stderr
    assert r.stdout == ""

    # A clone has the same root commit and creator, so the same id: refused too.
    clone = repo.parent / "clone"
    git_repo.git(repo.parent, "clone", "-q", repo, clone)
    r = daemon.mectl("repo", "add", clone, check=False)
    assert r.returncode == 1 and "already added" in r.stderr and rid in r.stderr, r.stderr
    assert len(daemon.mectl("repo", "list", json=True).json["repos"]) == 1


def test_repo_description(daemon, git_repo):
    repo = git_repo(name="described")
    text = "A small test repository — with ünïcode"
    rid = daemon.mectl("repo", "add", repo, "--description", text, json=True).json["id"]
    out = daemon.mectl("repo", "show", rid).stdout
    assert f"Description:  {text}\n" in out
    assert daemon.mectl("repo", "show", "--repo-id", rid, json=True).json["description"] == text
    listed = daemon.mectl("repo", "list", json=True).json["repos"]
    assert listed[0]["description"] == text

    plain = git_repo(name="plain")
    rid2 = daemon.mectl("repo", "add", plain, json=True).json["id"]
    assert daemon.mectl("repo", "show", rid2, json=True).json["description"] == ""


def test_repo_list(daemon, git_repo):
    r = daemon.mectl("repo", "list")
    assert "No repositories" in r.stdout and "mectl repo add" in r.stdout

    a = git_repo(name="aaa", commits=2)
    b = git_repo(name="bbb", commits=1)
    ida = daemon.mectl("repo", "add", a, "--description", "first", json=True).json["id"]
    idb = daemon.mectl("repo", "add", b, json=True).json["id"]

    lines = daemon.mectl("repo", "list").stdout.splitlines()
    assert lines[0].split() == ["ID", "NAME", "CREATOR", "STATE", "LAST", "SYNC"]
    assert len(lines) == 3
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {ida, idb}
    # A local repository is never synced: its LAST SYNC is "-".
    assert rows[ida][1:] == ["aaa", "you", "up", "to", "date", "-"]
    assert rows[idb][1:] == ["bbb", "you", "up", "to", "date", "-"]

    j = daemon.mectl("repo", "list", json=True).json
    me = daemon.mectl("auth", "show").stdout.strip()
    repos = {x["id"]: x for x in j["repos"]}
    assert set(repos) == {ida, idb}
    assert [x["name"] for x in j["repos"]] == ["aaa", "bbb"], "ordered by name"
    assert repos[ida]["name"] == "aaa" and repos[ida]["path"] == str(a.resolve())
    assert repos[ida]["description"] == "first" and repos[idb]["description"] == ""
    for x in j["repos"]:
        assert x["creator"] == me and x["mine"] is True and x["creator_alias"] == "you"
        assert isinstance(x["updated_at"], int) and x["updated_at"] > 0
        assert "refs" not in x
        assert x["state"] == "up to date" and x["clones"] == [] and x["last_sync"] is None
        assert x["ref_seq"] > 0 and x["mirror_seq"] == x["ref_seq"]


def test_repo_show_refs(daemon, git_repo):
    repo = git_repo(name="refsy", commits=3, branches=["feature", "topic/x"], tags=["v1"],
                    annotated_tags=["v2"])
    rid = daemon.mectl("repo", "add", repo, json=True).json["id"]
    expected = git_repo.refs(repo)
    assert len(expected) == 5

    out = daemon.mectl("repo", "show", rid).stdout
    assert f"ID:           {rid}\n" in out
    assert "Name:         refsy\n" in out
    assert "HEAD:         refs/heads/main\n" in out
    assert f"Root commit:  {git_repo.root_commit(repo)}\n" in out
    assert f"Path:         {repo.resolve()}\n" in out
    assert "(you)" in out
    assert f"Refs:         {len(expected)}\n" in out
    shown = [tuple(line.split()) for line in out.splitlines()
             if re.match(r"  [0-9a-f]{40}  refs/", line)]
    assert shown == expected

    j = daemon.mectl("repo", "show", rid, json=True).json
    assert [(x["oid"], x["name"]) for x in j["refs"]] == expected
    assert j["head"] == "refs/heads/main"
    # The annotated tag keeps the tag object's id, not the commit's.
    tag_obj = git_repo.git(repo, "rev-parse", "v2")
    assert git_repo.git(repo, "cat-file", "-t", tag_obj) == "tag"
    assert (tag_obj, "refs/tags/v2") in shown


def test_repo_show_detached_head(daemon, git_repo):
    repo = git_repo(commits=2)
    git_repo.git(repo, "checkout", "-q", "--detach", "HEAD~1")
    j = daemon.mectl("repo", "add", repo, json=True).json
    assert j["head"] == ""
    assert "HEAD:         (detached)" in daemon.mectl("repo", "show", j["id"]).stdout


def test_repo_add_bare_symlinked_and_odd_names(daemon, git_repo, tmp_path):
    src = git_repo(name="proj", commits=2, tags=["v1"])
    bare = tmp_path / "srv" / "proj.git"
    git_repo.git(tmp_path, "clone", "-q", "--bare", src, bare)
    j = daemon.mectl("repo", "add", bare, json=True).json
    assert j["name"] == "proj" and j["path"] == str(bare)
    assert [(x["oid"], x["name"]) for x in j["refs"]] == git_repo.refs(bare)

    odd = git_repo(name="my repo ü", commits=1)
    link = tmp_path / "link-to-odd"
    link.symlink_to(odd)
    j = daemon.mectl("repo", "add", link, json=True).json
    assert j["name"] == "my repo ü" and j["path"] == str(odd.resolve())
    assert "my repo ü" in daemon.mectl("repo", "list").stdout


def test_repo_remove(daemon, git_repo):
    repo = git_repo()
    rid = daemon.mectl("repo", "add", repo, json=True).json["id"]
    r = daemon.mectl("repo", "remove", rid)
    assert r.stdout == f"Removed repository {rid}\n"
    assert repo.is_dir() and (repo / ".git").is_dir(), "remove must keep the files"

    r = daemon.mectl("repo", "show", rid, check=False)
    assert r.returncode == 1 and "ENOTFOUND" in r.stderr and rid in r.stderr, r.stderr
    r = daemon.mectl("repo", "remove", "--repo-id", rid, check=False)
    assert r.returncode == 1 and "ENOTFOUND" in r.stderr, r.stderr
    r = daemon.mectl("repo", "show", rid, json=True, check=False)
    assert r.returncode == 1
    assert r.json["error"]["name"] == "ENOTFOUND" and r.json["error"]["code"] == -10
    assert daemon.mectl("repo", "list", json=True).json == {"repos": []}

    # It can be added again, with the same id.
    assert daemon.mectl("repo", "add", repo, json=True).json["id"] == rid


@pytest.mark.parametrize("bad", [
    "not-an-id", "did:repo:", "did:repo:z", "did:repo:z0OIl", "did:key:z6Mkabc",
    "did:repo:z" + "1" * 10,
    "did:repo:z" + b58encode(b"\x12\x20" + bytes(32)),      # sha2-256, not sha3-256
    "did:repo:z" + b58encode(b"\x16\x20" + bytes(31)),      # digest too short
    "did:repo:z" + b58encode(b"\x16\x20" + bytes(33)),      # digest too long
    "did:repo:Z" + b58encode(b"\x16\x20" + bytes(32)),      # not base58btc ('z')
])
def test_malformed_repo_id(daemon, bad):
    for verb in ("show", "remove"):
        r = daemon.mectl("repo", verb, bad, check=False)
        assert r.returncode == 1, (verb, bad, r.stdout, r.stderr)
        assert "EBADID" in r.stderr and "did:repo" in r.stderr, r.stderr


def test_repo_add_errors(daemon, git_repo, tmp_path):
    def requests_seen():
        return daemon.stderr().count("repo.add")

    plain = tmp_path / "plain"
    plain.mkdir()
    r = daemon.mectl("repo", "add", plain, check=False)
    assert r.returncode == 1
    assert "not a git repository" in r.stderr and "ENOTREPO" in r.stderr, r.stderr

    empty = git_repo(name="empty", commits=0)
    r = daemon.mectl("repo", "add", empty, check=False)
    assert r.returncode == 1
    assert "no commits" in r.stderr and "EEMPTY" in r.stderr, r.stderr

    full = git_repo(name="full", commits=1)
    sub = full / "subdir"
    sub.mkdir()
    r = daemon.mectl("repo", "add", sub, check=False)
    assert r.returncode == 1 and "not a git repository" in r.stderr, r.stderr

    afile = tmp_path / "afile"
    afile.write_text("x")
    r = daemon.mectl("repo", "add", afile, check=False)
    assert r.returncode == 1 and "not a git repository" in r.stderr, r.stderr

    before = requests_seen()
    missing = tmp_path / "does" / "not" / "exist"
    r = daemon.mectl("repo", "add", missing, check=False)
    assert r.returncode == 1
    assert str(missing) in r.stderr and "No such file" in r.stderr, r.stderr
    assert requests_seen() == before, "a missing path must be caught by mectl itself"

    assert daemon.mectl("repo", "list", json=True).json == {"repos": []}


# ---- node status ------------------------------------------------------------------------------

def test_node_status(daemon_factory, git_repo):
    d = daemon_factory.start(extra_args=["--alias", "test-node"])
    did = d.mectl("auth", "init", json=True).json["did"]

    j = d.mectl("node", "status", json=True).json
    assert j["did"] == did
    assert j["alias"] == "test-node"
    assert j["addresses"] == [f"127.0.0.1:{d.port}"]
    assert isinstance(j["uptime_s"], int) and 0 <= j["uptime_s"] < 60
    assert j["version"] == daemon_factory.mectl("--version").stdout.split()[1]
    assert j["root"] == str(d.root)
    assert j["repos"] == 0
    assert j["nodes"] == 0 and j["peers"] == 0

    d.mectl("repo", "add", git_repo())
    d.mectl("repo", "add", git_repo())
    assert d.mectl("node", "status", json=True).json["repos"] == 2

    out = d.mectl("node", "status").stdout
    assert f"Node:         {did}\n" in out
    assert "Alias:        test-node\n" in out
    assert f"Addresses:    127.0.0.1:{d.port}\n" in out
    assert f"Version:      {j['version']}\n" in out
    assert re.search(r"^Uptime:       0d 00:00:\d\d$", out, re.M), out
    assert f"Data root:    {d.root}\n" in out
    assert "Repositories: 2\n" in out


def test_node_status_several_addresses_and_default_alias(daemon_factory):
    p1, p2 = free_port(), free_port()
    d = daemon_factory.start(extra_args=["--addr", f"127.0.0.2:{p1}",
                                         "--addr", f"[0:0::1]:{p2}"])
    j = d.mectl("node", "status", json=True).json
    assert j["addresses"] == [f"127.0.0.1:{d.port}", f"127.0.0.2:{p1}", f"[::1]:{p2}"]
    assert j["alias"] and socket.gethostname().startswith(j["alias"])


# ---- reaching the daemon ----------------------------------------------------------------------

def test_unreachable_daemon(daemon_factory):
    for args in (["repo", "list"], ["node", "status"], ["repo", "show", "did:repo:zabc"]):
        r = daemon_factory.mectl("--root", "/nonexistent-dir", *args, check=False)
        assert r.returncode == 3, (args, r.returncode, r.stderr)
        assert "/nonexistent-dir/megaengined.sock" in r.stderr, r.stderr
        assert "megaengined --root /nonexistent-dir" in r.stderr, r.stderr


def test_env_root_used_by_daemon_and_mectl(daemon_factory, git_repo):
    root = daemon_factory.new_root()
    env = dict(daemon_factory.env, MEGAENGINE_ROOT=str(root))
    # auth init without a daemon honours the variable too
    did = one_did(daemon_factory.mectl("auth", "init", env=env).stdout)
    assert (root / "keypair").exists()

    d = daemon_factory.start(root, env=env, root_flag=False)
    assert d.socket.exists()
    j = daemon_factory.mectl("node", "status", json=True, env=env).json
    assert j["root"] == str(root) and j["did"] == did
    daemon_factory.mectl("repo", "add", git_repo(), env=env)
    d.stop()


def test_root_flag_overrides_env(daemon_factory):
    root = daemon_factory.new_root()
    decoy = daemon_factory.new_root()
    env = dict(daemon_factory.env, MEGAENGINE_ROOT=str(decoy))
    d = daemon_factory.start(root, env=env)
    assert (root / SOCKET_NAME).exists()
    assert not decoy.exists(), "--root must win over MEGAENGINE_ROOT"

    j = daemon_factory.mectl("--root", root, "node", "status", json=True, env=env).json
    assert j["root"] == str(root)
    r = daemon_factory.mectl("node", "status", env=env, check=False)
    assert r.returncode == 3 and str(decoy) in r.stderr, r.stderr
    # auth init without the flag goes to the env root, with it to the daemon's
    daemon_factory.mectl("--root", root, "auth", "init", env=env)
    assert (root / "keypair").exists() and not decoy.exists()
    d.stop()


def test_socket_flag_and_env(daemon_factory):
    sockdir = short_tmpdir("me-s-")
    daemon_factory.dirs.append(sockdir)
    sock = sockdir / "ctl.sock"
    d = daemon_factory.start(socket_path=sock)
    assert sock.exists() and not (d.root / SOCKET_NAME).exists()
    assert mode_of(sock) == 0o660

    assert daemon_factory.mectl("--socket", sock, "node", "status", json=True).json["root"] \
        == str(d.root)
    assert daemon_factory.mectl("-s", sock, "node", "status", json=True).json["root"] \
        == str(d.root)
    env = dict(daemon_factory.env, MEGAENGINE_SOCKET=str(sock))
    assert daemon_factory.mectl("node", "status", json=True, env=env).json["root"] == str(d.root)
    # --socket beats MEGAENGINE_SOCKET
    env_bad = dict(daemon_factory.env, MEGAENGINE_SOCKET=str(sockdir / "nope.sock"))
    daemon_factory.mectl("--socket", sock, "node", "status", env=env_bad)
    r = daemon_factory.mectl("node", "status", env=env_bad, check=False)
    assert r.returncode == 3 and "nope.sock" in r.stderr, r.stderr
    # the default socket of that root is not where the daemon listens
    r = daemon_factory.mectl("--root", d.root, "repo", "list", check=False)
    assert r.returncode == 3
    d.stop()
    assert not sock.exists()


def test_long_root_needs_socket_flag(daemon_factory):
    base = daemon_factory.new_root().parent
    root = base / ("d" * 100) / "root"
    root.parent.mkdir()
    r = daemon_factory.run_daemon(root)
    assert r.returncode == 2 and "--socket" in r.stderr, r.stderr
    assert not root.exists()
    # No daemon can listen on ROOT/megaengined.sock there: auth init works on the root itself.
    did = one_did(daemon_factory.mectl("--root", root, "auth", "init").stdout)
    assert (root / "keypair").exists()

    sock = base / "s.sock"
    d = daemon_factory.start(root, socket_path=sock)
    assert d.mectl("auth", "init", json=True).json == {"did": did, "created": False}
    assert d.mectl("node", "status", json=True).json["root"] == str(root)
    d.stop()


def test_log_levels(daemon_factory):
    # MEGAENGINE_LOG=debug without --log-level: debug lines appear.
    env = dict(daemon_factory.env, MEGAENGINE_LOG="debug")
    d = daemon_factory.start(env=env, log_level=None)
    d.mectl("node", "status")
    d.stop()
    assert re.search(r"^debug: ", d.stderr(), re.M), d.stderr()

    # The default level is info: no debug lines, but the start notice.
    d = daemon_factory.start(log_level=None)
    d.mectl("node", "status")
    d.stop()
    assert not re.search(r"^debug: ", d.stderr(), re.M), d.stderr()
    assert re.search(r"^notice: ", d.stderr(), re.M), d.stderr()

    # --log-level beats MEGAENGINE_LOG.
    d = daemon_factory.start(env=env, log_level="error")
    d.mectl("node", "status")
    d.stop()
    assert d.stderr() == "", d.stderr()

    r = daemon_factory.run_daemon(daemon_factory.new_root(), log_level=None,
                                  env=dict(daemon_factory.env, MEGAENGINE_LOG="bogus"))
    assert r.returncode == 2 and "MEGAENGINE_LOG" in r.stderr, r.stderr


# ---- lifecycle --------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_clean_stop_on_signal(daemon, sig):
    assert daemon.socket.exists()
    daemon.mectl("node", "status")
    daemon.stop(sig)  # exit 0, socket removed, no sanitizer report
    assert ("SIGTERM" if sig == signal.SIGTERM else "SIGINT") in daemon.stderr()
    r = daemon.mectl("repo", "list", check=False)
    assert r.returncode == 3


def test_stale_socket_after_kill9(daemon_factory, git_repo):
    d = daemon_factory.start()
    d.mectl("auth", "init")
    rid = d.mectl("repo", "add", git_repo(), json=True).json["id"]
    d.kill()
    assert d.socket.exists(), "SIGKILL cannot remove the socket"
    r = d.mectl("repo", "list", check=False)
    assert r.returncode == 3 and "Is the daemon running?" in r.stderr, r.stderr

    d2 = daemon_factory.start(d.root)
    assert [x["id"] for x in d2.mectl("repo", "list", json=True).json["repos"]] == [rid]
    d2.stop()


def test_second_daemon_on_same_root_is_refused(daemon, daemon_factory):
    r = daemon_factory.run_daemon(daemon.root)
    assert r.returncode != 0
    assert "already running" in r.stderr, r.stderr
    assert daemon.proc.poll() is None
    assert daemon.socket.exists()
    assert daemon.mectl("node", "status", json=True).json["root"] == str(daemon.root)


def test_second_daemon_on_same_socket_is_refused(daemon, daemon_factory):
    r = daemon_factory.run_daemon(daemon_factory.new_root(),
                                  ["--socket", daemon.socket])
    assert r.returncode != 0
    assert str(daemon.socket) in r.stderr, r.stderr
    assert daemon.mectl("node", "status", json=True).json["root"] == str(daemon.root)


def test_data_root_that_is_a_file(daemon_factory):
    root = daemon_factory.new_root()
    root.write_text("")
    r = daemon_factory.run_daemon(root)
    assert r.returncode == 1 and "not a directory" in r.stderr, r.stderr
    r = daemon_factory.mectl("--root", root, "auth", "init", check=False)
    # mectl cannot even look for the socket there (ENOTDIR): either answer names the root.
    assert r.returncode in (1, 3) and str(root) in r.stderr, r.stderr


def test_socket_path_that_is_not_a_socket_is_kept(daemon_factory):
    root = daemon_factory.new_root()
    root.mkdir(mode=0o700)
    (root / SOCKET_NAME).write_text("precious")
    r = daemon_factory.run_daemon(root)
    assert r.returncode != 0 and "not a socket" in r.stderr, r.stderr
    assert (root / SOCKET_NAME).read_text() == "precious"


def test_data_persists_across_restart(daemon_factory, git_repo):
    d = daemon_factory.start()
    did = d.mectl("auth", "init", json=True).json["did"]
    repo = git_repo(branches=["dev"], tags=["v1"])
    rid = d.mectl("repo", "add", repo, "--description", "kept", json=True).json["id"]
    before = d.mectl("repo", "show", rid, json=True).json
    d.stop()

    d2 = daemon_factory.start(d.root)
    assert d2.mectl("auth", "show").stdout.strip() == did
    after = d2.mectl("repo", "show", rid, json=True).json
    assert after == before
    assert d2.mectl("node", "status", json=True).json["repos"] == 1
    d2.stop()


def test_database_file(daemon, git_repo):
    repo = git_repo(branches=["dev"], tags=["v1"])
    rid = daemon.mectl("repo", "add", repo, json=True).json["id"]
    db = daemon.root / "megaengine.db"
    assert db.is_file()

    con = sqlite3.connect(db, timeout=5)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"repos", "refs", "nodes"} <= tables, tables
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        rows = con.execute("SELECT id, name, path FROM repos").fetchall()
        assert rows == [(rid, repo.name, str(repo.resolve()))]
        refs = con.execute("SELECT oid, ref_name FROM refs WHERE repo_id = ? ORDER BY ref_name",
                           (rid,)).fetchall()
        assert refs == git_repo.refs(repo)
    finally:
        con.close()
    daemon.stop()
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert con.execute("SELECT count(*) FROM repos").fetchone()[0] == 1
    finally:
        con.close()


def test_root_layout(daemon):
    assert mode_of(daemon.socket) == 0o660
    assert stat.S_ISSOCK(os.lstat(daemon.socket).st_mode)
    assert (daemon.root / "megaengined.lock").read_text().strip() == str(daemon.pid)
    assert mode_of(daemon.root / "keypair") == 0o600


def test_many_sequential_clients(daemon, git_repo):
    """A burst of clients: the daemon keeps answering and does not leak connections."""
    rid = daemon.mectl("repo", "add", git_repo(), json=True).json["id"]
    procs = [subprocess.Popen([MECTL, "--root", daemon.root, "--json", "repo", "show", rid],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=daemon.factory.env) for _ in range(20)]
    for p in procs:
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
    # Closed connections are reaped as their EOF is read: allow the loop a moment.
    for _ in range(100):
        n = daemon.mectl("node", "status", json=True).json["control_connections"]
        if n == 1:
            break
        time.sleep(0.02)
    assert n == 1, "connections of finished clients are still counted"
