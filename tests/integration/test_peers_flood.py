"""Floods and misbehaving peers (docs/peer-protocol.md 1.6, "Limits"): a per-peer rate limit on
gossip frames, misbehaviour scores that end in a disconnect and a ban of the key and the address,
a limit on inbound connections from one source address and one on handshakes in progress (held
open by a minimal QUIC client below that sends a real ClientHello and never answers).

The hostile peers are me-peer processes bound to 127.0.0.2 and up: loopback addresses that stand
for other hosts (127.0.0.1, where every test daemon dials from, is exempt from the per-source limit
and from address bans). Every test keeps an honest daemon B connected to A and checks that B's
gossip still reaches A while A refuses the flood.
"""
import os
import select
import signal
import socket
import struct
import subprocess

import pytest
from cryptography.hazmat.primitives import hashes, hmac, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from conftest import BUILD_DIR, assert_no_sanitizer
from test_peers_hostile import nodes, peer_dids, repos, start_node, wait_for

MEPEER = BUILD_DIR / "tests" / "me-peer"
WAIT = 30.0
PER_IP = 8  # NET_MAX_IN_PER_IP
HANDSHAKING = 32  # NET_MAX_HANDSHAKING
BAN_SCORE, PENALTY_MESSAGE = 100, 10  # NET_BAN_SCORE, NET_PENALTY_MESSAGE


def udp_free_port(ip):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


class Peer:
    """A me-peer bound to ip (a fresh key unless --key-from is given)."""

    def __init__(self, factory, ip, args):
        self.dir = factory.new_root().parent
        self.root = self.dir / "peer"
        self.addr = f"{ip}:{udp_free_port(ip)}"
        self.out_path = self.dir / "stdout"
        self.err_path = self.dir / "stderr"
        self.argv = [str(MEPEER), "--root", str(self.root), "--addr", self.addr] + \
            [str(a) for a in args]
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(self.argv, env=factory.env, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err)
        self.did = wait_for(self._did, "me-peer to print its did")

    def stdout(self):
        return self.out_path.read_text(errors="replace") if self.out_path.exists() else ""

    def stderr(self):
        return self.err_path.read_text(errors="replace") if self.err_path.exists() else ""

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
            pytest.fail(f"me-peer still running after {timeout} s\n{self.info()}")
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
def peer(daemon_factory):
    started = []

    def start(ip, *args):
        p = Peer(daemon_factory, ip, args)
        started.append(p)
        return p
    yield start
    for p in started:
        p.kill()


@pytest.fixture
def pair(daemon_factory):
    """A and B connected (B bootstrapped to A, from 127.0.0.1)."""
    a, a_did = start_node(daemon_factory, "alpha")
    b, b_did = start_node(daemon_factory, "beta",
                          ["--bootstrap-node", f"{a_did}@127.0.0.1:{a.port}"])
    wait_for(lambda: b_did in peer_dids(a) and a_did in peer_dids(b), "A and B to connect")
    return a, a_did, b, b_did


def transport(d):
    return d.mectl("node", "status", json=True).json["transport"]


def gossip(d):
    return d.mectl("node", "status", json=True).json["gossip"]


def honest_gossip_flows(a, b, b_did, git_repo, name):
    rid = b.mectl("repo", "add", git_repo(name=name), json=True).json["id"]
    wait_for(lambda: rid in repos(a), f"B's repository {name} on A\nA's log:\n{a.stderr()[-3000:]}")
    assert repos(a)[rid]["creator"] == b_did
    assert b_did in peer_dids(a)


def test_counters_start_at_zero(daemon):
    t = transport(daemon)
    for k in ("connections_refused", "connections_banned", "frames_rate_limited",
              "peers_misbehaved", "bans_active"):
        assert t[k] == 0, t
    out = daemon.mectl("node", "status").stdout
    assert "Limits:       0 connections refused, 0 frames rate-limited, 0 peers disconnected " \
           "for misbehaving, 0 refused while banned, 0 bans active" in out, out


def test_duplicate_flood_is_rate_limited(pair, peer, git_repo):
    """3,000 copies a second of one valid announcement, for 4 s: beyond 200 frames/s (burst 400)
    they are dropped unread and counted; the flooder stays connected (4 s of excess cost less
    than the ban score), the daemon answers and B's gossip flows meanwhile."""
    a, a_did, b, b_did = pair
    p = peer("127.0.0.2", "--dial", f"{a_did}@127.0.0.1:{a.port}", "--send", "honest-node",
             "--rate", "3000", "--wait", "4")
    wait_for(lambda: p.lines("sent"), f"me-peer to send\n{p.info()}")
    wait_for(lambda: transport(a)["frames_rate_limited"] > 0,
             f"A to rate-limit me-peer\n{a.stderr()[-3000:]}")
    honest_gossip_flows(a, b, b_did, git_repo, "during-flood")
    assert p.wait() == 0, p.info()
    flooded = int(p.lines("flooded")[0][1])
    assert flooded > 4000, p.info()  # a real flood: well over 4 s of the limit

    t, g = transport(a), gossip(a)
    assert t["frames_rate_limited"] > 0 and t["peers_misbehaved"] == 0, t
    assert t["bans_active"] == 0 and t["connections_banned"] == 0, t
    # What got through was taken as duplicates of the first copy, and the rest was dropped:
    # at most the burst plus 200 a second (plus the first) reached the gossip plane.
    assert g["duplicates"] > 0, g
    assert g["duplicates"] < flooded, (g, flooded)
    assert nodes(a)[p.did]["alias"] == "mepeer"
    assert f"peer {p.did}: over the rate limit" in a.stderr()
    assert not [ln for ln in p.lines("down") if ln[1] == a_did], p.info()
    assert b_did in peer_dids(a) and a_did in peer_dids(b)
    a.stop()
    b.stop()


def test_sustained_flood_is_banned(pair, peer, git_repo):
    """A flood that does not stop: each second over the limit costs 10 points (1 point a second
    decays), so after some ten seconds the peer is disconnected with NET_ERR_MISBEHAVED and its
    key and address are banned; it is not let back in."""
    a, a_did, b, b_did = pair
    p = peer("127.0.0.2", "--dial", f"{a_did}@127.0.0.1:{a.port}", "--send", "honest-node",
             "--rate", "3000", "--wait", "120")
    assert p.wait(timeout=90) == 3, p.info()  # A closed the connection
    assert "closed by the peer: misbehaving (banned)" in p.stderr(), p.info()
    wait_for(lambda: f"peer lost: {p.did} (misbehaving peer)" in a.stderr(), "A to log the loss")
    t = transport(a)
    assert t["peers_misbehaved"] == 1 and t["bans_active"] == 2, t
    assert t["frames_rate_limited"] > 0, t
    banned = [ln for ln in a.stderr().splitlines()
              if f"peer {p.did} (" in ln and "misbehaved" in ln]
    assert len(banned) == 1 and "over the rate limit" in banned[0] and \
        "banned for 60 s" in banned[0], banned
    assert p.did not in peer_dids(a)
    # The same key from the same address: refused before the handshake.
    q = peer("127.0.0.2", "--key-from", p.root, "--dial", f"{a_did}@127.0.0.1:{a.port}",
             "--send", "honest-node", "--wait", "20")
    assert q.did == p.did
    assert q.wait() == 1, q.info()
    assert "refused by the peer (banned)" in q.stderr(), q.info()
    assert transport(a)["connections_banned"] >= 1
    honest_gossip_flows(a, b, b_did, git_repo, "after-ban")
    a.stop()
    b.stop()


def test_forgeries_disconnect_and_ban(pair, peer, git_repo):
    """Twenty badly signed announcements in one go: each costs 10 points, so the tenth (or the
    eleventh, once the score decayed a little) ends the connection; the rest are never read. The
    key is refused from any address, the address for any key, while the ban lasts."""
    a, a_did, b, b_did = pair
    p = peer("127.0.0.3", "--dial", f"{a_did}@127.0.0.1:{a.port}", "--send", "forged-sig",
             "--repeat", "20", "--wait", "60")
    assert p.wait() == 3, p.info()
    assert "closed by the peer: misbehaving (banned)" in p.stderr(), p.info()
    wait_for(lambda: transport(a)["peers_misbehaved"] == 1, "A to count the misbehaving peer")
    bad = gossip(a)["rejected"]["bad signature"]
    assert BAN_SCORE // PENALTY_MESSAGE <= bad < 20, bad
    t = transport(a)
    assert t["bans_active"] == 2, t
    logged = [ln for ln in a.stderr().splitlines()
              if f"peer {p.did} (" in ln and "misbehaved" in ln]
    assert len(logged) == 1 and "bad signature" in logged[0], logged
    assert p.did not in peer_dids(a) and p.did not in nodes(a)

    # The banned key from another address: the handshake completes, then A closes it.
    q = peer("127.0.0.4", "--key-from", p.root, "--dial", f"{a_did}@127.0.0.1:{a.port}",
             "--send", "honest-node", "--wait", "20")
    assert q.wait() in (1, 3), q.info()
    assert "misbehaving (banned)" in q.stderr() or "handshake" in q.stderr(), q.info()
    wait_for(lambda: transport(a)["connections_banned"] >= 1, "A to count the banned key")
    assert q.did not in peer_dids(a) and q.did not in nodes(a)
    # Another key from the banned address: refused before the handshake.
    r = peer("127.0.0.3", "--dial", f"{a_did}@127.0.0.1:{a.port}", "--send", "honest-node",
             "--wait", "20")
    assert r.did != p.did
    assert r.wait() == 1, r.info()
    assert "refused by the peer (banned)" in r.stderr(), r.info()
    assert transport(a)["connections_banned"] >= 2
    # A fresh key from a fresh address is welcome.
    s = peer("127.0.0.5", "--dial", f"{a_did}@127.0.0.1:{a.port}", "--send", "honest-node",
             "--wait", "60")
    wait_for(lambda: nodes(a).get(s.did, {}).get("alias") == "mepeer", f"A to learn {s.did}")
    assert s.stop() == 0, s.info()
    assert transport(a)["peers_misbehaved"] == 1
    honest_gossip_flows(a, b, b_did, git_repo, "after-forgeries")
    a.stop()
    b.stop()


def test_few_bad_frames_do_not_ban(pair, peer):
    """A handful of badly signed announcements (below the ban score) are rejected one by one
    and the connection stays."""
    a, a_did, b, b_did = pair
    p = peer("127.0.0.6", "--dial", f"{a_did}@127.0.0.1:{a.port}", "--send", "forged-sig",
             "--repeat", "5", "--wait", "60")
    wait_for(lambda: gossip(a)["rejected"]["bad signature"] == 5, "A to reject the five")
    assert p.did in peer_dids(a)
    assert p.stop() == 0, p.info()
    t = transport(a)
    assert t["peers_misbehaved"] == 0 and t["bans_active"] == 0, t
    a.stop()
    b.stop()


def test_score_survives_reconnect(pair, peer):
    """Reconnecting does not wipe the slate: six forgeries (60 points), a new connection with the
    same key, six more: the key's score is restored (less what decayed meanwhile, well under 20
    points), so the second connection is banned before its sixth."""
    a, a_did, b, b_did = pair
    p = peer("127.0.0.9", "--dial", f"{a_did}@127.0.0.1:{a.port}", "--send", "forged-sig",
             "--repeat", "6", "--wait", "60")
    wait_for(lambda: gossip(a)["rejected"]["bad signature"] == 6, "A to reject the six")
    assert p.stop() == 0, p.info()
    wait_for(lambda: p.did not in peer_dids(a), "A to see me-peer leave")
    q = peer("127.0.0.9", "--key-from", p.root, "--dial", f"{a_did}@127.0.0.1:{a.port}",
             "--send", "forged-sig", "--repeat", "6", "--wait", "60")
    assert q.did == p.did
    assert q.wait() == 3, q.info()
    assert "closed by the peer: misbehaving (banned)" in q.stderr(), q.info()
    assert gossip(a)["rejected"]["bad signature"] < 12
    t = transport(a)
    assert t["peers_misbehaved"] == 1 and t["bans_active"] == 2, t
    a.stop()
    b.stop()


def test_connections_per_source_address(pair, peer, git_repo):
    """Eight connections from one address are accepted; the ninth is refused at its first
    packet and counted; another address is still welcome, and so is B."""
    a, a_did, b, b_did = pair
    held = [peer("127.0.0.7", "--dial", f"{a_did}@127.0.0.1:{a.port}", "--wait", "120")
            for _ in range(PER_IP)]
    for p in held:
        wait_for(lambda: p.lines("up"), f"me-peer to connect\n{p.info()}")
    wait_for(lambda: {p.did for p in held} <= peer_dids(a), "A to list the eight")
    extra = peer("127.0.0.7", "--dial", f"{a_did}@127.0.0.1:{a.port}", "--wait", "20")
    assert extra.wait() == 1, extra.info()
    assert "refused by the peer (busy)" in extra.stderr(), extra.info()
    t = transport(a)
    assert t["connections_refused"] == 1 and t["handshakes_failed"] == 0, t
    assert "refused a connection from 127.0.0.7:" in a.stderr()
    assert extra.did not in peer_dids(a)
    other = peer("127.0.0.8", "--dial", f"{a_did}@127.0.0.1:{a.port}", "--wait", "60")
    wait_for(lambda: other.did in peer_dids(a), "A to accept another address")
    honest_gossip_flows(a, b, b_did, git_repo, "beside-the-eight")
    # One of the eight leaves: its slot is free again.
    assert held[0].stop() == 0
    wait_for(lambda: held[0].did not in peer_dids(a), "A to drop the first")
    again = peer("127.0.0.7", "--dial", f"{a_did}@127.0.0.1:{a.port}", "--wait", "60")
    wait_for(lambda: again.did in peer_dids(a), f"A to accept a ninth later\n{again.info()}")
    assert transport(a)["connections_refused"] == 1
    for p in held[1:] + [other, again]:
        assert p.stop() == 0, p.info()
    a.stop()
    b.stop()


# ---- a client that starts a QUIC handshake and never finishes it (RFC 9000/9001 Initial) ----
V1_SALT = bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a")

def hkdf_extract(salt, ikm):
    h = hmac.HMAC(salt, hashes.SHA256())
    h.update(ikm)
    return h.finalize()

def hkdf_expand_label(secret, label, length):
    full = b"tls13 " + label.encode()
    info = struct.pack(">H", length) + bytes([len(full)]) + full + b"\x00"
    out, t, i = b"", b"", 1
    while len(out) < length:
        h = hmac.HMAC(secret, hashes.SHA256())
        h.update(t + info + bytes([i]))
        t = h.finalize()
        out += t
        i += 1
    return out[:length]

def varint(v):
    if v < 0x40:
        return bytes([v])
    if v < 0x4000:
        return struct.pack(">H", v | 0x4000)
    return struct.pack(">I", v | 0x80000000)

def ext(t, body):
    return struct.pack(">HH", t, len(body)) + body

def client_hello(scid):
    """A TLS 1.3 ClientHello as megaengine accepts it: X25519, Ed25519, ALPN megaengine/1, and
    the one transport parameter QUIC requires of a client."""
    pub = X25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    tp = varint(0x0f) + varint(len(scid)) + scid  # initial_source_connection_id
    alpn = b"megaengine/1"
    exts = b"".join([
        ext(0x002b, b"\x02\x03\x04"),
        ext(0x000a, b"\x00\x02\x00\x1d"),
        ext(0x0033, struct.pack(">HHH", 36, 0x001d, 32) + pub),
        ext(0x000d, b"\x00\x02\x08\x07"),
        ext(0x0010, struct.pack(">HB", len(alpn) + 1, len(alpn)) + alpn),
        ext(0x0039, tp),
    ])
    body = b"\x03\x03" + os.urandom(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00" + \
        struct.pack(">H", len(exts)) + exts
    return b"\x01" + struct.pack(">I", len(body))[1:] + body

def initial_packet(dcid, scid, crypto):
    """One client Initial packet (packet number 0) carrying crypto, padded to 1200 bytes and
    protected with the keys derived from dcid (RFC 9001 5.2, 5.4)."""
    secret = hkdf_extract(V1_SALT, dcid)
    cs = hkdf_expand_label(secret, "client in", 32)
    key, iv, hp = (hkdf_expand_label(cs, "quic key", 16), hkdf_expand_label(cs, "quic iv", 12),
                   hkdf_expand_label(cs, "quic hp", 16))
    frames = b"\x06" + varint(0) + varint(len(crypto)) + crypto
    pn = 0
    hdr_wo_len = bytes([0xc3]) + struct.pack(">I", 1) + bytes([len(dcid)]) + dcid + \
        bytes([len(scid)]) + scid + varint(0)
    # pad the payload so the datagram is 1200 bytes
    plen = 1200 - len(hdr_wo_len) - 2 - 4 - 16
    frames += b"\x00" * (plen - len(frames))
    length = 4 + len(frames) + 16
    hdr = hdr_wo_len + struct.pack(">H", length | 0x4000) + struct.pack(">I", pn)
    nonce = (int.from_bytes(iv, "big") ^ pn).to_bytes(12, "big")
    ct = AESGCM(key).encrypt(nonce, frames, hdr)
    pn_off = len(hdr) - 4
    sample = ct[0:16]  # pn_off + 4 - len(hdr) == 0
    enc = Cipher(algorithms.AES(hp), modes.ECB()).encryptor()
    mask = enc.update(sample) + enc.finalize()
    h = bytearray(hdr)
    h[0] ^= mask[0] & 0x0f
    for i in range(4):
        h[pn_off + i] ^= mask[1 + i]
    return bytes(h) + ct

def stalled_handshake(src_ip, dst):
    """Sends one valid Initial (a ClientHello) from src_ip and never answers: the server keeps
    the connection in its handshake until its timeout. Returns the socket (keep it open)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((src_ip, 0))
    dcid, scid = os.urandom(16), os.urandom(16)
    s.sendto(initial_packet(dcid, scid, client_hello(scid)), dst)
    return s


def test_handshakes_in_progress(pair, peer):
    """32 handshakes that never finish (a real ClientHello each, from four addresses, 8 apiece)
    fill the handshake slots: the next connection is refused at its first packet while B stays
    connected; once the handshake timeout (10 s) frees the slots, a peer gets in."""
    a, a_did, b, b_did = pair
    dst = ("127.0.0.1", a.port)
    socks = [stalled_handshake(f"127.0.0.{20 + i // PER_IP}", dst) for i in range(HANDSHAKING)]
    try:
        for s in socks:  # the daemon answered each: it holds a connection for it
            ready, _, _ = select.select([s], [], [], WAIT)
            assert ready, f"no answer to a ClientHello\n{a.stderr()[-3000:]}"
            assert len(s.recv(2048)) >= 1200  # the server's Initial and Handshake flight
        t = transport(a)
        assert t["connections_refused"] == 0 and t["handshakes_failed"] == 0, t
        extra = stalled_handshake("127.0.0.30", dst)
        socks.append(extra)
        ready, _, _ = select.select([extra], [], [], WAIT)
        assert ready
        refusal = extra.recv(2048)
        assert refusal[0] & 0xf0 == 0xc0 and len(refusal) < 1200, refusal  # a short Initial
        wait_for(lambda: transport(a)["connections_refused"] == 1, "A to count the refusal")
        p = peer("127.0.0.31", "--dial", f"{a_did}@127.0.0.1:{a.port}", "--wait", "20")
        assert p.wait() == 1, p.info()
        assert "refused by the peer (busy)" in p.stderr(), p.info()
        assert transport(a)["connections_refused"] == 2
        assert b_did in peer_dids(a) and a_did in peer_dids(b)
        # The stalled ones time out; then the slots are free again.
        wait_for(lambda: transport(a)["handshakes_failed"] == HANDSHAKING,
                 f"the stalled handshakes to time out\n{a.stderr()[-3000:]}")
        q = peer("127.0.0.31", "--dial", f"{a_did}@127.0.0.1:{a.port}", "--wait", "60")
        wait_for(lambda: q.did in peer_dids(a), f"A to accept a peer again\n{q.info()}")
        assert q.stop() == 0, q.info()
    finally:
        for s in socks:
            s.close()
    a.stop()
    b.stop()
