#!/usr/bin/python3
"""Generates a synthetic git history for bench/sync.sh, fast, through `git fast-import`.

The history looks like a busy project: 200 text files in 10 directories, every commit edits 2-3
of them (a few lines replaced, inserted or removed), authors and dates vary. main carries most
commits; feature branches fork off it, get a run of commits and are merged back with merge
commits; develop, release/1.x, feature/search and feature/ui stay open at the end. Every tenth of
the history gets an annotated tag v0.N on main, and a few lightweight tags sit on the other
branches. The result is repacked from scratch (`git repack -adf`: deltas recomputed, as a
project's own gc would leave it) and its refs packed, so it is one pack of a few MB. It is a bare
repository, so git writes the pack's reachability bitmap too, as its gc does there.

Deterministic for a given (commits, seed): the same stream, hence the same object ids.

    genrepo.py OUT.git [--commits N] [--seed S]
"""
import argparse
import os
import random
import shutil
import subprocess
import sys
import time

GEN_VERSION = 1  # bump when the generated history changes (the cache key includes it)
DIRS = 10
FILES_PER_DIR = 20
KEEP = ("develop", "release/1.x", "feature/search", "feature/ui")
AUTHORS = [("Ada Lovelace", "ada"), ("Alan Turing", "alan"), ("Grace Hopper", "grace"),
           ("Ken Thompson", "ken"), ("Dennis Ritchie", "dmr"), ("Barbara Liskov", "liskov"),
           ("Edsger Dijkstra", "ewd"), ("Frances Allen", "fran"), ("John Backus", "backus"),
           ("Margaret Hamilton", "margaret"), ("Niklaus Wirth", "wirth"),
           ("Radia Perlman", "radia")]


class Gen:
    def __init__(self, commits, seed, out):
        self.n = commits
        self.rng = random.Random(seed)
        self.out = out
        self.mark = 0
        self.t = 1420070400  # 2015-01-01
        syl = ["ka", "lo", "mi", "ne", "su", "ra", "te", "vo", "zi", "pa", "qu", "de", "fo",
               "gi", "ju", "ba", "ce", "xo", "ly", "wa", "str", "nt", "ck", "ing", "ion"]
        self.words = sorted({"".join(self.rng.choice(syl) for _ in range(self.rng.randint(1, 4)))
                             for _ in range(3000)})
        self.paths = [f"mod{d:02d}/file{f:02d}.txt" for d in range(DIRS)
                      for f in range(FILES_PER_DIR)]

    # ---- content ----

    def line(self):
        r = self.rng
        ind = "\t" * r.randint(0, 3)
        return ind + " ".join(r.choice(self.words) for _ in range(r.randint(2, 9)))

    def edit(self, lines):
        r = self.rng
        for _ in range(r.randint(1, 3)):
            op = r.random()
            i = r.randrange(len(lines) + 1)
            if op < 0.5 and lines:
                lines[min(i, len(lines) - 1)] = self.line()
            elif op < 0.85 or len(lines) < 20:
                lines.insert(i, self.line())
            elif len(lines) > 20:
                del lines[min(i, len(lines) - 1)]
        while len(lines) > 90:
            del lines[self.rng.randrange(len(lines))]

    # ---- stream ----

    def w(self, s):
        self.out.write(s.encode() if isinstance(s, str) else s)

    def data(self, b):
        self.w(f"data {len(b)}\n")
        self.w(b)
        self.w("\n")

    def commit(self, branch, state, parent, merge=None, changed=None, msg=None):
        """Writes one commit on branch; state is the branch's {path: lines}. Edits 2-3 files
        (or writes exactly `changed` from state for a merge). Returns its mark."""
        r = self.rng
        self.mark += 1
        self.t += r.randint(300, 30000)
        name, login = r.choice(AUTHORS)
        if changed is None:
            changed = r.sample(self.paths, r.randint(2, 3))
            for p in changed:
                self.edit(state[p])
        if msg is None:
            area = changed[0].split("/")[0]
            msg = f"{area}: {' '.join(r.choice(self.words) for _ in range(r.randint(3, 8)))}"
            if r.random() < 0.3:
                msg += "\n\n" + "\n".join(self.line().strip() for _ in range(r.randint(1, 4)))
        self.w(f"commit refs/heads/{branch}\nmark :{self.mark}\n")
        self.w(f"author {name} <{login}@example.org> {self.t} +0000\n")
        self.w(f"committer {name} <{login}@example.org> {self.t} +0000\n")
        self.data((msg + "\n").encode())
        if parent is not None:
            self.w(f"from :{parent}\n")
        if merge is not None:
            self.w(f"merge :{merge}\n")
        for p in changed:
            self.w(f"M 100644 inline {p}\n")
            self.data(("\n".join(state[p]) + "\n").encode())
        self.w("\n")
        return self.mark

    def tag(self, name, mark, msg):
        name_, login = self.rng.choice(AUTHORS)
        self.w(f"tag {name}\nfrom :{mark}\n")
        self.w(f"tagger {name_} <{login}@example.org> {self.t} +0000\n")
        self.data((msg + "\n").encode())

    def run(self):
        r = self.rng
        main = {p: [self.line() for _ in range(r.randint(20, 60))] for p in self.paths}
        tip = self.commit("main", main, None, changed=list(self.paths), msg="initial import")
        done = 1
        branches = {}  # name -> [state, tip, fork_changed set]
        kept_start = {b: int(self.n * f) for b, f in zip(KEEP, (0.55, 0.7, 0.8, 0.9))}
        next_tag = self.n // 10
        ntag = 1
        feat = 0
        while done < self.n:
            # Keep-open branches fork at their point and get a commit now and then.
            for b, at in kept_start.items():
                if done >= at and b not in branches:
                    branches[b] = [{p: list(v) for p, v in main.items()}, tip, set()]
            if branches and r.random() < 0.12:
                b = r.choice(sorted(branches))
                st = branches[b]
                before = {p: list(v) for p, v in st[0].items()}
                st[1] = self.commit(b, st[0], st[1])
                st[2].update(p for p in self.paths if st[0][p] != before[p])
                done += 1
                continue
            # Now and then a short-lived feature branch, merged back into main.
            if r.random() < 0.004 and done + 40 < self.n:
                feat += 1
                name = f"topic/t{feat}"
                st = {p: list(v) for p, v in main.items()}
                ft = tip
                changed = set()
                for _ in range(r.randint(5, 30)):
                    before = {p: list(st[p]) for p in self.paths}
                    ft = self.commit(name, st, ft)
                    changed.update(p for p in self.paths if st[p] != before[p])
                    done += 1
                for p in changed:
                    main[p] = list(st[p])
                tip = self.commit("main", main, tip, merge=ft, changed=sorted(changed),
                                  msg=f"Merge branch '{name}'")
                done += 1
                # gone again, as a merged topic branch is deleted
                self.w(f"reset refs/heads/{name}\nfrom {'0' * 40}\n\n")
                continue
            tip = self.commit("main", main, tip)
            done += 1
            if done >= next_tag and ntag < 10:
                self.tag(f"v0.{ntag}", tip, f"Release 0.{ntag}")
                ntag += 1
                next_tag += self.n // 10
        for i, (b, st) in enumerate(sorted(branches.items())):
            self.w(f"reset refs/tags/{b.replace('/', '-')}-snapshot\nfrom :{st[1]}\n\n")
        self.w("done\n")


def generate(out_dir, commits, seed, log=lambda m: None):
    """Builds the repository at out_dir (bare) by way of a temporary sibling directory."""
    out_dir = os.path.abspath(out_dir)
    tmp = out_dir + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_CONFIG_NOSYSTEM="1", LC_ALL="C")
    # fast-import frees and grows its heap for every blob; glibc's default trimming turns that
    # into ~180k brk calls (30 s of system time here). A top pad keeps it at a few seconds.
    fi_env = dict(env, GLIBC_TUNABLES="glibc.malloc.top_pad=67108864:"
                  "glibc.malloc.trim_threshold=134217728")
    t0 = time.monotonic()
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", tmp], env=env, check=True)
    p = subprocess.Popen(["git", "-C", tmp, "fast-import", "--quiet", "--done",
                          "--active-branches=64"], env=fi_env,
                         stdin=subprocess.PIPE, bufsize=1 << 20)
    try:
        Gen(commits, seed, p.stdin).run()
        p.stdin.close()
    except BrokenPipeError:
        pass
    if p.wait() != 0:
        raise SystemExit(f"git fast-import failed ({p.returncode})")
    t1 = time.monotonic()
    subprocess.run(["git", "-C", tmp, "repack", "-a", "-d", "-f", "-q"], env=env, check=True)
    subprocess.run(["git", "-C", tmp, "pack-refs", "--all"], env=env, check=True)
    subprocess.run(["git", "-C", tmp, "prune"], env=env, check=True)
    log(f"generated {commits} commits in {t1 - t0:.1f} s, repacked in "
        f"{time.monotonic() - t1:.1f} s")
    os.rename(tmp, out_dir)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--commits", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    if os.path.exists(a.out):
        ap.error(f"{a.out} exists")
    generate(a.out, a.commits, a.seed, lambda m: print(m, file=sys.stderr))


if __name__ == "__main__":
    main()
