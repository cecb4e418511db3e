"""Tests of Multi30K loading, tokenisation, vocabularies and length-bucketed batching."""

from __future__ import annotations

import gzip
import http.server
import logging
import os
import threading
from pathlib import Path

import pytest
import torch

from data.multi30k import SPLIT_FILES, download_multi30k, load_multi30k, read_parallel
from data.text import (BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID, BucketBatchSampler,
                       Detokenizer, SpacyTokenizer, TextPipeline, TranslationDataset, Vocabulary,
                       collate_translation, synthetic_token_batch)

GERMAN = [
    "Zwei junge Männer spielen Fußball.",
    "Ein Hund läuft über die Wiese.",
    "Eine Frau trägt ein rotes T-Shirt.",
    "Zwei Hunde spielen im Schnee.",
    "Ein Mann fährt Fahrrad.",
    "Eine Frau liest ein Buch.",
]
ENGLISH = [
    "Two young men are playing soccer.",
    "A dog runs across the meadow.",
    "A woman is wearing a red t-shirt.",
    "Two dogs play in the snow.",
    "A man's riding a bike.",
    "A woman reads a book.",
]


def write_gz(path: Path, lines) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in lines))


def write_corpus(root: Path, train=(GERMAN, ENGLISH), val=None, test=None) -> Path:
    splits = {"train": train, "val": val or (GERMAN[:2], ENGLISH[:2]),
              "test": test or (GERMAN[2:4], ENGLISH[2:4])}
    for name, (german, english) in splits.items():
        write_gz(root / "multi30k" / f"{SPLIT_FILES[name]}.de.gz", german)
        write_gz(root / "multi30k" / f"{SPLIT_FILES[name]}.en.gz", english)
    return root


def test_tokenizer_splits_punctuation_and_lowercases():
    assert SpacyTokenizer("de")("Zwei Männer, ein Hund.") == ["zwei", "männer", ",", "ein",
                                                              "hund", "."]
    assert SpacyTokenizer("en", lowercase=False)("A man's dog.") == ["A", "man", "'s", "dog",
                                                                      "."]


def test_tokenizer_rejects_unknown_language():
    with pytest.raises(ValueError, match="xx-nonsense"):
        SpacyTokenizer("xx-nonsense")


def test_vocabulary_min_freq_and_order():
    sentences = [["b", "a", "c"], ["a", "b"], ["a", "d"], ["<pad>"]]
    vocab = Vocabulary.build(sentences, min_freq=2)
    assert vocab.itos == list(SPECIAL_TOKENS) + ["a", "b"]
    assert (UNK_ID, PAD_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    assert Vocabulary.build(sentences, min_freq=1).itos[4:] == ["a", "b", "c", "d"]
    assert Vocabulary.build(sentences, min_freq=1, max_size=3).itos[4:] == ["a", "b", "c"]


def test_vocabulary_encode_decode_round_trip():
    vocab = Vocabulary.build([["a", "man", "runs", "."]] * 2, min_freq=2)
    ids = vocab.encode(["a", "man", "swims", "."])
    assert ids[0] == BOS_ID
    assert ids[-1] == EOS_ID
    assert ids[3] == UNK_ID
    assert vocab.decode(ids) == ["a", "man", "<unk>", "."]
    assert vocab.decode(vocab.encode(["a", "man", "runs"]) + [PAD_ID, PAD_ID]) == ["a", "man",
                                                                                   "runs"]
    assert vocab.decode([BOS_ID, vocab.stoi["a"], EOS_ID, vocab.stoi["man"]]) == ["a"]


def test_vocabulary_rejects_bad_input():
    with pytest.raises(ValueError, match="must start with"):
        Vocabulary(["a", "b"])
    with pytest.raises(ValueError, match="duplicate"):
        Vocabulary(list(SPECIAL_TOKENS) + ["a", "a"])
    with pytest.raises(ValueError, match="min_freq"):
        Vocabulary.build([["a"]], min_freq=0)


def test_detokenizer_round_trip():
    tokenizer = SpacyTokenizer("en")
    # Words inside brackets also occur elsewhere, as in real text, so that the bracket and
    # not the word is learnt to bind.
    training = ENGLISH + [
        'He said "hello" to a small child (smiling).', "A small dog (black) runs.",
        "An old man (smiling) sits.", "A black cat sleeps.", "A man is smiling.",
        "An old dog (small) barks.", "Hello, a black dog!", "A cat (old) sleeps.",
    ]
    training = training * 5
    detokenizer = Detokenizer.learn(tokenizer.tokenize_with_spacing(training))
    assert {".", "'s"} <= detokenizer.no_space_before
    assert "(" in detokenizer.no_space_after

    for sentence in training:
        assert detokenizer(tokenizer(sentence)) == sentence.lower()
    assert detokenizer(["a", "man", "'s", "dog", "."]) == "a man's dog."


def test_pipeline_save_load_round_trip(tmp_path):
    corpus = load_multi30k(write_corpus(tmp_path), min_freq=1)
    path = tmp_path / "run" / "vocab.json"
    corpus.pipeline.save(path)
    loaded = TextPipeline.load(path)

    assert loaded.source_vocab.itos == corpus.pipeline.source_vocab.itos
    assert loaded.target_vocab.itos == corpus.pipeline.target_vocab.itos
    assert loaded.detokenizer.to_dict() == corpus.pipeline.detokenizer.to_dict()
    assert (loaded.source_language, loaded.target_language, loaded.lowercase) == ("de", "en", True)

    reloaded = load_multi30k(tmp_path, min_freq=2, pipeline=loaded)
    assert reloaded.pipeline is loaded
    for name in ("train", "val", "test"):
        original = getattr(corpus, name).dataset
        again = getattr(reloaded, name).dataset
        assert [s.tolist() for s in again.source_ids] == [s.tolist() for s in original.source_ids]

    with pytest.raises(ValueError, match="lowercase"):
        load_multi30k(tmp_path, lowercase=False, pipeline=loaded)
    with pytest.raises(FileNotFoundError, match="vocab_path"):
        TextPipeline.load(tmp_path / "missing.json")


def test_load_builds_vocabulary_from_train_only(tmp_path):
    root = write_corpus(tmp_path, val=(["Ein Zebra."], ["A zebra."]))
    corpus = load_multi30k(root, min_freq=1)
    assert "zebra" not in corpus.pipeline.target_vocab
    assert "dog" in corpus.pipeline.target_vocab
    assert corpus.val.references == ["A zebra."]
    assert corpus.val.dataset.target_ids[0].tolist()[2] == UNK_ID
    assert len(corpus.train.dataset) == len(GERMAN)


def test_missing_file_named(tmp_path):
    root = write_corpus(tmp_path)
    (root / "multi30k" / "val.en.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"val\.en\.gz.*dataset\.download=true"):
        load_multi30k(root)


def test_misaligned_files_named_with_counts(tmp_path):
    root = write_corpus(tmp_path, test=(GERMAN[:3], ENGLISH[:2]))
    with pytest.raises(ValueError, match=r"test_2016_flickr\.de\.gz has 3 lines.*"
                                         r"test_2016_flickr\.en\.gz has 2"):
        load_multi30k(root)


def test_empty_lines_dropped_in_train_kept_in_test(tmp_path, caplog):
    train = (GERMAN[:3] + [""] + GERMAN[3:], ENGLISH[:3] + ["Nothing here."] + ENGLISH[3:])
    test = (["Ein Hund.", "  "], ["A dog.", ""])
    root = write_corpus(tmp_path, train=train, test=test)
    with caplog.at_level(logging.WARNING, logger="data.multi30k"):
        corpus = load_multi30k(root, min_freq=1)

    assert len(corpus.train.dataset) == len(GERMAN)
    assert "Nothing here." not in corpus.train.references
    assert "dropped 1 pairs" in caplog.text
    assert corpus.test.references == ["A dog.", ""]
    assert corpus.test.dataset.target_ids[1].tolist() == [BOS_ID, EOS_ID]
    assert corpus.test.dataset.source_ids[1].tolist() == [BOS_ID, EOS_ID]


def test_long_sentences_truncated_and_counted(tmp_path, caplog):
    long_german = " ".join(["Hund"] * 30) + "."
    train = (GERMAN + [long_german], ENGLISH + ["A dog."])
    root = write_corpus(tmp_path, train=train)
    with caplog.at_level(logging.WARNING, logger="data.multi30k"):
        corpus = load_multi30k(root, min_freq=1, max_len=10)

    assert "truncated 1 source sentences to max_len=10" in caplog.text
    longest = max(len(ids) for ids in corpus.train.dataset.source_ids)
    assert longest == 10
    assert corpus.train.dataset.source_ids[-1][-1].item() == EOS_ID
    with pytest.raises(ValueError, match="max_len"):
        load_multi30k(root, max_len=2)


def test_subsets_keep_first_lines(tmp_path):
    corpus = load_multi30k(write_corpus(tmp_path), min_freq=1, train_subset=3, test_subset=1)
    assert corpus.train.references == ENGLISH[:3]
    assert corpus.test.references == ENGLISH[2:3]
    with pytest.raises(ValueError, match="train_subset"):
        load_multi30k(tmp_path, train_subset=0)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def loopback_server(tmp_path):
    """Serve ``tmp_path / "served"`` over HTTP on 127.0.0.1 (a stand-in for the GitHub
    mirror, which this machine cannot reach)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = lambda *args, **kwargs: _QuietHandler(*args, directory=str(served), **kwargs)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_download_fetches_missing_files(tmp_path, loopback_server):
    served, url = loopback_server
    write_corpus(served)
    for path in (served / "multi30k").iterdir():
        path.rename(served / path.name)
    (served / "multi30k").rmdir()

    root = tmp_path / "downloaded"
    corpus = load_multi30k(root, min_freq=1, download=True, url=url)
    assert corpus.train.references == ENGLISH
    assert sorted(p.name for p in (root / "multi30k").iterdir()) == sorted(
        p.name for p in served.iterdir())


def test_download_failure_names_url(tmp_path, loopback_server):
    served, url = loopback_server
    (served / "train.de.gz").write_bytes(b"<html>not gzip</html>")
    with pytest.raises(RuntimeError, match=r"train\.de\.gz failed"):
        download_multi30k(tmp_path, ("de",), ("train",), url=url)
    with pytest.raises(RuntimeError, match=r"val\.de\.gz failed"):
        download_multi30k(tmp_path, ("de",), ("val",), url=url)
    assert not list((tmp_path / "multi30k").iterdir())


def sampler_epochs(lengths, batch_size, epochs, **options):
    sampler = BucketBatchSampler(lengths, batch_size, **options)
    result = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        result.append(list(sampler))
    return sampler, result


def test_bucket_sampler_covers_dataset_with_stable_batch_sizes():
    generator = torch.Generator().manual_seed(0)
    lengths = [(int(a), int(b)) for a, b in torch.randint(3, 40, (1000, 2), generator=generator)]
    sampler, epochs = sampler_epochs(lengths, 64, 3, pool_batches=4)

    assert len(sampler) == 16
    for batches in epochs:
        assert sorted(i for batch in batches for i in batch) == list(range(1000))
        assert [len(batch) for batch in batches] == [64] * 15 + [40]
    assert epochs[0] != epochs[1]

    _, again = sampler_epochs(lengths, 64, 3, pool_batches=4)
    assert again == epochs


def test_bucket_sampler_reduces_padding():
    generator = torch.Generator().manual_seed(1)
    lengths = [(int(n), int(n)) for n in torch.randint(3, 40, (2000,), generator=generator)]

    def padded_slots(batches):
        return sum(len(batch) * max(lengths[i][0] for i in batch) for batch in batches)

    _, (bucketed,) = sampler_epochs(lengths, 64, 1, pool_batches=10)
    permutation = torch.randperm(2000, generator=generator).tolist()
    unsorted = [permutation[i:i + 64] for i in range(0, 2000, 64)]
    real = sum(n for n, _ in lengths)
    assert padded_slots(bucketed) - real < 0.25 * (padded_slots(unsorted) - real)


def test_bucket_sampler_without_shuffle_is_sorted():
    lengths = [(5, 1), (2, 9), (7, 3), (2, 2)]
    sampler = BucketBatchSampler(lengths, 3, shuffle=False)
    assert list(sampler) == [[3, 1, 0], [2]]


def test_collate_pads_and_keeps_indices():
    dataset = TranslationDataset([[2, 5, 3], [2, 5, 6, 7, 3]], [[2, 8, 3], [2, 3]])
    batch = collate_translation([dataset[1], dataset[0]])
    assert batch.source.tolist() == [[2, 5, 6, 7, 3], [2, 5, 3, PAD_ID, PAD_ID]]
    assert batch.target.tolist() == [[2, 3, PAD_ID], [2, 8, 3]]
    assert batch.indices.tolist() == [1, 0]
    with pytest.raises(ValueError, match="line-aligned"):
        TranslationDataset([[2, 3]], [])


def test_synthetic_batch_has_multi30k_shape():
    source, target = synthetic_token_batch(batch_size=512, seed=3)
    source_lengths = (source != PAD_ID).sum(1).float()
    target_lengths = (target != PAD_ID).sum(1).float()

    # Two more than the word counts, for <bos> and <eos>.
    assert source_lengths.mean().item() == pytest.approx(14.4, abs=0.6)
    assert target_lengths.mean().item() == pytest.approx(15.1, abs=0.6)
    assert (source[:, 0] == BOS_ID).all()
    assert (target[:, 0] == BOS_ID).all()
    rows = torch.arange(512)
    assert (source[rows, source_lengths.long() - 1] == EOS_ID).all()
    assert (source == PAD_ID).any()
    assert int(source[source > EOS_ID].min()) >= len(SPECIAL_TOKENS)
    assert int(target.max()) < 5892
    with pytest.raises(ValueError, match="batch_size"):
        synthetic_token_batch(batch_size=0)


DATA_DIR = os.environ.get("FNGD_DATA_DIR")
needs_data = pytest.mark.skipif(
    not DATA_DIR, reason="set FNGD_DATA_DIR to the folder that holds multi30k/ to run")


@needs_data
def test_real_multi30k_sizes():
    for split, expected in (("train", 29000), ("val", 1014), ("test_2016_flickr", 1000)):
        german, english = read_parallel(DATA_DIR, split, "de", "en")
        assert len(german) == len(english) == expected

    corpus = load_multi30k(DATA_DIR)
    # The classic torchtext recipe (spaCy tokens, lower-cased, min_freq 2, four specials)
    # gives 7,853 and 5,893. Those counts include whitespace-only tokens (German " " and a
    # no-break space, English " "), which this tokeniser drops.
    assert len(corpus.pipeline.source_vocab) == 7853 - 2
    assert len(corpus.pipeline.target_vocab) == 5893 - 1
    assert corpus.test.references[0] == "A man in an orange hat starring at something."
