"""Attacks that recover which tokens were in the batch.

- **Token set from an embedding LoRA** (Melis et al., 2019, "Exploiting Unintended
  Feature Leakage", §V-A for embeddings; the same holds for LoRA on embeddings): peft's
  embedding LoRA looks up columns of A (r × V) by token id, so a gradient step touches
  exactly the columns of the batch's tokens: the non-zero columns of ΔA *are* the token
  set (with B ≠ 0; peft starts embedding LoRA with A = 0 and B random, so from round 1).
- **Span test on first-layer LoRA** (DAGER; Petrov et al., 2024, "DAGER: Exact Gradient
  Inversion for Large Language Models", §4): for a linear map applied to the layer's
  inputs x_t, ∇A = s Bᵀ Σ_t g_t x_tᵀ, so every row of ΔA lies in span{x_t}. The layer-0
  inputs of an encoder with absolute positions are LN(E[v] + P[p] + T[0]), computable for
  every token v and position p: a candidate lies in the row space of ΔA (stacked over
  the layer's adapted maps) iff it was in the batch — exactly so when the batch has no
  more (token, position) pairs than the row space has dimensions (≤ the summed ranks).
  Sums of plain SGD steps on one batch stay in the span (fedAvg with SGD); Adam's
  per-coordinate scaling, noise and sparsification do not. A rotary-position decoder
  (Llama) adds positions after the projections, so its layer-0 inputs are RMSNorm(E[v])
  for every position alike: the test then recovers which vocabulary tokens were in the
  batch, not where.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from fedpeft.audit.base import Guess, Public
from fedpeft.audit.threat import ServerView
from fedpeft.models import load_base_config, load_tokenizer

EMBEDDING_A = "lora_embedding_A"


class TokenSet:
    name = "token_set"

    def unavailable(self, view: ServerView) -> str | None:
        if not any(EMBEDDING_A in k for k in view.update):
            return "no embedding LoRA in the update"
        return None

    def run(self, view: ServerView, public: Public) -> Guess:
        tokens: set[int] = set()
        for key in (k for k in view.update if EMBEDDING_A in k):
            column_norms = np.linalg.norm(view.update[key].astype(np.float64), axis=0)  # (V,)
            tokens |= {int(v) for v in np.flatnonzero(column_norms > 0)}
        return Guess(tokens=frozenset(tokens))


class SpanTest:
    """DAGER's span check on the adapted maps of transformer layer 0."""

    name = "span"

    def __init__(self, tolerance: float = 0.05) -> None:
        self.tolerance = tolerance  # relative distance to the span that counts as inside

    def unavailable(self, view: ServerView) -> str | None:
        if not first_layer_a(view.update):
            return "no LoRA on transformer layer 0"
        if load_base_config(view.cfg.model, view.num_labels).model_type not in SPAN_MODELS:
            return (
                "layer-0 inputs are computed for BERT (absolute positions) and Llama "
                "(rotary positions) only"
            )
        return None

    def run(self, view: ServerView, public: Public) -> Guess:
        spans = self.spans(view)
        found = self.inside_span(view, spans)  # position -> tokens
        tokens = frozenset(v for found_at in found.values() for v in found_at)
        notes = (f"span dimensions {[basis.shape[0] for _, basis in spans]}",)
        if view.cfg.train.batch_size != 1:
            return Guess(tokens=tokens, notes=notes)
        tok = load_tokenizer(view.cfg.model.name)
        if load_base_config(view.cfg.model, view.num_labels).model_type == "llama":
            return Guess(tokens=tokens, notes=notes)  # tokens, but not their order
        sequence = [vs[0] for _, vs in sorted(found.items()) if len(vs) == 1]
        text = str(tok.decode(sequence, skip_special_tokens=True))
        return Guess(tokens=tokens, texts=(text,), notes=notes)

    def spans(self, view: ServerView) -> list[Span]:
        """(projection, basis) pairs: an input x of the batch has x Pᵀ in the basis's
        span for each (P = None: x itself). Here the rows of ΔA, stacked."""
        sent = [view.sent[k] for k in first_layer_keys(view.update)]
        return [(None, row_space(first_layer_a(view.update), rounding_floor(sent)))]

    @torch.no_grad()
    def inside_span(self, view: ServerView, spans: list[Span]) -> dict[int, list[int]]:
        """For every position, the tokens whose layer-0 input passes every span test."""
        embeddings = _layer0_inputs(view.global_model())
        vocab = len(load_tokenizer(view.cfg.model.name))
        ids = torch.arange(vocab)[:, None]  # (V, 1)
        tests = [
            (None if p is None else torch.from_numpy(p).float(), torch.from_numpy(q).float())
            for p, q in spans
        ]
        found: dict[int, list[int]] = {}
        rotary = load_base_config(view.cfg.model, view.num_labels).model_type == "llama"
        for position in [0] if rotary else range(view.cfg.model.max_length):
            x = embeddings(ids, position)  # (V, n)
            distance = torch.zeros(vocab)
            for projection, q in tests:
                y = x if projection is None else x @ projection.T  # (V, n) or (V, r)
                residual = y - (y @ q.T) @ q
                relative = residual.norm(dim=1) / y.norm(dim=1).clamp_min(1e-12)
                distance = torch.maximum(distance, relative)
            hits = torch.nonzero(distance < self.tolerance).flatten().tolist()
            if hits:
                found[position] = [int(v) for v in hits]
        return found


Span = tuple[np.ndarray | None, np.ndarray]  # (projection P or None, orthonormal basis)


class ProjectedSpanTest(SpanTest):
    """DAGER's test on ΔB through the known A (§4.2): ΔB = −η s Σ_t g_t (A x_t)ᵀ, so
    the rows of ΔB span {A x_t} in R^r. It works in round 1, when B = 0 makes ΔA zero,
    but only while the batch has fewer (token, position) pairs than r: beyond that the
    span is all of R^r and tells nothing. Every layer-0 map must agree."""

    name = "span_b"

    def unavailable(self, view: ServerView) -> str | None:
        reason = super().unavailable(view)
        if reason is not None:
            return reason
        if all(q.shape[0] >= q.shape[1] for _, q in self.spans(view)):
            return "ΔB spans all of R^r (the batch has at least r token positions)"
        return None

    def spans(self, view: ServerView) -> list[Span]:
        out: list[Span] = []
        for key_a in first_layer_keys(view.update):
            key_b = key_a.replace(".lora_A.", ".lora_B.")
            floor = rounding_floor([view.sent[key_b]])
            basis = row_space([view.update[key_b]], floor)  # (k, r)
            if basis.shape[0] < basis.shape[1]:  # a full span excludes nothing
                out.append((view.sent[key_a].astype(np.float64), basis))
        return out


SPAN_MODELS = ("bert", "llama")
# the maps of transformer layer 0 that read the layer's input (BERT's or Llama's naming)
_FIRST_LAYER_A = re.compile(r"\.layers?\.0\..*\b(query|key|value|q_proj|k_proj|v_proj)\.lora_A\.")


def first_layer_keys(update: dict[str, np.ndarray]) -> list[str]:
    """The A factors of every adapted map of transformer layer 0 that reads its input."""
    return [k for k in sorted(update) if _FIRST_LAYER_A.search(k)]


def first_layer_a(update: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [update[k] for k in first_layer_keys(update)]


def rounding_floor(sent: list[np.ndarray]) -> float:
    """Singular values of Δ = fl(A − η g) − A below this are float32 rounding of A, not
    signal: about twice the spectral norm of a matrix of rounding errors ε · rms(A)."""
    stacked = np.concatenate([a.astype(np.float64) for a in sent], axis=0)  # (Σr, n)
    rms = float(np.sqrt(np.mean(stacked**2)))
    return 2 * float(np.finfo(np.float32).eps) * rms * float(np.sqrt(max(stacked.shape)))


def row_space(deltas: list[np.ndarray], floor: float) -> np.ndarray:
    """Orthonormal basis (k × n) of the rows of the stacked ΔA's, singular values above
    ``floor``. The spectrum spans orders of magnitude (tokens far from the loss get small
    gradients), so a threshold relative to σ_max would drop real directions."""
    stacked = np.concatenate([d.astype(np.float64) for d in deltas], axis=0)  # (Σr, n)
    _, s, vt = np.linalg.svd(stacked, full_matrices=False)
    if s.size == 0 or s[0] == 0:
        return np.zeros((0, stacked.shape[1]))
    # and float32 arithmetic in the gradient itself (what is left when A or B was zero)
    return np.asarray(vt[s > max(floor, 1e-6 * s[0])])


def _layer0_inputs(model: torch.nn.Module) -> Any:
    """(token ids (V, 1), position) -> the (V, n) inputs of layer 0's attention maps."""
    for _, module in model.named_modules():
        if type(module).__name__.endswith("Embeddings") and hasattr(module, "position_embeddings"):
            bert = module  # LN(E[v] + P[p] + T[0])
            return lambda ids, p: bert(
                input_ids=ids,
                token_type_ids=torch.zeros_like(ids),
                position_ids=torch.full_like(ids, p),
            )[:, 0]
        if hasattr(module, "embed_tokens") and hasattr(module, "layers"):
            embed, norm = module.embed_tokens, module.layers[0].input_layernorm
            return lambda ids, _p: norm(embed(ids))[:, 0]  # RMSNorm(E[v]); RoPE comes later
    raise ValueError("The model has neither BERT-style embeddings nor a Llama decoder.")
