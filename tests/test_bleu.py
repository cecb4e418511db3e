"""Tests of BLEU scoring and of batched translation of a whole split."""

from __future__ import annotations

import collections
import math

import pytest
import sacrebleu
import torch

from data.text import (BOS_ID, EOS_ID, Detokenizer, SpacyTokenizer, TextPipeline,
                       TranslationDataset, Vocabulary)
from models.transformer import Transformer, beam_search, greedy_decode
from trainer.translation import compute_bleu, translate

REFERENCES = [
    "Two young, white males are outside near many bushes.",
    "A little girl climbing into a wooden playhouse.",
    'A man in a blue shirt is standing on a ladder (cleaning a window).',
    "Several men in hard hats are operating a giant pulley system.",
    'A store called "Terrible\'s" sells t-shirts.',
]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # Tiny models: on a shared 2-core machine a second intra-op thread only adds waiting.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def reference_bleu(hypotheses, references):
    """Corpus BLEU (Papineni et al. 2002) on whitespace tokens, in float64, for hypotheses
    whose n-gram precisions are all non-zero (so no smoothing applies)."""
    matches, totals = [0] * 4, [0] * 4
    hypothesis_length = reference_length = 0
    for hypothesis, reference in zip(hypotheses, references):
        hypothesis, reference = hypothesis.split(), reference.split()
        hypothesis_length += len(hypothesis)
        reference_length += len(reference)
        for n in range(1, 5):
            hypothesis_ngrams = collections.Counter(
                tuple(hypothesis[i:i + n]) for i in range(len(hypothesis) - n + 1))
            reference_ngrams = collections.Counter(
                tuple(reference[i:i + n]) for i in range(len(reference) - n + 1))
            matches[n - 1] += sum(min(count, reference_ngrams[gram])
                                  for gram, count in hypothesis_ngrams.items())
            totals[n - 1] += max(len(hypothesis) - n + 1, 0)
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / 4
    brevity = min(0.0, 1 - reference_length / hypothesis_length)
    return 100 * math.exp(brevity + log_precision)


def test_perfect_detokenised_hypothesis_scores_100():
    tokenizer = SpacyTokenizer("en")
    detokenizer = Detokenizer.learn(tokenizer.tokenize_with_spacing(REFERENCES * 5))
    hypotheses = [detokenizer(tokenizer(reference)) for reference in REFERENCES]

    bleu = compute_bleu(hypotheses, REFERENCES, lowercase=True)
    assert bleu.score == pytest.approx(100.0)
    assert "case:lc" in bleu.signature
    assert "tok:13a" in bleu.signature
    assert f"version:{sacrebleu.__version__}" in bleu.signature

    cased = compute_bleu(hypotheses, REFERENCES, lowercase=False)
    assert cased.score < 90.0
    assert "case:mixed" in cased.signature


def test_bleu_matches_hand_computed_score():
    references = ["a man is riding a red bike down the street",
                  "two dogs are playing in the snow near a tree"]
    hypotheses = ["a man rides a red bike down the street",
                  "two dogs are playing in snow near the tree"]
    expected = reference_bleu(hypotheses, references)
    assert compute_bleu(hypotheses, references, lowercase=True).score == pytest.approx(expected)

    # The brevity penalty applies when the hypotheses are shorter than the references.
    short = ["a man rides a red bike", "two dogs are playing in snow"]
    assert compute_bleu(short, references, lowercase=True).score == pytest.approx(
        reference_bleu(short, references))


def test_bleu_rejects_length_mismatch():
    with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
        compute_bleu(["a", "b"], ["a"], lowercase=True)


def tiny_pipeline() -> TextPipeline:
    words = [f"w{i}" for i in range(12)]
    return TextPipeline("de", "en", True, 1, Vocabulary.build([words], min_freq=1),
                        Vocabulary.build([words], min_freq=1),
                        Detokenizer(no_space_before={"."}))


@pytest.mark.parametrize("beam_size", [1, 3])
def test_translate_returns_dataset_order(beam_size):
    torch.manual_seed(0)
    pipeline = tiny_pipeline()
    size = len(pipeline.source_vocab)
    model = Transformer(size, size, d_model=16, ffn_dim=32, heads=2, layers=1,
                        dropout=0.0, max_len=16).eval()
    generator = torch.Generator().manual_seed(1)
    sources = [[BOS_ID] + torch.randint(4, size, (n,), generator=generator).tolist() + [EOS_ID]
               for n in (7, 1, 4, 9, 2, 5, 3)]
    dataset = TranslationDataset(sources, [[BOS_ID, EOS_ID]] * len(sources))

    # extra_len far above max_len makes every length limit max_len - 1, in a batch or alone,
    # so each sentence decodes as it would on its own. Batches of 3 are sorted by length,
    # so their order differs from the dataset order.
    hypotheses = translate(model, dataset, pipeline, batch_size=3, device=torch.device("cpu"),
                           beam_size=beam_size, extra_len=100)

    assert len(hypotheses) == len(sources)
    for source, hypothesis in zip(sources, hypotheses):
        single = torch.tensor([source])
        if beam_size == 1:
            output = greedy_decode(model, single, extra_len=100)[0]
        else:
            output = beam_search(model, single, beam_size=beam_size, extra_len=100)[0]
        expected = pipeline.detokenizer(pipeline.target_vocab.decode(output.tolist()))
        assert hypothesis == expected
    assert len(set(hypotheses)) > 1
