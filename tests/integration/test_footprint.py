"""Counts of a full replication that do not depend on the machine's speed (issue 8), asserted so
that a change that breaks them fails CI; times stay in bench/sync.sh.

The repository is bench/sync.sh's default: bench/genrepo.py, 10,000 commits, about 68k objects in
one pack, 5 branches and 13 tags. Nothing leaves 127.0.0.0/8.
"""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import git
from test_gossip import Node, wait_for
from test_protocol import sanitized
from test_sync import assert_mirror_sound, mirror_matches, mirror_of

GENREPO = Path(__file__).resolve().parents[2] / "bench" / "genrepo.py"
# Receiver peak: the daemon's VmHWM plus its largest verifier child's (shared library pages
# counted twice). bench/sync.sh measures 59.4-60.1 MiB here (target 64 MiB); under pytest,
# which maps libcrypto itself, 3 MiB of OpenSSL that the daemon and the verifier give back stay
# resident and both show it: 62.5 MiB since parts are cut by objects as well as bytes (66-69
# before, 65-66 before each part was checked while the next ones are indexed). This bound
# catches regressions (it was 122 MiB before the verifier stopped caching parsed objects, 68
# MiB before it read types from the pack and gave back its start-up pages).
RECEIVER_PEAK_KIB = 68 << 10


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "gen.git"
    subprocess.run([sys.executable, str(GENREPO), str(out), "--commits", "10000", "--seed", "1"],
                   check=True, capture_output=True)
    return out


def git_pack_bytes(path, env):
    """Size of the pack `git clone --mirror` gets for the branches and tags (what upload-pack's
    pack-objects sends: offset deltas, deltas reused)."""
    tips = git(path, "for-each-ref", "--format=%(objectname)", "refs/heads", "refs/tags",
               env=env)
    r = subprocess.run(["git", "-C", str(path), "pack-objects", "--stdout", "--revs",
                        "--delta-base-offset", "-q"], input=(tips + "\n").encode(),
                       capture_output=True, env=env, check=True)
    return len(r.stdout)


def test_full_replication_bytes_and_peak_memory(daemon_factory, git_repo, generated):
    env = git_repo.env
    a = Node(daemon_factory, "alpha", "127.0.11.1").start()
    rid = a.j("repo", "add", generated)["id"]
    b = Node(daemon_factory, "bravo", "127.0.11.2").start([a])
    wait_for(mirror_matches(b, rid, generated, env), "B mirrors the generated repository",
             [a, b], timeout=300)
    assert_mirror_sound(b, rid, generated, env)
    # genrepo's repository is bare, so git wrote a reachability bitmap: A counted most objects
    # of its complete bundle from it. What it walked: the annotated tags, and the commits above
    # the last ones git chose to give a bitmap (some branch tips), with what they added (67,253
    # of 67,984 counted from the bitmap).
    assert list((generated / "objects" / "pack").glob("pack-*.bitmap"))
    m = re.search(r"built \(\d+ bytes, complete, (\d+) objects, (\d+) counted from git's bitmap\)",
                  a.d.stderr())
    assert m, a.log_tail()
    total, counted = int(m.group(1)), int(m.group(2))
    assert 0.9 * total < counted < total, (total, counted)
    # A announced where its pack can be cut: B indexed the parts as packs of their own, and
    # keeps the announcement with the bundle to serve it the same way (an 8-element start).
    packs = list((Path(mirror_of(b, rid)) / "objects" / "pack").glob("pack-*.pack"))
    assert len(packs) >= 2, packs
    starts = list((b.d.root / "series").glob("*/*.start"))
    assert len(starts) == 1 and starts[0].read_bytes()[4] == 0x98, starts
    sync = b.j("node", "status")["sync"]
    got, ref = sync["bytes_fetched"], git_pack_bytes(generated, env)
    with open(f"/proc/{b.d.proc.pid}/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    child = sync["verifier_max_rss_kib"]
    print(f"\nfull transfer {got} B (git's pack {ref} B, {got / ref:.3f}x); receiver peak "
          f"{(hwm + child) / 1024:.1f} MiB (daemon {hwm / 1024:.1f} + verifier {child / 1024:.1f})")
    # the complete bundle copies the source's packs: git's size plus the bundle header
    assert got <= ref * 1.02 + 4096, (got, ref)
    if sanitized():
        return  # ASan's shadow memory and quarantine: RSS says nothing there
    assert 0 < child and hwm + child < RECEIVER_PEAK_KIB, (hwm, child)


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def resident_by_mapping(pid):
    rss, name = {}, "?"
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and not parts[0].endswith(":"):
                name = parts[5] if len(parts) > 5 else "[anon]"
            elif parts[0] == "Rss:":
                rss[name] = rss.get(name, 0) + int(parts[1])
    return sorted(rss.items(), key=lambda kv: -kv[1])


def test_idle_daemon_memory_and_cpu(daemon_factory):
    """An idle node as started by hand (identity, QUIC socket, default gossip interval and log
    level): under 10 MB resident (the
    library pages start-up touched are given back, daemon/footprint.c) and under 1 % of a
    core."""
    a = Node(daemon_factory, "alpha", "127.0.11.3").start(interval=10, extra=["--log-level", "info"])
    pid = a.d.proc.pid
    time.sleep(2)
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(8)
    cpu = (cpu_seconds(pid) - c0) / (time.monotonic() - t0)
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    print(f"\nidle: {rss / 1024:.1f} MiB resident, {cpu * 100:.2f} % of a core; largest: " +
          ", ".join(f"{Path(k).name} {v} KiB" for k, v in resident_by_mapping(pid)[:6]))
    assert cpu < 0.01, cpu
    if not sanitized():
        assert rss * 1024 < 10_000_000, rss
