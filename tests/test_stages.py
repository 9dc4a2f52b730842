"""The stage controller: schedule layout, modes and the freeze mask against docs/method.md,
'Progressive, aggregated schedule'."""

import numpy as np
import pytest

from qat_jax.layers import BINARIZING, FP, FROZEN
from qat_jax.train.stages import FP_PHASE, ScheduleConfig, StageController

# Two blocks of three layers (MobileNetV2-like: expand, depthwise, project) and a 1-layer head.
LAYERS = [
    (("b0", "expand"), 0),
    (("b0", "dw"), 0),
    (("b0", "project"), 0),
    (("b1", "expand"), 1),
    (("b1", "dw"), 1),
    (("b1", "project"), 1),
    (("head",), 2),
]


def _params():
    """A trainable tree shaped like a model's: kernels, BN, classifier, quant variables."""
    params = {"stem": {"kernel": 0}, "classifier": {"kernel": 0, "bias": 0}}
    quant = {}
    for path, _ in LAYERS:
        node = params
        qnode = quant
        for key in path:
            node = node.setdefault(key, {})
            qnode = qnode.setdefault(key, {})
        node["kernel"] = 0
        qnode.update({"tau": 0, "P": 0, "rho": 0})
    params["b0"]["bn"] = {"scale": 0, "bias": 0}
    return {"params": params, "quant": quant}


def _get(tree, *path):
    for k in path:
        tree = tree[k]
    return float(tree)


def test_layer_granularity_layout_and_completion():
    c = StageController(LAYERS, ScheduleConfig("layer", steps_per_stage=10, final_steps=5), 100)
    assert c.num_stages == 7
    assert [s.layers for s in c.stages] == [(p,) for p, _ in LAYERS]
    # A block completes (and is materialised) at the end of its last layer's stage.
    assert c.stages[2].completes == (("b0", "expand"), ("b0", "dw"), ("b0", "project"))
    assert c.stages[0].completes == () and c.stages[1].completes == ()
    assert c.stages[6].completes == (("head",),)
    assert c.stage_at(99) == FP_PHASE and c.stage_at(100) == 0 and c.stage_at(169) == 6
    assert c.stage_at(170) == c.final_index and c.total_steps == 175


def test_block_and_all_granularity():
    c = StageController(LAYERS, ScheduleConfig("block", 10), 0)
    assert [len(s.layers) for s in c.stages] == [3, 3, 1]
    assert all(s.completes == s.layers for s in c.stages)
    a = StageController(LAYERS, ScheduleConfig("all", 10), 0)
    assert a.num_stages == 1 and a.stages[0].layers == tuple(p for p, _ in LAYERS)


def test_modes_follow_the_schedule():
    c = StageController(LAYERS, ScheduleConfig("layer", 10), 0)
    m = c.modes(1)  # b0/dw being quantized; b0/expand quantized before, block not complete
    assert m[("b0", "expand")] == (BINARIZING, 1)
    assert m[("b0", "dw")] == (BINARIZING, 1)
    assert m[("b0", "project")] == (FP, 0)
    m = c.modes(3)  # b1/expand; block 0 complete and materialised
    assert m[("b0", "project")] == (FROZEN, 1)
    assert m[("b1", "expand")] == (BINARIZING, 1)
    assert m[("head",)] == (FP, 0)
    assert set(c.modes(c.final_index).values()) == {(FROZEN, 1)}


def test_mask_matches_method_rules():
    c = StageController(LAYERS, ScheduleConfig("layer", 10), 0)
    p = _params()
    fp = c.mask(FP_PHASE, p)
    assert _get(fp, "params", "b0", "expand", "kernel") == 1
    assert _get(fp, "quant", "b0", "expand", "P") == 0

    m = c.mask(4, p)  # quantizing b1/dw; b1/expand quantized earlier in the same block
    # latent W: current layer trainable, earlier-quantized frozen, FP layers above trainable.
    assert _get(m, "params", "b1", "dw", "kernel") == 1
    assert _get(m, "params", "b1", "expand", "kernel") == 0
    assert _get(m, "params", "b0", "dw", "kernel") == 0
    assert _get(m, "params", "b1", "project", "kernel") == 1
    assert _get(m, "params", "head", "kernel") == 1
    # transforms: every quantized layer of the current block (aggregation); none elsewhere.
    for name in ("P", "rho"):
        assert _get(m, "quant", "b1", "expand", name) == 1
        assert _get(m, "quant", "b1", "dw", name) == 1
        assert _get(m, "quant", "b1", "project", name) == 0
        assert _get(m, "quant", "b0", "expand", name) == 0
    # thresholds of binarized inputs, BN, stem and classifier train.
    assert _get(m, "quant", "b0", "expand", "tau") == 1
    assert _get(m, "quant", "b1", "dw", "tau") == 1
    assert _get(m, "quant", "b1", "project", "tau") == 0
    assert _get(m, "params", "b0", "bn", "scale") == 1
    assert _get(m, "params", "stem", "kernel") == 1
    assert _get(m, "params", "classifier", "bias") == 1

    f = c.mask(c.final_index, p)
    assert _get(f, "params", "b1", "dw", "kernel") == 0
    assert _get(f, "quant", "b1", "dw", "P") == 0
    assert _get(f, "quant", "b1", "dw", "tau") == 1
    assert _get(f, "params", "b0", "bn", "bias") == 1


def test_fixed_transform_never_trains_p_rho():
    c = StageController(LAYERS, ScheduleConfig("layer", 10, train_transform=False), 0)
    p = _params()
    for k in range(c.num_stages):
        m = c.mask(k, p)
        vals = [_get(m, "quant", *path, n) for path, _ in LAYERS for n in ("P", "rho")]
        assert not any(vals)


def test_frozen_kernels_stay_frozen_in_every_later_stage():
    c = StageController(LAYERS, ScheduleConfig("layer", 10), 0)
    p = _params()
    for k in range(c.num_stages + 1):
        m = c.mask(k, p)
        for j in range(min(k, c.num_stages)):
            (layer,) = c.stages[j].layers
            assert _get(m, "params", *layer, "kernel") == 0, (k, layer)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(granularity="layer", steps_per_stage=0), "steps_per_stage"),
        (dict(granularity="blocks", steps_per_stage=1), "granularity"),
        (dict(granularity="layer", steps_per_stage=1, final_steps=-1), "final_steps"),
    ],
)
def test_impossible_schedules_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StageController(LAYERS, ScheduleConfig(**kwargs), 0)


def test_record_roundtrip_and_mismatch():
    c = StageController(LAYERS, ScheduleConfig("layer", 10), 0)
    c.entered = 3
    d = StageController(LAYERS, ScheduleConfig("layer", 10), 0)
    d.restore(c.record())
    assert d.entered == 3
    e = StageController(LAYERS, ScheduleConfig("block", 10), 0)
    with pytest.raises(ValueError, match="stages"):
        e.restore(c.record())
    assert np.isfinite(c.total_steps)


def test_two_step_binarizes_inputs_then_weights():
    c = StageController(LAYERS, ScheduleConfig(granularity="two_step", steps_per_stage=5))
    assert c.num_stages == 2
    assert not c.stages[0].weights and c.stages[1].weights
    paths = [p for p, _ in LAYERS]
    # Step 1: every input binary, every weight FP and trainable; thresholds train.
    assert c.modes(0) == {p: (FP, 1) for p in paths}
    assert c.new_binary_inputs(0) == set(paths)
    m0 = c.mask(0, _params())
    assert all(_get(m0, "params", *p, "kernel") == 1.0 for p in paths)
    assert all(_get(m0, "quant", *p, "tau") == 1.0 for p in paths)
    # Step 2: every weight binarizing with its latent W trainable; no new thresholds to set.
    assert c.modes(1) == {p: (BINARIZING, 1) for p in paths}
    assert c.new_binary_inputs(1) == set()
    m1 = c.mask(1, _params())
    assert all(_get(m1, "params", *p, "kernel") == 1.0 for p in paths)
    # Then everything is materialised and frozen.
    assert set(c.stages[1].completes) == set(paths)
    assert c.modes(c.final_index) == {p: (FROZEN, 1) for p in paths}
    mf = c.mask(c.final_index, _params())
    assert all(_get(mf, "params", *p, "kernel") == 0.0 for p in paths)
    assert "inputs of" in c.describe(0) and "inputs of" not in c.describe(1)


@pytest.mark.parametrize("granularity", ["layer", "block", "all", "two_step"])
def test_total_stage_steps_gives_every_granularity_the_same_budget(granularity):
    cfg = ScheduleConfig(
        granularity=granularity, steps_per_stage=7, final_steps=4, total_stage_steps=20
    )
    c = StageController(LAYERS, cfg, qat_start=10)
    assert c.total_steps == 10 + 20 + 4
    starts = [c.stage_start(k) for k in range(c.num_stages + 1)]
    assert starts[0] == 10 and starts[-1] == 30
    assert all(b - a >= 1 for a, b in zip(starts, starts[1:], strict=False))
    # stage_at inverts stage_start on every step.
    for step in range(0, c.total_steps):
        k = c.stage_at(step)
        if step < 10:
            assert k == FP_PHASE
        else:
            assert starts[k] <= step and (k == c.num_stages or step < starts[k + 1])


def test_total_stage_steps_smaller_than_stages_is_rejected():
    with pytest.raises(ValueError, match="fewer than the 7 stages"):
        StageController(LAYERS, ScheduleConfig(granularity="layer", total_stage_steps=3))


def _by_hand_mask(m, kernels, transforms, taus):
    """The 0/1 values of ``m`` for every layer's kernel, P, rho and tau as four dicts."""
    paths = [p for p, _ in LAYERS]
    assert {p: _get(m, "params", *p, "kernel") for p in paths} == kernels
    for name in ("P", "rho"):
        assert {p: _get(m, "quant", *p, name) for p in paths} == transforms
    assert {p: _get(m, "quant", *p, "tau") for p in paths} == taus
    # BN, stem and classifier train in every stage.
    for path in (("b0", "bn", "scale"), ("stem", "kernel"), ("classifier", "bias")):
        assert _get(m, "params", *path) == 1.0


def test_acts_first_binarizes_every_input_then_weights_block_by_block():
    cfg = ScheduleConfig("block", steps_per_stage=10, final_steps=5, acts_first_steps=4)
    c = StageController(LAYERS, cfg, qat_start=100)
    b0 = [("b0", "expand"), ("b0", "dw"), ("b0", "project")]
    b1 = [("b1", "expand"), ("b1", "dw"), ("b1", "project")]
    head = [("head",)]
    paths = b0 + b1 + head
    # Layout: the acts-first stage's own 4 steps, then 3 block stages of 10, then 5 final.
    assert c.num_stages == 4 and c.final_index == 4
    assert [c.stage_start(k) for k in range(5)] == [100, 104, 114, 124, 134]
    assert c.total_steps == 139
    assert c.stage_at(99) == FP_PHASE and c.stage_at(100) == 0 and c.stage_at(103) == 0
    assert c.stage_at(104) == 1 and c.stage_at(133) == 3 and c.stage_at(134) == 4
    assert [s.index for s in c.stages] == [0, 1, 2, 3]
    assert [s.weights for s in c.stages] == [False, True, True, True]
    assert [s.completes for s in c.stages] == [(), tuple(b0), tuple(b1), tuple(head)]
    assert "inputs of" in c.describe(0) and c.describe(1).startswith("stage 2/4 [b0/expand")
    # Thresholds: every one is set when stage 0 starts, none later (they keep training).
    assert c.new_binary_inputs(0) == set(paths)
    assert all(c.new_binary_inputs(k) == set() for k in range(1, 5))

    one = dict.fromkeys(paths, 1.0)
    zero = dict.fromkeys(paths, 0.0)
    # Stage 0: inputs binary, weights FP and trainable, no transform trains, every tau trains.
    assert c.modes(0) == dict.fromkeys(paths, (FP, 1))
    _by_hand_mask(c.mask(0, _params()), one, zero, one)
    # Stage 1: block 0 binarizing; the rest keep binary inputs and FP weights.
    assert c.modes(1) == {**dict.fromkeys(b0, (BINARIZING, 1)), **dict.fromkeys(b1 + head, (FP, 1))}
    _by_hand_mask(c.mask(1, _params()), one, {**zero, **dict.fromkeys(b0, 1.0)}, one)
    # Stage 2: block 0 materialised and frozen; block 1 binarizing with its transforms.
    assert c.modes(2) == {
        **dict.fromkeys(b0, (FROZEN, 1)),
        **dict.fromkeys(b1, (BINARIZING, 1)),
        **dict.fromkeys(head, (FP, 1)),
    }
    _by_hand_mask(
        c.mask(2, _params()),
        {**one, **dict.fromkeys(b0, 0.0)},
        {**zero, **dict.fromkeys(b1, 1.0)},
        one,
    )
    # Stage 3: the head.
    assert c.modes(3) == {
        **dict.fromkeys(b0 + b1, (FROZEN, 1)),
        **dict.fromkeys(head, (BINARIZING, 1)),
    }
    _by_hand_mask(
        c.mask(3, _params()),
        {**zero, **dict.fromkeys(head, 1.0)},
        {**zero, **dict.fromkeys(head, 1.0)},
        one,
    )
    # Final phase: everything frozen binary; thresholds, BN, stem, classifier train.
    assert c.modes(4) == dict.fromkeys(paths, (FROZEN, 1))
    _by_hand_mask(c.mask(4, _params()), zero, zero, one)


def test_acts_first_off_is_the_plain_schedule():
    for total in (0, 25):
        plain = StageController(LAYERS, ScheduleConfig("layer", 10, 3, total), 7)
        off = StageController(LAYERS, ScheduleConfig("layer", 10, 3, total, acts_first_steps=0), 7)
        assert off.stages == plain.stages
        if not total:
            assert [off.stage_start(k) for k in range(8)] == [7 + k * 10 for k in range(8)]
        assert [off.stage_start(k) for k in range(8)] == [plain.stage_start(k) for k in range(8)]
        assert off.total_steps == plain.total_steps


def test_acts_first_with_a_shared_budget():
    cfg = ScheduleConfig("block", 10, final_steps=2, total_stage_steps=20, acts_first_steps=4)
    c = StageController(LAYERS, cfg, qat_start=0)
    # The acts-first stage comes on top of the shared budget of the 3 weight stages.
    assert [c.stage_start(k) for k in range(5)] == [0, 4, 4 + 6, 4 + 13, 24]
    assert c.total_steps == 26
    with pytest.raises(ValueError, match="fewer than the 3 stages"):
        StageController(LAYERS, ScheduleConfig("block", total_stage_steps=2, acts_first_steps=4))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(granularity="block", acts_first_steps=-1), "acts_first_steps"),
        (dict(granularity="two_step", acts_first_steps=3), "two_step"),
    ],
)
def test_bad_acts_first_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StageController(LAYERS, ScheduleConfig(**kwargs), 0)


def test_fp_only_schedule_has_no_stages_and_ends_with_its_fp_phase():
    """Method ``fp``: a schedule with zero stages, whatever the schedule config says."""
    c = StageController.fp_only(12)
    assert c.num_stages == 0 and not c.quantizes and c.final_index == 0
    assert c.total_steps == 12 and c.qat_start == 12
    assert all(c.is_fp(c.stage_at(step)) for step in range(12))
    assert c.is_fp(c.entered) and c.describe(c.stage_at(0)) == "fp"
    m = c.mask(c.fp_phase, _params())
    assert _get(m, "params", "b0", "expand", "kernel") == 1.0
    assert _get(m, "quant", "b0", "expand", "tau") == 0.0
    # Its record round-trips; an fp checkpoint written before it had a schedule ({}) restores.
    assert c.record() == {"entered": FP_PHASE, "num_stages": 0}
    c.restore(c.record())
    c.restore({})
    with pytest.raises(ValueError, match="checkpoint has 3 stages"):
        c.restore({"entered": 0, "num_stages": 3})


def test_named_stage_indices():
    c = StageController(LAYERS, ScheduleConfig("block", steps_per_stage=10, final_steps=5), 100)
    assert c.quantizes and c.fp_phase == FP_PHASE
    assert c.is_fp(c.stage_at(99)) and not c.is_fp(c.stage_at(100))
    assert c.is_final(c.stage_at(130)) and not c.is_final(c.stage_at(129))
    assert c.stage_at(130) == c.final_index == c.num_stages
    # The layers of stage k (the final phase: the last stage's).
    assert c.stage_layers(1) == (("b1", "expand"), ("b1", "dw"), ("b1", "project"))
    assert c.stage_layers(c.final_index) == (("head",),)


def test_modes_after_a_stage_freeze_the_blocks_it_completed():
    c = StageController(LAYERS, ScheduleConfig("layer", steps_per_stage=10), 0)
    # Stage 1 (b0/dw) completes nothing: the modes after it are its own.
    assert c.modes_after(1) == c.modes(1)
    # Stage 2 (b0/project) completes block 0: all of b0 frozen binary, the rest as in stage 2.
    after = c.modes_after(2)
    b0 = [("b0", "expand"), ("b0", "dw"), ("b0", "project")]
    assert all(after[p] == (FROZEN, 1) for p in b0)
    assert c.modes(2)[("b0", "project")] == (BINARIZING, 1)
    assert {p: m for p, m in after.items() if p not in b0} == {
        p: m for p, m in c.modes(2).items() if p not in b0
    }
    assert c.modes_after(2) == c.modes(3) | {("b1", "expand"): (FP, 0)}
