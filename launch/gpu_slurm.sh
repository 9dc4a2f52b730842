#!/usr/bin/env bash
# Multi-node GPU through SLURM: writes a batch script that starts one qat_jax.main process per
# node (each drives all GPUs of its node through pmap) and submits it with sbatch.
#
#   launch/gpu_slurm.sh --workdir SHARED_DIR [--nodes N] [--gpus-per-node G] [--partition P]
#                       [--account A] [--time HH:MM:SS] [--job-name NAME] [--venv PATH]
#                       [--dry-run] -- <qat_jax.main flags, e.g. --config=configs/cifar100_mobilenetv2.py>
#
# The workdir must be on a filesystem every node sees (checkpoints are written by process 0 and
# read by all). jax.distributed detects the SLURM step (SLURM_NTASKS > 1) by itself; with one
# node it runs as one process. Resubmitting the same command after a preemption resumes from the
# last complete checkpoint (--requeue makes SLURM do that on its own). --dry-run prints the batch
# script and the sbatch command without submitting. See docs/operations.md.
set -euo pipefail

workdir="" nodes=1 gpus=8 partition="" account="" time_limit="24:00:00" job="qat_jax"
venv="" dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --workdir) workdir="$2"; shift 2 ;;
    --nodes) nodes="$2"; shift 2 ;;
    --gpus-per-node) gpus="$2"; shift 2 ;;
    --partition) partition="$2"; shift 2 ;;
    --account) account="$2"; shift 2 ;;
    --time) time_limit="$2"; shift 2 ;;
    --job-name) job="$2"; shift 2 ;;
    --venv) venv="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "gpu_slurm.sh: unknown option $1 (flags for qat_jax.main go after --)" >&2; exit 2 ;;
  esac
done
if [[ -z "$workdir" ]]; then
  echo "gpu_slurm.sh: --workdir is required (a directory on a filesystem shared by all nodes)" >&2
  exit 2
fi
for var in nodes gpus; do
  if ! [[ "${!var}" =~ ^[1-9][0-9]*$ ]]; then
    echo "gpu_slurm.sh: --$var must be a positive integer" >&2; exit 2
  fi
done

repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${venv:-$repo/.venv}"
q() { local out; printf -v out '%q ' "$@"; printf '%s' "${out% }"; }  # shell-quoted words

script="#!/usr/bin/env bash
#SBATCH --job-name=$job
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$gpus
#SBATCH --time=$time_limit
#SBATCH --requeue
#SBATCH --output=$workdir/slurm-%j.out"
if [[ -n "$partition" ]]; then script+=$'\n'"#SBATCH --partition=$partition"; fi
if [[ -n "$account" ]]; then script+=$'\n'"#SBATCH --account=$account"; fi
script+="
set -euo pipefail
cd $(q "$repo")
. $(q "$venv/bin/activate")
srun --kill-on-bad-exit=1 python -m qat_jax.main --distributed=auto --workdir=$(q "$workdir") $(q "$@")
"

batch="$workdir/qat_jax.sbatch"
echo "mkdir -p $(q "$workdir")"
echo "cat > $(q "$batch") <<'EOF'"
printf '%s' "$script"
echo "EOF"
echo "sbatch $(q "$batch")"
if [[ "$dry_run" -eq 0 ]]; then
  mkdir -p "$workdir"
  printf '%s' "$script" > "$batch"
  sbatch "$batch"
fi
