"""Forward and backward passes of the edgefl models for a stack of ``G`` devices at once, written
out by hand over batched matrix products, for :mod:`edgefl.training`. Imports torch.

Why by hand: device ``g``'s arithmetic must not depend on which other devices share its stack,
so that a device trained among 64 gets the *same bits* as the device trained alone. Every op
here is one of

- elementwise (``+ − × ÷``, ReLU and its mask): exact and position-independent;
- ``torch.bmm`` / ``torch.baddbmm`` over the device axis: slice ``g`` is the same gemm call
  (same shape, same strides) whatever ``G`` is, which gives the same bits (checked by
  ``tests/unit/test_training_batched.py``);
- a per-row kernel along the last axis (``softmax``/``log_softmax`` over classes).

Sums over samples (bias gradients, the loss) are ``bmm`` with a ones/mask vector, never
``torch.sum``, whose vectorisation and thread split depend on the whole tensor's size; so is
``torch.vmap``, whose grouped convolutions pick kernels by the number of groups.

Shapes: ``w`` is ``(G, P)`` (flat vectors, layout order); a batch is ``x (G, B, *input_shape)``,
``y (G, B)`` and a mask ``m (G, B)`` of 0/1 (short batches are padded to ``B`` rows of masked
examples, so every device runs the same shapes). Per device the loss is
``Σ_b m_b·ce_b / Σ_b m_b`` with ``ce_b = −log softmax(logits_b)[y_b]`` and the gradient is its
exact derivative (``∂loss/∂logits = (softmax − onehot)·m/Σm``), back-propagated layer by layer.

Layers: ``Conv1d`` (channels-last, ``im2col`` by ``unfold`` then ``bmm``; its input gradient is
one more ``bmm`` in polyphase form, see :meth:`_Conv1d._phases`) and ``Linear``; each may be
followed by ReLU. :class:`Mnist1dCnn` and :class:`MLP` of
:mod:`edgefl.models.torch_models` are expressed as such layer lists (:func:`stacked_net`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from edgefl.models.spec import ModelSpec

__all__ = ["StackedNet", "stacked_net"]


@dataclass
class _Cache:
    """What a layer's backward needs: its input (as used by the product) and its output."""

    inp: Tensor
    out: Tensor


class _Layer(Protocol):
    @property
    def macs(self) -> int:
        """Multiply-accumulates of the forward product per example."""
        ...

    @property
    def floats(self) -> int:
        """Working floats per example, forward and backward (a rough bound)."""
        ...

    def forward(self, w: Tensor, h: Tensor) -> tuple[Tensor, _Cache]: ...

    def backward(
        self, w: Tensor, cache: _Cache, dout: Tensor, need_input: bool
    ) -> tuple[list[Tensor], Tensor | None]: ...


def _ones(g: int, n: int, like: Tensor) -> Tensor:
    return torch.ones(g, 1, n, dtype=like.dtype)


def _relu_grad(dout: Tensor, out: Tensor, relu: bool) -> Tensor:
    if not relu:
        return dout
    grad: Tensor = torch.ops.aten.threshold_backward(dout, out, 0.0)
    return grad


def _im2col(h: Tensor, size: int, step: int, n: int, left: int) -> Tensor:
    """``im2col`` of a channels-last ``h (G, B, L, C)``: ``(G, B·n, size·C)`` whose row
    ``(b, t)`` holds positions ``step·t − left + j`` for ``j < size`` in ``(position, channel)``
    order, zero outside ``[0, L)``. Built as a zero-padded copy of ``h`` (``left`` before, what
    the last window needs after; a negative ``left`` crops instead), a strided window view
    (``unfold``) and one copy into the ``(position, channel)`` order: two copies in torch,
    about twice as fast as one strided copy per window slot. Pure data movement, so the values
    are exactly those of the per-slot version."""
    g, b, length, c = h.shape
    if left < 0:
        h, length, left = h[:, :, -left:], max(0, length + left), 0
    right = step * (n - 1) + size - (length + left)
    if left or right > 0:
        h = torch.nn.functional.pad(h, (0, 0, left, max(0, right)))
    cols = h.unfold(2, size, step)[:, :, :n]  # (G, B, n, C, size), a view
    return cols.transpose(3, 4).reshape(g, b * n, size * c)


@dataclass(frozen=True)
class _Conv1d:
    """``Conv1d(c_in → c_out, kernel k, stride s, padding p)`` on channels-last ``(G, B, L, C)``,
    then ReLU. Weights at flat ``[a, a + c_out·c_in·k)`` (torch's ``(out, in, k)``), bias after.
    Products use the weights in ``(out, k, in)`` order, matching :func:`_im2col`."""

    a: int
    c_in: int
    c_out: int
    k: int
    s: int
    p: int
    l_in: int
    relu: bool = True

    def __post_init__(self) -> None:
        if self.l_in % self.s:  # the polyphase input gradient has l_in / s rows per phase
            raise ValueError(f"input length is not a multiple of the stride: {self}")

    @property
    def l_out(self) -> int:
        return (self.l_in + 2 * self.p - self.k) // self.s + 1

    @property
    def macs(self) -> int:
        return self.l_out * self.c_out * self.c_in * self.k

    @property
    def floats(self) -> int:
        padded = (self.l_in + 2 * self.p) * self.c_in
        return 2 * (self.l_out * self.k * self.c_in + padded) + 3 * self.l_out * self.c_out

    def _w(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """``(W (G, out, k, in), bias (G, 1, out))``; ``W`` is a (non-contiguous) view."""
        n = self.c_out * self.c_in * self.k
        g = w.shape[0]
        wm = w[:, self.a : self.a + n].view(g, self.c_out, self.c_in, self.k).transpose(2, 3)
        return wm, w[:, self.a + n : self.a + n + self.c_out].view(g, 1, self.c_out)

    def forward(self, w: Tensor, h: Tensor) -> tuple[Tensor, _Cache]:
        g, b = h.shape[0], h.shape[1]
        wm, bias = self._w(w)
        cols = _im2col(h, self.k, self.s, self.l_out, self.p)
        w_t = wm.reshape(g, self.c_out, self.k * self.c_in).transpose(1, 2)
        z = torch.baddbmm(bias, cols, w_t)
        out = torch.relu_(z) if self.relu else z
        return out.view(g, b, self.l_out, self.c_out), _Cache(cols, out)

    def backward(
        self, w: Tensor, cache: _Cache, dout: Tensor, need_input: bool
    ) -> tuple[list[Tensor], Tensor | None]:
        g, b = dout.shape[0], dout.shape[1]
        rows = b * self.l_out
        dz = _relu_grad(dout.reshape(g, rows, self.c_out), cache.out, self.relu)
        dw_kin = torch.bmm(dz.transpose(1, 2), cache.inp)  # (G, out, k·in)
        dw = dw_kin.view(g, self.c_out, self.k, self.c_in).transpose(2, 3).reshape(g, -1)
        db = torch.bmm(_ones(g, rows, dz), dz).reshape(g, -1)
        return [dw, db], self._input_grad(w, dz, b) if need_input else None

    def _phases(self) -> tuple[int, list[int]]:
        """Polyphase form of the input gradient: input position ``q = s·i + r`` receives
        ``Σ_j dz[i + d]·W[:, :, j]`` over taps ``j`` with ``s·d = r + p − j``. Returns
        ``d_min`` and, for each window slot ``u`` (``d = d_min + u``) and phase ``r``, the tap
        ``j`` (``k``, a zero tap, where none applies), flattened ``(u, r)``."""
        s, p, k = self.s, self.p, self.k
        pairs = [(r, j) for r in range(s) for j in range(k) if (r + p - j) % s == 0]
        ds = [(r + p - j) // s for r, j in pairs]
        d_min, d_max = min(ds), max(ds)
        table = [k] * ((d_max - d_min + 1) * s)
        for (r, j), d in zip(pairs, ds, strict=True):
            table[(d - d_min) * s + r] = j
        return d_min, table

    def _input_grad(self, w: Tensor, dz: Tensor, b: int) -> Tensor:
        """``∂loss/∂input`` as one product: windows of ``dz`` (``nu`` output positions) times a
        ``(nu·c_out, s·c_in)`` matrix of the taps, giving the ``s`` phases interleaved."""
        g = dz.shape[0]
        d_min, table = self._phases()
        nu, n_i = len(table) // self.s, self.l_in // self.s
        wm, _ = self._w(w)  # (G, out, k, in)
        w_ext = torch.cat([wm, torch.zeros(g, self.c_out, 1, self.c_in)], dim=2)
        taps = w_ext[:, :, table].view(g, self.c_out, nu, self.s * self.c_in)
        mat = taps.transpose(1, 2).reshape(g, nu * self.c_out, self.s * self.c_in)
        cols = _im2col(dz.view(g, b, self.l_out, self.c_out), nu, 1, n_i, -d_min)
        return torch.bmm(cols, mat).view(g, b, self.l_in, self.c_in)


@dataclass(frozen=True)
class _Linear:
    """``Linear(n_in → n_out)`` on ``(G, B, n_in)`` (ReLU after unless last). ``perm`` maps the
    input's feature order to torch's when they differ (channels-last flatten of ``(c, l)``:
    ``perm = (c, l)``, the input arrives as ``(l, c)``)."""

    a: int
    n_in: int
    n_out: int
    relu: bool
    perm: tuple[int, int] | None = None

    @property
    def macs(self) -> int:
        return self.n_in * self.n_out

    @property
    def floats(self) -> int:
        return 2 * self.n_in + 3 * self.n_out

    def _w(self, w: Tensor) -> tuple[Tensor, Tensor]:
        g, n = w.shape[0], self.n_out * self.n_in
        wm = w[:, self.a : self.a + n].view(g, self.n_out, self.n_in)
        if self.perm is not None:
            c, l_ = self.perm
            wm = wm.view(g, self.n_out, c, l_).transpose(2, 3).reshape(g, self.n_out, self.n_in)
        return wm, w[:, self.a + n : self.a + n + self.n_out].view(g, 1, self.n_out)

    def forward(self, w: Tensor, h: Tensor) -> tuple[Tensor, _Cache]:
        g, b = h.shape[0], h.shape[1]
        wm, bias = self._w(w)
        inp = h.reshape(g, b, self.n_in)
        z = torch.baddbmm(bias, inp, wm.transpose(1, 2))
        out = torch.relu_(z) if self.relu else z
        return out, _Cache(inp, out)

    def backward(
        self, w: Tensor, cache: _Cache, dout: Tensor, need_input: bool
    ) -> tuple[list[Tensor], Tensor | None]:
        g, b = dout.shape[0], dout.shape[1]
        dz = _relu_grad(dout, cache.out, self.relu)
        dw = torch.bmm(dz.transpose(1, 2), cache.inp)  # (G, out, in)
        if self.perm is not None:
            c, l_ = self.perm
            dw = dw.view(g, self.n_out, l_, c).transpose(2, 3)
        db = torch.bmm(_ones(g, b, dz), dz)
        dh = None
        if need_input:
            wm, _ = self._w(w)
            dh = torch.bmm(dz, wm)
        return [dw.reshape(g, -1), db.reshape(g, -1)], dh


class StackedNet:
    """A model as a chain of stacked layers; :meth:`loss_and_grad` is one SGD step's maths."""

    def __init__(self, layers: list[_Layer], in_shape: tuple[int, ...]) -> None:
        self.layers = layers
        self.in_shape = in_shape  # per-sample input as the first layer wants it

    def bytes_per_example(self) -> int:
        """A rough bound of the float32 working memory one example takes in a step (inputs,
        ``im2col`` windows and outputs of every layer, forward and backward)."""
        return 4 * sum(layer.floats for layer in self.layers)

    def flops_per_example(self) -> int:
        """Multiply-add FLOPs (2 per MAC) of one training example: the forward products, their
        weight gradients and the input gradients of every layer but the first (``3×`` forward
        but for the first layer's ``2×``), ignoring the elementwise work."""
        macs = [layer.macs for layer in self.layers]
        return 2 * (3 * sum(macs) - macs[0])

    def loss_and_grad(self, w: Tensor, x: Tensor, y: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
        """``(loss (G,), grad (G, P))`` of the masked mean cross-entropy (module docstring).

        A stack of one on several threads is computed as a stack of two (the device twice):
        torch runs a batched product of ``G ≥ 2`` as one single-threaded gemm per device, but
        a lone gemm with a long reduction (``K = B·L``) is split across MKL's threads, which
        sums in another order."""
        if y.shape[0] == 1 and torch.get_num_threads() > 1:
            loss, grad = self._loss_and_grad(*(t.expand(2, *t.shape[1:]) for t in (w, x, y, m)))
            return loss[:1], grad[:1]
        return self._loss_and_grad(w, x, y, m)

    def _loss_and_grad(self, w: Tensor, x: Tensor, y: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
        g, b = y.shape
        h = x.reshape(g, b, *self.in_shape)
        caches = []
        for layer in self.layers:
            h, cache = layer.forward(w, h)
            caches.append(cache)
        logits = h  # (G, B, classes)
        count = torch.bmm(_ones(g, b, m), m.unsqueeze(2)).view(g, 1)
        mw = (m / count).unsqueeze(2)  # (G, B, 1)
        ce = -torch.log_softmax(logits, 2).gather(2, y.unsqueeze(2))  # (G, B, 1)
        loss = torch.bmm(ce.transpose(1, 2), mw).view(g)
        dl = torch.softmax(logits, 2)
        dl.scatter_add_(2, y.unsqueeze(2), torch.full((g, b, 1), -1.0, dtype=dl.dtype))
        dh: Tensor | None = dl.mul_(mw)
        grads: list[list[Tensor]] = []
        for i in range(len(self.layers) - 1, -1, -1):
            assert dh is not None
            gr, dh = self.layers[i].backward(w, caches[i], dh, need_input=i > 0)
            grads.append(gr)
        return loss, torch.cat([t for gr in reversed(grads) for t in gr], dim=1)


def _cnn(spec: ModelSpec) -> StackedNet:
    """``Mnist1dCnn``: three Conv1d(k5, p2; strides 1, 2, 2) + ReLU, then Linear."""
    shapes = {t.name: t.shape for t in spec.layout}
    offsets = {name: a for name, (a, _) in spec.offsets().items()}
    length = spec.input_shape[-1]
    layers: list[_Layer] = []
    c_in = 1
    for name, stride in (("conv1", 1), ("conv2", 2), ("conv3", 2)):
        c_out, _, k = shapes[f"{name}.weight"]
        conv = _Conv1d(offsets[f"{name}.weight"], c_in, c_out, k, stride, k // 2, length)
        layers.append(conv)
        c_in, length = c_out, conv.l_out
    n_out, n_in = shapes["fc.weight"]
    layers.append(_Linear(offsets["fc.weight"], n_in, n_out, relu=False, perm=(c_in, length)))
    return StackedNet(layers, (spec.input_shape[-1], 1))


def _mlp(spec: ModelSpec) -> StackedNet:
    """``MLP``: ``fc1 → ReLU → … → fcL`` on the flattened input."""
    offsets = {name: a for name, (a, _) in spec.offsets().items()}
    weights = [t for t in spec.layout if t.name.endswith(".weight")]
    layers: list[_Layer] = [
        _Linear(offsets[t.name], t.shape[1], t.shape[0], relu=i < len(weights) - 1)
        for i, t in enumerate(weights)
    ]
    return StackedNet(layers, (weights[0].shape[1],))


_NETS: dict[ModelSpec, StackedNet] = {}


def stacked_net(spec: ModelSpec) -> StackedNet:
    """The stacked form of ``spec`` (``mnist1d-cnn`` or an MLP layout); ``ValueError`` else."""
    net = _NETS.get(spec)
    if net is None:
        from edgefl.models.torch_models import build_module

        build_module(spec)  # raises ValueError for a spec without a torch builder
        net = _cnn(spec) if spec.name == "mnist1d-cnn" else _mlp(spec)
        _NETS[spec] = net
    return net
