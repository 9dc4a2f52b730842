"""The stage controller: the only code that knows the progressive schedule (docs/method.md,
'Progressive, aggregated schedule').

Given the model's quantizable layers in bottom-to-top order (with block ids) and the schedule
config, it decides for every stage

* which layers are quantized now (one layer, one block, or all at once; or ReActNet's two steps:
  every input binary first, then every weight),
* every layer's modes (``w_mode``: FP / binarizing / frozen binary; ``a_mode``: FP / binary input),
* the **freeze mask** over the trainable variables:

  - latent ``W`` of the stage's layer(s): trainable; latent ``W`` of layers quantized in earlier
    stages: frozen (bit-identical from then on); layers above, still FP: trainable;
  - transforms ``P``, ``rho`` of every layer of the *current block* quantized so far: trainable
    (the aggregated, block-diagonal transform); of completed blocks: frozen (materialised);
  - thresholds ``tau`` of binarized inputs, BN, stem, classifier, biases: trainable;

* which blocks are complete and must be materialised (``B``, ``alpha``) when the stage ends.

Stages are laid out on the global step axis: stage ``k`` covers
``[qat_start + k * steps_per_stage, qat_start + (k + 1) * steps_per_stage)``, then the final phase
(everything binary) runs ``final_steps``. With ``total_stage_steps > 0`` the stages instead share
that many steps (stage ``k`` starts at ``qat_start + k * total_stage_steps // num_stages``), which
gives every granularity the same budget: how the comparison matches methods.

With ``acts_first_steps > 0`` an extra stage ``0`` of that many steps comes first (ReActNet's first
step before BiTAT's): every layer's *input* becomes binary, every weight stays FP and trainable;
the progressive weight stages follow as stages ``1..`` (their inputs already binary, their
thresholds kept), then the final phase. The controller's record (which stage has been entered)
is a small JSON dict saved with every checkpoint.

A run that does not quantize (method ``fp``) has a schedule too, with no stages
(:meth:`StageController.fp_only`): its FP phase is the whole run. Stage indices: ``FP_PHASE``
(-1, :attr:`StageController.fp_phase`) is the FP phase, ``0 .. num_stages - 1`` the stages and
``num_stages`` (:attr:`StageController.final_index`) the final phase; :meth:`~StageController.is_fp`
and :meth:`~StageController.is_final` name them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax.numpy as jnp

from qat_jax.layers import BINARIZING, BINARY_INPUT, FP, FP_INPUT, FROZEN
from qat_jax.tree import Path, map_with_path

__all__ = ["ScheduleConfig", "Stage", "StageController", "FP_PHASE"]

#: The stage index of the FP phase (before QAT); ``StageController.fp_phase``.
FP_PHASE = -1
GRANULARITIES = ("layer", "block", "all", "two_step")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Schedule options.

    Attributes:
      granularity: ``'layer'`` (one layer per stage, the paper's), ``'block'`` (one block per
        stage), ``'all'`` (every layer in one stage: all-at-once baselines) or ``'two_step'``
        (ReActNet: stage 0 binarizes every layer's input, weights FP; stage 1 every weight).
      steps_per_stage: train steps of each stage (> 0).
      total_stage_steps: when > 0, the stages share this many steps (equal budgets across
        granularities) and ``steps_per_stage`` is ignored.
      final_steps: steps of the final all-binary phase (>= 0).
      train_transform: train ``P`` and ``rho`` (``False``: ``bitat_fixed``).
      final_train_latent: in the final phase keep layers binarizing with trainable latent ``W``
        (transforms frozen) and materialise at the end; default: everything frozen binary.
      acts_first_steps: when > 0, one extra first stage of this many steps binarizes every
        layer's input (weights FP and trainable) before the weight stages; 0: off.
    """

    granularity: str = "layer"
    steps_per_stage: int = 100
    final_steps: int = 0
    total_stage_steps: int = 0
    train_transform: bool = True
    final_train_latent: bool = False
    acts_first_steps: int = 0

    def validate(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"schedule.granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )
        if int(self.steps_per_stage) <= 0:
            raise ValueError(
                f"schedule.steps_per_stage must be > 0, got {self.steps_per_stage}: "
                "set --config.schedule.steps_per_stage to a positive number"
            )
        if int(self.total_stage_steps) < 0:
            raise ValueError(
                f"schedule.total_stage_steps must be >= 0 (0: use steps_per_stage), got "
                f"{self.total_stage_steps}"
            )
        if int(self.final_steps) < 0:
            raise ValueError(f"schedule.final_steps must be >= 0, got {self.final_steps}")
        if int(self.acts_first_steps) < 0:
            raise ValueError(
                f"schedule.acts_first_steps must be >= 0 (0: off), got {self.acts_first_steps}"
            )
        if int(self.acts_first_steps) and self.granularity == "two_step":
            raise ValueError(
                "schedule.acts_first_steps > 0 adds a binary-inputs stage that granularity "
                "'two_step' already has: set one of them"
            )


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage: ``layers`` are quantized at its start; ``completes`` are materialised at its end.

    ``weights=False`` (ReActNet's first step): the stage binarizes only the layers' inputs.
    """

    index: int
    layers: tuple[Path, ...]
    block_id: int
    completes: tuple[Path, ...]
    weights: bool = True


class StageController:
    """Owns the schedule; pure Python over layer paths (no arrays, no model)."""

    fp_phase = FP_PHASE

    def __init__(
        self,
        layers: Sequence[tuple[Path, int]],
        cfg: ScheduleConfig,
        qat_start: int = 0,
        *,
        stages: bool = True,
    ):
        """``stages=False``: no stages and no final phase, whatever ``cfg`` says (the schedule of
        a run that trains FP only; :meth:`fp_only` builds it)."""
        if stages:
            cfg.validate()
            if not layers:
                raise ValueError("the model has no quantizable layers")
        else:
            cfg, layers = ScheduleConfig(final_steps=0), ()
        self.cfg = cfg
        self.layers: tuple[Path, ...] = tuple(tuple(p) for p, _ in layers)
        self.block_of: dict[Path, int] = {tuple(p): int(b) for p, b in layers}
        self.qat_start = int(qat_start)
        # Stages before the weight stages: the acts-first stage (its own step budget).
        self.lead = 1 if int(cfg.acts_first_steps) else 0
        built = self._build_stages() if stages else ()
        if self.lead:
            acts = Stage(0, self.layers, self.block_of[self.layers[-1]], (), weights=False)
            built = (acts, *(dataclasses.replace(s, index=s.index + 1) for s in built))
        self.stages: tuple[Stage, ...] = built
        n_shared = len(self.stages) - self.lead
        if int(cfg.total_stage_steps) and int(cfg.total_stage_steps) < n_shared:
            raise ValueError(
                f"schedule.total_stage_steps={cfg.total_stage_steps} is fewer than the "
                f"{n_shared} stages: every stage needs at least one step"
            )
        self.entered = FP_PHASE  # record: index of the last stage whose start was applied

    @classmethod
    def fp_only(cls, fp_steps: int) -> StageController:
        """The schedule of a run that does not quantize (method ``fp``): ``fp_steps`` steps of
        the FP phase and nothing after them (``num_stages == 0``, ``total_steps == fp_steps``)."""
        return cls((), ScheduleConfig(), qat_start=fp_steps, stages=False)

    # -- schedule ---------------------------------------------------------------------------
    def _build_stages(self) -> tuple[Stage, ...]:
        g = self.cfg.granularity
        if g == "two_step":
            last = self.block_of[self.layers[-1]]
            return (
                Stage(0, self.layers, last, (), weights=False),
                Stage(1, self.layers, last, self.layers, weights=True),
            )
        if g == "layer":
            groups = [(p,) for p in self.layers]
        elif g == "block":
            groups, seen = [], {}
            for p in self.layers:
                b = self.block_of[p]
                if b not in seen:
                    seen[b] = len(groups)
                    groups.append(())
                groups[seen[b]] += (p,)
        else:
            groups = [self.layers]
        stages = []
        done: set[Path] = set()
        for i, grp in enumerate(groups):
            done.update(grp)
            # Blocks all of whose layers are quantized after this stage and were not complete before.
            before = done - set(grp)
            completes = tuple(
                p
                for p in self.layers
                if self._block_done(self.block_of[p], done)
                and not self._block_done(self.block_of[p], before)
            )
            stages.append(Stage(i, grp, self.block_of[grp[-1]], completes))
        return tuple(stages)

    def _block_done(self, block: int, done: set[Path]) -> bool:
        return all(p in done for p in self.layers if self.block_of[p] == block)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def final_index(self) -> int:
        """The index of the final phase (everything binary), after the last stage."""
        return self.num_stages

    @property
    def quantizes(self) -> bool:
        """Whether the schedule has stages (``False``: an FP-only run, method ``fp``)."""
        return self.num_stages > 0

    def is_fp(self, k: int) -> bool:
        """Whether ``k`` (e.g. :meth:`stage_at`, :attr:`entered`) is the FP phase."""
        return k == FP_PHASE

    def is_final(self, k: int) -> bool:
        """Whether ``k`` is the final phase (every layer binary)."""
        return k >= self.num_stages

    def stage_start(self, k: int) -> int:
        """Global step at which stage ``k`` (``k == num_stages``: the final phase) starts."""
        if k < self.lead:  # the acts-first stage
            return self.qat_start
        base = self.qat_start + self.lead * int(self.cfg.acts_first_steps)
        j, n = k - self.lead, self.num_stages - self.lead  # index among the shared stages
        total = int(self.cfg.total_stage_steps)
        if total:
            return base + (j * total) // n
        return base + j * int(self.cfg.steps_per_stage)

    @property
    def total_steps(self) -> int:
        return self.stage_start(self.num_stages) + int(self.cfg.final_steps)

    def stage_at(self, step: int) -> int:
        """Stage index active at global ``step`` (``FP_PHASE`` before QAT, ``num_stages`` final)."""
        if step < self.qat_start:
            return self.fp_phase
        k = 0
        while k < self.num_stages and step >= self.stage_start(k + 1):
            k += 1
        return k

    # -- sets of layers ---------------------------------------------------------------------
    def quantized_through(self, k: int) -> set[Path]:
        """Layers with binary inputs in stages ``0..k`` (all of them in the final phase)."""
        out: set[Path] = set()
        for s in self.stages[: max(k + 1, 0)]:
            out.update(s.layers)
        return out

    def weights_quantized_through(self, k: int) -> set[Path]:
        """Layers whose weights are binarized in stages ``0..k`` (all in the final phase)."""
        out: set[Path] = set()
        for s in self.stages[: max(k + 1, 0)]:
            if s.weights:
                out.update(s.layers)
        return out

    def new_binary_inputs(self, k: int) -> set[Path]:
        """Layers whose input becomes binary at the start of stage ``k`` (their ``tau`` is set)."""
        return self.quantized_through(k) - self.quantized_through(k - 1)

    def materialized_before(self, k: int) -> set[Path]:
        """Layers whose block was completed (and materialised) by the end of stage ``k - 1``."""
        out: set[Path] = set()
        for s in self.stages[: max(k, 0)]:
            out.update(s.completes)
        return out

    def stage_layers(self, k: int) -> tuple[Path, ...]:
        """The layers stage ``k`` quantizes (the final phase: the last stage's)."""
        return self.stages[min(k, self.num_stages - 1)].layers

    def trainable_transforms(self, k: int) -> set[Path]:
        """Layers whose ``P``, ``rho`` train in stage ``k``: the current block's quantized layers."""
        if not self.cfg.train_transform or self.is_fp(k) or self.is_final(k):
            return set()
        return self.weights_quantized_through(k) - self.materialized_before(k)

    # -- modes and mask ---------------------------------------------------------------------
    def modes(self, k: int) -> dict[Path, tuple[int, int]]:
        """``{layer: (w_mode, a_mode)}`` for stage ``k``."""
        binary_input = self.quantized_through(k)
        binary_weight = self.weights_quantized_through(k)
        frozen = self.materialized_before(k)
        out = {}
        for p in self.layers:
            if self.is_final(k) and self.cfg.final_train_latent:
                out[p] = (BINARIZING, BINARY_INPUT)
            elif p in frozen:
                out[p] = (FROZEN, BINARY_INPUT)
            elif p in binary_weight:
                out[p] = (BINARIZING, BINARY_INPUT)
            elif p in binary_input:
                out[p] = (FP, BINARY_INPUT)
            else:
                out[p] = (FP, FP_INPUT)
        return out

    def finished_modes(self) -> dict[Path, tuple[int, int]]:
        """Modes of the finished model: every layer frozen binary (materialised ``B``, ``alpha``)
        with a binary input, whatever the final phase trained."""
        return {p: (FROZEN, BINARY_INPUT) for p in self.layers}

    def modes_after(self, k: int) -> dict[Path, tuple[int, int]]:
        """Modes at the end of stage ``k``: its completed blocks frozen binary, the rest as in
        ``k`` (the network evaluated after the stage, before the next one starts)."""
        modes = dict(self.modes(k))
        for p in self.stages[k].completes:
            modes[p] = (FROZEN, 1)
        return modes

    def _owner(self, path: Path) -> tuple[Path | None, str]:
        """``(layer path, leaf name)`` of a trainable leaf ``(collection, *module path, name)``."""
        module = tuple(path[1:-1])
        return (module if module in self.block_of else None), path[-1]

    def trainable(self, k: int, path: Path) -> bool:
        """Whether the trainable leaf at ``path`` (``('params'|'quant', ..., name)``) trains in ``k``."""
        collection = path[0]
        layer, name = self._owner(path)
        if self.is_fp(k):
            return collection == "params"
        final = self.is_final(k)
        if collection == "quant":
            if layer is None:
                return False
            if name == "tau":
                return layer in self.quantized_through(k)
            return layer in self.trainable_transforms(k)
        if layer is not None and name == "kernel":
            if final:
                return self.cfg.final_train_latent
            return layer not in self.weights_quantized_through(k - 1)
        return True

    def mask(self, k: int, params: Mapping) -> dict:
        """The float32 0/1 freeze mask for stage ``k``, shaped like the trainable tree ``params``."""
        return map_with_path(
            lambda path, _: jnp.asarray(1.0 if self.trainable(k, path) else 0.0, jnp.float32),
            params,
        )

    def describe(self, k: int) -> str:
        if self.is_fp(k):
            return "fp"
        if self.is_final(k):
            return "final"
        stage = self.stages[k]
        names = ",".join("/".join(p) for p in stage.layers)
        if len(names) > 60:
            names = f"{len(stage.layers)} layers"
        what = "" if stage.weights else "inputs of "
        return f"stage {k + 1}/{self.num_stages} [{what}{names}]"

    # -- record -----------------------------------------------------------------------------
    def record(self) -> dict:
        return {"entered": int(self.entered), "num_stages": self.num_stages}

    def restore(self, record: Mapping) -> None:
        if not record and not self.quantizes:
            return  # an FP-only run's checkpoint written before it had a schedule
        if int(record["num_stages"]) != self.num_stages:
            raise ValueError(
                f"checkpoint has {record['num_stages']} stages, the config gives "
                f"{self.num_stages}: the schedule (granularity/model) changed since it was written"
            )
        self.entered = int(record["entered"])
