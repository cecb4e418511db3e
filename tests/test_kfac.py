"""KFAC against dense float64 factors built by hand from the layer inputs and output gradients."""

import math

import pytest
import torch
from torch.nn import functional as F

from baselines import KFAC
from tests.test_baselines_common import (LAYER_NAMES, Record, layer_rows, run_step, small_batch,
                                         small_net, step_matrix)

# Record's backward hooks warn when the model input does not require a gradient.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


def dense_factors(module, a, g):
    """Return the batch factors A (G, D_in, D_in) and G (G, D_out, D_out) of a mean loss."""
    x, z = layer_rows(module, a, g)  # (M, G, S, D)
    samples, positions = x.shape[0], x.shape[2]
    x = x.transpose(0, 1).reshape(x.shape[1], samples * positions, -1)  # (G, M*S, D_in)
    z = z.transpose(0, 1).reshape(z.shape[1], samples * positions, -1) * samples
    factor_a = x.transpose(1, 2) @ x / (samples * positions)
    factor_g = z.transpose(1, 2) @ z / (samples * positions)
    return factor_a, factor_g


def dense_kfac_step(factor_a, factor_g, gradient, damping, pi_damping):
    """Return ``(G + d_G I)^-1 W (A + d_A I)^-1`` per group, with explicit inverses."""
    out = []
    for a_j, g_j, w_j in zip(factor_a, factor_g, gradient):
        pi = 1.0
        if pi_damping:
            pi = math.sqrt((torch.trace(a_j) / a_j.shape[0]) / (torch.trace(g_j) / g_j.shape[0]))
        damping_a, damping_g = pi * math.sqrt(damping), math.sqrt(damping) / pi
        eye_a = torch.eye(a_j.shape[0], dtype=torch.float64)
        eye_g = torch.eye(g_j.shape[0], dtype=torch.float64)
        out.append(torch.linalg.inv(g_j + damping_g * eye_g) @ w_j
                   @ torch.linalg.inv(a_j + damping_a * eye_a))
    return torch.stack(out)


@pytest.mark.parametrize("pi_damping", [False, True])
def test_kfac_matches_dense_inverse(pi_damping):
    model = small_net()
    record = Record(model, LAYER_NAMES)
    lr, damping = 0.5, 0.01
    optimizer = KFAC(model, lr=lr, momentum=0.0, damping=damping, pi_damping=pi_damping,
                     kl_clip=None, factor_decay=0.0, statistics_interval=1, inverse_interval=1)
    assert [h.name for h in optimizer.layers] == LAYER_NAMES

    # Two steps: with no running average, the second uses the second batch's factors only.
    for seed in range(2):
        gradients, before = run_step(model, optimizer, seed)
        for name in LAYER_NAMES:
            module = model.get_submodule(name)
            factor_a, factor_g = dense_factors(module, record.inputs[name],
                                               record.output_grads[name])
            expected = -lr * dense_kfac_step(factor_a, factor_g, gradients[name], damping,
                                             pi_damping)
            actual = step_matrix(module, name, before)
            torch.testing.assert_close(actual, expected, rtol=1e-7, atol=1e-12, msg=name)


def test_kfac_running_average_of_factors():
    model = small_net()
    record = Record(model, LAYER_NAMES)
    optimizer = KFAC(model, lr=0.1, factor_decay=0.75, statistics_interval=1, inverse_interval=1)
    expected = {}
    for seed in range(3):
        run_step(model, optimizer, seed)
        for name in LAYER_NAMES:
            module = model.get_submodule(name)
            batch = dense_factors(module, record.inputs[name], record.output_grads[name])
            if seed == 0:
                expected[name] = batch
            else:
                expected[name] = tuple(0.75 * old + 0.25 * new
                                       for old, new in zip(expected[name], batch))
    for name in LAYER_NAMES:
        state = optimizer.layer_state[name]
        torch.testing.assert_close(state["A"], expected[name][0], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(state["G"], expected[name][1], rtol=1e-10, atol=1e-14)


def test_kfac_summed_loss_factor():
    # batch_averaged=False: the output gradients already belong to each sample's own loss.
    model = small_net()
    record = Record(model, ["head"])
    optimizer = KFAC(model, lr=0.1, batch_averaged=False, factor_decay=0.0,
                     statistics_interval=1, inverse_interval=1)
    inputs, targets = small_batch(0)
    optimizer.zero_grad()
    F.cross_entropy(model(inputs), targets, reduction="sum").backward()
    optimizer.step()
    z = record.output_grads["head"]  # (M, O)
    torch.testing.assert_close(optimizer.layer_state["head"]["G"][0], z.T @ z / z.shape[0])


def test_kfac_kl_clip_scales_all_layers():
    lr, damping, kl_clip = 0.5, 0.01, 1e-6
    model = small_net()
    record = Record(model, LAYER_NAMES)
    optimizer = KFAC(model, lr=lr, momentum=0.0, damping=damping, kl_clip=kl_clip,
                     factor_decay=0.0, statistics_interval=1, inverse_interval=1)
    gradients, before = run_step(model, optimizer, 0)

    preconditioned = {}
    for name in LAYER_NAMES:
        module = model.get_submodule(name)
        factor_a, factor_g = dense_factors(module, record.inputs[name], record.output_grads[name])
        preconditioned[name] = dense_kfac_step(factor_a, factor_g, gradients[name], damping, True)
    total = sum(lr ** 2 * (preconditioned[n] * gradients[n]).sum() for n in LAYER_NAMES)
    scale = min(1.0, math.sqrt(kl_clip / total))
    assert scale < 1.0
    for name in LAYER_NAMES:
        actual = step_matrix(model.get_submodule(name), name, before)
        torch.testing.assert_close(actual, -lr * scale * preconditioned[name],
                                   rtol=1e-7, atol=1e-14, msg=name)


def test_kfac_damping_from_param_group():
    # Schedulers change damping through the parameter group; the next inverse uses it.
    model = small_net()
    optimizer = KFAC(model, damping=0.01, statistics_interval=1, inverse_interval=1)
    optimizer.param_groups[0]["damping"] = 0.5
    record = Record(model, ["head"])
    gradients, before = run_step(model, optimizer, 0)
    module = model.head
    factor_a, factor_g = dense_factors(module, record.inputs["head"], record.output_grads["head"])
    direction = dense_kfac_step(factor_a, factor_g, gradients["head"], 0.5, True)
    total_other = step_matrix(module, "head", before)
    # Momentum 0.9 starts from zero, so the first step is -lr * nu * P; compare directions.
    cosine = F.cosine_similarity(total_other.flatten(), -direction.flatten(), dim=0)
    assert cosine > 1 - 1e-9
