"""DeepSeek-V3 / Kimi K2 experts: grouped sigmoid routing plus always-on shared experts.

The routing is transformers' ``DeepseekV3TopkRouter`` ("noaux_tc"), step for step, in fp32:

1. ``scores = sigmoid(x @ router.T)``; for *choosing* only, ``e_score_correction_bias`` is added
   (the bias balances load during training and never weighs an output).
2. Experts are split into ``n_group`` groups; a group's score is the sum of its best two biased
   scores; only the best ``topk_group`` groups stay eligible.
3. The ``top_k`` best eligible experts are chosen; their weights are the *unbiased* sigmoid scores,
   renormalised to sum to 1 when ``norm_topk_prob``, then times ``routed_scaling_factor``.

The routed experts then run exactly like every other mixture here (``peer.model.MoE.dispatch``:
the pack's rows grouped per expert, one matmul per chosen expert per pass), and the shared
experts, one gated MLP of ``n_shared_experts * moe_intermediate_size`` every row goes through,
are added after, as transformers adds them. The router weight and the bias are plain fp32
tensors (``Family.fp32_parts``), so neither quantization nor a bf16 compute dtype moves routing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peer.model import MLP, MoE, Router, SpanConfig


class GroupedRouter(Router):
    """Sigmoid scores with DeepSeek's selection bias; weight and bias in fp32."""

    def __init__(self, hidden: int, experts: int) -> None:
        super().__init__(hidden, experts)
        self.register_buffer("e_score_correction_bias", torch.zeros(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())


class GroupedMoE(MoE):
    """``MoE`` with grouped sigmoid routing and shared experts (``SpanConfig.moe_routing ==
    "grouped_sigmoid"``)."""

    def __init__(self, config: SpanConfig) -> None:
        super().__init__(config)
        self.router = GroupedRouter(config.hidden_size, config.num_experts)
        self.groups, self.topk_groups = config.moe_groups, config.moe_topk_groups
        self.scaling = config.routed_scaling_factor
        self.shared_experts: nn.Module | None = None
        if config.shared_experts:
            inner = config.moe_intermediate_size * config.shared_experts
            self.shared_experts = MLP(config, inner, "gated")

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.router(x).sigmoid()  # [T, E] fp32
        biased = scores + self.router.e_score_correction_bias
        tokens, experts = biased.shape
        group_scores = biased.view(tokens, self.groups, experts // self.groups).topk(2, dim=-1)[0].sum(dim=-1)
        best_groups = torch.topk(group_scores, k=self.topk_groups, dim=-1, sorted=False)[1]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
        keep = keep.unsqueeze(-1).expand(-1, -1, experts // self.groups).reshape(tokens, experts)
        chosen = torch.topk(biased.masked_fill(~keep, float("-inf")), k=self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, chosen)
        if self.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dispatch(x, *self.route(x))
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
