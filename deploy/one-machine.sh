#!/usr/bin/env bash
# The walkthrough of deploy/README.md as a script: a coordinating centre and two hospitals on
# this machine (127.0.0.1), TLS and node authentication on, one federated run, then every
# process stopped. Run from the repository root after `make test` (or `make demo`) made .venv:
#     bash deploy/one-machine.sh [WORKDIR]      (default: ./try; it is replaced)
set -euo pipefail
# As the systemd units' UMask=0077: what this walkthrough creates is readable by this user only.
umask 077
ROOT=$(pwd)
W=$(realpath -m "${1:-try}")
PORT=${FEDCARE_PORT:-9092}                        # public: the sites' SuperNodes (Fleet API)
CONTROL_PORT=${FEDCARE_CONTROL_PORT:-$((PORT + 1))} # 127.0.0.1 only: the flwr CLI
export PATH="$ROOT/.venv/bin:$PATH"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_HOME="$W/centre/flwr-home"
if [ -e "$W" ] && [ ! -e "$W/.fedcare-one-machine" ]; then
    echo "error: $W exists and was not made by this script; name a new folder" >&2
    exit 2
fi
rm -rf "$W"; mkdir -p "$FLWR_HOME" "$W/logs"; touch "$W/.fedcare-one-machine"

PIDS=()
cleanup() {
    echo "== stopping: SIGTERM to every fedcare process started here"
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

echo "== 0. two synthetic hospitals"
fedcare data synth --out "$W/data" --sites 2 --patients 200 --for-deployment >/dev/null

echo "== 1. centre: certificates, then the SuperLink, its public gateway and its executor"
fedcare certs init --out "$W/centre/certs" --host 127.0.0.1 --host localhost
cat > "$FLWR_HOME/config.toml" <<EOT
[superlink]
default = "fedcare"

[superlink.fedcare]
address = "127.0.0.1:$CONTROL_PORT"
root-certificates = "$W/centre/certs/ca.crt"
EOT
fedcare server start --certs "$W/centre/certs" --host 127.0.0.1 --port "$PORT" \
    --control-port "$CONTROL_PORT" \
    --database "$W/centre/superlink.db" > "$W/logs/superlink.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 60); do
    curl -sf --cacert "$W/centre/certs/ca.crt" "https://127.0.0.1:$PORT/health" >/dev/null && break
    sleep 1
done

for i in 0 1; do
    H="$W/hospital-$i"
    echo "== 2. hospital $i: key pair; the centre registers its public key"
    fedcare site keygen --out "$H/keys" >/dev/null
    cp "$W/centre/certs/ca.crt" "$H/ca.crt"
    cp "$W/centre/certs/run-signing.pub" "$H/run-signing.pub"
    flwr supernode register "$H/keys/supernode.pub" fedcare
    cat > "$H/site-config.toml" <<EOT
site_id = "site-$i"
data = "../data/site-$i"
state_dir = "state"
device = "auto"

[privacy]
epsilon = 10.0
delta = 1e-5

[policy]
allowed_tasks = ["readmission"]
max_local_epochs = 3

[superlink]
address = "127.0.0.1:$PORT"
root_certificates = "ca.crt"
run_signing_key = "run-signing.pub"
auth_private_key = "keys/supernode"

[supernode]
port = $((PORT + 2 + i))
EOT
    echo "== 3. hospital $i: check, then start the SuperNode"
    fedcare site check "$H/site-config.toml"
    fedcare site start "$H/site-config.toml" > "$W/logs/site-$i.log" 2>&1 &
    PIDS+=($!)
done

echo "== 4. centre: submit a run and follow it"
sed -e "s|^run-dir = .*|run-dir = \"$W/centre/runs/demo\"|" \
    -e "s|^spec-path = .*|spec-path = \"$W/data/site-0/site.toml\"|" \
    -e "s|^run-id = .*|run-id = \"one-machine\"|" \
    -e "s|^audit-key = .*|audit-key = \"$W/centre/audit-key.pem\"|" \
    -e "s|^num-server-rounds = .*|num-server-rounds = 2|" \
    deploy/run.example.toml > "$W/centre/run.toml"
fedcare server submit "$W/centre/run.toml" --run-key "$W/centre/certs/run-signing.key" --wait
python -c "import json,sys; s=json.load(open(sys.argv[1])); print('summary:', s['rounds_completed'], 'rounds;', ', '.join(f\"{x['site_id']} {x['status']} eps={(x['privacy']['epsilon'] or 0):.2f}\" for x in s['sites']), '; test AUROC', round(s['global']['final'].get('test.auroc', float('nan')), 3))" "$W/centre/runs/demo/summary.json"
for i in 0 1; do fedcare budget show --db "$W/hospital-$i/state/ledger.sqlite" | tail -n 4; done
