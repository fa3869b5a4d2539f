#!/usr/bin/env bash
# The main job, end to end: installs what is missing, builds megaengine, then walks through a
# first session with the freshly built binaries (build/release) in a throw-away directory:
#   a small generated git repository -> `mectl auth init` (before any daemon: the seed order)
#   -> megaengined in the background -> repo add / list / show, node status -> a second node
#   that joins through the first (QUIC on loopback), learns its repository by gossip and
#   mirrors it (verified git bundle over QUIC) -> mectl repo clone there -> a new commit on the
#   first node reaches the mirror, mectl repo pull fast-forwards the clone -> clean stop of both.
# Every step is echoed as "$ command" before its output. Exits non-zero on any failure; the
# daemon is stopped and the directory removed on any exit (ME_DEMO_KEEP=1 keeps the directory).
set -euo pipefail
# shellcheck source=scripts/env.sh
. "$(dirname "$0")/env.sh"
cd "$ME_ROOT_DIR"

if [ -t 1 ]; then BOLD=$'\033[1m' NORM=$'\033[0m'; else BOLD="" NORM=""; fi
say() { printf '\n%s== %s%s\n' "$BOLD" "$*" "$NORM"; }
show() { printf '$ %s\n' "$*"; }
# Shows a command as one would type it (arguments with spaces quoted), then runs it.
run() {
	local a words=()
	for a in "$@"; do
		if [[ $a =~ ^[A-Za-z0-9_./:@=+,%-]+$ ]]; then
			words+=("$a")
		else
			a=${a//\\/\\\\}; a=${a//\"/\\\"}; a=${a//\$/\\\$}; a=${a//\`/\\\`}
			words+=("\"$a\"")
		fi
	done
	show "${words[*]}"
	"$@"
}

say "Installing dependencies (scripts/setup.sh)"
bash scripts/setup.sh
say "Building (scripts/build.sh -> build/release)"
bash scripts/build.sh

BIN="$ME_ROOT_DIR/build/release"
for b in "$BIN/daemon/megaengined" "$BIN/client/mectl"; do
	[ -x "$b" ] || { echo "demo: $b was not built" >&2; exit 1; }
done
# So that the commands below read as a user would type them.
export PATH="$BIN/client:$BIN/daemon:$PATH"
unset MEGAENGINE_ROOT MEGAENGINE_SOCKET MEGAENGINE_LOG

WORK="$(mktemp -d "${TMPDIR:-/tmp}/megaengine-demo.XXXXXX")"
ROOT="$WORK/root"
REPO="$WORK/hello-world"
LOG="$WORK/megaengined.log"
DAEMON_PID=""
DAEMON2_PID=""
ROOT2="$WORK/root2"
CLONE="$WORK/clone-on-second"
LOG2="$WORK/megaengined2.log"
STATUS=1

stop_pid() {
	local pid=$1
	[ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
	kill -TERM "$pid" 2>/dev/null || true
	for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
	kill -KILL "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
}

cleanup() {
	local rc=$?
	stop_pid "$DAEMON2_PID"
	stop_pid "$DAEMON_PID"
	if [ "$STATUS" -ne 0 ] || [ "$rc" -ne 0 ]; then
		echo >&2
		echo "demo: FAILED (exit $rc)" >&2
		for l in "$LOG" "$LOG2"; do
			if [ -s "$l" ]; then
				echo "demo: megaengined's log ($l):" >&2
				sed 's/^/    /' "$l" >&2
			fi
		done
		[ "$rc" -ne 0 ] || rc=1
	fi
	if [ "${ME_DEMO_KEEP:-0}" = 1 ]; then
		echo "demo: kept $WORK"
	else
		rm -rf "$WORK"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Free local UDP ports (QUIC) for the two daemons.
free_port() {
	python3 -c 'import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
PORT="$(free_port)"
PORT2="$(free_port)"
while [ "$PORT2" = "$PORT" ]; do PORT2="$(free_port)"; done

say "1. A small git repository to publish"
export GIT_AUTHOR_NAME="Demo User" GIT_AUTHOR_EMAIL=demo@example.invalid
export GIT_COMMITTER_NAME="Demo User" GIT_COMMITTER_EMAIL=demo@example.invalid
run git init -q -b main "$REPO"
printf '# hello-world\n\nA repository made by scripts/demo.sh.\n' >"$REPO/README.md"
run git -C "$REPO" add README.md
run git -C "$REPO" commit -q -m "Initial commit"
printf 'int main(void) { return 0; }\n' >"$REPO/main.c"
run git -C "$REPO" add main.c
run git -C "$REPO" commit -q -m "Add main.c"
run git -C "$REPO" tag -a v0.1 -m "First release"
run git -C "$REPO" checkout -q -b feature
printf 'TODO: more features\n' >"$REPO/TODO"
run git -C "$REPO" add TODO
run git -C "$REPO" commit -q -m "Start a feature"
run git -C "$REPO" checkout -q main
run git -C "$REPO" log --oneline --graph --all --decorate

say "2. Create the node identity: no daemon needed yet"
run mectl --root "$ROOT" auth init
run ls -l "$ROOT/keypair"

say "3. Start the daemon in the background"
show "megaengined --root $ROOT --addr 127.0.0.1:$PORT >$LOG 2>&1 &"
megaengined --root "$ROOT" --addr "127.0.0.1:$PORT" >"$LOG" 2>&1 &
DAEMON_PID=$!
ready=0
for _ in $(seq 100); do
	if ! kill -0 "$DAEMON_PID" 2>/dev/null; then
		echo "demo: megaengined exited during start-up" >&2
		exit 1
	fi
	# node status is always answered by the daemon itself (auth/node id work without one).
	if mectl --root "$ROOT" --timeout 2 node status >/dev/null 2>&1; then
		ready=1
		break
	fi
	sleep 0.1
done
[ "$ready" = 1 ] || { echo "demo: megaengined did not answer within 10 s" >&2; exit 1; }
echo "megaengined is running (pid $DAEMON_PID), control socket $ROOT/megaengined.sock"
run mectl --root "$ROOT" auth show

say "4. Publish the repository"
show "mectl --root $ROOT repo add --path $REPO --description \"Demo repository\""
out="$(mectl --root "$ROOT" repo add --path "$REPO" --description "Demo repository")"
printf '%s\n' "$out"
REPO_ID="$(printf '%s\n' "$out" | grep -o 'did:repo:z[1-9A-HJ-NP-Za-km-z]*' | head -n 1)"
[ -n "$REPO_ID" ] || { echo "demo: repo add printed no did:repo" >&2; exit 1; }

say "5. Look at it"
run mectl --root "$ROOT" repo list
run mectl --root "$ROOT" repo show "$REPO_ID"
run mectl --root "$ROOT" node status

say "6. A second node joins through the first (QUIC on loopback)"
NODE1_DID="$(mectl --root "$ROOT" auth show)"
run mectl --root "$ROOT2" auth init
show "megaengined --root $ROOT2 --alias second --addr 127.0.0.1:$PORT2 --bootstrap-node $NODE1_DID@127.0.0.1:$PORT >$LOG2 2>&1 &"
megaengined --root "$ROOT2" --alias second --addr "127.0.0.1:$PORT2" \
	--bootstrap-node "$NODE1_DID@127.0.0.1:$PORT" >"$LOG2" 2>&1 &
DAEMON2_PID=$!
echo "waiting for the second node to learn the repository by gossip..."
learnt=0
start_ms=$(date +%s%3N)
for _ in $(seq 200); do
	kill -0 "$DAEMON2_PID" 2>/dev/null || { echo "demo: the second megaengined exited" >&2; exit 1; }
	if mectl --root "$ROOT2" --timeout 2 repo list --json 2>/dev/null | grep -q "$REPO_ID"; then
		learnt=1
		break
	fi
	sleep 0.1
done
[ "$learnt" = 1 ] || { echo "demo: the second node did not learn $REPO_ID within 20 s" >&2; exit 1; }
echo "learnt after $(( $(date +%s%3N) - start_ms )) ms"
run mectl --root "$ROOT2" peer list
run mectl --root "$ROOT2" node list

say "7. Replication: the second node mirrors the repository, a user clones it there"
# repo sync waits until the mirror holds the newest signed state (it fetches at once anyway).
run mectl --root "$ROOT2" repo sync "$REPO_ID"
run mectl --root "$ROOT2" repo list
MIRROR="$ROOT2/repos/${REPO_ID#did:repo:}.git"
run git -C "$MIRROR" fsck --strict --no-dangling
run git -C "$MIRROR" for-each-ref --format='%(objectname:short) %(refname)'
run mectl --root "$ROOT2" repo clone --repo-id "$REPO_ID" --output "$CLONE"
run git -C "$CLONE" log --oneline --graph --all --decorate

say "8. A new commit on the first node reaches the second; pull brings it into the clone"
printf 'int main(void) { return 42; }\n' >"$REPO/main.c"
run git -C "$REPO" commit -q -am "Return the answer"
NEW="$(git -C "$REPO" rev-parse HEAD)"
echo "waiting for the second node's mirror to have $NEW..."
got=0
start_ms=$(date +%s%3N)
for _ in $(seq 200); do
	if [ "$(git -C "$MIRROR" rev-parse -q --verify refs/heads/main 2>/dev/null)" = "$NEW" ]; then
		got=1
		break
	fi
	sleep 0.05
done
[ "$got" = 1 ] || { echo "demo: the commit did not reach the second node within 10 s" >&2; exit 1; }
echo "mirrored $(( $(date +%s%3N) - start_ms )) ms after the commit"
run mectl --root "$ROOT2" repo list
run mectl --root "$ROOT2" repo pull --repo-id "$REPO_ID" --path "$CLONE"
run git -C "$CLONE" log --oneline -1
[ "$(git -C "$CLONE" rev-parse HEAD)" = "$NEW" ] || { echo "demo: pull did not fast-forward" >&2; exit 1; }
run mectl --root "$ROOT2" repo list

say "9. Stop both daemons"
for pair in "$DAEMON2_PID:$ROOT2" "$DAEMON_PID:$ROOT"; do
	pid=${pair%%:*}
	root=${pair#*:}
	show "kill -TERM $pid"
	kill -TERM "$pid"
	rc=0
	wait "$pid" || rc=$?
	[ "$rc" -eq 0 ] || { echo "demo: megaengined ($root) exited with $rc" >&2; exit 1; }
	[ ! -e "$root/megaengined.sock" ] || { echo "demo: $root/megaengined.sock was left behind" >&2; exit 1; }
done
DAEMON_PID=""
DAEMON2_PID=""
echo "both daemons stopped cleanly (exit 0, control sockets removed)"
show "cat $LOG"
sed 's/^/    /' "$LOG"

STATUS=0
say "Done. Where things were"
cat <<EOF
  binaries         $BIN/daemon/megaengined, $BIN/client/mectl
  git repository   $REPO
  data root        $ROOT
    identity       $ROOT/keypair (mode 0600)
    database       $ROOT/megaengine.db (SQLite: repos, refs, nodes)
    control socket $ROOT/megaengined.sock (only while the daemon runs)
  daemon log       $LOG
  second node      $ROOT2 (log $LOG2)
    mirror         $ROOT2/repos/${REPO_ID#did:repo:}.git (bare; origin of the clone)
  clone            $CLONE
  repository id    $REPO_ID
EOF
if [ "${ME_DEMO_KEEP:-0}" != 1 ]; then
	echo "(all under $WORK, removed now; run with ME_DEMO_KEEP=1 to keep it)"
fi
