"""Model registry (torch-free) against the torch builders; flat <-> state dict conversions."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from edgefl.models.spec import (
    ModelSpec,
    TensorSpec,
    get_model_spec,
    init_weights_numpy,
    list_models,
    mlp_hidden_width,
    suggested_dataset,
)
from edgefl.models.torch_models import (
    build_module,
    flat_to_state_dict,
    init_weights,
    load_flat,
    module_to_flat,
    state_dict_to_flat,
)

ALL_MODELS = [*list_models(), "mlp-1k", "mlp-2.5k", "mlp-250000"]
MNIST1D_CNN_HASH = "3446fe0d7cbee0e4d602c34f244c1da211305887eac6edf196b53e6b19d45018"


@pytest.mark.parametrize("name", ALL_MODELS)
def test_layout_matches_torch_state_dict(name: str) -> None:
    spec = get_model_spec(name)
    module = build_module(spec)
    sd = module.state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == [(t.name, t.shape) for t in spec.layout]
    assert spec.num_params == sum(p.numel() for p in module.parameters())
    out = module(torch.zeros((3, *spec.input_shape)))
    assert tuple(out.shape) == (3, spec.num_classes)


def test_known_sizes_and_stable_hash() -> None:
    cnn = get_model_spec("mnist1d-cnn")
    assert cnn.num_params == 4298
    assert cnn.input_shape == (1, 40)
    assert cnn.layout_hash == MNIST1D_CNN_HASH
    assert get_model_spec("digits-mlp").num_params == 2410
    assert get_model_spec("digits-mlp").input_shape == (64,)
    assert len({get_model_spec(n).layout_hash for n in ALL_MODELS}) == len(ALL_MODELS)


@pytest.mark.parametrize(("name", "target"), [("mlp-100k", 100_000), ("mlp-1m", 1_000_000)])
def test_mlp_size_close_to_name(name: str, target: int) -> None:
    spec = get_model_spec(name)
    h = spec.layout[0].shape[0]
    assert abs(spec.num_params - target) / target < 0.01
    # h is the best integer width
    for other in (h - 1, h + 1):
        p_other = other * other + 52 * other + 10
        assert abs(p_other - target) >= abs(spec.num_params - target)
    assert mlp_hidden_width(target) == h


def test_registry_errors_and_names() -> None:
    with pytest.raises(KeyError, match="mnist1d-cnn"):
        get_model_spec("resnet-50")
    with pytest.raises(ValueError, match="size"):
        get_model_spec("mlp-10")
    assert get_model_spec("MLP-100K").name == "mlp-100k"
    assert suggested_dataset("digits-mlp") == "digits"
    assert suggested_dataset(get_model_spec("mlp-1m")) == "mnist1d"


def test_spec_dict_round_trip_and_validation() -> None:
    spec = get_model_spec("mnist1d-cnn")
    d = spec.to_dict()
    assert ModelSpec.from_dict(d) == spec
    bad = dict(d, layout_hash="0" * 64)
    with pytest.raises(ValueError, match="layout_hash"):
        ModelSpec.from_dict(bad)
    with pytest.raises(ValueError, match="positive"):
        TensorSpec("w", (0, 3))
    with pytest.raises(ValueError, match="dtype"):
        TensorSpec("w", (3,), dtype="float64")


def test_unflatten_views_and_flatten_copy() -> None:
    spec = get_model_spec("digits-mlp")
    flat = np.arange(spec.num_params, dtype=np.float32)
    parts = spec.unflatten(flat)
    assert parts["fc1.weight"].shape == (32, 64)
    assert parts["fc2.bias"][-1] == spec.num_params - 1
    again = spec.flatten(parts)
    np.testing.assert_array_equal(again, flat)
    assert not np.shares_memory(again, flat)
    with pytest.raises(ValueError, match="float32"):
        spec.check_flat(flat.astype(np.float64))
    with pytest.raises(ValueError, match="shape"):
        spec.check_flat(flat[:-1])


@pytest.mark.parametrize("name", ["mnist1d-cnn", "digits-mlp"])
def test_flat_state_dict_round_trip(name: str) -> None:
    spec = get_model_spec(name)
    flat = init_weights(spec, seed=7)
    sd = flat_to_state_dict(spec, flat)
    np.testing.assert_array_equal(state_dict_to_flat(spec, sd), flat)
    module = build_module(spec)
    module.load_state_dict(sd)
    np.testing.assert_array_equal(module_to_flat(module), flat)
    # state dict tensors do not alias the flat vector
    sd["fc1.bias" if "fc1.bias" in sd else "fc.bias"].add_(1.0)
    np.testing.assert_array_equal(state_dict_to_flat(spec, flat_to_state_dict(spec, flat)), flat)
    with pytest.raises(ValueError, match="missing"):
        state_dict_to_flat(spec, {k: v for k, v in sd.items() if k != spec.layout[0].name})


def test_load_flat_copies_both_ways() -> None:
    spec = get_model_spec("mnist1d-cnn")
    flat = init_weights(spec, seed=1)
    original = flat.copy()
    module = build_module(spec)
    load_flat(module, flat)
    np.testing.assert_array_equal(module_to_flat(module), original)
    # mutating the module does not touch the flat array
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(2.0).add_(1.0)
    np.testing.assert_array_equal(flat, original)
    # mutating the flat array does not touch the module
    snapshot = module_to_flat(module)
    flat[:] = 0.0
    np.testing.assert_array_equal(module_to_flat(module), snapshot)
    # a read-only vector loads fine too
    ro = original.copy()
    ro.flags.writeable = False
    load_flat(module, ro)
    np.testing.assert_array_equal(module_to_flat(module), original)
    with pytest.raises(ValueError, match="parameters"):
        load_flat(module, original[:-1])


def test_init_weights_deterministic_and_rng_neutral() -> None:
    spec = get_model_spec("mnist1d-cnn")
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = init_weights(spec, 5)
    assert torch.equal(torch.rand(3), expected_next)  # global RNG untouched
    np.testing.assert_array_equal(a, init_weights(spec, 5))
    assert not np.array_equal(a, init_weights(spec, 6))
    assert a.dtype == np.float32
    assert a.shape == (spec.num_params,)


def test_numpy_init_matches_torch_bounds() -> None:
    spec = get_model_spec("mnist1d-cnn")
    np_parts = spec.unflatten(init_weights_numpy(spec, 0))
    torch_parts = spec.unflatten(init_weights(spec, 0))
    for name, arr in np_parts.items():
        bound_np = float(np.abs(arr).max())
        bound_torch = float(np.abs(torch_parts[name]).max())
        # same U(-b, b) distribution: maxima agree within sampling noise
        assert 0.7 < bound_np / bound_torch < 1.4, name


def test_spec_package_does_not_import_torch() -> None:
    code = (
        "import sys, edgefl.models, edgefl.models.spec, edgefl.training, edgefl.data\n"
        "s = edgefl.models.get_model_spec('mnist1d-cnn')\n"
        "assert s.num_params == 4298 and len(s.layout_hash) == 64\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
