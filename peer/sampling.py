"""Next-token sampling for one session: processors, seeded draws, logprobs.

Processor order (as in HF ``generate`` / vLLM):

1. ``logit_bias`` (OpenAI): added to the raw logits.
2. ``repetition_penalty`` (HF semantics): every token that occurs in the history (prompt and
   generated) has its logit divided by the penalty when positive, multiplied when negative.
3. ``presence_penalty`` / ``frequency_penalty`` (OpenAI semantics): ``logit -= frequency * count +
   presence * (count > 0)``, counting ``history[penalty_start:]``; pass the prompt length as
   ``penalty_start`` to count only generated tokens as OpenAI does.
4. ``allowed_token_ids``: every other token gets ``-inf``.
5. temperature (0, or below ``GREEDY_BELOW_TEMPERATURE``, means greedy: argmax, ties to the
   lowest id, steps 6-8 skipped), then
6. top-k, 7. top-p (nucleus), 8. min-p, and a draw from the remaining distribution (inverse
   transform: one seeded uniform against the cumulative distribution; top-p ranks only the head
   of the distribution, `_nucleus`). The last span samples once per session in every pass, so the
   textbook formulation (a full sort, `torch.multinomial`: ~1-3 ms at a 32k vocabulary) would cost
   a pass of 16 streams more than a block does (`loadtests/bench_sampling.py`).

Logprobs (``SampleResult.logprob`` and ``top_logprobs``) are ``log_softmax`` of the logits after
steps 1-3 (bias and penalties) and BEFORE the allowed-token mask, temperature and truncation: the
model's view of the token, not the sampler's, like vLLM's default raw logprobs plus the request's
own bias/penalties. A token outside a top-p cut still reports its real probability.
``prompt_logprobs`` scores tokens that were given, not sampled (the prompt, for ``echo``): the same
``log_softmax`` of the raw logits, without bias or penalties.

Seeding: the draw for the token at absolute position ``p = len(history)`` uses a generator seeded
from ``(seed, p)``. So the same seed gives the same tokens, and the draw does not depend on how many
draws this ``Sampler`` made before: a peer that replaces a failed one and replays the session
continues the exact sequence. This needs the FULL sequence (prompt and generated) as history, which
the last span always has.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

_MASK64 = (1 << 64) - 1
#: The most alternatives a prompt-logprobs step may ask for per position (``Step.prompt_logprobs``),
#: the gateway's bound on ``top_logprobs`` (OpenAI's): each prompt token carries this many.
MAX_TOP_LOGPROBS = 20

# Numerically safe ranges (network input; ``SamplingParams`` refuses anything outside them). A
# peer must never divide logits into infinities: one session's NaN would fail the sampling of
# every session in its forward pass. So a temperature below GREEDY_BELOW_TEMPERATURE is greedy
# (vLLM's rule: 1e-45 made every logit infinite), a repetition penalty divides or multiplies by at
# most 100, and biases and presence / frequency penalties stay within +-100 (OpenAI's own bounds
# are +-100 and +-2): with finite logits, every processor and the smallest temperature together
# stay many orders of magnitude inside fp32's range. `Sampler.sample` still refuses non-finite
# logits and probabilities (ValueError), and the scheduler fails only that session's step.
GREEDY_BELOW_TEMPERATURE = 1e-5
REPETITION_PENALTY_RANGE = (0.01, 100.0)
PENALTY_LIMIT = 100.0
LOGIT_BIAS_LIMIT = 100.0


@dataclass
class SamplingParams:
    """One request's sampling settings. Neutral defaults: plain sampling at temperature 1."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) means off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        def finite(name: str, value: float) -> float:
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
            return value

        def within(name: str, value: float, low: float, high: float) -> float:
            value = finite(name, value)
            if not low <= value <= high:
                raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value:g}")
            return value

        self.temperature = finite("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.temperature < GREEDY_BELOW_TEMPERATURE:
            self.temperature = 0.0  # dividing by it would overflow the logits: greedy, as vLLM does
        self.top_p = finite("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.top_k = int(self.top_k)
        if self.top_k == -1:  # vLLM's spelling of "off"
            self.top_k = 0
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        self.min_p = finite("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        self.repetition_penalty = within(
            "repetition_penalty", self.repetition_penalty, *REPETITION_PENALTY_RANGE
        )
        self.presence_penalty = within(
            "presence_penalty", self.presence_penalty, -PENALTY_LIMIT, PENALTY_LIMIT
        )
        self.frequency_penalty = within(
            "frequency_penalty", self.frequency_penalty, -PENALTY_LIMIT, PENALTY_LIMIT
        )
        bias = {}
        for token_id, value in dict(self.logit_bias).items():
            if int(token_id) < 0:
                raise ValueError(f"logit_bias token id must be >= 0, got {token_id}")
            bias[int(token_id)] = within(
                f"logit_bias[{token_id}]", value, -LOGIT_BIAS_LIMIT, LOGIT_BIAS_LIMIT
            )
        self.logit_bias = bias
        if self.seed is not None:
            self.seed = int(self.seed)
            if not -(1 << 63) <= self.seed <= _MASK64:
                raise ValueError(f"seed must fit in 64 bits, got {self.seed}")
        self.top_logprobs = int(self.top_logprobs)
        if self.top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {self.top_logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_message(cls, message: Any, vocab_size: int) -> SamplingParams:
        """From a ``swarm.SamplingParams`` message (network input), whose zeros mean "unset" (see
        swarm.proto). ValueError for anything out of range (a negative or NaN ``top_p`` or
        ``repetition_penalty`` is refused, not taken for "unset"), ``logit_bias`` ids past the
        vocabulary and ``top_logprobs`` past MAX_TOP_LOGPROBS included; the servicer answers it
        with INVALID_ARGUMENT.

        Duck-typed so this module does not import the generated protobuf code.
        """
        bias = {int(token): float(value) for token, value in message.logit_bias.items()}
        if any(not 0 <= token < vocab_size for token in bias):
            raise ValueError(f"logit_bias token ids must be in [0, {vocab_size})")
        if not 0 <= message.top_logprobs <= MAX_TOP_LOGPROBS:  # each answer carries this many
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {message.top_logprobs}")
        return cls(
            temperature=message.temperature,
            top_p=message.top_p if message.top_p != 0 else 1.0,
            top_k=message.top_k,
            min_p=message.min_p,
            repetition_penalty=message.repetition_penalty if message.repetition_penalty != 0 else 1.0,
            presence_penalty=message.presence_penalty,
            frequency_penalty=message.frequency_penalty,
            logit_bias=bias,
            seed=message.seed if message.HasField("seed") else None,
            logprobs=message.logprobs,
            top_logprobs=message.top_logprobs,
        )


@dataclass(frozen=True)
class SampleResult:
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]]  # best first; ties by lower id


class Sampler:
    """Samples one session's tokens with its ``SamplingParams``; holds the session's seed."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        # A random seed when none is given, drawn once: the session stays reproducible for itself.
        self.seed = params.seed if params.seed is not None else secrets.randbits(64)
        self.generator = torch.Generator(device="cpu")

    def sample(
        self,
        logits: torch.Tensor,
        history_token_ids: Sequence[int] | torch.Tensor = (),
        allowed_token_ids: Sequence[int] | torch.Tensor | None = None,
        *,
        penalty_start: int = 0,
    ) -> SampleResult:
        """Pick the next token from ``logits`` ``[V]``; ``history_token_ids`` is the sequence so far."""
        if logits.dim() != 1 or logits.numel() == 0:
            raise ValueError(f"logits must be a non-empty 1-D tensor, got shape {tuple(logits.shape)}")
        params, vocab = self.params, logits.numel()
        scores = logits.detach().to("cpu", torch.float32).clone()
        if not _all_finite(scores):
            raise ValueError("the logits are not finite (NaN or infinity in the hidden states)")
        penalised = params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty
        # the history grows with the sequence: only turn it into a tensor when a penalty reads it
        history = _token_ids(history_token_ids if penalised else (), vocab, "history_token_ids")
        position = len(history_token_ids)

        self._apply_bias(scores, vocab)
        if params.repetition_penalty != 1.0 and history.numel():
            seen = history.unique()
            picked = scores[seen]
            scores[seen] = torch.where(
                picked < 0, picked * params.repetition_penalty, picked / params.repetition_penalty
            )
        if (params.presence_penalty or params.frequency_penalty) and history.numel() > penalty_start:
            counts = torch.bincount(history[max(penalty_start, 0) :], minlength=vocab).float()
            scores -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
        logprobs = torch.log_softmax(scores, dim=-1)

        if allowed_token_ids is not None:
            allowed = _token_ids(allowed_token_ids, vocab, "allowed_token_ids")
            if allowed.numel() == 0:
                raise ValueError("allowed_token_ids is empty")
            masked = torch.full_like(scores, -math.inf)
            masked[allowed] = scores[allowed]
            scores = masked

        if params.greedy:
            token_id = int(torch.argmax(scores))
        else:
            token_id = self._draw(self._truncate(scores / params.temperature), position=position)
        top = _top_logprobs(logprobs, params.top_logprobs) if params.top_logprobs else []
        return SampleResult(token_id, float(logprobs[token_id]), top)

    def _apply_bias(self, scores: torch.Tensor, vocab: int) -> None:
        if not self.params.logit_bias:
            return
        ids = torch.tensor(list(self.params.logit_bias), dtype=torch.long)
        if int(ids.max()) >= vocab:
            raise ValueError(f"logit_bias names token {int(ids.max())}, vocabulary has {vocab}")
        scores[ids] += torch.tensor(list(self.params.logit_bias.values()), dtype=torch.float32)

    def _truncate(self, scores: torch.Tensor) -> torch.Tensor:
        """top-k, then top-p, then min-p, on temperature-scaled scores; always keeps the best token."""
        params, vocab = self.params, scores.numel()
        if 0 < params.top_k < vocab:
            kth = torch.topk(scores, params.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, -math.inf)
        if params.top_p < 1.0:
            scores = _nucleus(scores, params.top_p)
        if params.min_p > 0:
            probs = scores.softmax(-1)
            scores = scores.masked_fill(probs < params.min_p * probs.max(), -math.inf)
        return scores

    def _draw(self, scores: torch.Tensor, position: int) -> int:
        """Inverse transform sampling: one seeded uniform against the cumulative distribution.
        `torch.multinomial` draws the same distribution at ~15x the cost on a 32k vocabulary
        (`loadtests/bench_sampling.py`), and the last span draws once per session per step."""
        probs = scores.softmax(-1)
        if not _all_finite(probs):  # never with the parameters' ranges; checked anyway
            raise ValueError("the sampling parameters made the probabilities non-finite")
        self.generator.manual_seed(_mix(self.seed, position))
        uniform = torch.rand((), generator=self.generator, dtype=torch.float64)
        cumulative = probs.to(torch.float64).cumsum(0)
        # the first token whose cumulative mass passes the draw: a token of probability 0 adds
        # nothing, so it is never the first to pass
        token_id = int(torch.searchsorted(cumulative, uniform * cumulative[-1], right=True))
        if token_id >= len(probs):  # the draw rounded up to the total: the last possible token
            token_id = int(torch.nonzero(probs)[-1])
        return token_id


def _all_finite(values: torch.Tensor) -> bool:
    """No NaN and no infinity: the smallest and the largest value are finite (a NaN propagates to
    both). One reduction, ~10x cheaper than `isfinite(...).all()` on a 32k vocabulary."""
    low, high = torch.aminmax(values)
    return math.isfinite(float(low)) and math.isfinite(float(high))


# The nucleus is searched among this many of the best tokens first, then eight times as many, ...:
# it is almost always a few dozen tokens, and a full sort of the vocabulary costs ~2 ms at 32k.
NUCLEUS_FIRST_CANDIDATES = 64


def _nucleus(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """`scores` with every token outside the top-p nucleus at -inf. HF's rule: drop the low tail
    whose total probability is <= 1 - top_p; so, best first, a token is kept while the mass of the
    tokens before it is below top_p (the best token always). Only the head of the distribution is
    ranked: the best k tokens are enough once their mass reaches top_p."""
    probs = scores.softmax(-1)
    vocab = len(probs)
    k = min(NUCLEUS_FIRST_CANDIDATES, vocab)
    while True:
        best, order = torch.topk(probs, k)
        if k == vocab or float(best.sum()) >= top_p:
            break
        k = min(vocab, k * 8)
    before = best.cumsum(0) - best  # the mass of the tokens ranked before each
    kept = order[: max(1, int((before < top_p).sum()))]
    nucleus = torch.full_like(scores, -math.inf)
    nucleus[kept] = scores[kept]
    return nucleus


def _token_ids(ids: Sequence[int] | torch.Tensor, vocab: int, name: str) -> torch.Tensor:
    """Token ids as a CPU int64 tensor, rejecting ids outside the vocabulary (network input)."""
    tensor = (
        ids.detach().to("cpu", torch.long).flatten()
        if isinstance(ids, torch.Tensor)
        else torch.tensor(list(ids), dtype=torch.long)
    )
    if tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) >= vocab):
        raise ValueError(f"{name} must be in [0, {vocab})")
    return tensor


def _top_logprobs(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    values, ids = torch.topk(logprobs, min(k, logprobs.numel()))
    pairs = [(int(i), float(v)) for i, v in zip(ids, values, strict=True)]
    return sorted(pairs, key=lambda pair: (-pair[1], pair[0]))


def prompt_logprobs(
    logits: torch.Tensor, next_token_ids: Sequence[int], k: int
) -> list[tuple[float, list[tuple[int, float]]]]:
    """Score known next tokens: row i of ``logits`` ``[R, V]`` gives ``(logprob of next_token_ids[i],
    its k best (token id, logprob), best first, ties by lower id)``.

    ``log_softmax`` in fp32 over the full vocabulary of the raw logits, as ``Sampler.sample`` does
    for a sampled token before bias and penalties (a prompt's tokens were not sampled). The
    token's logprob and its top entries come from the same tensor, so a token that is the argmax
    has exactly the top-1 value (lm-evaluation-harness compares them with ``==``).
    """
    if logits.dim() != 2 or logits.shape[0] != len(next_token_ids):
        raise ValueError(f"logits must be [{len(next_token_ids)}, V], got {tuple(logits.shape)}")
    if not next_token_ids:
        return []
    logprobs = torch.log_softmax(logits.to(torch.float32), dim=-1)
    ids = torch.tensor(list(next_token_ids), dtype=torch.long, device=logprobs.device)
    chosen = logprobs.gather(1, ids.unsqueeze(1)).squeeze(1).cpu().tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in chosen]
    if k > 0:
        values, indices = torch.topk(logprobs, min(k, logprobs.shape[1]), dim=-1)
        for row, (vals, idx) in enumerate(zip(values.cpu().tolist(), indices.cpu().tolist(), strict=True)):
            tops[row] = sorted(zip(idx, vals, strict=True), key=lambda pair: (-pair[1], pair[0]))
    return list(zip(chosen, tops, strict=True))


def _mix(seed: int, position: int) -> int:
    """splitmix64 of (seed, position): independent-looking streams per position, 64-bit seed."""
    z = (seed + (position + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)
