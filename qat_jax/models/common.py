"""Pieces shared by the model zoo: the FP conv, the BatchNorm factory, and layer enumeration.

Conventions of every model in :mod:`qat_jax.models`:

* inputs are NHWC ``[N, H, W, C]`` (any ``C``; Flax infers the stem's input channels), logits are
  ``[N, num_classes]`` float32;
* every conv except the stem is a :class:`qat_jax.layers.BinaryConv` with a ``block_id``; the stem
  (:class:`Conv`) and the classifier (``nn.Dense``) stay full precision and are not quantizable;
* BatchNorm follows PyTorch's defaults (torch ``momentum=0.1`` is Flax ``momentum=0.9``,
  ``epsilon=1e-5``); its ``scale``/``bias`` live in ``params`` (counted as parameters, as in
  torch) and its running statistics in ``batch_stats``;
* ``__call__(x, train)``: ``train=True`` uses batch statistics (and updates ``batch_stats`` when it
  is mutable) and enables dropout (rng stream ``'dropout'``).

:func:`quantizable_layers` lists the binary layers of initialised variables bottom to top; this is
what the stage controller consumes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qat_jax import ops
from qat_jax.layers import INPUT_STATS, BinaryConv, BinaryDense
from qat_jax.models.batchnorm import BatchNorm
from qat_jax.tree import from_leaves_with_paths, get_path, leaves_with_paths

__all__ = [
    "BN_MOMENTUM",
    "Conv",
    "LAYER_KINDS",
    "QLayer",
    "batch_norm",
    "init_variables",
    "kaiming_normal_fan_out",
    "quantizable_layers",
    "traced_quantizable_layers",
    "torch_linear_init",
    "_make_divisible",
]

Dtype = Any

#: torchvision's conv init, ``kaiming_normal_(mode='fan_out', nonlinearity='relu')`` (untruncated).
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

#: Collections that ``model.init`` creates only because everything is mutable at init.
_INIT_ONLY_COLLECTIONS = (INPUT_STATS, "losses")

#: XLA options for the one-off init program on CPU.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}

#: Forward position of a binary layer inside its block, by its module name (used to order layers
#: of one block when the variable dicts have lost their insertion order, e.g. after a pytree
#: round trip, which sorts dict keys). Unknown names keep their dict order after known ones.
_LOCAL_ORDER = {
    # MobileNetV2 inverted residual.
    "expand": 0,
    "depthwise": 1,
    "project": 2,
    # ResNet BasicBlock (torchvision order: the shortcut runs after the main path).
    "conv1": 0,
    "conv2": 1,
    "shortcut": 2,
    # Stand-alone head conv.
    "head_conv": 0,
}

#: The kinds of :class:`QLayer` (``quant.fp_kinds`` of a config names some of them).
LAYER_KINDS = ("conv", "depthwise", "pointwise", "dense")


def _make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """torchvision's ``_make_divisible``: round ``v`` to the nearest multiple of ``divisor``.

    Never goes below ``min_value`` (default ``divisor``) nor below 90% of ``v``.
    """
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def torch_linear_init(fan_in: int):
    """``(kernel_init, bias_init)`` of PyTorch's default ``nn.Linear`` init.

    Both are ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (``kaiming_uniform_(a=sqrt(5))`` for the
    weight), which is what torchvision's ResNet keeps for its ``fc``.
    """
    bound = 1.0 / np.sqrt(fan_in)

    def bias_init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"), bias_init


class Conv(nn.Module):
    """Full-precision 2-D conv through :func:`qat_jax.ops.conv2d` (the non-quantizable stem).

    Same layout and padding as :class:`qat_jax.layers.BinaryConv` (NHWC input, HWIO ``kernel``,
    symmetric ``k // 2`` padding as in PyTorch), so torchvision weights import one to one.

    Attributes:
      features: output channels.
      kernel_size, strides: spatial ``(h, w)``.
      feature_group_count: groups.
      use_bias: add a bias (param ``bias``).
      conv_impl: ``'auto'``, ``'xla'``, ``'cpu'`` or ``'cpu_ffi'`` (see :func:`qat_jax.ops.conv2d`).
      dtype: compute dtype; parameters are ``param_dtype``.
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    feature_group_count: int = 1
    use_bias: bool = False
    conv_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = kaiming_normal_fan_out

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``[N, H, W, C_in]`` -> ``[N, ceil(H / sh), ceil(W / sw), features]``."""
        c_in = x.shape[-1]
        groups = self.feature_group_count
        if c_in % groups or self.features % groups:
            raise ValueError(
                f"{self.name}: C_in={c_in} and features={self.features} must be divisible by "
                f"feature_group_count={groups}"
            )
        kh, kw = self.kernel_size
        kernel = self.param(
            "kernel", self.kernel_init, (kh, kw, c_in // groups, self.features), self.param_dtype
        )
        y = ops.conv2d(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            tuple(self.strides),
            feature_group_count=groups,
            impl=self.conv_impl,
        )
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


#: The BatchNorm momentum of every model of the zoo (PyTorch's 0.1): Flax updates the running
#: statistics as ``m * old + (1 - m) * batch``. BN re-estimation divides by ``1 - m``.
BN_MOMENTUM = 0.9


def batch_norm(
    train: bool,
    axis_name: str | None = None,
    dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> BatchNorm:
    """A BatchNorm with PyTorch's defaults (momentum 0.1 -> Flax 0.9, ``eps=1e-5``): Flax's
    function and variables with a hand-written backward pass (:mod:`qat_jax.models.batchnorm`).

    Args:
      train: ``True`` normalises with batch statistics (and updates the running ones).
      axis_name: pmap/shard_map axis to average batch statistics over (synchronised BN);
        ``None`` for single-device use. Only used in train mode.
      dtype: compute dtype (statistics and parameters stay float32).
      name: module name.
    """
    return BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=1e-5,
        axis_name=axis_name,
        dtype=dtype,
        name=name,
    )


@dataclasses.dataclass(frozen=True)
class QLayer:
    """One quantizable (binary) layer of a model.

    Attributes:
      path: module path inside each collection, e.g. ``('block3', 'expand')``; the layer's
        variables are ``variables[collection][*path]``.
      block_id: the block the layer belongs to (layers of one block share it).
      kind: ``'conv'`` (kxk or grouped), ``'depthwise'``, ``'pointwise'`` (1x1) or ``'dense'``.
    """

    path: tuple[str, ...]
    block_id: int
    kind: str


def _iter_qstate(tree: Mapping, prefix: tuple[str, ...] = ()):
    """Yield the paths of the modules that own ``block`` in a ``qstate`` tree (dict order)."""
    if "block" in tree and not isinstance(tree["block"], Mapping):
        yield prefix
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _iter_qstate(value, prefix + (key,))


def _kind(kernel_shape: tuple[int, ...], c_in: int) -> str:
    if len(kernel_shape) == 2:
        return "dense"
    kh, kw, cin_g, _ = kernel_shape
    groups = c_in // cin_g
    if groups > 1 and groups == c_in:
        return "depthwise"
    if kh == 1 and kw == 1 and groups == 1:
        return "pointwise"
    return "conv"


def quantizable_layers(variables: Mapping) -> list[QLayer]:
    """The binary layers of initialised ``variables``, bottom to top (forward order).

    Every :class:`~qat_jax.layers.BinaryConv`/:class:`~qat_jax.layers.BinaryDense` owns
    ``qstate/<path>/block``; its kind comes from the ``params`` kernel shape (HWIO or
    ``[d_in, d_out]``) and the input channels (``quant/<path>/tau`` is ``[C_in]``).

    Order: the models create their binary layers in forward order, so the variable dicts (as
    returned by ``model.init``) are already bottom to top. To stay correct on dicts whose keys were
    sorted (any pytree round trip, e.g. ``jax.tree.map`` or ``jit``), the list is stably sorted by
    block id, then by the layer's position inside its block (``expand < depthwise < project``,
    ``conv1 < conv2 < shortcut``); block ids increase bottom to top in every model of the zoo.

    Args:
      variables: the variables of an initialised model (concrete arrays: the block ids are read;
        ``jax.eval_shape`` outputs are not enough, see :func:`traced_quantizable_layers`).

    Returns:
      A list of :class:`QLayer`; stem and classifier (FP) are absent.
    """
    variables = flax.core.unfreeze(variables) if isinstance(variables, Mapping) else variables
    qstate = variables.get("qstate", {})
    found = []
    for path in _iter_qstate(qstate):
        block = get_path(qstate, path)["block"]
        if isinstance(block, jax.ShapeDtypeStruct):
            raise ValueError(
                "quantizable_layers needs concrete variables (block ids are data), not the "
                "output of jax.eval_shape"
            )
        kernel_shape = tuple(get_path(variables["params"], path)["kernel"].shape)
        if len(kernel_shape) == 2:
            c_in = kernel_shape[0]
        else:
            c_in = int(get_path(variables["quant"], path)["tau"].shape[0])
        found.append((path, int(np.asarray(block)), kernel_shape, c_in))
    return _ordered_layers(found)


def _ordered_layers(found: list[tuple[tuple[str, ...], int, tuple[int, ...], int]]) -> list[QLayer]:
    """``(path, block id, kernel shape, C_in)`` in module order -> sorted :class:`QLayer` list."""
    layers = []
    for index, (path, block_id, kernel_shape, c_in) in enumerate(found):
        rank = _LOCAL_ORDER.get(path[-1], len(_LOCAL_ORDER))
        layers.append(((block_id, rank, index), QLayer(path, block_id, _kind(kernel_shape, c_in))))
    layers.sort(key=lambda item: item[0])
    return [layer for _, layer in layers]


def traced_quantizable_layers(model: nn.Module, input_shape: tuple[int, ...]) -> list[QLayer]:
    """:func:`quantizable_layers` of ``model`` without computing anything (for checks that must
    come before any compute, e.g. the number of stages of a schedule).

    ``model.init`` is only traced (``jax.eval_shape``: no XLA compile, no arrays), and the binary
    layers are not even traced: each :class:`~qat_jax.layers.BinaryConv`/
    :class:`~qat_jax.layers.BinaryDense` call is recorded from its attributes (``block_id``,
    which its ``qstate/block`` is initialised to, kernel size, groups, features) and its input's
    shape, and returns zeros of its output's shape. The list equals
    ``quantizable_layers(init_variables(model, ...))`` (tested for every model of the zoo).

    Args:
      model: a model of the zoo (any module taking ``(x, train)`` built from binary layers).
      input_shape: ``(N, H, W, C)`` of an input the model accepts.
    """
    found = []

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, BinaryConv | BinaryDense):
            return next_fun(*args, **kwargs)
        x = args[0]
        c_in = int(x.shape[-1])
        if isinstance(module, BinaryDense):
            kernel_shape = (c_in, int(module.features))
            out = jnp.zeros((*x.shape[:-1], int(module.features)), module.dtype)
        else:
            groups = int(module.feature_group_count)
            kernel_shape = (*module.kernel_size, c_in // groups, int(module.features))
            kernel = jnp.zeros(kernel_shape, module.dtype)
            # The output shape of the layer's own conv (padding, strides), on zeros.
            out = ops.conv2d(x.astype(module.dtype), kernel, module.strides, None, groups, "xla")
        found.append((tuple(module.path), int(module.block_id), kernel_shape, c_in))
        return out

    def init(key, x):
        return model.init({"params": key, "dropout": key}, x, train=False)

    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    with nn.intercept_methods(interceptor):
        jax.eval_shape(init, jax.random.PRNGKey(0), x)
    return _ordered_layers(found)


def init_variables(
    model: nn.Module, rng: jax.Array, input_shape: tuple[int, ...], jit: bool = True
) -> dict:
    """``model.init`` on zeros of ``input_shape`` (NHWC) with ``train=False``.

    Drops the collections that exist only because everything is mutable at init
    (``input_stats``, ``losses``), so the forward pass itself is dead code and XLA removes it.

    Args:
      model: a model of the zoo (any module taking ``(x, train)``).
      rng: PRNG key (split into the ``params`` and ``dropout`` streams).
      input_shape: ``(N, H, W, C)``; only the shapes matter (``N = 1`` is enough).
      jit: compile the init as one program (much faster than eager init, whose every
        ``lax.switch``/``lax.cond`` of the binary layers compiles its branches one by one);
        on CPU it is compiled with ``xla_backend_optimization_level=0`` (it runs once).

    Returns:
      A plain nested dict of collections, typically ``params``, ``batch_stats``, ``qstate``,
      ``quant``, ``calib``, ``binary``, with every dict in module creation order (= forward order;
      preserved even though ``jit`` outputs would otherwise come back with sorted keys).
    """
    x = jnp.zeros(tuple(input_shape), jnp.float32)
    paths: list[tuple] = []

    def init(key):
        params_rng, dropout_rng = jax.random.split(key)
        variables = flax.core.unfreeze(
            model.init({"params": params_rng, "dropout": dropout_rng}, x, train=False)
        )
        variables = {k: v for k, v in variables.items() if k not in _INIT_ONLY_COLLECTIONS}
        items = leaves_with_paths(variables)
        paths[:] = [path for path, _ in items]
        return [leaf for _, leaf in items]

    if jit:
        # The init program runs once: on CPU, skipping LLVM's backend optimisation cuts its
        # compile time (dominated by the unrolled threefry of every initializer) about 5x.
        options = _FAST_COMPILE if jax.default_backend() == "cpu" else None
        leaves = jax.jit(init).lower(rng).compile(compiler_options=options)(rng)
    else:
        leaves = init(rng)
    return from_leaves_with_paths(list(zip(paths, leaves, strict=True)))
