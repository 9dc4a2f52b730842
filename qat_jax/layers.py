"""Binary Flax layers: a conv (kxk, 1x1, depthwise, grouped) and a dense layer, each with 3 modes.

Modes are **data**, not Python attributes, so one compiled train step serves every stage of the
progressive schedule (the stage controller edits them between steps):

=============  ===============================================================================
``w_mode``     weight path, ``lax.switch`` between:
               ``0`` FP (latent kernel as is), ``1`` binarizing (``alpha * sign(W C)`` computed
               on the fly from the latent ``W`` and the transform), ``2`` frozen binary
               (materialised ``B`` and ``alpha``; no transform work). Constants :data:`FP`,
               :data:`BINARIZING`, :data:`FROZEN`.
``a_mode``     input path: ``0`` FP input, ``1`` binary input ``sign(x - tau)`` (ApproxSign).
               Constants :data:`FP_INPUT`, :data:`BINARY_INPUT`.
=============  ===============================================================================

Variable collections of one layer (``G`` = groups, ``d`` = patch size ``kh*kw*C_in/G``,
``dg = C_out / G``):

=================  =========================================  ===========================
collection         variables                                  role
=================  =========================================  ===========================
``params``         ``kernel`` (HWIO / ``[d_in, d_out]``),     latent FP weights (trained)
                   ``bias`` (optional)
``quant``          ``tau`` ``[C_in]``; with the transform:    trained quantizer params
                   ``P`` ``[G, d, d]``, ``rho`` ``[G, d]``
``calib``          ``V0`` ``[G, d, d]``, ``lam`` ``[G, d]``   the calibration result
                                                              (never trained)
``binary``         ``B`` int8 ``[G, dg, d]``, ``alpha``       materialised binary weights
                   ``[G, dg]``
``qstate``         ``w_mode``, ``a_mode``, ``calib`` (the     per-layer switches, set by the
                   record-``xxT`` switch; int32 scalars),     stage controller and by
                   ``block`` (block id)                       calibration
``input_stats``    only when the caller makes it mutable:     one forward's statistics of
                   ``x_sum`` ``[C_in]``, ``count``,           the layer's input, for
                   ``pos_sum`` ``[C_in]`` (inputs with        calibration and diagnostics
                   ``x >= tau``), ``xxT`` ``[G, d, d]``,      (``xxT`` only where the
                   ``n_patches``                              switch is 1)
``losses``         sown ``info`` (relative output error)      only when mutable
=================  =========================================  ===========================

Names. ``calib`` names one thing in the code: the *collection* of calibration results (``V0``,
``lam``; :data:`CALIB`). The per-layer switch that makes a forward also record the second moment
``xxT`` is :data:`RECORD_XXT`, and the output-only collection a statistics forward fills is
:data:`INPUT_STATS` (``input_stats``; it was ``calib_stats`` before and is never stored). The
switch is still *stored* as ``qstate/<layer>/calib``: ``qstate`` is in every checkpoint and the
restore checks the tree against a fresh model, so renaming the stored key would make existing
checkpoints unreadable. Only the Python name changed; the checkpoint layout did not.

The weight matrix of group ``g`` is ``W[g] = kernel[..., g*dg:(g+1)*dg].reshape(d, dg).T`` whose
column order is the im2col order ``(kh, kw, c)`` of :func:`qat_jax.ops.extract_patches`; see
:func:`kernel_to_matrix`. Padding of a binarized input contributes 0 (not +-1), as in Bi-Real/
ReActNet implementations; the packed export accounts for it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from qat_jax import binarize, ops, transform
from qat_jax.quantizers import rsign

__all__ = [
    "FP",
    "BINARIZING",
    "FROZEN",
    "FP_INPUT",
    "BINARY_INPUT",
    "CALIB",
    "INPUT_STATS",
    "RECORD_XXT",
    "QuantConfig",
    "BinaryConv",
    "BinaryDense",
    "kernel_to_matrix",
    "matrix_to_kernel",
    "layer_correlation",
    "layer_binary_weights",
]

# ``w_mode``: latent FP kernel | binarized on the fly from the latent kernel | materialised B, alpha.
FP, BINARIZING, FROZEN = 0, 1, 2
# ``a_mode``: the layer's input as is | binarized, ``sign(x - tau)``.
FP_INPUT, BINARY_INPUT = 0, 1

# Collection of each layer's calibration result (``V0``, ``lam``): stored in checkpoints.
CALIB = "calib"
# Output-only collection one statistics forward fills (``x_sum``, ``count``, ``pos_sum``, ``xxT``,
# ``n_patches``); never stored.
INPUT_STATS = "input_stats"
# ``qstate`` switch: 1 = this forward also records ``xxT`` into :data:`INPUT_STATS`. Its stored
# key keeps the historical name ``calib`` so that existing checkpoints stay readable.
RECORD_XXT = "calib"

Dtype = Any


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Static quantization options shared by every binary layer of a model.

    Attributes:
      transform: ``True``: ``C = V diag(s^2) V^T`` from calibrated PCA plus the trained Cayley
        basis and importance (BiTAT); ``False``: ``C = I``, i.e. ``alpha * sign(W)`` with
        ``alpha = mean|W_o|`` (XNOR / plain progressive).
      weight_clip: STE clip of the weight sign relative to each row's rms of ``U = W C``
        (``None``: unclipped identity STE).
      act_grad: backward of the activation sign, ``'approx'`` (ApproxSign) or ``'ste'``.
      binarize_input: whether the layer binarizes its input when ``a_mode == BINARY_INPUT``.
      normalize_c: normalise ``C`` to mean eigenvalue 1.
      static_fp: every layer takes its FP paths whatever its ``w_mode`` and ``a_mode`` say, and
        no ``lax.switch``/``lax.cond`` between the paths is traced; the variables are the same.
        For programs that only ever run the FP model, such as the KD teacher's forward pass in
        the train step (:func:`qat_jax.models.static_fp`): they compile faster.
    """

    transform: bool = True
    weight_clip: float | None = 3.0
    act_grad: str = "approx"
    binarize_input: bool = True
    normalize_c: bool = True
    static_fp: bool = False


def kernel_to_matrix(kernel: jax.Array, groups: int) -> jax.Array:
    """HWIO conv kernel or ``[d_in, d_out]`` dense kernel -> ``[G, d_out / G, d]`` matrices."""
    cout = kernel.shape[-1]
    return kernel.reshape(-1, groups, cout // groups).transpose(1, 2, 0)


def matrix_to_kernel(mat: jax.Array, kernel_shape: tuple[int, ...]) -> jax.Array:
    """Inverse of :func:`kernel_to_matrix`."""
    return mat.transpose(2, 0, 1).reshape(kernel_shape)


def layer_correlation(quant_vars: dict, calib_vars: dict, cfg: QuantConfig) -> jax.Array | None:
    """``C = V0 cayley(P) diag(s^2) (...)^T`` of a layer, or ``None`` when the transform is off."""
    if not cfg.transform:
        return None
    v = transform.trained_basis(calib_vars["V0"], quant_vars["P"])
    return transform.correlation(v, quant_vars["rho"], normalize=cfg.normalize_c)


def layer_binary_weights(
    kernel: jax.Array,
    groups: int,
    quant_vars: dict,
    calib_vars: dict,
    cfg: QuantConfig,
    refine_sweeps: int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """``(B, alpha, C)`` of a layer from its variables: ``B`` ``[G, dg, d]``, ``alpha`` ``[G, dg]``.

    The single definition of the binarizing path; used by the layers' forward and by the stage
    controller when it materialises a block.
    """
    w = kernel_to_matrix(kernel.astype(jnp.float32), groups)
    c = layer_correlation(quant_vars, calib_vars, cfg)
    b, alpha = binarize.importance_binarize(w, c, clip=cfg.weight_clip, refine_sweeps=refine_sweeps)
    return b, alpha, c


class _BinaryBase(nn.Module):
    """Variables and the three weight paths of :class:`BinaryConv` and :class:`BinaryDense`."""

    def _declare(self, kernel_shape, groups, c_in, d):
        cfg = self.quant
        dg = kernel_shape[-1] // groups
        qstate = {
            name: self.variable("qstate", name, lambda v=v: jnp.asarray(v, jnp.int32))
            for name, v in (
                ("w_mode", FP),
                ("a_mode", FP_INPUT),
                (RECORD_XXT, 0),
                ("block", self.block_id),
            )
        }
        quant = {"tau": self.variable("quant", "tau", lambda: jnp.zeros((c_in,), jnp.float32))}
        calib = {}
        if cfg.transform:
            quant["P"] = self.variable("quant", "P", lambda: jnp.zeros((groups, d, d), jnp.float32))
            quant["rho"] = self.variable(
                "quant", "rho", lambda: jnp.zeros((groups, d), jnp.float32)
            )
            calib["V0"] = self.variable(
                CALIB,
                "V0",
                lambda: jnp.broadcast_to(jnp.eye(d, dtype=jnp.float32), (groups, d, d)),
            )
            calib["lam"] = self.variable(CALIB, "lam", lambda: jnp.ones((groups, d), jnp.float32))
        binary = {
            "B": self.variable("binary", "B", lambda: jnp.zeros((groups, dg, d), jnp.int8)),
            "alpha": self.variable("binary", "alpha", lambda: jnp.zeros((groups, dg), jnp.float32)),
        }
        return qstate, quant, calib, binary

    def _effective_kernel(self, kernel, groups, qstate, quant, calib, binary):
        """``lax.switch`` over the three weight modes; sows the info-loss term when asked."""
        cfg = self.quant
        q = {k: v.value for k, v in quant.items()}
        cv = {k: v.value for k, v in calib.items()}
        # The info-loss term costs two more products with C (and their gradients) per binarizing
        # layer: computed only when the caller collects it (``losses`` mutable).
        want_info = self.is_mutable_collection("losses")

        def fp():
            return kernel, jnp.zeros((), jnp.float32)

        def binarizing():
            b, alpha, c = layer_binary_weights(kernel, groups, q, cv, cfg)
            w_hat = alpha[..., None] * b
            info = jnp.zeros((), jnp.float32)
            if want_info:
                w = kernel_to_matrix(kernel.astype(jnp.float32), groups)
                info = jnp.mean(binarize.output_error(w, w_hat, c))
            return matrix_to_kernel(w_hat, kernel.shape).astype(kernel.dtype), info

        def frozen():
            b = binary["B"].value.astype(jnp.float32)
            w_hat = binary["alpha"].value[..., None] * b
            return matrix_to_kernel(w_hat, kernel.shape).astype(kernel.dtype), jnp.zeros(
                (), jnp.float32
            )

        if cfg.static_fp:
            if want_info:
                self.sow("losses", "info", jnp.zeros((), jnp.float32))
            return kernel
        mode = jnp.clip(qstate["w_mode"].value, FP, FROZEN)
        k_eff, info = lax.switch(mode, (fp, binarizing, frozen))
        if want_info:
            self.sow("losses", "info", jnp.where(mode == BINARIZING, info, 0.0))
        return k_eff

    def _input(self, x, qstate, quant):
        cfg = self.quant
        if cfg.static_fp or not cfg.binarize_input:
            return x
        tau = quant["tau"].value
        return lax.cond(
            qstate["a_mode"].value == BINARY_INPUT,
            lambda z: rsign(z, tau, grad=cfg.act_grad),
            lambda z: z,
            x,
        )

    def _record_input_stats(self, x, patches_fn, groups, d, qstate, quant):
        """Record one batch's input statistics (only when :data:`INPUT_STATS` is mutable)."""
        if not self.is_mutable_collection(INPUT_STATS):
            return
        cfg = self.quant
        xf = x.astype(jnp.float32)
        self.put_variable(INPUT_STATS, "x_sum", jnp.sum(xf.reshape(-1, xf.shape[-1]), axis=0))
        self.put_variable(INPUT_STATS, "count", jnp.asarray(xf.size // xf.shape[-1], jnp.float32))
        tau = quant["tau"].value
        # Inputs that ``sign(x - tau)`` maps to +1, per channel (diagnostics: dead/saturated).
        ones = jnp.where(xf - tau >= 0, 1.0, 0.0).astype(jnp.float32)
        self.put_variable(INPUT_STATS, "pos_sum", jnp.sum(ones.reshape(-1, xf.shape[-1]), axis=0))

        def second_moment(z):
            if cfg.binarize_input:
                z = jnp.where(z - tau >= 0, 1.0, -1.0)
            pt = patches_fn(z)  # [G, M, d]
            return jnp.einsum("gmd,gme->gde", pt, pt, precision=lax.Precision.HIGHEST)

        xxt = lax.cond(
            qstate[RECORD_XXT].value == 1,
            second_moment,
            lambda z: jnp.zeros((groups, d, d), jnp.float32),
            xf,
        )
        self.put_variable(INPUT_STATS, "xxT", xxt)
        n_patches = jax.eval_shape(patches_fn, xf).shape[1]
        self.put_variable(INPUT_STATS, "n_patches", jnp.asarray(n_patches, jnp.float32))


class BinaryConv(_BinaryBase):
    """Binarizable 2-D convolution (NHWC input, HWIO kernel, symmetric ``k//2`` padding).

    Covers regular kxk and 1x1 convs (``feature_group_count=1``), depthwise
    (``feature_group_count=C_in``; one transform per channel, ``d = kh*kw``) and grouped convs.

    Attributes:
      features: output channels.
      kernel_size, strides: spatial.
      feature_group_count: groups.
      use_bias: add an FP bias (kept FP in every mode).
      block_id: id of the block this layer belongs to (consumed by the stage controller).
      quant: static :class:`QuantConfig`.
      conv_impl: ``'auto'``, ``'xla'``, ``'cpu'`` or ``'cpu_ffi'`` (see :func:`qat_jax.ops.conv2d`).
      dtype: compute dtype (e.g. ``jnp.bfloat16`` on TPU/GPU); parameters stay ``param_dtype``.
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    feature_group_count: int = 1
    use_bias: bool = False
    block_id: int = 0
    quant: QuantConfig = QuantConfig()
    conv_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``[N, H, W, C_in]`` -> ``[N, Ho, Wo, features]``."""
        groups = self.feature_group_count
        c_in = x.shape[-1]
        if c_in % groups or self.features % groups:
            raise ValueError(
                f"{self.name}: C_in={c_in} and features={self.features} must be divisible by "
                f"feature_group_count={groups}"
            )
        kh, kw = self.kernel_size
        kernel_shape = (kh, kw, c_in // groups, self.features)
        d = kh * kw * (c_in // groups)
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        qstate, quant, calib, binary = self._declare(kernel_shape, groups, c_in, d)

        def patches_fn(z):
            p = ops.extract_patches(z, (kh, kw), self.strides)  # [N, Ho, Wo, kh*kw, C]
            p = p.reshape(-1, kh * kw, groups, c_in // groups)
            return p.transpose(2, 0, 1, 3).reshape(groups, -1, d)

        self._record_input_stats(x, patches_fn, groups, d, qstate, quant)
        x = self._input(x, qstate, quant)
        k_eff = self._effective_kernel(kernel, groups, qstate, quant, calib, binary)
        y = ops.conv2d(
            x.astype(self.dtype),
            k_eff.astype(self.dtype),
            self.strides,
            feature_group_count=groups,
            impl=self.conv_impl,
        )
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class BinaryDense(_BinaryBase):
    """Binarizable dense layer: ``x`` ``[..., d_in]`` -> ``[..., features]``.

    Kernel ``[d_in, d_out]``; same modes and collections as :class:`BinaryConv` (``G = 1``).
    """

    features: int
    use_bias: bool = True
    block_id: int = 0
    quant: QuantConfig = QuantConfig()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (d, self.features), self.param_dtype)
        qstate, quant, calib, binary = self._declare((d, self.features), 1, d, d)
        self._record_input_stats(x, lambda z: z.reshape(1, -1, d), 1, d, qstate, quant)
        x = self._input(x, qstate, quant)
        k_eff = self._effective_kernel(kernel, 1, qstate, quant, calib, binary)
        y = jnp.dot(x.astype(self.dtype), k_eff.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y
