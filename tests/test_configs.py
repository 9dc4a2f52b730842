"""Every shipped config loads, is locked against unknown keys, and builds its model."""

import glob
import os

import jax
import jax.numpy as jnp
import pytest

from qat_jax import experiment
from qat_jax.data import get_config_defaults
from qat_jax.train.config_files import load_config_file
from qat_jax.train.methods import METHODS, method_settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
COMPARE = [p for p in ALL if os.path.basename(p).startswith("compare_")]
CONFIGS = [p for p in ALL if p not in COMPARE]
NUM_CLASSES = {"fashion_mnist": 10, "cifar10": 10, "cifar100": 100, "imagenet2012": 1000}
CHANNELS = {"fashion_mnist": 1, "cifar10": 3, "cifar100": 3, "imagenet2012": 3}


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads_locked_and_builds(path):
    c = load_config_file(path)
    with pytest.raises(AttributeError):
        c.no_such_key = 1
    with pytest.raises(AttributeError):
        c.schedule.no_such_key = 1
    assert set(get_config_defaults().keys()) <= set(c.dataset.keys())
    model = experiment.create_model(c, NUM_CLASSES[c.dataset.name])
    size = c.dataset.image_size
    x = jax.ShapeDtypeStruct((2, size, size, CHANNELS[c.dataset.name]), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)
    assert "params" in shapes and "qstate" in shapes


@pytest.mark.parametrize("path", COMPARE, ids=os.path.basename)
def test_compare_config_is_locked_and_its_base_is_a_training_config(path):
    c = load_config_file(path)
    with pytest.raises(AttributeError):
        c.no_such_key = 1
    assert c.methods and c.seeds and "fp" in c.methods
    for m in c.methods:
        method_settings(m)
    assert c.base.init == "train_fp"
    experiment.create_model(c.base, NUM_CLASSES[c.base.dataset.name])


def test_binary_shortcut_key_and_reactnet_turn_the_shortcut_on():
    c = load_config_file(os.path.join(ROOT, "configs", "default.py"))
    c.unlock()
    assert c.model.binary_shortcut is True  # the default recipe
    shortcut_methods = [m for m in METHODS if method_settings(m).shortcut]
    assert shortcut_methods == ["reactnet"]

    def built(method, key):
        c.method, c.model.binary_shortcut = method, key
        return experiment.create_model(c, 10)

    assert built("bitat", False).binary_shortcut is False
    assert built("bitat", True).binary_shortcut is True
    assert built("fp", True).binary_shortcut is True  # the FP model has the same shortcuts
    m = built("reactnet", False)  # the method ORs it in
    assert m.binary_shortcut is True and m.rprelu is True
    # A model without the option (ResNet) builds unchanged under reactnet.
    r = load_config_file(os.path.join(ROOT, "configs", "resnet20_cifar10.py"))
    r.unlock()
    r.method = "reactnet"
    model = experiment.create_model(r, 10)
    assert model.rprelu and not hasattr(model, "binary_shortcut")


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


@pytest.mark.parametrize(
    "base, acts_first, warmup", [("default", 40, 5), ("study", 250, 20)], ids=["default", "study"]
)
def test_faithful_config_is_its_base_with_the_recipe_switches_off(base, acts_first, warmup):
    """configs/faithful.py[:study] differs from configs/<base>.py in the recipe's switches only."""
    recipe = load_config_file(os.path.join(ROOT, "configs", f"{base}.py")).to_dict()
    arg = "" if base == "default" else f":{base}"
    faithful = load_config_file(os.path.join(ROOT, "configs", f"faithful.py{arg}"))
    with pytest.raises(AttributeError):  # locked like every config
        faithful.no_such_key = 1
    a, b = _flat(recipe), _flat(faithful.to_dict())
    assert a.keys() == b.keys()
    changed = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
    assert changed == {
        "model.binary_shortcut": (True, False),
        "quant.fp_kinds": (("depthwise",), ()),
        "schedule.acts_first_steps": (acts_first, 0),
        "optim.schedule": ("per_stage", "global"),
        "optim.warmup_steps": (warmup, 0),
    }


def test_faithful_config_rejects_an_unknown_base():
    with pytest.raises(ValueError, match="base must be one of"):
        load_config_file(os.path.join(ROOT, "configs", "faithful.py:tiny"))
