"""Tests of the translation Transformer: layer layout, masks, loss and decoding."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.transformer import (BOS_ID, EOS_ID, PAD_ID, MultiHeadAttention, Transformer,
                                beam_search, causal_mask, greedy_decode, length_penalty,
                                padding_mask, sinusoidal_positions, target_mask)

SOURCE_VOCAB, TARGET_VOCAB = 19, 23


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # These models are tiny: on a shared 2-core machine extra intra-op threads only wait on
    # each other (measured: the copy task ran 25 times slower with 2 threads under load).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    options = dict(d_model=32, ffn_dim=48, heads=4, layers=2, dropout=0.0, max_len=40)
    options.update(overrides)
    return Transformer(SOURCE_VOCAB, TARGET_VOCAB, **options).eval()


def random_sentences(lengths, vocab_size, seed=0):
    """Return ``<bos> words <eos>`` id lists of the given word counts."""
    generator = torch.Generator().manual_seed(seed)
    return [[BOS_ID] + torch.randint(4, vocab_size, (n,), generator=generator).tolist() + [EOS_ID]
            for n in lengths]


def pad(sentences) -> torch.Tensor:
    width = max(len(s) for s in sentences)
    return torch.tensor([s + [PAD_ID] * (width - len(s)) for s in sentences])


def test_masks_match_hand_built():
    tokens = torch.tensor([[BOS_ID, 7, EOS_ID, PAD_ID], [BOS_ID, 5, 6, EOS_ID]])
    expected_padding = torch.tensor([[True, True, True, False], [True, True, True, True]])
    assert torch.equal(padding_mask(tokens)[:, 0, 0], expected_padding)

    expected_causal = torch.tensor([[j <= i for j in range(4)] for i in range(4)])
    assert torch.equal(causal_mask(4), expected_causal)

    combined = target_mask(tokens)
    assert combined.shape == (2, 1, 4, 4)
    assert torch.equal(combined[0, 0], expected_causal & expected_padding[0])
    assert torch.equal(combined[1, 0], expected_causal)


def test_sinusoidal_positions_formula():
    table = sinusoidal_positions(50, 16)
    for position, i in [(0, 0), (3, 2), (17, 5), (49, 7)]:
        angle = position / 10000 ** (2 * i / 16)
        assert table[position, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
        assert table[position, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_projections_are_linear_called_once():
    model = tiny_model()
    model.train()
    calls, batch_dims = {}, set()

    def count(name):
        def hook(module, inputs, output):
            calls[name] = calls.get(name, 0) + 1
            batch_dims.add(inputs[0].shape[0])
        return hook

    linear_names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            module.register_forward_hook(count(name))

    source = pad(random_sentences([5, 3, 7], SOURCE_VOCAB))
    target = pad(random_sentences([4, 6, 2], TARGET_VOCAB, seed=1))
    model(source, target).sum().backward()

    # 2 encoder layers x (4 attention + 2 FFN), 2 decoder layers x (8 attention + 2 FFN), and
    # the generator.
    assert len(linear_names) == 2 * 6 + 2 * 10 + 1
    assert calls == {name: 1 for name in linear_names}
    assert batch_dims == {3}
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())


def test_fngd_layer_walk_finds_all_projections():
    from fngd.layers import find_layers

    model = tiny_model()
    found = {helper.name for helper in find_layers(model)}
    linear_names = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert found == linear_names


def test_attention_matches_float64_reference():
    torch.manual_seed(3)
    attention = MultiHeadAttention(d_model=12, heads=3).double()
    query = torch.randn(2, 5, 12, dtype=torch.float64)
    memory = torch.randn(2, 4, 12, dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])[:, None, None, :]

    output = attention(query, memory, mask)

    q = attention.q_proj(query).view(2, 5, 3, 4).transpose(1, 2)
    k = attention.k_proj(memory).view(2, 4, 3, 4).transpose(1, 2)
    v = attention.v_proj(memory).view(2, 4, 3, 4).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / 2.0
    scores = scores.masked_fill(~mask, float("-inf"))
    expected = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 12)
    expected = attention.out_proj(expected)
    torch.testing.assert_close(output, expected)


def test_attention_matches_torch_multihead_attention():
    torch.manual_seed(4)
    ours = MultiHeadAttention(d_model=16, heads=4)
    reference = nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        reference.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight,
                                                  ours.v_proj.weight]))
        reference.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias,
                                                ours.v_proj.bias]))
        reference.out_proj.weight.copy_(ours.out_proj.weight)
        reference.out_proj.bias.copy_(ours.out_proj.bias)
    x = torch.randn(3, 6, 16)
    key_padding = torch.zeros(3, 6, dtype=torch.bool)
    key_padding[0, 4:] = True

    expected, _ = reference(x, x, x, key_padding_mask=key_padding)
    output = ours(x, x, (~key_padding)[:, None, None, :])
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


def test_attention_ignores_masked_keys():
    torch.manual_seed(5)
    attention = MultiHeadAttention(d_model=8, heads=2).eval()
    query = torch.randn(2, 3, 8)
    memory = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)[:, None, None, :]
    changed = memory.clone()
    changed[0, 2:] = torch.randn(3, 8) * 100
    changed[1, 4:] = torch.randn(1, 8) * 100

    torch.testing.assert_close(attention(query, changed, mask), attention(query, memory, mask))


@pytest.mark.parametrize("norm_first", [False, True])
def test_padding_does_not_change_real_positions(norm_first):
    model = tiny_model(norm_first=norm_first, positions="learned")
    sources = random_sentences([3, 9], SOURCE_VOCAB)
    targets = random_sentences([8, 2], TARGET_VOCAB, seed=1)
    batched = model(pad(sources), pad(targets))  # (2, T, V)

    for i in range(2):
        alone = model(pad([sources[i]]), pad([targets[i]]))[0]
        real = len(targets[i])
        torch.testing.assert_close(batched[i, :real], alone, atol=1e-5, rtol=1e-5)



def test_padded_source_slots_ignored():
    model = tiny_model()
    sources = random_sentences([3, 9], SOURCE_VOCAB)
    real = len(sources[0])
    source = pad(sources)
    memory, source_mask = model.encode(source)

    # Put a word id into the padded slots of sentence 0 but keep the original mask: the
    # memory at its real positions must not move.
    filled = source.clone()
    filled[0, real:] = 7
    x = model.source_embedding(filled)
    for layer in model.encoder_layers:
        x = layer(x, source_mask)
    torch.testing.assert_close(model.encoder_norm(x)[0, :real], memory[0, :real])

    # Without the mask those slots are attended to, so the check above can fail.
    unmasked, _ = model.encode(filled)
    assert not torch.allclose(unmasked[0, :real], memory[0, :real])


def test_decoder_is_causal():
    model = tiny_model()
    source = pad(random_sentences([6], SOURCE_VOCAB))
    target = pad(random_sentences([7], TARGET_VOCAB, seed=2))
    changed = target.clone()
    changed[0, 4] = (target[0, 4] + 1 - 4) % (TARGET_VOCAB - 4) + 4

    original_logits = model(source, target)
    changed_logits = model(source, changed)
    torch.testing.assert_close(changed_logits[0, :4], original_logits[0, :4])
    assert not torch.allclose(changed_logits[0, 4:], original_logits[0, 4:])


def test_loss_is_summed_token_cross_entropy():
    model = tiny_model(label_smoothing=0.0)
    source = pad(random_sentences([4, 6], SOURCE_VOCAB))
    target = pad(random_sentences([5, 2], TARGET_VOCAB, seed=3))

    with torch.no_grad():
        summed, count = model.loss(source, target)

        log_probs = model(source, target[:, :-1]).double().log_softmax(-1)
    expected, expected_count = 0.0, 0
    for b in range(2):
        for t in range(target.shape[1] - 1):
            gold = int(target[b, t + 1])
            if gold != PAD_ID:
                expected -= log_probs[b, t, gold].item()
                expected_count += 1
    assert int(count) == expected_count == (5 + 1) + (2 + 1)
    assert float(summed) == pytest.approx(expected, rel=1e-5)


def test_label_smoothing_changes_loss():
    model = tiny_model(label_smoothing=0.1)
    source = pad(random_sentences([4], SOURCE_VOCAB))
    target = pad(random_sentences([5], TARGET_VOCAB, seed=3))
    with torch.no_grad():
        smoothed, _ = model.loss(source, target)
        plain, _ = model.loss(source, target, label_smoothing=0.0)
        log_probs = model(source, target[:, :-1]).double().log_softmax(-1)[0]

    gold = target[0, 1:]
    nll = -log_probs[torch.arange(len(gold)), gold]
    uniform = -log_probs.mean(-1)
    expected = (0.9 * nll + 0.1 * uniform).sum()
    assert float(smoothed) == pytest.approx(float(expected), rel=1e-5)
    assert float(plain) == pytest.approx(float(nll.sum()), rel=1e-5)


def test_tied_embeddings_share_parameter():
    model = tiny_model(tie_embeddings=True)
    assert model.generator.weight is model.target_embedding.tokens.weight
    assert tiny_model().generator.weight is not tiny_model().target_embedding.tokens.weight


def test_too_long_input_rejected():
    model = tiny_model(max_len=8)
    with pytest.raises(ValueError, match="max_len=8"):
        model(torch.full((1, 9), 5), torch.full((1, 3), 5))


@pytest.mark.parametrize("options, message", [
    (dict(d_model=30, heads=4), "divisible"),
    (dict(dropout=1.0), "dropout"),
    (dict(positions="rotary"), "positions"),
    (dict(activation="tanh"), "activation"),
    (dict(layers=0), "encoder_layers"),
])
def test_invalid_options_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(**options)


def test_beam_size_one_equals_greedy():
    model = tiny_model(seed=7)
    source = pad(random_sentences([3, 8, 5, 1, 6], SOURCE_VOCAB, seed=4))
    for extra_len in (3, 12):
        greedy = greedy_decode(model, source, extra_len=extra_len)
        beam = beam_search(model, source, beam_size=1, alpha=0.6, extra_len=extra_len)
        assert torch.equal(beam, greedy)


def test_greedy_stops_at_eos():
    model = tiny_model(seed=2)
    # A large bias on <eos> makes it the most likely token after every prefix.
    with torch.no_grad():
        model.generator.bias[EOS_ID] = 100.0
    output = greedy_decode(model, pad(random_sentences([4, 2], SOURCE_VOCAB)))
    assert output.tolist() == [[EOS_ID], [EOS_ID]]


def sequence_score(model, source, tokens):
    """Summed log-probability of ``tokens`` (without <bos>) as the decoders score it."""
    with torch.no_grad():
        memory, source_mask = model.encode(source)
        prefix = torch.tensor([[BOS_ID] + tokens[:-1]])
        logits = model.decode(prefix, memory, source_mask)[0].double()
    logits[:, [PAD_ID, BOS_ID]] = float("-inf")
    log_probs = logits.log_softmax(-1)
    return sum(log_probs[t, token].item() for t, token in enumerate(tokens))


def test_wide_beam_finds_best_sequence():
    # Six tokens, of which <pad> and <bos> are never generated: the search space up to three
    # tokens (<unk>, two words, <eos>) is small enough to enumerate. The seed gives a model
    # whose best sequence changes with the length penalty and differs from the greedy one.
    torch.manual_seed(18)
    model = Transformer(6, 6, d_model=16, ffn_dim=16, heads=2, layers=1, dropout=0.0,
                        max_len=10).eval()
    with torch.no_grad():
        model.generator.bias.normal_(0.0, 1.0)
    source = torch.tensor([[BOS_ID, 4, EOS_ID]])  # longest source 3 and extra_len 0: 3 tokens

    symbols = [0, 4, 5]
    candidates = []
    for length in range(3):
        candidates += [list(words) + [EOS_ID] for words in itertools.product(symbols, repeat=length)]
    candidates += [list(words) for words in itertools.product(symbols, repeat=3)]
    scores = {tuple(tokens): sequence_score(model, source, tokens) for tokens in candidates}

    found_by_alpha = {}
    for alpha in (0.0, 1.0, 3.0):
        best = max(candidates, key=lambda tokens: scores[tuple(tokens)]
                   / length_penalty(len(tokens), alpha))
        # 40 beams keep every hypothesis alive, so the search is exhaustive.
        output = beam_search(model, source, beam_size=40, alpha=alpha, extra_len=0)
        found = [token for token in output[0].tolist() if token != PAD_ID]
        assert found == best, f"alpha={alpha}"
        found_by_alpha[alpha] = tuple(found)

    greedy = tuple(t for t in greedy_decode(model, source, extra_len=0)[0].tolist() if t != PAD_ID)
    assert len(set(found_by_alpha.values())) > 1
    assert greedy not in found_by_alpha.values()


def test_beam_search_batch_matches_single_sentences():
    model = tiny_model(seed=9)
    sources = random_sentences([2, 7, 4], SOURCE_VOCAB, seed=5)
    batched = beam_search(model, pad(sources), beam_size=3, extra_len=5)
    for i, sentence in enumerate(sources):
        # The length limit depends on the longest source, so give each single sentence the
        # batch's limit.
        limit = max(len(s) for s in sources) - len(sentence) + 5
        alone = beam_search(model, pad([sentence]), beam_size=3, extra_len=limit)[0]
        row = batched[i, :alone.shape[0]]
        assert torch.equal(row, alone)
        assert (batched[i, alone.shape[0]:] == PAD_ID).all()


def test_beam_search_rejects_bad_options():
    model = tiny_model()
    source = pad(random_sentences([3], SOURCE_VOCAB))
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(model, source, beam_size=0)
    with pytest.raises(ValueError, match="alpha"):
        beam_search(model, source, alpha=-1.0)


def test_tiny_model_learns_copy_task():
    torch.manual_seed(0)
    model = Transformer(12, 12, d_model=32, ffn_dim=64, heads=4, layers=1, dropout=0.0,
                        max_len=16, label_smoothing=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98))
    generator = torch.Generator().manual_seed(0)

    def batch(size):
        words = torch.randint(4, 12, (size, 5), generator=generator)
        framed = torch.cat([torch.full((size, 1), BOS_ID), words,
                            torch.full((size, 1), EOS_ID)], dim=1)
        return framed, framed

    for _ in range(250):
        source, target = batch(32)
        summed, count = model.loss(source, target)
        optimizer.zero_grad()
        (summed / count).backward()
        optimizer.step()

    model.eval()
    source, target = batch(64)
    output = greedy_decode(model, source, extra_len=0)
    exact = (output[:, :6] == target[:, 1:]).all(dim=1).float().mean()
    assert exact > 0.9
