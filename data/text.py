"""Text handling for translation: spaCy tokenisation, vocabularies, detokenisation, and
length-bucketed padded batches of token ids.

Token ids follow the classic Multi30K recipe: ``<unk>`` 0, ``<pad>`` 1, ``<bos>`` 2,
``<eos>`` 3, then the training tokens that occur at least ``min_freq`` times, most frequent
first. Every encoded sentence is ``<bos> tokens <eos>``, so even an empty line has two tokens.
"""

from __future__ import annotations

import collections
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import torch
from torch.utils.data import Dataset, Sampler

logger = logging.getLogger(__name__)

UNK_TOKEN, PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<unk>", "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (UNK_TOKEN, PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
UNK_ID, PAD_ID, BOS_ID, EOS_ID = range(len(SPECIAL_TOKENS))

VOCABULARY_FILE_VERSION = 1

# Quote marks that look the same at both ends of a quotation.
QUOTE_TOKENS = ('"',)


class SpacyTokenizer:
    """Rule-based spaCy tokeniser of one language (``spacy.blank``, no trained pipeline)."""

    def __init__(self, language: str, lowercase: bool = True):
        import spacy

        try:
            self._nlp = spacy.blank(language)
        except (ImportError, KeyError) as error:
            raise ValueError(f"spaCy has no tokeniser for language {language!r}; use an ISO "
                             "code such as 'de' or 'en'") from error
        self.language = language
        self.lowercase = lowercase

    def __call__(self, text: str) -> list[str]:
        return self.tokenize_many([text])[0]

    def tokenize_many(self, texts: Iterable[str]) -> list[list[str]]:
        """Tokenise many sentences; spaCy's ``pipe`` is several times faster than a loop."""
        return [self._token_texts(doc) for doc in self._nlp.tokenizer.pipe(texts)]

    def tokenize_with_spacing(self, texts: Iterable[str]) -> list[list[tuple[str, bool]]]:
        """Tokenise and record, for each token, whether a space followed it in the text."""
        result = []
        for doc in self._nlp.tokenizer.pipe(texts):
            tokens = self._token_texts(doc)
            result.append([(token, bool(spacy_token.whitespace_))
                           for token, spacy_token in zip(tokens, doc)])
        return result

    def _token_texts(self, doc) -> list[str]:
        # spaCy keeps runs of spaces as tokens of their own; they carry no words.
        texts = [token.text for token in doc if not token.is_space]
        if self.lowercase:
            texts = [text.lower() for text in texts]
        return texts


class Vocabulary:
    """Mapping between tokens and ids, with the four special tokens first."""

    def __init__(self, itos: Sequence[str]):
        if tuple(itos[:len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"a vocabulary must start with {SPECIAL_TOKENS}, got "
                             f"{tuple(itos[:len(SPECIAL_TOKENS)])}")
        if len(set(itos)) != len(itos):
            duplicates = [token for token, n in collections.Counter(itos).items() if n > 1]
            raise ValueError(f"vocabulary has duplicate tokens: {duplicates[:10]}")
        self.itos = list(itos)
        self.stoi = {token: index for index, token in enumerate(self.itos)}

    @classmethod
    def build(cls, sentences: Iterable[Sequence[str]], min_freq: int = 2,
              max_size: Optional[int] = None) -> "Vocabulary":
        """Build from tokenised sentences, keeping tokens seen at least ``min_freq`` times.

        Ties in frequency are broken alphabetically so that the ids do not depend on the
        order of the sentences. ``max_size`` caps the number of ordinary tokens.
        """
        if min_freq < 1:
            raise ValueError(f"min_freq must be at least 1, got {min_freq}")
        if max_size is not None and max_size < 0:
            raise ValueError(f"max_size must be non-negative or None, got {max_size}")

        counts = collections.Counter(token for sentence in sentences for token in sentence)
        for special in SPECIAL_TOKENS:
            counts.pop(special, None)

        kept = sorted((token for token, n in counts.items() if n >= min_freq),
                      key=lambda token: (-counts[token], token))
        if max_size is not None:
            kept = kept[:max_size]
        return cls(list(SPECIAL_TOKENS) + kept)

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: str) -> bool:
        return token in self.stoi

    def encode(self, tokens: Sequence[str], add_bos_eos: bool = True) -> list[int]:
        """Map tokens to ids (unknown tokens to ``<unk>``), framed by ``<bos>`` and ``<eos>``."""
        ids = [self.stoi.get(token, UNK_ID) for token in tokens]
        if add_bos_eos:
            ids = [BOS_ID] + ids + [EOS_ID]
        return ids

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Map ids to tokens, stopping at the first ``<eos>`` and dropping ``<bos>``/``<pad>``."""
        tokens = []
        for index in ids:
            index = int(index)
            if index == EOS_ID:
                break
            if index in (BOS_ID, PAD_ID):
                continue
            tokens.append(self.itos[index])
        return tokens


class Detokenizer:
    """Join tokens into text, learning from the training text where spaces do not go.

    A token goes into ``no_space_before`` when, in most of its occurrences in the training
    text, no space separated it from the previous token (".", ",", "'s", "n't"). It goes
    into ``no_space_after`` when, in most of its occurrences, no space separated it from the
    next token ("(", the "-" inside "t-shirt").
    """

    def __init__(self, no_space_before: Iterable[str] = (), no_space_after: Iterable[str] = ()):
        self.no_space_before = set(no_space_before)
        self.no_space_after = set(no_space_after)

    @classmethod
    def learn(cls, spaced_sentences: Iterable[Sequence[tuple[str, bool]]],
              min_count: int = 5) -> "Detokenizer":
        """Learn from ``SpacyTokenizer.tokenize_with_spacing`` output of the training text."""
        sentences = [list(sentence) for sentence in spaced_sentences]
        count = collections.Counter(token for sentence in sentences for token, _ in sentence)

        def binds_before(skip_after: set[str]) -> set[str]:
            # Gaps after a token in ``skip_after`` are explained by that token ("-" in
            # "dark-haired"), so they do not make the next word bind to the left.
            attached = collections.Counter()
            for sentence in sentences:
                for (previous, space), (token, _) in zip(sentence, sentence[1:]):
                    if not space and previous not in skip_after:
                        attached[token] += 1
            return {token for token, n in count.items()
                    if n >= min_count and attached[token] * 2 > n}

        def binds_after(skip_before: set[str]) -> set[str]:
            # A word is followed by no space whenever "." comes next, so gaps before a token
            # in ``skip_before`` say nothing about the word.
            attached = collections.Counter()
            for sentence in sentences:
                for (token, space), (following, _) in zip(sentence, sentence[1:]):
                    if not space and following not in skip_before:
                        attached[token] += 1
            return {token for token, n in count.items()
                    if n >= min_count and attached[token] * 2 > n}

        before = binds_before(set())
        after = binds_after(before)
        before = binds_before(after)
        after -= set(QUOTE_TOKENS)
        before -= set(QUOTE_TOKENS)
        return cls(before, after)

    def __call__(self, tokens: Sequence[str]) -> str:
        pieces = []
        quote_open = {quote: False for quote in QUOTE_TOKENS}
        glue_next = False
        for position, token in enumerate(tokens):
            glue = position == 0 or glue_next or token in self.no_space_before
            glue_next = token in self.no_space_after

            # A straight double quote opens and closes, so its side follows from the count.
            if token in quote_open:
                if quote_open[token]:
                    glue = True
                else:
                    glue_next = True
                quote_open[token] = not quote_open[token]

            if not glue:
                pieces.append(" ")
            pieces.append(token)
        return "".join(pieces)

    def to_dict(self) -> dict:
        return {"no_space_before": sorted(self.no_space_before),
                "no_space_after": sorted(self.no_space_after)}

    @classmethod
    def from_dict(cls, data: dict) -> "Detokenizer":
        return cls(data.get("no_space_before", ()), data.get("no_space_after", ()))


@dataclass
class TextPipeline:
    """Everything needed to encode source text and decode target ids, saved with each run."""

    source_language: str
    target_language: str
    lowercase: bool
    min_freq: int
    source_vocab: Vocabulary
    target_vocab: Vocabulary
    detokenizer: Detokenizer

    def save(self, path: str | Path) -> None:
        data = {
            "version": VOCABULARY_FILE_VERSION,
            "source_language": self.source_language,
            "target_language": self.target_language,
            "lowercase": self.lowercase,
            "min_freq": self.min_freq,
            "source_itos": self.source_vocab.itos,
            "target_itos": self.target_vocab.itos,
            "detokenizer": self.detokenizer.to_dict(),
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(path.suffix + ".tmp")
        temporary.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        temporary.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "TextPipeline":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vocabulary file {path} not found; train a model first or "
                                    "point dataset.vocab_path at the vocab.json of a run")
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != VOCABULARY_FILE_VERSION:
            raise ValueError(f"{path} has vocabulary file version {data.get('version')!r}; this "
                             f"code reads version {VOCABULARY_FILE_VERSION}")
        return cls(
            source_language=data["source_language"],
            target_language=data["target_language"],
            lowercase=data["lowercase"],
            min_freq=data["min_freq"],
            source_vocab=Vocabulary(data["source_itos"]),
            target_vocab=Vocabulary(data["target_itos"]),
            detokenizer=Detokenizer.from_dict(data["detokenizer"]),
        )


class TranslationDataset(Dataset):
    """Pairs of encoded sentences; item ``i`` is ``(source_ids, target_ids, i)``."""

    def __init__(self, source_ids: Sequence[Sequence[int]], target_ids: Sequence[Sequence[int]]):
        if len(source_ids) != len(target_ids):
            raise ValueError(f"{len(source_ids)} source sentences but {len(target_ids)} target "
                             "sentences; the two sides must be line-aligned")
        self.source_ids = [torch.tensor(ids, dtype=torch.long) for ids in source_ids]
        self.target_ids = [torch.tensor(ids, dtype=torch.long) for ids in target_ids]

    def __len__(self) -> int:
        return len(self.source_ids)

    def __getitem__(self, index: int):
        return self.source_ids[index], self.target_ids[index], index

    def lengths(self) -> list[tuple[int, int]]:
        return [(len(s), len(t)) for s, t in zip(self.source_ids, self.target_ids)]


@dataclass
class TranslationBatch:
    """A padded batch: ``source`` (B, S) and ``target`` (B, T) token ids, padded with
    ``<pad>``, and ``indices`` (B,), the dataset positions of the sentences."""

    source: torch.Tensor
    target: torch.Tensor
    indices: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "TranslationBatch":
        return TranslationBatch(self.source.to(device, non_blocking=non_blocking),
                                self.target.to(device, non_blocking=non_blocking),
                                self.indices.to(device, non_blocking=non_blocking))

    def __len__(self) -> int:
        return self.source.shape[0]


def pad_sequences(sequences: Sequence[torch.Tensor], pad_id: int = PAD_ID) -> torch.Tensor:
    """Stack 1-D id tensors into (B, max length), padding on the right."""
    return torch.nn.utils.rnn.pad_sequence(list(sequences), batch_first=True,
                                           padding_value=pad_id)


def collate_translation(items) -> TranslationBatch:
    sources, targets, indices = zip(*items)
    return TranslationBatch(pad_sequences(sources), pad_sequences(targets),
                            torch.tensor(indices, dtype=torch.long))


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of sentences of similar length, so that padding wastes little compute.

    With ``shuffle``, each epoch permutes the dataset, cuts it into pools of
    ``pool_batches * batch_size`` sentences, sorts each pool by length, cuts the pools into
    batches and shuffles the full batches. Only the dataset's last pool can end in a partial
    batch, and that batch is always yielded last. So every epoch has the same number of
    batches with the same sizes in the same order, which FNGD needs because it reuses the
    coefficient vector of step i of the first epoch at step i of later epochs.
    Without ``shuffle`` the whole dataset is sorted by length once.
    """

    def __init__(self, lengths: Sequence[tuple[int, int]], batch_size: int, shuffle: bool = True,
                 pool_batches: int = 100, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if pool_batches < 1:
            raise ValueError(f"pool_batches must be at least 1, got {pool_batches}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.pool_batches = pool_batches
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the permutation: the same seed and epoch give the same batches."""
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        if not self.shuffle:
            order = sorted(range(len(self.lengths)), key=lambda i: self.lengths[i])
            for start in range(0, len(order), self.batch_size):
                yield order[start:start + self.batch_size]
            return

        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        permutation = torch.randperm(len(self.lengths), generator=generator).tolist()
        pool_size = self.pool_batches * self.batch_size

        full_batches, partial = [], None
        for pool_start in range(0, len(permutation), pool_size):
            pool = sorted(permutation[pool_start:pool_start + pool_size],
                          key=lambda i: self.lengths[i])
            for start in range(0, len(pool), self.batch_size):
                batch = pool[start:start + self.batch_size]
                if len(batch) == self.batch_size:
                    full_batches.append(batch)
                else:
                    partial = batch

        batch_order = torch.randperm(len(full_batches), generator=generator).tolist()
        for position in batch_order:
            yield full_batches[position]
        if partial is not None:
            yield partial


def truncate_ids(ids: list[int], max_len: int) -> tuple[list[int], bool]:
    """Cut an encoded sentence to ``max_len`` ids, keeping ``<eos>`` last.

    Returns the ids and whether they were cut.
    """
    if len(ids) <= max_len:
        return ids, False
    return ids[:max_len - 1] + [EOS_ID], True


def synthetic_token_batch(batch_size: int = 64, source_vocab_size: int = 7851,
                          target_vocab_size: int = 5892, source_mean_len: float = 12.4,
                          target_mean_len: float = 13.1, len_std: float = 4.1,
                          seed: int = 0, device: torch.device | str = "cpu"
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return a random ``(source, target)`` batch of token ids shaped like Multi30K's.

    The defaults are the statistics of the lower-cased spaCy tokenisation of the Multi30K
    training split: 12.4 German and 13.1 English words a sentence on average, standard
    deviation about 4.1, vocabularies of 7,851 and 5,892 ids at ``min_freq`` 2. Each
    sentence is ``<bos> words <eos>`` with its word count drawn from a normal distribution
    (rounded, at least 1), and the batch is padded with ``<pad>`` to its longest sentence:
    source (B, S) and target (B, T), int64. For step benchmarks only: the words are uniform
    random ids.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for name, size in (("source_vocab_size", source_vocab_size),
                       ("target_vocab_size", target_vocab_size)):
        if size <= len(SPECIAL_TOKENS):
            raise ValueError(f"{name} must exceed the {len(SPECIAL_TOKENS)} special tokens, "
                             f"got {size}")

    generator = torch.Generator().manual_seed(seed)

    def sample_side(vocab_size: int, mean_len: float) -> torch.Tensor:
        word_counts = (torch.randn(batch_size, generator=generator) * len_std + mean_len)
        word_counts = word_counts.round().clamp(min=1).long().tolist()
        sentences = []
        for count in word_counts:
            words = torch.randint(len(SPECIAL_TOKENS), vocab_size, (count,), generator=generator)
            sentences.append(torch.cat([torch.tensor([BOS_ID]), words, torch.tensor([EOS_ID])]))
        return pad_sequences(sentences)

    source = sample_side(source_vocab_size, source_mean_len)
    target = sample_side(target_vocab_size, target_mean_len)
    return source.to(device), target.to(device)
