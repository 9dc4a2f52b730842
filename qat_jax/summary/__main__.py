"""``python -m qat_jax.summary --workdir=DIR | --config=FILE``: the model summary table of a run's
final checkpoint or of a configured model (the table: :mod:`qat_jax.summary`).

``--workdir`` reads the run's newest readable checkpoint (a corrupt latest one falls back to the
previous one, with one warning line on stderr naming the step used); ``--config`` builds the
configured model without computing anything, every quantizable layer counted as it is deployed
by the config's method. Exit codes: 0 done, 2 no readable checkpoint / bad input.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp

from qat_jax import data as qdata
from qat_jax import experiment
from qat_jax.data import registry
from qat_jax.summary import _BINARY_MODES, format_summary, model_summary
from qat_jax.train import checkpoint, reporting
from qat_jax.train.config_files import load_config_file
from qat_jax.train.methods import method_settings

EXIT_BAD_INPUT = 2


def main(argv=None) -> int:
    """``python -m qat_jax.summary --workdir=DIR | --config=FILE [--binary=...] [--json=PATH]``."""
    parser = argparse.ArgumentParser(prog="python -m qat_jax.summary", description=__doc__)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a run's workdir (its newest readable checkpoint)")
    src.add_argument("--config", help="a configs/*.py file (a freshly initialised model)")
    parser.add_argument(
        "--binary",
        choices=_BINARY_MODES,
        default=None,
        help="which quantizable layers count as binary (default: 'modes' for --workdir; for "
        "--config 'all' unless config.method is 'fp')",
    )
    parser.add_argument(
        "--num_classes", type=int, default=None, help="--config: classes (default: from the data)"
    )
    parser.add_argument("--json", default=None, help="also write the table as JSON here")
    args = parser.parse_args(argv)

    if args.workdir:
        try:
            run = checkpoint.load_run_variables(args.workdir)
        except (FileNotFoundError, checkpoint.CheckpointReadError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return EXIT_BAD_INPUT
        model, variables, shape = run.model, run.variables, run.input_shape
        binary = args.binary or "modes"
        title = f"model summary ({run.config.method}, {args.workdir}, step {run.step})"
    else:
        config = load_config_file(args.config)
        shape, classes = _dataset_shape(config, args.num_classes)
        settings = method_settings(config.method)
        model = experiment.create_model(config, classes)
        variables = jax.eval_shape(
            lambda k: model.init(k, jnp.zeros((1, *shape), jnp.float32), train=False),
            jax.random.PRNGKey(0),
        )
        binary = args.binary or ("all" if settings.quantize else "none")
        title = f"model summary ({config.method}, {args.config}, binary={binary})"
    summary = model_summary(model, variables, shape, binary)
    print(format_summary(summary, title))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary.to_dict(), f, indent=2)
    return 0


def _dataset_shape(config, num_classes=None) -> tuple[tuple[int, int, int], int]:
    """Input shape and classes of the configured dataset.

    With ``num_classes`` given, no data is touched (static facts only); otherwise the dataset is
    described as the trainer does (which may prepare it), falling back to static facts.
    """
    spec = registry.get_spec(config.dataset.name)
    size = int(config.dataset.image_size)
    static = ((size, size, len(spec.mean)), num_classes)
    if num_classes:
        return static
    try:
        info = qdata.dataset_info(config.dataset)
        return tuple(info.image_shape), int(info.num_classes)
    except Exception as e:  # noqa: BLE001 - data not available here
        raise SystemExit(f"cannot describe {config.dataset.name} ({e}): pass --num_classes") from e


if __name__ == "__main__":
    reporting.warnings_to_stderr()
    sys.exit(main())
