"""megaengined as a service, without systemd: the configuration file (precedence, errors with
FILE:LINE, reload on SIGHUP) and the sd_notify protocol against a fake $NOTIFY_SOCKET (READY=1
only once the sockets listen, WATCHDOG=1 at half of $WATCHDOG_USEC, STATUS=, RELOADING=1 then
READY=1 on SIGHUP, STOPPING=1 on SIGTERM).

Every daemon here gets an explicit configuration file (--config or $MEGAENGINE_CONFIG), so a
file installed on the test machine never matters.
"""
import os
import shutil
import re
import signal
import socket
import subprocess
import time

import pytest

from conftest import (MEGAENGINED, SOCKET_NAME, Daemon, free_port, run_mectl, short_tmpdir,
                      socket_accepts)
from test_gossip import Node, wait_for

HOSTNAME = socket.gethostname()[:63] or "megaengine"


def write(path, text):
    path.write_text(text)
    return path


def status(d):
    return d.mectl("node", "status", json=True).json


@pytest.fixture
def conf(tmp_path):
    """conf(text) -> path of a new configuration file holding text."""
    n = [0]

    def make(text):
        n[0] += 1
        return write(tmp_path / f"megaengined{n[0]}.conf", text)
    return make


# ---- precedence: flag > environment > file > default ------------------------------------------

def test_defaults_without_a_file(daemon_factory):
    d = daemon_factory.start(extra_args=["--config", "/dev/null"])
    st = status(d)
    assert st["alias"] == HOSTNAME
    assert st["root"] == str(d.root)
    d.stop()


def test_file_sets_every_kind_of_key(daemon_factory, conf):
    base = short_tmpdir("me-cf-")
    daemon_factory.dirs.append(base)
    root = base / "root"
    port1, port2 = free_port(), free_port()
    path = conf(f"""# a comment
; another comment
root = {root}
alias = from-file   ; inline comment
addr = 127.0.0.1:{port1}
  addr = 127.0.0.1:{port2}
gossip-interval = 7
max-outbound = 3
cert-path = {base}/certs
socket = {base}/ctl.sock
log-level = notice
""")
    argv = [str(MEGAENGINED), "--config", str(path)]
    errpath = base / "err"
    with open(errpath, "wb") as errf:
        proc = subprocess.Popen(argv, env=daemon_factory.env, stdin=subprocess.DEVNULL,
                                stdout=errf, stderr=errf)
    try:
        deadline = time.monotonic() + 10
        while not socket_accepts(base / "ctl.sock"):
            assert proc.poll() is None, errpath.read_text()
            assert time.monotonic() < deadline, errpath.read_text()
            time.sleep(0.05)
        r = run_mectl(["--socket", base / "ctl.sock", "auth", "init"], daemon_factory.env)
        assert "did:key:" in r.stdout
        st = run_mectl(["--socket", base / "ctl.sock", "node", "status"], daemon_factory.env,
                       json=True).json
        assert st["alias"] == "from-file"
        assert st["root"] == str(root)
        assert st["addresses"] == [f"127.0.0.1:{port1}", f"127.0.0.1:{port2}"]
        deadline = time.monotonic() + 10
        while not (base / "certs").is_dir():
            assert time.monotonic() < deadline, "cert-path from the file not used"
            time.sleep(0.05)
        assert (root / "keypair").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    err = errpath.read_text()
    assert "notice: megaengined" in err and "debug:" not in err and "info:" not in err, err


def test_precedence(daemon_factory, conf):
    file_root = daemon_factory.new_root()
    env_root = daemon_factory.new_root()
    flag_root = daemon_factory.new_root()
    path = conf(f"root = {file_root}\nalias = file-alias\nlog-level = error\n")
    env = dict(daemon_factory.env, MEGAENGINE_CONFIG=str(path))

    # file over defaults: root, alias and log level from the file
    d = daemon_factory.start(root=file_root, root_flag=False, env=env, log_level=None)
    st = status(d)
    assert (st["root"], st["alias"]) == (str(file_root), "file-alias")
    d.stop()
    assert "started" not in d.stderr(), "log-level = error from the file was not applied"

    # environment over file: MEGAENGINE_ROOT and MEGAENGINE_LOG win, the file still gives alias
    env2 = dict(env, MEGAENGINE_ROOT=str(env_root), MEGAENGINE_LOG="notice")
    d = daemon_factory.start(root=env_root, root_flag=False, env=env2, log_level=None)
    st = status(d)
    assert (st["root"], st["alias"]) == (str(env_root), "file-alias")
    d.stop()
    assert "notice: megaengined" in d.stderr()

    # flags over environment over file
    d = daemon_factory.start(root=flag_root, env=env2, log_level="error",
                             extra_args=["--alias", "flag-alias"])
    st = status(d)
    assert (st["root"], st["alias"]) == (str(flag_root), "flag-alias")
    d.stop()
    assert "started" not in d.stderr()

    # --config over $MEGAENGINE_CONFIG
    other = conf("alias = other-file\n")
    d = daemon_factory.start(env=env, extra_args=["--config", other])
    assert status(d)["alias"] == "other-file"
    d.stop()


def test_repeatable_flag_replaces_the_files_entries(daemon_factory, conf):
    path = conf(f"addr = 127.0.0.1:{free_port()}\naddr = 127.0.0.1:{free_port()}\n")
    d = daemon_factory.start(extra_args=["--config", path])  # the factory adds one --addr
    flag_addr = d.argv[d.argv.index("--addr") + 1]
    assert status(d)["addresses"] == [flag_addr]
    d.stop()


# ---- errors: FILE:LINE, exit 2, nothing created ----------------------------------------------

@pytest.mark.parametrize("text,line,needle", [
    ("alias = a\nbogus = 1\n", 2, "unknown key 'bogus'"),
    ("config = /etc/x\n", 1, "unknown key 'config'"),
    ("# c\n\nalias =\n", 3, "invalid alias ''"),
    ("alias = " + "x" * 64 + "\n", 1, "invalid alias"),
    ("addr = 1.2.3.4\n", 1, "invalid addr '1.2.3.4'"),
    ("addr = example.com:9000\n", 1, "invalid addr"),
    ("bootstrap-node = did:key:zBad@127.0.0.1:9000\n", 1, "not a did:key"),
    ("bootstrap-node = nonsense\n", 1, "invalid bootstrap-node"),
    ("announce-addr = 1.2.3.4:0\n", 1, "invalid announce-addr"),
    ("gossip-interval = 0\n", 1, "invalid gossip-interval '0'"),
    ("gossip-interval = 3601\n", 1, "1 to 3600 seconds"),
    ("gossip-interval = 10s\n", 1, "invalid gossip-interval"),
    ("max-outbound = 65\n", 1, "invalid max-outbound"),
    ("max-outbound = -1\n", 1, "invalid max-outbound"),
    ("log-level = loud\n", 1, "log level"),
    ("root = relative/dir\n", 1, "absolute path"),
    ("socket = ctl.sock\n", 1, "absolute path"),
    ("alias = a\nalias = b\n", 2, "given twice (first on line 1)"),
    ("alias = a\nthis line has no equals sign\n", 2, "syntax error"),
    ("[megaengined]\nalias = a\n", 1, "section"),
    ("alias = " + "y" * 300 + "\n", 1, "line longer than"),
])
def test_file_errors(daemon_factory, conf, text, line, needle):
    path = conf(text)
    root = daemon_factory.new_root()
    r = daemon_factory.run_daemon(root, ["--config", path])
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.startswith(f"megaengined: {path}:{line}: "), r.stderr
    assert needle in r.stderr, r.stderr
    assert not root.exists(), "a rejected configuration must not create the data root"


def test_missing_or_unreadable_file(daemon_factory, tmp_path):
    root = daemon_factory.new_root()
    r = daemon_factory.run_daemon(root, ["--config", tmp_path / "nope.conf"])
    assert r.returncode == 2 and "nope.conf" in r.stderr and "No such file" in r.stderr
    env = dict(daemon_factory.env, MEGAENGINE_CONFIG=str(tmp_path / "nope2.conf"))
    r = daemon_factory.run_daemon(root, env=env)
    assert r.returncode == 2 and "nope2.conf" in r.stderr
    r = daemon_factory.run_daemon(root, ["--config", tmp_path])  # a directory
    assert r.returncode == 2 and str(tmp_path) in r.stderr
    assert not root.exists()


def test_flag_error_wins_over_nothing(daemon_factory, conf):
    """A bad flag is still named as a flag when a (good) file is read too."""
    path = conf("alias = fine\n")
    r = daemon_factory.run_daemon(daemon_factory.new_root(),
                                  ["--config", path, "--gossip-interval", "0"])
    assert r.returncode == 2 and "invalid --gossip-interval '0'" in r.stderr, r.stderr


def test_help_documents_the_file(daemon_factory):
    r = subprocess.run([str(MEGAENGINED), "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for word in ("--config", "MEGAENGINE_CONFIG", "megaengined.conf", "SIGHUP",
                 "Precedence: command-line flag > environment variable > configuration file"):
        assert word in r.stdout, word


# ---- reload (SIGHUP) ---------------------------------------------------------------------------

def test_sighup_applies_alias_and_log_level(daemon_factory, conf):
    path = conf("alias = before\nlog-level = notice\n")
    d = daemon_factory.start(extra_args=["--config", path], log_level=None)
    d.mectl("auth", "init")
    assert status(d)["alias"] == "before"
    assert "debug:" not in d.stderr()

    port = d.argv[d.argv.index("--addr") + 1]
    write(path, f"alias = after\nlog-level = debug\naddr = 127.0.0.1:{free_port()}\n"
                "gossip-interval = 5\nmax-outbound = 2\n")
    d.send_signal(signal.SIGHUP)
    wait_for(lambda: ("configuration reloaded" in d.stderr(), d.stderr()[-2000:]), "reload")
    st = status(d)
    assert st["alias"] == "after"
    assert st["addresses"] == [port], "addr needs a restart; the flag wins anyway"
    err = d.stderr()
    assert re.search(r"applied: alias, gossip-interval, max-outbound, log-level", err), err
    assert "debug: control: pid" in err, "log-level = debug not applied"
    # addr is given as a flag, so the file's new addr changes nothing: no restart warning.
    assert "only after a restart" not in err, err

    # A bad file: reported, the running configuration stays, the daemon keeps running.
    write(path, "alias = broken\nnonsense = 1\n")
    d.send_signal(signal.SIGHUP)
    wait_for(lambda: ("reload failed" in d.stderr(), d.stderr()[-2000:]), "failed reload")
    assert f"{path}:2: unknown key 'nonsense'" in d.stderr()
    assert status(d)["alias"] == "after"
    d.stop()


def test_sighup_warns_about_keys_that_need_a_restart(daemon_factory, conf):
    certs = short_tmpdir("me-certs-")
    daemon_factory.dirs.append(certs)
    path = conf("alias = x\n")
    d = daemon_factory.start(extra_args=["--config", path])
    write(path, f"alias = x\ncert-path = {certs}\nsocket-group = root\n")
    d.send_signal(signal.SIGHUP)
    wait_for(lambda: ("only after a restart" in d.stderr(), d.stderr()[-2000:]), "warning")
    err = d.stderr()
    assert "take effect only after a restart: cert-path, socket-group" in err, err
    assert "nothing to apply" in err, err
    d.stop()


def test_sighup_new_alias_reaches_peers(daemon_factory, conf):
    """After a reload the node announces itself at once: a peer learns the new alias."""
    path = conf("alias = old-name\ngossip-interval = 3600\n")
    a = Node(daemon_factory, "unused", "127.0.0.1")
    argv = [str(MEGAENGINED), "--root", str(a.root), "--addr", a.addr, "--config", str(path),
            "--log-level", "debug"]
    errpath = daemon_factory._logpath()
    with open(errpath, "wb") as errf:
        proc = subprocess.Popen(argv, env=daemon_factory.env, stdin=subprocess.DEVNULL,
                                stdout=errf, stderr=errf)
    a.d = Daemon(daemon_factory, a.root, a.root / SOCKET_NAME, proc, errpath, a.port,
                 daemon_factory.env, argv, custom_socket=False)
    daemon_factory.daemons.append(a.d)
    a.d.wait_ready()
    b = Node(daemon_factory, "b", "127.0.0.1").start(boots=[a], interval=3600)

    def alias_at_b(want):
        n = b.nodes().get(a.did)
        return (n is not None and n["alias"] == want, n)
    wait_for(lambda: alias_at_b("old-name"), "b learns a's alias", [a, b])
    write(path, "alias = new-name\ngossip-interval = 3600\n")
    a.d.send_signal(signal.SIGHUP)
    wait_for(lambda: alias_at_b("new-name"), "b learns a's new alias", [a, b], timeout=10)
    a.d.stop()
    b.d.stop()


# ---- sd_notify against a fake NOTIFY_SOCKET ---------------------------------------------------

class Notify:
    """A Unix datagram socket standing in for systemd's $NOTIFY_SOCKET; records
    (monotonic time, {key: value}) per datagram."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.msgs = []
        self.daemon = None  # for failure messages

    def poll(self, timeout):
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except socket.timeout:
            return None
        kv = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
        self.msgs.append((time.monotonic(), kv))
        return kv

    def wait(self, key, value=None, timeout=15.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            kv = self.poll(max(0.01, deadline - time.monotonic()))
            if kv is not None and key in kv and (value is None or kv[key] == value):
                return kv
        log = self.daemon.stderr() if self.daemon is not None else ""
        pytest.fail(f"no {key}={value} from the daemon within {timeout} s; got {self.msgs}\n"
                    f"daemon log:\n{log}")

    def close(self):
        self.sock.close()


def start_notified(daemon_factory, root, sockdir, extra_env, port):
    """Starts megaengined through a shell that sets WATCHDOG_PID to the pid the daemon will
    have (sh execs it)."""
    notify = Notify(sockdir / "notify")
    env = dict(daemon_factory.env, NOTIFY_SOCKET=notify.path, **extra_env)
    argv = ["sh", "-c", 'export WATCHDOG_PID=$$; exec "$@"', "sh", str(MEGAENGINED),
            "--config", "/dev/null", "--root", str(root), "--addr", f"127.0.0.1:{port}",
            "--log-level", "debug"]
    errpath = daemon_factory._logpath()
    with open(errpath, "wb") as errf:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=errf,
                                stderr=errf)
    d = Daemon(daemon_factory, root, root / SOCKET_NAME, proc, errpath, port, env, argv,
               custom_socket=False)
    daemon_factory.daemons.append(d)
    notify.daemon = d
    return d, notify


def udp_port_taken(port):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def test_notify_ready_watchdog_status_reload_stop(daemon_factory):
    sockdir = short_tmpdir("me-n-")
    daemon_factory.dirs.append(sockdir)
    root = daemon_factory.new_root()
    run_mectl(["--root", root, "auth", "init"], daemon_factory.env)
    port = free_port()
    d, notify = start_notified(daemon_factory, root, sockdir, {"WATCHDOG_USEC": "2000000"}, port)
    try:
        ready = notify.wait("READY", "1")
        # READY=1 only once the control socket and the QUIC port listen.
        assert socket_accepts(d.socket), "READY=1 before the control socket listened"
        assert udp_port_taken(port), "READY=1 before the QUIC port was bound"
        assert re.fullmatch(r"\d+ peers, \d+ repositories, 0 transfers", ready["STATUS"]), ready
        before_ready = [kv for _, kv in notify.msgs[:-1]]
        assert not any("WATCHDOG" in kv for kv in before_ready), notify.msgs

        # WATCHDOG=1 every WATCHDOG_USEC / 2 = 1 s, and STATUS= refreshed (every 5 s).
        t0 = time.monotonic()
        while time.monotonic() - t0 < 6.5:
            notify.poll(0.5)
        pings = [t for t, kv in notify.msgs if kv.get("WATCHDOG") == "1"]
        assert 4 <= len(pings) <= 8, (pings, d.stderr())
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        assert sorted(gaps)[len(gaps) // 2] == pytest.approx(1.0, abs=0.25), gaps
        assert all(0.5 < g < 1.9 for g in gaps), (gaps, d.stderr())
        statuses = [kv["STATUS"] for _, kv in notify.msgs if "STATUS" in kv and "READY" not in kv]
        assert statuses and all("peers" in s and "repositories" in s for s in statuses), \
            (notify.msgs, d.stderr())

        # SIGHUP: RELOADING=1 (with MONOTONIC_USEC=), then READY=1 again.
        d.send_signal(signal.SIGHUP)
        rel = notify.wait("RELOADING", "1")
        assert int(rel["MONOTONIC_USEC"]) > 0, rel
        mono = time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6
        assert abs(mono - int(rel["MONOTONIC_USEC"])) < 10e6, (mono, rel)
        notify.wait("READY", "1")
        assert d.proc.poll() is None, d.stderr()

        # SIGTERM (one: a second one during shutdown would kill it): clean exit, STOPPING=1
        # once (the datagram waits in the socket).
        d.stop()
        notify.wait("STOPPING", "1")
        while notify.poll(0.2) is not None:
            pass
        assert sum("STOPPING" in kv for _, kv in notify.msgs) == 1, notify.msgs
    finally:
        notify.close()


def test_notify_without_identity_and_no_watchdog(daemon_factory):
    """No WATCHDOG_USEC: no pings. No identity: READY=1 still, and STATUS= says what to do."""
    sockdir = short_tmpdir("me-n-")
    daemon_factory.dirs.append(sockdir)
    d, notify = start_notified(daemon_factory, daemon_factory.new_root(), sockdir, {},
                               free_port())
    try:
        ready = notify.wait("READY", "1")
        assert "mectl auth init" in ready["STATUS"] and "0 peers" in ready["STATUS"], ready
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.5:
            notify.poll(0.5)
        assert not any("WATCHDOG" in kv for _, kv in notify.msgs), notify.msgs
        d.stop()
    finally:
        notify.close()


def test_watchdog_for_another_pid_is_ignored(daemon_factory):
    """WATCHDOG_PID names another process (e.g. a parent): the daemon must not ping."""
    sockdir = short_tmpdir("me-n-")
    daemon_factory.dirs.append(sockdir)
    notify = Notify(sockdir / "notify")
    env = dict(daemon_factory.env, NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="400000",
               WATCHDOG_PID="1")
    d = daemon_factory.start(env=env, extra_args=["--config", "/dev/null"])
    try:
        notify.wait("READY", "1")
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.5:
            notify.poll(0.3)
        assert not any("WATCHDOG" in kv for _, kv in notify.msgs), notify.msgs
        d.stop()
    finally:
        notify.close()


# ---- libsystemd is optional at run time; journal fields ---------------------------------------

def test_libsystemd_is_not_linked():
    r = subprocess.run(["readelf", "-d", str(MEGAENGINED)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip("readelf (binutils) is not available")
    assert "libsystemd" not in r.stdout, "libsystemd must be loaded at run time, not linked"


def in_private_mounts(script, timeout=60, **popen):
    """Runs `sh -c script` in a new mount namespace (root only); None when that is not possible."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return None
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"],
                           capture_output=True)
    if probe.returncode != 0:
        return None
    return subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            **popen)


def test_runs_without_libsystemd(daemon_factory, tmp_path):
    """With libsystemd.so.0 unloadable (a mount namespace puts /dev/null over it) and systemd's
    variables set, the daemon still starts, serves and stops, logging to stderr."""
    lib = None
    for d in ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib"):
        if os.path.exists(os.path.join(d, "libsystemd.so.0")):
            lib = os.path.realpath(os.path.join(d, "libsystemd.so.0"))
            break
    if lib is None:
        pytest.skip("no libsystemd.so.0 on this machine to hide")
    root = daemon_factory.new_root()
    run_mectl(["--root", root, "auth", "init"], daemon_factory.env)
    err = tmp_path / "err"
    env = dict(daemon_factory.env, NOTIFY_SOCKET=str(tmp_path / "nobody"),
               WATCHDOG_USEC="1000000", JOURNAL_STREAM="1:1")
    script = (f'mount --bind /dev/null "{lib}" && exec "{MEGAENGINED}" --config /dev/null '
              f'--root "{root}" --addr 127.0.0.1:{free_port()}')
    with open(err, "wb") as ef:
        p = in_private_mounts(script, env=env, stdin=subprocess.DEVNULL, stdout=ef, stderr=ef)
    if p is None:
        pytest.skip("needs root and unshare(1) to hide libsystemd in a mount namespace")
    try:
        deadline = time.monotonic() + 10
        while not socket_accepts(root / SOCKET_NAME):
            assert p.poll() is None, err.read_text()
            assert time.monotonic() < deadline, err.read_text()
            time.sleep(0.05)
        assert run_mectl(["--root", root, "node", "status"], daemon_factory.env,
                         json=True).json["did"]
    finally:
        p.send_signal(signal.SIGTERM)
        rc = p.wait(10)
    text = err.read_text()
    assert rc == 0, text
    assert "notice: megaengined 0.1.0 started" in text and "megaengined stopped" in text, text


JOURNAL_HELPER = r'''
import json, os, socket, struct, subprocess, sys
out_path, argv = sys.argv[1], sys.argv[2:]
subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run"], check=True)
os.makedirs("/run/systemd/journal")
j = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
j.bind("/run/systemd/journal/socket")
j.settimeout(0.2)
err = open(out_path + ".stderr", "wb")
st = os.fstat(err.fileno())
env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
print(p.pid, flush=True)
entries = []
def parse(data):
    e, i = {}, 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            k, v = line.split(b"=", 1)
            i = nl + 1
        else:  # binary-safe field: NAME\n<le64 size><data>\n
            k = line
            (n,) = struct.unpack("<Q", data[nl + 1:nl + 9])
            v = data[nl + 9:nl + 9 + n]
            i = nl + 9 + n + 1
        e.setdefault(k.decode(), []).append(v.decode(errors="replace"))
    return e
while True:
    try:
        entries.append(parse(j.recv(1 << 20)))
    except socket.timeout:
        if p.poll() is not None:
            break
json.dump({"rc": p.returncode, "entries": entries}, open(out_path, "w"))
'''


def test_journal_fields(daemon_factory, git_repo, tmp_path):
    """stderr is the journal (JOURNAL_STREAM matches it): entries go to the journal socket with
    PRIORITY, MESSAGE, SYSLOG_IDENTIFIER and, for the key events, MESSAGE_ID, NODE_DID and
    REPO_ID. A fake journal socket in a private mount namespace receives them."""
    root = daemon_factory.new_root()
    did = run_mectl(["--root", root, "auth", "init"], daemon_factory.env, json=True).json["did"]
    helper = tmp_path / "journal_helper.py"
    helper.write_text(JOURNAL_HELPER)
    out = tmp_path / "journal.json"
    argv = [str(MEGAENGINED), "--config", "/dev/null", "--root", str(root), "--addr",
            f"127.0.0.1:{free_port()}", "--log-level", "info"]
    script = " ".join(["exec", "/usr/bin/python3", str(helper), str(out)] +
                      [f"'{a}'" for a in argv])
    p = in_private_mounts(script, env=daemon_factory.env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, text=True)
    if p is None:
        pytest.skip("needs root and unshare(1) for a private /run with a fake journal socket")
    try:
        pid = int(p.stdout.readline())
        deadline = time.monotonic() + 10
        while not socket_accepts(root / SOCKET_NAME):
            assert p.poll() is None and time.monotonic() < deadline, "daemon did not start"
            time.sleep(0.05)
        repo = git_repo()
        rid = run_mectl(["--root", root, "repo", "add", repo], daemon_factory.env,
                        json=True).json["id"]
        run_mectl(["--root", root, "repo", "remove", rid], daemon_factory.env)
        os.kill(pid, signal.SIGTERM)
        assert p.wait(20) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    res = __import__("json").loads(out.read_text())
    assert res["rc"] == 0
    entries = res["entries"]
    assert entries, "nothing reached the journal socket"
    assert all(e["SYSLOG_IDENTIFIER"] == ["megaengined"] and "PRIORITY" in e and "MESSAGE" in e
               for e in entries), entries

    def one(msgid):
        found = [e for e in entries if e.get("MESSAGE_ID") == [msgid]]
        assert len(found) == 1, (msgid, entries)
        return found[0]
    ids = msgids()
    started = one(ids["STARTED"])
    assert started["NODE_DID"] == [did] and started["PRIORITY"] == ["5"], started
    added = one(ids["REPO_ADDED"])
    assert added["REPO_ID"] == [rid] and "repository added" in added["MESSAGE"][0], added
    removed = one(ids["REPO_REMOVED"])
    assert removed["REPO_ID"] == [rid], removed
    one(ids["STOPPED"])
    assert (tmp_path / "journal.json.stderr").read_text() == "", "lines went to stderr too"


def msgids():
    """MESSAGE_ID values from common/msgids.h, by name (ME_MSGID_<NAME>)."""
    from conftest import REPO_DIR
    text = (REPO_DIR / "common" / "msgids.h").read_text()
    ids = dict(re.findall(r'#define ME_MSGID_(\w+) "MESSAGE_ID=([0-9a-f]{32})"', text))
    assert len(set(ids.values())) == len(ids), "MESSAGE_IDs must be unique"
    return ids


# ---- mectl: a user the socket refuses is told which group to join ----------------------------

def test_mectl_permission_error_names_the_group(daemon_factory):
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs root and runuser(1) to run mectl as another user")
    from test_protocol import GROUP, ensure_test_user
    import grp
    ensure_test_user()  # creates GROUP (and a member of it; 'nobody' is not one)
    base = short_tmpdir("me-perm-")
    daemon_factory.dirs.append(base)
    os.chmod(base, 0o755)
    sock = base / "ctl.sock"
    d = daemon_factory.start(socket_path=sock, extra_args=["--config", "/dev/null",
                                                           "--socket-group", GROUP])
    d.mectl("auth", "init")
    assert os.stat(sock).st_gid == grp.getgrnam(GROUP).gr_gid

    # The build tree may sit under a directory only root can enter (a mktemp -d clone): run a
    # copy of mectl from a directory everyone can traverse.
    from conftest import MECTL
    bindir = short_tmpdir("me-bin-")
    daemon_factory.dirs.append(bindir)
    os.chmod(bindir, 0o755)
    mectl = bindir / "mectl"
    shutil.copy2(MECTL, mectl)
    os.chmod(mectl, 0o755)

    def mectl_as_nobody():
        return subprocess.run([shutil.which("runuser"), "-u", "nobody", "--", str(mectl), "--socket", str(sock),
                               "repo", "list"], capture_output=True, text=True, timeout=30,
                              env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent",
                                   "LC_ALL": "C.UTF-8"})
    # The file mode keeps nobody out: connect() fails with EACCES.
    r = mectl_as_nobody()
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert "Permission denied" in r.stderr and f"group '{GROUP}'" in r.stderr, r.stderr
    assert f"usermod -a -G {GROUP}" in r.stderr, r.stderr
    # Opened up by hand, the daemon itself refuses (EPERM, id 0): same exit status and advice.
    os.chmod(sock, 0o666)
    r = mectl_as_nobody()
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert "permission denied" in r.stderr and f"group '{GROUP}'" in r.stderr, r.stderr
    # The directory hides the socket (0750 like /run/megaengine): the directory's group is named.
    os.chmod(sock, 0o660)
    os.chown(base, 0, grp.getgrnam(GROUP).gr_gid)
    os.chmod(base, 0o750)
    r = mectl_as_nobody()
    assert r.returncode == 3 and f"group '{GROUP}'" in r.stderr, (r.returncode, r.stderr)
    d.stop()


def test_socket_replaced_while_running_is_not_removed(daemon_factory):
    """megaengined.socket started while a daemon runs binds the same path anew; the daemon must
    then not unlink that socket when it stops (it removes only the file it created)."""
    d = daemon_factory.start(extra_args=["--config", "/dev/null"])
    os.unlink(d.socket)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        other.bind(str(d.socket))
        other.listen(1)
        d.send_signal(signal.SIGTERM)
        assert d.wait() == 0, d.stderr()
        d.stopped = True
        assert d.socket.exists(), "the daemon removed a socket it did not create"
    finally:
        other.close()
