"""``_im2col`` of the stacked nets against the definition, element by element."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefl.stacked_nets import _im2col


def _reference(h: torch.Tensor, size: int, step: int, n: int, left: int) -> torch.Tensor:
    """Row ``(b, t)``, column ``(j, ch)`` = ``h[g, b, step·t − left + j, ch]``, 0 outside."""
    g, b, length, c = h.shape
    out = torch.zeros(g, b, n, size, c)
    for t in range(n):
        for j in range(size):
            q = step * t - left + j
            if 0 <= q < length:
                out[:, :, t, j] = h[:, :, q]
    return out.reshape(g, b * n, size * c)


def test_a_hand_checkable_window() -> None:
    """One sequence 1..5, windows of 3 with stride 2 and one zero of padding on the left:
    positions -1..1, 1..3, 3..5."""
    h = torch.arange(1.0, 6.0).view(1, 1, 5, 1)
    cols = _im2col(h, size=3, step=2, n=3, left=1)
    assert cols.view(3, 3).tolist() == [[0.0, 1.0, 2.0], [2.0, 3.0, 4.0], [4.0, 5.0, 0.0]]


@settings(max_examples=60, deadline=None)
@given(
    length=st.integers(1, 12),
    channels=st.integers(1, 3),
    size=st.integers(1, 5),
    step=st.integers(1, 3),
    n=st.integers(1, 8),
    left=st.integers(-3, 4),
)
def test_im2col_equals_its_definition(
    length: int, channels: int, size: int, step: int, n: int, left: int
) -> None:
    h = torch.randn(2, 3, length, channels, generator=torch.Generator().manual_seed(length))
    assert torch.equal(_im2col(h, size, step, n, left), _reference(h, size, step, n, left))
