"""Encoder-decoder Transformer (Vaswani et al. 2017, "Attention Is All You Need") for
translation, with greedy and beam-search decoding.

Every tensor is batch-first and every projection (queries, keys, values, attention output,
both FFN layers, the generator) is a plain ``nn.Linear`` called exactly once per forward
pass, on input whose dimension 0 is the sentence. That is what FNGD, KFAC and Shampoo need to
precondition all of them: they hook ``nn.Linear`` modules and treat dimension 0 as the
sample dimension. Attention itself runs in ``F.scaled_dot_product_attention``.

Masks are boolean with True meaning "may attend". Padding must be on the right, as
``data.text.pad_sequences`` makes it.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# The special token ids of data/text.py; repeated here so that models does not import data.
PAD_ID, BOS_ID, EOS_ID = 1, 2, 3


def padding_mask(tokens: torch.Tensor, pad_id: int = PAD_ID) -> torch.Tensor:
    """Return the key mask (B, 1, 1, L) of a (B, L) batch: True at real tokens."""
    return (tokens != pad_id)[:, None, None, :]


def causal_mask(length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Return the (L, L) mask that lets position i attend to positions 0..i."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


def target_mask(target: torch.Tensor, pad_id: int = PAD_ID) -> torch.Tensor:
    """Return the decoder self-attention mask (B, 1, T, T): causal and not at padding."""
    return padding_mask(target, pad_id) & causal_mask(target.shape[1], target.device)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with one ``nn.Linear`` each for queries, keys, values and output."""

    def __init__(self, d_model: int, heads: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} must be divisible by heads={heads}")
        self.heads = heads
        self.head_dim = d_model // heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, query: torch.Tensor, key_value: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attend from ``query`` (B, Tq, D) to ``key_value`` (B, Tk, D) under ``mask``
        (broadcastable to (B, heads, Tq, Tk)); return (B, Tq, D)."""
        batch, query_len, d_model = query.shape
        key_len = key_value.shape[1]

        def split_heads(x: torch.Tensor, length: int) -> torch.Tensor:
            return x.view(batch, length, self.heads, self.head_dim).transpose(1, 2)

        q = split_heads(self.q_proj(query), query_len)  # (B, H, Tq, Dh)
        k = split_heads(self.k_proj(key_value), key_len)  # (B, H, Tk, Dh)
        v = split_heads(self.v_proj(key_value), key_len)  # (B, H, Tk, Dh)

        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        attended = attended.transpose(1, 2).reshape(batch, query_len, d_model)
        return self.out_proj(attended)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int, dropout: float, activation: str):
        super().__init__()
        activations = {"relu": nn.ReLU, "gelu": nn.GELU}
        if activation not in activations:
            raise ValueError(f"activation must be one of {sorted(activations)}, got "
                             f"{activation!r}")
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.activation = activations[activation]()
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, heads: int, ffn_dim: int, dropout: float,
                 attention_dropout: float, activation: str, norm_first: bool):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, heads, attention_dropout)
        self.ffn = FeedForward(d_model, ffn_dim, dropout, activation)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.norm_first:
            h = self.norm1(x)
            x = x + self.dropout(self.self_attn(h, h, mask))
            return x + self.dropout(self.ffn(self.norm2(x)))

        x = self.norm1(x + self.dropout(self.self_attn(x, x, mask)))
        return self.norm2(x + self.dropout(self.ffn(x)))


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, heads: int, ffn_dim: int, dropout: float,
                 attention_dropout: float, activation: str, norm_first: bool):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, heads, attention_dropout)
        self.cross_attn = MultiHeadAttention(d_model, heads, attention_dropout)
        self.ffn = FeedForward(d_model, ffn_dim, dropout, activation)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, y: torch.Tensor, memory: torch.Tensor, self_mask: torch.Tensor,
                memory_mask: torch.Tensor) -> torch.Tensor:
        if self.norm_first:
            h = self.norm1(y)
            y = y + self.dropout(self.self_attn(h, h, self_mask))
            y = y + self.dropout(self.cross_attn(self.norm2(y), memory, memory_mask))
            return y + self.dropout(self.ffn(self.norm3(y)))

        y = self.norm1(y + self.dropout(self.self_attn(y, y, self_mask)))
        y = self.norm2(y + self.dropout(self.cross_attn(y, memory, memory_mask)))
        return self.norm3(y + self.dropout(self.ffn(y)))


def sinusoidal_positions(max_len: int, d_model: int) -> torch.Tensor:
    """Return the (max_len, d_model) sine/cosine position table of Vaswani et al."""
    position = torch.arange(max_len, dtype=torch.float64)[:, None]
    frequency = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64)
                          * (-math.log(10000.0) / d_model))
    table = torch.zeros(max_len, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[:d_model // 2])
    return table.float()


class TokenEmbedding(nn.Module):
    """Token embedding scaled by sqrt(d_model), plus sinusoidal or learned positions."""

    def __init__(self, vocab_size: int, d_model: int, max_len: int, positions: str,
                 dropout: float, pad_id: int):
        super().__init__()
        self.max_len = max_len
        self.scale = math.sqrt(d_model)
        self.tokens = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        if positions == "sinusoidal":
            self.register_buffer("position_table", sinusoidal_positions(max_len, d_model),
                                 persistent=False)
            self.positions = None
        elif positions == "learned":
            self.positions = nn.Embedding(max_len, d_model)
        else:
            raise ValueError(f"positions must be 'sinusoidal' or 'learned', got {positions!r}")
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(f"a batch of {length} tokens exceeds the model's max_len="
                             f"{self.max_len}; truncate the data to max_len or build the model "
                             "with a larger model.max_len")
        if self.positions is None:
            positions = self.position_table[:length]
        else:
            positions = self.positions.weight[:length]
        return self.dropout(self.tokens(tokens) * self.scale + positions)


class Transformer(nn.Module):
    """Encoder-decoder Transformer that maps source ids (B, S) and target ids (B, T) to
    next-token logits (B, T, target vocabulary).

    Defaults are the base model of Vaswani et al.: d_model 512, FFN 2048, 8 heads, 6 encoder
    and 6 decoder layers, dropout 0.1, post-norm residual blocks, sinusoidal positions.
    ``layers`` sets both stacks unless ``encoder_layers``/``decoder_layers`` are given.
    ``label_smoothing`` is used by ``loss``. ``tie_embeddings`` shares the target embedding
    with the generator; FNGD and the baselines then leave that shared matrix on the plain
    gradient, so it is off by default.
    """

    def __init__(self, source_vocab_size: int, target_vocab_size: int, d_model: int = 512,
                 ffn_dim: int = 2048, heads: int = 8, layers: int = 6,
                 encoder_layers: Optional[int] = None, decoder_layers: Optional[int] = None,
                 dropout: float = 0.1, attention_dropout: float = 0.0,
                 activation: str = "relu", norm_first: bool = False,
                 positions: str = "sinusoidal", max_len: int = 256,
                 label_smoothing: float = 0.1, tie_embeddings: bool = False,
                 pad_id: int = PAD_ID):
        super().__init__()
        encoder_layers = layers if encoder_layers is None else encoder_layers
        decoder_layers = layers if decoder_layers is None else decoder_layers
        checks = {"source_vocab_size": source_vocab_size, "target_vocab_size": target_vocab_size,
                  "d_model": d_model, "ffn_dim": ffn_dim, "heads": heads,
                  "encoder_layers": encoder_layers, "decoder_layers": decoder_layers,
                  "max_len": max_len}
        for name, value in checks.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        for name, value in (("dropout", dropout), ("attention_dropout", attention_dropout),
                            ("label_smoothing", label_smoothing)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")

        self.pad_id = pad_id
        self.max_len = max_len
        self.label_smoothing = label_smoothing
        self.norm_first = norm_first

        self.source_embedding = TokenEmbedding(source_vocab_size, d_model, max_len, positions,
                                               dropout, pad_id)
        self.target_embedding = TokenEmbedding(target_vocab_size, d_model, max_len, positions,
                                               dropout, pad_id)
        block = dict(d_model=d_model, heads=heads, ffn_dim=ffn_dim, dropout=dropout,
                     attention_dropout=attention_dropout, activation=activation,
                     norm_first=norm_first)
        self.encoder_layers = nn.ModuleList(EncoderLayer(**block) for _ in range(encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(**block) for _ in range(decoder_layers))
        # Pre-norm stacks end un-normalised, so they get a final LayerNorm.
        self.encoder_norm = nn.LayerNorm(d_model) if norm_first else nn.Identity()
        self.decoder_norm = nn.LayerNorm(d_model) if norm_first else nn.Identity()
        self.generator = nn.Linear(d_model, target_vocab_size)

        self._reset_parameters()
        if tie_embeddings:
            self.generator.weight = self.target_embedding.tokens.weight

    def _reset_parameters(self) -> None:
        # Xavier-uniform matrices, as the reference implementations of the paper used.
        for name, parameter in self.named_parameters():
            if parameter.dim() > 1 and "positions" not in name:
                nn.init.xavier_uniform_(parameter)
        for module in self.modules():
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    def encode(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode source ids (B, S); return the memory (B, S, D) and its mask (B, 1, 1, S)."""
        source_mask = padding_mask(source, self.pad_id)
        x = self.source_embedding(source)
        for layer in self.encoder_layers:
            x = layer(x, source_mask)
        return self.encoder_norm(x), source_mask

    def decode(self, target: torch.Tensor, memory: torch.Tensor,
               source_mask: torch.Tensor) -> torch.Tensor:
        """Return next-token logits (B, T, V) for target prefixes (B, T) that start with <bos>."""
        self_mask = target_mask(target, self.pad_id)
        y = self.target_embedding(target)
        for layer in self.decoder_layers:
            y = layer(y, memory, self_mask, source_mask)
        return self.generator(self.decoder_norm(y))

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        memory, source_mask = self.encode(source)
        return self.decode(target, memory, source_mask)

    def loss(self, source: torch.Tensor, target: torch.Tensor,
             label_smoothing: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the summed token cross-entropy of teacher-forced ``target`` (B, T), framed
        by <bos> and <eos>, and the number of predicted (non-padding) tokens.

        ``label_smoothing`` defaults to the model's own; pass 0 for the plain likelihood.
        """
        smoothing = self.label_smoothing if label_smoothing is None else label_smoothing
        logits = self(source, target[:, :-1])  # (B, T-1, V)
        return token_cross_entropy(logits, target[:, 1:], self.pad_id, smoothing)


def token_cross_entropy(logits: torch.Tensor, gold: torch.Tensor, pad_id: int = PAD_ID,
                        label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the cross-entropy of ``logits`` (B, T, V) against ``gold`` (B, T) summed over
    the non-padding positions, computed in float32 or better, and the number of them."""
    summed = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), gold.reshape(-1),
                             ignore_index=pad_id, reduction="sum",
                             label_smoothing=label_smoothing)
    return summed, (gold != pad_id).sum()


def _max_output_len(model: Transformer, source: torch.Tensor, extra_len: int) -> int:
    """Longest decoded sentence (without <bos>): the longest source plus ``extra_len``."""
    longest_source = int((source != model.pad_id).sum(dim=1).max())
    return max(1, min(longest_source + extra_len, model.max_len - 1))


def _next_token_log_probs(model: Transformer, prefixes: torch.Tensor, memory: torch.Tensor,
                          source_mask: torch.Tensor) -> torch.Tensor:
    """Return log-probabilities (N, V) of the token after each prefix (N, t).

    <pad> and <bos> are never generated, so they get probability zero.
    """
    logits = model.decode(prefixes, memory, source_mask)[:, -1].float()
    logits[:, [model.pad_id, BOS_ID]] = float("-inf")
    return F.log_softmax(logits, dim=-1)


@torch.no_grad()
def greedy_decode(model: Transformer, source: torch.Tensor, extra_len: int = 10) -> torch.Tensor:
    """Decode a batch by taking the most likely token at each step.

    Returns (B, L) ids without <bos>: each row ends with <eos> and then <pad>, or stops at
    the length limit (longest source + ``extra_len``, at most ``model.max_len - 1``).
    """
    memory, source_mask = model.encode(source)
    batch = source.shape[0]
    output = torch.full((batch, 1), BOS_ID, dtype=torch.long, device=source.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=source.device)

    for _ in range(_max_output_len(model, source, extra_len)):
        log_probs = _next_token_log_probs(model, output, memory, source_mask)  # (B, V)
        next_token = log_probs.argmax(dim=-1)
        next_token = next_token.masked_fill(finished, model.pad_id)
        output = torch.cat([output, next_token[:, None]], dim=1)
        finished |= next_token == EOS_ID
        if bool(finished.all()):
            break
    return output[:, 1:]


def length_penalty(length: int, alpha: float) -> float:
    """GNMT length penalty ((5 + length) / 6) ** alpha (Wu et al. 2016); 1 at alpha 0."""
    return ((5.0 + length) / 6.0) ** alpha


@torch.no_grad()
def beam_search(model: Transformer, source: torch.Tensor, beam_size: int = 4,
                alpha: float = 0.6, extra_len: int = 10) -> torch.Tensor:
    """Decode a batch with beam search, all sentences and beams in one forward pass a step.

    Each step extends every live hypothesis by every token and keeps, per sentence, the
    ``beam_size`` best unfinished ones by summed log-probability; a candidate that ends in
    <eos> becomes a finished hypothesis scored by its log-probability divided by
    ``length_penalty(its length with <eos>, alpha)``. A sentence stops when it has
    ``beam_size`` finished hypotheses or reaches the length limit (where its live
    hypotheses are closed as if <eos> followed). At ``beam_size`` 1 this is greedy
    decoding. Returns (B, L) ids like ``greedy_decode``.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be at least 1, got {beam_size}")
    if alpha < 0:
        raise ValueError(f"length penalty alpha must be non-negative, got {alpha}")

    device = source.device
    batch = source.shape[0]
    max_output_len = _max_output_len(model, source, extra_len)

    memory, source_mask = model.encode(source)
    memory = memory.repeat_interleave(beam_size, dim=0)  # (B*K, S, D)
    source_mask = source_mask.repeat_interleave(beam_size, dim=0)

    # Only the first beam of each sentence is live at the start, so that the K initial
    # candidates are K different tokens and not K copies of one.
    scores = torch.full((batch, beam_size), float("-inf"), device=device)
    scores[:, 0] = 0.0
    hypotheses = torch.full((batch * beam_size, 1), BOS_ID, dtype=torch.long, device=device)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    done = [False] * batch

    for step in range(max_output_len):
        log_probs = _next_token_log_probs(model, hypotheses, memory, source_mask)  # (B*K, V)
        vocab_size = log_probs.shape[-1]
        candidates = (scores.view(-1, 1) + log_probs).view(batch, beam_size * vocab_size)
        top_scores, top_indices = candidates.topk(min(2 * beam_size, candidates.shape[1]), dim=1)

        # The next live beams: (source beam, token, score) for every slot.
        next_beam = torch.zeros(batch, beam_size, dtype=torch.long)
        next_token = torch.full((batch, beam_size), model.pad_id, dtype=torch.long)
        next_scores = torch.full((batch, beam_size), float("-inf"))
        top_scores_list = top_scores.tolist()
        top_indices_list = top_indices.tolist()
        previous = hypotheses.tolist()
        last_step = step == max_output_len - 1

        for b in range(batch):
            if done[b]:
                continue
            slot = 0
            for rank, (score, index) in enumerate(zip(top_scores_list[b], top_indices_list[b])):
                if score == float("-inf") or (slot == beam_size and rank >= beam_size):
                    break
                beam, token = divmod(index, vocab_size)
                if token == EOS_ID:
                    # Like fairseq, only an <eos> among the K best candidates finishes a
                    # hypothesis; at K = 1 that makes this greedy decoding.
                    if rank < beam_size:
                        tokens = previous[b * beam_size + beam][1:] + [EOS_ID]
                        finished[b].append((score / length_penalty(len(tokens), alpha), tokens))
                    continue
                if slot < beam_size:
                    next_beam[b, slot] = beam
                    next_token[b, slot] = token
                    next_scores[b, slot] = score
                    slot += 1

            if len(finished[b]) >= beam_size:
                done[b] = True
            elif last_step:
                # Out of length: the live beams compete as they are, without <eos>.
                for slot in range(beam_size):
                    if next_scores[b, slot] == float("-inf"):
                        continue
                    beam = int(next_beam[b, slot])
                    tokens = previous[b * beam_size + beam][1:] + [int(next_token[b, slot])]
                    finished[b].append(
                        (float(next_scores[b, slot]) / length_penalty(len(tokens), alpha),
                         tokens))
                done[b] = True

        if all(done):
            break

        # Reorder the live hypotheses; finished sentences keep dead (-inf) beams.
        origin = (torch.arange(batch)[:, None] * beam_size + next_beam).view(-1).to(device)
        hypotheses = torch.cat([hypotheses[origin], next_token.view(-1, 1).to(device)], dim=1)
        scores = next_scores.to(device)
        for b in range(batch):
            if done[b]:
                scores[b] = float("-inf")

    best = [max(entries, key=lambda entry: entry[0])[1] if entries else [EOS_ID]
            for entries in finished]
    output = torch.full((batch, max(len(tokens) for tokens in best)), model.pad_id,
                        dtype=torch.long, device=device)
    for b, tokens in enumerate(best):
        output[b, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return output
