"""The one place that decides parallelism: data-parallel ``jax.pmap`` over all devices.

Everything else in qat_jax is written per device: a per-device function sees its shard of the
batch and uses collectives over :data:`AXIS` (``lax.pmean``/``lax.psum``). This module maps such
functions over the local devices, replicates host values onto them and brings results back.
Across several processes ``pmap`` spans every device of every process, so the same collectives
give global means.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "batch"

__all__ = [
    "AXIS",
    "pmap",
    "replicate",
    "shard",
    "unreplicate",
    "local_device_count",
    "to_host",
    "to_numpy",
]


def local_device_count() -> int:
    return jax.local_device_count()


def pmap(
    fn: Callable,
    *,
    static_broadcasted_argnums: Sequence[int] = (),
    donate_argnums: Sequence[int] = (),
    in_axes=0,
) -> Callable:
    """``jax.pmap`` over the local devices with the batch axis named :data:`AXIS`."""
    return jax.pmap(
        fn,
        axis_name=AXIS,
        static_broadcasted_argnums=tuple(static_broadcasted_argnums),
        donate_argnums=tuple(donate_argnums),
        in_axes=in_axes,
    )


def _local_sharding() -> NamedSharding:
    devices = np.array(jax.local_devices())
    return NamedSharding(Mesh(devices, (AXIS,)), PartitionSpec(AXIS))


def replicate(tree):
    """Copy a host pytree onto every local device (new leading device axis)."""
    n = jax.local_device_count()
    sharding = _local_sharding()
    return jax.tree.map(
        lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), sharding),
        tree,
    )


def shard(tree):
    """Put a host pytree whose leaves have a leading local-device axis onto the devices."""
    sharding = _local_sharding()
    return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)


def _first_local(x):
    # The first *local* device's shard: indexing ``x[0]`` of a pmapped array that spans several
    # processes is a cross-process computation on the processes that do not hold device 0, and
    # deadlocks when process 0 does not run it at the same moment.
    if isinstance(x, jax.Array):
        return x.addressable_shards[0].data
    return np.asarray(x)[:1]


def unreplicate(tree):
    """Take the first local device's copy of a replicated pytree (as device arrays)."""
    return jax.tree.map(lambda x: _first_local(x)[0], tree)


def to_host(tree):
    """``unreplicate`` and fetch to numpy (a host sync: call at log/checkpoint intervals only)."""
    return jax.tree.map(lambda x: np.asarray(_first_local(x))[0], tree)


def to_numpy(tree):
    """Fetch an unreplicated pytree (device or host arrays) to numpy arrays on the host."""
    return jax.tree.map(np.asarray, jax.device_get(tree))
