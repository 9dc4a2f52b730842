"""``python -m qat_jax.export --workdir=DIR --out=model.qat``: export a finished run.

Writes the bit-packed ``.qat`` file (docs/deployment.md) of the run's final checkpoint and prints
its size next to the FP32 size of the same model. A latest checkpoint that cannot be read falls
back to the newest readable one, with one warning line on stderr naming the step used.
"""

from __future__ import annotations

import os
import struct
import sys

from absl import app, flags, logging

from qat_jax.export.model_file import export_run, load_packed, verify_packed
from qat_jax.train import reporting

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a finished run.")
_OUT = flags.DEFINE_string("out", None, "Output .qat file.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_VERIFY = flags.DEFINE_bool(
    "verify",
    False,
    "Also run the packed forward over the run's eval split and compare it with the run's eval "
    "logits (model.apply): max logit difference, prediction mismatches, accuracies.",
)
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    reporting.warnings_to_stderr()  # e.g. the fallback from an unreadable latest checkpoint
    try:
        size = export_run(_WORKDIR.value, _OUT.value, _STEP.value)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    packed = load_packed(_OUT.value)
    n_bin = packed.binary_bits()
    n_words = sum(v.nbytes for v in packed.tensors.values() if v.dtype.name == "uint32")
    n_fp = sum(v.size for k, v in packed.tensors.items() if v.dtype.name == "float32")
    with open(_OUT.value, "rb") as f:
        header_bytes = struct.unpack("<Q", f.read(20)[12:20])[0]
    n_fp_bytes = 4 * n_fp
    print(
        f"wrote {os.path.abspath(_OUT.value)}: {size} bytes "
        f"({n_bin} binary weights in {n_words} bytes of packed words, {n_fp} float32 values)"
    )
    print(
        f"  bytes: preamble 20 + JSON header {header_bytes} + packed words {n_words} + float32 "
        f"{n_fp_bytes} + zero padding {size - 20 - header_bytes - n_words - n_fp_bytes} (64-byte "
        f"alignment); the {n_bin} weight bits alone are {n_bin / 8:.0f} bytes"
    )
    if _VERIFY.value:
        r = verify_packed(_WORKDIR.value, _OUT.value)
        print(
            f"verify on {r['examples']} eval examples: max |packed - eval| logit "
            f"{r['max_abs_diff']:.3g} ({r['max_rel_diff']:.3g} of the largest logit), "
            f"{r['prediction_mismatches']} prediction mismatches, accuracy packed "
            f"{100 * r['packed_accuracy']:.2f}% / eval {100 * r['eval_accuracy']:.2f}%"
        )


if __name__ == "__main__":
    app.run(main)
