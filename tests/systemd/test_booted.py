"""megaengine as a system service under a booted systemd (issue 6, "Test under a booted systemd").

One Debian container (conftest.py `machine`: debootstrap root, `meson install --destdir`, units
enabled, `systemd-nspawn -b --private-network`) is booted for the module and the tests run in
order, each one step an administrator takes: start, use as a member of group megaengine, be
refused as somebody else, read the journal, reload, stop, come back by socket activation, be
restarted by the watchdog, power off. A test that fails gets the container's systemctl status
and journal tail in its report.
"""
import json
import re
import subprocess
import time

import pytest

from nspawn import REPO_DIR

UNIT = "megaengined.service"
SOCKET_UNIT = "megaengined.socket"
SOCKET = "/run/megaengine/control.sock"
STATE_DIR = "/var/lib/megaengine"
CONFIG = "/etc/megaengine/megaengined.conf"
REPO_PATH = "/srv/git/demo"
GROUP = "megaengine"


def message_ids():
    """NAME -> id from common/msgids.h (the one place the ids are defined)."""
    ids = {}
    for m in re.finditer(r'#define ME_MSGID_(\w+) "MESSAGE_ID=([0-9a-f]{32})"',
                         (REPO_DIR / "common/msgids.h").read_text()):
        ids[m.group(1)] = m.group(2)
    return ids


def timespan_s(text):
    """Seconds in a systemd time span as `systemctl show` prints it ("30s", "1min 30s",
    "500ms")."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "min": 60, "h": 3600}
    total = 0.0
    for num, unit in re.findall(r"([\d.]+)\s*(us|ms|min|s|h)", text):
        total += float(num) * units[unit]
    return total


def wait_for(what, fn, timeout, interval=0.2):
    """Polls fn() until it returns a true value; returns it, or fails naming `what`."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def daemon_entries(m, since_us=0, **match):
    """The daemon's own journal entries (not PID 1's lines about the unit), optionally only
    those after since_us (realtime, microseconds) and with the given fields."""
    out = []
    for e in m.journal_json("-u", UNIT):
        if e.get("SYSLOG_IDENTIFIER") != "megaengined" and e.get("_COMM") != "megaengined":
            continue
        if int(e.get("__REALTIME_TIMESTAMP", 0)) <= since_us:
            continue
        if all(e.get(k) == v for k, v in match.items()):
            out.append(e)
    return out


def now_us():
    return int(time.time() * 1e6)


def mectl(m, *args, user="alice", timeout=60):
    return m.run(["mectl", *args], user=user, timeout=timeout)


# --- boot and install ---------------------------------------------------------------------------

def test_boots_to_running(machine):
    failed = machine.run(["systemctl", "--failed", "--no-legend", "--plain", "--no-pager"]).stdout
    assert "megaengine" not in failed, f"failed units after boot:\n{failed}"
    if machine.boot_state != "running":  # something else in the image failed: say what
        print(f"system is {machine.boot_state} after boot; failed units:\n{failed}")
    assert machine.boot_state in ("running", "degraded")


def test_installed_files(machine):
    """meson install --destdir put everything where a packaged install has it."""
    paths = ["/usr/sbin/megaengined", "/usr/bin/mectl", "/usr/lib/systemd/system/" + UNIT,
             "/usr/lib/systemd/system/" + SOCKET_UNIT, "/usr/lib/sysusers.d/megaengine.conf",
             CONFIG, "/usr/share/man/man8/megaengined.8", "/usr/share/man/man1/mectl.1"]
    missing = [p for p in paths if machine.run(["test", "-s", p]).returncode != 0]
    assert not missing, f"not installed or empty: {missing}\ninstall log:\n{machine.install_log}"
    execstart = machine.prop(UNIT, "ExecStart")
    assert "path=/usr/sbin/megaengined" in execstart, execstart
    for b in ("/usr/sbin/megaengined", "/usr/bin/mectl"):
        r = machine.check(["ldd", b])
        assert "not found" not in r.stdout, f"{b} misses libraries in the image:\n{r.stdout}"
    r = machine.check(["megaengined", "--version"])
    assert r.stdout.strip(), "megaengined --version printed nothing"


def test_units_load_without_warnings(machine):
    for u in (UNIT, SOCKET_UNIT):
        assert machine.prop(u, "LoadState") == "loaded", machine.prop(u, "LoadError")
    r = machine.run(["journalctl", "-b", "_PID=1", "--no-pager", "-o", "cat"])
    about_ours = re.compile(r"megaengined\.(service|socket)(:\d+)?:")
    complaint = re.compile(r"[Uu]nknown|[Ii]gnoring|[Ff]ailed to parse|not supported|[Ii]nvalid")
    bad = [ln for ln in r.stdout.splitlines() if about_ours.search(ln) and complaint.search(ln)]
    assert not bad, "systemd complained about the units:\n" + "\n".join(bad)


def test_sysusers_created_user_and_group(machine):
    """systemd-sysusers ran at boot from the installed sysusers.d entry."""
    pw = machine.check(["getent", "passwd", "megaengine"]).stdout.strip().split(":")
    assert int(pw[2]) < 1000, f"megaengine is not a system user: {pw}"
    assert pw[5] == STATE_DIR and pw[6].endswith("nologin"), pw
    machine.check(["getent", "group", GROUP])


def test_socket_listens_before_the_daemon(machine):
    """megaengined.socket is enabled: PID 1 holds the control socket from boot, the daemon does not
    run yet."""
    assert machine.prop(SOCKET_UNIT, "ActiveState") == "active"
    assert machine.prop(UNIT, "ActiveState") == "inactive"
    st = machine.check(["stat", "-c", "%F %a %U %G", SOCKET]).stdout.split()
    assert st[:2] == ["socket", "660"] and st[-1] == GROUP, st


# --- start and confinement --------------------------------------------------------------------------

def test_start(machine):
    r = machine.run(["systemctl", "start", UNIT], timeout=90)
    assert r.returncode == 0, r.stderr
    assert machine.run(["systemctl", "is-active", UNIT]).stdout.strip() == "active"
    status = machine.prop(UNIT, "StatusText")
    assert "repositories" in status, f"STATUS= text: {status!r}"
    assert machine.prop(UNIT, "Type") == "notify"


def test_daemon_is_confined(machine):
    """The hardening is in effect on the running process, not only written in the unit."""
    pid = machine.prop(UNIT, "MainPID")
    assert pid != "0"
    user = machine.check(["ps", "-o", "user=", "-p", pid]).stdout.strip()
    assert user == "megaengine"
    status = machine.check(["cat", f"/proc/{pid}/status"]).stdout
    fields = dict(re.findall(r"^(\w+):\s+(.*)$", status, re.M))
    assert fields["CapEff"] == fields["CapPrm"] == fields["CapBnd"] == "0000000000000000", fields
    assert fields["NoNewPrivs"] == "1"
    assert fields["Seccomp"] == "2"
    # The daemon's own view of the file system (its mount namespace).
    r = machine.run(["nsenter", "-t", pid, "-m", "sh", "-c", "ls -A /home; touch /usr/.x"])
    assert r.stdout.strip() == "", f"/home is visible to the daemon: {r.stdout!r}"
    assert "Read-only file system" in r.stderr, r.stderr
    r = machine.check(["nsenter", "-t", pid, "-m", "stat", "-c", "%U %a", STATE_DIR])
    assert r.stdout.split() == ["megaengine", "700"], r.stdout


def test_security_exposure(machine):
    """systemd-analyze security on the loaded unit in the booted system: 2.0 or lower."""
    r = machine.run(["systemd-analyze", "security", "--no-pager", UNIT])
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", r.stdout)
    assert m, r.stdout + r.stderr
    print(f"systemd-analyze security {UNIT} in the booted container: {m.group(1)}")
    assert float(m.group(1)) <= 2.0, r.stdout


# --- use as a member of the group; refusal of an unrelated user -------------------------------------

def test_auth_init_as_group_member(machine):
    machine.check(["useradd", "--create-home", "--groups", GROUP, "alice"])
    r = mectl(machine, "auth", "init")
    assert r.returncode == 0, r.stderr
    did = re.search(r"did:key:z6Mk\w+", r.stdout)
    assert did, r.stdout
    machine.did = did.group(0)
    r = mectl(machine, "auth", "show")
    assert r.returncode == 0 and machine.did in r.stdout, r.stdout + r.stderr
    # The identity is the service's, in its state directory (not in alice's home).
    machine.check(["test", "-f", f"{STATE_DIR}/keypair"])
    assert machine.run(["test", "-e", "/home/alice/.megaengine"]).returncode != 0


def test_repo_add_and_list_as_group_member(machine):
    machine.check(["install", "-d", "-o", "alice", "-g", "alice", "/srv/git"])
    machine.check(f"""set -e
        git init -q -b main {REPO_PATH}
        cd {REPO_PATH}
        echo 'hello from a booted container' > README
        git add README
        git -c user.name=Alice -c user.email=alice@example.org commit -q -m 'first commit'
        """, user="alice")
    r = mectl(machine, "repo", "add", "--path", REPO_PATH, "--description", "booted demo")
    assert r.returncode == 0, r.stdout + r.stderr
    rid = re.search(r"did:repo:z\w+", r.stdout)
    assert rid, r.stdout
    machine.repo_id = rid.group(0)
    r = mectl(machine, "repo", "list")
    assert r.returncode == 0 and machine.repo_id in r.stdout, r.stdout + r.stderr
    r = mectl(machine, "--json", "repo", "list")
    assert r.returncode == 0, r.stderr
    assert machine.repo_id in json.dumps(json.loads(r.stdout))
    # STATUS= follows (it is refreshed every few seconds).
    wait_for("STATUS= to count the repository",
             lambda: re.search(r"\b1 repositor(y|ies)\b", machine.prop(UNIT, "StatusText")),
             15, interval=0.5)


def refused_clearly(r):
    return r.returncode == 3 and "Permission denied" in r.stderr and "group" in r.stderr


def test_unrelated_user_is_refused_at_the_socket(machine):
    """bob, not in group megaengine, naming the socket: the kernel refuses the connection and
    mectl says why."""
    machine.check(["useradd", "--create-home", "bob"])
    r = mectl(machine, "--socket", SOCKET, "repo", "list", user="bob")
    assert refused_clearly(r), f"exit {r.returncode}\n{r.stdout}{r.stderr}"
    assert machine.repo_id not in r.stdout


def test_unrelated_user_is_refused(machine):
    """bob runs plain `mectl repo list`: mectl must still pick the system socket (which bob may
    not even stat, /run/megaengine being 0750) and report the permission problem, not look for
    a daemon in ~/.megaengine."""
    r = mectl(machine, "repo", "list", user="bob")
    assert refused_clearly(r), f"exit {r.returncode}\n{r.stdout}{r.stderr}"
    assert machine.repo_id not in r.stdout


# --- the journal ------------------------------------------------------------------------------------

def test_journal_startup_entry(machine):
    ids = message_ids()
    started = daemon_entries(machine, MESSAGE_ID=ids["STARTED"])
    assert started, "no start-up entry with MESSAGE_ID=" + ids["STARTED"]
    e = started[0]
    assert e.get("PRIORITY") == "5", e
    assert "started" in e.get("MESSAGE", ""), e
    assert e.get("_SYSTEMD_UNIT") == UNIT, e
    # journalctl MESSAGE_ID=... finds it, as docs/systemd.md tells administrators.
    r = machine.check(["journalctl", "-u", UNIT, "MESSAGE_ID=" + ids["STARTED"], "-o", "cat",
                       "--no-pager"])
    assert "started" in r.stdout


def test_journal_repository_entry(machine):
    ids = message_ids()
    added = daemon_entries(machine, REPO_ID=machine.repo_id)
    assert added, f"no journal entry with REPO_ID={machine.repo_id}"
    assert any(e.get("MESSAGE_ID") == ids["REPO_ADDED"] for e in added), added
    r = machine.check(["journalctl", "-u", UNIT, "REPO_ID=" + machine.repo_id, "-o", "cat",
                       "--no-pager"])
    assert r.stdout.strip(), "journalctl REPO_ID=... shows nothing"


# --- a repository under /home: the drop-in docs/systemd.md documents ------------------------------

HOME_REPO = "/home/alice/src/project"
DROPIN = "/etc/systemd/system/megaengined.service.d/home-repos.conf"


def test_home_repository_hidden_without_dropin(machine):
    """ProtectHome=yes: the daemon cannot see a repository under /home."""
    machine.check(f"""set -e
        mkdir -p {HOME_REPO}
        cd {HOME_REPO}
        git init -q -b main
        echo 'published from a home directory' > README
        git add README
        git -c user.name=Alice -c user.email=alice@example.org commit -q -m 'first commit'
        """, user="alice")
    r = mectl(machine, "repo", "add", "--path", HOME_REPO)
    assert r.returncode == 1, f"exit {r.returncode}\n{r.stdout}{r.stderr}"
    print(f"without the drop-in: {r.stderr.strip()}")


def test_home_repository_with_documented_dropin(machine):
    """docs/systemd.md: ProtectHome=tmpfs + BindReadOnlyPaths=, restart, let megaengine read it."""
    machine.check(["mkdir", "-p", DROPIN.rsplit("/", 1)[0]])
    machine.check(f"cat > {DROPIN}",
                  input=f"[Service]\nProtectHome=tmpfs\nBindReadOnlyPaths={HOME_REPO}\n")
    machine.check(["systemctl", "daemon-reload"])
    machine.check(["systemctl", "restart", UNIT], timeout=90)
    machine.check(f"chgrp -R {GROUP} {HOME_REPO} && chmod -R g+rX {HOME_REPO}", user="alice")
    r = mectl(machine, "repo", "add", "--path", HOME_REPO, "--description", "from /home")
    assert r.returncode == 0, r.stdout + r.stderr
    home_id = re.search(r"did:repo:z\w+", r.stdout).group(0)
    r = mectl(machine, "repo", "list")
    assert home_id in r.stdout and machine.repo_id in r.stdout, r.stdout
    # Only the bound path is visible to the daemon, read-only.
    pid = machine.prop(UNIT, "MainPID")
    r = machine.run(["nsenter", "-t", pid, "-m", "sh", "-c",
                     f"ls -A /home; ls -A /home/alice; touch {HOME_REPO}/x"])
    assert r.stdout.split() == ["alice", "src"], r.stdout
    assert "Read-only file system" in r.stderr, r.stderr


# --- reload, stop, socket activation, watchdog --------------------------------------------------------

def test_reload_rereads_config(machine):
    ids = message_ids()
    pid = machine.prop(UNIT, "MainPID")
    machine.check(f"printf '\\nalias = reloaded-node\\n' >> {CONFIG}")
    t = now_us()
    r = machine.run(["systemctl", "reload", UNIT], timeout=60)
    assert r.returncode == 0, r.stderr
    assert machine.run(["systemctl", "is-active", UNIT]).stdout.strip() == "active"
    assert machine.prop(UNIT, "MainPID") == pid, "reload restarted the daemon"
    e = wait_for("the 'configuration reloaded' journal entry",
                 lambda: daemon_entries(machine, t, MESSAGE_ID=ids["RELOADED"]), 15)
    assert "reload" in e[0]["MESSAGE"] and "alias" in e[0]["MESSAGE"], e[0]["MESSAGE"]
    r = mectl(machine, "node", "status")
    assert r.returncode == 0 and "reloaded-node" in r.stdout, r.stdout + r.stderr


def test_stop_is_clean(machine):
    ids = message_ids()
    t = now_us()
    t0 = time.monotonic()
    r = machine.run(["systemctl", "stop", UNIT], timeout=120)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert took < 20, f"systemctl stop took {took:.1f}s"
    assert machine.run(["systemctl", "is-active", UNIT]).stdout.strip() == "inactive"
    assert machine.prop(UNIT, "Result") == "success"
    assert machine.prop(UNIT, "ExecMainStatus") == "0"
    assert machine.prop(UNIT, "ExecMainCode") == "1"  # CLD_EXITED: it exited, was not killed
    wait_for("the 'stopped' journal entry",
             lambda: daemon_entries(machine, t, MESSAGE_ID=ids["STOPPED"]), 10)
    # The socket unit still holds the control socket.
    assert machine.prop(SOCKET_UNIT, "ActiveState") in ("listening", "active")
    machine.check(["test", "-S", SOCKET])


def test_socket_activation_starts_daemon(machine):
    assert machine.prop(UNIT, "ActiveState") == "inactive"
    r = mectl(machine, "node", "status")
    assert r.returncode == 0, r.stdout + r.stderr
    assert machine.did in r.stdout, r.stdout
    assert machine.run(["systemctl", "is-active", UNIT]).stdout.strip() == "active"
    r = mectl(machine, "repo", "list")
    assert r.returncode == 0 and machine.repo_id in r.stdout, r.stdout + r.stderr


def test_watchdog_restarts_a_hung_daemon(machine):
    wd = timespan_s(machine.prop(UNIT, "WatchdogUSec"))
    assert wd > 0, "no watchdog configured"
    restart_s = timespan_s(machine.prop(UNIT, "RestartUSec"))
    pid = machine.prop(UNIT, "MainPID")
    n0 = int(machine.prop(UNIT, "NRestarts"))
    t = now_us()
    machine.check(["kill", "-STOP", pid])
    t0 = time.monotonic()

    def restarted():
        newpid = machine.prop(UNIT, "MainPID")
        return (int(machine.prop(UNIT, "NRestarts")) > n0 and newpid not in ("0", pid) and
                machine.prop(UNIT, "ActiveState") == "active" and newpid)

    newpid = wait_for(f"a restart by the watchdog (WatchdogSec={wd:g}s)", restarted,
                      2 * wd + restart_s + 10, interval=0.5)
    took = time.monotonic() - t0
    print(f"watchdog restart after {took:.1f}s (WatchdogSec={wd:g}s), pid {pid} -> {newpid}")
    assert took <= 2 * wd + restart_s + 5
    r = machine.run(["journalctl", "-u", UNIT, "--no-pager", "-o", "cat", "--since",
                     f"@{t / 1e6:.6f}"])
    assert "Watchdog timeout" in r.stdout, r.stdout
    # The restarted daemon has the same identity and catalogue.
    r = mectl(machine, "repo", "list")
    assert r.returncode == 0 and machine.repo_id in r.stdout, r.stdout + r.stderr
    r = mectl(machine, "node", "status")
    assert r.returncode == 0 and machine.did in r.stdout


# --- shutdown ---------------------------------------------------------------------------------------

def test_poweroff_stops_daemon_cleanly(machine):
    ids = message_ids()
    t = now_us()
    t0 = time.monotonic()
    rc = machine.poweroff(timeout=60)
    took = time.monotonic() - t0
    assert rc == 0, f"systemd-nspawn exited {rc}"
    assert took < 45, f"poweroff took {took:.1f}s"
    # The container's persistent journal, read from the host after it is gone.
    journal = machine.root / "var/log/journal"
    assert journal.is_dir(), "no persistent journal in the image"
    r = subprocess.run(["journalctl", "-D", str(journal), "-u", UNIT, "-o", "json", "--no-pager",
                        "--since", f"@{t / 1e6:.6f}"], capture_output=True, text=True)
    msgs = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert any(e.get("MESSAGE_ID") == ids["STOPPED"] for e in msgs), \
        "no 'stopped' entry from the daemon during shutdown:\n" + \
        "\n".join(e.get("MESSAGE", "") for e in msgs)
