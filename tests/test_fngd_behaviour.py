"""FNGD phases, state, numerical fallbacks and awkward models (the hard cases of the design notes)."""

import copy
import io
import logging
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fngd.layers
from fngd import FNGD
from fngd.layers import find_layers, solve_coefficients
from tests.fngd_reference import batches, conv_net, dense_damped_step, per_sample_grads, train


class GramCounter:
    """Count Gram matrices, solves and unfolds while FNGD trains."""

    def __init__(self, monkeypatch):
        self.grams = 0
        self.solves = 0
        self.unfolds = 0
        original_gram = fngd.layers.LayerHelper.gram
        original_solve = fngd.optimizer.solve_coefficients
        original_unfold = fngd.layers.F.unfold

        def gram(helper, *args, **kwargs):
            self.grams += 1
            return original_gram(helper, *args, **kwargs)

        def solve(*args, **kwargs):
            self.solves += 1
            return original_solve(*args, **kwargs)

        def unfold(*args, **kwargs):
            self.unfolds += 1
            return original_unfold(*args, **kwargs)

        monkeypatch.setattr(fngd.layers.LayerHelper, "gram", gram)
        monkeypatch.setattr(fngd.optimizer, "solve_coefficients", solve)
        monkeypatch.setattr(fngd.layers.F, "unfold", unfold)


def test_fngd_solves_only_in_first_epoch(monkeypatch):
    counter = GramCounter(monkeypatch)
    data = batches(3)
    model = conv_net()
    optimizer = FNGD(model, steps_per_epoch=len(data))
    train(model, optimizer, data)
    assert counter.grams == counter.solves == 3 * 3  # three layers, three steps

    for _ in range(2):
        train(model, optimizer, data)
    assert counter.grams == 9
    assert counter.solves == 9
    assert counter.unfolds == 0
    stats = optimizer.stats()
    assert stats["solve_steps"] == 3
    assert stats["reuse_steps"] == 6
    assert optimizer.epoch == 3


def test_ngd_solves_every_step(monkeypatch):
    counter = GramCounter(monkeypatch)
    data = batches(3)
    model = conv_net()
    optimizer = FNGD(model, mode="ngd", steps_per_epoch=len(data))
    for _ in range(2):
        train(model, optimizer, data)
    assert counter.solves == 2 * 3 * 3
    assert optimizer.stats()["solve_steps"] == 6
    assert optimizer.stats()["reuse_steps"] == 0


def test_refresh_every_recomputes_coefficients(monkeypatch):
    counter = GramCounter(monkeypatch)
    data = batches(2)
    model = conv_net()
    optimizer = FNGD(model, refresh_every=2, steps_per_epoch=len(data))
    solves_per_epoch = []
    for _ in range(5):
        before = counter.solves
        train(model, optimizer, data)
        solves_per_epoch.append(counter.solves - before)
    assert solves_per_epoch == [6, 0, 6, 0, 6]


def test_next_epoch_without_steps_per_epoch():
    data = batches(2)
    model = conv_net()
    optimizer = FNGD(model)
    train(model, optimizer, data)
    optimizer.next_epoch()
    train(model, optimizer, data)
    assert optimizer.stats()["reuse_steps"] == 2
    with pytest.raises(RuntimeError, match="steps_per_epoch"):
        FNGD(conv_net(), steps_per_epoch=2).next_epoch()


def test_save_load_continue_is_identical():
    data = batches(4)
    model = conv_net()
    optimizer = FNGD(model, weight_decay=5e-4, steps_per_epoch=len(data))
    train(model, optimizer, data)
    train(model, optimizer, data[:2])
    # Round trip through torch.save, as a checkpoint does (state_dict() returns live tensors).
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)

    train(model, optimizer, data[2:])
    train(model, optimizer, data)

    resumed = conv_net(seed=7)
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = FNGD(resumed, weight_decay=5e-4, steps_per_epoch=len(data))
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    train(resumed, resumed_optimizer, data[2:])
    train(resumed, resumed_optimizer, data)

    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert resumed_optimizer.stats() == optimizer.stats()


def test_load_rejects_other_share_by():
    model = conv_net()
    state = FNGD(model).state_dict()
    with pytest.raises(ValueError, match="share_by"):
        FNGD(conv_net(), share_by="sample").load_state_dict(state)


@pytest.mark.parametrize("argument, value", [
    ("lr", -0.1), ("alpha", 0.0), ("alpha", float("nan")), ("momentum", -1.0),
    ("mode", "kfac"), ("share_by", "batch"), ("scale", "lambda"), ("refresh_every", -1),
    ("steps_per_epoch", 0), ("loss_reduction", "none")])
def test_invalid_arguments_name_the_value(argument, value):
    with pytest.raises(ValueError, match=argument):
        FNGD(conv_net(), **{argument: value})


def test_tiny_damping_stays_finite():
    # Hard case 1: alpha = 1e-15 in float32.
    data = batches(3)
    model = conv_net()
    optimizer = FNGD(model, alpha=1e-15, mode="ngd")
    train(model, optimizer, data)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_repeated_sample_gives_finite_exact_step():
    # Hard case 2: one sample repeated makes K rank-deficient; the damped system is still
    # positive definite and the result matches the dense solve.
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        x = torch.randn(5, 4)
        x[3] = x[1]
        y = torch.tensor([0, 1, 0, 1, 1])
        optimizer = FNGD(model, alpha=1e-4, mode="ngd", skip=["2"])
        F.cross_entropy(model(x), y).backward()
        u = per_sample_grads(model, lambda out, t: F.cross_entropy(out, t, reduction="sum"),
                             x, y, ["0.weight", "0.bias"])
        direction, damping = dense_damped_step(u, 1e-4)
        got = torch.cat([model[0].weight.grad.reshape(-1), model[0].bias.grad])
        torch.testing.assert_close(got, damping * direction, rtol=1e-6, atol=1e-10)
        assert optimizer.stats()["fallbacks"] == 0
    finally:
        torch.set_default_dtype(torch.float32)


def test_non_finite_gram_falls_back_to_sgd_direction(monkeypatch, caplog):
    # Hard case 2: a Gram matrix holding NaN gives v = 1 for that layer, counted and logged.
    data = batches(1)
    model, reference = conv_net(), conv_net()
    original = fngd.layers.LayerHelper.gram

    def poisoned(helper, a, g, method="auto"):
        gram = original(helper, a, g, method)
        gram[0, 1] = float("nan")
        return gram

    monkeypatch.setattr(fngd.layers.LayerHelper, "gram", poisoned)
    optimizer = FNGD(model, momentum=0.0, mode="ngd")
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING, logger="fngd.optimizer"):
        train(model, optimizer, data)
    train(reference, sgd, data)
    assert optimizer.stats()["fallbacks"] == 3
    assert "fell back" in caplog.text
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)


def test_nan_batch_skips_step(caplog):
    data = batches(2)
    model = conv_net()
    optimizer = FNGD(model, mode="ngd")
    train(model, optimizer, data[:1])
    before = [p.detach().clone() for p in model.parameters()]
    bad = data[1][0].clone()
    bad[2, 0, 3, 3] = float("nan")
    with caplog.at_level(logging.WARNING, logger="fngd.optimizer"):
        train(model, optimizer, [(bad, data[1][1])])
    assert optimizer.stats()["skipped_steps"] == 1
    assert "skipped step" in caplog.text
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


def test_solve_bound_rejects_blown_up_solution():
    # Exactly, ||v|| <= sqrt(M). A solve that breaks the bound is treated as failed.
    gram = torch.diag(torch.tensor([1.0, 1e-30, 1e-30]))
    v, damping, ok = solve_coefficients(gram, 1e-3)
    assert bool(ok)
    assert torch.linalg.vector_norm(v) <= math.sqrt(3) + 1e-9
    v, damping, ok = solve_coefficients(torch.zeros(3, 3), 1e-3)
    assert not bool(ok)
    assert torch.equal(v, torch.ones(3, dtype=torch.float64))


class TiedModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(6, 4)
        self.hidden = nn.Linear(4, 4)
        self.out = nn.Linear(4, 6, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens):
        return self.out(torch.tanh(self.hidden(self.embed(tokens))))


def test_tied_weights_get_every_use(caplog):
    # Hard case 3: the output layer shares the embedding matrix. FNGD leaves the shared matrix
    # on the plain gradient (logged), whose value must include both uses, and still
    # preconditions the untied layer.
    model = TiedModel()
    tokens = torch.tensor([0, 3, 5, 2, 3])
    targets = torch.tensor([1, 3, 0, 2, 4])
    with caplog.at_level(logging.INFO, logger="fngd.layers"):
        optimizer = FNGD(model, alpha=1e-2, mode="ngd")
    assert [h.name for h in optimizer.layers] == ["hidden"]
    assert "tied weights" in caplog.text

    F.cross_entropy(model(tokens), targets).backward()
    u = per_sample_grads(model, lambda out, t: F.cross_entropy(out, t, reduction="sum"),
                         tokens, targets, ["embed.weight"])
    torch.testing.assert_close(model.embed.weight.grad.reshape(-1), u.mean(dim=0))

    u_hidden = per_sample_grads(model, lambda out, t: F.cross_entropy(out, t, reduction="sum"),
                                tokens, targets, ["hidden.weight", "hidden.bias"])
    direction, damping = dense_damped_step(u_hidden, 1e-2)
    got = torch.cat([model.hidden.weight.grad.reshape(-1), model.hidden.bias.grad])
    torch.testing.assert_close(got, (damping * direction).float(), rtol=1e-4, atol=1e-6)


def test_unit_coefficients_through_batchnorm_give_plain_gradients():
    # Hard cases 5, 6 and 11: Conv -> BatchNorm (train mode) -> in-place ReLU with every
    # coefficient 1 leaves exactly the plain gradients, BatchNorm's included.
    data = batches(1)
    model, reference = conv_net(), conv_net()
    FNGD(model, alpha=1e30, mode="ngd")
    for net in (model, reference):
        net.train()
        F.cross_entropy(net(data[0][0]), data[0][1]).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
    assert model[1].weight.grad is not None and model[1].weight.grad.abs().sum() > 0


def test_wide_linear_on_sequences_keeps_gram_small(monkeypatch):
    # Hard case 7: Linear(3072, 768) on (8, 128, 3072); K must be 8 x 8 and come from a method
    # whose memory is bounded, not from flattening positions into samples.
    torch.manual_seed(0)
    layer = nn.Linear(3072, 768)
    model = nn.Sequential(layer, nn.ReLU())
    shapes = []
    original = fngd.optimizer.solve_coefficients

    def record(gram, alpha):
        shapes.append(tuple(gram.shape))
        return original(gram, alpha)

    monkeypatch.setattr(fngd.optimizer, "solve_coefficients", record)
    optimizer = FNGD(model, mode="ngd")
    x = torch.randn(8, 128, 3072)
    model(x).square().mean().backward()
    optimizer.step()
    assert shapes == [(8, 8)]
    helper = optimizer.layers[0]
    m, groups, positions, d_in, d_out = helper.matrix_shapes(x, torch.empty(8, 128, 768))
    method = fngd.layers.choose_gram_method((m, groups, positions, d_in, d_out))
    memory = 2 * (m * positions) ** 2 if method == "pairs" else m * d_out * d_in
    assert memory <= fngd.layers.GRAM_MEMORY_ELEMENTS


def test_bf16_autocast_solves_in_float32(monkeypatch):
    # Hard case 9: under bf16 autocast, K is built and solved in float32 or better.
    dtypes = []
    original = fngd.optimizer.solve_coefficients

    def record(gram, alpha):
        dtypes.append(gram.dtype)
        return original(gram, alpha)

    monkeypatch.setattr(fngd.optimizer, "solve_coefficients", record)
    data = batches(2)
    model = conv_net()
    optimizer = FNGD(model, mode="ngd")
    for xb, yb in data:
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        optimizer.step()
    assert dtypes and all(dtype in (torch.float32, torch.float64) for dtype in dtypes)
    assert optimizer.stats()["fallbacks"] == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("scale", ["none", "damping"])
def test_mean_and_sum_reduction_give_the_same_step(scale):
    # Hard case 10: a summed loss is M times a mean one. With scale="none" the step matches
    # once lr is divided by M (as for SGD); with scale="damping" and loss_reduction set, the
    # step is the paper's (lambda I + U U^T / M)^-1 g for both, with the same lr.
    # No BatchNorm: its plain gradient would need the lr adjustment that scale="damping" lacks.
    def net():
        torch.manual_seed(3)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True),
                             nn.Flatten(), nn.Linear(4 * 8 * 8, 5))

    data = batches(2)
    batch_size = data[0][0].shape[0]
    lr_sum = 0.1 / batch_size if scale == "none" else 0.1
    model_mean, model_sum = net(), net()
    train(model_mean, FNGD(model_mean, lr=0.1, mode="ngd", scale=scale, weight_decay=0.0,
                           loss_reduction="mean"), data, "mean")
    train(model_sum, FNGD(model_sum, lr=lr_sum, mode="ngd", scale=scale, weight_decay=0.0,
                          loss_reduction="sum"), data, "sum")
    for p, q in zip(model_mean.parameters(), model_sum.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_statistics_leave_plain_grad_of_other_parameters():
    # Hard case 11: FNGD changes the .grad of preconditioned layers only.
    data = batches(1)
    model, reference = conv_net(), conv_net()
    FNGD(model, alpha=1e-3, mode="ngd")
    for net in (model, reference):
        F.cross_entropy(net(data[0][0]), data[0][1]).backward()
    torch.testing.assert_close(model[1].weight.grad, reference[1].weight.grad)
    torch.testing.assert_close(model[1].bias.grad, reference[1].bias.grad)
    assert not torch.allclose(model[0].weight.grad, reference[0].weight.grad)


def test_backward_twice_before_step_is_an_error():
    data = batches(2)
    model = conv_net()
    optimizer = FNGD(model)
    F.cross_entropy(model(data[0][0]), data[0][1]).backward()
    with pytest.raises(RuntimeError, match="backward twice"):
        F.cross_entropy(model(data[1][0]), data[1][1]).backward()


def test_evaluation_forward_is_untouched():
    model = conv_net()
    optimizer = FNGD(model)
    x = batches(1)[0][0]
    with torch.no_grad():
        out = model.eval()(x)
    assert out.grad_fn is None
    assert optimizer.stats()["layer_solves"] == 0


def test_remove_restores_plain_training():
    data = batches(2)
    model, reference = conv_net(), conv_net()
    optimizer = FNGD(model, lr=0.1, momentum=0.0, alpha=1e-3, mode="ngd")
    optimizer.remove()
    train(model, optimizer, data)
    train(reference, torch.optim.SGD(reference.parameters(), lr=0.1), data)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_is_skipped_and_logged(batch_first, caplog):
    # Hard case 4: nn.MultiheadAttention calls its projections as functions. FNGD leaves them
    # on the plain gradient, logs that once, and preconditions the Linear layers around them.
    class AttentionModel(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.inp = nn.Linear(6, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
            self.head = nn.Linear(8, 3)

        def forward(self, x):  # x: (M, T, 6)
            h = self.inp(x)
            if not batch_first:
                h = h.transpose(0, 1)
            h, _ = self.attn(h, h, h, need_weights=False)
            if not batch_first:
                h = h.transpose(0, 1)
            return self.head(h.mean(dim=1))

    model, reference = AttentionModel(), AttentionModel()
    with caplog.at_level(logging.INFO, logger="fngd"):
        optimizer = FNGD(model, alpha=1e-2, mode="ngd")
    assert sorted(h.name for h in optimizer.layers) == ["head", "inp"]
    assert "attn" in caplog.text
    assert "MultiheadAttention" in caplog.text

    x, y = torch.randn(5, 4, 6), torch.tensor([0, 1, 2, 0, 1])
    for net in (model, reference):
        F.cross_entropy(net(x), y).backward()
    for name in ("attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight"):
        torch.testing.assert_close(dict(model.named_parameters())[name].grad,
                                   dict(reference.named_parameters())[name].grad)
    assert not torch.allclose(model.head.weight.grad, reference.head.weight.grad)
    optimizer.step()
    assert optimizer.stats()["layer_solves"] == 2


def test_deep_copied_model_trains_plainly():
    # An EMA or evaluation copy made with copy.deepcopy carries the hooks along. The copy must
    # run as a plain model, and the original must keep its preconditioning.
    data = batches(2)
    model, reference = conv_net(), conv_net()
    optimizer = FNGD(model, alpha=1e-3, mode="ngd")
    copied = copy.deepcopy(model)

    for net in (copied, reference):
        F.cross_entropy(net(data[0][0]), data[0][1]).backward()
    for p, q in zip(copied.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)

    train(model, optimizer, data)
    assert optimizer.stats()["layer_solves"] == 2 * 3
