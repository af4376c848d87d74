"""Server optimizers: one- and two-step values by hand, state export/import."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgefl.aggregation import (
    ServerAdam,
    ServerOptimizerConfig,
    ServerOptimizerKind,
    ServerSGD,
)


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def test_sgd_without_momentum_moves_along_aggregate() -> None:
    w = f32(1.0, 1.0)
    ServerSGD(lr=0.5).step(w, f32(2.0, -4.0))
    np.testing.assert_array_equal(w, f32(2.0, -1.0))


def test_sgd_momentum_two_steps() -> None:
    # m1 = a1 = [1, 2]                 -> w = 0 + 0.5 * [1, 2]     = [0.5, 1.0]
    # m2 = 0.9 * [1, 2] + [2, 0] = [2.9, 1.8] -> w += 0.5 * m2    = [1.95, 1.9]
    opt = ServerSGD(lr=0.5, momentum=0.9)
    w = f32(0.0, 0.0)
    opt.step(w, f32(1.0, 2.0))
    np.testing.assert_allclose(w, [0.5, 1.0], rtol=1e-6)
    opt.step(w, f32(2.0, 0.0))
    np.testing.assert_allclose(w, [1.95, 1.9], rtol=1e-6)
    state = opt.state_dict()
    assert state["steps"] == 2
    np.testing.assert_allclose(state["momentum_buffer"], [2.9, 1.8], rtol=1e-6)


def test_sgd_without_momentum_keeps_no_buffer() -> None:
    opt = ServerSGD()
    opt.step(f32(0.0), f32(1.0))
    assert opt.state_dict() == {"steps": 1}


def test_adam_one_step_reddi_form() -> None:
    # m = 0.1 * a = [0.1, -0.2]; v = 0.01 * a^2 = [0.01, 0.04]; sqrt(v) = [0.1, 0.2]
    # w = 0.1 * m / (sqrt(v) + 1e-3)
    opt = ServerAdam(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-3)
    w = f32(0.0, 0.0)
    opt.step(w, f32(1.0, -2.0))
    np.testing.assert_allclose(w, [0.1 * 0.1 / 0.101, -0.1 * 0.2 / 0.201], rtol=1e-5)


def test_adam_second_step() -> None:
    opt = ServerAdam(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-3)
    w = f32(0.0, 0.0)
    opt.step(w, f32(1.0, -2.0))
    first = w.astype(np.float64).copy()
    opt.step(w, f32(1.0, 0.0))
    m = [0.9 * 0.1 + 0.1 * 1.0, 0.9 * -0.2]  # [0.19, -0.18]
    v = [0.99 * 0.01 + 0.01 * 1.0, 0.99 * 0.04]  # [0.0199, 0.0396]
    expected = first + [0.1 * m[i] / (math.sqrt(v[i]) + 1e-3) for i in range(2)]
    np.testing.assert_allclose(w, expected, rtol=1e-5)


def test_adam_bias_correction_first_step_is_about_lr_times_sign() -> None:
    # m_hat = a, v_hat = a^2  ->  step = lr * a / (|a| + eps)
    opt = ServerAdam(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-3, bias_correction=True)
    w = f32(0.0, 0.0)
    opt.step(w, f32(1.0, -2.0))
    np.testing.assert_allclose(w, [0.1 * 1 / 1.001, -0.1 * 2 / 2.001], rtol=1e-5)


@pytest.mark.parametrize(
    "make",
    [lambda: ServerSGD(lr=0.7, momentum=0.9), lambda: ServerAdam(lr=0.05, bias_correction=True)],
)
def test_state_round_trip_continues_identically(make: object) -> None:
    rng = np.random.default_rng(3)
    aggregates = [rng.normal(size=5).astype(np.float32) for _ in range(4)]
    a, b = make(), make()  # type: ignore[operator]
    wa = np.zeros(5, np.float32)
    wb = np.zeros(5, np.float32)
    for g in aggregates[:2]:
        a.step(wa, g)
        b.step(wb, g)
    c = make()  # type: ignore[operator]
    c.load_state_dict(b.state_dict())
    for g in aggregates[2:]:
        a.step(wa, g)
        c.step(wb, g)
    np.testing.assert_array_equal(wa, wb)


def test_exported_state_is_a_copy() -> None:
    opt = ServerSGD(momentum=0.5)
    w = f32(0.0)
    opt.step(w, f32(1.0))
    state = opt.state_dict()
    opt.step(w, f32(1.0))
    np.testing.assert_array_equal(state["momentum_buffer"], f32(1.0))


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: ServerSGD(lr=0.0), "lr must be > 0"),
        (lambda: ServerSGD(lr=math.nan), "server lr"),
        (lambda: ServerSGD(momentum=1.0), "momentum"),
        (lambda: ServerAdam(beta2=1.0), "beta2"),
        (lambda: ServerAdam(eps=0.0), "eps"),
    ],
)
def test_hyperparameter_validation(build: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()  # type: ignore[operator]


def test_load_state_validation() -> None:
    with pytest.raises(ValueError, match="unknown optimizer state keys"):
        ServerSGD().load_state_dict({"steps": 1, "m": f32(1.0)})
    with pytest.raises(ValueError, match="both 'm' and 'v'"):
        ServerAdam().load_state_dict({"steps": 1, "m": f32(1.0)})
    with pytest.raises(ValueError, match="steps"):
        ServerAdam().load_state_dict({"steps": -1})


def test_step_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="aggregate shape"):
        ServerSGD().step(f32(0.0, 0.0), f32(1.0))


def test_config_builds_each_kind() -> None:
    sgd = ServerOptimizerConfig.sgd(lr=0.7, momentum=0.9).build()
    assert isinstance(sgd, ServerSGD)
    assert (sgd.lr, sgd.momentum) == (0.7, 0.9)
    adam = ServerOptimizerConfig.adam(lr=1e-3).build()
    assert isinstance(adam, ServerAdam)
    assert adam.kind is ServerOptimizerKind.ADAM
    assert ServerOptimizerConfig(kind="adam").kind is ServerOptimizerKind.ADAM  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="momentum"):
        ServerOptimizerConfig.sgd(momentum=2.0)
