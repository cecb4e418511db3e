"""Eva against the dense inverse of its rank-one Kronecker curvature plus damping, in float64."""

import math

import pytest
import torch

from baselines import Eva
from tests.test_baselines_common import (LAYER_NAMES, Record, layer_rows, run_step, small_net,
                                         step_matrix)

# Record's backward hooks warn when the model input does not require a gradient.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


def dense_vectors(module, a, g):
    """Return the Kronecker vectors: mean input (G, D_in) and mean output gradient (G, D_out)."""
    x, z = layer_rows(module, a, g)  # (M, G, S, D)
    return x.mean(dim=(0, 2)), z.mean(dim=(0, 2))


def dense_eva_step(vector_a, vector_g, gradient, damping):
    """Return ``((a a^T) ⊗ (g g^T) + damping I)^-1 vec(W)`` per group, by a dense solve."""
    out = []
    for a_j, g_j, w_j in zip(vector_a, vector_g, gradient):
        u = torch.outer(g_j, a_j).reshape(-1)  # vec of g a^T, row-major like w_j.reshape(-1)
        curvature = torch.outer(u, u) + damping * torch.eye(u.numel(), dtype=torch.float64)
        out.append(torch.linalg.solve(curvature, w_j.reshape(-1)).reshape(w_j.shape))
    return torch.stack(out)


def test_eva_matches_dense_inverse():
    lr, damping = 0.5, 0.03
    model = small_net()
    optimizer = Eva(model, lr=lr, momentum=0.0, damping=damping, kl_clip=None, factor_decay=0.0)
    record = Record(model, LAYER_NAMES)
    for seed in range(2):
        gradients, before = run_step(model, optimizer, seed)
        for name in LAYER_NAMES:
            module = model.get_submodule(name)
            vector_a, vector_g = dense_vectors(module, record.inputs[name],
                                               record.output_grads[name])
            expected = -lr * dense_eva_step(vector_a, vector_g, gradients[name], damping)
            torch.testing.assert_close(step_matrix(module, name, before), expected,
                                       rtol=1e-8, atol=1e-12, msg=name)


def test_eva_rank_one_term_matters():
    # With a damping comparable to |a|^2 |g|^2 the step is not just the gradient over damping.
    damping = 1e-4
    model = small_net()
    optimizer = Eva(model, lr=1.0, momentum=0.0, damping=damping, kl_clip=None)
    gradients, before = run_step(model, optimizer, 0)
    change = step_matrix(model.head, "head", before)
    assert not torch.allclose(change, -gradients["head"] / damping, rtol=1e-3)


def test_eva_running_average_of_vectors():
    model = small_net()
    optimizer = Eva(model, lr=0.1, factor_decay=0.8)
    record = Record(model, LAYER_NAMES)
    expected = {}
    for seed in range(3):
        run_step(model, optimizer, seed)
        for name in LAYER_NAMES:
            batch = dense_vectors(model.get_submodule(name), record.inputs[name],
                                  record.output_grads[name])
            expected[name] = batch if seed == 0 else tuple(
                0.8 * old + 0.2 * new for old, new in zip(expected[name], batch))
    for name in LAYER_NAMES:
        torch.testing.assert_close(optimizer.layer_state[name]["a"], expected[name][0])
        torch.testing.assert_close(optimizer.layer_state[name]["g"], expected[name][1])


@pytest.mark.parametrize("kl_clip, clipped", [(1e-7, True), (1e3, False)])
def test_eva_kl_clip(kl_clip, clipped):
    lr, damping = 0.5, 0.03
    model = small_net()
    optimizer = Eva(model, lr=lr, momentum=0.0, damping=damping, kl_clip=kl_clip, factor_decay=0.0)
    record = Record(model, LAYER_NAMES)
    gradients, before = run_step(model, optimizer, 0)

    preconditioned = {}
    for name in LAYER_NAMES:
        module = model.get_submodule(name)
        vector_a, vector_g = dense_vectors(module, record.inputs[name], record.output_grads[name])
        preconditioned[name] = dense_eva_step(vector_a, vector_g, gradients[name], damping)
    # nu = min(1, sqrt(kl_clip / sum_l lr^2 <P_l, W_l>)) caps the squared step in the
    # curvature norm, lr^2 <P, F P> = lr^2 <P, W>, at kl_clip.
    total = sum(lr ** 2 * (preconditioned[n] * gradients[n]).sum() for n in LAYER_NAMES)
    scale = min(1.0, math.sqrt(kl_clip / float(total)))
    assert (scale < 1.0) == clipped

    inner = 0.0
    for name in LAYER_NAMES:
        change = step_matrix(model.get_submodule(name), name, before)
        torch.testing.assert_close(change, -lr * scale * preconditioned[name],
                                   rtol=1e-8, atol=1e-14, msg=name)
        inner += float((change * gradients[name]).sum())
    if clipped:
        # The clipped step D = -lr nu P has F D = -lr nu W, so its curvature norm
        # <D, F D> = lr^2 (sum_l <D_l, W_l>)^2 / total equals kl_clip exactly.
        assert lr ** 2 * inner ** 2 / float(total) == pytest.approx(kl_clip, rel=1e-8)
