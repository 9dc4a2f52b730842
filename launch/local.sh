#!/usr/bin/env bash
# One machine: run qat_jax.main as one process, or as several processes that talk through
# jax.distributed on 127.0.0.1 (a multi-host rehearsal), optionally with simulated CPU devices.
#
#   launch/local.sh [--devices N] [--processes P] [--port PORT] [--timeout S] [--python PY]
#                   [--dry-run] -- <qat_jax.main flags, e.g. --config=configs/default.py --workdir=runs/x>
#
#   --devices N     simulate N CPU devices per process (XLA_FLAGS); default: the real devices
#   --processes P   start P processes (process 0 hosts the coordinator); default 1
#   --port PORT     coordinator port on 127.0.0.1; default 12355
#   --timeout S     seconds to wait for every process to join (--distributed_timeout); default 60
#   --dry-run       print the exact commands, run nothing
#
# With P > 1 every process gets the same flags (the workdir is shared) and the environment
# JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; all share this terminal (only
# process 0 logs progress). The script waits for all of them and exits non-zero as soon as one
# fails (the others are stopped then). See docs/operations.md.
set -euo pipefail

devices=""
processes=1
port=12355
timeout=60
python="${PYTHON:-python}"
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --devices) devices="$2"; shift 2 ;;
    --processes) processes="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --timeout) timeout="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "local.sh: unknown option $1 (flags for qat_jax.main go after --)" >&2; exit 2 ;;
  esac
done
if ! [[ "$processes" =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: --processes must be a positive integer, got '$processes'" >&2; exit 2
fi
if [[ -n "$devices" && ! "$devices" =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: --devices must be a positive integer, got '$devices'" >&2; exit 2
fi

cd "$(dirname "$0")/.."

env_for() {  # the environment of process $1, as VAR=value words
  local words=()
  if [[ -n "$devices" ]]; then
    words+=("XLA_FLAGS=--xla_force_host_platform_device_count=$devices" "JAX_PLATFORMS=cpu")
  fi
  if [[ "$processes" -gt 1 ]]; then
    words+=("JAX_COORDINATOR_ADDRESS=127.0.0.1:$port" "JAX_NUM_PROCESSES=$processes"
            "JAX_PROCESS_ID=$1")
  fi
  if [[ ${#words[@]} -gt 0 ]]; then printf '%s\n' "${words[@]}"; fi
}

command_for() {  # the full command line of process $1 (then the trainer's flags), as words
  mapfile -t envw < <(env_for "$1")
  shift
  local cmd=(env "${envw[@]+"${envw[@]}"}" "$python" -m qat_jax.main)
  if [[ "$processes" -gt 1 ]]; then
    cmd+=("--distributed_timeout=$timeout")
  fi
  printf '%s\n' "${cmd[@]}" "$@"
}

if [[ "$dry_run" -eq 1 ]]; then
  for ((i = 0; i < processes; i++)); do
    mapfile -t words < <(command_for "$i" "$@")
    printf '%q ' "${words[@]}"
    if [[ "$processes" -gt 1 ]]; then printf '&'; fi
    printf '\n'
  done
  exit 0
fi

if [[ "$processes" -eq 1 ]]; then
  mapfile -t words < <(command_for 0 "$@")
  exec "${words[@]}"
fi

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM
for ((i = 0; i < processes; i++)); do
  mapfile -t words < <(command_for "$i" "$@")
  "${words[@]}" &
  pids+=("$!")
done
status=0
for ((i = 0; i < processes; i++)); do
  if ! wait -n; then
    status=1
    break
  fi
done
if [[ "$status" -ne 0 ]]; then
  echo "local.sh: a process failed; stopping the others" >&2
  exit 1
fi
trap - EXIT
exit 0
