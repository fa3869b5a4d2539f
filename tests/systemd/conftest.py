"""Fixtures for the booted-systemd tests (nspawn.py has the machinery, README.md the overview).

    image     session scope: the project built with --prefix=/usr (build/nspawn-build) and the
              cached Debian root (build/nspawn/rootfs) up to date
    boot      session scope: boot(name, net_args) -> a booted Container: a fresh copy of the root,
              the project installed (meson install --destdir), its socket unit (or else its
              service) enabled, systemd-nspawn -b; powered off and removed at the end
    machine   module scope (test_booted.py): one container with --private-network (loopback only)

A failing test gets `systemctl status` and the journal tail of the running containers in its
report; build/nspawn/NAME.journal.txt and NAME.console.log keep the last run's logs.
"""
import os
import shutil
import time

import pytest

import nspawn



@pytest.fixture(scope="session", autouse=True)
def _progress_to_terminal(pytestconfig):
    """Progress lines (debootstrap can take minutes) go to the terminal, not pytest's capture."""
    capman = pytestconfig.pluginmanager.getplugin("capturemanager")

    def show(line):
        if capman is not None:
            with capman.global_and_fixture_disabled():
                print(line, flush=True)
        else:
            print(line, flush=True)

    nspawn.set_progress(show)
    yield
    nspawn.set_progress(None)


def fail_once(what, error):
    """Fails a fixture: the details (a log tail) once on the terminal, a one-line reason in the
    report of each test that needed the fixture."""
    nspawn.progress(f"{what}: {error}")
    pytest.fail(f"{what}: {error.splitlines()[0].rstrip(':')} (details above)", pytrace=False)


def unit_path(root, name):
    for d in ("usr/lib/systemd/system", "lib/systemd/system", "etc/systemd/system"):
        p = root / d / name
        if p.exists():
            return p
    return None


@pytest.fixture(scope="session")
def image():
    if os.geteuid() != 0:
        pytest.skip("needs root (debootstrap, systemd-nspawn); CI runs as root")
    t0 = time.monotonic()
    error = None
    try:
        nspawn.cleanup_stale_runs()
        nspawn.build_project()
        nspawn.ensure_cached_root(nspawn.runtime_packages())
    except nspawn.SetupError as e:
        error = str(e)
    if error:
        fail_once("preparing the container image failed", error)
    nspawn.progress(f"image ready after {time.monotonic() - t0:.1f}s")
    yield
    run_dir = nspawn.NSPAWN_DIR / f"run-{os.getpid()}"
    if not os.environ.get("ME_NSPAWN_KEEP"):
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def boot(image):
    booted = []

    def boot_one(name, net_args):
        t0 = time.monotonic()
        box = None
        try:
            root = nspawn.make_run_root(name)
            install_log = nspawn.install_project(root)
            units = [u for u in ("megaengined.socket",) if unit_path(root, u)] or \
                [u for u in ("megaengined.service",) if unit_path(root, u)]
            if not units:
                raise nspawn.SetupError("meson install put no megaengined unit into the image; "
                                        f"install log:\n{install_log}")
            nspawn.enable_units(root, units)
            box = nspawn.Container(root, name, net_args)
            box.enabled_units = units
            box.install_log = install_log
            booted.append(box)
            box.boot()
        except nspawn.SetupError as e:
            error = str(e)
        else:
            error = None
        if error:
            if box is not None:
                nspawn.retire(box)
            fail_once(f"booting container {name} failed", error)
        nspawn.RUNNING.append(box)
        nspawn.progress(f"{name} ready after {time.monotonic() - t0:.1f}s")
        return box

    yield boot_one
    for box in booted:
        nspawn.retire(box)


@pytest.fixture(scope="module")
def machine(boot):
    box = boot("megaengine-test", ["--private-network"])
    yield box
    nspawn.retire(box)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" and rep.failed:
        for box in list(nspawn.RUNNING):
            try:
                text = box.diagnostics()
            except Exception as e:  # diagnostics must never hide the failure itself
                text = f"(unavailable: {e})"
            rep.sections.append((f"container {box.name}", text))
