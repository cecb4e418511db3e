"""FNGD against dense float64 references: the Gram matrix, the preconditioned gradient, SGD."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fngd import FNGD
from fngd.layers import Recorder, find_layers
from tests.fngd_reference import batches, conv_net, dense_damped_step, per_sample_grads, train



@pytest.fixture(autouse=True)
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


class Head(nn.Module):
    """A layer under test followed by a fixed non-linear read-out, so gradients differ per sample."""

    def __init__(self, layer: nn.Module, features: int, classes: int = 3, inplace_relu: bool = True):
        super().__init__()
        self.layer = layer
        self.act = nn.ReLU(inplace=inplace_relu)
        self.readout = nn.Linear(features, classes)
        self.readout.weight.requires_grad_(False)
        self.readout.bias.requires_grad_(False)

    def forward(self, x):
        out = self.act(self.layer(x))
        return self.readout(out.reshape(out.shape[0], -1) if out.dim() == 4 else out.mean(dim=1)
                            if out.dim() == 3 else out)


def make_case(kind: str):
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = nn.Linear(5, 4), torch.randn(6, 5)
        features = 4
    elif kind == "linear_no_bias":
        layer, x = nn.Linear(5, 4, bias=False), torch.randn(6, 5)
        features = 4
    elif kind == "linear_3d":
        layer, x = nn.Linear(5, 4), torch.randn(6, 7, 5)
        features = 4
    elif kind == "conv":
        layer, x = nn.Conv2d(2, 3, 3, padding=1), torch.randn(5, 2, 5, 5)
        features = 3 * 5 * 5
    elif kind == "conv_grouped":
        layer = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=False)
        x = torch.randn(5, 4, 7, 7)
        features = 6 * 4 * 4
    elif kind == "conv_strided":
        layer, x = nn.Conv2d(3, 4, 2, stride=2), torch.randn(6, 3, 6, 6)
        features = 4 * 3 * 3
    else:
        raise KeyError(kind)
    model = Head(layer, features)
    targets = torch.randint(0, 3, (x.shape[0],))
    return model, x, targets


def layer_param_names(model):
    return [name for name, p in model.named_parameters() if name.startswith("layer.")]


def sample_loss(out, y):
    return F.cross_entropy(out, y, reduction="sum")


CASES = ["linear", "linear_no_bias", "linear_3d", "conv", "conv_grouped", "conv_strided"]


@pytest.mark.parametrize("kind", CASES)
@pytest.mark.parametrize("method", ["pairs", "per_sample"])
def test_gram_matches_per_sample_gradients(kind, method):
    model, x, y = make_case(kind)
    helper = find_layers(model)[0]
    captured = {}
    recorder = Recorder([helper], lambda h, a, g: captured.update(a=a, g=g))
    F.cross_entropy(model(x), y, reduction="sum").backward()
    recorder.remove()

    u = per_sample_grads(model, sample_loss, x, y, layer_param_names(model))
    expected = u @ u.t()
    gram = helper.gram(captured["a"], captured["g"], method=method)
    torch.testing.assert_close(gram, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", CASES)
@pytest.mark.parametrize("alpha", [1e-3, 1e-1, 10.0])
@pytest.mark.parametrize("scale", ["none", "damping"])
def test_preconditioned_gradient_matches_dense_solve(kind, alpha, scale):
    model, x, y = make_case(kind)
    names = layer_param_names(model)
    u = per_sample_grads(model, sample_loss, x, y, names)
    direction, damping = dense_damped_step(u, alpha)
    # scale="none" leaves 1/damping to the learning rate.
    expected = direction if scale == "damping" else direction * damping

    optimizer = FNGD(model, lr=0.1, alpha=alpha, mode="ngd", scale=scale)
    F.cross_entropy(model(x), y).backward()
    params = dict(model.named_parameters())
    got = torch.cat([params[name].grad.reshape(-1) for name in names])

    error = (got - expected).norm() / expected.norm()
    assert error < 1e-6, f"relative error {error:.2e}"
    assert optimizer.stats()["fallbacks"] == 0


def test_steps_match_dense_solve_over_an_epoch():
    # Two epochs of NGD steps, each step compared with the dense solve at the same weights.
    model, x, y = make_case("conv_grouped")
    names = layer_param_names(model)
    optimizer = FNGD(model, lr=0.05, momentum=0.0, alpha=1e-2, mode="ngd")
    for _ in range(3):
        before = torch.cat([dict(model.named_parameters())[n].detach().reshape(-1) for n in names])
        direction, damping = dense_damped_step(per_sample_grads(model, sample_loss, x, y, names), 1e-2)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        after = torch.cat([dict(model.named_parameters())[n].detach().reshape(-1) for n in names])
        torch.testing.assert_close(after, before - 0.05 * damping * direction, rtol=1e-9, atol=1e-12)


def test_huge_damping_equals_sgd_momentum():
    # With alpha -> infinity every coefficient is 1 (c = 1/M): FNGD is SGD with momentum.
    data = batches(4)
    model, reference = conv_net(), conv_net()
    train(model, FNGD(model, lr=0.1, momentum=0.9, weight_decay=5e-4, alpha=1e30, mode="ngd"), data)
    train(reference, torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9,
                                     weight_decay=5e-4), data)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_reused_unit_coefficients_equal_sgd_momentum():
    # After the first epoch, overwrite the stored coefficients with ones through the state
    # dict: the reuse path must then take exactly SGD-m's steps.
    data = batches(3)
    model = conv_net()
    optimizer = FNGD(model, lr=0.1, momentum=0.9, weight_decay=5e-4, alpha=1e-3,
                     steps_per_epoch=len(data))
    train(model, optimizer, data)

    state = optimizer.state_dict()
    for store in state["fngd"]["coefficients"].values():
        for position, (v, damping) in store.items():
            store[position] = (torch.ones_like(v), damping)
    optimizer.load_state_dict(state)

    reference = conv_net()
    reference.load_state_dict(model.state_dict())
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for p, q in zip(model.parameters(), reference.parameters()):
        sgd.state[q]["momentum_buffer"] = optimizer.state[p]["momentum_buffer"].clone()

    train(model, optimizer, data)
    train(reference, sgd, data)
    assert optimizer.stats()["reuse_steps"] == len(data)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_reuse_applies_first_epoch_coefficients():
    # In epoch 2 the gradient of a preconditioned layer is U v / M with the v stored at the
    # same step of epoch 1, applied to the new batch's per-sample gradients.
    model, x, y = make_case("conv")
    names = layer_param_names(model)
    first, second = (x[:3], y[:3]), (x[2:5], y[2:5])
    optimizer = FNGD(model, lr=0.0, momentum=0.0, alpha=1e-2, steps_per_epoch=1)
    F.cross_entropy(model(first[0]), first[1]).backward()
    optimizer.step()
    v, _ = optimizer.state_dict()["fngd"]["coefficients"]["layer"][0]

    optimizer.zero_grad()
    F.cross_entropy(model(second[0]), second[1]).backward()
    u = per_sample_grads(model, sample_loss, second[0], second[1], names)
    expected = (v[:, None] * u).mean(dim=0)
    params = dict(model.named_parameters())
    got = torch.cat([params[name].grad.reshape(-1) for name in names])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert optimizer.stats()["layer_reuses"] == 1


def test_share_by_sample_follows_dataset_index():
    model, x, y = make_case("linear_3d")
    names = layer_param_names(model)
    optimizer = FNGD(model, lr=0.0, momentum=0.0, alpha=1e-2, share_by="sample", steps_per_epoch=2)
    order = [torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])]
    for indices in order:
        optimizer.zero_grad()
        optimizer.set_sample_indices(indices)
        F.cross_entropy(model(x[indices]), y[indices]).backward()
        optimizer.step()
    stored = optimizer.state_dict()["fngd"]["coefficients"]["layer"]["v"]

    shuffled = torch.tensor([5, 0, 3])
    optimizer.zero_grad()
    optimizer.set_sample_indices(shuffled)
    F.cross_entropy(model(x[shuffled]), y[shuffled]).backward()
    u = per_sample_grads(model, sample_loss, x[shuffled], y[shuffled], names)
    expected = (stored[shuffled][:, None] * u).mean(dim=0)
    params = dict(model.named_parameters())
    got = torch.cat([params[name].grad.reshape(-1) for name in names])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_upstream_gradients_are_unchanged():
    # The coefficients reweight a layer's own parameter gradient only: gradients that flow to
    # earlier layers (here BatchNorm, before the preconditioned convolution) stay plain.
    data = batches(1)
    model, reference = conv_net(), conv_net()
    FNGD(model, alpha=1e-3, mode="ngd", skip=["0"])
    for net in (model, reference):
        F.cross_entropy(net(data[0][0]), data[0][1]).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if name.startswith(("0.", "1.")):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(model[3].weight.grad, reference[3].weight.grad)
