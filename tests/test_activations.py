"""RPReLU (ReActNet) and the mode-gated activation after binary convs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import assert_close_to_scale

from qat_jax.activations import ConvActivation, RPReLU, rprelu
from qat_jax.layers import BINARY_INPUT
from qat_jax.models import MobileNetV2, ResNet20, init_variables, quantizable_layers


def test_rprelu_closed_form_and_gradients():
    x = jnp.asarray([[-2.0, 0.5], [1.0, -0.25]])
    shift_in, slope, shift_out = (
        jnp.asarray([0.5, -1.0]),
        jnp.asarray([0.1, 0.3]),
        jnp.asarray([2.0, -1.0]),
    )
    y = rprelu(x, shift_in, slope, shift_out)
    # z = x - shift_in = [[-2.5, 1.5], [0.5, 0.75]] -> [[-0.25, 1.5], [0.5, 0.75]] + shift_out
    np.testing.assert_allclose(y, [[1.75, 0.5], [2.5, -0.25]], rtol=1e-6)
    # d/dslope = z where z < 0; d/dshift_out = 1; d/dshift_in = -1 (z > 0) or -slope (z < 0).
    g = jax.grad(lambda a, b, c: jnp.sum(rprelu(x, a, b, c)), argnums=(0, 1, 2))(
        shift_in, slope, shift_out
    )
    np.testing.assert_allclose(g[0], [-1.0 - 0.1, -1.0 - 1.0], rtol=1e-6)
    np.testing.assert_allclose(g[1], [-2.5, 0.0], rtol=1e-6)
    np.testing.assert_allclose(g[2], [2.0, 2.0], rtol=1e-6)


def test_rprelu_module_init_is_prelu():
    x = jnp.linspace(-3, 3, 12).reshape(2, 6)
    v = RPReLU().init(jax.random.PRNGKey(0), x)
    np.testing.assert_allclose(v["params"]["slope"], 0.25)
    np.testing.assert_allclose(RPReLU().apply(v, x), jnp.where(x > 0, x, 0.25 * x))


def test_conv_activation_switches_on_a_mode():
    x = jnp.linspace(-8, 8, 10).reshape(1, 10)
    plain = ConvActivation(nn.relu6, rprelu=False)
    assert plain.init(jax.random.PRNGKey(0), x, 0) == {}
    gated = ConvActivation(nn.relu6, rprelu=True)
    v = gated.init(jax.random.PRNGKey(0), x, 0)
    np.testing.assert_allclose(gated.apply(v, x, 0), nn.relu6(x))
    np.testing.assert_allclose(gated.apply(v, x, 1), jnp.where(x > 0, x, 0.25 * x))


def _set_a_mode(variables, value):
    out = jax.tree_util.tree_map_with_path(
        lambda path, leaf: (
            jnp.full_like(leaf, value) if getattr(path[-1], "key", None) == "a_mode" else leaf
        ),
        variables["qstate"],
    )
    return {**variables, "qstate": out}


@pytest.mark.slow
def test_rprelu_models_are_the_fp_model_until_inputs_are_binary():
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    for cls, kw in (
        (
            MobileNetV2,
            dict(
                variant="cifar",
                num_classes=10,
                width_mult=0.25,
                inverted_residual_setting=((1, 8, 1, 1), (2, 8, 1, 2)),
                last_channel=16,
            ),
        ),
        (ResNet20, dict(num_classes=10)),
    ):
        base = cls(**kw)
        rp = cls(**kw, rprelu=True)
        vb = init_variables(base, jax.random.PRNGKey(0), (1, 32, 32, 3))
        vr = init_variables(rp, jax.random.PRNGKey(0), (1, 32, 32, 3))
        # Only RPReLU parameters are added (three per channel of each gated activation).
        extra = sum(x.size for x in jax.tree.leaves(vr["params"])) - sum(
            x.size for x in jax.tree.leaves(vb["params"])
        )
        assert extra > 0 and extra % 3 == 0
        assert len(quantizable_layers(vr)) == len(quantizable_layers(vb))

        # Same weights, FP modes: identical logits.
        def copy_into(dst, src):
            return {
                k: copy_into(dst[k], src[k])
                if isinstance(dst[k], dict) and k in src
                else (src[k] if k in src else dst[k])
                for k in dst
            }

        vr2 = {
            **vr,
            "params": copy_into(vr["params"], vb["params"]),
            "batch_stats": vb["batch_stats"],
        }
        # Jitted: one compile per model instead of one per primitive of an eager apply.
        f_rp = jax.jit(lambda v, z, m=rp: m.apply(v, z, train=False))
        f_base = jax.jit(lambda v, z, m=base: m.apply(v, z, train=False))
        # The same float32 ops in the same order; bounded by the logits' scale all the same.
        assert_close_to_scale(f_rp(vr2, x), f_base(vb, x), 1e-5)
        # Binary inputs: RPReLU (negative slope 0.25) replaces ReLU, so the logits change.
        a = f_rp(_set_a_mode(vr2, BINARY_INPUT), x)
        b = f_base(_set_a_mode(vb, BINARY_INPUT), x)
        assert not np.allclose(a, b)
