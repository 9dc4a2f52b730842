"""launch/*.sh: valid bash, and their --dry-run prints the exact commands (nothing runs)."""

import os
import shlex
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["local.sh", "tpu_pod.sh", "gpu_slurm.sh"]


def _run(script, *args):
    return subprocess.run(
        ["bash", os.path.join(ROOT, "launch", script), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PATH": "/usr/bin:/bin"},  # no gcloud/sbatch: a dry run needs none
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_are_executable(script):
    path = os.path.join(ROOT, "launch", script)
    subprocess.run(["bash", "-n", path], check=True)
    assert os.access(path, os.X_OK)


def test_local_dry_run_single_and_multi_process():
    p = _run("local.sh", "--dry-run", "--", "--config=configs/tiny.py", "--workdir=runs/t")
    assert p.returncode == 0, p.stderr
    assert shlex.split(p.stdout) == [
        "env",
        "python",
        "-m",
        "qat_jax.main",
        "--config=configs/tiny.py",
        "--workdir=runs/t",
    ]
    p = _run(
        "local.sh", "--dry-run", "--processes", "2", "--devices", "4", "--port", "23456",
        "--", "--config=configs/tiny.py", "--workdir=runs/t",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 2
    for i, line in enumerate(lines):
        words = shlex.split(line.rstrip("&"))
        assert line.rstrip().endswith("&")
        assert words[:6] == [
            "env",
            "XLA_FLAGS=--xla_force_host_platform_device_count=4",
            "JAX_PLATFORMS=cpu",
            "JAX_COORDINATOR_ADDRESS=127.0.0.1:23456",
            "JAX_NUM_PROCESSES=2",
            f"JAX_PROCESS_ID={i}",
        ]
        assert words[6:] == [
            "python",
            "-m",
            "qat_jax.main",
            "--distributed_timeout=60",
            "--config=configs/tiny.py",
            "--workdir=runs/t",
        ]


def test_tpu_pod_dry_run_creates_installs_and_runs_on_every_worker():
    p = _run(
        "tpu_pod.sh", "--dry-run", "--tpu", "pod1", "--zone", "us-central2-b",
        "--project", "proj", "--bucket", "gs://my-bucket", "--run", "mbv2",
        "--create", "--accelerator-type", "v4-32", "--repo", "https://example.org/qat_jax.git",
        "--ref", "v1", "--", "--config=configs/imagenet_mobilenetv2.py",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    create, install, run = [shlex.split(line) for line in p.stdout.strip().splitlines()]
    assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert {"pod1", "us-central2-b", "proj", "v4-32"} <= set(create)
    for cmd in (install, run):
        assert cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
        assert "--worker=all" in cmd
    remote_install = install[install.index("--command") + 1]
    assert "git clone https://example.org/qat_jax.git" in remote_install
    assert "git checkout -q v1" in remote_install and "jax[tpu]" in remote_install
    remote_run = run[run.index("--command") + 1]
    assert "gcsfuse" in remote_run and "my-bucket /mnt/qat_jax" in remote_run
    main = shlex.split(remote_run.split("&& python ", 1)[1])
    assert main == [
        "-m",
        "qat_jax.main",
        "--distributed=on",
        "--workdir=/mnt/qat_jax/mbv2",
        "--config=configs/imagenet_mobilenetv2.py",
    ]


def test_gpu_slurm_dry_run_prints_the_batch_script():
    p = _run(
        "gpu_slurm.sh", "--dry-run", "--workdir", "/shared/runs/c100", "--nodes", "4",
        "--gpus-per-node", "8", "--partition", "gpu", "--",
        "--config=configs/cifar100_mobilenetv2.py",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    out = p.stdout
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --requeue",
    ):
        assert line in out.splitlines()
    srun = next(line for line in out.splitlines() if line.startswith("srun "))
    assert shlex.split(srun)[2:] == [
        "python",
        "-m",
        "qat_jax.main",
        "--distributed=auto",
        "--workdir=/shared/runs/c100",
        "--config=configs/cifar100_mobilenetv2.py",
    ]
    assert out.strip().splitlines()[-1] == "sbatch /shared/runs/c100/qat_jax.sbatch"
    assert not os.path.exists("/shared/runs/c100")  # a dry run writes nothing


@pytest.mark.parametrize(
    "script, args, match",
    [
        ("tpu_pod.sh", ["--dry-run", "--tpu", "x", "--repo", "r"], "--zone is required"),
        ("gpu_slurm.sh", ["--dry-run"], "--workdir is required"),
        ("gpu_slurm.sh", ["--dry-run", "--workdir", "/w", "--nodes", "0"], "--nodes must be"),
        ("local.sh", ["--dry-run", "--processes", "two"], "--processes must be"),
        ("local.sh", ["--bogus"], "unknown option --bogus"),
    ],
)
def test_bad_arguments_fail_with_a_message(script, args, match):
    p = _run(script, *args)
    assert p.returncode == 2 and match in p.stderr
