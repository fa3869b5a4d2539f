"""Fixtures for test_protocol.py (kept out of conftest.py on purpose; import them by name).

    proto_env      module: environment for children (private HOME, no MEGAENGINE_*)
    proto_daemon   module: one daemon with an identity, shared by the protocol tests
    honest         module: a client connected to proto_daemon before any test ran; every
                   hostile test checks it still gets answers
    proto_factory  function: starts extra daemons; stops and checks them on teardown
    repos          function: makes git repositories with the git CLI

Binaries: $ME_BUILD_DIR/daemon/megaengined and $ME_BUILD_DIR/client/mectl (ME_BUILD_DIR defaults
to <repo>/build/release).
"""
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import meclient

REPO_DIR = Path(__file__).resolve().parents[2]
BUILD_DIR = Path(os.environ.get("ME_BUILD_DIR") or REPO_DIR / "build" / "release").resolve()
MEGAENGINED = BUILD_DIR / "daemon" / "megaengined"
MECTL = BUILD_DIR / "client" / "mectl"
SANITIZER_MARKERS = ("AddressSanitizer", "runtime error:", "LeakSanitizer")


def tmpdir(prefix="mep-"):
    """A short temp dir directly under /tmp (socket paths are limited to 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_binaries():
    missing = [str(p) for p in (MEGAENGINED, MECTL) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(f"missing binaries {missing}: run 'bash scripts/build.sh' or set ME_BUILD_DIR",
                    pytrace=False)


def make_env(home):
    e = {k: v for k, v in os.environ.items() if not k.startswith("MEGAENGINE_")}
    e.pop("JOURNAL_STREAM", None)
    e.update(HOME=str(home), GIT_CONFIG_NOSYSTEM="1", GIT_TERMINAL_PROMPT="0", LC_ALL="C.UTF-8")
    e.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0:halt_on_error=1")
    e.setdefault("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1")
    return e


def mectl(args, env, check=True, timeout=30):
    r = subprocess.run([str(MECTL)] + [str(a) for a in args], env=env, capture_output=True,
                       text=True, stdin=subprocess.DEVNULL, timeout=timeout)
    for m in SANITIZER_MARKERS:
        assert m not in r.stderr, f"mectl {args}: sanitizer report:\n{r.stderr}"
    if check:
        assert r.returncode == 0, f"mectl {args} exited {r.returncode}:\n{r.stdout}{r.stderr}"
    return r


class ProtoDaemon:
    def __init__(self, root, env, extra_args=(), logdir=None):
        self.root = Path(root)
        self.env = env
        self.socket = self.root / "megaengined.sock"
        self.stderr_path = Path(logdir or self.root.parent) / f"megaengined.{os.getpid()}.{id(self)}.err"
        self.argv = [str(MEGAENGINED), "--root", str(self.root),
                     "--addr", f"127.0.0.1:{free_port()}", "--log-level", "debug",
                     *map(str, extra_args)]
        with open(self.stderr_path, "wb") as f:
            self.proc = subprocess.Popen(self.argv, env=env, stdin=subprocess.DEVNULL,
                                         stdout=f, stderr=f)
        self.stopped = False
        self._wait_ready()

    def stderr(self):
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _wait_ready(self, timeout=15.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"megaengined exited {self.proc.returncode} at start\n"
                            f"{self.argv}\n{self.stderr()}")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.socket))
                return
            except OSError:
                time.sleep(0.02)
            finally:
                s.close()
        self.proc.kill()
        pytest.fail(f"megaengined did not accept on {self.socket}\n{self.stderr()}")

    def alive(self):
        return self.proc.poll() is None

    def connect(self, timeout=10.0):
        return meclient.connect(str(self.socket), timeout)

    def stop(self, timeout=10.0):
        """SIGTERM; then exit code 0, socket file removed, no sanitizer report."""
        if self.stopped:
            return
        self.stopped = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"megaengined ignored SIGTERM for {timeout} s\n{self.stderr()}")
        err = self.stderr()
        for m in SANITIZER_MARKERS:
            assert m not in err, f"megaengined stderr has a sanitizer report ({m}):\n{err}"
        assert rc == 0, f"megaengined exited {rc}\n{err}"
        assert not self.socket.exists(), f"{self.socket} left behind"


def start_daemon(base, env, with_key=True, extra_args=(), root=None):
    root = Path(root) if root else Path(base) / "root"
    if with_key:
        root.mkdir(mode=0o700, exist_ok=True)
        mectl(["--root", root, "auth", "init"], env)
    return ProtoDaemon(root, env, extra_args, logdir=base)


def git(cwd, *args, env):
    r = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@e", *map(str, args)],
                       cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"git {args}: {r.stderr}"
    return r.stdout.strip()


class Repos:
    def __init__(self, base, env):
        self.base = Path(base)
        self.env = env
        self.n = 0

    def __call__(self, commits=1, name=None, tags=()):
        self.n += 1
        path = self.base / (name or f"r{self.n}")
        path.mkdir(parents=True)
        git(path, "init", "-q", "-b", "main", env=self.env)
        for i in range(commits):
            (path / "f.txt").write_text(f"{path.name} {i}\n")
            git(path, "add", "f.txt", env=self.env)
            git(path, "commit", "-q", "-m", f"c{i}", env=self.env)
        for t in tags:
            git(path, "tag", t, env=self.env)
        return path

    def git(self, path, *args):
        return git(path, *args, env=self.env)


@pytest.fixture(scope="module")
def proto_env():
    check_binaries()
    home = tmpdir("mep-home-")
    yield make_env(home)
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def proto_daemon(proto_env):
    base = tmpdir()
    d = start_daemon(base, proto_env)
    yield d
    try:
        d.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def honest(proto_daemon):
    c = proto_daemon.connect()
    assert c.request("node.id")["did"].startswith("did:key:z")
    yield c
    c.close()


class Factory:
    def __init__(self, env):
        self.env = env
        self.daemons = []
        self.dirs = []

    def base(self, mode=None):
        d = tmpdir()
        if mode is not None:
            os.chmod(d, mode)
        self.dirs.append(d)
        return d

    def start(self, with_key=True, extra_args=(), base=None, root=None):
        d = start_daemon(base or self.base(), self.env, with_key, extra_args, root)
        self.daemons.append(d)
        return d


@pytest.fixture
def proto_factory(proto_env):
    f = Factory(proto_env)
    yield f
    problems = []
    for d in f.daemons:
        try:
            d.stop()
        except BaseException as e:  # stop every daemon, then report
            problems.append(str(e))
    for p in f.dirs:
        shutil.rmtree(p, ignore_errors=True)
    assert not problems, "\n".join(problems)


@pytest.fixture
def repos(proto_env):
    base = tmpdir("mep-repos-")
    yield Repos(base, proto_env)
    shutil.rmtree(base, ignore_errors=True)
