#!/usr/bin/python3
"""Gossip benchmark: N megaengined daemons on loopback, one repository announcement.

Run through bench/gossip.sh (which builds first). Starts N daemons on 127.0.0.1 with distinct
ports and --gossip-interval 10, in a random connected topology (node i bootstraps to 1-2 random
earlier nodes; --seed makes it repeatable), waits for the overlay to settle, adds a repository
on one node and measures:

  * propagation: time from the repo.add request until every node lists the repository (each
    node's megaengine.db is read, read-only, every --poll-ms, default 10 ms);
  * cost: gossip messages sent network-wide for that announcement (the deltas of every node's
    node.status "gossip" counters) divided by N - 1. The add is timed into a quiet part of the
    periodic re-announcement cycle, so background traffic does not pollute the window; what
    remains is measured one cycle earlier at the same phase and subtracted;
  * idle RSS of every daemon (VmRSS), after the run.

Prints a Markdown report. Every daemon it started is stopped on exit (also on SIGINT/SIGTERM);
their pids are written to WORKDIR/pids so the calling shell can clean up too. Nothing leaves
127.0.0.1: every daemon listens on and announces 127.0.0.1:PORT, and the overlay is checked.
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
from collections import deque
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR / "tests" / "integration"))
import meclient  # noqa: E402  (the documented control-protocol client)

POLL_S = 0.05  # control-socket polling while waiting for the overlay
LOOPBACK = "127.0.0.1"


class Bench:
    def __init__(self, args):
        self.args = args
        self.build = Path(args.build_dir).resolve()
        self.megaengined = self.build / "daemon" / "megaengined"
        self.mectl = self.build / "client" / "mectl"
        self.work = Path(args.workdir) if args.workdir else Path(
            tempfile.mkdtemp(prefix="me-bench-", dir="/tmp"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MEGAENGINE_")}
        self.env.pop("JOURNAL_STREAM", None)
        self.env.update(HOME=str(self.work), GIT_CONFIG_NOSYSTEM="1", LC_ALL="C.UTF-8")
        self.procs = []
        self.conns = []
        self.nodes = []  # dicts: i, root, port, did, boots

    # ---- plumbing ----

    def log(self, msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def run(self, argv, **kw):
        return subprocess.run([str(a) for a in argv], env=self.env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, check=True, **kw)

    def free_ports(self, n):
        socks, ports = [], []
        try:
            while len(ports) < n:
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.bind((LOOPBACK, 0))
                socks.append(s)
                ports.append(s.getsockname()[1])
        finally:
            for s in socks:
                s.close()
        return ports

    def all_request(self, cmd, args=None):
        """Pipelines one request to every node, returns the results in node order."""
        rids = [c.send_request(cmd, args) for c in self.conns]
        return [meclient.Connection.result_of(c.read_reply(r)) for c, r in zip(self.conns, rids)]

    def gossip_counters(self):
        """(sum of each gossip counter over all nodes) or None when the daemon has none."""
        sts = self.all_request("node.status")
        if any("gossip" not in s for s in sts):
            return None
        keys = ("sent", "relayed", "received", "duplicates", "accepted")
        return {k: sum(int(s["gossip"].get(k, 0)) for s in sts) for k in keys}

    # ---- set-up ----

    def setup(self):
        a = self.args
        rng = random.Random(a.seed)
        ports = self.free_ports(a.n)
        for i in range(a.n):
            root = self.work / f"n{i}"
            did = json.loads(self.run([self.mectl, "--json", "--root", root, "auth", "init"])
                             .stdout)["did"]
            boots = [] if i == 0 else sorted(rng.sample(range(i), min(i, rng.choice((1, 2)))))
            self.nodes.append({"i": i, "root": root, "port": ports[i], "did": did,
                               "boots": boots, "addr": f"{LOOPBACK}:{ports[i]}"})
        self.origin = rng.randrange(a.n)
        self.log(f"{a.n} identities; starting daemons (origin of the announcement: n{self.origin})")
        pidfile = open(self.work / "pids", "w")
        self.t_start = time.monotonic()
        for nd in self.nodes:
            argv = [self.megaengined, "--root", nd["root"], "--addr", nd["addr"],
                    "--alias", f"n{nd['i']}", "--gossip-interval", a.interval,
                    "--log-level", "info"]
            for b in nd["boots"]:
                argv += ["--bootstrap-node", f"{self.nodes[b]['did']}@{self.nodes[b]['addr']}"]
            with open(self.work / f"n{nd['i']}.log", "wb") as logf:
                p = subprocess.Popen([str(x) for x in argv], env=self.env,
                                     stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
            self.procs.append(p)
            pidfile.write(f"{p.pid}\n")
            pidfile.flush()
        pidfile.close()
        deadline = time.monotonic() + 60
        for nd, p in zip(self.nodes, self.procs):
            sock = str(nd["root"] / "megaengined.sock")
            while True:
                if p.poll() is not None:
                    raise SystemExit(f"n{nd['i']} exited {p.returncode}: "
                                     f"{(self.work / ('n%d.log' % nd['i'])).read_text()}")
                try:
                    self.conns.append(meclient.connect(sock, timeout=30))
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"n{nd['i']}: control socket not up within 60 s")
                    time.sleep(0.02)
        self.t_ready = time.monotonic() - self.t_start

    def settle(self):
        """Waits until every node has a peer, then until the connection count holds still."""
        t0 = time.monotonic()
        while True:
            peers = [s["peers"] for s in self.all_request("node.status")]
            if min(peers) >= 1:
                break
            if time.monotonic() - t0 > 120:
                raise SystemExit(f"overlay did not connect within 120 s: peers {peers}")
            time.sleep(POLL_S)
        self.t_connected = time.monotonic() - self.t_start
        last, since = None, time.monotonic()
        while time.monotonic() - since < self.args.stable:
            total = sum(s["peers"] for s in self.all_request("node.status"))
            if total != last:
                last, since = total, time.monotonic()
            if time.monotonic() - t0 > 120:
                break
            time.sleep(0.1)
        self.t_stable = since - self.t_start
        self.overlay()
        self.edges_settled = self.edges

    def overlay(self):
        """The overlay: undirected edges from every peer list; checks nothing is off
        loopback."""
        self.adj = {i: set() for i in range(len(self.nodes))}
        by_did = {nd["did"]: nd["i"] for nd in self.nodes}
        self.outbound = []
        for i, pl in enumerate(self.all_request("peer.list")):
            self.outbound.append(sum(p["direction"] == "outbound" for p in pl["peers"]))
            for p in pl["peers"]:
                if not p["address"].startswith(LOOPBACK + ":"):
                    raise SystemExit(f"n{i} has a peer at {p['address']}: not loopback")
                self.adj[i].add(by_did[p["did"]])
        for i, nl in enumerate(self.all_request("node.list")):
            for n in nl["nodes"]:
                for addr in n["addresses"]:
                    if not addr.startswith(LOOPBACK + ":"):
                        raise SystemExit(f"n{i} learnt the address {addr}: not loopback")
        self.edges = sum(len(v) for v in self.adj.values()) // 2

    def bfs(self, src):
        dist = {src: 0}
        q = deque([src])
        while q:
            u = q.popleft()
            for v in self.adj[u]:
                if v not in dist:
                    dist[v] = dist[u] + 1
                    q.append(v)
        return dist

    # ---- the measurement ----

    def quiet_slot(self):
        """Samples the summed 'sent' counter over one gossip cycle; returns (delay until the
        middle of the longest quiet stretch, its length, the samples)."""
        ivl = float(self.args.interval)
        samples = []
        t_end = time.monotonic() + ivl + 0.5
        while time.monotonic() < t_end:
            c = self.gossip_counters()
            samples.append((time.monotonic(), c["sent"]))
            time.sleep(POLL_S)
        busy = [t for (t, s), (_, s0) in zip(samples[1:], samples[:-1]) if s != s0]
        self.cycle_sends = samples[-1][1] - samples[0][1]
        self.cycle_s = samples[-1][0] - samples[0][0]
        if not busy:
            return 0.2, ivl, samples
        phases = sorted((t - samples[0][0]) % ivl for t in busy)
        gaps = [(phases[k + 1] - phases[k], phases[k]) for k in range(len(phases) - 1)]
        gaps.append((phases[0] + ivl - phases[-1], phases[-1]))
        gap, start = max(gaps)
        now_phase = (time.monotonic() - samples[0][0]) % ivl
        # Start a little after the last burst before the gap (bursts last a few ms).
        delay = (start + 0.3 - now_phase) % ivl
        return delay, gap, samples

    def measure(self):
        a = self.args
        gitdir = self.work / "project"
        gitdir.mkdir()
        g = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
        self.run(g + ["init", "-q", "-b", "main", gitdir])
        for k in range(3):
            (gitdir / "file.txt").write_text(f"bench {a.seed} line {k}\n")
            self.run(g + ["-C", gitdir, "add", "file.txt"])
            self.run(g + ["-C", gitdir, "commit", "-q", "-m", f"commit {k}"])
        self.run(g + ["-C", gitdir, "tag", "v1"])

        dbs = [sqlite3.connect(f"file:{nd['root'] / 'megaengine.db'}?mode=ro", uri=True,
                               timeout=5) for nd in self.nodes]
        for db in dbs:  # warm: schema read, WAL index mapped
            db.execute("SELECT count(*) FROM repos").fetchone()
        self.have_counters = self.gossip_counters() is not None
        self.gap = None
        bg = None
        if self.have_counters:
            delay, self.gap, samples = self.quiet_slot()
            self.log(f"longest quiet stretch in the gossip cycle: {self.gap:.2f} s; "
                     f"adding in {delay:.2f} s")
            time.sleep(delay)
        c0 = self.gossip_counters() if self.have_counters else None
        t0 = time.monotonic()
        added = self.conns[self.origin].request(
            "repo.add", {"path": str(gitdir), "description": "gossip bench"})
        rid = added["id"]
        seen = {self.origin: 0.0}
        while len(seen) < len(self.nodes):
            now = time.monotonic()
            for i, db in enumerate(dbs):
                if i not in seen and db.execute("SELECT 1 FROM repos WHERE id = ?",
                                                (rid,)).fetchone():
                    seen[i] = now - t0
            if now - t0 > a.timeout:
                missing = sorted(set(range(len(self.nodes))) - set(seen))
                raise SystemExit(f"not every node listed {rid} within {a.timeout} s: "
                                 f"missing n{missing}")
            time.sleep(a.poll_ms / 1000.0)
        t_all = max(seen.values())  # when the last node was seen with it
        slow = sorted(seen.items(), key=lambda kv: -kv[1])[:3]
        self.log("slowest arrivals: " + ", ".join(f"n{i} {t * 1000:.0f} ms" for i, t in slow))
        time.sleep(0.3)  # duplicates still in flight
        c1 = self.gossip_counters() if self.have_counters else None
        t1 = time.monotonic()
        for db in dbs:
            db.close()
        self.rid, self.seen, self.t_all = rid, seen, t_all
        if self.have_counters:
            self.delta = {k: c1[k] - c0[k] for k in c0}
            # Background: sends in the same phase window one cycle earlier.
            ivl = float(a.interval)
            lo, hi = t0 - ivl, t1 - ivl
            before = [s for t, s in samples if t <= lo]
            after = [s for t, s in samples if t >= hi]
            bg = (after[0] - before[-1]) if before and after else None
            self.background = bg
            self.window = t1 - t0
        self.overlay()  # as it was during the measurement (dials to learnt nodes go on)
        # Every node lists it through the protocol as an external, not fetched repository.
        for i, res in enumerate(self.all_request("repo.list")):
            r = {x["id"]: x for x in res["repos"]}.get(rid)
            want = "up to date" if i == self.origin else "not fetched"
            if r is None or r["state"] != want or r["creator"] != self.nodes[self.origin]["did"]:
                raise SystemExit(f"n{i}: repo.list shows {r!r}")

    def rss(self):
        time.sleep(self.args.idle)
        out = []
        for p in self.procs:
            with open(f"/proc/{p.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        out.append(int(line.split()[1]) / 1024.0)
        self.rss_mib = out

    # ---- report ----

    def report(self):
        a = self.args
        n = len(self.nodes)
        cpu = "?"
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        dist = self.bfs(self.origin)
        degs = sorted(len(v) for v in self.adj.values())
        times = sorted(v for k, v in self.seen.items() if k != self.origin)
        boot_edges = sum(len(nd["boots"]) for nd in self.nodes)
        ecc = max(dist.values())
        diam = max(max(self.bfs(i).values()) for i in self.adj)
        flood = 2 * self.edges - (n - 1)  # sends per flooded message (not back to the sender)
        L = []
        L.append(f"### Gossip benchmark: N = {n}, seed {a.seed}")
        L.append("")
        L.append(f"Machine: {os.cpu_count()} CPUs (`nproc` {len(os.sched_getaffinity(0))}), "
                 f"{cpu}, Linux {platform.release()}; binaries `{self.build}` "
                 f"({self.buildtype()}).")
        L.append(f"Run: {n} daemons on {LOOPBACK} (distinct UDP ports), --gossip-interval "
                 f"{a.interval}, --max-outbound default (8); bootstrap topology: node i dials "
                 f"1-2 random earlier nodes ({boot_edges} bootstrap links); repository added "
                 f"on n{self.origin}; every node's catalogue polled every {a.poll_ms} ms.")
        L.append("")
        L.append("| metric | value |")
        L.append("|---|---|")
        L.append(f"| all control sockets up | {self.t_ready:.2f} s after the first start |")
        L.append(f"| every node has a peer | {self.t_connected:.2f} s |")
        L.append(f"| connections stable (unchanged {a.stable:.0f} s) | "
                 f"{self.t_stable:.2f} s |")
        L.append(f"| overlay at the announcement | {self.edges} connections "
                 f"({self.edges_settled} when settled), degree min/median/max "
                 f"{degs[0]}/{statistics.median(degs):g}/{degs[-1]}, diameter {diam}; "
                 f"origin {ecc} hop{'s' if ecc != 1 else ''} from the farthest node; "
                 f"outbound per node min/median/max {min(self.outbound)}/"
                 f"{statistics.median(self.outbound):g}/{max(self.outbound)} |")
        L.append(f"| **repo listed on every node** | **{self.t_all * 1000:.0f} ms** |")
        L.append(f"| arrival, median / p90 of the other nodes | "
                 f"{statistics.median(times) * 1000:.0f} ms / "
                 f"{times[max(0, int(round(0.9 * len(times))) - 1)] * 1000:.0f} ms |")
        if self.have_counters:
            d = self.delta
            net = d["sent"] - (self.background or 0)
            bgs = ("not sampled" if self.background is None else
                   f"{self.background} background at the same phase one cycle earlier")
            L.append(f"| gossip sends for the announcement (node + repo message) | {net} "
                     f"(window {self.window * 1000:.0f} ms: {d['sent']} sent, {bgs}) |")
            L.append(f"| **sends per node, / (N − 1)** | **{net / (n - 1):.1f}** "
                     f"({net / 2 / (n - 1):.1f} per flooded message) |")
            L.append(f"| flooding cost 2E − (N − 1) per message | {flood} "
                     f"({flood / (n - 1):.1f} per node) |")
            L.append(f"| received / duplicates / relayed in the window | {d['received']} / "
                     f"{d['duplicates']} / {d['relayed']} |")
            L.append(f"| steady gossip load, whole network | "
                     f"{self.cycle_sends / self.cycle_s:.0f} sends/s "
                     f"(longest quiet stretch per {a.interval} s cycle: {self.gap:.2f} s) |")
        else:
            L.append("| gossip sends per node, / (N − 1) | n/a (node.status has no gossip "
                     "counters) |")
        r = sorted(self.rss_mib)
        L.append(f"| idle RSS per daemon, min / median / max | {r[0]:.1f} / "
                 f"{statistics.median(r):.1f} / {r[-1]:.1f} MiB (sum {sum(r):.0f} MiB) |")
        L.append("")
        note = (f"Note: the announcement is pushed as soon as `repo add` returns, not at the next "
                f"periodic tick, so the time is bounded by hops x per-hop latency "
                f"(about {self.t_all * 1000 / max(ecc, 1):.0f} ms per hop over {ecc} hop"
                f"{'s' if ecc != 1 else ''}, repo.add itself included) rather than by the "
                f"{a.interval} s interval.")
        if self.have_counters:
            net = self.delta["sent"] - (self.background or 0)
            note += (f" Each message is flooded: every node forwards it once to all its peers "
                     f"but the sender, so the cost follows the overlay's connection count "
                     f"(2E − (N − 1) = {flood} sends per message here; measured "
                     f"{net / 2:.0f}), not N − 1 = {n - 1} as a spanning tree would need; "
                     f"{self.delta['duplicates']} of the {self.delta['received']} receptions "
                     f"were duplicates.")
        L.append(note)
        print("\n".join(L), flush=True)

    def buildtype(self):
        try:
            info = json.loads((self.build / "meson-info" / "intro-buildoptions.json").read_text())
            opts = {o["name"]: o["value"] for o in info}
            s = opts.get("buildtype", "?")
            if opts.get("b_sanitize") not in (None, "none"):
                s += f", sanitize={opts['b_sanitize']}"
            return s
        except (OSError, ValueError, KeyError):
            return "?"

    # ---- tear-down ----

    def cleanup(self):
        for c in self.conns:
            c.close()
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            self.log(f"kept {self.work}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=20, help="number of daemons (default 20)")
    ap.add_argument("--seed", type=int, default=1, help="topology seed (default 1)")
    ap.add_argument("--interval", type=int, default=10, help="--gossip-interval (default 10)")
    ap.add_argument("--build-dir", default=str(REPO_DIR / "build" / "release"))
    ap.add_argument("--workdir", help="where the roots go (default: a new dir in /tmp)")
    ap.add_argument("--stable", type=float, default=3.0,
                    help="seconds the connection count must hold still (default 3)")
    ap.add_argument("--idle", type=float, default=2.0,
                    help="idle seconds before reading RSS (default 2)")
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="give up when the repository has not reached every node (default 60)")
    ap.add_argument("--poll-ms", type=int, default=10,
                    help="how often every node's megaengine.db is checked (default 10)")
    ap.add_argument("--keep", action="store_true", help="keep the roots and logs")
    a = ap.parse_args()
    if a.n < 2:
        ap.error("-n must be at least 2")

    def on_signal(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    b = Bench(a)
    try:
        b.setup()
        b.log(f"all {a.n} control sockets up after {b.t_ready:.2f} s; waiting for the overlay")
        b.settle()
        b.log(f"every node has a peer after {b.t_connected:.2f} s, stable after "
              f"{b.t_stable:.2f} s: {b.edges} connections")
        b.measure()
        b.log(f"repository on every node after {b.t_all * 1000:.0f} ms")
        b.rss()
        b.report()
    finally:
        b.cleanup()


if __name__ == "__main__":
    main()
