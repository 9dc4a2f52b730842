"""``python -m qat_jax.summary --workdir=DIR | --config=FILE``: the model summary table of a run's
final checkpoint or of a configured model (the table: :mod:`qat_jax.summary`).

``--workdir`` reads the run's newest readable checkpoint (a corrupt latest one falls back to the
previous one, with one warning line on stderr naming the step used); ``--config`` builds the
configured model without computing anything, every quantizable layer counted as it is deployed
by the config's method. absl flags, like the other entry points. Exit codes: 0 done, 2 no
readable checkpoint / bad input (a missing, clashing or unknown flag: one ``error:`` line).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
from absl import app, flags
from absl import logging as absl_logging

from qat_jax import cli, experiment
from qat_jax import data as qdata
from qat_jax import models as qmodels
from qat_jax.data import registry
from qat_jax.summary import _BINARY_MODES, format_summary, model_summary
from qat_jax.train import checkpoint, reporting
from qat_jax.train.config_files import load_config_file
from qat_jax.train.methods import method_settings

EXIT_BAD_INPUT = cli.EXIT_BAD_INPUT

#: This entry point's flags (kept apart from every other module's: qat_jax.cli).
FLAGS = flags.FlagValues()
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "A run's workdir (its newest readable checkpoint).", flag_values=FLAGS
)
_CONFIG = flags.DEFINE_string(
    "config", None, "A configs/*.py file (a freshly initialised model).", flag_values=FLAGS
)
_BINARY = flags.DEFINE_enum(
    "binary",
    None,
    list(_BINARY_MODES),
    "Which quantizable layers count as binary (default: 'modes' for --workdir; for --config "
    "the layers the config binarizes, all but quant.fp_kinds, or none for method 'fp').",
    flag_values=FLAGS,
)
_NUM_CLASSES = flags.DEFINE_integer(
    "num_classes", None, "--config: classes (default: from the data).", flag_values=FLAGS
)
_JSON = flags.DEFINE_string("json", None, "Also write the table as JSON here.", flag_values=FLAGS)
flags.mark_flags_as_mutual_exclusive(["workdir", "config"], required=True, flag_values=FLAGS)


#: absl's parsing; neither or both of --workdir/--config, an unknown flag or value: one line, exit 2.
parse_flags = cli.flags_parser("python -m qat_jax.summary", FLAGS)


def main(argv: list[str]) -> int:
    """Print the summary of the flagged run or config; returns the process exit code."""
    if len(argv) > 1:
        return cli.error(f"unexpected arguments {argv[1:]}: every setting is a --flag")
    absl_logging.set_verbosity(absl_logging.WARNING)
    if _WORKDIR.value:
        try:
            run = checkpoint.load_run_variables(_WORKDIR.value)
        except (FileNotFoundError, checkpoint.CheckpointReadError) as e:
            return cli.error(str(e))
        model, variables, shape = run.model, run.variables, run.input_shape
        binary = _BINARY.value or "modes"
        title = f"model summary ({run.config.method}, {_WORKDIR.value}, step {run.step})"
    else:
        config = load_config_file(_CONFIG.value)
        shape, classes = _dataset_shape(config, _NUM_CLASSES.value)
        settings = method_settings(config.method)
        model = experiment.create_model(config, classes)
        variables = jax.eval_shape(
            lambda k: model.init(k, jnp.zeros((1, *shape), jnp.float32), train=False),
            jax.random.PRNGKey(0),
        )
        binary = _BINARY.value
        if binary is None and settings.quantize:
            layers = qmodels.traced_quantizable_layers(model, (1, *shape))
            try:
                binary = [q.path for q in experiment.binary_layers(config, layers)]
            except experiment.ConfigError as e:
                return cli.error(str(e))
            kinds = tuple(experiment.fp_kinds(config))
            label = f"all but {', '.join(kinds)}" if kinds else "all"
        else:
            binary = binary or "none"
            label = binary
        title = f"model summary ({config.method}, {_CONFIG.value}, binary={label})"
    summary = model_summary(model, variables, shape, binary)
    print(format_summary(summary, title))
    if _JSON.value:
        with open(_JSON.value, "w") as f:
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
    app.run(main, flags_parser=parse_flags)
