#!/usr/bin/env bash
# A Cloud TPU VM slice (one or many hosts): optionally create it, install qat_jax on every
# worker, mount the GCS bucket that holds the shared workdir, and run the trainer on all workers.
#
#   launch/tpu_pod.sh --tpu NAME --zone ZONE --bucket BUCKET --run RUN_NAME
#                     [--project P] [--create --accelerator-type v4-32 --version tpu-ubuntu2204-base]
#                     [--repo URL (default: this checkout's origin)] [--ref GIT_REF] [--skip-install] [--dry-run]
#                     -- <qat_jax.main flags, e.g. --config=configs/imagenet_mobilenetv2.py>
#
# Every worker runs the same command; jax.distributed detects the slice (--distributed=on). The
# workdir is gs://BUCKET/RUN_NAME, mounted with gcsfuse at /mnt/qat_jax on every worker (the
# trainer writes POSIX files; orbax checkpoints stay atomic: an interrupted rename leaves an
# unreadable step that the next start skips). Rerunning the same command after a preemption
# resumes from the last complete checkpoint. --dry-run prints the exact gcloud commands.
# See docs/operations.md.
set -euo pipefail

tpu="" zone="" project="" bucket="" run_name=""
create=0 accel="v4-32" version="tpu-ubuntu2204-base"
repo="$(git -C "$(dirname "$0")" remote get-url origin 2>/dev/null || true)" ref="main"
install=1 dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) tpu="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --bucket) bucket="${2#gs://}"; shift 2 ;;
    --run) run_name="$2"; shift 2 ;;
    --create) create=1; shift ;;
    --accelerator-type) accel="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --repo) repo="$2"; shift 2 ;;
    --ref) ref="$2"; shift 2 ;;
    --skip-install) install=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "tpu_pod.sh: unknown option $1 (flags for qat_jax.main go after --)" >&2; exit 2 ;;
  esac
done
required=(tpu zone bucket run_name)
if [[ "$install" -eq 1 ]]; then required+=(repo); fi
for var in "${required[@]}"; do
  if [[ -z "${!var}" ]]; then
    echo "tpu_pod.sh: --${var/_name/} is required (see --help)" >&2; exit 2
  fi
done

mount=/mnt/qat_jax
workdir="$mount/$run_name"
gcloud_args=(--zone "$zone")
if [[ -n "$project" ]]; then gcloud_args+=(--project "$project"); fi

q() { local out; printf -v out '%q ' "$@"; printf '%s' "${out% }"; }  # shell-quoted words

install_cmd="set -e; (test -d qat_jax || git clone $(q "$repo") qat_jax); cd qat_jax"
install_cmd+=" && git fetch --all -q && git checkout -q $(q "$ref")"
install_cmd+=" && python3 -m venv .venv && . .venv/bin/activate && pip install -q -U pip"
install_cmd+=" && pip install -q -e . 'jax[tpu]<0.11'"
install_cmd+=" && (command -v gcsfuse >/dev/null || (sudo apt-get update -q && sudo apt-get install -y -q gcsfuse))"

mount_cmd="sudo mkdir -p $mount && sudo chown \$USER $mount"
mount_cmd+=" && (mountpoint -q $mount || gcsfuse --implicit-dirs --rename-dir-limit=100000 $(q "$bucket") $mount)"

run_cmd="cd qat_jax && . .venv/bin/activate && $mount_cmd"
run_cmd+=" && python -m qat_jax.main --distributed=on --workdir=$(q "$workdir") $(q "$@")"

commands=()
if [[ "$create" -eq 1 ]]; then
  commands+=("gcloud compute tpus tpu-vm create $(q "$tpu") $(q "${gcloud_args[@]}") --accelerator-type $(q "$accel") --version $(q "$version")")
fi
if [[ "$install" -eq 1 ]]; then
  commands+=("gcloud compute tpus tpu-vm ssh $(q "$tpu") $(q "${gcloud_args[@]}") --worker=all --command $(q "$install_cmd")")
fi
commands+=("gcloud compute tpus tpu-vm ssh $(q "$tpu") $(q "${gcloud_args[@]}") --worker=all --command $(q "$run_cmd")")

for c in "${commands[@]}"; do
  echo "$c"
  if [[ "$dry_run" -eq 0 ]]; then
    eval "$c"
  fi
done
