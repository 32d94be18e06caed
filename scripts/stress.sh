#!/usr/bin/env bash
# Runs the Rust and the Node suites N rounds (default 20) while a CPU hog keeps
# every core busy, and reports "N passed, M failed". Both suites run every
# round, so a Rust failure never hides the Node result. Before the rounds, once
# per run, the 100,000-task soak (tests/soak.rs) runs on idle cores and prints
# its figures. Exits non-zero when the soak or any round failed.
# Usage: scripts/stress.sh [rounds]   (npm run test:stress -- 3)
set -u
rounds="${1:-${STRESS_ROUNDS:-20}}"
cd "$(dirname "$0")/.."
logs="$(mktemp -d "${TMPDIR:-/tmp}/registrar-stress.XXXXXX")"

hogs=()
stop_hogs() {
  for pid in "${hogs[@]}"; do kill "$pid" 2>/dev/null; done
  wait 2>/dev/null
}
trap stop_hogs EXIT
trap 'exit 130' INT TERM

# The same --target as npm test (scripts/test.mjs), so nothing is compiled twice.
host="$(rustc -vV | sed -n 's/^host: //p')"
echo "building (the debug addon and the Rust tests) before loading the cores"
node scripts/test.mjs rust >"$logs/build.log" 2>&1 || { echo "build or first Rust run failed: $logs/build.log"; exit 1; }

# The soak is about memory, descriptors and tasks over many tasks, not about load:
# it runs once, before the hogs start, so that it takes minutes, not tens of them.
echo "soak: 100,000 mixed tasks after a 200,000-task warm-up (minutes)"
soak_ok=1
if cargo test --quiet --target "$host" --test soak -- --ignored --nocapture >"$logs/soak.log" 2>&1; then
  grep '^soak:' "$logs/soak.log"
else
  soak_ok=0
  grep '^soak:' "$logs/soak.log"
  echo "soak FAILED (see $logs/soak.log)"
fi

cores="$(getconf _NPROCESSORS_ONLN 2>/dev/null || nproc 2>/dev/null || echo 2)"
for _ in $(seq "$cores"); do
  yes >/dev/null &
  hogs+=("$!")
done
echo "$cores CPU hogs running; $rounds rounds; logs in $logs"

# The property tests (proptest) run 700 to 3,000 cases each in a plain
# `cargo test`; a stress round runs 5,000 each (override with PROPTEST_CASES),
# about 1.5 min more per round on a loaded 2-core machine (stress rounds differ
# in their random seeds too, so 20 rounds cover 20 times as many cases).
export PROPTEST_CASES="${PROPTEST_CASES:-5000}"

passed=0
failed=0
for round in $(seq "$rounds"); do
  ok=1
  if ! cargo test --quiet --target "$host" >"$logs/rust-$round.log" 2>&1; then
    ok=0
    echo "round $round: Rust suite FAILED (see $logs/rust-$round.log)"
  fi
  if ! node scripts/node-suite.mjs >"$logs/node-$round.log" 2>&1; then
    ok=0
    echo "round $round: Node suite FAILED (see $logs/node-$round.log)"
  fi
  if [ "$ok" = 1 ]; then
    passed=$((passed + 1))
    echo "round $round: passed"
  else
    failed=$((failed + 1))
  fi
done

echo "$passed passed, $failed failed; soak $([ "$soak_ok" = 1 ] && echo passed || echo FAILED)"
[ "$failed" = 0 ] && [ "$soak_ok" = 1 ]
