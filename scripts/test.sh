#!/usr/bin/env bash
# Set up the machine if needed (idempotent), then run lint, type checks and the whole test
# suite: fast unit tests and real-kernel integration tests. This is the README's test
# command and what .ci/run calls.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
PY="$ROOT/.venv/bin/python"
echo "== ruff"; "$ROOT/.venv/bin/ruff" check .
echo "== mypy"; "$ROOT/.venv/bin/mypy" agent aggregator shared stackfleet
echo "== pytest"
set +e
"$PY" -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure for this project" >&2
  exit 1
fi
exit "$rc"
