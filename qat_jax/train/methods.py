"""The methods of METHOD.md section 7 as settings of one code path.

==============  ===========================================================================
``fp``          full precision only (the FP phase; no QAT stages)
``xnor``        every layer at once (granularity ``all``), ``C = I``: ``mean|W| sign(W)``
``progressive`` the progressive schedule with the transform off (``C = I``)
``bitat_fixed`` the progressive schedule, ``C`` from calibrated PCA, ``P``/``rho`` not trained
``bitat``       everything: PCA init, trained Cayley basis and importance, progressive stages
==============  ===========================================================================

``progressive`` and ``bitat`` differ only in ``transform`` (and hence ``train_transform``).
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


METHODS = {
    "fp": MethodSettings(quantize=False, transform=False, train_transform=False, granularity=None),
    "xnor": MethodSettings(
        quantize=True, transform=False, train_transform=False, granularity="all"
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
