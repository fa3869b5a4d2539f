#!/usr/bin/python3
"""Gossip benchmark: N megaengined daemons on loopback (default 50), the epidemic broadcast tree.

Run through bench/gossip.sh (which builds first). Starts N daemons on 127.0.0.1 with distinct
ports in a random connected topology (node i bootstraps to 1-2 random earlier nodes; --seed
makes it repeatable; then each dials up to --max-outbound nodes learnt by gossip), waits for the
overlay to settle, lets the tree form with two warm-up announcements from one node, adds a
repository on another node and measures:

  * propagation: time from the repo.add request until every node lists the repository (each
    node's megaengine.db is read, read-only, every --poll-ms, default 10 ms); target < 3 s;
  * messages for that announcement (docs/peer-protocol.md, "Epidemic broadcast tree"): the
    full announcement frames every node sent plus the GRAFTs, from the deltas of every node's
    node.status "gossip" counters; target <= 2 (N - 1). The IHAVE digests are shown apart;
    flooding (every node forwards to all its peers but the sender) would send 2E - (N - 1);
  * idle RSS of every daemon (VmRSS), after the run.

The daemons run with --gossip-interval 3600 and --max-repo-size 1 so that nothing else is
gossiped meanwhile: no periodic re-announcement, and the repositories are not fetched (a node
holding a new mirror re-announces). Prints a Markdown report. Every daemon it started is stopped
on exit (also on SIGINT/SIGTERM); their pids are written to WORKDIR/pids so the calling shell can
clean up too. Nothing leaves 127.0.0.1: every daemon listens on and announces 127.0.0.1:PORT,
and the overlay is checked.
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
        keys = ("sent", "catchup", "relayed", "received", "duplicates", "accepted", "grafts", "prunes",
                "ihave_frames", "ihave_ids", "graft_replies", "eager_peers")
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
        self.warm = rng.randrange(a.n)
        self.origin = rng.choice([i for i in range(a.n) if i != self.warm])
        self.log(f"{a.n} identities; starting daemons (warm-up from n{self.warm}, "
                 f"measured announcement from n{self.origin})")
        pidfile = open(self.work / "pids", "w")
        self.t_start = time.monotonic()
        for nd in self.nodes:
            argv = [self.megaengined, "--root", nd["root"], "--addr", nd["addr"],
                    "--alias", f"n{nd['i']}", "--gossip-interval", a.interval,
                    "--max-outbound", a.max_outbound, "--max-repo-size", "1",
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

    def settle_counters(self, quiet_s=2.0):
        """Waits until no gossip counter moves for quiet_s (IHAVE batches and GRAFT timeouts
        are well under that); returns the summed counters."""
        last, since, t0 = None, time.monotonic(), time.monotonic()
        while True:
            c = self.gossip_counters()
            if c != last:
                last, since = c, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                return c
            if time.monotonic() - t0 > 120:
                raise SystemExit(f"gossip counters still moving after 120 s: {c}")
            time.sleep(0.1)

    def new_project(self, name):
        a = self.args
        gitdir = self.work / name
        gitdir.mkdir()
        g = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
        self.run(g + ["init", "-q", "-b", "main", gitdir])
        for k in range(3):
            (gitdir / "file.txt").write_text(f"bench {a.seed} {name} line {k}\n")
            self.run(g + ["-C", gitdir, "add", "file.txt"])
            self.run(g + ["-C", gitdir, "commit", "-q", "-m", f"commit {k}"])
        self.run(g + ["-C", gitdir, "tag", "v1"])
        return gitdir

    def announce(self, origin, name, dbs):
        """repo.add on origin; returns (repository id, {node: seconds until it listed it})."""
        a = self.args
        gitdir = self.new_project(name)
        t0 = time.monotonic()
        rid = self.conns[origin].request(
            "repo.add", {"path": str(gitdir), "description": "gossip bench"})["id"]
        seen = {origin: 0.0}
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
        return rid, seen

    def measure(self):
        dbs = [sqlite3.connect(f"file:{nd['root'] / 'megaengine.db'}?mode=ro", uri=True,
                               timeout=5) for nd in self.nodes]
        for db in dbs:  # warm: schema read, WAL index mapped
            db.execute("SELECT count(*) FROM repos").fetchone()
        if self.gossip_counters() is None or "eager_peers" not in self.gossip_counters():
            raise SystemExit("node.status has no tree counters: not a Plumtree build")
        self.settle_counters()
        # Warm-up: the first announcement prunes the redundant links; every node's sync plane
        # then dials the announcer (new links start eager), so a second one prunes those.
        self.warm_times = []
        for k in range(2):
            _, seen = self.announce(self.warm, f"warm-up-{k}", dbs)
            self.warm_times.append(max(seen.values()))
            self.settle_counters()
        self.overlay()
        c0 = self.settle_counters()
        self.eager_links = c0["eager_peers"] / 2
        rid, seen = self.announce(self.origin, "measured", dbs)
        t_all = max(seen.values())  # when the last node was seen with it
        slow = sorted(seen.items(), key=lambda kv: -kv[1])[:3]
        self.log("slowest arrivals: " + ", ".join(f"n{i} {t * 1000:.0f} ms" for i, t in slow))
        c1 = self.settle_counters()
        for db in dbs:
            db.close()
        self.rid, self.seen, self.t_all = rid, seen, t_all
        self.delta = {k: c1[k] - c0[k] for k in c0}
        # Every node lists it through the protocol: the origin as its own, the others as an
        # external repository they hold no mirror of (--max-repo-size 1 refuses the fetch).
        for i, res in enumerate(self.all_request("repo.list")):
            r = {x["id"]: x for x in res["repos"]}.get(rid)
            mine = i == self.origin
            if (r is None or r["mine"] is not mine or r["is_external"] is mine or
                    (r["state"] == "up to date") is not mine or
                    r["creator"] != self.nodes[self.origin]["did"]):
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
                 f"{a.interval}, --max-outbound {a.max_outbound}, --max-repo-size 1; bootstrap "
                 f"topology: node i dials 1-2 random earlier nodes ({boot_edges} bootstrap "
                 f"links); repository added on n{self.origin}; every node's catalogue polled "
                 f"every {a.poll_ms} ms.")
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
        d = self.delta
        full = d["sent"] - d["catchup"]
        msgs = full + d["grafts"]
        ok_t = self.t_all < 3.0
        ok_m = msgs <= 2 * (n - 1)
        L.append(f"| eager links (the tree) before the measured announcement | "
                 f"{self.eager_links:g} (N − 1 = {n - 1}) |")
        L.append(f"| warm-up announcements from n{self.warm}: on every node after | "
                 + " / ".join(f"{t * 1000:.0f} ms" for t in self.warm_times) + " |")
        L.append(f"| **repo listed on every node** (target < 3 s) | **{self.t_all * 1000:.0f} ms**"
                 f" {'PASS' if ok_t else 'FAIL'} |")
        L.append(f"| arrival, median / p90 of the other nodes | "
                 f"{statistics.median(times) * 1000:.0f} ms / "
                 f"{times[max(0, int(round(0.9 * len(times))) - 1)] * 1000:.0f} ms |")
        L.append(f"| **messages for the announcement** (full frames + GRAFTs; target ≤ 2 (N − 1)"
                 f" = {2 * (n - 1)}) | **{msgs}** ({full} full, {d['grafts']} GRAFT; "
                 f"{msgs / (n - 1):.2f} × (N − 1)) {'PASS' if ok_m else 'FAIL'} |")
        L.append(f"| flooding the same overlay, 2E − (N − 1) | {flood} "
                 f"({flood / (n - 1):.2f} × (N − 1)) |")
        L.append(f"| lazy IHAVE digests in the same window | {d['ihave_frames']} frames, "
                 f"{d['ihave_ids']} ids ({d['ihave_ids'] * 34} bytes of ids) |")
        L.append(f"| PRUNE / GRAFT answered / duplicates received | {d['prunes']} / "
                 f"{d['graft_replies']} / {d['duplicates']} |")
        L.append(f"| not counted: node announcements sent on links that came up | "
                 f"{d['catchup']} (the sync planes dial the origin to fetch) |")
        r = sorted(self.rss_mib)
        L.append(f"| idle RSS per daemon, min / median / max | {r[0]:.1f} / "
                 f"{statistics.median(r):.1f} / {r[-1]:.1f} MiB (sum {sum(r):.0f} MiB) |")
        L.append("")
        L.append(f"Messages: every full announcement frame any node sent in the window (the "
                 f"origin's, relays, GRAFT answers) plus every GRAFT (not the node announcement "
                 f"a node sends on a link that comes up); the window runs from "
                 f"counters at rest to counters at rest (2 s without change), with nothing else "
                 f"gossiped (--gossip-interval 3600, --max-repo-size 1). The IHAVE digests (ids "
                 f"batched per lazy link every 150 ms) are the tree's repair channel: "
                 f"at most one id per lazy link and direction.")
        self.ok = ok_t and ok_m
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
    ap.add_argument("-n", type=int, default=50, help="number of daemons (default 50)")
    ap.add_argument("--seed", type=int, default=1, help="topology seed (default 1)")
    ap.add_argument("--interval", type=int, default=3600,
                    help="--gossip-interval (default 3600: no re-announcement meanwhile)")
    ap.add_argument("--max-outbound", type=int, default=8, help="--max-outbound (default 8)")
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
    sys.exit(0 if b.ok else 1)


if __name__ == "__main__":
    main()
