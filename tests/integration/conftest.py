"""Shared fixtures for the end-to-end tests: real megaengined daemons driven by the real mectl.

Binaries come from $ME_BUILD_DIR (default <repo>/build/release):
    $ME_BUILD_DIR/daemon/megaengined
    $ME_BUILD_DIR/client/mectl

Fixtures
  env            the environment every child process gets: no MEGAENGINE_* variables, HOME in a
                 private temp dir (so ~/.megaengine and ~/.gitconfig are never the real ones)
  daemon_factory start(root=None, extra_args=()) -> Daemon, plus run_daemon()/mectl() helpers
  daemon         one started daemon whose identity exists ('mectl auth init' done)
  git_repo       factory making real git repositories with the git CLI

Every daemon is started with --root <tmp> --addr 127.0.0.1:<free port> --log-level debug, its
stderr goes to a file next to the root, and teardown kills whatever is still running.
"""
import json as jsonlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

REPO_DIR = Path(__file__).resolve().parents[2]
BUILD_DIR = Path(os.environ.get("ME_BUILD_DIR") or REPO_DIR / "build" / "release").resolve()
MEGAENGINED = BUILD_DIR / "daemon" / "megaengined"
MECTL = BUILD_DIR / "client" / "mectl"

SOCKET_NAME = "megaengined.sock"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
CMD_TIMEOUT = 30.0
SANITIZER_MARKERS = ("AddressSanitizer", "LeakSanitizer", "runtime error:")


def sanitizer_report(text):
    """The first sanitizer marker found in text, or None."""
    for m in SANITIZER_MARKERS:
        if m in text:
            return m
    return None


def assert_no_sanitizer(text, what):
    m = sanitizer_report(text)
    assert m is None, f"{what}: sanitizer report ({m}):\n{text}"


def free_port():
    """A UDP port of 127.0.0.1 free at this moment (the daemon listens on UDP: QUIC)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def socket_accepts(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def control_answers(path):
    """Does the daemon answer a request on its control socket? The socket listens before the
    daemon starts its network, and a connection is accepted then (the backlog); an answer
    comes only once the daemon runs."""
    import meclient  # noqa: E402 (tests/integration is on sys.path under pytest)
    try:
        c = meclient.Connection(str(path), timeout=2.0)
    except OSError:
        return False
    try:
        c.request("node.status")
        return True
    except meclient.MeError:
        return True
    except (OSError, ConnectionError, TimeoutError):
        return False
    finally:
        c.close()


def short_tmpdir(prefix):
    """A temp dir with a short path: Unix socket paths are limited to 107 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def run_mectl(args, env, cwd=None, json=False, check=True, timeout=CMD_TIMEOUT):
    """Runs mectl with exactly these arguments (plus --json first when json=True).

    Returns the CompletedProcess (text mode). With json=True, .json holds the parsed stdout
    (None when stdout is not JSON). check=True asserts exit code 0. Sanitizer reports in
    mectl's stderr always fail the test."""
    argv = [str(MECTL)] + (["--json"] if json else []) + [str(a) for a in args]
    r = subprocess.run(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=timeout)
    assert_no_sanitizer(r.stderr, f"mectl {' '.join(argv[1:])}")
    r.json = None
    if json:
        try:
            r.json = jsonlib.loads(r.stdout)
        except ValueError:
            r.json = None
    if check:
        assert r.returncode == 0, (
            f"mectl {' '.join(argv[1:])} exited {r.returncode}\n"
            f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}")
        if json:
            assert r.json is not None, f"mectl --json printed no JSON:\n{r.stdout}"
    return r


class Daemon:
    """A running megaengined. mectl() talks to it through --root (or --socket when the socket
    is not the default one)."""

    def __init__(self, factory, root, socket_path, proc, stderr_path, port, env, argv,
                 custom_socket):
        self.factory = factory
        self.root = Path(root)
        self.socket = Path(socket_path)
        self.proc = proc
        self.stderr_path = Path(stderr_path)
        self.port = port
        self.env = env
        self.argv = argv
        self.custom_socket = custom_socket
        self.stopped = False

    @property
    def pid(self):
        return self.proc.pid

    def stderr(self):
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def mectl(self, *args, json=False, check=True, env=None, cwd=None, timeout=CMD_TIMEOUT):
        sel = ["--socket", self.socket] if self.custom_socket else ["--root", self.root]
        return run_mectl(sel + list(args), env or self.factory.env, cwd=cwd, json=json,
                         check=check, timeout=timeout)

    def port_taken(self, timeout=START_TIMEOUT):
        """Waits for the start: True when the daemon exited because its address was in use,
        False when it is ready (or failed otherwise, which wait_ready then reports)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return "address already in use" in self.stderr().lower()
            if socket_accepts(self.socket) and control_answers(self.socket):
                return False
            time.sleep(0.02)
        return False

    def wait_ready(self, timeout=START_TIMEOUT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"megaengined exited with {self.proc.returncode} before its socket "
                            f"{self.socket} accepted connections\nargv: {self.argv}\n"
                            f"stderr:\n{self.stderr()}")
            if socket_accepts(self.socket):
                return
            time.sleep(0.02)
        pytest.fail(f"megaengined did not accept connections on {self.socket} within "
                    f"{timeout} s\nargv: {self.argv}\nstderr:\n{self.stderr()}")

    def send_signal(self, sig):
        self.proc.send_signal(sig)

    def wait(self, timeout=STOP_TIMEOUT):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"megaengined (pid {self.pid}) did not exit within {timeout} s\n"
                        f"stderr:\n{self.stderr()}")

    def stop(self, sig=signal.SIGTERM, timeout=STOP_TIMEOUT):
        """Stops the daemon with sig and checks a clean shutdown: exit code 0, socket file
        removed, no sanitizer report."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.wait(timeout)
        self.stopped = True
        err = self.stderr()
        assert_no_sanitizer(err, "megaengined")
        assert rc == 0, f"megaengined exited {rc} after {sig!r}\nstderr:\n{err}"
        assert not self.socket.exists(), f"{self.socket} left behind after a clean stop"
        return rc

    def kill(self):
        """SIGKILL: leaves the socket file (and the lock file) behind, like a crash."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.stopped = True


class DaemonFactory:
    def __init__(self, env):
        self.env = env
        self.daemons = []
        self.dirs = []
        self.logdir = None
        self.n = 0

    def new_root(self):
        """A fresh short temp dir; returns the (not yet existing) data root inside it."""
        d = short_tmpdir("me-")
        self.dirs.append(d)
        return d / "root"

    def _logpath(self):
        if self.logdir is None:
            self.logdir = short_tmpdir("me-log-")
            self.dirs.append(self.logdir)
        self.n += 1
        return self.logdir / f"megaengined.{self.n}.stderr"

    def daemon_argv(self, root=None, extra_args=(), root_flag=True, addr=True,
                    log_level="debug"):
        argv = [str(MEGAENGINED)]
        if root_flag and root is not None:
            argv += ["--root", str(root)]
        if addr:
            argv += ["--addr", f"127.0.0.1:{free_port()}"]
        if log_level is not None:
            argv += ["--log-level", log_level]
        return argv + [str(a) for a in extra_args]

    def start(self, root=None, extra_args=(), env=None, root_flag=True, log_level="debug",
              socket_path=None, wait=True):
        """Starts megaengined. root=None makes a fresh one. root_flag=False leaves --root out
        (the daemon then finds its root through env's MEGAENGINE_ROOT; root must still say
        where that is). socket_path: passed as --socket and used by Daemon.mectl()."""
        if root is None:
            root = self.new_root()
        root = Path(root)
        extra = list(extra_args)
        if socket_path is not None:
            extra += ["--socket", str(socket_path)]
        for attempt in range(3):
            argv = self.daemon_argv(root, extra, root_flag=root_flag, log_level=log_level)
            errpath = self._logpath()
            port = int(argv[argv.index("--addr") + 1].rsplit(":", 1)[1])
            with open(errpath, "wb") as errf:
                proc = subprocess.Popen(argv, env=env or self.env, stdin=subprocess.DEVNULL,
                                        stdout=errf, stderr=errf)
            d = Daemon(self, root, socket_path or root / SOCKET_NAME, proc, errpath, port,
                       env or self.env, argv, custom_socket=socket_path is not None)
            self.daemons.append(d)
            if not wait:
                return d
            # The port was free when picked; another process (a test peer's ephemeral UDP
            # socket) may have bound it since: pick another, as a user would.
            if attempt < 2 and "--addr" not in extra and d.port_taken():
                continue
            d.wait_ready()
            return d

    def run_daemon(self, root=None, extra_args=(), env=None, timeout=START_TIMEOUT, **kw):
        """Runs megaengined expecting it to exit by itself (bad flags, refused start...).
        Returns the CompletedProcess; kills it and fails if it is still running after
        timeout."""
        argv = self.daemon_argv(root, extra_args, **kw)
        try:
            r = subprocess.run(argv, env=env or self.env, stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"megaengined {argv} was expected to exit but still ran after "
                        f"{timeout} s\nstderr:\n{e.stderr}")
        assert_no_sanitizer(r.stderr, "megaengined")
        return r

    def mectl(self, *args, json=False, check=True, env=None, cwd=None):
        """mectl with exactly these arguments (no --root added)."""
        return run_mectl(list(args), env or self.env, cwd=cwd, json=json, check=check)

    def stray_verifiers(self, wait=10.0):
        """Verifier children (megaengined --verify-bundle, their stderr in our log directory)
        still running once their daemons are stopped: each must end with its daemon. Killed
        and reported."""
        if self.logdir is None:
            return []
        deadline = time.monotonic() + wait
        while True:
            left = []
            for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if b"--verify-bundle" not in f.read():
                            continue
                    if os.readlink(f"/proc/{pid}/fd/2").startswith(str(self.logdir)):
                        left.append(pid)
                except OSError:
                    continue
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        return [f"verifier pid {pid} outlived its daemon" for pid in left]

    def cleanup(self):
        problems = []
        for d in self.daemons:
            if d.proc.poll() is None:
                d.proc.send_signal(signal.SIGTERM)
                try:
                    d.proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    d.proc.kill()
                    d.proc.wait()
                    problems.append(f"pid {d.pid} ignored SIGTERM; killed")
            m = sanitizer_report(d.stderr())
            if m:
                problems.append(f"pid {d.pid}: {m}\n{d.stderr()}")
        problems += self.stray_verifiers()
        for p in self.dirs:
            shutil.rmtree(p, ignore_errors=True)
        return problems


@pytest.fixture(scope="session", autouse=True)
def _binaries():
    missing = [str(p) for p in (MEGAENGINED, MECTL) if not os.access(p, os.X_OK)]
    if missing:
        pytest.exit(f"missing binaries {missing}: build first (bash scripts/build.sh) or set "
                    f"ME_BUILD_DIR", returncode=1)


@pytest.fixture
def env(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    e = {k: v for k, v in os.environ.items() if not k.startswith("MEGAENGINE_")}
    e.pop("JOURNAL_STREAM", None)  # logs must go to stderr, not to the journal
    e.update(HOME=str(home), GIT_CONFIG_NOSYSTEM="1", LC_ALL="C.UTF-8")
    # Sanitizer defaults when the caller (scripts/test.sh) set none.
    e.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0:halt_on_error=1")
    e.setdefault("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1")
    return e


@pytest.fixture
def daemon_factory(env):
    f = DaemonFactory(env)
    yield f
    problems = f.cleanup()
    assert not problems, "daemon teardown: " + "\n".join(problems)


@pytest.fixture
def daemon(daemon_factory):
    d = daemon_factory.start()
    d.mectl("auth", "init")
    yield d
    if not d.stopped:
        d.stop()


def git(cwd, *args, env, check=True):
    """Runs the git CLI with a fixed identity; returns stdout (stripped)."""
    r = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@e", *map(str, args)],
                       cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                       text=True)
    if check:
        assert r.returncode == 0, f"git {' '.join(map(str, args))}: {r.stderr}"
    return r.stdout.strip()


class GitRepoFactory:
    def __init__(self, base, env):
        self.base = base
        self.env = dict(env)
        self.env.update(GIT_CONFIG_NOSYSTEM="1", GIT_TERMINAL_PROMPT="0")
        self.n = 0

    def git(self, repo, *args, check=True):
        return git(repo, *args, env=self.env, check=check)

    def __call__(self, name=None, commits=3, branches=(), tags=(), annotated_tags=(),
                 parent=None):
        """Makes a repository with `commits` commits on main; each branch in branches starts
        at HEAD and gets one commit of its own; tags (lightweight) and annotated_tags point at
        main's HEAD. commits=0 gives an empty repository. Returns its path."""
        self.n += 1
        path = Path(parent or self.base) / (name or f"repo{self.n}")
        path.mkdir(parents=True)
        self.git(path, "init", "-q", "-b", "main")
        for i in range(commits):
            # The repository's name goes into the content: two repositories with identical
            # first commits made in the same second share a root commit, hence a did:repo.
            (path / "file.txt").write_text(f"{path.name} line {i}\n")
            self.git(path, "add", "file.txt")
            self.git(path, "commit", "-q", "-m", f"commit {i}")
        for b in branches:
            self.git(path, "checkout", "-q", "-b", b)
            (path / f"{b.replace('/', '_')}.txt").write_text(f"{b}\n")
            self.git(path, "add", ".")
            self.git(path, "commit", "-q", "-m", f"on {b}")
            self.git(path, "checkout", "-q", "main")
        for t in tags:
            self.git(path, "tag", t)
        for t in annotated_tags:
            self.git(path, "tag", "-a", "-m", f"tag {t}", t)
        return path

    def root_commit(self, repo):
        roots = self.git(repo, "rev-list", "--max-parents=0", "HEAD").split()
        assert len(roots) == 1, f"{repo} has {len(roots)} root commits"
        return roots[0]

    def refs(self, repo):
        """[(oid, refname)] of branches and tags, as git for-each-ref lists them."""
        out = self.git(repo, "for-each-ref", "refs/heads", "refs/tags",
                       "--format=%(objectname) %(refname)")
        return [tuple(line.split(" ", 1)) for line in out.splitlines() if line]


@pytest.fixture
def git_repo(tmp_path, env):
    base = tmp_path / "repos"
    base.mkdir()
    return GitRepoFactory(base, env)
