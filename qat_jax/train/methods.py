"""The compared methods as settings of one code path (docs/method.md, 'Methods sharing the
code').

===============  ==========================================================================
``fp``           full precision only (the FP phase; no QAT stages)
``xnor``         every layer at once (granularity ``all``), ``C = I``: ``mean|W| sign(W)``,
                 sign activations with a straight-through gradient
``reactnet``     two steps (granularity ``two_step``): every input binary (RSign, ApproxSign
                 gradient) with FP weights, then every weight binary (``C = I``); RPReLU after
                 each binary conv and a real-valued shortcut around it (on the models that have
                 the option); KD like every QAT method
``progressive``  the progressive schedule with the transform off (``C = I``)
``bitat_fixed``  the progressive schedule, ``C`` from calibrated PCA, ``P``/``rho`` not trained
``bitat``        everything: PCA init, trained Cayley basis and importance, progressive stages
===============  ==========================================================================

``progressive`` and ``bitat`` differ only in ``transform`` (and hence ``train_transform``).
Settings left ``None`` take the config's value (``schedule.granularity``, ``quant.act_grad``).
"""

from __future__ import annotations

import dataclasses

__all__ = ["METHODS", "MethodSettings", "method_settings"]


@dataclasses.dataclass(frozen=True)
class MethodSettings:
    quantize: bool
    transform: bool
    train_transform: bool
    granularity: str | None  # None: use the config's schedule.granularity
    act_grad: str | None = None  # None: use the config's quant.act_grad
    rprelu: bool = False  # RPReLU after binary convs (ReActNet)
    # Real-valued shortcut around every binary conv (Bi-Real/ReActNet; OR-ed with the config's
    # model.binary_shortcut by qat_jax.experiment.create_model, on the models with the option).
    shortcut: bool = False


METHODS = {
    "fp": MethodSettings(quantize=False, transform=False, train_transform=False, granularity=None),
    "xnor": MethodSettings(
        quantize=True, transform=False, train_transform=False, granularity="all", act_grad="ste"
    ),
    "reactnet": MethodSettings(
        quantize=True,
        transform=False,
        train_transform=False,
        granularity="two_step",
        act_grad="approx",
        rprelu=True,
        shortcut=True,
    ),
    "progressive": MethodSettings(
        quantize=True, transform=False, train_transform=False, granularity=None
    ),
    "bitat_fixed": MethodSettings(
        quantize=True, transform=True, train_transform=False, granularity=None
    ),
    "bitat": MethodSettings(quantize=True, transform=True, train_transform=True, granularity=None),
}


def method_settings(name: str) -> MethodSettings:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]
