"""Tests of the translation workload inside the shared training loop."""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import pytest
import torch

from data.text import PAD_ID, TextPipeline
from trainer.translation import TranslationBatches
from trainer.train import train
from trainer.workload import build_workload

SUBJECTS = [("ein Mann", "a man"), ("eine Frau", "a woman"), ("ein Hund", "a dog"),
            ("ein Kind", "a child")]
VERBS = [("läuft", "runs"), ("sitzt", "sits"), ("spielt", "plays")]
PLACES = [("im Park", "in the park"), ("am Strand", "on the beach"),
          ("auf der Straße", "on the street"), ("im Schnee", "in the snow")]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # Tiny models: on a shared 2-core machine a second intra-op thread only adds waiting.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_toy_corpus(root: Path) -> Path:
    """Write a Multi30K-layout corpus of template sentences: 48 pairs (every combination)
    for training and 8 each for validation and test."""
    pairs = [(f"{s_de.capitalize()} {v_de} {p_de}.", f"{s_en.capitalize()} {v_en} {p_en}.")
             for (s_de, s_en), (v_de, v_en), (p_de, p_en)
             in itertools.product(SUBJECTS, VERBS, PLACES)]
    splits = {"train": pairs, "val": pairs[::6], "test_2016_flickr": pairs[3::6]}
    for name, split_pairs in splits.items():
        for index, language in enumerate(("de", "en")):
            path = root / "multi30k" / f"{name}.{language}.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            with gzip.open(path, "wt", encoding="utf-8") as handle:
                handle.write("".join(pair[index] + "\n" for pair in split_pairs))
    return root


def toy_overrides(root: Path, epochs: int = 2, optimizer: str = "adamw") -> list[str]:
    return [
        "dataset=multi30k", "model=transformer", f"optimizer={optimizer}", "schedule=constant",
        f"dataset.root={root}", "dataset.min_freq=1", "dataset.batch_size=10",
        "dataset.eval_batch_size=4", "dataset.pool_batches=2",
        "model.d_model=16", "model.ffn_dim=32", "model.heads=2", "model.layers=1",
        "model.max_len=16", f"trainer.epochs={epochs}", "trainer.device=cpu",
        "trainer.progress=false", "logger=none",
    ]


@pytest.fixture
def toy_root(tmp_path: Path) -> Path:
    return write_toy_corpus(tmp_path / "data")


def test_records_val_loss_and_bleu(tmp_path, toy_root, compose_config):
    cfg = compose_config(toy_overrides(toy_root, epochs=3) + ["dataset.bleu_every=2",
                                                              "optimizer.lr=3e-3"])
    records = train(cfg, tmp_path / "run")

    assert [r["epoch"] for r in records] == [1, 2, 3]
    for record in records:
        assert record["val_loss"] > 0
        assert record["val_ppl"] > 1
        assert 0 <= record["train_token_accuracy"] <= 1
    # BLEU in every second epoch and after the last one.
    assert "test_bleu" not in records[0]
    assert "test_bleu" in records[1]
    assert "test_bleu" in records[2]
    assert records[2]["bleu_signature"].startswith("nrefs:1|case:lc|eff:no|tok:13a")
    assert records[2]["train_loss"] < records[0]["train_loss"]

    saved = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert saved[2]["test_bleu"] == records[2]["test_bleu"]
    assert saved[2]["bleu_signature"] == records[2]["bleu_signature"]

    run_info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_info["steps_per_epoch"] == 5
    assert run_info["data"]["train_pairs"] == 48

    hypotheses = (tmp_path / "run" / "test_hypotheses.txt").read_text().splitlines()
    assert len(hypotheses) == 8


def test_vocabulary_saved_and_reused(tmp_path, toy_root, compose_config):
    train(compose_config(toy_overrides(toy_root, epochs=1)), tmp_path / "first")
    saved = TextPipeline.load(tmp_path / "first" / "vocab.json")
    assert "dog" in saved.target_vocab
    assert "hund" in saved.source_vocab

    # A run on a subset would build smaller vocabularies; with vocab_path it uses the saved.
    overrides = toy_overrides(toy_root, epochs=1) + [
        "dataset.train_subset=6", f"dataset.vocab_path={tmp_path / 'first' / 'vocab.json'}"]
    workload = build_workload(compose_config(overrides), torch.device("cpu"))
    assert workload.pipeline.target_vocab.itos == saved.target_vocab.itos
    model = workload.build_model()
    assert model.generator.out_features == len(saved.target_vocab)

    subset = build_workload(compose_config(overrides[:-1]), torch.device("cpu"))
    assert len(subset.pipeline.target_vocab) < len(saved.target_vocab)


def test_resume_equals_uninterrupted(tmp_path, toy_root, compose_config):
    overrides = toy_overrides(toy_root, epochs=2)
    full = train(compose_config(overrides), tmp_path / "full")
    train(compose_config(toy_overrides(toy_root, epochs=1)), tmp_path / "part")
    resumed = train(compose_config(overrides + [f"trainer.resume={tmp_path / 'part'}"]),
                    tmp_path / "resumed")

    for key in ("train_loss", "val_loss", "test_bleu"):
        assert resumed[1][key] == pytest.approx(full[1][key], rel=1e-6), key


def test_token_loss_mean_is_exact_across_batchings(toy_root, compose_config):
    workload = build_workload(compose_config(toy_overrides(toy_root)), torch.device("cpu"))
    model = workload.build_model().eval()
    dataset = workload.corpus.train.dataset

    def mean_loss(batch_size):
        total, count = 0.0, 0
        for batch in TranslationBatches(dataset, batch_size, torch.device("cpu"), shuffle=False):
            output = workload.loss(model, batch)
            total += output.loss_sum.double().item()
            count += int(output.count)
        return total / count, count

    whole, whole_count = mean_loss(len(dataset))
    small, small_count = mean_loss(7)
    expected_count = sum(len(target) - 1 for target in dataset.target_ids)
    assert whole_count == small_count == expected_count
    assert small == pytest.approx(whole, rel=1e-5)


def test_batches_fixed_per_epoch_with_partial_last(toy_root, compose_config):
    cfg = compose_config(toy_overrides(toy_root) + ["dataset.batch_size=20"])
    batches = build_workload(cfg, torch.device("cpu")).train_batches()
    epochs = [list(batches) for _ in range(3)]

    assert len(batches) == 3
    for epoch in epochs:
        assert [len(batch) for batch in epoch] == [20, 20, 8]
        assert sorted(torch.cat([b.indices for b in epoch]).tolist()) == list(range(48))
        for batch in epoch:
            # Right padding only: every row is <bos> ... <eos> followed by <pad>.
            real = (batch.source != PAD_ID).sum(1)
            assert all((row[:n] != PAD_ID).all() for row, n in zip(batch.source, real))
    assert [b.indices.tolist() for b in epochs[0]] != [b.indices.tolist() for b in epochs[1]]
    assert batches.state_dict() == {"epoch": 3}


def test_fngd_trains_transformer(tmp_path, toy_root, compose_config):
    cfg = compose_config(toy_overrides(toy_root, epochs=2, optimizer="fngd")
                         + ["optimizer.lr=0.05"])
    records = train(cfg, tmp_path / "run")

    # 1 encoder layer (6 Linear), 1 decoder layer (10 Linear) and the generator: FNGD must
    # solve for all 17 projections at each of the 5 steps of the first epoch, then reuse.
    assert records[0]["solve_steps"] == 5
    assert records[0]["layer_solves"] == 5 * 17
    assert records[1]["reuse_steps"] == 5
    assert records[1]["layer_reuses"] == 5 * 17
    assert records[1]["skipped_steps"] == 0
    assert records[1]["train_loss"] < records[0]["train_loss"]
    assert "test_bleu" in records[-1]


@pytest.mark.parametrize("optimizer", ["kfac", "shampoo"])
def test_second_order_baselines_train_transformer(tmp_path, toy_root, compose_config, optimizer):
    records = train(compose_config(toy_overrides(toy_root, epochs=2, optimizer=optimizer)),
                    tmp_path / "run")
    assert records[1]["train_loss"] < records[0]["train_loss"]
    assert "test_bleu" in records[1]


@pytest.mark.parametrize("override, message", [
    ("dataset.beam_size=0", "dataset.beam_size"),
    ("dataset.bleu_every=0", "dataset.bleu_every"),
    ("dataset.length_penalty=-1", "dataset.length_penalty"),
])
def test_bad_decoding_settings_rejected(toy_root, compose_config, override, message):
    cfg = compose_config(toy_overrides(toy_root) + [override])
    with pytest.raises(ValueError, match=message):
        build_workload(cfg, torch.device("cpu"))
