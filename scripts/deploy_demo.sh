#!/usr/bin/env bash
# make deploy-demo: a SuperLink, a SuperNode running the simulated MCU client, a SuperNode bridged
# to a device emulator, two rounds with `flwr run`, the summary, then every process stopped.
#
# TLS=1 (make deploy-demo TLS=1): the same, secured. A throw-away CA and a SuperLink certificate
# for localhost/127.0.0.1 are made with OpenSSL; the SuperLink serves TLS and requires SuperNode
# authentication; each SuperNode has its own ECDSA P-384 key pair, whose public key is registered
# with `flwr supernode register` before it connects; `flwr run` trusts the CA through
# `root-certificates` in config.toml. After the run, a third SuperNode with a fresh, unregistered
# key must be refused by the SuperLink, and no command line of the demo may contain --insecure.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$PWD/.venv/bin"
export PATH="$BIN:$PATH"           # the SuperLink and SuperNodes spawn flower-superexec, flwr-serverapp, ...
WORK="$(mktemp -d /tmp/fedtiny-deploy-XXXXXX)"
export FLWR_HOME="$WORK/flwr"          # keep the user's ~/.flwr untouched
mkdir -p "$FLWR_HOME"
PIDS=()
case "${TLS:-0}" in 1|true|yes|on) TLS=1 ;; *) TLS=0 ;; esac

cleanup() {
    for pid in "${PIDS[@]}"; do pkill -TERM -P "$pid" 2>/dev/null || true; kill -TERM "$pid" 2>/dev/null || true; done
    sleep 2
    for pid in "${PIDS[@]}"; do pkill -KILL -P "$pid" 2>/dev/null || true; kill -KILL "$pid" 2>/dev/null || true; done
    # apps the SuperLink/SuperNodes spawned run in their own process groups: stop what this demo started
    pkill -KILL -f "$FLWR_HOME" 2>/dev/null || true
    # the SuperExecs they auto-launch name the demo's certificates (TLS) or its ports; they exit
    # with their parent, but stop any that is still up now
    pkill -KILL -f "flower-superexec .*$WORK/" 2>/dev/null || true
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

CMDS="$WORK/commands.txt"              # every command line this demo runs (checked in TLS mode)
: > "$CMDS"
record() { printf '%s\n' "$*" >> "$CMDS"; }

SUPERLINK_PORT=8000 DEVICE_PORT=7001
# FIRMWARE=1 (make firmware-demo): the bridged device is the Cortex-M firmware in QEMU (its UART on
# DEVICE_PORT, a serial line: the bridge opens each exchange), built by `make firmware` for
# scenarios/firmware-demo.toml; the last line is a JSON summary.
case "${FIRMWARE:-0}" in 1|true|yes|on) FIRMWARE=1 ;; *) FIRMWARE=0 ;; esac
BOARD="${BOARD:-an386}"
if [ "$FIRMWARE" = 1 ]; then
    # absolute: the model file it names is not part of the app bundle Flower ships to the SuperLink
    SCENARIO="$PWD/${FIRMWARE_SCENARIO:-scenarios/firmware-demo.toml}" DEVICE_ADDRESS="serial:127.0.0.1:$DEVICE_PORT"
    # two of the scenario's clients for two rounds, as `make firmware` built the image (FIRMWARE_SET)
    OVERRIDES="$(printf '%s;' ${FIRMWARE_SET:-run.clients=2 run.rounds=2})"
    ELF="build/firmware/$BOARD/firmware.elf"
    [ -f "$ELF" ] || { echo "deploy-demo: $ELF is missing: run make firmware" >&2; exit 2; }
else
    SCENARIO=scenarios/deploy-demo.toml DEVICE_ADDRESS="127.0.0.1:$DEVICE_PORT" OVERRIDES=""
fi
echo "[deploy-demo] logs in $WORK"

if [ "$TLS" = 1 ]; then
    CERTS="$WORK/certs" KEYS="$WORK/keys"
    mkdir -p "$CERTS" "$KEYS"
    # a throw-away CA, and the SuperLink's certificate for localhost/127.0.0.1 signed by it
    {
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -sha256 -days 2 -nodes \
            -keyout "$CERTS/ca.key" -out "$CERTS/ca.crt" -subj "/CN=fedtiny deploy-demo CA"
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes \
            -keyout "$CERTS/server.key" -out "$CERTS/server.csr" -subj "/CN=localhost"
        printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" "basicConstraints=CA:FALSE" \
            "keyUsage=digitalSignature" "extendedKeyUsage=serverAuth" > "$CERTS/server.ext"
        openssl x509 -req -in "$CERTS/server.csr" -CA "$CERTS/ca.crt" -CAkey "$CERTS/ca.key" \
            -CAcreateserial -days 2 -sha256 -extfile "$CERTS/server.ext" -out "$CERTS/server.crt"
        openssl verify -CAfile "$CERTS/ca.crt" "$CERTS/server.crt"
    } > "$WORK/openssl.log" 2>&1 || { cat "$WORK/openssl.log" >&2; exit 1; }
    # one ECDSA P-384 key pair per SuperNode (OpenSSH format, as flower-supernode and
    # `flwr supernode register` read them)
    for n in 0 1; do ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedtiny-supernode-$n" -f "$KEYS/supernode-$n"; done
    echo "[deploy-demo] TLS: CA and SuperLink certificate (SAN localhost, 127.0.0.1) in $CERTS"
    SUPERLINK_SECURITY=(--ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.crt"
                        --ssl-keyfile "$CERTS/server.key" --enable-supernode-auth)
    # the SuperNode's link to the SuperLink trusts the CA; its own Runtime API (for the ClientApp)
    # also serves TLS on loopback with the same certificate, so nothing it launches runs --insecure
    supernode_security() {
        SUPERNODE_SECURITY=(--root-certificates "$CERTS/ca.crt" --auth-supernode-private-key "$KEYS/$1"
                            --ssl-certfile "$CERTS/server.crt" --ssl-keyfile "$CERTS/server.key"
                            --ssl-ca-certfile "$CERTS/ca.crt")
    }
    CONNECTION_SECURITY="root-certificates = \"$CERTS/ca.crt\""
else
    SUPERLINK_SECURITY=(--insecure)
    supernode_security() { SUPERNODE_SECURITY=(--insecure); }
    CONNECTION_SECURITY="insecure = true"
fi

record flower-superlink "${SUPERLINK_SECURITY[@]}" --disable-runtime-dependency-installation --port "$SUPERLINK_PORT" \
    --database "$WORK/superlink.db"
"$BIN/flower-superlink" "${SUPERLINK_SECURITY[@]}" --disable-runtime-dependency-installation --port "$SUPERLINK_PORT" \
    --database "$WORK/superlink.db" > "$WORK/superlink.log" 2>&1 &
PIDS+=($!)
wait_port "$SUPERLINK_PORT"

cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "deploy-demo"

[superlink.deploy-demo]
address = "127.0.0.1:$SUPERLINK_PORT"
$CONNECTION_SECURITY
TOML

REGISTERED=()
if [ "$TLS" = 1 ]; then
    for n in 0 1; do
        record flwr supernode register "$KEYS/supernode-$n.pub" deploy-demo --name "supernode-$n" --format json
        out="$("$BIN/flwr" supernode register "$KEYS/supernode-$n.pub" deploy-demo --name "supernode-$n" \
            --format json 2>>"$WORK/register.log")" || { echo "deploy-demo: registering supernode-$n failed: $out" >&2; exit 1; }
        printf '%s\n' "$out" >> "$WORK/register.log"
        node_id="$(printf '%s' "$out" | "$BIN/python" -c 'import json,sys; print(json.load(sys.stdin)["node-id"])')"
        REGISTERED+=("$node_id")
        echo "[deploy-demo] registered supernode-$n public key: node $node_id"
    done
fi

if [ "$FIRMWARE" = 1 ]; then
    mapfile -t QEMU < <("$BIN/python" -m fedtiny.tools.qemu "$ELF" "$BOARD" "$DEVICE_PORT")
    record "${QEMU[@]}"
    "${QEMU[@]}" > "$WORK/device.log" 2>&1 &
else
    record fedtiny device-emulator --port "$DEVICE_PORT" --profile nrf52832 --scenario "$SCENARIO" --data 1
    "$BIN/fedtiny" device-emulator --port "$DEVICE_PORT" --profile nrf52832 --scenario "$SCENARIO" \
        --data 1 > "$WORK/device.log" 2>&1 &
fi
PIDS+=($!)
wait_port "$DEVICE_PORT"

supernode_security supernode-0
record flower-supernode "${SUPERNODE_SECURITY[@]}" --superlink "127.0.0.1:$SUPERLINK_PORT" --port 9094 \
    --node-config "partition-id=0 num-partitions=2"
"$BIN/flower-supernode" "${SUPERNODE_SECURITY[@]}" --superlink "127.0.0.1:$SUPERLINK_PORT" --port 9094 \
    --node-config "partition-id=0 num-partitions=2" > "$WORK/supernode-0.log" 2>&1 &
PIDS+=($!)
supernode_security supernode-1
record flower-supernode "${SUPERNODE_SECURITY[@]}" --superlink "127.0.0.1:$SUPERLINK_PORT" --port 9095 \
    --node-config "partition-id=1 num-partitions=2 device-address=\"$DEVICE_ADDRESS\""
"$BIN/flower-supernode" "${SUPERNODE_SECURITY[@]}" --superlink "127.0.0.1:$SUPERLINK_PORT" --port 9095 \
    --node-config "partition-id=1 num-partitions=2 device-address=\"$DEVICE_ADDRESS\"" \
    > "$WORK/supernode-1.log" 2>&1 &
PIDS+=($!)

RUN_DIR="$WORK/run"
record flwr run . deploy-demo --stream \
    --run-config "scenario=\"$SCENARIO\" run-dir=\"$RUN_DIR\" overrides=\"$OVERRIDES\""
PATH="$BIN:$PATH" "$BIN/flwr" run . deploy-demo --stream \
    --run-config "scenario=\"$SCENARIO\" run-dir=\"$RUN_DIR\" overrides=\"$OVERRIDES\"" > "$WORK/flwr-run.log" 2>&1 &
RUN_PID=$!
PIDS+=($RUN_PID)
for _ in $(seq 1 "${DEMO_WAIT_S:-1800}"); do  # seconds the run may take (MCUNet in QEMU: minutes a round)
    [ -f "$RUN_DIR/summary.json" ] && break
    kill -0 "$RUN_PID" 2>/dev/null || { sleep 2; break; }
    sleep 1
done
if [ ! -f "$RUN_DIR/summary.json" ]; then
    echo "deploy-demo: the run did not finish; last lines of its logs:" >&2
    tail -n 20 "$WORK/flwr-run.log" "$WORK/superlink.log" "$WORK/supernode-0.log" "$WORK/supernode-1.log" \
        "$WORK/device.log" >&2
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
if [ "$FIRMWARE" = 1 ]; then  # the JSON summary: what the firmware did, against fedtiny's models of it
    "$BIN/python" - "$RUN_DIR" "$ELF" "$BOARD" build/firmware/gen/summary.json <<'PY'
import json, platform, subprocess, sys
from pathlib import Path
from fedtiny.tools.qemu import BOARDS
run, elf, board, gen = Path(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(Path(sys.argv[4]).read_text())
recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()][1:]
mine = [c for r in recs for c in r["clients"] if c["partition_id"] == gen["partition"]]
sections = {}
for line in subprocess.run(["arm-none-eabi-size", "-A", "-d", elf], capture_output=True, text=True, check=True).stdout.splitlines():
    parts = line.split()
    if len(parts) >= 2 and parts[0].startswith(".") and parts[1].isdigit():
        sections[parts[0]] = int(parts[1])
stack = max(int(c["stack_bytes"]) for c in mine)
ram = sections.get(".data", 0) + sections.get(".bss", 0) + sections.get(".bss2", 0)  # .bss2: a second RAM region
ips = sum(c["instructions_per_step"] for c in mine) / len(mine)
per_step = gen["samples"] / max(1, int(mine[0]["steps"]))  # samples per step, averaged over the epoch
model = gen["cycles_per_sample"] * per_step + gen["update_cycles_per_step"]
published = gen["published_cycles_per_sample"] * per_step
print(json.dumps({
    "machine": f"qemu {BOARDS[board][0]} ({BOARDS[board][1]}), -icount shift=0; host {platform.machine()}",
    "firmware_updates_accepted": len(mine), "rounds": len(recs),
    "sram_bytes": ram + stack,
    "device_ram_bytes": gen["device_ram_bytes"], "profile_sram_bytes": gen["profile_sram_bytes"],
    "sram_vs_model": round((ram + stack) / gen["device_ram_bytes"], 4),
    "device_flash_bytes": gen["device_flash_bytes"], "profile_flash_bytes": gen["profile_flash_bytes"],
    "scenario": gen["scenario"], "board": board,
    "stack_bytes": stack, "flash_bytes": sections.get(".vectors", 0) + sections.get(".text", 0) + sections.get(".data", 0),
    "arena_bytes": gen["arena_bytes"], "planner_peak_bytes": gen["planner_peak_bytes"],
    "instructions_per_step": round(ips), "model_cycles_per_step": round(model),
    "instructions_vs_model": round(ips / model, 3), "kernels": gen["kernels"],
    "published_model_cycles_per_step": round(published), "instructions_vs_published_model": round(ips / published, 2),
    "profile": gen["profile"], "scheme": gen["scheme"],
    "final_accuracy": recs[-1]["global_accuracy"]}, sort_keys=True))
PY
fi
[ "$TLS" = 1 ] || exit 0

# ---- TLS mode: what was secured, and a SuperNode whose key was never registered ----
plain() { sed -e 's/\x1b\[[0-9;]*m//g' -e 's/[[:space:]]\+$//'; }
fail=0

# 1. no --insecure on any command line: the demo's own, and those the SuperLink and SuperNodes
#    launched (their SuperExecs and apps), taken while they are all still up
descendants() {  # command lines of every live descendant of the given pids
    ps -e -o pid=,ppid=,args= | awk -v roots="$*" '
        BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) keep[r[i]] = 1 }
        { pid[NR] = $1; ppid[NR] = $2; $1 = ""; $2 = ""; line[NR] = substr($0, 3) }
        END { do { added = 0; for (i = 1; i <= NR; i++) if (!(pid[i] in keep) && (ppid[i] in keep)) {
                  keep[pid[i]] = 1; print line[i]; added = 1 } } while (added) }'
}
descendants "${PIDS[@]}" > "$WORK/launched-commands.txt"
n_own=$(wc -l < "$CMDS") n_launched=$(wc -l < "$WORK/launched-commands.txt")
if grep -q -e '--insecure' "$CMDS" "$WORK/launched-commands.txt"; then
    echo "deploy-demo: --insecure was used in TLS mode:" >&2
    grep -h -e '--insecure' "$CMDS" "$WORK/launched-commands.txt" >&2
    fail=1
else
    echo "[deploy-demo] TLS mode: --insecure in none of the demo's $n_own command lines nor the" \
         "$n_launched processes the SuperLink and SuperNodes launched (see $CMDS)"
fi
if grep -q "Uvicorn running on https://127.0.0.1:$SUPERLINK_PORT" "$WORK/superlink.log" \
        && ! grep -q 'SuperNode authentication is disabled' "$WORK/superlink.log"; then
    echo "[deploy-demo] SuperLink served https://127.0.0.1:$SUPERLINK_PORT with SuperNode authentication enabled"
else
    echo "deploy-demo: the SuperLink log does not show an https listener with SuperNode authentication" >&2
    fail=1
fi

# 2. a third SuperNode, with a fresh key pair that was not registered: the SuperLink must refuse it
ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedtiny-supernode-unregistered" -f "$KEYS/supernode-unregistered"
supernode_security supernode-unregistered
record flower-supernode "${SUPERNODE_SECURITY[@]}" --superlink "127.0.0.1:$SUPERLINK_PORT" --port 9096 \
    --node-config "partition-id=0 num-partitions=2"
"$BIN/flower-supernode" "${SUPERNODE_SECURITY[@]}" --superlink "127.0.0.1:$SUPERLINK_PORT" --port 9096 \
    --node-config "partition-id=0 num-partitions=2" > "$WORK/supernode-unregistered.log" 2>&1 &
ROGUE_PID=$!
PIDS+=($ROGUE_PID)
# its public key as the SuperLink logs it (PEM); the second PEM line identifies this key
KEY_LINE="$(ssh-keygen -e -m PKCS8 -f "$KEYS/supernode-unregistered.pub" | sed -n 2p)"
rogue_status=running
for _ in $(seq 1 30); do  # Flower 1.41: the SuperNode gives up at once when its activation is refused
    sleep 1
    kill -0 "$ROGUE_PID" 2>/dev/null && continue
    rogue_status=0; wait "$ROGUE_PID" || rogue_status=$?
    break
done
sn_line="$(plain < "$WORK/supernode-unregistered.log" | grep -m1 'Failed to activate SuperNode' || true)"
sl_line="$(plain < "$WORK/superlink.log" | grep -F "$KEY_LINE" | grep -m1 'activate-node' \
    | sed -E 's/^.*(\[\/v1\/fleet\/activate-node\]\[ApiError:[0-9]+\]).*(exception: .*)$/\1 ... \2/' || true)"
sl_http="$(plain < "$WORK/superlink.log" | grep -m1 'POST /v1/fleet/activate-node HTTP/1.1" 4[0-9][0-9]' \
    | sed -E 's/^.*"(POST [^"]*)" ([0-9]+).*$/\1 -> \2/' || true)"
if grep -q 'SuperNode ID:' "$WORK/supernode-unregistered.log"; then
    echo "deploy-demo: the unregistered SuperNode got a node ID:" >&2
    grep 'SuperNode ID:' "$WORK/supernode-unregistered.log" >&2
    fail=1
elif [ -n "$sl_line" ] && [ -n "$sn_line" ] && [ "$rogue_status" != 0 ]; then
    [ "$rogue_status" = running ] && rogue_exit="still retrying after 30 s" || rogue_exit="exited with status $rogue_status"
    echo "[deploy-demo] unregistered SuperNode refused: SuperLink: $sl_line (${sl_http:-?});" \
         "SuperNode: \"$sn_line\", $rogue_exit"
else
    echo "deploy-demo: the refusal of the unregistered SuperNode was not observed" \
         "(its status: $rogue_status); last lines of its log and the SuperLink's:" >&2
    tail -n 15 "$WORK/supernode-unregistered.log" "$WORK/superlink.log" >&2
    fail=1
fi

# 3. the SuperLink knows exactly the two registered nodes, which are the ones that ran
record flwr supernode list deploy-demo --format json
"$BIN/flwr" supernode list deploy-demo --format json > "$WORK/nodes.json" 2>>"$WORK/register.log" || true
connected=()
for n in 0 1; do
    connected+=("$(plain < "$WORK/supernode-$n.log" | sed -n 's/^.*SuperNode ID: \([0-9]\+\).*$/\1/p' | head -n1)")
done
"$BIN/python" - "$WORK/nodes.json" "${REGISTERED[*]}" "${connected[*]}" <<'PY' || fail=1
import json, sys
try:
    nodes = json.loads(open(sys.argv[1]).read())["nodes"]
except (OSError, ValueError, KeyError) as exc:
    sys.exit(f"deploy-demo: cannot read `flwr supernode list`: {exc}")
known = sorted(n["node-id"] for n in nodes)
registered, connected = sorted(sys.argv[2].split()), sorted(sys.argv[3].split())
if known == registered == connected:
    print(f"[deploy-demo] SuperLink nodes: {', '.join(known)} (the 2 registered keys, the 2 SuperNodes "
          f"that ran the rounds); none for the unregistered key")
else:
    sys.exit(f"deploy-demo: SuperLink nodes {known}, registered {registered}, connected {connected}")
PY
exit "$fail"
