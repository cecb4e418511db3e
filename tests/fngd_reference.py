"""Dense float64 references for the FNGD tests, built from torch.func per-sample gradients,
and the small network and batches the tests train on."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.func import functional_call, grad, vmap


def per_sample_grads(model: nn.Module, loss_fn, inputs: torch.Tensor, targets: torch.Tensor,
                     names: list[str]) -> torch.Tensor:
    """Return ``U`` as ``(M, P)``: each row the gradient of one sample's own loss.

    ``names`` are the parameter names (in ``model.named_parameters()``) whose gradients are
    concatenated, in that order.
    """
    params = {name: p.detach() for name, p in model.named_parameters()}

    def sample_loss(selected, x, y):
        merged = dict(params)
        merged.update(selected)
        out = functional_call(model, merged, (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    selected = {name: params[name] for name in names}
    grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(selected, inputs, targets)
    return torch.cat([grads[name].reshape(inputs.shape[0], -1) for name in names], dim=1)


def dense_damped_step(u: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(d, damping)``: ``d = (damping I + U^T U / M)^-1 g`` for ``u`` of shape (M, P).

    This solves the P x P system directly, without the Sherman-Morrison-Woodbury identity.
    """
    u = u.to(torch.float64)
    m, p = u.shape
    gram = u @ u.t()
    damping = alpha * torch.linalg.matrix_norm(gram)
    fisher = u.t() @ u / m + damping * torch.eye(p, dtype=u.dtype)
    mean_grad = u.mean(dim=0)
    return torch.linalg.solve(fisher, mean_grad), damping


def conv_net(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
        nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2), nn.ReLU(inplace=True),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 5))


def batches(steps, batch_size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(steps * batch_size, 3, 8, 8, generator=generator)
    y = torch.randint(0, 5, (steps * batch_size,), generator=generator)
    return [(x[i * batch_size:(i + 1) * batch_size], y[i * batch_size:(i + 1) * batch_size])
            for i in range(steps)]


def train(model, optimizer, data, reduction="mean"):
    for xb, yb in data:
        optimizer.zero_grad()
        F.cross_entropy(model(xb), yb, reduction=reduction).backward()
        optimizer.step()
