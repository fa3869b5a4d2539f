"""The systemd files, checked offline with the host's systemd tools (no PID 1 needed):
`systemd-analyze security --offline=yes` scores the service 2.0 or lower, `systemd-analyze
verify` accepts the service and socket units (with the man pages they name findable),
`systemd-sysusers` accepts the sysusers.d entry, and `meson install --destdir` lays out every
file where systemd and the daemon expect it. The booted-systemd behaviour is tested in
tests/systemd/.
"""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import BUILD_DIR, MEGAENGINED, REPO_DIR

SYSTEMD_DIR = REPO_DIR / "systemd"
MAX_EXPOSURE = 2.0


def need(tool):
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (Debian package systemd)")
    return path


def exposure(unit_path):
    """Runs systemd-analyze security --offline=yes on unit_path; returns (score, output)."""
    need("systemd-analyze")
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager",
                        str(unit_path)], capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    m = re.search(r"Overall exposure level for megaengined\.service: (\d+\.\d+) (\w+)", out)
    assert m, f"no overall exposure level in:\n{out}"
    return float(m.group(1)), out


@pytest.mark.parametrize("which", ["source", "build"])
def test_security_exposure(which):
    unit = SYSTEMD_DIR / "megaengined.service" if which == "source" else \
        BUILD_DIR / "systemd" / "megaengined.service"
    assert unit.exists(), unit
    score, out = exposure(unit)
    assert score <= MAX_EXPOSURE, f"exposure {score} > {MAX_EXPOSURE}:\n{out}"


def test_build_unit_differs_only_in_execstart():
    src = (SYSTEMD_DIR / "megaengined.service").read_text().splitlines()
    built = (BUILD_DIR / "systemd" / "megaengined.service").read_text().splitlines()
    assert len(src) == len(built)
    diff = [(a, b) for a, b in zip(src, built) if a != b]
    assert all(a.startswith("ExecStart=") for a, _ in diff), diff
    start = [b for b in built if b.startswith("ExecStart=")]
    assert len(start) == 1
    exe = start[0].split("=", 1)[1].split()[0]
    prefix, sbindir = build_option("prefix"), build_option("sbindir")
    assert exe == os.path.join(prefix, sbindir, "megaengined"), (exe, prefix, sbindir)


def test_unit_settings():
    """What the daemon relies on; the hardening itself is scored by systemd-analyze."""
    text = (SYSTEMD_DIR / "megaengined.service").read_text()
    for line in ["Type=notify", "NotifyAccess=main", "WatchdogSec=30s", "Restart=on-failure",
                 "ExecReload=/bin/kill -HUP $MAINPID", "User=megaengine", "Group=megaengine",
                 "StateDirectory=megaengine", "Environment=MEGAENGINE_ROOT=/var/lib/megaengine",
                 "RuntimeDirectory=megaengine", "RuntimeDirectoryMode=0750",
                 "RuntimeDirectoryPreserve=yes", "CapabilityBoundingSet=", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                 "MemoryDenyWriteExecute=yes", "SystemCallFilter=@system-service"]:
        assert re.search("^" + re.escape(line) + "$", text, re.M), line
    assert re.search(r"^RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", text, re.M)
    assert re.search(r"^ExecStart=\S+ --socket /run/megaengine/control.sock "
                     r"--socket-group megaengine$", text, re.M)
    assert not re.search(r"^IPAddressDeny=", text, re.M), "a p2p node must reach any address"
    sock = (SYSTEMD_DIR / "megaengined.socket").read_text()
    for line in ["ListenStream=/run/megaengine/control.sock", "SocketGroup=megaengine",
                 "SocketMode=0660", "Service=megaengined.service"]:
        assert re.search("^" + re.escape(line) + "$", sock, re.M), line


def test_verify(tmp_path):
    """systemd-analyze verify works offline: it needs no running systemd. The copy under test
    names the built daemon (verify checks that ExecStart= is executable) and MANPATH holds the
    man pages the units' Documentation= names (verify runs man(1) on them)."""
    need("systemd-analyze")
    have_man = shutil.which("man") is not None  # without it, Documentation= goes unchecked
    units = tmp_path / "units"
    units.mkdir()
    text = (SYSTEMD_DIR / "megaengined.service").read_text()
    text, n = re.subn(r"^ExecStart=/usr/sbin/megaengined ", f"ExecStart={MEGAENGINED} ", text,
                      flags=re.M)
    assert n == 1
    (units / "megaengined.service").write_text(text)
    shutil.copy(SYSTEMD_DIR / "megaengined.socket", units)
    man = tmp_path / "man"
    for sec, page in (("1", "mectl.1"), ("8", "megaengined.8")):
        (man / f"man{sec}").mkdir(parents=True)
        shutil.copy(REPO_DIR / "docs" / "man" / page, man / f"man{sec}")
    env = dict(os.environ, MANPATH=str(man), SYSTEMD_LOG_LEVEL="notice")
    r = subprocess.run(["systemd-analyze", "verify", "--no-pager", f"--man={have_man}".lower(),
                        str(units / "megaengined.service"), str(units / "megaengined.socket")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr


def test_sysusers(tmp_path):
    need("systemd-sysusers")
    for f in ("passwd", "group", "shadow", "gshadow"):
        (tmp_path / "etc").mkdir(exist_ok=True)
        (tmp_path / "etc" / f).write_text("")
    r = subprocess.run(["systemd-sysusers", f"--root={tmp_path}",
                        str(SYSTEMD_DIR / "megaengine-sysusers.conf")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    user = (tmp_path / "etc" / "passwd").read_text().strip().split(":")
    assert user[0] == "megaengine" and user[5] == "/var/lib/megaengine", user
    assert int(user[2]) < 1000, "a system user"
    group = (tmp_path / "etc" / "group").read_text().strip().split(":")
    assert group[0] == "megaengine" and group[2] == user[3], group


def test_default_config_file_is_all_comments_and_valid(daemon_factory, tmp_path):
    """The shipped file changes nothing (every key commented out), names every key of --help,
    and its example lines, uncommented, are accepted as they stand."""
    text = (SYSTEMD_DIR / "megaengined.conf").read_text()
    assert all(ln == "" or ln.startswith("#") for ln in text.splitlines())
    keys = ["root", "alias", "addr", "bootstrap-node", "announce-addr", "gossip-interval",
            "max-outbound", "cert-path", "socket", "socket-group", "log-level"]
    help_text = subprocess.run([str(MEGAENGINED), "--help"], capture_output=True,
                               text=True).stdout
    for k in keys:
        assert re.search(rf"^#{re.escape(k)} = ", text, re.M), k
        assert f"--{k}" in help_text, k
    # Not these: machine-specific (paths, the group, ports on all addresses, placeholders).
    skip = ("root", "socket", "socket-group", "cert-path", "addr", "bootstrap-node")
    lines = [ln[1:] for ln in text.splitlines()
             if re.match(r"^#[a-z-]+ = ", ln) and ln[1:].split(" ")[0] not in skip]
    assert len(lines) >= 4, lines
    conf = tmp_path / "c.conf"
    conf.write_text("\n".join(lines) + "\n")
    d = daemon_factory.start(extra_args=["--config", conf], log_level=None)
    d.stop()


def build_option(name):
    out = subprocess.run(["meson", "introspect", "--buildoptions", str(BUILD_DIR)],
                         capture_output=True, text=True, check=True).stdout
    for o in json.loads(out):
        if o["name"] == name:
            return o["value"]
    raise KeyError(name)


def test_meson_install_layout(tmp_path):
    """meson install --destdir: binaries, units (ExecStart= names the installed daemon),
    sysusers.d entry, configuration file and man pages."""
    if shutil.which("meson") is None:
        pytest.skip("meson is not installed")
    dest = tmp_path / "dest"
    r = subprocess.run(["meson", "install", "--no-rebuild", "--quiet", "--destdir", str(dest),
                        "-C", str(BUILD_DIR)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr

    def d(*parts):
        return dest / os.path.join(*parts).lstrip("/")
    prefix = build_option("prefix")
    sysconfdir = os.path.join(prefix, build_option("sysconfdir"))
    unitdir = build_option("systemdsystemunitdir") or subprocess.run(
        ["pkg-config", "--variable=systemdsystemunitdir", "systemd"], capture_output=True,
        text=True).stdout.strip()
    sysusersdir = build_option("sysusersdir") or subprocess.run(
        ["pkg-config", "--variable=sysusersdir", "systemd"], capture_output=True,
        text=True).stdout.strip()
    sbin = d(prefix, build_option("sbindir"), "megaengined")
    assert os.access(sbin, os.X_OK)
    assert os.access(d(prefix, build_option("bindir"), "mectl"), os.X_OK)
    service = d(unitdir, "megaengined.service").read_text()
    m = re.search(r"^ExecStart=(\S+)", service, re.M)
    assert m and d(m.group(1)) == sbin, (m and m.group(1), sbin)
    assert d(unitdir, "megaengined.socket").is_file()
    assert "u megaengine " in d(sysusersdir, "megaengine.conf").read_text()
    conf = d(sysconfdir, "megaengine", "megaengined.conf")
    assert conf.read_text() == (SYSTEMD_DIR / "megaengined.conf").read_text()
    mandir = os.path.join(prefix, build_option("mandir"))
    assert d(mandir, "man8", "megaengined.8").is_file()
    assert d(mandir, "man1", "mectl.1").is_file()
    # The daemon looks for the configuration file where it is installed.
    help_text = subprocess.run([str(MEGAENGINED), "--help"], capture_output=True,
                               text=True).stdout
    assert os.path.join(sysconfdir, "megaengine", "megaengined.conf") in help_text


def test_man_pages_cover_help():
    """Every option of --help is documented in the man page, and man(1) renders the pages
    without warnings."""
    for binary, page in ((MEGAENGINED, "megaengined.8"), (BUILD_DIR / "client" / "mectl",
                                                           "mectl.1")):
        help_text = subprocess.run([str(binary), "--help"], capture_output=True,
                                   text=True).stdout
        src = (REPO_DIR / "docs" / "man" / page).read_text().replace("\\-", "-")
        for opt in sorted(set(re.findall(r"--[a-z][a-z-]+", help_text))):
            assert opt in src, f"{page} does not document {opt}"
        for sect in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "FILES", "ENVIRONMENT",
                     "EXIT STATUS", "EXAMPLES", "SEE ALSO"):
            assert re.search(rf"^\.SH {sect}$", src, re.M), f"{page}: no {sect} section"
        if shutil.which("man"):
            r = subprocess.run(["man", "--warnings", "-l", str(REPO_DIR / "docs" / "man" / page)],
                               capture_output=True, text=True,
                               env=dict(os.environ, MANWIDTH="80", LC_ALL="C.UTF-8"))
            assert r.returncode == 0 and r.stderr == "", r.stderr
