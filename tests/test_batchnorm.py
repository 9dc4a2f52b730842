"""The zoo's BatchNorm (``qat_jax.models.batchnorm``) is ``flax.linen.BatchNorm``: the same
variables, outputs and running statistics, and gradients equal to autodiff of Flax's forward
pass, on one device and synchronised over a ``pmap`` axis."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import assert_close_to_scale

from qat_jax.models.batchnorm import BatchNorm

# Float32 sums over a batch in another order: ~1e-7 of the largest value observed; a missing
# term of the closed-form gradient (the mean or the variance path) moves it by ~1e-1.
REL = 1e-5


def _pair(train, axis_name=None):
    kw = dict(use_running_average=not train, momentum=0.9, epsilon=1e-5, axis_name=axis_name)
    return BatchNorm(**kw), nn.BatchNorm(**kw)


def _variables(rng, c):
    return {
        "params": {
            "scale": jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal(c), jnp.float32),
        },
        "batch_stats": {
            "mean": jnp.asarray(rng.standard_normal(c), jnp.float32),
            "var": jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32),
        },
    }


def test_same_variables_as_flax():
    x = jnp.zeros((2, 4, 4, 3))
    ours, flax_bn = _pair(train=True)
    a = jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(0), x))
    b = jax.tree.map(jnp.shape, flax_bn.init(jax.random.PRNGKey(0), x))
    assert a == b
    v = ours.init(jax.random.PRNGKey(0), x)
    assert np.all(v["params"]["scale"] == 1) and np.all(v["batch_stats"]["var"] == 1)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_outputs_statistics_and_gradients_equal_flax(rng, train):
    x = jnp.asarray(rng.standard_normal((4, 5, 6, 7)) * 3 + 1, jnp.float32)
    probe = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    v = _variables(rng, 7)
    outs = {}
    for name, bn in zip(("ours", "flax"), _pair(train), strict=True):

        def loss(params, x, bn=bn):
            y, upd = bn.apply({**v, "params": params}, x, mutable=["batch_stats"])
            return jnp.sum(y * probe), (y, upd["batch_stats"])

        (_, (y, stats)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
            v["params"], x
        )
        outs[name] = (y, stats, grads)
    (y1, s1, g1), (y2, s2, g2) = outs["ours"], outs["flax"]
    assert_close_to_scale(y1, y2, REL, err_msg="y")
    for k in ("mean", "var"):
        assert_close_to_scale(s1[k], s2[k], REL, err_msg=k)
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(g1)[0], jax.tree.leaves(g2), strict=True
    ):
        assert_close_to_scale(a, b, REL, err_msg=jax.tree_util.keystr(path))
    if train:  # the running statistics moved towards the batch's
        assert not np.allclose(s1["mean"], v["batch_stats"]["mean"])


def test_synchronised_over_pmap_equals_flax(rng):
    """Statistics over every device's images, and each device's gradients (the closed form's
    means over all devices, its ``dscale``/``dbias`` over the device's own images)."""
    ndev = 2
    assert jax.local_device_count() >= ndev  # tests/conftest.py: 8 simulated CPU devices
    x = jnp.asarray(rng.standard_normal((ndev, 3, 4, 4, 5)) * 2 - 1, jnp.float32)
    probe = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    v = _variables(rng, 5)
    outs = {}
    for name, bn in zip(("ours", "flax"), _pair(True, axis_name="d"), strict=True):

        def loss(params, x, p, bn=bn):
            y, upd = bn.apply({**v, "params": params}, x, mutable=["batch_stats"])
            return jnp.sum(y * p), (y, upd["batch_stats"])

        step = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
        (_, (y, stats)), grads = jax.pmap(step, axis_name="d", in_axes=(None, 0, 0))(
            v["params"], x, probe
        )
        outs[name] = (y, stats, grads)
    (y1, s1, g1), (y2, s2, g2) = outs["ours"], outs["flax"]
    assert_close_to_scale(y1, y2, REL, err_msg="y")
    assert_close_to_scale(s1["mean"], s2["mean"], REL, err_msg="mean")
    np.testing.assert_array_equal(s1["mean"][0], s1["mean"][1])  # one statistic for all
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(g1)[0], jax.tree.leaves(g2), strict=True
    ):
        assert_close_to_scale(a, b, REL, err_msg=jax.tree_util.keystr(path))
