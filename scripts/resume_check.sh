#!/usr/bin/env bash
# Kill-and-resume check: a run SIGKILLed once round 3 is on disk, and a sweep SIGKILLed in its second
# method, are resumed with `fedtiny run --resume`; their metrics.jsonl must equal an uninterrupted
# run's apart from elapsed_s. Usage: scripts/resume_check.sh [WORK_DIR]  (default: a temporary folder)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
F="$ROOT/.venv/bin/fedtiny"
S="$ROOT/scenarios"
W="${1:-$(mktemp -d)}"
mkdir -p "$W" && cd "$W"
same() {  # same METRICS_A METRICS_B: the records equal apart from elapsed_s
  "$ROOT/.venv/bin/python" - "$1" "$2" <<'PY'
import json, sys
a, b = ([json.loads(l) for l in open(p)] for p in sys.argv[1:3])
diff = sorted({k for x, y in zip(a, b) for k in set(x) | set(y) if k != "elapsed_s" and x.get(k) != y.get(k)})
print(f"  {len(a)} and {len(b)} records; keys differing besides elapsed_s: {diff or 'none'}")
sys.exit(0 if len(a) == len(b) and not diff else 1)
PY
}
kill_when() {  # kill_when FILE PATTERN PID: SIGKILL the process group once FILE holds PATTERN
  until [ -f "$1" ] && grep -q "$2" "$1"; do sleep 0.2; done
  kill -9 -- "-$3" 2>/dev/null || true
  wait "$3" 2>/dev/null || true
}
echo "work folder: $W"
echo "run: quickstart, 5 rounds, killed after round 3"
"$F" run "$S/quickstart.toml" --set run.rounds=5 --out plain > plain.log 2>&1
setsid "$F" run "$S/quickstart.toml" --set run.rounds=5 --out cut > cut.log 2>&1 &
kill_when cut/metrics.jsonl '"round": 3' $!
"$F" run --resume cut > resume.log 2>&1
grep "resuming after" resume.log
same plain/metrics.jsonl cut/metrics.jsonl
echo "sweep: compression.toml, 4 rounds, killed in its second method"
"$F" run "$S/compression.toml" --set run.rounds=4 --out splain > splain.log 2>&1
second=$("$ROOT/.venv/bin/python" -c "import tomllib,sys; print(list(tomllib.load(open(sys.argv[1],'rb'))['methods'])[1])" "$S/compression.toml")
setsid "$F" run "$S/compression.toml" --set run.rounds=4 --out scut > scut.log 2>&1 &
kill_when "scut/$second/metrics.jsonl" '"round": 2' $!
"$F" run --resume scut > sresume.log 2>&1
for m in $(ls -d splain/*/ | xargs -n1 basename); do
  echo " method $m:"; same "splain/$m/metrics.jsonl" "scut/$m/metrics.jsonl"
done
echo "resume check passed"
