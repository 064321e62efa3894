"""Per-dimension normalizers: exact statistics, round trips, state dicts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distdiff.normalizer import Normalizer


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(500, 4)) * [1.0, 10.0, 0.01, 3.0] + [0.0, -5.0, 2.0, 100.0]).astype(np.float32)


def test_gaussian_standardizes(data):
    norm = Normalizer.fit(data, kind="gaussian")
    z = norm.normalize(data.astype(np.float64))
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(0), 1, atol=1e-5)


def test_minmax_maps_the_range_to_minus_one_one(data):
    norm = Normalizer.fit(data, kind="minmax")
    z = norm.normalize(data.astype(np.float64))
    np.testing.assert_allclose(z.min(0), -1, atol=1e-5)
    np.testing.assert_allclose(z.max(0), 1, atol=1e-5)


@pytest.mark.parametrize("kind", ["gaussian", "minmax"])
def test_clip_range_is_the_normalized_data_range(data, kind):
    norm = Normalizer.fit(data, kind=kind)
    z = norm.normalize(data.astype(np.float64))
    np.testing.assert_allclose(norm.clip_min.numpy(), z.min(0), atol=1e-5)
    np.testing.assert_allclose(norm.clip_max.numpy(), z.max(0), atol=1e-5)


@pytest.mark.parametrize("kind", ["gaussian", "minmax"])
@pytest.mark.parametrize("form", ["numpy32", "numpy64", "torch32", "torch64"])
def test_round_trip(data, kind, form):
    norm = Normalizer.fit(data, kind=kind)
    x = data[:50].reshape(5, 10, 4)  # any leading shape
    x = {"numpy32": x, "numpy64": x.astype(np.float64), "torch32": torch.from_numpy(x),
         "torch64": torch.from_numpy(x.astype(np.float64))}[form]
    z = norm.normalize(x)
    back = norm.unnormalize(z)
    assert type(z) is type(x) and type(back) is type(x)
    assert z.dtype == x.dtype and back.dtype == x.dtype
    assert z.shape == x.shape
    tol = 1e-4 if "32" in form else 1e-9
    np.testing.assert_allclose(np.asarray(back), np.asarray(x), rtol=tol, atol=tol * 100)
    # numpy and torch inputs give the same numbers
    np.testing.assert_allclose(np.asarray(z), norm.normalize(np.asarray(x).astype(np.float64)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["gaussian", "minmax"])
def test_state_dict_round_trip(data, kind):
    norm = Normalizer.fit(data, kind=kind)
    state = norm.state_dict()
    again = Normalizer.from_state_dict(state)
    assert again.kind == kind
    for name in ("shift", "scale", "clip_min", "clip_max"):
        assert torch.equal(getattr(again, name), getattr(norm, name))
    assert np.array_equal(again.normalize(data), norm.normalize(data))
    # the state dict is a copy: changing it does not change the normalizer
    state["shift"] += 1
    assert torch.equal(Normalizer.from_state_dict(norm.state_dict()).shift, norm.shift)


def test_slice_is_the_normalizer_of_those_dims(data):
    norm = Normalizer.fit(data, kind="gaussian")
    part = norm.slice(slice(1, 3))
    assert part.dim == 2
    np.testing.assert_array_equal(part.normalize(data[:, 1:3]), norm.normalize(data)[:, 1:3])


def test_constant_dimension_does_not_divide_by_zero():
    data = np.stack([np.arange(10.0), np.full(10, 3.0)], axis=1)
    for kind in ("gaussian", "minmax"):
        z = Normalizer.fit(data, kind=kind).normalize(data)
        assert np.isfinite(z).all()
        np.testing.assert_array_equal(z[:, 1], 0.0)
        # A value the data never showed (an online observation) is not blown up by a tiny scale.
        assert Normalizer.fit(data, kind=kind).normalize(np.array([[4.5, 3.5]]))[0, 1] == pytest.approx(0.5)


def test_unknown_kind_is_rejected(data):
    with pytest.raises(ValueError, match="gaussian"):
        Normalizer.fit(data, kind="robust")


@pytest.mark.parametrize("form", ["numpy", "torch"])
def test_integer_input_is_normalized_like_float_input(form):
    norm = Normalizer(kind="gaussian", shift=[0.5, 0.5], scale=[0.4, 2.5], clip_min=[0, 0], clip_max=[1, 1])
    ints = np.array([[1, 2]])
    x = ints if form == "numpy" else torch.from_numpy(ints)
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(np.asarray(norm.normalize(x), dtype=np.float64), [[1.25, 0.6]], rtol=1e-6)


@pytest.mark.parametrize("kind", ["gaussian", "minmax"])
def test_the_clip_range_of_a_constant_dimension_is_finite(kind):
    # (A NaN bound would carry into every plan's entries of that dimension through the clip.)
    data = np.stack([np.arange(10.0), np.full(10, 3.0)], axis=1)
    norm = Normalizer.fit(data, kind=kind)
    assert np.isfinite(norm.clip_min.numpy()).all() and np.isfinite(norm.clip_max.numpy()).all()
    assert norm.clip_min[1] == 0 and norm.clip_max[1] == 0


def test_the_clip_range_is_the_datas_own_normalized_range():
    # mean 0.75, sd √3/4: the largest value, 1, is 1/√3 above the mean in sds; not widened to 1.
    norm = Normalizer.fit(np.array([[0.0], [1.0], [1.0], [1.0]]), kind="gaussian")
    assert norm.clip_max.item() == pytest.approx(1 / np.sqrt(3), rel=1e-5)
    assert norm.clip_min.item() == pytest.approx(-np.sqrt(3), rel=1e-5)
