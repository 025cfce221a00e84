"""DeepSeek-V3 / Kimi K2 routing: grouped top-k over sigmoid scores with a selection bias.

transformers' ``DeepseekV3TopkRouter`` ("noaux_tc"), step for step, in fp32:

1. ``scores = sigmoid(x @ router.T)``; for *choosing* only, ``e_score_correction_bias`` is added
   (the bias balances load during training and never weighs an output).
2. Experts are split into ``n_group`` groups; a group's score is the sum of its best two biased
   scores; only the best ``topk_group`` groups stay eligible.
3. The ``top_k`` best eligible experts are chosen; their weights are the *unbiased* sigmoid scores,
   renormalised to sum to 1 when ``norm_topk_prob``, then times ``routed_scaling_factor``.

The routed experts then run like every other mixture here (``peer.model.MoE``: the pack's
rows grouped per expert, one matmul per chosen expert per pass), and ``MoE`` adds the shared
experts after, as transformers does. The router weight and the bias are plain fp32 tensors
(``Family.fp32_parts``), so neither quantization nor a bf16 compute dtype moves routing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GroupedRouter(nn.Module):
    """Router logits in fp32 (a plain parameter, never quantized), and DeepSeek's grouped choice."""

    def __init__(self, hidden: int, experts: int, groups: int, topk_groups: int, scaling: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden))
        self.register_buffer("e_score_correction_bias", torch.zeros(experts))
        self.groups, self.topk_groups, self.scaling = groups, topk_groups, scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())

    def route(self, logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights, chosen)`` ``[T, top_k]`` from the logits ``[T, experts]``."""
        scores = logits.sigmoid()
        biased = scores + self.e_score_correction_bias
        tokens, experts = biased.shape
        per_group = experts // self.groups
        group_scores = biased.view(tokens, self.groups, per_group).topk(2, dim=-1)[0].sum(dim=-1)
        best_groups = torch.topk(group_scores, k=self.topk_groups, dim=-1, sorted=False)[1]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
        keep = keep.unsqueeze(-1).expand(-1, -1, per_group).reshape(tokens, experts)
        chosen = torch.topk(biased.masked_fill(~keep, float("-inf")), k=top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, chosen)
        if normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, chosen
