"""Measures input-pipeline throughput (images/s) of the qat_jax.data train iterator.

Usage::

    python benchmarks/bench_pipeline.py                       # default fashion_mnist, batch 128
    python benchmarks/bench_pipeline.py --step_images_per_s=50000 --json
    python benchmarks/bench_pipeline.py --dataset=cifar10 --worker_count=2

``--step_images_per_s`` is the training step's own throughput (images/s); the ratio
pipeline / step tells whether the input pipeline can keep up (>= 1) or is the bottleneck.
The dataset is prepared first if needed (not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qat_jax import data  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--manual_dir", default=None)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--num_local_devices", type=int, default=1)
    p.add_argument("--worker_count", type=int, default=0)
    p.add_argument("--read_threads", type=int, default=None)
    p.add_argument("--warmup_batches", type=int, default=20)
    p.add_argument("--num_batches", type=int, default=300)
    p.add_argument("--step_images_per_s", type=float, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    args = p.parse_args(argv)

    cfg = data.get_config_defaults()
    cfg.name = args.dataset
    cfg.data_dir = args.data_dir
    cfg.manual_dir = args.manual_dir
    cfg.worker_count = args.worker_count
    if args.read_threads is not None:
        cfg.read_threads = args.read_threads
    t0 = time.perf_counter()
    data.ensure_prepared(cfg)
    prepare_s = time.perf_counter() - t0
    it = data.make_train_iterator(
        cfg,
        args.batch_size,
        seed=0,
        num_local_devices=args.num_local_devices,
        process_index=0,
        process_count=1,
    )
    t0 = time.perf_counter()
    for _ in range(args.warmup_batches):
        next(it)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.num_batches):
        batch = next(it)
    elapsed = time.perf_counter() - t0
    it.close()
    ips = args.num_batches * args.batch_size / elapsed
    result = {
        "dataset": args.dataset,
        "batch_size": args.batch_size,
        "image_shape": list(batch["image"].shape),
        "worker_count": cfg.worker_count,
        "read_threads": cfg.read_threads,
        "cpu_count": os.cpu_count(),
        "num_batches": args.num_batches,
        "seconds": round(elapsed, 3),
        "images_per_s": round(ips, 1),
        "warmup_seconds": round(first_s, 3),
        "prepare_seconds": round(prepare_s, 3),
    }
    if args.step_images_per_s:
        result["step_images_per_s"] = args.step_images_per_s
        result["pipeline_to_step_ratio"] = round(ips / args.step_images_per_s, 3)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{args.dataset}: {ips:,.0f} images/s (batch {args.batch_size}, "
            f"{args.num_batches} batches in {elapsed:.2f}s, workers={cfg.worker_count}, "
            f"threads={cfg.read_threads}, {os.cpu_count()} CPUs)"
        )
        if args.step_images_per_s:
            ratio = result["pipeline_to_step_ratio"]
            verdict = "keeps up" if ratio >= 1 else "is the bottleneck"
            print(f"pipeline / step = {ratio:.2f} -> the input pipeline {verdict}")
    return result


if __name__ == "__main__":
    main()
