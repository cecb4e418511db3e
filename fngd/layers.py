"""Layer capture shared by FNGD and the baselines: which layers are preconditioned, and the
per-layer math on recorded layer inputs ``a`` and output gradients ``g``.

Every second-order optimizer in this suite preconditions ``nn.Linear`` and ``nn.Conv2d``
and nothing else. ``find_layers`` walks a model once and returns one helper per such layer.
The helper turns its layer's input and output gradient into the matrices the optimizers need:

- ``a`` reshaped to ``(M, G, S, D_in)``: M samples, G groups (1 for Linear), S positions
  (sequence positions for Linear on N-D input, output pixels for Conv2d) and D_in input
  features per group, with a column of ones appended when the layer has a bias;
- ``g`` reshaped to ``(M, G, S, D_out)``.

The per-sample gradient of the layer (weight and bias together) for sample m and group j is
``sum_s g[m, j, s]^T a[m, j, s]``, a ``(D_out, D_in)`` matrix.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# Gram matrices by way of explicit per-sample gradients keep (M, G, D_out, D_in) in memory;
# the position-pair method keeps two (M*S, M*S) matrices. Above this many elements a method is
# used only when the other one is larger still.
GRAM_MEMORY_ELEMENTS = 1 << 28


class LayerHelper:
    """Base class of the per-layer-type helpers; ``find_layers`` creates them."""

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.module = module

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    @property
    def bias(self) -> Optional[nn.Parameter]:
        return self.module.bias

    @property
    def has_bias(self) -> bool:
        return self.module.bias is not None

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in (self.module.weight, self.module.bias) if p is not None]

    @property
    def groups(self) -> int:
        return 1

    def accepts(self, a: torch.Tensor) -> bool:
        """Return whether an input of this shape has a leading sample dimension."""
        raise NotImplementedError

    def positions(self, g: torch.Tensor) -> int:
        """Return S, the number of positions per sample, from an output gradient."""
        raise NotImplementedError

    def input_matrix(self, a: torch.Tensor) -> torch.Tensor:
        """Return ``a`` as ``(M, G, S, D_in)``, with a ones column for the bias."""
        raise NotImplementedError

    def output_grad_matrix(self, g: torch.Tensor) -> torch.Tensor:
        """Return the output gradient as ``(M, G, S, D_out)``."""
        raise NotImplementedError

    def input_grad(self, a: torch.Tensor, g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Return the gradient with respect to the layer input, as the layer's own backward does."""
        raise NotImplementedError

    def param_grads(self, a: torch.Tensor, g: torch.Tensor, weight: torch.Tensor,
                    coefficients: Optional[torch.Tensor]):
        """Return ``(grad_weight, grad_bias)`` of ``sum_m coefficients[m] * G_m``.

        This is the layer's ordinary weight-gradient kernel applied to per-sample scaled
        output gradients (or inputs, whichever tensor is smaller); ``None`` coefficients give
        the plain gradient. ``grad_bias`` is ``None`` for a layer without bias.
        """
        raise NotImplementedError

    # The two conversions below map between parameter gradients and the (G, D_out, D_in)
    # matrices that Shampoo and KFAC precondition.

    def grad_matrix(self, grad_weight: torch.Tensor,
                    grad_bias: Optional[torch.Tensor]) -> torch.Tensor:
        """Return the gradient as ``(G, D_out, D_in)``, the bias as the last input column."""
        groups = self.groups
        out_channels = grad_weight.shape[0]
        matrix = grad_weight.reshape(groups, out_channels // groups, -1)
        if grad_bias is not None:
            matrix = torch.cat([matrix, grad_bias.reshape(groups, -1, 1)], dim=2)
        return matrix

    def split_grad_matrix(self, matrix: torch.Tensor):
        """Invert ``grad_matrix``: return ``(grad_weight, grad_bias)``."""
        if self.has_bias:
            weight_part, bias_part = matrix[..., :-1], matrix[..., -1]
            return weight_part.reshape(self.weight.shape), bias_part.reshape(self.bias.shape)
        return matrix.reshape(self.weight.shape), None

    def per_sample_grads(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Return the per-sample gradients as ``(M, G, D_out, D_in)``."""
        x = self.input_matrix(a)
        z = self.output_grad_matrix(g)
        return torch.einsum("mgso,mgsi->mgoi", z, x)

    def gram(self, a: torch.Tensor, g: torch.Tensor, method: str = "auto") -> torch.Tensor:
        """Return the sample Gram matrix ``K[m, n] = <G_m, G_n>`` in float32 or better.

        ``method`` is ``"pairs"`` (the position-pair Gram, which for one position is the
        Khatri-Rao identity ``K = (Z Z^T) * (X X^T)``), ``"per_sample"`` (explicit per-sample
        gradients) or ``"auto"``, which picks the one with fewer multiply-adds. Both are exact.
        """
        if method not in ("auto", "pairs", "per_sample"):
            raise ValueError(f"unknown Gram method {method!r}; expected 'auto', 'pairs' or 'per_sample'")
        a, g = _at_least_float32(a), _at_least_float32(g)
        if method == "auto":
            method = choose_gram_method(self.matrix_shapes(a, g))
        if method == "pairs":
            return _gram_pairs(self.input_matrix(a), self.output_grad_matrix(g))
        flat = self.per_sample_grads(a, g).reshape(a.shape[0], -1)  # (M, P)
        return flat @ flat.t()

    def matrix_shapes(self, a: torch.Tensor, g: torch.Tensor) -> tuple[int, int, int, int, int]:
        """Return ``(M, G, S, D_in, D_out)`` of ``input_matrix(a)`` and ``output_grad_matrix(g)``."""
        m, groups = a.shape[0], self.groups
        positions = self.positions(g)
        d_out = self.weight.shape[0] // groups
        d_in = self.weight[0].numel() + (1 if self.has_bias else 0)
        return m, groups, positions, d_in, d_out


class LinearHelper(LayerHelper):
    """``nn.Linear`` on ``(M, I)`` or ``(M, T1, ..., I)`` input; dimension 0 is the sample."""

    def accepts(self, a: torch.Tensor) -> bool:
        return a.dim() >= 2

    def positions(self, g: torch.Tensor) -> int:
        return g[0].numel() // g.shape[-1]

    def input_matrix(self, a: torch.Tensor) -> torch.Tensor:
        m = a.shape[0]
        x = a.reshape(m, 1, -1, a.shape[-1])  # (M, 1, S, I)
        if self.has_bias:
            x = torch.cat([x, x.new_ones(x.shape[:-1] + (1,))], dim=-1)
        return x

    def output_grad_matrix(self, g: torch.Tensor) -> torch.Tensor:
        return g.reshape(g.shape[0], 1, -1, g.shape[-1])  # (M, 1, S, O)

    def input_grad(self, a, g, weight):
        return torch.matmul(g, weight.to(g.dtype))

    def param_grads(self, a, g, weight, coefficients):
        a = a.to(g.dtype)
        if coefficients is not None:
            shape = (-1,) + (1,) * (g.dim() - 1)
            coefficients = coefficients.to(g.dtype).reshape(shape)
            # Scale whichever of g and a is smaller; the product is the same.
            if g.shape[-1] <= a.shape[-1]:
                g = g * coefficients
            else:
                a = a * coefficients
        g_flat = g.reshape(-1, g.shape[-1])
        a_flat = a.reshape(-1, a.shape[-1])
        grad_weight = g_flat.t().mm(a_flat).to(weight.dtype)
        if not self.has_bias:
            return grad_weight, None
        if coefficients is not None and g.shape[-1] > a.shape[-1]:
            # a was scaled, not g: weight the per-sample sums of g instead.
            per_sample = g.reshape(g.shape[0], -1, g.shape[-1]).sum(dim=1)
            grad_bias = coefficients.reshape(1, -1).mm(per_sample).reshape(-1)
        else:
            grad_bias = g_flat.sum(dim=0)
        return grad_weight, grad_bias.to(self.bias.dtype)


class Conv2dHelper(LayerHelper):
    """``nn.Conv2d`` with any stride, padding, dilation and groups, on ``(M, C, H, W)`` input."""

    def __init__(self, name: str, module: nn.Conv2d):
        super().__init__(name, module)
        self.padding = conv_padding(module)

    @property
    def groups(self) -> int:
        return self.module.groups

    def accepts(self, a: torch.Tensor) -> bool:
        return a.dim() == 4

    def positions(self, g: torch.Tensor) -> int:
        return g.shape[2] * g.shape[3]

    def unfold(self, a: torch.Tensor) -> torch.Tensor:
        """Return the input patches as ``(M, C * kh * kw, S)``."""
        conv = self.module
        return F.unfold(a, conv.kernel_size, dilation=conv.dilation,
                        padding=self.padding, stride=conv.stride)

    def input_matrix(self, a: torch.Tensor) -> torch.Tensor:
        m, groups = a.shape[0], self.groups
        patches = self.unfold(a)  # (M, C*kh*kw, S), channel-major, so groups are contiguous
        x = patches.reshape(m, groups, -1, patches.shape[-1]).transpose(2, 3)  # (M, G, S, D_in)
        if self.has_bias:
            x = torch.cat([x, x.new_ones(x.shape[:-1] + (1,))], dim=-1)
        return x

    def output_grad_matrix(self, g: torch.Tensor) -> torch.Tensor:
        m, groups = g.shape[0], self.groups
        z = g.reshape(m, groups, g.shape[1] // groups, -1)  # (M, G, O/G, S)
        return z.transpose(2, 3)

    def per_sample_grads(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Return the per-sample gradients as ``(M, G, O/G, D_in)`` without unfolding.

        The batch becomes the groups of one convolution: the input as ``(1, M*C, H, W)``, the
        output gradient as ``(1, M*O, H', W')`` and ``M * groups`` groups, so that the weight
        gradient of that convolution, ``(M*O, C/G, kh, kw)``, is every sample's gradient stacked.
        On CPU this is several times faster than im2col followed by a batched matmul.
        """
        conv = self.module
        m, groups = a.shape[0], self.groups
        out_channels = conv.out_channels
        stacked_input = a.reshape(1, -1, *a.shape[2:])
        stacked_grad = g.reshape(1, -1, *g.shape[2:])
        # Only the weight's shape matters when only the weight gradient is requested.
        weight_shape = (m * out_channels,) + tuple(conv.weight.shape[1:])
        weight = stacked_grad.new_empty(weight_shape)
        _, grads, _ = torch.ops.aten.convolution_backward(
            stacked_grad, stacked_input, weight, None, list(conv.stride), list(self.padding),
            list(conv.dilation), False, [0, 0], m * groups, [False, True, False])
        grads = grads.reshape(m, groups, out_channels // groups, -1)  # (M, G, O/G, C/G*kh*kw)
        if self.has_bias:
            bias_grads = g.sum(dim=(2, 3)).reshape(m, groups, -1, 1)
            grads = torch.cat([grads, bias_grads], dim=-1)
        return grads

    def _convolution_backward(self, a, g, weight, output_mask):
        conv = self.module
        bias_sizes = [conv.out_channels] if self.has_bias else None
        return torch.ops.aten.convolution_backward(
            g, a, weight, bias_sizes, list(conv.stride), list(self.padding),
            list(conv.dilation), False, [0, 0], conv.groups, output_mask)

    def input_grad(self, a, g, weight):
        grad_input, _, _ = self._convolution_backward(
            a.to(g.dtype), g, weight.to(g.dtype), [True, False, False])
        return grad_input

    def param_grads(self, a, g, weight, coefficients):
        a = a.to(g.dtype)
        scaled_input = False
        if coefficients is not None:
            coefficients = coefficients.to(g.dtype).reshape(-1, 1, 1, 1)
            # Scale whichever of g and a is smaller; the weight gradient is the same.
            scaled_input = a.numel() < g.numel()
            if scaled_input:
                a = a * coefficients
            else:
                g = g * coefficients
        _, grad_weight, grad_bias = self._convolution_backward(
            a, g, weight.to(g.dtype), [False, True, self.has_bias])
        grad_weight = grad_weight.to(weight.dtype)
        if not self.has_bias:
            return grad_weight, None
        if scaled_input:
            # g was not scaled: weight its per-sample sums instead.
            per_sample = g.sum(dim=(2, 3))  # (M, O)
            grad_bias = coefficients.reshape(1, -1).mm(per_sample).reshape(-1)
        return grad_weight, grad_bias.to(self.bias.dtype)


def conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """Return a Conv2d's zero padding as two integers, or raise ``ValueError``."""
    if conv.padding_mode != "zeros":
        raise ValueError(f"padding_mode={conv.padding_mode!r} pads before the convolution")
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        pads = []
        for kernel, dilation in zip(conv.kernel_size, conv.dilation):
            total = dilation * (kernel - 1)
            if total % 2:
                raise ValueError("padding='same' with an even receptive field pads unevenly")
            pads.append(total // 2)
        return tuple(pads)
    return tuple(conv.padding)


def choose_gram_method(shapes: tuple[int, int, int, int, int]) -> str:
    """Return the cheaper exact Gram method for ``(M, G, S, D_in, D_out)``, as multiply-adds."""
    m, groups, positions, d_in, d_out = shapes
    pair_flops = groups * (m * positions) ** 2 * (d_in + d_out + 1)
    per_sample_flops = groups * d_out * d_in * m * (positions + m)
    pair_memory = 2 * (m * positions) ** 2
    per_sample_memory = m * groups * d_out * d_in
    if pair_flops <= per_sample_flops:
        if pair_memory <= GRAM_MEMORY_ELEMENTS or pair_memory <= per_sample_memory:
            return "pairs"
        return "per_sample"
    if per_sample_memory <= GRAM_MEMORY_ELEMENTS or per_sample_memory <= pair_memory:
        return "per_sample"
    return "pairs"


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _gram_pairs(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    m, groups, positions, _ = x.shape
    gram = x.new_zeros(m, m)
    for j in range(groups):
        xj = x[:, j].reshape(m * positions, -1)  # (M*S, D_in)
        zj = z[:, j].reshape(m * positions, -1)  # (M*S, D_out)
        pairs = (zj @ zj.t()) * (xj @ xj.t())  # (M*S, M*S)
        gram += pairs.reshape(m, positions, m, positions).sum(dim=(1, 3))
    return gram


HELPERS: dict[type, type[LayerHelper]] = {nn.Linear: LinearHelper, nn.Conv2d: Conv2dHelper}


def find_layers(model: nn.Module, skip: Iterable[str] = ()) -> list[LayerHelper]:
    """Return one helper per ``nn.Linear`` and ``nn.Conv2d`` of ``model`` that can be preconditioned.

    ``skip`` contains ``fnmatch`` patterns of module names to leave on the plain gradient.
    Layers whose parameters are shared with another module (tied weights), layers inside
    ``nn.MultiheadAttention`` (which calls its projections as functions, not as modules),
    frozen layers and Conv2d layers that pad other than with zeros are left out too, and
    each one left out is logged once.
    """
    skip = list(skip)
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(module_name)

    attention_prefixes = [name + "." for name, module in model.named_modules()
                          if isinstance(module, nn.MultiheadAttention)]

    helpers: list[LayerHelper] = []
    for name, module in model.named_modules():
        helper_type = HELPERS.get(type(module))
        if helper_type is None:
            if isinstance(module, nn.MultiheadAttention):
                logger.info("plain gradient for %s: nn.MultiheadAttention calls its input and "
                            "output projections as functions, so they cannot be captured", name)
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in skip):
            logger.info("plain gradient for %s: it matches a skip pattern", name)
            continue
        if any(name.startswith(prefix) for prefix in attention_prefixes):
            continue
        if not module.weight.requires_grad:
            logger.info("plain gradient for %s: its weight is frozen", name)
            continue
        shared = [p for p in (module.weight, module.bias)
                  if p is not None and len(set(owners[id(p)])) > 1]
        if shared:
            logger.info("plain gradient for %s: its parameters are shared with %s (tied weights)",
                        name, sorted(set(owners[id(shared[0])]) - {name}))
            continue
        try:
            helpers.append(helper_type(name, module))
        except ValueError as error:
            logger.info("plain gradient for %s: %s", name, error)
    return helpers


# --------------------------------------------------------------------------------------------
# Taps: replacing a layer's weight gradient without a second backward.


class _TapFunction(torch.autograd.Function):
    """Identity on the layer output whose backward computes the layer's gradients itself.

    The forward hook hands the detached layer output to this function and returns what it
    returns, so the layer's own autograd node is dropped and this backward takes its place. It
    computes the input gradient as the layer would, then calls ``tap.coefficients`` for the
    per-sample weights of the parameter gradient.
    """

    @staticmethod
    def forward(ctx, a, weight, bias, tap, output_box):
        ctx.tap = tap
        ctx.save_for_backward(a, weight)
        # The output comes in a list, not as an argument: autograd treats a tensor argument
        # returned as-is like a view, and would then reject the in-place ReLU that often
        # follows a convolution.
        return output_box[0]

    @staticmethod
    def backward(ctx, g):
        a, weight = ctx.saved_tensors
        tap = ctx.tap
        helper = tap.helper
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = helper.input_grad(a, g, weight).to(a.dtype)
        coefficients = tap.coefficients(helper, a, g)
        grad_weight, grad_bias = helper.param_grads(a, g, weight, coefficients)
        return grad_input, grad_weight, grad_bias, None, None


class LayerTap:
    """Forward hook that routes a layer's backward through ``coefficients(helper, a, g)``.

    ``coefficients`` runs inside the backward pass, once per layer and batch, with the
    layer input ``a`` and output gradient ``g``. It returns a ``(M,)`` tensor of per-sample
    weights for the parameter gradient, or ``None`` for the plain gradient. The input
    gradient that flows to earlier layers is never changed. ``active()``, when given, is
    called at every forward pass; while it returns False the layer runs untouched.

    NOTE: the layer's own output tensor is replaced, so a tensor hook that other code put on
    that output in an earlier forward hook never fires; hooks registered on the returned
    output, or full backward hooks on the module, still do.
    """

    def __init__(self, helper: LayerHelper,
                 coefficients: Callable[[LayerHelper, torch.Tensor, torch.Tensor],
                                        Optional[torch.Tensor]],
                 active: Optional[Callable[[], bool]] = None):
        self.helper = helper
        self.coefficients = coefficients
        self.active = active
        self._inert = False
        self._handle = helper.module.register_forward_hook(self._hook)

    def __getstate__(self) -> dict:
        # A deep copy or pickle of the model (an EMA or evaluation copy) copies its hooks too.
        # The copied tap does nothing, so the copy runs as a plain model instead of feeding a
        # broken copy of the optimizer.
        return {"helper": None, "coefficients": None, "active": None, "_inert": True,
                "_handle": None}

    def _hook(self, module, inputs, output):
        if self._inert:
            return None
        if not (torch.is_grad_enabled() and module.weight.requires_grad):
            return None
        # Under torch.func transforms (vmap, grad) the layer runs untouched: a reference
        # computed with torch.func must see the plain model.
        if torch._C._are_functorch_transforms_active():
            return None
        if self.active is not None and not self.active():
            return None
        a = inputs[0]
        if not self.helper.accepts(a):
            return None
        return _TapFunction.apply(a, module.weight, module.bias, self, [output.detach()])

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()


class Recorder:
    """Record each layer's input and output gradient without changing any gradient.

    For optimizers that only need statistics (KFAC, Eva). ``on_backward(helper, a, g)`` runs
    in the backward pass when the output gradient of a recorded layer arrives, for forward
    passes during which ``active()`` returned True. The layer's gradients stay the plain ones.
    It is built on ``LayerTap`` rather than a tensor hook on the layer output because
    ``nn.Linear`` on N-D input returns a view, and an in-place op on that view (an in-place
    ReLU) drops hooks registered on it.
    """

    def __init__(self, helpers: list[LayerHelper],
                 on_backward: Callable[[LayerHelper, torch.Tensor, torch.Tensor], None],
                 active: Callable[[], bool] = lambda: True):
        self.helpers = helpers
        self.on_backward = on_backward
        self._taps = [LayerTap(h, self._record, active) for h in helpers]

    def _record(self, helper: LayerHelper, a: torch.Tensor, g: torch.Tensor) -> None:
        self.on_backward(helper, a.detach(), g.detach())
        return None

    def remove(self) -> None:
        for tap in self._taps:
            tap.remove()


def solve_coefficients(gram: torch.Tensor, alpha: float):
    """Return ``(v, damping, ok)`` for the damped SMW step on one layer and batch.

    ``v = 1 - (damping I + K / M)^-1 (K 1 / M)`` with ``damping = alpha * ||K||_F``, so that
    ``(damping I + U U^T / M)^-1 g = U v / (M * damping)``. The solve runs in float64 through a
    Cholesky factorisation. Exactly, every eigen-component of ``v`` is that of the ones vector
    shrunk by a factor in (0, 1], so ``||v|| <= sqrt(M)``. A failed factorisation, a
    non-finite result or a result that breaks this bound gives ``v = 1`` (the SGD direction)
    and ``ok = False``. Nothing here synchronises with the device.
    """
    k = gram.to(torch.float64)
    m = k.shape[0]
    damping = alpha * torch.linalg.matrix_norm(k)
    system = k / m + damping * torch.eye(m, dtype=k.dtype, device=k.device)
    rhs = k.sum(dim=1, keepdim=True) / m  # K 1 / M
    factor, info = torch.linalg.cholesky_ex(system)
    y = torch.cholesky_solve(rhs, factor).reshape(-1)
    v = 1.0 - y
    bound = math.sqrt(m) * (1.0 + 1e-6) + 1e-6
    ok = (info == 0) & (damping > 0) & torch.isfinite(v).all() & (torch.linalg.vector_norm(v) <= bound)
    ones = torch.ones_like(v)
    v = torch.where(ok, v, ones)
    return v, damping, ok
