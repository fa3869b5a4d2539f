"""Differential test of the C identifiers (through me-idtool) against an independent Python
implementation of base58btc, did:key and did:repo. Standard library only; runs under pytest or
directly with `python3 tests/integration/test_ids.py`.

The tool is $ME_IDTOOL if set, else $ME_BUILD_DIR/tests/me-idtool (ME_BUILD_DIR defaults to
build/release, relative to the current directory or to the repository root)."""

import hashlib
import os
import random
import subprocess
from pathlib import Path

B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
B58_INDEX = {c: i for i, c in enumerate(B58)}
REPO_ROOT = Path(__file__).resolve().parents[2]

# W3C did:key Ed25519 example and its legacy MegaEngine spelling.
W3C_PK = "2e6fcce36701dc791488e0d0b1745cc1e33a4c1c9fcc41c63bd343dbbe0970e6"
W3C_DID = "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK"
W3C_LEGACY = "did:key:z2DTYLUEG8fdXVQQ7mNGgh917Ft7fGA2kpKkewvPK8TWAMK"


# --- reference implementation -------------------------------------------------------------

def b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = ""
    while n:
        n, r = divmod(n, 58)
        out = B58[r] + out
    zeros = len(data) - len(data.lstrip(b"\0"))
    return "1" * zeros + out


def b58decode(s: str):
    """bytes, or None when s is empty or has a character outside the alphabet."""
    if not s or any(c not in B58_INDEX for c in s):
        return None
    n = 0
    for c in s:
        n = n * 58 + B58_INDEX[c]
    zeros = len(s) - len(s.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * zeros + body


def did_key(pk: bytes) -> str:
    return "did:key:z" + b58encode(b"\xed\x01" + pk)


def did_key_legacy(pk: bytes) -> str:
    return "did:key:z" + b58encode(b"\xed" + pk)


def did_repo(oid: bytes, pk: bytes) -> str:
    return "did:repo:z" + b58encode(b"\x16\x20" + hashlib.sha3_256(oid + pk).digest())


def parse_key(s: str):
    """Public key, or None."""
    if not s.startswith("did:key:z"):
        return None
    raw = b58decode(s[len("did:key:z"):])
    if raw is None:
        return None
    if len(raw) == 34 and raw[:2] == b"\xed\x01":
        return raw[2:]
    if len(raw) == 33 and raw[0] == 0xED:
        return raw[1:]
    return None


def parse_repo(s: str):
    """Digest, or None."""
    if not s.startswith("did:repo:z"):
        return None
    raw = b58decode(s[len("did:repo:z"):])
    if raw is None or len(raw) != 34 or raw[:2] != b"\x16\x20":
        return None
    return raw[2:]


# --- the C tool ---------------------------------------------------------------------------

def idtool_path() -> Path:
    env = os.environ.get("ME_IDTOOL")
    if env:
        return Path(env)
    build = Path(os.environ.get("ME_BUILD_DIR", "build/release"))
    cands = [build / "tests" / "me-idtool"]
    if not build.is_absolute():
        cands.append(REPO_ROOT / build / "tests" / "me-idtool")
    for c in cands:
        if c.is_file():
            return c
    raise FileNotFoundError("me-idtool not found (tried %s); build it or set ME_IDTOOL"
                            % ", ".join(str(c) for c in cands))


def run(*args):
    argv = [str(idtool_path())] + [a if isinstance(a, bytes) else str(a) for a in args]
    p = subprocess.run(argv, capture_output=True, timeout=30)
    return p.returncode, p.stdout.decode(), p.stderr.decode(errors="replace")


def ok(*args) -> list:
    rc, out, err = run(*args)
    assert rc == 0, (args, rc, err)
    assert err == "", (args, err)
    return out.splitlines()


def rejected(*args, code=1):
    rc, out, err = run(*args)
    assert rc == code, (args, rc, out, err)
    assert out == "", (args, out)
    assert err != "", args


# --- tests --------------------------------------------------------------------------------

def test_reference_vectors():
    # The Python side itself against published values.
    assert b58encode(b"Hello World!") == "2NEpo7TZRRrLZSi2U"
    assert b58encode(bytes.fromhex("000000287fb4cd")) == "111233QC4"
    assert b58decode("111233QC4") == bytes.fromhex("000000287fb4cd")
    assert did_key(bytes.fromhex(W3C_PK)) == W3C_DID
    assert did_key_legacy(bytes.fromhex(W3C_PK)) == W3C_LEGACY


def test_w3c_vector():
    assert ok("did-key", W3C_PK) == [W3C_DID]
    assert ok("parse-key", W3C_DID) == [W3C_DID, W3C_PK]


def test_legacy_normalised():
    assert ok("parse-key", W3C_LEGACY) == [W3C_DID, W3C_PK]
    rnd = random.Random(7)
    for _ in range(10):
        pk = rnd.randbytes(32)
        legacy = did_key_legacy(pk)
        assert legacy.startswith("did:key:z2D")
        assert ok("parse-key", legacy) == [did_key(pk), pk.hex()]


def test_random_keys_and_repos():
    rnd = random.Random(1234)
    for i in range(50):
        pk = rnd.randbytes(32)
        oid = rnd.randbytes(20)
        if i == 0:
            pk, oid = b"\0" * 32, b"\0" * 20
        elif i == 1:
            pk, oid = b"\xff" * 32, b"\xff" * 20
        dk, dr = did_key(pk), did_repo(oid, pk)
        assert ok("did-key", pk.hex()) == [dk]
        assert ok("did-key", pk.hex().upper()) == [dk]
        assert ok("parse-key", dk) == [dk, pk.hex()]
        assert ok("did-repo", oid.hex(), pk.hex()) == [dr]
        assert ok("parse-repo", dr) == [hashlib.sha3_256(oid + pk).hexdigest()]


def test_malformed_keys():
    pk = bytes.fromhex(W3C_PK)
    bad = [
        "", "did:key:", "did:key:z", "did:kee:" + W3C_DID[8:], "DID:KEY:" + W3C_DID[8:],
        "did:key:" + W3C_DID[9:],                      # no multibase prefix
        "did:key:f" + W3C_DID[9:],                     # 'f' multibase
        W3C_DID[:-1], W3C_DID + "z", W3C_DID + " ", " " + W3C_DID, W3C_DID + "\n",
        W3C_DID[:-1] + "0", W3C_DID[:-1] + "O", W3C_DID[:-1] + "I", W3C_DID[:-1] + "l",
        W3C_DID[:-1] + "+", W3C_DID[:-1] + "/", W3C_DID[:-1] + "\u00e9",
        "did:key:z1" + W3C_DID[9:],                    # leading zero byte
        "did:key:z" + b58encode(b"\xe7\x01" + pk),     # secp256k1 multicodec
        "did:key:z" + b58encode(b"\xed\x02" + pk),
        "did:key:z" + b58encode(b"\xed\x01" + pk[:31]) + "1",
        "did:key:z" + b58encode(b"\xed" + pk[:31]),    # legacy, short
        "did:key:z" + b58encode(b"\xed" + pk + b"\0"),  # legacy, long
        "did:key:z" + b58encode(b"\xed\x01" + pk + b"\0"),
        "did:key:z" + "2" * 300,
        "did:repo:z" + W3C_DID[9:],
    ]
    for s in bad:
        assert parse_key(s) is None, s
        rejected("parse-key", s)
    rejected("parse-key", b"did:key:z6Mkha\xc3XgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK")
    rejected("parse-key", b"did:key:z6Mkha\xffXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK")


def test_malformed_repos():
    dig = hashlib.sha3_256(b"x").digest()
    good = "did:repo:z" + b58encode(b"\x16\x20" + dig)
    assert ok("parse-repo", good) == [dig.hex()]
    bad = [
        "", "did:repo:", "did:repo:z", "did:rep0:" + good[9:], "did:key:" + good[9:],
        "did:repo:" + good[10:], "did:repo:f" + good[10:],
        good[:-1], good + "2", good + "\n", good[:-1] + "0",
        "did:repo:z1" + good[10:],
        "did:repo:z" + b58encode(b"\x12\x20" + dig),           # sha2-256
        "did:repo:z" + b58encode(b"\x16\x1f" + dig[:31]),      # 31-byte multihash
        "did:repo:z" + b58encode(b"\x16\x20" + dig[:31]),
        "did:repo:z" + b58encode(b"\x16\x20" + dig + b"\0"),
        "did:repo:z" + b58encode(dig),
        "did:repo:z" + "z" * 300,
        W3C_DID,
    ]
    for s in bad:
        assert parse_repo(s) is None, s
        rejected("parse-repo", s)


def test_mutations_agree():
    # Random edits of valid ids: the C parser must accept exactly what the reference accepts.
    rnd = random.Random(99)
    chars = B58 + "0OIl+/= -_:"
    for i in range(150):
        pk, oid = rnd.randbytes(32), rnd.randbytes(20)
        kind = i % 3
        s = (did_key(pk), did_key_legacy(pk), did_repo(oid, pk))[kind]
        pos = rnd.randrange(len(s))
        op = rnd.randrange(3)
        if op == 0:
            s = s[:pos] + rnd.choice(chars) + s[pos + 1:]
        elif op == 1:
            s = s[:pos] + s[pos + 1:]
        else:
            s = s[:pos] + rnd.choice(chars) + s[pos:]
        if kind < 2:
            want = parse_key(s)
            if want is None:
                rejected("parse-key", s)
            else:
                assert ok("parse-key", s) == [did_key(want), want.hex()], s
        else:
            want = parse_repo(s)
            if want is None:
                rejected("parse-repo", s)
            else:
                assert ok("parse-repo", s) == [want.hex()], s


def test_usage_errors():
    rejected(code=2)
    rejected("frobnicate", code=2)
    rejected("did-key", code=2)
    rejected("did-key", W3C_PK[:-2], code=2)
    rejected("did-key", W3C_PK + "00", code=2)
    rejected("did-key", W3C_PK[:-1] + "g", code=2)
    rejected("did-key", W3C_PK, "extra", code=2)
    rejected("did-repo", "00" * 20, code=2)
    rejected("did-repo", "00" * 19, W3C_PK, code=2)
    rejected("parse-key", code=2)
    rejected("parse-repo", "a", "b", code=2)


if __name__ == "__main__":
    import sys

    failed = 0
    for name, fn in sorted(globals().items()):
        if name.startswith("test_") and callable(fn):
            try:
                fn()
                print("PASS", name)
            except Exception as e:  # noqa: BLE001 - report every failure
                failed += 1
                print("FAIL", name, repr(e))
    sys.exit(1 if failed else 0)
