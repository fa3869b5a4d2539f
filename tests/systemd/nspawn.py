"""Booted-systemd test machinery: a cached Debian root (debootstrap), a fresh copy per run with
the project installed into it (meson install --destdir), and a container booted from it with
systemd-nspawn, plus a way to run commands inside that needs neither systemd as PID 1 on the host
nor systemd-machined (nsenter into the container's init).

Layout under build/:
    nspawn/rootfs/          the cached Debian root (debootstrap --variant=minbase), never booted
    nspawn/rootfs.stamp     its cache key: suite, mirror, package list, CACHE_VERSION
    nspawn/debootstrap.log  the last debootstrap's output
    nspawn/run-PID/NAME     a container's copy of the root, the project installed; removed at
                            the end (kept with ME_NSPAWN_KEEP=1)
    nspawn/NAME.console.log the last container NAME's console (boot and shutdown messages)
    nspawn/NAME.journal.txt its whole journal, read from its persistent journal after power-off
    nspawn-build/           the meson build dir configured for the image (--prefix=/usr)

The Debian release of the image is the host's own (the binaries are built on the host and link
its libraries); the mirror is the one the host's apt sources use for that release
(ME_DEBIAN_MIRROR overrides). The runtime packages are a fixed list plus the packages that own
the shared libraries the built binaries load (dpkg -S of their ldd output), so a new library
dependency changes the cache key and rebuilds the root.

No pytest dependency: conftest.py drives this module.
"""
import fcntl
import glob
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[2]
BUILD = REPO_DIR / "build"
NSPAWN_DIR = BUILD / "nspawn"
CACHE_ROOT = NSPAWN_DIR / "rootfs"
CACHE_STAMP = NSPAWN_DIR / "rootfs.stamp"
IMAGE_BUILD = BUILD / "nspawn-build"
DEPS_PKGCONFIG = BUILD / "deps" / "prefix" / "lib" / "pkgconfig"

DEBOOTSTRAP_TIMEOUT = 1200  # seconds; it takes about 2 minutes

# Bump to force a rebuild of the cached root when the way it is made changes.
CACHE_VERSION = "1"

# What the image has besides the project: an init, a bus, git (repositories to publish), ps, and
# the project's runtime libraries (completed from the built binaries, see runtime_packages()).
BASE_PACKAGES = [
    "systemd", "systemd-sysv", "dbus", "git", "ca-certificates", "procps",
    "libuv1", "libsqlite3-0", "libgit2-1.5", "libsodium23", "libmsgpackc2", "libsystemd0",
    "libjansson4", "libinih1",
]

INSIDE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_progress = None
_t0 = time.monotonic()


def set_progress(fn):
    """fn(str) shows a progress line to the person waiting (conftest passes one that bypasses
    pytest's output capture)."""
    global _progress
    _progress = fn


def progress(msg):
    line = f"[nspawn {time.monotonic() - _t0:6.1f}s] {msg}"
    if _progress:
        _progress(line)
    else:
        print(line, file=sys.stderr, flush=True)


class SetupError(Exception):
    """Preparing or booting the container failed; the message says what and shows the log."""


def _tail(path, n=60):
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError as e:
        return f"(cannot read {path}: {e})"
    return "\n".join("  | " + ln for ln in lines[-n:])


def _run_logged(cmd, log, what, env=None, timeout=1800):
    """Runs cmd with its output appended to log; raises SetupError with the log's tail if it
    fails."""
    with open(log, "a") as f:
        f.write(f"+ {shlex.join(str(c) for c in cmd)}\n")
        f.flush()
        try:
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout,
                               stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise SetupError(f"{what}: timed out after {timeout}s; log {log}:\n{_tail(log)}")
        except OSError as e:
            raise SetupError(f"{what}: cannot run {cmd[0]}: {e}")
    if r.returncode != 0:
        raise SetupError(f"{what}: exit status {r.returncode}; log {log}:\n{_tail(log)}")


# --- the host's Debian release and mirror ---------------------------------------------------------

def host_codename():
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip().strip('"')
    raise SetupError("cannot tell the host's Debian release: no VERSION_CODENAME in /etc/os-release")


def _apt_entries():
    """(types, uris, suites, components, options) for every enabled entry of the host's apt
    sources, deb822 (*.sources) and one-line (sources.list, *.list) alike."""
    files = ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")) + \
        sorted(glob.glob("/etc/apt/sources.list.d/*.sources"))
    for fn in files:
        try:
            text = Path(fn).read_text()
        except OSError:
            continue
        if fn.endswith(".sources"):
            stanzas, cur, last = [], {}, None
            for line in text.splitlines() + [""]:
                if line.lstrip().startswith("#"):
                    continue
                if not line.strip():
                    if cur:
                        stanzas.append(cur)
                    cur, last = {}, None
                elif line[0] in " \t":
                    if last:
                        cur[last] += " " + line.strip()
                elif ":" in line:
                    k, v = line.split(":", 1)
                    last = k.strip().lower()
                    cur[last] = v.strip()
            for s in stanzas:
                if s.get("enabled", "yes").lower() in ("no", "false"):
                    continue
                yield (s.get("types", "").split(), s.get("uris", "").split(),
                       s.get("suites", "").split(), s.get("components", "").split(),
                       {"signed-by": s.get("signed-by", "")})
        else:
            for line in text.splitlines():
                line = line.split("#", 1)[0].strip()
                if not re.match(r"^(deb|deb-src)\s", line):
                    continue
                opts = {}
                m = re.search(r"\[([^]]*)\]", line)
                if m:
                    for o in m.group(1).split():
                        if "=" in o:
                            k, v = o.split("=", 1)
                            opts[k] = v
                    line = line[:m.start()] + " " + line[m.end():]
                w = line.split()
                if len(w) >= 3:
                    yield [w[0]], [w[1]], [w[2]], w[3:], opts


def debian_mirror(codename):
    """(uri, keyring or None) of the host's apt source for `codename` itself (main component)."""
    if os.environ.get("ME_DEBIAN_MIRROR"):
        return os.environ["ME_DEBIAN_MIRROR"], None
    for types, uris, suites, comps, opts in _apt_entries():
        if "deb" in types and codename in suites and "main" in comps and uris:
            key = opts.get("signed-by", "").split(",")[0].strip() or None
            if key and not key.startswith("/"):  # an inline key block: use the default keyring
                key = None
            return uris[0], key
    raise SetupError(f"no apt source for '{codename}' (component main) in /etc/apt: cannot "
                     "tell which mirror to debootstrap from (set ME_DEBIAN_MIRROR)")


# --- building the project for the image -----------------------------------------------------------

def build_env():
    env = dict(os.environ)
    pc = env.get("PKG_CONFIG_PATH", "")
    if str(DEPS_PKGCONFIG) not in pc.split(":"):
        env["PKG_CONFIG_PATH"] = str(DEPS_PKGCONFIG) + (":" + pc if pc else "")
    return env


def build_project():
    """Configures (once) and builds build/nspawn-build with the prefix of a packaged install."""
    log = BUILD / "nspawn-build.log"
    log.write_text("")
    if not (IMAGE_BUILD / "build.ninja").exists():
        progress("configuring build/nspawn-build (--prefix=/usr --sysconfdir=/etc)")
        shutil.rmtree(IMAGE_BUILD, ignore_errors=True)
        _run_logged(["meson", "setup", str(IMAGE_BUILD), "--prefix=/usr", "--sysconfdir=/etc",
                     "--localstatedir=/var", "--buildtype=debugoptimized"], log,
                    "meson setup build/nspawn-build", env=build_env())
    progress("building build/nspawn-build")
    _run_logged(["ninja", "-C", str(IMAGE_BUILD)], log, "ninja -C build/nspawn-build",
                env=build_env())


def built_binaries():
    out = []
    for rel in ("daemon/megaengined", "client/mectl"):
        p = IMAGE_BUILD / rel
        if p.exists():
            out.append(p)
    return out


def runtime_packages():
    """BASE_PACKAGES plus the Debian packages owning the shared libraries the built binaries
    load."""
    pkgs = set(BASE_PACKAGES)
    libs = set()
    for b in built_binaries():
        r = subprocess.run(["ldd", str(b)], capture_output=True, text=True)
        for line in r.stdout.splitlines():
            m = re.search(r"=>\s+(/\S+)", line) or re.match(r"\s*(/\S+)\s+\(", line)
            if m:
                libs.add(m.group(1))
    for lib in sorted(libs):
        cands = [lib, os.path.realpath(lib)]
        for c in list(cands):  # merged /usr: dpkg may know either spelling
            if c.startswith("/usr/"):
                cands.append(c[4:])
            else:
                cands.append("/usr" + c)
        for c in cands:
            r = subprocess.run(["dpkg", "-S", c], capture_output=True, text=True)
            if r.returncode == 0:
                for owner in r.stdout.split(":", 1)[0].split(","):
                    pkgs.add(owner.strip().split(":")[0])
                break
        else:
            progress(f"warning: no Debian package owns {lib} (the image may lack it)")
    return sorted(pkgs)


# --- the cached root --------------------------------------------------------------------------------

def _cache_key(codename, mirror, packages):
    h = hashlib.sha256()
    for part in (CACHE_VERSION, codename, mirror, *packages):
        h.update(part.encode() + b"\0")
    return h.hexdigest()


def ensure_cached_root(packages):
    """Builds build/nspawn/rootfs with debootstrap unless the stamp says it is current."""
    codename = host_codename()
    mirror, keyring = debian_mirror(codename)
    key = _cache_key(codename, mirror, packages)
    NSPAWN_DIR.mkdir(parents=True, exist_ok=True)
    with open(NSPAWN_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be building it: wait, then look
        if CACHE_ROOT.is_dir() and CACHE_STAMP.exists() and \
                CACHE_STAMP.read_text().split("\n")[0] == key:
            progress(f"cached Debian root is current ({CACHE_ROOT.relative_to(REPO_DIR)})")
            return
        if shutil.which("debootstrap") is None:
            raise SetupError("debootstrap is not installed (scripts/setup.sh installs it)")
        new = NSPAWN_DIR / "rootfs.new"
        shutil.rmtree(new, ignore_errors=True)
        shutil.rmtree(CACHE_ROOT, ignore_errors=True)
        CACHE_STAMP.unlink(missing_ok=True)
        log = NSPAWN_DIR / "debootstrap.log"
        cmd = ["debootstrap", "--variant=minbase", "--components=main",
               "--include=" + ",".join(packages)]
        if keyring:
            cmd.append("--keyring=" + keyring)
        cmd += [codename, str(new), mirror]
        progress(f"building the Debian {codename} root with debootstrap from {mirror} "
                 f"(first run only; a few minutes; log {log.relative_to(REPO_DIR)})")
        t = time.monotonic()
        with open(log, "w") as f:
            f.write(f"+ {shlex.join(cmd)}\n")
            f.flush()
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 stdin=subprocess.DEVNULL)
            guard = threading.Timer(DEBOOTSTRAP_TIMEOUT, p.kill)  # a mirror that hangs
            guard.start()
            # One line per phase, and one every 20 s within a long phase.
            phases = {"Retrieving": "downloading", "Validating": "downloading",
                      "Extracting": "extracting", "Installing": "installing",
                      "Unpacking": "installing", "Configuring": "installing"}
            phase, count, last_shown = "", 0, 0.0
            for line in p.stdout:
                f.write(line)
                m = re.match(r"I: (\w+) (.*)", line)
                if not m or phases.get(m.group(1), "done") == "done":
                    continue
                count += 1
                if phases[m.group(1)] != phase:
                    phase, count = phases[m.group(1)], 1
                elif time.monotonic() - last_shown < 20:
                    continue
                last_shown = time.monotonic()
                progress(f"debootstrap: {phase} ({count} steps so far: {m.group(1)} "
                         f"{m.group(2).strip()})")
            rc = p.wait()
            guard.cancel()
        if rc != 0:
            how = f"killed after {DEBOOTSTRAP_TIMEOUT}s" if rc == -signal.SIGKILL else \
                f"exit status {rc}"
            raise SetupError(f"debootstrap failed ({how}); log {log}:\n{_tail(log)}")
        # Smaller and neutral: no downloaded .debs, no host name or machine id of the builder
        # (each run writes its own machine id).
        for f in glob.glob(str(new / "var/cache/apt/archives/*.deb")) + \
                glob.glob(str(new / "var/cache/apt/*.bin")):
            os.unlink(f)
        (new / "etc/hostname").write_text("megaengine-test\n")
        (new / "etc/hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\tmegaengine-test\n"
                                       "::1\tlocalhost ip6-localhost ip6-loopback\n")
        (new / "etc/machine-id").write_text("")
        new.rename(CACHE_ROOT)
        CACHE_STAMP.write_text(f"{key}\n{codename} {mirror}\n{' '.join(packages)}\n")
        progress(f"Debian root ready in {time.monotonic() - t:.0f}s "
                 f"({_du(CACHE_ROOT)} MB, cached for the next runs)")


def _du(path):
    r = subprocess.run(["du", "-sm", str(path)], capture_output=True, text=True)
    return r.stdout.split()[0] if r.returncode == 0 and r.stdout else "?"


def cleanup_stale_runs():
    """Removes run directories and network namespaces left by runs whose process is gone (a
    killed pytest)."""
    for d in NSPAWN_DIR.glob("run-*"):
        try:
            pid = int(d.name.split("-", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)
    for ns in glob.glob("/run/netns/me-*-[ab]-*"):  # NetPair's, see there
        try:
            pid = int(ns.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            subprocess.run(["ip", "netns", "del", os.path.basename(ns)], capture_output=True)


def make_run_root(name):
    """A fresh copy of the cached root for this run: build/nspawn/run-PID/<name>."""
    run_dir = NSPAWN_DIR / f"run-{os.getpid()}"
    root = run_dir / name
    shutil.rmtree(root, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    r = subprocess.run(["cp", "-a", "--reflink=auto", str(CACHE_ROOT), str(root)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SetupError(f"copying the cached root failed: {r.stderr.strip()}")
    (root / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
    (root / "etc/hostname").write_text(name + "\n")
    progress(f"copied the cached root to {root.relative_to(REPO_DIR)} in "
             f"{time.monotonic() - t:.1f}s")
    return root


def install_project(root):
    """meson install --destdir root (the binaries, units, sysusers.d entry, config, man pages)."""
    log = BUILD / "nspawn-install.log"
    log.write_text("")
    _run_logged(["meson", "install", "-C", str(IMAGE_BUILD), "--no-rebuild", "--destdir",
                 str(root)], log, "meson install --destdir", env=build_env())
    installed = []
    for line in log.read_text().splitlines():
        m = re.match(r"Installing \S+ to (\S+)", line)
        if m:
            installed.append(m.group(1))
    progress(f"installed the project into the root ({len(installed)} files; log "
             f"{log.relative_to(REPO_DIR)})")
    return log.read_text()


def enable_units(root, units):
    """systemctl --root: enable units in the image before it boots (what an admin would do)."""
    r = subprocess.run(["systemctl", "--root", str(root), "enable", *units], capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise SetupError(f"systemctl --root enable {' '.join(units)}: {r.stderr.strip()}")
    progress(f"enabled {' '.join(units)} in the image")


def _die_with_parent():
    """In the child before exec: SIGTERM when the parent (pytest) dies."""
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


# --- a booted container -------------------------------------------------------------------------

class Container:
    """A container booted with systemd-nspawn -b from `root`. run() executes a command inside
    (nsenter into the container's init: all its namespaces and its root), as root or as a user
    (setpriv, the user's groups from the container's /etc/group)."""

    def __init__(self, root, name, extra_args=()):
        self.root = Path(root)
        self.name = name
        self.extra_args = list(extra_args)
        self.console_log = self.root.parent / f"{name}.console.log"
        self.proc = None
        self.leader = None

    # ---- life cycle ----

    def boot(self, timeout=120):
        if shutil.which("systemd-nspawn") is None:
            raise SetupError("systemd-nspawn is not installed (package systemd-container; "
                             "scripts/setup.sh installs it)")
        cmd = ["systemd-nspawn", "--register=no", "--keep-unit", "--console=read-only",
               "--machine", self.name, "--directory", str(self.root), *self.extra_args, "--boot"]
        progress(f"booting: {shlex.join(cmd)}")
        t = time.monotonic()
        self._log = open(self.console_log, "w")
        # Own session: a Ctrl-C on the terminal reaches pytest (which powers the container off
        # in its teardown), not systemd-nspawn. If pytest dies without a teardown, the kernel
        # sends systemd-nspawn SIGTERM, its request for a clean shutdown.
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while self.leader is None:
            if self.proc.poll() is not None:
                raise SetupError(f"systemd-nspawn exited with status {self.proc.returncode} "
                                 f"before the container booted; console:\n"
                                 f"{_tail(self.console_log)}")
            if time.monotonic() > deadline:
                raise SetupError(f"no container init under systemd-nspawn (pid {self.proc.pid}) "
                                 f"after {timeout}s; console:\n{_tail(self.console_log)}")
            self.leader = self._find_leader()
            if self.leader is None:
                time.sleep(0.1)
        state = ""
        while True:
            r = self.run(["systemctl", "is-system-running"], timeout=30)
            state = r.stdout.strip()
            if state in ("running", "degraded"):
                break
            if self.proc.poll() is not None:
                raise SetupError(f"the container stopped while booting (status "
                                 f"{self.proc.returncode}); console:\n{_tail(self.console_log)}")
            if time.monotonic() > deadline:
                jobs = self.run(["systemctl", "list-jobs", "--no-pager"]).stdout
                raise SetupError(f"the container's systemd is '{state}' after {timeout}s; jobs:\n"
                                 f"{jobs}\nconsole:\n{_tail(self.console_log)}")
            time.sleep(0.2)
        self.boot_seconds = time.monotonic() - t
        self.boot_state = state
        progress(f"container {self.name} booted in {self.boot_seconds:.1f}s (leader pid "
                 f"{self.leader}, system {state})")

    def _find_leader(self):
        """The container's PID 1 seen from the host: a child of systemd-nspawn running systemd."""
        try:
            kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return None
        for k in kids:
            try:
                comm = Path(f"/proc/{k}/comm").read_text().strip()
                exe = os.readlink(f"/proc/{k}/exe")
            except OSError:
                continue
            if comm in ("systemd", "init") and "systemd" in exe:
                return int(k)
        return None

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def poweroff(self, timeout=60):
        """systemctl poweroff inside; SIGTERM (nspawn's clean shutdown request), then SIGKILL if
        that does not end it. Returns nspawn's exit status."""
        if self.proc is None:
            return None
        if self.alive() and self.leader:
            self.run(["systemctl", "--no-block", "poweroff"], timeout=15)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                progress("container did not power off in time: SIGTERM to systemd-nspawn")
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            if self.proc.poll() is not None:
                break
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:  # cannot happen after SIGKILL, but never hang
            self.proc.wait()
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode

    # ---- commands inside ----

    def run(self, cmd, user=None, timeout=60, input=None, env=None):
        """Runs cmd (argv list, or a str for sh -c) inside the container; returns a
        CompletedProcess with text stdout/stderr. Never raises for a non-zero exit."""
        if isinstance(cmd, str):
            cmd = ["sh", "-c", cmd]
        extra = [f"{k}={v}" for k, v in (env or {}).items()]
        argv = ["nsenter", "--target", str(self.leader), "--all", "--"]
        if user is None:
            argv += ["env", "-i", f"PATH={INSIDE_PATH}", "HOME=/root", "USER=root",
                     "LANG=C.UTF-8", "TERM=dumb", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0", *extra]
        else:
            argv += ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups",
                     "--reset-env", "--", "env", f"PATH={INSIDE_PATH}", "LANG=C.UTF-8",
                     "TERM=dumb", "SYSTEMD_PAGER=", *extra]
        argv += cmd
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                  input=input, stdin=None if input is not None else
                                  subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else \
                (e.stdout or "")
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else \
                (e.stderr or "")
            return subprocess.CompletedProcess(argv, 124, out, err + f"\n(timed out after "
                                               f"{timeout}s: {shlex.join(cmd)})")

    def check(self, cmd, user=None, timeout=60, input=None, env=None):
        """run() that raises AssertionError with the command's output unless it exits 0."""
        r = self.run(cmd, user=user, timeout=timeout, input=input, env=env)
        if r.returncode != 0:
            who = f" (as {user})" if user else ""
            raise AssertionError(f"inside the container{who}: {cmd!r} exited {r.returncode}\n"
                                 f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}")
        return r

    def prop(self, unit, name):
        """systemctl show -p NAME --value UNIT."""
        return self.run(["systemctl", "show", "-p", name, "--value", unit]).stdout.strip()

    def journal_json(self, *args):
        r = self.run(["journalctl", "-o", "json", "--no-pager", *args], timeout=60)
        out = []
        for line in r.stdout.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def diagnostics(self, units=("megaengined.service", "megaengined.socket"), lines=60):
        if not self.alive() or not self.leader:
            return f"(container not running; console:)\n{_tail(self.console_log, lines)}"
        parts = []
        r = self.run(["systemctl", "status", "--no-pager", "-l", "--lines=0", *units])
        parts.append("$ systemctl status " + " ".join(units) + "\n" + r.stdout + r.stderr)
        r = self.run(["journalctl", "-b", "--no-pager", "-o", "short-precise", "-n", str(lines)])
        parts.append(f"$ journalctl -b -n {lines}\n" + r.stdout + r.stderr)
        return "\n".join(parts)


RUNNING = []  # booted containers, for the failure diagnostics


def retire(box):
    """Saves the container's journal and console, powers it off, removes its root."""
    if box in RUNNING:
        RUNNING.remove(box)
    if getattr(box, "retired", False):
        return
    box.retired = True
    try:
        box.poweroff()
        journal = box.root / "var/log/journal"
        if journal.is_dir():  # the container's persistent journal, shutdown included
            r = subprocess.run(["journalctl", "-D", str(journal), "--no-pager", "-o",
                                "short-precise"], capture_output=True, text=True)
            (NSPAWN_DIR / f"{box.name}.journal.txt").write_text(r.stdout + r.stderr)
        if box.console_log.exists():
            shutil.copy(box.console_log, NSPAWN_DIR / f"{box.name}.console.log")
    finally:
        if not os.environ.get("ME_NSPAWN_KEEP"):
            shutil.rmtree(box.root, ignore_errors=True)


# --- a private network between containers -----------------------------------------------------------

class NetPair:
    """Two network namespaces joined by a veth pair and nothing else (no route to the host or
    anywhere): the containers booted in them (--network-namespace-path) reach each other at
    ADDR_A and ADDR_B, and have their own loopback. Removed by close()."""

    ADDR_A = "10.231.0.1"
    ADDR_B = "10.231.0.2"

    def __init__(self, tag):
        self.ns = [f"me-{tag}-a-{os.getpid()}", f"me-{tag}-b-{os.getpid()}"]
        self.made = []
        try:
            for ns in self.ns:
                self._ip("netns", "add", ns)
                self.made.append(ns)
            self._ip("link", "add", "mesh0", "netns", self.ns[0], "type", "veth", "peer", "name",
                     "mesh0", "netns", self.ns[1])
            for ns, addr in zip(self.ns, (self.ADDR_A, self.ADDR_B)):
                self._ip("-n", ns, "addr", "add", addr + "/24", "dev", "mesh0")
                self._ip("-n", ns, "link", "set", "lo", "up")
                self._ip("-n", ns, "link", "set", "mesh0", "up")
        except SetupError:
            self.close()
            raise

    @staticmethod
    def _ip(*args):
        r = subprocess.run(["ip", *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise SetupError(f"ip {' '.join(args)}: {r.stderr.strip()}")

    def path(self, i):
        return f"/run/netns/{self.ns[i]}"

    def close(self):
        for ns in self.made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.made = []
