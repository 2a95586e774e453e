#!/usr/bin/env bash
# Set up the machine if needed (idempotent), then run stackfleet all-in-one on this host:
# an embedded nats-server, the aggregator and the agent. Extra arguments go to
# `stackfleet run` (e.g. --duration 60 --output-dir profiles).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/stackfleet" run "$@"
