"""The config -> objects module: one validation of every numeric key before any compute, the
builders every user shares, and the layer list counted without compute."""

import glob
import math
import os
import subprocess
import sys

import jax
import pytest
from helpers import set_keys

from qat_jax import experiment
from qat_jax import models as qmodels
from qat_jax.experiment import ConfigError, validate_config
from qat_jax.train.config_files import load_config_file
from qat_jax.train.stages import StageController

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def _config(name="tiny.py", **overrides):
    c = load_config_file(os.path.join(ROOT, "configs", name))
    c.unlock()
    return set_keys(c, **overrides)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_shipped_config_validates(path):
    c = load_config_file(path)
    validate_config(c.base if "base" in c else c, 1)


NAN, INF = math.nan, math.inf


@pytest.mark.parametrize(
    "key, value",
    [
        ("stage_eval_examples", -2),
        ("log_every", 0),
        ("checkpoint_every", 0),
        ("keep_checkpoints", 0),
        ("model.width_mult", 0.0),
        ("model.width_mult", NAN),
        ("model.last_channel", 0),
        ("model.dropout_rate", 1.0),
        ("model.dropout_rate", -0.1),
        ("dataset.image_size", 0),
        ("dataset.num_train_examples", 0),
        ("dataset.num_eval_examples", 0),
        ("dataset.worker_count", -1),
        ("dataset.read_threads", -1),
        ("dataset.prefetch_batches", -1),
        ("fp.steps", -1),
        ("fp.learning_rate", 0.0),
        ("fp.learning_rate", NAN),
        ("fp.warmup_steps", -1),
        ("fp.final_lr_fraction", 1.5),
        ("fp.grad_clip", INF),
        ("optim.learning_rate", -1e-3),
        ("optim.learning_rate", INF),
        ("optim.warmup_steps", -1),
        ("optim.final_lr_fraction", -0.1),
        ("optim.grad_clip", -1.0),
        ("optim.weight_decay", -1e-4),
        ("fp.weight_decay", NAN),
        ("loss.label_smoothing", 1.0),
        ("loss.label_smoothing", NAN),
        ("loss.kd_weight", -1.0),
        ("loss.kd_temperature", 0.0),
        ("loss.info_weight", NAN),
        ("quant.gamma", NAN),
        ("quant.gamma", -0.5),
        ("quant.weight_clip", NAN),
        ("quant.refine_sweeps", -1),
        ("schedule.steps_per_stage", 0),
        ("schedule.final_steps", -1),
        ("schedule.total_stage_steps", -1),
        ("schedule.acts_first_steps", -1),
        ("schedule.calib_batches", 0),
        ("schedule.bn_batches", 0),
    ],
)
def test_every_numeric_key_is_checked_with_a_one_line_error_naming_it(key, value):
    with pytest.raises(ConfigError) as e:
        validate_config(_config(**{key: value}), 1)
    msg = str(e.value)
    assert msg.startswith(f"--config.{key}={value!r}: must "), msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("batch_size", 0, "batch_size=0 must be a positive multiple"),
        ("batch_size", 12, "multiple of the 8 devices: set --config.batch_size"),
        ("eval_batch_size", 60, "set --config.eval_batch_size"),
        ("quant.act_grad", "sign", "--config.quant.act_grad='sign': must be 'approx' or 'ste'"),
        ("quant.tau_init", "median", "--config.quant.tau_init='median'"),
        ("quant.fp_kinds", ("conv2d",), "unknown layer kinds"),
        ("model.inverted_residual_setting", ((1, 8, 1),), "rows of 4 integers"),
        ("optim.schedule", "cosine", "optim.schedule must be one of"),
        ("schedule.granularity", "blocks", "granularity must be one of"),
        ("schedule.bn_estimate", "mean", "--config.schedule.bn_estimate='mean': must be one of"),
        ("method", "bitatt", "unknown method"),
    ],
)
def test_names_and_batch_sizes_are_checked(key, value, match):
    with pytest.raises(ConfigError, match=match) as e:
        validate_config(_config(**{key: value}), 8)
    assert "\n" not in str(e.value)


def test_total_stage_steps_is_zero_or_at_least_one_step_per_stage():
    """tiny.py: two blocks and the head conv, block granularity -> 3 stages (the acts-first
    stage has its own budget and does not share it)."""
    validate_config(_config(**{"schedule.total_stage_steps": 0}), 1)
    validate_config(_config(**{"schedule.total_stage_steps": 3}), 1)
    with pytest.raises(ConfigError) as e:
        validate_config(_config(**{"schedule.total_stage_steps": 2}), 1)
    msg = str(e.value)
    assert msg.startswith("--config.schedule.total_stage_steps=2: fewer than the 3 stages")
    assert "\n" not in msg
    validate_config(_config(**{"schedule.total_stage_steps": 3, "schedule.acts_first_steps": 2}), 1)
    # The method's granularity counts: xnor binarizes everything in one stage.
    validate_config(_config(**{"schedule.total_stage_steps": 1, "method": "xnor"}), 1)
    # The fp method has no stages.
    validate_config(_config(**{"schedule.total_stage_steps": 1, "method": "fp"}), 1)


def test_fp_kinds_that_leave_nothing_to_binarize_fail():
    kinds = ("conv", "depthwise", "pointwise", "dense")
    with pytest.raises(ConfigError, match="leaves no layer to binarize"):
        validate_config(_config(**{"quant.fp_kinds": kinds}), 1)


def test_train_config_error_is_the_experiment_one():
    from qat_jax.train import ConfigError as TrainConfigError

    assert TrainConfigError is ConfigError


@pytest.mark.parametrize(
    "name, method",
    [("tiny.py", "bitat"), ("tiny.py", "reactnet"), ("resnet20_cifar10.py", "reactnet")],
)
def test_traced_layers_are_the_initialised_models_layers(name, method):
    c = _config(name, method=method)
    model = experiment.create_model(c, 10, experiment.quant_config(c))
    shape = (1, 32, 32, 1)
    traced = qmodels.traced_quantizable_layers(model, shape)
    variables = qmodels.init_variables(model, jax.random.PRNGKey(0), shape)
    assert traced == qmodels.quantizable_layers(variables)


def test_builders_follow_the_method():
    c = _config(method="xnor")
    assert experiment.quant_config(c).act_grad == "ste"  # the method's, not the config's
    assert not experiment.quant_config(c).transform
    assert experiment.schedule_config(c).granularity == "all"
    fp_only = experiment.create_controller(_config(method="fp"), [], 5)
    assert fp_only.num_stages == 0 and fp_only.total_steps == 5  # the FP phase is the whole run
    layers = qmodels.traced_quantizable_layers(experiment.create_model(c, 10), (1, 32, 32, 1))
    controller = experiment.create_controller(c, experiment.binary_layers(c, layers), 7)
    assert isinstance(controller, StageController)
    assert controller.num_stages == 1 and controller.qat_start == 7
    fp_loss = experiment.loss_config(c, fp_phase=True)
    assert fp_loss.kd_weight == 0.0 and fp_loss.info_weight == 0.0
    assert experiment.loss_config(c).kd_weight == c.loss.kd_weight


@pytest.mark.parametrize(
    "flag, key",
    [
        ("--config.quant.gamma=nan", "--config.quant.gamma=nan"),
        ("--config.schedule.total_stage_steps=1", "--config.schedule.total_stage_steps=1"),
    ],
)
def test_main_refuses_a_bad_config_in_one_line_before_compute(tmp_path, flag, key):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "QAT_JAX_"))}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env["JAX_PLATFORMS"] = "cpu"
    workdir = tmp_path / "run"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "qat_jax.main",
            "--config=configs/default.py",
            f"--workdir={workdir}",
            "--compilation_cache_dir=none",
            flag,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr[-3000:]
    assert lines[0].startswith(f"error: {key}: "), lines[0]
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))
