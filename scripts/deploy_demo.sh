#!/usr/bin/env bash
# make deploy-demo: a SuperLink, a SuperNode running the simulated MCU client, a SuperNode bridged
# to a device emulator, two rounds with `flwr run`, the summary, then every process stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$PWD/.venv/bin"
export PATH="$BIN:$PATH"           # the SuperLink and SuperNodes spawn flower-superexec, flwr-serverapp, ...
WORK="$(mktemp -d /tmp/fedtiny-deploy-XXXXXX)"
export FLWR_HOME="$WORK/flwr"          # keep the user's ~/.flwr untouched
mkdir -p "$FLWR_HOME"
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do pkill -TERM -P "$pid" 2>/dev/null || true; kill -TERM "$pid" 2>/dev/null || true; done
    sleep 2
    for pid in "${PIDS[@]}"; do pkill -KILL -P "$pid" 2>/dev/null || true; kill -KILL "$pid" 2>/dev/null || true; done
    # apps the SuperLink/SuperNodes spawned run in their own process groups: stop what this demo started
    pkill -KILL -f "$FLWR_HOME" 2>/dev/null || true
}
trap cleanup EXIT

wait_port() {  # wait until something listens on 127.0.0.1:$1
    for _ in $(seq 1 120); do
        "$BIN/python" -c "import socket,sys; s=socket.socket(); s.settimeout(0.5); sys.exit(s.connect_ex(('127.0.0.1', $1)))" && return 0
        sleep 0.5
    done
    echo "deploy-demo: nothing listens on port $1 (see $WORK/*.log)" >&2
    return 1
}

SUPERLINK_PORT=8000 DEVICE_PORT=7001
echo "[deploy-demo] logs in $WORK"
"$BIN/flower-superlink" --insecure --disable-runtime-dependency-installation --port "$SUPERLINK_PORT" \
    --database "$WORK/superlink.db" > "$WORK/superlink.log" 2>&1 &
PIDS+=($!)
wait_port "$SUPERLINK_PORT"

"$BIN/fedtiny" device-emulator --port "$DEVICE_PORT" --profile nrf52832 --scenario scenarios/deploy-demo.toml \
    --data 1 > "$WORK/device.log" 2>&1 &
PIDS+=($!)
wait_port "$DEVICE_PORT"

"$BIN/flower-supernode" --insecure --superlink "127.0.0.1:$SUPERLINK_PORT" --port 9094 \
    --node-config "partition-id=0 num-partitions=2" > "$WORK/supernode-0.log" 2>&1 &
PIDS+=($!)
"$BIN/flower-supernode" --insecure --superlink "127.0.0.1:$SUPERLINK_PORT" --port 9095 \
    --node-config "partition-id=1 num-partitions=2 device-address=\"127.0.0.1:$DEVICE_PORT\"" \
    > "$WORK/supernode-1.log" 2>&1 &
PIDS+=($!)

cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "deploy-demo"

[superlink.deploy-demo]
address = "127.0.0.1:$SUPERLINK_PORT"
insecure = true
TOML

RUN_DIR="$WORK/run"
PATH="$BIN:$PATH" "$BIN/flwr" run . deploy-demo --stream \
    --run-config "scenario=\"scenarios/deploy-demo.toml\" run-dir=\"$RUN_DIR\"" > "$WORK/flwr-run.log" 2>&1 &
RUN_PID=$!
PIDS+=($RUN_PID)
for _ in $(seq 1 600); do
    [ -f "$RUN_DIR/summary.json" ] && break
    kill -0 "$RUN_PID" 2>/dev/null || { sleep 2; break; }
    sleep 1
done
if [ ! -f "$RUN_DIR/summary.json" ]; then
    echo "deploy-demo: the run did not finish; last lines of its logs:" >&2
    tail -n 20 "$WORK/flwr-run.log" "$WORK/superlink.log" "$WORK/supernode-1.log" "$WORK/device.log" >&2
    exit 1
fi
echo "[deploy-demo] device log:"; sed 's/^/    /' "$WORK/device.log"
"$BIN/python" - "$RUN_DIR" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
s = json.loads((run / "summary.json").read_text())
recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
print(f"[deploy-demo] rounds {s['rounds']}, final accuracy {s['final_accuracy']:.4f}, "
      f"uplink {s['uplink_bytes_total']:,} B, downlink {s['downlink_bytes_total']:,} B, "
      f"rejected {s['rejected_updates_total']}, refused {s['refused_clients_total']}")
for r in recs[1:]:
    print(f"    round {r['round']}: clients {[c['partition_id'] for c in r['clients']]}, "
          f"rejected {[x['partition_id'] for x in r['rejected']]}, acc {r['global_accuracy']:.4f}")
ok = s["rounds"] == 2 and all(sorted(c["partition_id"] for c in r["clients"]) == [0, 1] for r in recs[1:])
sys.exit(0 if ok else 1)
PY
