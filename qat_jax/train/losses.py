"""Loss terms (per example) and accuracy: cross-entropy, KD from the FP teacher, info loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

__all__ = ["cross_entropy", "distillation", "correct", "info_loss"]


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Softmax cross-entropy per example; ``logits`` ``[B, K]``, integer ``labels`` ``[B]``."""
    num_classes = logits.shape[-1]
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def distillation(
    student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0
) -> jax.Array:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))`` per example (Hinton et al.)."""
    t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
    s = student_logits.astype(jnp.float32) / temperature
    p_t = jax.nn.softmax(t)
    kl = jnp.sum(p_t * (jax.nn.log_softmax(t) - jax.nn.log_softmax(s)), axis=-1)
    return kl * temperature**2


def correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """1.0 where the arg-max prediction equals the label, per example."""
    return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


def info_loss(sown_losses) -> jax.Array:
    """Sum of the layers' sown relative output errors (``losses/info``); 0 when none were sown."""
    leaves = jax.tree.leaves(sown_losses)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sum(jnp.stack([jnp.asarray(x, jnp.float32) for x in leaves]))
