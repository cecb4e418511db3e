"""Translation on Multi30K: the workload of the Transformer experiments.

Training minimises token-level cross-entropy (summed over non-padding target tokens, with the
model's label smoothing). Every epoch reports the validation loss. Every
``dataset.bleu_every`` epochs and after the last one, the workload also decodes the test
split and scores it with sacrebleu against the raw reference sentences, and it records the
BLEU signature with the score.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from data.multi30k import DEFAULT_URL, load_multi30k
from data.text import (PAD_ID, BucketBatchSampler, TextPipeline, TranslationBatch,
                       TranslationDataset, collate_translation)
from models.transformer import beam_search, greedy_decode, token_cross_entropy
from trainer.workload import LossOutput, Workload

logger = logging.getLogger(__name__)

VOCAB_FILE = "vocab.json"
TEST_HYPOTHESES_FILE = "test_hypotheses.txt"


class TranslationBatches:
    """Padded, length-bucketed batches on the training device; each pass is one epoch.

    The pass number seeds the bucketing (with ``seed``). Checkpoints store it, so a resumed
    run gets the batches that an uninterrupted run would get.
    """

    def __init__(self, dataset: TranslationDataset, batch_size: int, device: torch.device,
                 shuffle: bool, seed: int = 0, pool_batches: int = 100):
        self.dataset = dataset
        self.device = device
        self.sampler = BucketBatchSampler(dataset.lengths(), batch_size, shuffle=shuffle,
                                          pool_batches=pool_batches, seed=seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[TranslationBatch]:
        self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        for indices in self.sampler:
            batch = collate_translation([self.dataset[i] for i in indices])
            yield batch.to(self.device, non_blocking=True)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])


@dataclass
class BleuScore:
    score: float
    signature: str


def compute_bleu(hypotheses: Sequence[str], references: Sequence[str],
                 lowercase: bool) -> BleuScore:
    """Score detokenised ``hypotheses`` against raw ``references`` with sacrebleu's corpus
    BLEU and its default 13a tokenisation.

    ``lowercase`` makes the score case-insensitive, as a model trained on lower-cased text
    needs; the signature then contains ``case:lc``.
    """
    from sacrebleu.metrics import BLEU

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references; "
                         "BLEU needs one hypothesis per reference sentence")
    metric = BLEU(lowercase=lowercase)
    result = metric.corpus_score(list(hypotheses), [list(references)])
    return BleuScore(result.score, str(metric.get_signature()))


@torch.no_grad()
def translate(model: nn.Module, dataset: TranslationDataset, pipeline: TextPipeline,
              batch_size: int, device: torch.device, beam_size: int = 1,
              length_penalty: float = 0.6, extra_len: int = 10) -> list[str]:
    """Decode every source sentence of ``dataset`` and return detokenised text, in dataset
    order. Batches hold sentences of similar length; ``beam_size`` 1 is greedy decoding."""
    batches = TranslationBatches(dataset, batch_size, device, shuffle=False)
    hypotheses: list[Optional[str]] = [None] * len(dataset)
    for batch in batches:
        if beam_size == 1:
            output = greedy_decode(model, batch.source, extra_len=extra_len)
        else:
            output = beam_search(model, batch.source, beam_size=beam_size, alpha=length_penalty,
                                 extra_len=extra_len)
        for index, ids in zip(batch.indices.tolist(), output.tolist()):
            tokens = pipeline.target_vocab.decode(ids)
            hypotheses[index] = pipeline.detokenizer(tokens)
    return hypotheses


def _run_dir_of(resume: str) -> Path:
    path = Path(resume)
    return path.parent if path.is_file() else path


class Translation(Workload):
    """Multi30K German-to-English (by default) translation with a Transformer.

    Reads the keys of ``configs/dataset/multi30k.yaml`` from ``cfg.dataset``, and
    ``cfg.model.max_len``, the length to which longer sentences are cut.

    The vocabularies come from ``dataset.vocab_path`` when it is set, else from the
    ``vocab.json`` of the run that ``trainer.resume`` continues, else from the training split.
    """

    def __init__(self, cfg: DictConfig, device: torch.device):
        super().__init__(cfg, device)
        data_cfg = cfg.dataset
        self._validate(data_cfg)

        pipeline = None
        vocab_path = data_cfg.get("vocab_path")
        resume = cfg.trainer.get("resume")
        if not vocab_path and resume and (_run_dir_of(resume) / VOCAB_FILE).is_file():
            vocab_path = _run_dir_of(resume) / VOCAB_FILE
        if vocab_path:
            pipeline = TextPipeline.load(vocab_path)
            logger.info("using the vocabularies in %s", vocab_path)

        self.corpus = load_multi30k(
            data_cfg.root, data_cfg.source_language, data_cfg.target_language,
            lowercase=data_cfg.lowercase, min_freq=data_cfg.min_freq,
            max_len=int(cfg.model.get("max_len", 256)), download=data_cfg.download,
            url=data_cfg.get("url") or DEFAULT_URL, train_subset=data_cfg.train_subset,
            val_subset=data_cfg.val_subset, test_subset=data_cfg.test_subset, pipeline=pipeline)
        self.pipeline = self.corpus.pipeline
        self.root = str(data_cfg.root)
        self.run_dir: Optional[Path] = None

        self.train_loader = TranslationBatches(self.corpus.train.dataset, data_cfg.batch_size,
                                               device, shuffle=True, seed=int(cfg.seed),
                                               pool_batches=data_cfg.pool_batches)
        self.val_loader = TranslationBatches(self.corpus.val.dataset, data_cfg.eval_batch_size,
                                             device, shuffle=False)
        logger.info("Multi30K %s-%s: %d training, %d validation and %d test pairs, %d steps "
                    "per epoch", data_cfg.source_language, data_cfg.target_language,
                    len(self.corpus.train.dataset), len(self.corpus.val.dataset),
                    len(self.corpus.test.dataset), len(self.train_loader))

    @staticmethod
    def _validate(data_cfg: DictConfig) -> None:
        for key in ("batch_size", "eval_batch_size", "bleu_every", "beam_size", "pool_batches"):
            value = data_cfg[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"dataset.{key}={value!r} is invalid; use a positive integer")
        if data_cfg.length_penalty < 0:
            raise ValueError(f"dataset.length_penalty={data_cfg.length_penalty} is invalid; "
                             "use a non-negative exponent (0 turns the penalty off)")
        if data_cfg.decode_extra_len < 0:
            raise ValueError(f"dataset.decode_extra_len={data_cfg.decode_extra_len} is "
                             "invalid; use a non-negative number of tokens")

    def build_model(self) -> nn.Module:
        return instantiate(self.cfg.model, source_vocab_size=len(self.pipeline.source_vocab),
                           target_vocab_size=len(self.pipeline.target_vocab), pad_id=PAD_ID)

    def train_batches(self) -> TranslationBatches:
        return self.train_loader

    def loss(self, model: nn.Module, batch: TranslationBatch) -> LossOutput:
        """Return the token-level loss of teacher-forced decoding, with the model's label
        smoothing; position t of the shifted target predicts token t + 1."""
        logits = model(batch.source, batch.target[:, :-1])  # (B, T-1, V)
        gold = batch.target[:, 1:]  # (B, T-1)
        loss_sum, count = token_cross_entropy(logits, gold, PAD_ID,
                                              getattr(model, "label_smoothing", 0.0))
        correct = ((logits.argmax(-1) == gold) & (gold != PAD_ID)).sum()
        return LossOutput(loss_sum, count, {"token_accuracy": correct})

    def evaluate(self, model: nn.Module) -> dict[str, float | str]:
        """Return ``val_loss`` (the training criterion), ``val_ppl`` (perplexity without
        label smoothing) and, in BLEU epochs, ``test_bleu`` and ``bleu_signature``."""
        smoothing = getattr(model, "label_smoothing", 0.0)
        loss_total, nll_total, count = 0.0, 0.0, 0
        for batch in self.val_loader:
            logits = model(batch.source, batch.target[:, :-1])
            gold = batch.target[:, 1:]
            loss_sum, batch_count = token_cross_entropy(logits, gold, PAD_ID, smoothing)
            nll_sum, _ = token_cross_entropy(logits, gold, PAD_ID, 0.0)
            loss_total += loss_sum.item()
            nll_total += nll_sum.item()
            count += int(batch_count)

        if count == 0:
            raise ValueError("the validation split has no target tokens to score; check "
                             "dataset.val_subset and the val files under dataset.root")

        # exp overflows above about 709; a perplexity that large means "untrained" anyway.
        metrics: dict[str, float | str] = {"val_loss": loss_total / count,
                                           "val_ppl": math.exp(min(nll_total / count, 700.0))}

        # train_loader.epoch counts the training passes made so far, resumed runs included.
        epoch = self.train_loader.epoch
        if epoch % self.cfg.dataset.bleu_every == 0 or epoch >= self.cfg.trainer.epochs:
            bleu = self.test_bleu(model)
            metrics["test_bleu"] = bleu.score
            metrics["bleu_signature"] = bleu.signature
        return metrics

    def test_bleu(self, model: nn.Module) -> BleuScore:
        """Decode the test split and score it; also write the hypotheses to the run directory."""
        data_cfg = self.cfg.dataset
        hypotheses = translate(model, self.corpus.test.dataset, self.pipeline,
                               data_cfg.eval_batch_size, self.device, data_cfg.beam_size,
                               data_cfg.length_penalty, data_cfg.decode_extra_len)
        if self.run_dir is not None:
            (self.run_dir / TEST_HYPOTHESES_FILE).write_text(
                "".join(line + "\n" for line in hypotheses), encoding="utf-8")
        return compute_bleu(hypotheses, self.corpus.test.references, self.pipeline.lowercase)

    def state_dict(self) -> dict:
        return {"train_loader": self.train_loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.train_loader.load_state_dict(state["train_loader"])

    def describe(self) -> dict:
        data_cfg = self.cfg.dataset
        return {
            "name": data_cfg.name,
            "root": self.root,
            "languages": f"{data_cfg.source_language}-{data_cfg.target_language}",
            "train_pairs": len(self.corpus.train.dataset),
            "val_pairs": len(self.corpus.val.dataset),
            "test_pairs": len(self.corpus.test.dataset),
            "source_vocab_size": len(self.pipeline.source_vocab),
            "target_vocab_size": len(self.pipeline.target_vocab),
            "lowercase": self.pipeline.lowercase,
            "min_freq": self.pipeline.min_freq,
        }

    def save_artifacts(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.pipeline.save(self.run_dir / VOCAB_FILE)
