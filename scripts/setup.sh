#!/usr/bin/env bash
# Idempotent machine setup for stackfleet: system packages (bcc, kernel headers,
# protoc, Go, pprof), kernel header symlinks, tracefs, and a venv that sees bcc.
# Safe to run repeatedly; each step checks before it acts.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${STACKFLEET_VENV:-$ROOT/.venv}"
STAMP="$VENV/.stackfleet-setup-stamp"
log() { printf '\033[1;34m[setup]\033[0m %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh must run as root (it installs packages and mounts tracefs)" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# chromium + chromium-driver: the headless browser of the web page's end-to-end test (selenium).
# libc6-dbg: names of libc's local functions (start_thread, futex waits), found by build id.
APT_PKGS=(python3-bpfcc bpfcc-tools libbpfcc python3-venv python3-dev protobuf-compiler
          golang-go golang-github-google-pprof-dev gcc libc6-dev make iproute2 procps
          chromium chromium-driver libc6-dbg)

missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ! ls -d /usr/src/linux-headers-6.1.0-*-amd64 >/dev/null 2>&1; then
  missing+=("linux-headers-amd64-6.1")
fi
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  pkgs=("${APT_PKGS[@]}")
  if ! ls -d /usr/src/linux-headers-6.1.0-*-amd64 >/dev/null 2>&1; then
    # The running kernel has no packaged headers; Debian 12's 6.1 headers are what bcc can use
    # (see docs/design/kernel-compatibility.md: BPF code here must not dereference kernel structs).
    hdr=$(apt-cache search --names-only '^linux-headers-6\.1\.0-[0-9]+-amd64$' | awk '{print $1}' | sort -V | tail -n1)
    [ -n "$hdr" ] || { echo "no linux-headers-6.1.0-*-amd64 package found" >&2; exit 1; }
    pkgs+=("$hdr")
  fi
  apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
fi

# Kernel headers: bcc looks under /lib/modules/$(uname -r)/{build,source}.
KDIR="/lib/modules/$(uname -r)"
if [ ! -e "$KDIR/build/include" ]; then
  amd64=$(ls -d /usr/src/linux-headers-6.1.0-*-amd64 | sort -V | tail -n1)
  common="${amd64%-amd64}-common"
  log "linking kernel headers $amd64 into $KDIR"
  mkdir -p "$KDIR"
  ln -sfn "$amd64" "$KDIR/build"
  ln -sfn "$common" "$KDIR/source"
fi

# tracefs (tracepoint formats) and debugfs.
if [ ! -e /sys/kernel/tracing/events ]; then
  log "mounting tracefs"
  mount -t tracefs nodev /sys/kernel/tracing || true
fi
if [ ! -e /sys/kernel/debug/tracing ] && ! mountpoint -q /sys/kernel/debug; then
  mount -t debugfs nodev /sys/kernel/debug 2>/dev/null || true
fi

# Google pprof, built offline from Debian's source package (used to check our pprof output).
if [ ! -x "$ROOT/.tools/pprof" ]; then
  log "building pprof"
  mkdir -p "$ROOT/.tools"
  (cd /tmp && GO111MODULE=off GOPATH=/usr/share/gocode GOFLAGS= go build -o "$ROOT/.tools/pprof" github.com/google/pprof) \
    || log "pprof build failed (pprof checks will be skipped)"
fi

# The sampled heap profile's preload library (agent/heap_sampler/); make rebuilds it only
# when sampler.c or its Makefile changed.
log "building the heap sampler library"
make -s -C "$ROOT/agent/heap_sampler"

# Python venv on Debian's interpreter so that the system bcc module is importable.
if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV"
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
req_hash=$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$req_hash" ]; then
  log "installing Python dependencies"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e "$ROOT[dev]"
  echo "$req_hash" > "$STAMP"
fi
# Go toolchains 1.21 ... 1.27 for the Go test matrix, next to Debian's 1.19 (never into the system).
bash "$ROOT/scripts/go_toolchains.sh"
"$VENV/bin/python" -c 'import bcc, nats, msgpack, uvloop, grpc, aiohttp, opentelemetry.proto.profiles.v1development.profiles_pb2' \
  || { echo "venv check failed: bcc or a dependency does not import" >&2; exit 1; }
log "ready: $VENV"
