"""Shampoo against dense float64 inverse fourth roots of its left and right statistics."""

import pytest
import torch
from torch import nn

from baselines import Shampoo
from tests.test_baselines_common import LAYER_NAMES, run_step, small_net, step_matrix

EPSILON = 1e-4


def dense_inverse_fourth_root(statistic: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Return ``(S + epsilon * s_max I)^{-1/4}`` through a float64 eigendecomposition."""
    values, vectors = torch.linalg.eigh(statistic.double())
    values = values.clamp_min(0)
    ridge = epsilon * values.max()
    return vectors @ torch.diag((values + ridge) ** -0.25) @ vectors.T


def dense_shampoo_block(statistics: list[torch.Tensor], block: torch.Tensor) -> torch.Tensor:
    """Return ``L^-1/4 W R^-1/4`` for one block, L and R summed over the given gradient blocks."""
    left = sum(w @ w.T for w in statistics)
    right = sum(w.T @ w for w in statistics)
    return (dense_inverse_fourth_root(left, EPSILON) @ block
            @ dense_inverse_fourth_root(right, EPSILON))


def blocks_of(rows: int, columns: int, block_size: int):
    """Return the row and column slices of Shampoo's blocks (equal sizes, the last shorter)."""
    def cuts(size):
        count = -(-size // block_size)
        length = -(-size // count)
        return [slice(start, min(start + length, size)) for start in range(0, size, length)]
    return [(r, c) for r in cuts(rows) for c in cuts(columns)]


def dense_shampoo(history: list[torch.Tensor], gradient: torch.Tensor, block_size: int):
    """Blockwise Shampoo direction of ``gradient`` (G, D_out, D_in), statistics from ``history``."""
    out = torch.zeros_like(gradient)
    for group in range(gradient.shape[0]):
        for rows, columns in blocks_of(gradient.shape[1], gradient.shape[2], block_size):
            past = [w[group, rows, columns] for w in history]
            out[group, rows, columns] = dense_shampoo_block(past, gradient[group, rows, columns])
    return out


@pytest.mark.parametrize("block_size", [128, 3])
def test_shampoo_matches_dense_roots(block_size):
    lr = 0.5
    model = small_net()
    optimizer = Shampoo(model, lr=lr, momentum=0.0, epsilon=EPSILON, statistics_interval=1,
                        inverse_interval=1, start_preconditioning_step=0, grafting="none",
                        block_size=block_size)
    history = {name: [] for name in LAYER_NAMES}
    for seed in range(2):
        gradients, before = run_step(model, optimizer, seed)
        for name in LAYER_NAMES:
            history[name].append(gradients[name])
            expected = -lr * dense_shampoo(history[name], gradients[name], block_size)
            actual = step_matrix(model.get_submodule(name), name, before)
            torch.testing.assert_close(actual, expected, rtol=1e-7, atol=1e-12,
                                       msg=f"{name}, step {seed}")


def test_shampoo_blocks_split_large_dimensions():
    model = small_net()
    optimizer = Shampoo(model, block_size=3, statistics_interval=1, inverse_interval=1,
                        start_preconditioning_step=0)
    run_step(model, optimizer, 0)
    # head: 3 x (5 + bias) -> one row block, two column blocks of 3.
    state = optimizer.layer_state["head"]
    assert state["L"].shape == (2, 3, 3)
    assert state["R"].shape == (2, 3, 3)
    # conv: 4 x (2*3*3 + 1) -> row blocks of 2, column blocks of 3 (19 -> 7 blocks, 2 padded).
    assert optimizer.layer_state["conv"]["L"].shape == (14, 2, 2)


def test_shampoo_grafting_takes_sgd_norm():
    lr = 0.5
    model = small_net()
    optimizer = Shampoo(model, lr=lr, momentum=0.0, epsilon=EPSILON, statistics_interval=1,
                        inverse_interval=1, start_preconditioning_step=0, grafting="sgd")
    history = {name: [] for name in LAYER_NAMES}
    for seed in range(2):
        gradients, before = run_step(model, optimizer, seed)
        for name in LAYER_NAMES:
            history[name].append(gradients[name])
            actual = step_matrix(model.get_submodule(name), name, before)
            direction = dense_shampoo(history[name], gradients[name], 128)
            # The layer's step has the SGD step's norm and Shampoo's direction.
            torch.testing.assert_close(torch.linalg.norm(actual),
                                       lr * torch.linalg.norm(gradients[name]))
            cosine = nn.functional.cosine_similarity(actual.flatten(), -direction.flatten(), dim=0)
            assert cosine > 1 - 1e-10, name
            assert not torch.allclose(actual, -lr * gradients[name], rtol=1e-3)


def test_shampoo_beta2_running_average():
    model = small_net()
    optimizer = Shampoo(model, beta2=0.9, statistics_interval=1, inverse_interval=1,
                        start_preconditioning_step=0)
    history = []
    for seed in range(3):
        gradients, _ = run_step(model, optimizer, seed)
        history.append(gradients["head"][0])
    expected = torch.zeros(3, 3, dtype=torch.float64)
    for w in history:
        expected = 0.9 * expected + 0.1 * (w @ w.T)
    torch.testing.assert_close(optimizer.layer_state["head"]["L"][0], expected)


def test_shampoo_zero_gradient_layer_stays_finite():
    # A layer whose gradient is always zero has zero statistics; its roots must not be inf.
    model = small_net()
    model.head.weight.register_hook(torch.zeros_like)
    model.head.bias.register_hook(torch.zeros_like)
    optimizer = Shampoo(model, statistics_interval=1, inverse_interval=1,
                        start_preconditioning_step=0)
    for seed in range(2):
        run_step(model, optimizer, seed)
    assert torch.isfinite(optimizer.layer_state["head"]["L_root"]).all()
    for p in model.parameters():
        assert torch.isfinite(p).all()
