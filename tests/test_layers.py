"""Binary Flax layers: every mode against a direct conv / numpy reference, calibration, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from qat_jax.layers import (
    BINARIZING,
    BINARY_INPUT,
    CALIB,
    FP,
    FP_INPUT,
    FROZEN,
    INPUT_STATS,
    RECORD_XXT,
    BinaryConv,
    BinaryDense,
    QuantConfig,
    kernel_to_matrix,
    layer_binary_weights,
    matrix_to_kernel,
)

# jitted: eager dispatch compiles op by op (seconds on 2 CPU cores)
layer_binary_weights_j = jax.jit(layer_binary_weights, static_argnums=(1, 4))
HI = lax.Precision.HIGHEST
ATOL = 1e-5


def _np_sign(x):
    return np.where(np.asarray(x) >= 0, 1.0, -1.0)


def _np_cayley(p):
    p = np.asarray(p, np.float64)
    a = p - np.swapaxes(p, -1, -2)
    eye = np.eye(p.shape[-1])
    return (eye - a) @ np.linalg.inv(eye + a)


def _np_patches(x, k, s):
    """[N, Ho, Wo, kh, kw, C] with symmetric k // 2 zero padding (float64)."""
    kh, kw = k
    n, h, w, c = x.shape
    ph, pw = kh // 2, kw // 2
    xp = np.zeros((n, h + 2 * ph, w + 2 * pw, c))
    xp[:, ph : ph + h, pw : pw + w] = x
    ho = (h + 2 * ph - kh) // s[0] + 1
    wo = (w + 2 * pw - kw) // s[1] + 1
    out = np.zeros((n, ho, wo, kh, kw, c))
    for y in range(ho):
        for xx in range(wo):
            out[:, y, xx] = xp[:, y * s[0] : y * s[0] + kh, xx * s[1] : xx * s[1] + kw]
    return out


def _group_patches(x, k, s, groups):
    """[G, M, d] im2col patches per group, d in (kh, kw, c) order."""
    p = _np_patches(np.asarray(x, np.float64), k, s)
    cin_g = p.shape[-1] // groups
    return np.stack(
        [
            p[..., g * cin_g : (g + 1) * cin_g].reshape(-1, k[0] * k[1] * cin_g)
            for g in range(groups)
        ]
    )


_JITTED = {}


def _apply(module, variables, x, mutable=False):
    """``module.apply`` under one cached ``jit`` per (module, mutable): modes are data, so every
    mode of a layer shares one compilation (eager ``lax.switch`` would recompile each call)."""
    key = (repr(module), str(mutable))
    if key not in _JITTED:
        _JITTED[key] = jax.jit(lambda v, z: module.apply(v, z, mutable=mutable))
    return _JITTED[key](variables, jnp.asarray(x))


def _fresh_value(path, sds, module, rng):
    """Value a fresh ``module.init`` gives a variable (the latent kernel: random normal)."""
    coll, name = path
    if (coll, name) == ("params", "kernel"):
        return jnp.asarray(0.5 * rng.standard_normal(sds.shape), sds.dtype)
    if (coll, name) == ("calib", "V0"):
        return jnp.broadcast_to(jnp.eye(sds.shape[-1], dtype=sds.dtype), sds.shape)
    if (coll, name) == ("calib", "lam"):
        return jnp.ones(sds.shape, sds.dtype)
    if (coll, name) == ("qstate", "block"):
        return jnp.asarray(module.block_id, sds.dtype)
    return jnp.zeros(sds.shape, sds.dtype)


def _init(module, x, seed=0):
    """Fresh variables without the output-only collections (``losses``, ``input_stats``).

    Shapes come from ``jax.eval_shape(module.init)`` (no compilation: a real eager/jitted init
    costs seconds per layer on 2 CPU cores); the values are those of a fresh init, as checked
    against a real ``module.init`` in :func:`test_fresh_init_values`.
    """
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.asarray(x))
    rng = np.random.default_rng(seed)
    return {
        coll: {name: _fresh_value((coll, name), sds, module, rng) for name, sds in c.items()}
        for coll, c in shapes.items()
        if coll not in ("losses", INPUT_STATS)
    }


def _with(v, **updates):
    """Copy of ``v`` with ``coll__name=value`` replaced."""
    out = {k: dict(c) for k, c in v.items()}
    for key, value in updates.items():
        coll, name = key.split("__")
        old = out[coll][name]
        out[coll][name] = jnp.asarray(value, old.dtype)
    return out


def _modes(v, w_mode, a_mode):
    return _with(v, qstate__w_mode=w_mode, qstate__a_mode=a_mode)


def _ref_conv(x, kernel, strides, groups):
    kh, kw = kernel.shape[:2]
    return np.asarray(
        lax.conv_general_dilated(
            jnp.asarray(x, jnp.float32),
            jnp.asarray(kernel, jnp.float32),
            window_strides=strides,
            padding=[(kh // 2, kh // 2), (kw // 2, kw // 2)],
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups,
            precision=HI,
        )
    )


def _xnor_kernel(kernel):
    """alpha * sign(W), alpha = mean|W| per output channel (HWIO or [d_in, d_out])."""
    k = np.asarray(kernel, np.float64)
    alpha = np.mean(np.abs(k), axis=tuple(range(k.ndim - 1)))
    return alpha * _np_sign(k), alpha


def _np_correlation(v0, p, rho):
    v = np.asarray(v0, np.float64) @ _np_cayley(p)
    s2 = np.exp(2.0 * np.asarray(rho, np.float64))
    s2 = s2 / s2.mean(-1, keepdims=True)
    return np.einsum("gij,gj,gkj->gik", v, s2, v)


def _random_transform(rng, groups, d):
    v0, _ = np.linalg.qr(rng.standard_normal((groups, d, d)))
    p = 0.1 * rng.standard_normal((groups, d, d))
    rho = 0.5 * rng.standard_normal((groups, d))
    return v0.astype(np.float32), p.astype(np.float32), rho.astype(np.float32)


# (name, features, kernel, C_in, groups)
CONV_CASES = [
    ("3x3", 6, (3, 3), 4, 1),
    ("1x1", 6, (1, 1), 4, 1),
    ("depthwise", 4, (3, 3), 4, 4),
]


def _conv_setup(rng, case, stride, quant=QuantConfig(), hw=7, conv_impl="auto"):
    _, features, k, cin, groups = case
    module = BinaryConv(
        features,
        k,
        (stride, stride),
        feature_group_count=groups,
        quant=quant,
        conv_impl=conv_impl,
    )
    x = rng.standard_normal((2, hw, hw, cin)).astype(np.float32)
    v = _init(module, jnp.asarray(x))
    tau = 0.3 * rng.standard_normal(cin).astype(np.float32)
    v = _with(v, quant__tau=tau)
    return module, x, v, tau


# --------------------------------------------------------------------------- conv modes


def _check_conv_modes(rng, module, x, v, tau, stride, groups):
    """All (w_mode, a_mode) pairs against lax.conv_general_dilated with XNOR weights / sign inputs."""
    kernel = np.asarray(v["params"]["kernel"])
    wb, alpha = _xnor_kernel(kernel)
    xb = _np_sign(x - tau)
    s = (stride, stride)
    expected = {
        (BINARIZING, 1): _ref_conv(xb, wb, s, groups),
        (FP, 0): _ref_conv(x, kernel, s, groups),
        (FP, 1): _ref_conv(xb, kernel, s, groups),
        (BINARIZING, 0): _ref_conv(x, wb, s, groups),
    }
    for (wm, am), ref in expected.items():
        y = _apply(module, _modes(v, wm, am), x)
        assert y.shape == ref.shape
        np.testing.assert_allclose(np.asarray(y), ref, atol=ATOL, rtol=0, err_msg=str((wm, am)))
    # frozen: B = sign(W) as int8 and alpha written into `binary` give the binarizing output
    b = kernel_to_matrix(jnp.asarray(_np_sign(kernel)), groups).astype(jnp.int8)
    frozen = _with(v, binary__B=b, binary__alpha=alpha.reshape(groups, -1))
    y_bin = _apply(module, _modes(v, BINARIZING, 1), x)
    y_frz = _apply(module, _modes(frozen, FROZEN, 1), x)
    np.testing.assert_allclose(np.asarray(y_frz), np.asarray(y_bin), atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(y_frz), expected[(BINARIZING, 1)], atol=ATOL, rtol=0)
    # frozen mode does not read the latent kernel
    other = _with(frozen, params__kernel=rng.standard_normal(kernel.shape))
    y_other = _apply(module, _modes(other, FROZEN, 1), x)
    np.testing.assert_array_equal(np.asarray(y_other), np.asarray(y_frz))


@pytest.mark.parametrize("transform", [True, False], ids=["C=I", "no_transform"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv_modes_with_identity_c(rng, case, stride, transform):
    """Fresh init (V0 = I, P = 0, rho = 0: C = I) or no transform: binarizing = XNOR conv."""
    hw = 7 if stride == 1 else 8
    module, x, v, tau = _conv_setup(rng, case, stride, QuantConfig(transform=transform), hw=hw)
    if transform:
        d = v["calib"]["V0"].shape[-1]
        np.testing.assert_array_equal(np.asarray(v["calib"]["V0"][0]), np.eye(d))
        assert not np.any(np.asarray(v["quant"]["P"])) and not np.any(np.asarray(v["quant"]["rho"]))
    else:
        assert "P" not in v["quant"] and "calib" not in v
    _check_conv_modes(rng, module, x, v, tau, stride, case[4])


@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv_modes_xla_impl(rng, case):
    module, x, v, tau = _conv_setup(rng, case, 2, conv_impl="xla")
    _check_conv_modes(rng, module, x, v, tau, 2, case[4])


def test_fresh_init_values(rng):
    """The real ``module.init`` gives what :func:`_init` assumes (besides the random kernel)."""
    x = jnp.asarray(rng.standard_normal((1, 5, 5, 3)), jnp.float32)
    module = BinaryConv(4, (3, 3), feature_group_count=1, block_id=3)
    real = jax.jit(module.init)(jax.random.PRNGKey(0), x)
    ours = _init(module, x)
    assert set(real) - {"losses", INPUT_STATS} == set(ours)
    for coll, c in ours.items():
        assert set(real[coll]) == set(c), coll
        for name, value in c.items():
            ref = real[coll][name]
            assert ref.shape == value.shape and ref.dtype == value.dtype, (coll, name)
            if name != "kernel":
                np.testing.assert_array_equal(np.asarray(ref), np.asarray(value), err_msg=name)
    assert int(real["qstate"]["w_mode"]) == FP and int(real["qstate"]["a_mode"]) == FP
    assert real["binary"]["B"].shape == (1, 4, 27) and real["quant"]["P"].shape == (1, 27, 27)


def test_stored_variable_names_are_the_checkpoint_layout():
    """Renamed Python names, unchanged stored names: checkpoints written before still restore.

    The restore checks the tree against a fresh model, so a stored key that changed would make every
    existing checkpoint unreadable. ``input_stats`` (``calib_stats`` before) is never stored.
    """
    x = jnp.zeros((1, 5, 5, 3), jnp.float32)
    module = BinaryConv(4, (3, 3), feature_group_count=1, block_id=3)
    v = _init(module, x)
    assert sorted(v) == ["binary", "calib", "params", "qstate", "quant"]
    assert CALIB == "calib" and sorted(v[CALIB]) == ["V0", "lam"]
    assert sorted(v["qstate"]) == ["a_mode", "block", "calib", "w_mode"]
    assert RECORD_XXT == "calib" and INPUT_STATS not in v
    assert (FP, BINARIZING, FROZEN, FP_INPUT, BINARY_INPUT) == (0, 1, 2, 0, 1)


def _transform_case(rng, case, stride):
    module, x, v, tau = _conv_setup(rng, case, stride)
    groups = case[4]
    d = v["calib"]["V0"].shape[-1]
    v0, p, rho = _random_transform(rng, groups, d)
    v = _with(v, calib__V0=v0, quant__P=p, quant__rho=rho)
    return module, x, v, tau, (v0, p, rho)


@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[2]], ids=["3x3", "depthwise"])
def test_conv_transform_pattern_is_sign_wc_in_im2col_order(rng, case):
    stride = 2
    module, x, v, tau, (v0, p, rho) = _transform_case(rng, case, stride)
    _, features, k, cin, groups = case
    kernel = np.asarray(v["params"]["kernel"], np.float64)
    d = k[0] * k[1] * (cin // groups)
    dg = features // groups
    # W[g] = kernel[..., g*dg:(g+1)*dg].reshape(d, dg).T, columns in (kh, kw, c) order
    w = np.stack([kernel[..., g * dg : (g + 1) * dg].reshape(d, dg).T for g in range(groups)])
    c = _np_correlation(v0, p, rho)
    u = w @ c
    b_np = _np_sign(u)
    b, alpha, c_lib = layer_binary_weights_j(
        jnp.asarray(kernel, jnp.float32), groups, v["quant"], v["calib"], QuantConfig()
    )
    b, alpha = np.asarray(b), np.asarray(alpha, np.float64)
    np.testing.assert_allclose(np.asarray(c_lib), c, atol=1e-5)
    robust = np.abs(u) > 1e-4 * np.sqrt(np.mean(u**2, axis=-1, keepdims=True))
    np.testing.assert_array_equal(b[robust], b_np[robust])
    assert np.mean(b_np != _np_sign(w)) > 0.05  # the transform really changes the pattern
    alpha_np = np.einsum("goi,gij,goj->go", w, c, b) / np.einsum("goi,gij,goj->go", b, c, b)
    np.testing.assert_allclose(alpha, alpha_np, rtol=1e-4)
    # layer output = im2col(sign(x - tau)) @ (alpha B)^T per group
    pt = _group_patches(_np_sign(x - tau), k, (stride, stride), groups)  # [G, M, d]
    y_np = np.einsum("gmd,god->mgo", pt, alpha[..., None] * b).reshape(-1, features)
    y = np.asarray(_apply(module, _modes(v, BINARIZING, 1), jnp.asarray(x)))
    np.testing.assert_allclose(y.reshape(-1, features), y_np, atol=1e-4, rtol=1e-5)
    # frozen with the materialised (B, alpha) reproduces it
    frozen = _with(v, binary__B=b.astype(np.int8), binary__alpha=alpha)
    y_frz = np.asarray(_apply(module, _modes(frozen, FROZEN, 1), jnp.asarray(x)))
    np.testing.assert_allclose(y_frz, y, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- dense


def test_dense_modes(rng):
    module = BinaryDense(5)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    v = _init(module, jnp.asarray(x))
    tau = 0.3 * rng.standard_normal(8).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32)
    v = _with(v, quant__tau=tau, params__bias=bias)
    kernel = np.asarray(v["params"]["kernel"], np.float64)
    xb = _np_sign(x - tau)
    wb, alpha = _xnor_kernel(kernel)
    cases = {
        (FP, 0): x @ kernel + bias,
        (FP, 1): xb @ kernel + bias,
        (BINARIZING, 0): x @ wb + bias,
        (BINARIZING, 1): xb @ wb + bias,
    }
    for (wm, am), ref in cases.items():
        y = _apply(module, _modes(v, wm, am), jnp.asarray(x))
        assert y.shape == (2, 3, 5)
        np.testing.assert_allclose(np.asarray(y), ref, atol=ATOL, rtol=1e-6, err_msg=str((wm, am)))
    frozen = _with(v, binary__B=_np_sign(kernel).T[None], binary__alpha=alpha[None])
    y = _apply(module, _modes(frozen, FROZEN, 1), jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), cases[(BINARIZING, 1)], atol=ATOL, rtol=0)
    # no transform: same binarizing output
    module_nt = BinaryDense(5, quant=QuantConfig(transform=False))
    v_nt = _init(module_nt, jnp.asarray(x))
    v_nt = _with(v_nt, quant__tau=tau, params__bias=bias, params__kernel=kernel)
    y = _apply(module_nt, _modes(v_nt, BINARIZING, 1), jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), cases[(BINARIZING, 1)], atol=ATOL, rtol=0)


def test_dense_transform_pattern(rng):
    module = BinaryDense(6, use_bias=False)
    x = rng.standard_normal((10, 12)).astype(np.float32)
    v = _init(module, jnp.asarray(x))
    v0, p, rho = _random_transform(rng, 1, 12)
    v = _with(v, calib__V0=v0, quant__P=p, quant__rho=rho)
    kernel = np.asarray(v["params"]["kernel"], np.float64)
    c = _np_correlation(v0, p, rho)[0]
    u = kernel.T @ c  # W = kernel^T, [d_out, d_in]
    b, alpha, _ = layer_binary_weights_j(
        jnp.asarray(kernel, jnp.float32), 1, v["quant"], v["calib"], QuantConfig()
    )
    b, alpha = np.asarray(b[0]), np.asarray(alpha[0], np.float64)
    robust = np.abs(u) > 1e-4 * np.sqrt(np.mean(u**2, axis=-1, keepdims=True))
    np.testing.assert_array_equal(b[robust], _np_sign(u)[robust])
    y = _apply(module, _modes(v, BINARIZING, 1), jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), _np_sign(x) @ (alpha[:, None] * b).T, atol=1e-4)


# --------------------------------------------------------------------------- calibration


@pytest.mark.parametrize(
    "case,stride",
    [(CONV_CASES[0], 1), (CONV_CASES[2], 2), (CONV_CASES[1], 2)],
    ids=["3x3_s1", "depthwise_s2", "1x1_s2"],
)
def test_conv_calibration_stats(rng, case, stride):
    module, x, v, tau = _conv_setup(rng, case, stride, hw=6)
    _, _, k, cin, groups = case
    _, st = _apply(module, _with(v, qstate__calib=1), jnp.asarray(x), mutable=[INPUT_STATS])
    st = st[INPUT_STATS]
    pt = _group_patches(_np_sign(x - tau), k, (stride, stride), groups)
    np.testing.assert_allclose(np.asarray(st["xxT"]), np.einsum("gmd,gme->gde", pt, pt), atol=1e-4)
    np.testing.assert_allclose(np.asarray(st["x_sum"]), x.sum(axis=(0, 1, 2)), rtol=1e-5, atol=1e-5)
    assert float(st["count"]) == x.shape[0] * x.shape[1] * x.shape[2]
    assert float(st["n_patches"]) == pt.shape[1]
    # RECORD_XXT switch 0: statistics other than xxT only
    _, st0 = _apply(module, v, jnp.asarray(x), mutable=[INPUT_STATS])
    assert not np.any(np.asarray(st0[INPUT_STATS]["xxT"]))
    # FP inputs when the layer does not binarize its input
    module_fp = module.clone(quant=QuantConfig(binarize_input=False))
    _, st1 = _apply(module_fp, _with(v, qstate__calib=1), jnp.asarray(x), mutable=[INPUT_STATS])
    pt = _group_patches(x, k, (stride, stride), groups)
    np.testing.assert_allclose(
        np.asarray(st1[INPUT_STATS]["xxT"]), np.einsum("gmd,gme->gde", pt, pt), atol=1e-3
    )


def test_dense_calibration_stats(rng):
    module = BinaryDense(4)
    x = rng.standard_normal((3, 5, 7)).astype(np.float32)
    v = _init(module, jnp.asarray(x))
    tau = 0.2 * rng.standard_normal(7).astype(np.float32)
    v = _with(v, quant__tau=tau, qstate__calib=1)
    _, st = _apply(module, v, jnp.asarray(x), mutable=[INPUT_STATS])
    st = st[INPUT_STATS]
    xb = _np_sign(x - tau).reshape(-1, 7)
    np.testing.assert_allclose(np.asarray(st["xxT"][0]), xb.T @ xb, atol=1e-5)
    np.testing.assert_allclose(np.asarray(st["x_sum"]), x.reshape(-1, 7).sum(0), atol=1e-5)
    assert float(st["count"]) == 15 and float(st["n_patches"]) == 15


# --------------------------------------------------------------------------- info loss, grads


@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[2]], ids=["3x3", "depthwise"])
def test_info_loss_is_output_error(rng, case):
    module, x, v, _, (v0, p, rho) = _transform_case(rng, case, 1)
    _, features, _, _, groups = case
    _, st = _apply(module, _modes(v, BINARIZING, 1), jnp.asarray(x), mutable=["losses"])
    (info,) = st["losses"]["info"]
    kernel = np.asarray(v["params"]["kernel"], np.float64)
    w = np.asarray(kernel_to_matrix(jnp.asarray(kernel), groups), np.float64)
    b, alpha, _ = layer_binary_weights_j(
        jnp.asarray(kernel, jnp.float32), groups, v["quant"], v["calib"], QuantConfig()
    )
    diff = w - np.asarray(alpha, np.float64)[..., None] * np.asarray(b, np.float64)
    c = _np_correlation(v0, p, rho)
    num = np.einsum("goi,gij,goj->g", diff, c, diff)
    den = np.einsum("goi,gij,goj->g", w, c, w)
    np.testing.assert_allclose(float(info), np.mean(num / den), rtol=1e-4)
    assert 0 < float(info) < 1
    for mode in (FP, FROZEN):
        _, st = _apply(module, _modes(v, mode, 1), jnp.asarray(x), mutable=["losses"])
        assert float(st["losses"]["info"][0]) == 0.0


def test_gradients_reach_kernel_transform_and_tau(rng):
    module, x, v, _, _ = _transform_case(rng, CONV_CASES[0], 1)
    v = _modes(v, BINARIZING, 1)
    g = rng.standard_normal((2, 7, 7, 6)).astype(np.float32)
    rest = {k: c for k, c in v.items() if k not in ("params", "quant")}

    def loss(params, quant):
        y = _apply(module, {**rest, "params": params, "quant": quant}, jnp.asarray(x))
        return jnp.sum(y * g)

    grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
    gp, gq = grad_fn(v["params"], v["quant"])
    for name, grad in (("kernel", gp["kernel"]), *((n, gq[n]) for n in ("P", "rho", "tau"))):
        grad = np.asarray(grad)
        assert np.all(np.isfinite(grad)), name
        assert np.max(np.abs(grad)) > 1e-6, name

    # FP mode: the kernel trains, the quantizer parameters get exactly zero
    v_fp = _modes(v, FP, 0)
    rest = {k: c for k, c in v_fp.items() if k not in ("params", "quant")}
    gp, gq = jax.jit(jax.grad(loss, argnums=(0, 1)))(v_fp["params"], v_fp["quant"])
    assert np.max(np.abs(np.asarray(gp["kernel"]))) > 1e-6
    for n in ("P", "rho", "tau"):
        assert not np.any(np.asarray(gq[n])), n


# --------------------------------------------------------------------------- kernel <-> matrix


@pytest.mark.parametrize(
    "shape,groups",
    [((3, 3, 4, 6), 1), ((3, 3, 2, 6), 2), ((3, 3, 1, 5), 5), ((1, 1, 4, 3), 1), ((8, 5), 1)],
)
def test_kernel_matrix_round_trip(rng, shape, groups):
    kernel = rng.standard_normal(shape).astype(np.float32)
    mat = np.asarray(kernel_to_matrix(jnp.asarray(kernel), groups))
    cout = shape[-1]
    dg = cout // groups
    d = int(np.prod(shape[:-1]))
    assert mat.shape == (groups, dg, d)
    flat = kernel.reshape(d, cout)  # rows in (kh, kw, c) order
    for g in range(groups):
        np.testing.assert_array_equal(mat[g], flat[:, g * dg : (g + 1) * dg].T)
    back = np.asarray(matrix_to_kernel(jnp.asarray(mat), shape))
    np.testing.assert_array_equal(back, kernel)
