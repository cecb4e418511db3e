"""What KFAC, Shampoo and Eva share: the SGD update, plain gradients outside the preconditioned
layers, argument checks, step schedules, checkpoints, autocast and failed decompositions.

The helpers at the top build dense float64 references for the per-optimizer test files."""

import io

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from baselines import KFAC, Eva, Shampoo

OPTIMIZERS = [KFAC, Shampoo, Eva]

# Settings under which every step updates statistics and inverses.
EVERY_STEP = {
    KFAC: dict(statistics_interval=1, inverse_interval=1, factor_decay=0.0, kl_clip=None),
    Shampoo: dict(statistics_interval=1, inverse_interval=1, start_preconditioning_step=0),
    Eva: dict(factor_decay=0.0, kl_clip=None),
}


# --------------------------------------------------------------------------------------------
# Reference helpers


class Record:
    """Module hooks, written here rather than taken from fngd.layers, that keep each named
    layer's input and output gradient from the last forward and backward pass.

    The output gradient comes from a full backward hook. It receives the gradient of the
    layer output as it is after every forward hook, including those of the optimizers that
    replace the output.
    """

    def __init__(self, model: nn.Module, names):
        self.inputs, self.output_grads = {}, {}
        modules = dict(model.named_modules())
        self.handles = []
        for name in names:
            self.handles.append(modules[name].register_forward_hook(self._keep_input(name)))
            self.handles.append(modules[name].register_full_backward_hook(self._keep_grad(name)))

    def _keep_input(self, name):
        def hook(module, inputs, output):
            self.inputs[name] = inputs[0].detach().clone()
        return hook

    def _keep_grad(self, name):
        def hook(module, grad_input, grad_output):
            self.output_grads[name] = grad_output[0].detach().clone()
        return hook


def layer_rows(module: nn.Module, a: torch.Tensor, g: torch.Tensor):
    """Return the layer's inputs ``(M, G, S, D_in)`` (ones column for a bias) and output
    gradients ``(M, G, S, D_out)`` in float64, from patches for a Conv2d."""
    a, g = a.double(), g.double()
    samples = a.shape[0]
    if isinstance(module, nn.Linear):
        x = a.reshape(samples, 1, -1, a.shape[-1])
        z = g.reshape(samples, 1, -1, g.shape[-1])
    else:
        groups = module.groups
        patches = F.unfold(a, module.kernel_size, dilation=module.dilation,
                           padding=module.padding, stride=module.stride)  # (M, C*k*k, S)
        positions = patches.shape[-1]
        x = patches.reshape(samples, groups, -1, positions).transpose(2, 3)
        z = g.reshape(samples, groups, g.shape[1] // groups, positions).transpose(2, 3)
    if module.bias is not None:
        x = torch.cat([x, torch.ones(x.shape[:-1] + (1,), dtype=x.dtype)], dim=-1)
    return x, z


def as_matrix(module: nn.Module, weight: torch.Tensor, bias) -> torch.Tensor:
    """Return a weight-shaped and a bias-shaped tensor as ``(G, D_out, D_in)`` in float64."""
    groups = getattr(module, "groups", 1)
    matrix = weight.double().reshape(groups, weight.shape[0] // groups, -1)
    if bias is not None:
        matrix = torch.cat([matrix, bias.double().reshape(groups, -1, 1)], dim=2)
    return matrix


def grad_matrix(module: nn.Module) -> torch.Tensor:
    return as_matrix(module, module.weight.grad, None if module.bias is None else module.bias.grad)


def snapshot(model: nn.Module) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def step_matrix(module: nn.Module, name: str, before: dict) -> torch.Tensor:
    """Return the change of a layer's parameters in the last step as a (G, D_out, D_in) matrix."""
    weight_change = module.weight.detach() - before[name + ".weight"]
    bias_change = None
    if module.bias is not None:
        bias_change = module.bias.detach() - before[name + ".bias"]
    return as_matrix(module, weight_change, bias_change)


def train_step(model, optimizer, inputs, targets):
    optimizer.zero_grad()
    loss = F.cross_entropy(model(inputs), targets)
    loss.backward()
    optimizer.step()
    return loss.detach()


def run_step(model, optimizer, seed):
    """Take one step on ``small_batch(seed)``.

    Return the layer gradients as matrices and the parameters before the step.
    """
    inputs, targets = small_batch(seed)
    optimizer.zero_grad()
    F.cross_entropy(model(inputs), targets).backward()
    gradients = {name: grad_matrix(model.get_submodule(name)) for name in LAYER_NAMES}
    before = snapshot(model)
    optimizer.step()
    return gradients, before


class SmallNet(nn.Module):
    """Conv2d (with bias), grouped and dilated Conv2d (no bias), Linear on 3-D input, Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.grouped = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2, bias=False)
        self.mix = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        x = torch.tanh(self.conv(x))
        x = torch.tanh(self.grouped(x))  # (M, 4, 3, 3)
        x = x.flatten(2).transpose(1, 2)  # (M, 9, 4): a sequence of 9 positions
        x = torch.tanh(self.mix(x)).mean(dim=1)
        return self.head(x)


LAYER_NAMES = ["conv", "grouped", "mix", "head"]


def small_batch(seed: int = 0, samples: int = 6):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, 2, 6, 6, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 3, (samples,), generator=generator)
    return inputs, targets


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return SmallNet().double()


class BatchNormNet(nn.Module):
    """Conv2d -> BatchNorm (train mode) -> in-place ReLU -> Linear, in float32."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.norm = nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = self.relu(self.norm(self.conv(x)))
        return self.head(x.mean(dim=(2, 3)))


# --------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
@pytest.mark.parametrize("nesterov", [False, True])
def test_no_layers_equals_sgd(optimizer_class, nesterov):
    # With every layer skipped, each baseline must be torch.optim.SGD.
    model_a, model_b = small_net(), small_net()
    optimizer = optimizer_class(model_a, lr=0.05, momentum=0.9, weight_decay=1e-3,
                                nesterov=nesterov, skip=["*"])
    reference = torch.optim.SGD(model_b.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3,
                                nesterov=nesterov)
    assert optimizer.layers == []
    for seed in range(3):
        inputs, targets = small_batch(seed)
        train_step(model_a, optimizer, inputs, targets)
        train_step(model_b, reference, inputs, targets)
    for p_a, p_b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(p_a, p_b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_batchnorm_gets_plain_gradient(optimizer_class):
    torch.manual_seed(0)
    model = BatchNormNet()
    optimizer = optimizer_class(model, lr=0.1, momentum=0.0, **EVERY_STEP[optimizer_class])
    assert [h.name for h in optimizer.layers] == ["conv", "head"]
    inputs, targets = torch.randn(8, 3, 5, 5), torch.randint(0, 4, (8,))

    optimizer.zero_grad()
    F.cross_entropy(model(inputs), targets).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    before = snapshot(model)
    optimizer.step()

    for name in ["norm.weight", "norm.bias"]:
        torch.testing.assert_close(model.get_parameter(name) - before[name], -0.1 * grads[name])
    conv_change = model.conv.weight - before["conv.weight"]
    assert torch.isfinite(conv_change).all()
    assert not torch.allclose(conv_change, -0.1 * grads["conv.weight"])
    # The optimizer reads .grad and leaves it as the backward pass wrote it.
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name]), name


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_save_load_continue(optimizer_class):
    settings = {
        KFAC: dict(statistics_interval=2, inverse_interval=3),
        Shampoo: dict(statistics_interval=2, inverse_interval=3, start_preconditioning_step=0),
        Eva: dict(),
    }[optimizer_class]
    batches = [small_batch(seed) for seed in range(7)]

    model = small_net()
    optimizer = optimizer_class(model, lr=0.05, weight_decay=1e-3, **settings)
    for inputs, targets in batches[:3]:
        train_step(model, optimizer, inputs, targets)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    for inputs, targets in batches[3:]:
        train_step(model, optimizer, inputs, targets)

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed_model = small_net()
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = optimizer_class(resumed_model, lr=0.05, weight_decay=1e-3, **settings)
    resumed.load_state_dict(checkpoint["optimizer"])
    for inputs, targets in batches[3:]:
        train_step(resumed_model, resumed, inputs, targets)

    for (name, p_a), p_b in zip(model.named_parameters(), resumed_model.parameters()):
        torch.testing.assert_close(p_a, p_b, rtol=0, atol=1e-12, msg=name)
    assert resumed.stats() == optimizer.stats()


@pytest.mark.parametrize("optimizer_class", [KFAC, Shampoo])
def test_statistics_and_inverse_intervals(optimizer_class):
    # T1 = 3 and T2 = 5 over steps 0..10: statistics at 0, 3, 6, 9 and inverses at 0, 5, 10.
    settings = dict(statistics_interval=3, inverse_interval=5)
    if optimizer_class is Shampoo:
        settings["start_preconditioning_step"] = 0
    statistic_key, inverse_key = {KFAC: ("A", "A_eigenvectors"),
                                  Shampoo: ("L", "L_root")}[optimizer_class]
    model = small_net()
    optimizer = optimizer_class(model, lr=0.05, **settings)
    layer_state = optimizer.layer_state["conv"]

    statistic_steps, inverse_steps = [], []
    previous_statistic = previous_inverse = None
    for step in range(11):
        inputs, targets = small_batch(step)
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        if optimizer_class is KFAC:
            # The recorder works only on statistic steps.
            assert bool(optimizer._pending) == (step % 3 == 0)
        optimizer.step()

        statistic, inverse = layer_state[statistic_key], layer_state[inverse_key]
        if previous_statistic is None or not torch.equal(statistic, previous_statistic):
            statistic_steps.append(step)
        if previous_inverse is None or not torch.equal(inverse, previous_inverse):
            inverse_steps.append(step)
        previous_statistic, previous_inverse = statistic.clone(), inverse.clone()

    assert statistic_steps == [0, 3, 6, 9]
    assert inverse_steps == [0, 5, 10]
    stats = optimizer.stats()
    assert stats["statistics_updates"] == 4
    assert stats["inverse_updates"] == 3
    assert stats["decomposition_failures"] == 0


def test_shampoo_waits_for_first_roots():
    # Without start_preconditioning_step, the first roots come at step inverse_interval.
    model = small_net()
    optimizer = Shampoo(model, lr=0.05, statistics_interval=2, inverse_interval=4)
    for step in range(5):
        inputs, targets = small_batch(step)
        train_step(model, optimizer, inputs, targets)
        assert ("L_root" in optimizer.layer_state["conv"]) == (step >= 4)
    assert optimizer.stats()["statistics_updates"] == 3  # steps 0, 2, 4


@pytest.mark.parametrize("optimizer_class", [KFAC, Shampoo])
def test_failed_decomposition_keeps_previous(optimizer_class, caplog):
    statistic_key, inverse_key = {KFAC: ("A", "A_eigenvectors"),
                                  Shampoo: ("L", "L_root")}[optimizer_class]
    model = small_net()
    optimizer = optimizer_class(model, lr=0.05, **EVERY_STEP[optimizer_class])
    inputs, targets = small_batch(0)
    train_step(model, optimizer, inputs, targets)
    previous_inverse = optimizer.layer_state["conv"][inverse_key].clone()

    # Poison the statistic after it is updated and before it is decomposed.
    state = optimizer.layer_state["conv"]
    update = "_update_factors" if optimizer_class is KFAC else "_update_statistics"
    original = getattr(optimizer, update)

    def poisoned(*args):
        original(*args)
        state[statistic_key].fill_(float("nan"))

    setattr(optimizer, update, poisoned)
    inputs, targets = small_batch(1)
    train_step(model, optimizer, inputs, targets)

    assert optimizer.stats()["decomposition_failures"] == 1
    assert torch.equal(optimizer.layer_state["conv"][inverse_key], previous_inverse)
    assert "failed" in caplog.text
    for p in model.parameters():
        assert torch.isfinite(p).all()


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_non_finite_gradient_skips_step(optimizer_class):
    model = small_net()
    optimizer = optimizer_class(model, lr=0.05, **EVERY_STEP[optimizer_class])
    inputs, targets = small_batch(0)
    inputs[0, 0, 0, 0] = float("nan")
    before = snapshot(model)
    train_step(model, optimizer, inputs, targets)
    assert optimizer.stats()["skipped_steps"] == 1
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_autocast_keeps_float32_statistics(optimizer_class):
    torch.manual_seed(0)
    model = BatchNormNet()
    optimizer = optimizer_class(model, lr=0.05, **EVERY_STEP[optimizer_class])
    inputs, targets = torch.randn(8, 3, 5, 5), torch.randint(0, 4, (8,))
    for _ in range(2):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
    for name, tensors in optimizer.layer_state.items():
        assert tensors, name
        for key, value in tensors.items():
            assert value.dtype == torch.float32, (name, key)
            assert torch.isfinite(value).all(), (name, key)
    for p in model.parameters():
        assert p.dtype == torch.float32
        assert torch.isfinite(p).all()


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_loss_falls_on_small_problem(optimizer_class):
    settings = {
        KFAC: dict(statistics_interval=2, inverse_interval=4),
        Shampoo: dict(statistics_interval=2, inverse_interval=4, start_preconditioning_step=0),
        Eva: dict(),
    }[optimizer_class]
    torch.manual_seed(0)
    model = BatchNormNet()
    optimizer = optimizer_class(model, lr=0.05, momentum=0.9, **settings)
    inputs, targets = torch.randn(32, 3, 5, 5), torch.randint(0, 4, (32,))
    losses = [float(train_step(model, optimizer, inputs, targets)) for _ in range(30)]
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
@pytest.mark.parametrize("argument, value", [
    ("lr", -0.1), ("momentum", 1.0), ("weight_decay", -1e-4), ("lr", float("nan")),
])
def test_invalid_sgd_arguments(optimizer_class, argument, value):
    with pytest.raises(ValueError, match=argument):
        optimizer_class(small_net(), **{argument: value})


@pytest.mark.parametrize("optimizer_class, argument, value", [
    (KFAC, "damping", 0.0), (KFAC, "factor_decay", 1.0), (KFAC, "kl_clip", -1.0),
    (KFAC, "statistics_interval", 0), (KFAC, "inverse_interval", 2.5),
    (Eva, "damping", -0.03), (Eva, "factor_decay", -0.1),
    (Shampoo, "epsilon", 0.0), (Shampoo, "beta2", 0.0), (Shampoo, "beta2", 1.5),
    (Shampoo, "block_size", 0), (Shampoo, "grafting", "adagrad"),
    (Shampoo, "start_preconditioning_step", -1),
])
def test_invalid_preconditioner_arguments(optimizer_class, argument, value):
    with pytest.raises(ValueError, match=argument):
        optimizer_class(small_net(), **{argument: value})


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_model_argument_checked(optimizer_class):
    with pytest.raises(TypeError, match="nn.Module"):
        optimizer_class(list(small_net().parameters()))
    with pytest.raises(ValueError, match="nesterov"):
        optimizer_class(small_net(), momentum=0.0, nesterov=True)


@pytest.mark.parametrize("optimizer_class", [KFAC, Eva])
def test_remove_detaches_hooks(optimizer_class):
    model = small_net()
    optimizer = optimizer_class(model, lr=0.05)
    optimizer.remove()
    for module in model.modules():
        assert not module._forward_hooks
