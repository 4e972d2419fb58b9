#!/usr/bin/env bash
# Runs schemathesis (property-based API tests from PyPI) against a fleet-server started here on
# 127.0.0.1 with a throw-away data dir, using the OpenAPI document the server serves at
# /api/v1/openapi.json. Checks: no 5xx (not_a_server_error) and every response matches the
# documented schema (response_schema_conformance). Not run by CI; results in docs/OPENAPI.md.
#
#   tests/openapi/schemathesis.sh [--max-examples N] [--max-time SECONDS]
#
# Environment: SCHEMATHESIS_VENV (default /tmp/fleet-schemathesis-venv), CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/../.."

MAX_EXAMPLES=20
MAX_TIME=300
while [ $# -gt 0 ]; do
  case "$1" in
    --max-examples) MAX_EXAMPLES=$2; shift 2 ;;
    --max-time) MAX_TIME=$2; shift 2 ;;
    *) echo "unknown argument $1; use --max-examples N or --max-time SECONDS" >&2; exit 2 ;;
  esac
done

SCHEMATHESIS_VERSION=4.32.5
VENV=${SCHEMATHESIS_VENV:-/tmp/fleet-schemathesis-venv}
if ! "$VENV/bin/schemathesis" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "schemathesis==$SCHEMATHESIS_VERSION"
fi

cargo build --quiet -p fleet-server --bin fleet-server
SERVER="${CARGO_TARGET_DIR:-target}/debug/fleet-server"

DATA=$(mktemp -d)
free_port() { "$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
MQTT_PORT=$(free_port)
TOKEN=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
BASE="http://127.0.0.1:$PORT"

# Any ed25519 public key will do, for bundles (none is signed here) and for the device below.
PUBLIC_KEY=ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c
"$SERVER" --data-dir "$DATA" --listen "127.0.0.1:$PORT" --mqtt-listen "127.0.0.1:$MQTT_PORT" \
  --operator-token "$TOKEN" --trusted-key "$PUBLIC_KEY" >"$DATA/server.log" 2>&1 &
SERVER_PID=$!
stop() {
  kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
  rm -rf "$DATA"
}
trap stop EXIT

for _ in $(seq 1 100); do
  curl -fsS "$BASE/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done

# One enrolled device, so device routes see a real credential and operator routes a real device.
ENROLL_TOKEN=$(curl -fsS -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
  -d '{"count": 1}' "$BASE/api/v1/enrollment-tokens" | jq -r '.tokens[0]')
ENROLLED=$(curl -fsS -H 'Content-Type: application/json' \
  -d "{\"token\": \"$ENROLL_TOKEN\", \"public_key\": \"$PUBLIC_KEY\", \"name\": \"st-device\", \"labels\": {\"site\": \"lab\"}}" \
  "$BASE/api/v1/enroll")
DEVICE_CREDENTIAL=$(echo "$ENROLLED" | jq -r .credential)
echo "enrolled $(echo "$ENROLLED" | jq -r .device_id)"

run() {
  "$VENV/bin/schemathesis" run "$BASE/api/v1/openapi.json" \
    --checks not_a_server_error,response_schema_conformance \
    --max-examples "$MAX_EXAMPLES" --max-time "$MAX_TIME" --seed 1 \
    --workers 1 --request-timeout 10 --no-color "$@"
}

status=0
echo "== device credential: the routes devices call"
run -H "Authorization: Bearer $DEVICE_CREDENTIAL" --include-tag devices --include-tag delivery || status=1
echo "== operator token (admin): every route"
run -H "Authorization: Bearer $TOKEN" || status=1
if grep -q "ERROR" "$DATA/server.log"; then
  echo "server logged errors:"
  grep "ERROR" "$DATA/server.log"
  status=1
fi
exit $status
