"""node.list, peer.list and what the store says about other nodes, on a single daemon.

Rows for other nodes and for repositories learnt from them are written into megaengine.db with
sqlite3 while the daemon is stopped, then the daemon is started again and asked about them.
"""
import hashlib
import os
import re
import sqlite3
import time

import pytest

import meclient

B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
NODE_KEYS = {"id", "alias", "addresses", "node_type", "version", "last_seen", "connected"}
PEER_KEYS = {"did", "address", "direction", "rtt_ms", "since"}


def b58encode(data):
    n = int.from_bytes(data, "big")
    out = ""
    while n:
        n, r = divmod(n, 58)
        out = B58[r] + out
    return "1" * (len(data) - len(data.lstrip(b"\0"))) + out


def new_node():
    """(did:key, public key) of a made-up node."""
    pk = os.urandom(32)
    return "did:key:z" + b58encode(b"\xed\x01" + pk), pk


def did_repo(root_commit_hex, pk):
    digest = hashlib.sha3_256(bytes.fromhex(root_commit_hex) + pk).digest()
    return "did:repo:z" + b58encode(b"\x16\x20" + digest)


def now_ms():
    return int(time.time() * 1000)


def parse_table(text, columns):
    """Splits an aligned table into dicts, cutting each line at the header's column starts
    (column names and values may contain single spaces)."""
    lines = text.splitlines()
    header = lines[0]
    starts = []
    for c in columns:
        i = header.find(c, starts[-1] + 1 if starts else 0)
        assert i >= 0, f"no column {c!r} in {header!r}"
        starts.append(i)
    assert header.split() == " ".join(columns).split(), header
    rows = []
    for line in lines[1:]:
        cells = [line[s:e].strip() for s, e in zip(starts, starts[1:] + [None])]
        rows.append(dict(zip(columns, cells)))
    return rows


def db_exec(root, sql, params=()):
    con = sqlite3.connect(root / "megaengine.db", timeout=5)
    try:
        with con:
            con.execute(sql, params)
    finally:
        con.close()


def insert_node(root, did, alias="", addresses="", last_seen=0, node_type=0, version="0.1.0"):
    db_exec(root, "INSERT INTO nodes (id, alias, addresses, node_type, version, created_at,"
                  " updated_at, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (did, alias, addresses, node_type, version, int(time.time()), int(time.time()),
             last_seen))


def insert_external_repo(root, creator_did, creator_pk, name, refs=()):
    root_commit = os.urandom(20).hex()
    rid = did_repo(root_commit, creator_pk)
    t = int(time.time())
    db_exec(root, "INSERT INTO repos (id, name, creator, description, path, is_external,"
                  " root_commit, head, created_at, updated_at, ref_seq, ref_sig)"
                  " VALUES (?, ?, ?, 'from a peer', '', 1, ?, 'refs/heads/main', ?, ?, ?, ?)",
            (rid, name, creator_did, root_commit, t, t, now_ms(), bytes(64)))
    for ref, oid in refs:
        db_exec(root, "INSERT INTO refs (repo_id, ref_name, oid, updated_at) VALUES (?, ?, ?, ?)",
                (rid, ref, oid, t))
    return rid, root_commit


# ---- empty lists -----------------------------------------------------------------------------

def test_empty_lists(daemon):
    assert daemon.mectl("node", "list").stdout == "No known nodes.\n"
    assert daemon.mectl("peer", "list").stdout == "No connected peers.\n"
    assert daemon.mectl("node", "list", json=True).json == {"nodes": []}
    assert daemon.mectl("peer", "list", json=True).json == {"peers": []}
    st = daemon.mectl("node", "status", json=True).json
    assert st["nodes"] == 0 and st["peers"] == 0


def test_lists_without_identity(daemon_factory):
    """Neither command needs an identity (the network does not run without one)."""
    d = daemon_factory.start()
    assert d.mectl("node", "list", json=True).json == {"nodes": []}
    assert d.mectl("peer", "list", json=True).json == {"peers": []}
    d.stop()


def test_protocol(daemon):
    with meclient.connect(str(daemon.socket)) as c:
        assert c.request("node.list") == {"nodes": []}
        assert c.request("peer.list") == {"peers": []}
        assert c.request("node.list", None) == {"nodes": []}
        for cmd in ("node.list", "peer.list"):
            with pytest.raises(meclient.MeError) as ei:
                c.request(cmd, {"verbose": True})
            assert (ei.value.code, ei.value.name) == (-9, "EARG")
        # Pipelined, answered by id.
        ids = [c.send_request(cmd) for cmd in ("peer.list", "node.list", "peer.list")]
        got = {}
        for rid in ids:
            r = c.read_reply(rid)
            assert r["kind"] == "result", r
            got[rid] = r["result"]
        assert got[ids[0]] == got[ids[2]] == {"peers": []}
        assert got[ids[1]] == {"nodes": []}
        assert c.request("node.status")["peers"] == 0


# ---- known nodes from the store --------------------------------------------------------------

def test_node_list_from_store(daemon_factory):
    d = daemon_factory.start()
    d.mectl("auth", "init")
    d.stop()
    alice, _ = new_node()
    bob, _ = new_node()
    carol, _ = new_node()
    insert_node(d.root, alice, "alice", "192.0.2.1:9000,[2001:db8::1]:9000",
                last_seen=now_ms() - 12_000, node_type=1, version="0.2.0")
    insert_node(d.root, bob, "", "", last_seen=0)
    insert_node(d.root, carol, "carol", "192.0.2.3:9000", last_seen=now_ms() - 2 * 3600_000)

    d = daemon_factory.start(d.root)
    j = d.mectl("node", "list", json=True).json
    assert set(j) == {"nodes"}
    nodes = j["nodes"]
    assert [n["id"] for n in nodes] == [alice, carol, bob], "most recently seen first"
    for n in nodes:
        assert set(n) == NODE_KEYS, n
        assert isinstance(n["addresses"], list) and all(isinstance(a, str) for a in n["addresses"])
        assert isinstance(n["last_seen"], int) and isinstance(n["node_type"], int)
        assert n["connected"] is False
    a = nodes[0]
    assert a["alias"] == "alice" and a["version"] == "0.2.0" and a["node_type"] == 1
    assert a["addresses"] == ["192.0.2.1:9000", "[2001:db8::1]:9000"]
    assert now_ms() - 60_000 < a["last_seen"] < now_ms()
    assert nodes[2]["addresses"] == [] and nodes[2]["last_seen"] == 0 and nodes[2]["alias"] == ""
    assert d.mectl("node", "status", json=True).json["nodes"] == 3

    cols = ["NODE", "ALIAS", "ADDRESSES", "LAST SEEN", "CONNECTED"]
    rows = parse_table(d.mectl("node", "list").stdout, cols)
    assert [r["NODE"] for r in rows] == [alice, carol, bob]
    assert rows[0]["ALIAS"] == "alice"
    assert rows[0]["ADDRESSES"] == "192.0.2.1:9000,[2001:db8::1]:9000"
    assert re.fullmatch(r"1\ds ago", rows[0]["LAST SEEN"]), rows[0]
    assert rows[1]["LAST SEEN"] == "2h ago"
    assert rows[2] == {"NODE": bob, "ALIAS": "-", "ADDRESSES": "-", "LAST SEEN": "never",
                       "CONNECTED": "no"}
    assert all(r["CONNECTED"] == "no" for r in rows)

    with meclient.connect(str(d.socket)) as c:
        assert c.request("node.list") == j
    d.stop()


# ---- repositories learnt from peers ----------------------------------------------------------

def test_external_repo_is_not_fetched(daemon_factory, git_repo):
    d = daemon_factory.start()
    d.mectl("auth", "init")
    local = d.mectl("repo", "add", git_repo(name="mine"), json=True).json["id"]
    d.stop()
    peer, peer_pk = new_node()
    stranger, stranger_pk = new_node()
    insert_node(d.root, peer, "bob", "192.0.2.7:9000", last_seen=now_ms())
    ext, root_commit = insert_external_repo(
        d.root, peer, peer_pk, "theirs", [("refs/heads/main", "ab" * 20)])
    ext2, _ = insert_external_repo(d.root, stranger, stranger_pk, "unknown")

    d = daemon_factory.start(d.root)
    cols = ["ID", "NAME", "CREATOR", "STATE", "LAST SYNC"]
    rows = {r["ID"]: r for r in parse_table(d.mectl("repo", "list").stdout, cols)}
    assert set(rows) == {local, ext, ext2}
    # CREATOR: "you", the creator's alias, else its did:key.
    assert rows[ext]["NAME"] == "theirs" and rows[ext]["CREATOR"] == "bob"
    assert rows[ext]["STATE"] == "not fetched" and rows[ext]["LAST SYNC"] == "-"
    assert rows[ext2]["CREATOR"] == stranger
    assert rows[ext2]["STATE"] == "not fetched"
    assert rows[local]["CREATOR"] == "you" and rows[local]["STATE"] == "up to date"

    repos = {r["id"]: r for r in d.mectl("repo", "list", json=True).json["repos"]}
    x = repos[ext]
    assert x["is_external"] is True and x["state"] == "not fetched" and x["mine"] is False
    assert x["path"] == "" and x["creator_alias"] == "bob" and x["root_commit"] == root_commit
    assert repos[ext2]["creator_alias"] == ""
    assert repos[local]["creator_alias"] == "you" and repos[local]["state"] == "up to date"

    shown = d.mectl("repo", "show", ext, json=True).json
    assert shown["refs"] == [{"name": "refs/heads/main", "oid": "ab" * 20}]
    assert shown["creator_alias"] == "bob"
    text = d.mectl("repo", "show", ext).stdout
    assert f"Creator:      {peer} (bob)" in text
    assert "State:        not fetched" in text and "Path:         -" in text
    d.stop()


def test_v1_database_is_migrated(daemon_factory):
    """A catalogue written by the first schema (user_version 1) is upgraded in place."""
    root = daemon_factory.new_root()
    root.mkdir(mode=0o700)
    peer, peer_pk = new_node()
    con = sqlite3.connect(root / "megaengine.db")
    try:
        con.executescript(
            "CREATE TABLE repos (id TEXT PRIMARY KEY, name TEXT NOT NULL, creator TEXT NOT NULL,"
            " description TEXT NOT NULL DEFAULT '', path TEXT NOT NULL DEFAULT '',"
            " is_external INTEGER NOT NULL DEFAULT 0, root_commit TEXT NOT NULL DEFAULT '',"
            " head TEXT NOT NULL DEFAULT '', created_at INTEGER NOT NULL,"
            " updated_at INTEGER NOT NULL);"
            "CREATE TABLE refs (repo_id TEXT NOT NULL REFERENCES repos(id) ON DELETE CASCADE,"
            " ref_name TEXT NOT NULL, oid TEXT NOT NULL, updated_at INTEGER NOT NULL,"
            " PRIMARY KEY (repo_id, ref_name));"
            "CREATE TABLE nodes (id TEXT PRIMARY KEY, alias TEXT NOT NULL DEFAULT '',"
            " addresses TEXT NOT NULL DEFAULT '', node_type INTEGER NOT NULL DEFAULT 0,"
            " version TEXT NOT NULL DEFAULT '', created_at INTEGER NOT NULL,"
            " updated_at INTEGER NOT NULL);"
            "CREATE INDEX repos_path ON repos(path);"
            "PRAGMA user_version = 1;")
        rid = did_repo("cd" * 20, peer_pk)
        con.execute("INSERT INTO repos VALUES (?, 'old', ?, '', '', 1, ?, '', 1, 2)",
                    (rid, peer, "cd" * 20))
        con.execute("INSERT INTO nodes VALUES (?, 'oldpeer', '192.0.2.9:9000', 0, '0.1.0', 1, 2)",
                    (peer,))
        con.commit()
    finally:
        con.close()
    os.chmod(root / "megaengine.db", 0o600)

    d = daemon_factory.start(root)
    nodes = d.mectl("node", "list", json=True).json["nodes"]
    assert [(n["id"], n["alias"], n["last_seen"]) for n in nodes] == [(peer, "oldpeer", 0)]
    repos = d.mectl("repo", "list", json=True).json["repos"]
    assert [(r["id"], r["state"], r["creator_alias"]) for r in repos] == \
        [(rid, "not fetched", "oldpeer")]
    d.stop()
    con = sqlite3.connect(root / "megaengine.db")
    try:
        assert con.execute("PRAGMA user_version").fetchone()[0] == 3
        assert con.execute("SELECT ref_seq, ref_sig FROM repos").fetchall() == [(0, None)]
        assert con.execute("SELECT mirror_seq, last_sync_ms, sync_error FROM repos").fetchall() \
            == [(0, 0, "")]
        assert con.execute("SELECT count(*) FROM clones").fetchone()[0] == 0
    finally:
        con.close()


# ---- two connected daemons -------------------------------------------------------------------

def wait_for(what, fn, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def test_two_connected_nodes(daemon_factory):
    a = daemon_factory.start(extra_args=["--alias", "alpha"])
    did_a = a.mectl("auth", "init", json=True).json["did"]
    root_b = daemon_factory.new_root()
    did_b = daemon_factory.mectl("--root", root_b, "auth", "init", json=True).json["did"]
    b = daemon_factory.start(root_b, extra_args=[
        "--alias", "beta", "--bootstrap-node", f"{did_a}@127.0.0.1:{a.port}"])

    t0 = now_ms()
    pa = wait_for("a peer on a", lambda: a.mectl("peer", "list", json=True).json["peers"])
    pb = wait_for("a peer on b", lambda: b.mectl("peer", "list", json=True).json["peers"])
    assert len(pa) == 1 and len(pb) == 1
    for p in pa + pb:
        assert set(p) == PEER_KEYS, p
        assert isinstance(p["rtt_ms"], (int, float)) and p["rtt_ms"] >= 0
        assert isinstance(p["since"], int) and t0 - 60_000 < p["since"] <= now_ms()
    assert pa[0]["did"] == did_b and pa[0]["direction"] == "inbound"
    assert pb[0]["did"] == did_a and pb[0]["direction"] == "outbound"
    assert pb[0]["address"] == f"127.0.0.1:{a.port}"
    assert re.fullmatch(r"127\.0\.0\.1:\d+", pa[0]["address"]), pa[0]
    assert b.mectl("node", "status", json=True).json["peers"] == 1

    rows = parse_table(b.mectl("peer", "list").stdout,
                       ["DID", "ADDRESS", "DIRECTION", "RTT", "SINCE"])
    assert rows[0]["DID"] == did_a and rows[0]["DIRECTION"] == "outbound"
    assert re.fullmatch(r"\d+\.\dms", rows[0]["RTT"]), rows[0]
    assert re.fullmatch(r"\d+[smhd] ago", rows[0]["SINCE"]), rows[0]

    # b knows a (from the bootstrap list or its announcement) and sees it connected.
    na = wait_for("a in b's node list", lambda: [
        n for n in b.mectl("node", "list", json=True).json["nodes"] if n["id"] == did_a])
    assert na[0]["connected"] is True
    b.stop()
    a.stop()
