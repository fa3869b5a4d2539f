"""Two booted containers, each running megaengined as its system service, on a private network
of their own (two network namespaces joined by a veth pair: no route to the host or anywhere
else). The second node joins through the first by its configuration file; the two connect over
QUIC and the first node's repository reaches the second by gossip, which both journals record
with their PEER_DID= and REPO_ID= fields. (Fetching the repository's objects is replication, the
next milestone: extend this test when it lands.)
"""
import json
import re

import pytest

import nspawn
from test_booted import CONFIG, UNIT, daemon_entries, message_ids, wait_for

REPO_PATH = "/srv/git/shared"


@pytest.fixture(scope="module")
def nodes(boot):
    try:
        net, error = nspawn.NetPair("t"), None
    except nspawn.SetupError as e:
        net, error = None, str(e)
    if error:
        pytest.fail(f"cannot make the private network for two containers: {error}", pytrace=False)
    boxes = []
    try:
        for i, name in enumerate(("me-node-a", "me-node-b")):
            boxes.append(boot(name, [f"--network-namespace-path={net.path(i)}"]))
        yield net, boxes[0], boxes[1]
    finally:
        for b in boxes:
            nspawn.retire(b)
        net.close()


def mectl_json(box, *args):
    r = box.run(["mectl", "--json", *args])
    assert r.returncode == 0, f"{box.name}: mectl {' '.join(args)}: {r.stdout}{r.stderr}"
    return json.loads(r.stdout)


def set_config(box, **keys):
    text = "".join(f"{k.replace('_', '-')} = {v}\n" for k, v in keys.items())
    box.check(f"cat >> {CONFIG}", input=text)


def test_first_node_publishes(nodes):
    _, a, _ = nodes
    set_config(a, alias="node-a")
    a.check(["systemctl", "start", UNIT], timeout=90)
    a.did = mectl_json(a, "auth", "init")["did"]
    a.check(f"""set -e
        git init -q -b main {REPO_PATH}
        cd {REPO_PATH}
        echo 'shared between two booted nodes' > README
        git add README
        git -c user.name=A -c user.email=a@example.org commit -q -m 'first commit'
        """)
    r = a.check(["mectl", "repo", "add", "--path", REPO_PATH, "--description", "two nodes"])
    a.repo_id = re.search(r"did:repo:z\w+", r.stdout).group(0)


def test_second_node_joins_through_the_first(nodes):
    net, a, b = nodes
    set_config(b, alias="node-b", bootstrap_node=f"{a.did}@{net.ADDR_A}:9000")
    b.check(["systemctl", "start", UNIT], timeout=90)
    b.did = mectl_json(b, "auth", "init")["did"]
    wait_for("node-b to list node-a as a peer",
             lambda: a.did in json.dumps(mectl_json(b, "peer", "list")), 60, interval=1)
    wait_for("node-a to list node-b as a peer",
             lambda: b.did in json.dumps(mectl_json(a, "peer", "list")), 30, interval=1)


def test_repository_reaches_the_second_node(nodes):
    _, a, b = nodes
    wait_for(f"node-b to learn {a.repo_id}",
             lambda: a.repo_id in json.dumps(mectl_json(b, "repo", "list")), 60, interval=1)
    nodes_b = json.dumps(mectl_json(b, "node", "list"))
    assert a.did in nodes_b and "node-a" in nodes_b, nodes_b


def test_journals_record_peers_and_repository(nodes):
    _, a, b = nodes
    ids = message_ids()
    assert daemon_entries(b, MESSAGE_ID=ids["PEER_CONNECTED"], PEER_DID=a.did), \
        "node-b's journal has no 'peer connected' entry with PEER_DID=" + a.did
    assert daemon_entries(a, MESSAGE_ID=ids["PEER_CONNECTED"], PEER_DID=b.did), \
        "node-a's journal has no 'peer connected' entry with PEER_DID=" + b.did
    assert daemon_entries(b, MESSAGE_ID=ids["REPO_ANNOUNCED"], REPO_ID=a.repo_id), \
        "node-b's journal has no 'repository announced' entry with REPO_ID=" + a.repo_id
    r = b.check(["journalctl", "-u", UNIT, "REPO_ID=" + a.repo_id, "-o", "cat", "--no-pager"])
    assert "announced" in r.stdout, r.stdout
