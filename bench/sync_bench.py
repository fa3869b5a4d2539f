#!/usr/bin/python3
"""Replication benchmark: megaengined against git on loopback, side by side in the same run.

Run through bench/sync.sh (which builds first and cleans up whatever is left). Everything
listens on 127.0.0.1 and every peer address is checked to be there. Every megaengined runs with
--gossip-interval 1 so that periodic re-announcement cannot dominate a figure (announcements
are pushed at once on a change and to every new peer anyway).

The source. The repository given (default: a generated one, bench/genrepo.py: 10,000 commits
over 200 files, five branches, annotated and lightweight tags, one pack; cached under
build/bench/ so later runs reuse it) is copied into the run directory with `git clone --mirror
--local` (hard links: its packs, bitmaps and all are served as they are) and trimmed to its
branches and tags, which is what a ref state carries. That copy S is what `git daemon` serves
and what daemon A has added with `repo.add`; the update commits are made in S, never in the
repository given.

1. Full replication.
   git: `git clone --mirror git://127.0.0.1:PORT/S` from a `git daemon --export-all` started
   for that clone, timed from the clone's spawn to its exit. Run --git-runs times (default 3),
   interleaved with the megaengine runs; the median is compared.
   megaengine: daemon A holds S; daemon B starts with --bootstrap-node A and is timed from its
   spawn until the branches and tags of its mirror ($ROOT/repos/<id>.git, read straight from
   the files every --poll-ms) equal S's. "cold" is the first transfer of that ref state: A
   builds the bundle (started by repo.add: daemon/packreuse.c, from S's bitmap when S has
   one, as upload-pack does) while B starts, and caches it. "warm": B is
   stopped and a fresh B1 does the same while A still has that bundle cached. The breakdown
   (peer connected, announcement in, fetch requested, bundle ready and sending, fetch done)
   comes from the daemons' info log lines, timestamped when this script reads them (at
   --poll-ms resolution); every sync line of both daemons is also logged to stderr with its
   offset. Afterwards `git for-each-ref` of the mirror must equal S's and `repo.list` must
   say "up to date".
2. One-commit update (--updates times, default 3). A commit that edits 3 files is built in S
   with plumbing; the clock starts when `git update-ref` moves HEAD's branch. megaengine: time
   until B1's mirror has the new tip (A's watcher notices the ref and signs a new state —
   "signed" is when A's megaengine.db, read-only, holds it — and gossips it; B1 fetches a
   bundle of the tips minus its haves, verifies it and moves its refs).
   git: `git fetch` of the same commit into the mirror clone from step 1, timed from spawn to
   exit (it is told to fetch; nothing has to notice the commit).
   Bytes: for megaengine, the receiver's sync.bytes_fetched delta (node.status on the control
   socket, as `mectl --json node status` shows it): the bundle (its header with prerequisites
   and refs, then the pack). For git, the pack it received, captured
   verbatim with GIT_TRACE_PACKFILE (exactly the bytes of the pack, no sideband framing).
   Neither counts its protocol around the data (git: ref advertisement and negotiation;
   megaengine: request/start frames, gossip, QUIC headers and encryption); this is what issue
   8's target compares (megaengine <= 1.2 x git's pack + 4 KB, for every update).
3. Commit to 3 peers: B1 plus P2 (bootstraps to B1) and P3 (bootstraps to P2) mirror S first;
   the overlay then meshes by gossip. For --updates commits on S, the time until all three
   mirrors have the new tip; the target (1 s) is checked against the slowest commit.
4. Peak RSS: VmHWM (/proc/PID/status) of the receiving (B, B1) and serving (A) daemons after
   the full transfers; everything since the daemon's start counts. git: ru_maxrss of the clone
   (wait4 on `git clone`, which covers its index-pack child) and of the serving side (wait4 on
   the `git daemon` started for that clone, which covers the upload-pack and pack-objects
   processes it reaped). The receiver target is < 64 MiB (both B and B1).

Prints a Markdown table with PASS/FAIL against issue 8's targets (informative: the exit status
is 0 unless something broke: a daemon died, a transfer timed out, a mirror came out wrong).
Daemon and git daemon pids go to WORKDIR/pids for the calling shell's clean-up.
"""
import argparse
import json
import os
import platform
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR / "tests" / "integration"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import genrepo  # noqa: E402
import meclient  # noqa: E402  (the documented control-protocol client)

LOOPBACK = "127.0.0.1"
MIB = 1024.0 * 1024.0
HEADS_TAGS = ("refs/heads/", "refs/tags/")
# issue 8's targets
T_FULL_RATIO = 1.1
T_BYTES_RATIO, T_BYTES_PLUS = 1.2, 4096
T_PEERS_S = 1.0
# receiver peak: < 64 MB for the 40k-object repository, < 128 MB for its 420k-object
# one; repositories of up to 200k objects are held to the first
T_RSS_MIB, T_RSS_MIB_LARGE, T_RSS_LARGE_OBJECTS = 64, 128, 200_000


class BenchError(Exception):
    pass


def read_refs(gitdir):
    """Branches and tags of a repository, read from its files (packed-refs, then loose refs,
    which win). Cheap enough to poll every few ms; a ref being rewritten at that moment may be
    missed once, never reported wrong."""
    refs = {}
    try:
        packed = (gitdir / "packed-refs").read_text()
    except (FileNotFoundError, NotADirectoryError):
        packed = ""
    for line in packed.splitlines():
        if not line or line[0] in "#^":
            continue
        oid, _, name = line.partition(" ")
        if name.startswith(HEADS_TAGS):
            refs[name] = oid
    for top in ("refs/heads", "refs/tags"):
        base = gitdir / top
        for dirpath, _, files in os.walk(base):
            for f in files:
                if f.endswith(".lock"):
                    continue
                p = Path(dirpath) / f
                try:
                    oid = p.read_text().strip()
                except OSError:
                    continue
                if len(oid) == 40:
                    refs[str(p.relative_to(gitdir))] = oid
    return refs


def median(xs):
    return statistics.median(xs) if xs else None


class LogWatch:
    """Follows a daemon's stderr log; remembers when each line was first seen."""

    def __init__(self, path):
        self.path = path
        self.off = 0
        self.part = b""
        self.lines = []  # (monotonic time seen, text)

    def poll(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.off)
                data = f.read()
        except FileNotFoundError:
            return
        if not data:
            return
        now = time.monotonic()
        self.off += len(data)
        data = self.part + data
        *full, self.part = data.split(b"\n")
        for ln in full:
            self.lines.append((now, ln.decode("utf-8", "replace")))

    def first(self, needle, after=0.0):
        for t, ln in self.lines:
            if t >= after and needle in ln:
                return t, ln
        return None, None

    def all(self, needle, after=0.0):
        return [(t, ln) for t, ln in self.lines if t >= after and needle in ln]

    def tail(self, n=15):
        self.poll()
        return "\n".join(ln for _, ln in self.lines[-n:])


class Daemon:
    def __init__(self, bench, name, boots=()):
        self.bench, self.name = bench, name
        self.root = bench.work / name
        self.logpath = bench.work / f"{name}.log"
        self.did = json.loads(bench.run([bench.mectl, "--json", "--root", self.root, "auth",
                                         "init"]).stdout)["did"]
        self.port = bench.free_port(socket.SOCK_DGRAM)
        self.addr = f"{LOOPBACK}:{self.port}"
        sock = self.root / "megaengined.sock"
        if len(str(sock)) > 100:  # sun_path: the daemon refuses a longer default
            sock = Path(tempfile.mkdtemp(prefix="me-sync-", dir="/tmp")) / "s"
            bench.tmpdirs.append(sock.parent)
        self.sock = sock
        argv = [bench.megaengined, "--root", self.root, "--addr", self.addr, "--alias", name,
                "--gossip-interval", bench.args.gossip_interval, "--log-level",
                bench.args.log_level, "--socket", sock]
        for b in boots:
            argv += ["--bootstrap-node", f"{b.did}@{b.addr}"]
        self.log = LogWatch(self.logpath)
        with open(self.logpath, "wb") as logf:
            self.t_spawn = time.monotonic()
            self.proc = subprocess.Popen([str(x) for x in argv], env=bench.env,
                                         stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
        bench.note_pid(self.proc.pid)
        bench.daemons.append(self)
        self.conn = None
        deadline = time.monotonic() + 30
        while self.conn is None:
            self.check_alive()
            try:
                self.conn = meclient.connect(str(sock), timeout=30)
            except OSError:
                if time.monotonic() > deadline:
                    raise BenchError(f"{name}: control socket not up within 30 s")
                time.sleep(0.01)

    def check_alive(self):
        if self.proc.poll() is not None:
            raise BenchError(f"daemon {self.name} exited with {self.proc.returncode}; its log "
                             f"ends with:\n{self.log.tail(30)}")

    def request(self, cmd, args=None, timeout=30):
        return self.conn.request(cmd, args, timeout=timeout)

    def mirror(self, rid):
        return self.root / "repos" / (rid[len("did:repo:"):] + ".git")

    def bytes_fetched(self):
        s = self.request("node.status").get("sync") or {}
        return int(s.get("bytes_fetched", 0))

    def status_kib(self, key):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        return 0

    def hwm_mib(self):
        return self.status_kib("VmHWM") / 1024.0

    def node_peak_mib(self):
        """The daemon's peak plus the largest verifier child's (received bundles are indexed in
        a child process, docs/security.md): an upper bound on the node's peak."""
        s = self.request("node.status").get("sync") or {}
        return self.hwm_mib() + int(s.get("verifier_max_rss_kib", 0)) / 1024.0

    def verifier_mib(self):
        s = self.request("node.status").get("sync") or {}
        return int(s.get("verifier_max_rss_kib", 0)) / 1024.0

    def cpu_s(self):
        """User + system CPU seconds so far."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def wait_line(self, needle, after, timeout=5.0):
        """When the line with needle was seen (after `after`), waiting for it a little: a
        daemon logs a fetch's end just after moving the refs."""
        deadline = time.monotonic() + timeout
        while True:
            self.log.poll()
            t, ln = self.log.first(needle, after)
            if t is not None or time.monotonic() > deadline:
                return t, ln
            time.sleep(0.005)

    def stop(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.bench.log(f"{self.name} ignored SIGTERM for 15 s; killed")
        if self.proc.returncode not in (0, -signal.SIGTERM):
            self.bench.problems.append(f"daemon {self.name} ended with status "
                                       f"{self.proc.returncode}")


class GitDaemon:
    """`git daemon` serving base on a port of its own."""

    def __init__(self, bench, base):
        self.bench = bench
        self.port = bench.free_port(socket.SOCK_STREAM)
        self.logf = open(bench.work / f"git-daemon-{self.port}.log", "wb")
        self.proc = subprocess.Popen(
            ["git", "daemon", "--export-all", "--reuseaddr", f"--base-path={base}",
             f"--listen={LOOPBACK}", f"--port={self.port}"],
            env=bench.env, stdin=subprocess.DEVNULL, stdout=self.logf, stderr=self.logf)
        bench.note_pid(self.proc.pid)
        bench.gitds.append(self)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"git daemon exited with {self.proc.returncode}")
            try:
                socket.create_connection((LOOPBACK, self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise BenchError("git daemon is not listening after 20 s")
                time.sleep(0.02)

    def url(self, name):
        return f"git://{LOOPBACK}:{self.port}/{name}"

    def stop(self):
        """(peak RSS MiB, CPU seconds) over the daemon and the children it reaped."""
        self.bench.gitds.remove(self)
        time.sleep(0.3)  # lets it reap the upload-pack it forked
        self.proc.send_signal(signal.SIGTERM)
        _, status, ru = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.logf.close()
        return ru.ru_maxrss / 1024.0, ru.ru_utime + ru.ru_stime


class Bench:
    def __init__(self, args):
        self.args = args
        self.build = Path(args.build_dir).resolve()
        self.megaengined = self.build / "daemon" / "megaengined"
        self.mectl = self.build / "client" / "mectl"
        self.work = Path(args.workdir).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("MEGAENGINE_", "GIT_"))}
        self.env.pop("JOURNAL_STREAM", None)
        home = self.work / "home"
        home.mkdir(exist_ok=True)
        self.env.update(HOME=str(home), GIT_CONFIG_NOSYSTEM="1", LC_ALL="C.UTF-8",
                        GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@localhost",
                        GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@localhost")
        self.daemons = []
        self.gitds = []
        self.tmpdirs = []
        self.problems = []
        self.rng = random.Random(args.seed)
        self.pidfile = open(self.work / "pids", "a")
        self.r = {}  # results

    # ---- plumbing ----

    def log(self, msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def run(self, argv, input=None, env=None, **kw):
        try:
            return subprocess.run([str(a) for a in argv], env=env or self.env, input=input,
                                  stdin=None if input is not None else subprocess.DEVNULL,
                                  capture_output=True, check=True,
                                  text=not isinstance(input, bytes), **kw)
        except subprocess.CalledProcessError as e:
            raise BenchError(f"{' '.join(map(str, argv))} failed ({e.returncode}): "
                             f"{e.stderr}") from None

    def git(self, gitdir, *args, **kw):
        return self.run(["git", "-C", gitdir] + list(args), **kw).stdout

    def note_pid(self, pid):
        self.pidfile.write(f"{pid}\n")
        self.pidfile.flush()

    def free_port(self, kind):
        s = socket.socket(socket.AF_INET, kind)
        try:
            s.bind((LOOPBACK, 0))
            return s.getsockname()[1]
        finally:
            s.close()

    def git_refs(self, gitdir):
        out = self.git(gitdir, "for-each-ref", "--format=%(objectname) %(refname)",
                       "refs/heads", "refs/tags")
        return dict(reversed(ln.split(" ", 1)) for ln in out.splitlines() if ln)

    def poll_logs(self):
        for d in self.daemons:
            if d.proc.returncode is None:
                d.log.poll()

    def wait_mirrors(self, targets, want, exact, timeout, what, probe=None):
        """targets: [(daemon, mirror gitdir)]. Polls until every mirror's branches and tags
        equal want (exact) or include it. Returns {daemon name: monotonic time}. probe() is
        called on every round."""
        done = {}
        t0 = time.monotonic()
        poll = self.args.poll_ms / 1000.0
        while len(done) < len(targets):
            now = time.monotonic()
            for d, gd in targets:
                if d.name in done:
                    continue
                refs = read_refs(gd)
                ok = refs == want if exact else all(refs.get(k) == v for k, v in want.items())
                if ok:
                    done[d.name] = now
            if probe is not None:
                probe()
            for d in self.daemons:
                if d.proc.returncode is None:
                    d.log.poll()
                    d.check_alive()
            if len(done) == len(targets):
                break
            if now - t0 > timeout:
                missing = [d for d, _ in targets if d.name not in done]
                tails = "\n".join(f"--- {d.name} ({d.logpath}):\n{d.log.tail()}"
                                  for d in self.daemons if d.proc.returncode is None)
                raise BenchError(f"{what}: {', '.join(d.name for d in missing)} did not have "
                                 f"it within {timeout:.0f} s\n{tails}")
            time.sleep(poll)
        self.poll_logs()
        return done

    def wait_state(self, d, rid, want="up to date", timeout=15):
        t0 = time.monotonic()
        while True:
            repos = {r["id"]: r for r in d.request("repo.list")["repos"]}
            r = repos.get(rid)
            if r is not None and r["state"] == want:
                return r
            if time.monotonic() - t0 > timeout:
                self.problems.append(f"{d.name}: repo.list says {r and r['state']!r} "
                                     f"({r and r.get('error')}) {timeout} s after its mirror "
                                     f"was complete, not {want!r}")
                return r
            time.sleep(0.05)

    def check_loopback(self):
        for d in self.daemons:
            if d.proc.returncode is not None:
                continue
            for p in d.request("peer.list")["peers"]:
                if not p["address"].startswith(LOOPBACK + ":"):
                    raise BenchError(f"{d.name} has a peer at {p['address']}: not loopback")

    # ---- the source ----

    def source(self):
        a = self.args
        if a.repo:
            given = Path(a.repo).resolve()
        else:
            cache = REPO_DIR / "build" / "bench"
            cache.mkdir(parents=True, exist_ok=True)
            given = cache / f"gen-c{a.commits}-s{a.gen_seed}-v{genrepo.GEN_VERSION}.git"
            if given.exists():
                self.log(f"reusing the generated repository {given}")
            else:
                self.log(f"generating a repository of {a.commits} commits into {given}")
                genrepo.generate(str(given), a.commits, a.gen_seed, self.log)
        self.given = given
        name = given.name[:-4] if given.name.endswith(".git") else given.name
        if given.name == ".git":
            name = given.parent.name
        self.name = (name or "repo") + ".git"
        self.srcbase = self.work / "src"
        self.srcbase.mkdir()
        self.S = self.srcbase / self.name
        t0 = time.monotonic()
        self.run(["git", "clone", "-q", "--mirror", "--local", given, self.S])
        drop = [r for r in self.git(self.S, "for-each-ref", "--format=%(refname)").split()
                if not r.startswith(HEADS_TAGS)]
        if drop:
            self.git(self.S, "update-ref", "--stdin",
                     input="".join(f"delete {r}\n" for r in drop))
        self.git(self.S, "config", "--unset-all", "remote.origin.url")
        self.head = self.git(self.S, "symbolic-ref", "-q", "HEAD").strip()
        self.want = self.git_refs(self.S)
        if not self.want:
            raise BenchError(f"{given} has no branches or tags")
        if self.head not in self.want:
            self.head = sorted(r for r in self.want if r.startswith("refs/heads/"))[0]
        count = self.git(self.S, "count-objects", "-v")
        cv = dict(ln.split(": ", 1) for ln in count.splitlines())
        packdir = self.S / "objects" / "pack"
        self.src_info = {
            "objects": int(cv["in-pack"]) + int(cv["count"]),
            "packs": int(cv["packs"]),
            "pack_mib": int(cv["size-pack"]) / 1024.0,
            "bitmap": any(p.suffix == ".bitmap" for p in packdir.iterdir()),
            "commits": int(self.git(self.S, "rev-list", "--all", "--count").strip()),
            "branches": sum(r.startswith("refs/heads/") for r in self.want),
            "tags": sum(r.startswith("refs/tags/") for r in self.want),
        }
        self.log(f"source {self.S} ({time.monotonic() - t0:.1f} s): {self.src_info}")
        # Same page-cache state for everyone: read the object files once.
        for dirpath, _, files in os.walk(self.S / "objects"):
            for f in files:
                with open(Path(dirpath) / f, "rb") as fh:
                    while fh.read(1 << 20):
                        pass

    # ---- git ----

    def git_clone(self, i):
        dst = self.work / f"git-clone-{i}.git"
        gd = GitDaemon(self, self.srcbase)
        t0 = time.monotonic()
        p = subprocess.Popen(["git", "clone", "-q", "--mirror", gd.url(self.name), str(dst)],
                             env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        self.note_pid(p.pid)
        _, status, ru = os.wait4(p.pid, 0)
        t = time.monotonic() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        err = p.stderr.read().decode(errors="replace")
        p.stderr.close()
        server = gd.stop()
        if p.returncode != 0:
            raise BenchError(f"git clone --mirror failed ({p.returncode}): {err}")
        if self.git_refs(dst) != self.want:
            raise BenchError("git clone --mirror: its refs differ from the source's")
        pack = sum(f.stat().st_size for f in (dst / "objects" / "pack").glob("*.pack"))
        res = {"t": t, "client_mib": ru.ru_maxrss / 1024.0, "server_mib": server[0],
               "pack": pack, "dir": dst, "client_cpu": ru.ru_utime + ru.ru_stime,
               "server_cpu": server[1]}
        self.log(f"git clone --mirror #{i}: {t:.2f} s, pack {pack / MIB:.2f} MiB, peak RSS "
                 f"clone {res['client_mib']:.0f} MiB, server {res['server_mib']:.0f} MiB; CPU "
                 f"clone {res['client_cpu']:.2f} s, server {res['server_cpu']:.2f} s")
        return res

    # ---- megaengine ----

    def full_me(self, label, a):
        """Starts a fresh daemon bootstrapping to a; times until its mirror equals S."""
        self.poll_logs()
        a_cpu = a.cpu_s()
        b = Daemon(self, label, boots=[a])
        t0 = b.t_spawn
        mirror = b.mirror(self.rid)
        done = self.wait_mirrors([(b, mirror)], self.want, True, self.args.timeout,
                                 f"full replication to {label}")
        t = done[label] - t0
        tv, vline = b.wait_line(f"sync: {self.rid} now at state", t0)
        if self.git_refs(mirror) != self.want:
            raise BenchError(f"{label}: git for-each-ref of the mirror differs from the source")
        res = {"t": t, "bytes": b.bytes_fetched(), "recv_mib": b.node_peak_mib(),
               "recv_daemon_mib": b.hwm_mib(), "recv_verifier_mib": b.verifier_mib(),
               "serve_mib": a.hwm_mib(), "recv_cpu": b.cpu_s(), "serve_cpu": a.cpu_s() - a_cpu,
               "applied": tv and tv - t0}
        for key, d, needle in (("connected", b, "peer connected"),
                               ("announced", b, "repository announced"),
                               ("fetch", b, f"sync: fetching {self.rid}"),
                               ("served", a, f"sync: serving {self.rid}")):
            tx, _ = d.log.first(needle, t0)
            res[key] = tx and tx - t0
        res["attempts"] = len(b.log.all(f"sync: fetching {self.rid}", t0))
        # The transfer's story, for the log: every sync line of both daemons.
        names = {d.did: d.name for d in self.daemons}
        story = sorted([(tx, d.name, ln) for d in (a, b) for tx, ln in d.log.all("sync: ", t0)])
        for tx, n, ln in story:
            for did, nm in names.items():
                ln = ln.replace(did, nm)
            self.log(f"  +{tx - t0:6.2f} s {n}: {ln.replace(self.rid, 'REPO')[:160]}")
        self.wait_state(b, self.rid)
        self.log(f"megaengine full ({label}): {t:.2f} s, {res['bytes'] / MIB:.2f} MiB; "
                 + ", ".join(f"{k} {fmt_s(res[k])}" for k in ("connected", "announced", "fetch",
                                                                "served", "applied"))
                 + f"; peak RSS receiver {res['recv_mib']:.0f} MiB (daemon "
                 f"{res['recv_daemon_mib']:.0f} + verifier {res['recv_verifier_mib']:.0f}), server "
                 f"{res['serve_mib']:.0f} MiB; CPU receiver {res['recv_cpu']:.1f} s, server "
                 f"{res['serve_cpu']:.1f} s")
        if vline:
            self.log(f"  {label}: {vline.strip()}")
        return b, res

    def make_commit(self, i):
        """A commit on HEAD's branch of S editing up to 3 files; returns (parent, commit)."""
        parent = self.git(self.S, "rev-parse", self.head).strip()
        files = []
        for ln in self.git(self.S, "ls-tree", "-r", "-l", parent).splitlines():
            meta, path = ln.split("\t", 1)
            mode, kind, _, size = meta.split()
            if kind == "blob" and mode in ("100644", "100755") and 16 <= int(size) <= 1 << 18:
                files.append((mode, path))
        if not files:
            raise BenchError("the source has no file to edit for an update commit")
        env = dict(self.env, GIT_INDEX_FILE=str(self.work / "bench.index"))
        self.git(self.S, "read-tree", parent, env=env)
        for mode, path in self.rng.sample(files, min(3, len(files))):
            lines = self.run(["git", "-C", self.S, "cat-file", "blob", f"{parent}:{path}"],
                             input=b"").stdout.split(b"\n")
            k = self.rng.randrange(len(lines))
            words = " ".join(f"w{self.rng.randrange(10**6)}" for _ in range(6))
            lines[k] = f"bench update {i}: {words}".encode()
            lines.insert(self.rng.randrange(len(lines) + 1), f"added by update {i}".encode())
            oid = self.run(["git", "-C", self.S, "hash-object", "-w", "--stdin"],
                           input=b"\n".join(lines)).stdout.strip().decode()
            self.git(self.S, "update-index", "--cacheinfo", f"{mode},{oid},{path}", env=env)
        tree = self.git(self.S, "write-tree", env=env).strip()
        commit = self.git(self.S, "commit-tree", tree, "-p", parent, "-m",
                          f"bench: update {i}").strip()
        return parent, commit

    def a_seq(self, db):
        """The newest signed state in A's database (read-only: when the watcher signed)."""
        row = db.execute("SELECT ref_seq FROM repos WHERE id = ?", (self.rid,)).fetchone()
        return row[0] if row else 0

    def updates(self, a, receivers, gitmirror, gd, label):
        """--updates commits on S; per commit the time until every receiver's mirror has it,
        the bytes each fetched, and (when gitmirror) git fetch's time and pack."""
        out = []
        db = sqlite3.connect(f"file:{a.root / 'megaengine.db'}?mode=ro", uri=True, timeout=5)
        try:
            for i in range(self.args.updates):
                out.append(self.update(a, receivers, gitmirror, gd, f"{label}{i}", db))
        finally:
            db.close()
        for d in receivers:
            if self.git_refs(d.mirror(self.rid)) != self.git_refs(self.S):
                raise BenchError(f"{d.name}: mirror refs differ from the source after updates")
        return out

    def update(self, a, receivers, gitmirror, gd, label, db):
        """One commit on S: the time until every receiver's mirror has it, the bytes each
        fetched, the breakdown; git fetch's time and pack when gitmirror is given."""
        time.sleep(self.args.settle)
        parent, commit = self.make_commit(label)
        before = {d.name: d.bytes_fetched() for d in receivers}
        seq0 = self.a_seq(db)
        signed = []

        def probe():
            if not signed and self.a_seq(db) != seq0:
                signed.append(time.monotonic())
        self.poll_logs()
        t0 = time.monotonic()
        self.git(self.S, "update-ref", self.head, commit, parent)
        done = self.wait_mirrors([(d, d.mirror(self.rid)) for d in receivers],
                                 {self.head: commit}, False, self.args.update_timeout,
                                 f"update {label}", probe)
        rec = {"t": {n: t - t0 for n, t in done.items()},
               "signed": signed[0] - t0 if signed else None}
        for d in receivers:
            tv, _ = d.wait_line(f"sync: {self.rid} now at state", t0)
            for key, needle in (("announced", "repository announced"),
                                ("fetch", f"sync: fetching {self.rid}")):
                tx, _ = d.log.first(needle, t0)
                rec.setdefault(key, {})[d.name] = tx and tx - t0
            rec.setdefault("applied", {})[d.name] = tv and tv - t0
        rec["bytes"] = {d.name: d.bytes_fetched() - before[d.name] for d in receivers}
        ts, _ = a.log.first(f"sync: serving {self.rid}", t0)
        rec["served"] = ts and ts - t0
        if gitmirror is not None:
            trace = self.work / f"fetch-{label}.pack"
            env = dict(self.env, GIT_TRACE_PACKFILE=str(trace))
            g0 = time.monotonic()
            self.run(["git", "-C", gitmirror, "fetch", "-q", "--prune", gd.url(self.name),
                      "+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"], env=env)
            rec["git_t"] = time.monotonic() - g0
            rec["git_pack"] = trace.stat().st_size if trace.exists() else 0
            if self.git(gitmirror, "rev-parse", self.head).strip() != commit:
                raise BenchError("git fetch did not bring the new commit")
        slow = max(rec["t"].values())
        self.log(f"update {label}: signed on A at {fmt_s(rec['signed'])} s; " + ", ".join(
            f"{n} {t * 1000:.0f} ms / {rec['bytes'][n]} B (announced "
            f"{fmt_s(rec['announced'][n])}, fetch {fmt_s(rec['fetch'][n])})"
            for n, t in sorted(rec["t"].items(), key=lambda kv: kv[1]))
            + (f"; git fetch {rec['git_t'] * 1000:.0f} ms / {rec['git_pack']} B"
               if gitmirror is not None else "") + f"; slowest {slow * 1000:.0f} ms")
        return rec

    # ---- the run ----

    def measure(self):
        a = self.args
        self.load0 = os.getloadavg()[0]
        self.source()
        runs = a.git_runs
        gits = [self.git_clone(1)]
        self.log("starting daemon A and adding the source")
        A = Daemon(self, "A")
        t0 = time.monotonic()
        self.rid = A.request("repo.add", {"path": str(self.S), "description": "sync bench"},
                             timeout=120)["id"]
        self.r["repo_add"] = time.monotonic() - t0
        self.log(f"repo.add: {self.rid} in {self.r['repo_add'] * 1000:.0f} ms")
        B, self.r["cold"] = self.full_me("B", A)
        self.check_loopback()
        B.stop()
        if runs >= 2:
            gits.append(self.git_clone(2))
        B1, self.r["warm"] = self.full_me("B1", A)
        self.check_loopback()
        for i in range(3, runs + 1):
            gits.append(self.git_clone(i))
        self.r["git"] = gits
        self.log("one-commit updates: A -> B1, and git fetch from git daemon")
        gd = GitDaemon(self, self.srcbase)
        try:
            self.r["upd"] = self.updates(A, [B1], gits[-1]["dir"], gd, "u")
        finally:
            gd.stop()
        self.log("three peers: P2 bootstraps to B1, P3 to P2")
        P2 = Daemon(self, "P2", boots=[B1])
        P3 = Daemon(self, "P3", boots=[P2])
        want = self.git_refs(self.S)
        done = self.wait_mirrors([(d, d.mirror(self.rid)) for d in (P2, P3)], want, True,
                                 a.timeout, "full replication to P2 and P3")
        names = {d.did: d.name for d in self.daemons}
        self.r["p_full"] = {}
        for d in (P2, P3):
            _, ln = d.log.first(f"sync: fetching {self.rid}", d.t_spawn)
            src = names.get(ln.split(" from ")[1].split()[0], "?") if ln else "?"
            self.r["p_full"][d.name] = (done[d.name] - d.t_spawn, src)
        self.log("P2 and P3 mirrored S: " + ", ".join(
            f"{n} {t:.2f} s after its start (from {src})"
            for n, (t, src) in self.r["p_full"].items()))
        time.sleep(a.settle)
        self.check_loopback()
        self.r["mesh"] = {d.name: len(d.request("peer.list")["peers"])
                          for d in (A, B1, P2, P3)}
        self.r["peers"] = self.updates(A, [B1, P2, P3], None, None, "p")
        self.check_loopback()
        self.r["idle_mib"] = {d.name: d.status_kib("VmRSS") / 1024.0
                              for d in (A, B1, P2, P3)}

    # ---- report ----

    def report(self):
        a, r, si = self.args, self.r, self.src_info
        cpu = "?"
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        gits = r["git"]
        g_t = median([g["t"] for g in gits])
        g_cli = max(g["client_mib"] for g in gits)
        g_srv = max(g["server_mib"] for g in gits)
        g_pack = gits[-1]["pack"]
        cold, warm = r["cold"], r["warm"]
        upd = r["upd"]
        u_t = median([u["t"]["B1"] for u in upd])
        u_b = median([u["bytes"]["B1"] for u in upd])
        g_ut = median([u["git_t"] for u in upd])
        g_ub = median([u["git_pack"] for u in upd])
        bytes_ok = all(u["bytes"]["B1"] <= T_BYTES_RATIO * u["git_pack"] + T_BYTES_PLUS
                       for u in upd)
        p_max = [max(u["t"].values()) for u in r["peers"]]

        def pf(ok):
            return "PASS" if ok else "FAIL"

        def ratio(x, y):
            return f"{x / y:.2f}×" if y else "—"

        src = "generated by bench/genrepo.py" if not a.repo else f"`{self.given}`"
        L = []
        L.append(f"### Replication benchmark: {si['commits']} commits, {si['objects']} objects, "
                 f"{si['pack_mib']:.1f} MiB packed")
        L.append("")
        L.append(f"Machine: {os.cpu_count()} CPUs, {cpu}, Linux {platform.release()}, load "
                 f"average {self.load0:.1f} at the start and {os.getloadavg()[0]:.1f} at the "
                 f"end; "
                 f"binaries `{self.build}` ({self.buildtype()}); "
                 f"{self.run(['git', '--version']).stdout.strip()}.")
        L.append(f"Source: {src}: {si['branches']} branches, {si['tags']} tags, "
                 f"{si['packs']} pack{'s' if si['packs'] != 1 else ''}"
                 f"{' with a bitmap' if si['bitmap'] else ', no bitmap'}. All on "
                 f"{LOOPBACK}; every megaengined runs with `--gossip-interval "
                 f"{a.gossip_interval}` so that "
                 f"periodic re-announcement cannot dominate (changes are pushed at once). "
                 f"git: median of {len(gits)} `git clone --mirror` runs from `git daemon`; "
                 f"updates: median of {a.updates} commits editing 3 files each.")
        L.append("")
        L.append("| metric | megaengine | git | ratio | target (issue 8) | |")
        L.append("|---|---|---|---|---|---|")
        L.append(f"| full replication, cold (A builds the bundle) | {cold['t']:.2f} s | "
                 f"{g_t:.2f} s | {ratio(cold['t'], g_t)} | ≤ {T_FULL_RATIO}× | "
                 f"{pf(cold['t'] <= T_FULL_RATIO * g_t)} |")
        L.append(f"| full replication, warm (bundle cached on A) | {warm['t']:.2f} s | "
                 f"{g_t:.2f} s | {ratio(warm['t'], g_t)} | ≤ {T_FULL_RATIO}× | "
                 f"{pf(warm['t'] <= T_FULL_RATIO * g_t)} |")
        L.append(f"| bytes for the full transfer (bundle / pack) | "
                 f"{cold['bytes'] / MIB:.2f} MiB | {g_pack / MIB:.2f} MiB | "
                 f"{ratio(cold['bytes'], g_pack)} | | |")
        L.append(f"| one-commit update: time (commit → mirror / `git fetch`) | "
                 f"{u_t * 1000:.0f} ms | {g_ut * 1000:.0f} ms | {ratio(u_t, g_ut)} | | |")
        L.append(f"| one-commit update: bytes (bundle / pack) | {u_b:.0f} B | {g_ub:.0f} B | "
                 f"{ratio(u_b, g_ub)} | ≤ {T_BYTES_RATIO}× git + 4 KB | {pf(bytes_ok)} |")
        L.append(f"| commit → mirrors of 3 peers, median (worst) | {median(p_max) * 1000:.0f} ms "
                 f"({max(p_max) * 1000:.0f}) | — | | ≤ {T_PEERS_S:g} s | "
                 f"{pf(max(p_max) <= T_PEERS_S)} |")
        t_rss = T_RSS_MIB_LARGE if si["objects"] > T_RSS_LARGE_OBJECTS else T_RSS_MIB
        L.append(f"| peak RSS, receiver: daemon + its largest verifier child (B cold / B1 "
                 f"warm) | {cold['recv_mib']:.1f} / "
                 f"{warm['recv_mib']:.1f} MiB | {g_cli:.1f} MiB (clone) | "
                 f"{ratio(cold['recv_mib'], g_cli)} | < {t_rss} MiB | "
                 f"{pf(max(cold['recv_mib'], warm['recv_mib']) < t_rss)} |")
        L.append(f"| peak RSS, server (A) | {cold['serve_mib']:.1f} MiB | {g_srv:.1f} MiB "
                 f"(git daemon + upload-pack + pack-objects) | "
                 f"{ratio(cold['serve_mib'], g_srv)} | | |")
        L.append("")
        L.append(f"Where the time goes: seconds from B's start (full) or from the commit "
                 f"(update), as the daemons' info log lines appeared (±{a.poll_ms} ms); "
                 f"'signed' is when A's database holds the new state.")
        L.append("")
        L.append("| | peer connected / signed | announcement in | fetch requested | bundle "
                 "ready, sending | fetch logged done | mirror complete | CPU s receiver / "
                 "server |")
        L.append("|---|---|---|---|---|---|---|---|")
        for lbl, x in (("full, cold", cold), ("full, warm", warm)):
            tries = f" ({x['attempts']} attempts)" if x["attempts"] > 1 else ""
            L.append(f"| {lbl} | {fmt_s(x['connected'])} | {fmt_s(x['announced'])} | "
                     f"{fmt_s(x['fetch'])}{tries} | {fmt_s(x['served'])} | "
                     f"{fmt_s(x['applied'])} | {x['t']:.2f} | {x['recv_cpu']:.1f} / "
                     f"{x['serve_cpu']:.1f} |")
        g_cpu = (median([g["client_cpu"] for g in gits]), median([g["server_cpu"] for g in gits]))
        L.append(f"| git clone (median) | | | | | | {g_t:.2f} | {g_cpu[0]:.1f} / {g_cpu[1]:.1f} |")

        def med(key):
            return median([u[key]["B1"] for u in upd if u[key]["B1"] is not None])
        u_sig = median([u["signed"] for u in upd if u["signed"] is not None])
        L.append(f"| update (median) | {fmt_s(u_sig)} | "
                 f"{fmt_s(med('announced'))} | {fmt_s(med('fetch'))} | "
                 f"{fmt_s(median([u['served'] for u in upd if u['served'] is not None]))} | "
                 f"{fmt_s(med('applied'))} | {u_t:.2f} | |")
        L.append("")
        L.append(f"Other figures: `repo add` {r['repo_add'] * 1000:.0f} ms; git clone runs "
                 + ", ".join(f"{g['t']:.2f}" for g in gits) + " s; per update (megaengine / "
                 "git fetch): " + "; ".join(f"{u['t']['B1'] * 1000:.0f} ms {u['bytes']['B1']} B"
                                            f" / {u['git_t'] * 1000:.0f} ms {u['git_pack']} B"
                                            for u in upd)
                 + "; 3 peers, slowest per commit: "
                 + ", ".join(f"{t * 1000:.0f}" for t in p_max) + " ms (peer connections "
                 + ", ".join(f"{k} {v}" for k, v in r["mesh"].items()) + "); RSS of the 4 "
                 "daemons at the end: "
                 + ", ".join(f"{k} {v:.1f}" for k, v in r["idle_mib"].items()) + " MiB; "
                 "full replication to the extra peers: "
                 + ", ".join(f"{n} {t:.1f} s (served by {src})"
                             for n, (t, src) in r["p_full"].items()) + ".")
        if self.problems:
            L.append("")
            L.append("Problems seen: " + "; ".join(self.problems))
        print("\n".join(L), flush=True)

    def buildtype(self):
        try:
            info = json.loads((self.build / "meson-info" / "intro-buildoptions.json")
                              .read_text())
            opts = {o["name"]: o["value"] for o in info}
            s = opts.get("buildtype", "?")
            if opts.get("b_sanitize") not in (None, "none"):
                s += f", sanitize={opts['b_sanitize']}"
            return s
        except (OSError, ValueError, KeyError):
            return "?"

    # ---- tear-down ----

    def cleanup(self):
        # A second signal (Ctrl-C reaches the whole process group, then the wrapper's TERM)
        # must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for g in list(self.gitds):
            g.stop()
        for d in self.daemons:
            d.stop()
        for t in self.tmpdirs:
            shutil.rmtree(t, ignore_errors=True)
        self.pidfile.close()


def fmt_s(t):
    return "—" if t is None else f"{t:.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("repo", nargs="?",
                    help="repository to replicate (default: a generated one, cached)")
    ap.add_argument("--commits", type=int, default=10000,
                    help="commits of the generated repository (default 10000)")
    ap.add_argument("--gen-seed", type=int, default=1, help="generator seed (default 1)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the update commits")
    ap.add_argument("--git-runs", type=int, default=3,
                    help="git clone --mirror runs, median reported (default 3)")
    ap.add_argument("--updates", type=int, default=3,
                    help="commits for the update and 3-peer figures (default 3)")
    ap.add_argument("--settle", type=float, default=1.5,
                    help="seconds of quiet before each update commit (default 1.5)")
    ap.add_argument("--poll-ms", type=int, default=5,
                    help="how often mirrors and logs are read (default 5)")
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="give up on a full transfer after this (default 600 s)")
    ap.add_argument("--update-timeout", type=float, default=60.0,
                    help="give up on an update after this (default 60 s)")
    ap.add_argument("--gossip-interval", type=int, default=1,
                    help="the daemons' --gossip-interval (default 1)")
    ap.add_argument("--log-level", default="info",
                    help="the daemons' --log-level (default info; the breakdown needs info)")
    ap.add_argument("--build-dir", default=str(REPO_DIR / "build" / "release"))
    ap.add_argument("--workdir", required=True, help="run directory (made by bench/sync.sh)")
    ap.add_argument("--keep", action="store_true", help="keep the run directory")
    a = ap.parse_args()
    if a.git_runs < 1 or a.updates < 1:
        ap.error("--git-runs and --updates must be at least 1")

    def on_signal(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    b = Bench(a)
    rc = 0
    try:
        b.measure()
        b.report()
    except BenchError as e:
        b.log(f"FAILED: {e}")
        rc = 1
    finally:
        b.cleanup()
    if b.problems:
        b.log("problems: " + "; ".join(b.problems))
        rc = rc or 1
    sys.exit(rc)


if __name__ == "__main__":
    main()
