"""The real-valued shortcut's channel matching and pooling (``qat_jax.shortcut``) by hand."""

import jax
import numpy as np
import pytest

from qat_jax import shortcut


def _close(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def _groups_by_hand(c_in, c_out):
    """Output channel k averages inputs floor(k c_in / c_out) .. ceil((k + 1) c_in / c_out) - 1."""
    out = []
    for k in range(c_out):
        lo = (k * c_in) // c_out
        hi = -(-((k + 1) * c_in) // c_out)
        out.append(list(range(lo, hi)))
    return out


def _match_by_hand(x, c_out):
    groups = _groups_by_hand(x.shape[-1], c_out)
    return np.stack([x[..., g].mean(-1) for g in groups], axis=-1)


def _pool_by_hand(x):
    n, h, w, c = x.shape
    out = np.zeros((n, -(-h // 2), -(-w // 2), c), x.dtype)
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            out[:, i, j] = x[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean(axis=(1, 2))
    return out


@pytest.fixture
def x(rng):
    return rng.normal(size=(2, 5, 4, 48)).astype(np.float32) * 3


def test_match_kinds_and_their_closed_forms(x):
    assert shortcut.match_kind(48, 48) == "identity"
    np.testing.assert_array_equal(shortcut.match_channels(x, 48), x)
    # Expand: each channel repeated t times in place (output k is input k // t).
    small = x[..., :8]
    assert shortcut.match_kind(8, 48) == "repeat"
    got = np.asarray(shortcut.match_channels(small, 48))
    np.testing.assert_array_equal(got, small[..., np.arange(48) // 6])
    # Project: mean of g consecutive channels.
    assert shortcut.match_kind(48, 16) == "group_mean"
    _close(shortcut.match_channels(x, 16), x.reshape(2, 5, 4, 16, 3).mean(-1))
    # Expand followed by the matching project gives the input back (a mean of t copies).
    _close(shortcut.match_channels(shortcut.match_channels(small, 48), 8), small)


@pytest.mark.parametrize("c_in, c_out", [(24, 16), (48, 40), (144, 32), (48, 256), (8, 20)])
def test_non_divisible_match_is_the_adaptive_mean(x, rng, c_in, c_out):
    assert shortcut.match_kind(c_in, c_out) == "adaptive"
    z = rng.normal(size=(2, 3, 3, c_in)).astype(np.float32)
    _close(jax.jit(shortcut.match_channels, static_argnums=1)(z, c_out), _match_by_hand(z, c_out))
    index, weight = shortcut.channel_groups(c_in, c_out)
    np.testing.assert_allclose(weight.sum(-1), 1.0, rtol=1e-6)  # every output is a mean
    m = shortcut.group_matrix(c_in, c_out)  # the matrix match_channels multiplies by
    np.testing.assert_allclose(m.sum(0), 1.0, rtol=1e-6)
    assert ((m > 0).sum(0) == weight.astype(bool).sum(-1)).all()  # one entry per group member
    sizes = [len(g) for g in _groups_by_hand(c_in, c_out)]
    assert max(sizes) - min(sizes) <= 1  # near-equal groups


@pytest.mark.parametrize("c_in, c_out", [(24, 16), (8, 48), (48, 16), (48, 256)])
def test_match_is_torch_adaptive_avg_pool_over_channels(rng, c_in, c_out):
    torch = pytest.importorskip("torch")
    z = rng.normal(size=(2, 3, 3, c_in)).astype(np.float32)
    want = torch.nn.functional.adaptive_avg_pool1d(torch.from_numpy(z.reshape(-1, 1, c_in)), c_out)
    _close(shortcut.match_channels(z, c_out), want.numpy().reshape(2, 3, 3, c_out))


@pytest.mark.parametrize("h, w", [(4, 6), (5, 7), (1, 1), (7, 2)])
def test_avg_pool_2x2_averages_in_image_entries(rng, h, w):
    z = rng.normal(size=(2, h, w, 3)).astype(np.float32)
    got = np.asarray(jax.jit(shortcut.avg_pool_2x2)(z))
    _close(got, _pool_by_hand(z))
    torch = pytest.importorskip("torch")
    t = torch.nn.functional.avg_pool2d(
        torch.from_numpy(z.transpose(0, 3, 1, 2)), 2, 2, ceil_mode=True, count_include_pad=False
    )
    _close(got, t.numpy().transpose(0, 2, 3, 1))


def test_shortcut_pools_then_matches(rng):
    z = rng.normal(size=(1, 5, 5, 8)).astype(np.float32)
    _close(shortcut.shortcut(z, 48, 2), np.repeat(_pool_by_hand(z), 6, axis=-1))
    np.testing.assert_array_equal(shortcut.shortcut(z, 8, 1), z)
    with pytest.raises(ValueError, match="strides 1 and 2"):
        shortcut.shortcut(z, 8, 3)
