"""Compiled CPU kernels reached through the XLA FFI, for the ops XLA:CPU runs slowly.

* :mod:`qat_jax.kernels.build`: compiles a kernel's C++ source on first use (cached per machine)
  and registers its FFI targets;
* :mod:`qat_jax.kernels.depthwise`: the depthwise conv (``ops.conv2d(..., impl='cpu_ffi')``).

Nothing here runs on GPU/TPU, where ``lax.conv_general_dilated`` is the fast path.
"""
