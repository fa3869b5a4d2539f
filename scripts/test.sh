#!/usr/bin/env bash
# Runs every test: installs what is missing (scripts/setup.sh), builds the release and the
# ASan/UBSan trees, runs the cmocka unit tests (and the fuzz corpora) in both and the pytest
# integration tests against both daemons, fuzzes each libFuzzer target for 10 s (scripts/fuzz.sh),
# then the booted-systemd test (tests/systemd: the project installed into a
# Debian container booted with systemd-nspawn), and ends with one line "N passed, N failed".
set -uo pipefail
. "$(dirname "$0")/env.sh"
cd "$ME_ROOT_DIR"

bash scripts/setup.sh || { echo "0 passed, 1 failed"; exit 1; }
bash scripts/build.sh --asan || { echo "0 passed, 1 failed"; exit 1; }

export ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:halt_on_error=1:strict_string_checks=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"

passed=0
failed=0
tally() { # file with "P F" on one line
	read -r p f <"$1"
	passed=$((passed + p))
	failed=$((failed + f))
}
junit_count() { # pytest's JUnit XML file -> "P F" (a missing or unreadable file is one failure)
	/usr/bin/python3 - "$1" <<'PY'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception:
    print(0, 1); sys.exit()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
t = sum(int(s.get("tests", 0)) for s in suites)
bad = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
skip = sum(int(s.get("skipped", 0)) for s in suites)
print(t - bad - skip, bad if t else 1)
PY
}

for tree in release asan; do
	echo "== unit tests ($tree)"
	meson test -C "build/$tree" --suite unit --print-errorlogs >"build/$tree.unit.log" 2>&1
	grep -E '^ *[0-9]+/[0-9]+ ' "build/$tree.unit.log" || cat "build/$tree.unit.log"
	/usr/bin/python3 - "build/$tree/meson-logs/testlog.json" >"build/$tree.unit.count" <<'PY'
import json, re, sys
# Count cmocka's individual tests; a binary that crashed or printed no summary counts as one
# failure.
p = f = 0
for line in open(sys.argv[1]):
    t = json.loads(line)
    out = t.get("stdout", "") or ""
    run = re.search(r"\[=+\] (\d+) test\(s\) run", out)
    bad = re.search(r"\[  FAILED  \] (\d+) test\(s\)", out)
    if t["result"] == "SKIP":
        continue
    if run:
        nbad = int(bad.group(1)) if bad else 0
        p += int(run.group(1)) - nbad
        f += nbad
    if t["result"] not in ("OK", "EXPECTEDFAIL") and not (run and bad):
        f += 1
print(p, f)
PY
	tally "build/$tree.unit.count"

	echo "== integration tests ($tree)"
	ME_BUILD_DIR="$ME_ROOT_DIR/build/$tree" /usr/bin/python3 -m pytest -q -p no:cacheprovider \
		--junitxml="build/$tree.pytest.xml" tests/integration 2>&1 | tail -n 25
	junit_count "build/$tree.pytest.xml" >"build/$tree.pytest.count"
	tally "build/$tree.pytest.count"
done

# libFuzzer: every target of tests/fuzz for a short fixed time under ASan/UBSan (its own clang
# build, build/fuzz); one test per target.
echo "== fuzzing (scripts/fuzz.sh, 10 s per target)"
echo "0 1" >build/fuzz.count
bash scripts/fuzz.sh --count build/fuzz.count 10 2>&1
tally build/fuzz.count

# megaengine as a system service under a booted systemd: a cached Debian root (debootstrap),
# the build installed into a copy of it, booted with systemd-nspawn (tests/systemd/README.md).
echo "== booted systemd (tests/systemd)"
rm -f build/systemd.pytest.xml
/usr/bin/python3 -m pytest -q -p no:cacheprovider --junitxml=build/systemd.pytest.xml \
	tests/systemd 2>&1
junit_count build/systemd.pytest.xml >build/systemd.pytest.count
tally build/systemd.pytest.count

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
