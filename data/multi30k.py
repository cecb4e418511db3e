"""Multi30K task 1 (Elliott et al. 2016): image captions in German and English.

Reads ``{root}/multi30k/{split}.{language}.gz`` (one sentence a line, line-aligned across
languages), tokenises with spaCy, builds the vocabularies from the training split, and
returns datasets of token ids plus the raw target sentences that BLEU is scored against.
"""

from __future__ import annotations

import gzip
import logging
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from data.text import (Detokenizer, SpacyTokenizer, TextPipeline, TranslationDataset,
                       Vocabulary, truncate_ids)

logger = logging.getLogger(__name__)

# File stems of the task-1 splits; the 2016 Flickr test set is the one the paper's field uses.
SPLIT_FILES = {"train": "train", "val": "val", "test": "test_2016_flickr"}

# The raw files of the official repository (github.com/multi30k/dataset, data/task1/raw).
DEFAULT_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw"

DOWNLOAD_TIMEOUT_S = 60


def split_path(root: str | Path, split_file: str, language: str) -> Path:
    return Path(root) / "multi30k" / f"{split_file}.{language}.gz"


def download_multi30k(root: str | Path, languages: Sequence[str] = ("de", "en"),
                      split_files: Sequence[str] = tuple(SPLIT_FILES.values()),
                      url: str = DEFAULT_URL) -> None:
    """Download the missing ``{split}.{language}.gz`` files from ``url`` into ``root/multi30k``."""
    for split_file in split_files:
        for language in languages:
            path = split_path(root, split_file, language)
            if path.is_file():
                continue

            path.parent.mkdir(parents=True, exist_ok=True)
            source = f"{url.rstrip('/')}/{path.name}"
            temporary = path.with_suffix(".part")
            logger.info("downloading %s to %s", source, path)
            try:
                with urllib.request.urlopen(source, timeout=DOWNLOAD_TIMEOUT_S) as response, \
                        open(temporary, "wb") as output:
                    shutil.copyfileobj(response, output)
                # A proxy error page would otherwise surface later as a confusing decode error.
                with gzip.open(temporary, "rt", encoding="utf-8") as check:
                    check.read()
            except (OSError, EOFError, UnicodeDecodeError) as error:
                temporary.unlink(missing_ok=True)
                raise RuntimeError(f"downloading {source} failed: {error}. Copy the Multi30K "
                                   f"task-1 raw files into {path.parent} by hand, or set "
                                   "dataset.url to a reachable mirror") from error
            temporary.replace(path)


def read_lines(path: Path) -> list[str]:
    """Read a gzip-compressed UTF-8 text file, one sentence a line, without line ends."""
    with gzip.open(path, "rt", encoding="utf-8", newline="") as handle:
        text = handle.read()
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def read_parallel(root: str | Path, split_file: str, source_language: str,
                  target_language: str) -> tuple[list[str], list[str]]:
    """Read the line-aligned source and target sentences of one split."""
    paths = [split_path(root, split_file, language)
             for language in (source_language, target_language)]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"Multi30K file(s) not found: {', '.join(missing)}. Set "
                                "dataset.root to the folder that contains multi30k/, or set "
                                "dataset.download=true on a machine with internet access")

    source_lines, target_lines = (read_lines(path) for path in paths)
    if len(source_lines) != len(target_lines):
        raise ValueError(f"{paths[0]} has {len(source_lines)} lines but {paths[1]} has "
                         f"{len(target_lines)}; the two languages must be line-aligned "
                         "(delete the files and download them again)")
    return source_lines, target_lines


@dataclass
class TranslationSplit:
    """Encoded pairs of one split, with its raw source sentences and the raw target
    sentences that BLEU scores against."""

    dataset: TranslationDataset
    source_text: list[str]
    references: list[str]


@dataclass
class Multi30k:
    """The three splits and the text pipeline (vocabularies, detokeniser) built for them."""

    pipeline: TextPipeline
    train: TranslationSplit
    val: TranslationSplit
    test: TranslationSplit


def encode_split(name: str, source_lines: list[str], target_lines: list[str],
                 pipeline: TextPipeline, source_tokens: list[list[str]],
                 target_tokens: list[list[str]], max_len: int) -> TranslationDataset:
    """Encode tokenised pairs, cutting sentences longer than ``max_len`` ids (with a log line)."""
    source_ids, target_ids = [], []
    truncated = {"source": 0, "target": 0}
    for source, target in zip(source_tokens, target_tokens):
        ids, cut = truncate_ids(pipeline.source_vocab.encode(source), max_len)
        source_ids.append(ids)
        truncated["source"] += cut
        ids, cut = truncate_ids(pipeline.target_vocab.encode(target), max_len)
        target_ids.append(ids)
        truncated["target"] += cut

    for side, count in truncated.items():
        if count:
            logger.warning("%s split: truncated %d %s sentences to max_len=%d tokens "
                           "(<bos> and <eos> included)", name, count, side, max_len)
    return TranslationDataset(source_ids, target_ids)


def load_multi30k(root: str | Path, source_language: str = "de", target_language: str = "en",
                  lowercase: bool = True, min_freq: int = 2, max_len: int = 256,
                  download: bool = False, url: str = DEFAULT_URL,
                  train_subset: Optional[int] = None, val_subset: Optional[int] = None,
                  test_subset: Optional[int] = None,
                  pipeline: Optional[TextPipeline] = None) -> Multi30k:
    """Load the three splits, building the vocabularies from the training split unless
    ``pipeline`` (from a saved ``vocab.json``) is given.

    ``*_subset`` keeps the first N lines of a split (for tests and quick runs). Training
    pairs with an empty side are dropped; empty lines in val and test are kept, so that
    every reference is scored. ``max_len`` counts ``<bos>`` and ``<eos>``.
    """
    if max_len < 3:
        raise ValueError(f"max_len must be at least 3 (<bos>, one token, <eos>), got {max_len}")
    if download:
        download_multi30k(root, (source_language, target_language), url=url)

    source_tokenizer = SpacyTokenizer(source_language, lowercase)
    target_tokenizer = SpacyTokenizer(target_language, lowercase)
    if pipeline is not None:
        check_pipeline(pipeline, source_language, target_language, lowercase)

    splits = {}
    subsets = {"train": train_subset, "val": val_subset, "test": test_subset}
    for name, split_file in SPLIT_FILES.items():
        source_lines, target_lines = read_parallel(root, split_file, source_language,
                                                   target_language)
        subset = subsets[name]
        if subset is not None:
            if subset < 1:
                raise ValueError(f"dataset.{name}_subset must be a positive line count or "
                                 f"null, got {subset}")
            source_lines, target_lines = source_lines[:subset], target_lines[:subset]

        empty = [i for i, pair in enumerate(zip(source_lines, target_lines))
                 if not pair[0].strip() or not pair[1].strip()]
        if empty and name == "train":
            logger.warning("train split: dropped %d pairs with an empty line (first at line %d)",
                           len(empty), empty[0] + 1)
            dropped = set(empty)
            source_lines = [s for i, s in enumerate(source_lines) if i not in dropped]
            target_lines = [t for i, t in enumerate(target_lines) if i not in dropped]
        elif empty:
            logger.warning("%s split: %d pairs have an empty line (first at line %d); they are "
                           "kept and scored", name, len(empty), empty[0] + 1)
        splits[name] = (source_lines, target_lines)

    train_source, train_target = splits["train"]
    source_tokens = {"train": source_tokenizer.tokenize_many(train_source)}
    spaced_target = target_tokenizer.tokenize_with_spacing(train_target)
    target_tokens = {"train": [[token for token, _ in sentence] for sentence in spaced_target]}
    for name in ("val", "test"):
        source_tokens[name] = source_tokenizer.tokenize_many(splits[name][0])
        target_tokens[name] = target_tokenizer.tokenize_many(splits[name][1])

    if pipeline is None:
        pipeline = TextPipeline(
            source_language=source_language, target_language=target_language,
            lowercase=lowercase, min_freq=min_freq,
            source_vocab=Vocabulary.build(source_tokens["train"], min_freq),
            target_vocab=Vocabulary.build(target_tokens["train"], min_freq),
            detokenizer=Detokenizer.learn(spaced_target))
        logger.info("built vocabularies from %d training pairs: %d %s and %d %s tokens "
                    "(min_freq=%d)", len(train_source), len(pipeline.source_vocab),
                    source_language, len(pipeline.target_vocab), target_language, min_freq)

    result = {}
    for name, (source_lines, target_lines) in splits.items():
        dataset = encode_split(name, source_lines, target_lines, pipeline, source_tokens[name],
                               target_tokens[name], max_len)
        result[name] = TranslationSplit(dataset, source_lines, target_lines)
    return Multi30k(pipeline, result["train"], result["val"], result["test"])


def check_pipeline(pipeline: TextPipeline, source_language: str, target_language: str,
                   lowercase: bool) -> None:
    """Reject a saved vocabulary made for other languages or another casing."""
    expected = (source_language, target_language, lowercase)
    saved = (pipeline.source_language, pipeline.target_language, pipeline.lowercase)
    if saved != expected:
        raise ValueError(f"the saved vocabulary is for (source, target, lowercase) = {saved}, "
                         f"but the dataset config asks for {expected}; use matching settings "
                         "or build a new vocabulary")
