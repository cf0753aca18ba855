"""Next-token choice from the last position's logits: temperature, top-k, top-p (Megatron-LM's
semantics: ``top_k`` 0 and ``top_p`` 0.0 switch that filter off; ``top_k`` 1 is greedy).

Only the tokenizer's ``vocab_size`` first logits are candidates: the rows Megatron pads the
embedding with (``padded_vocab_size``) are no tokens and are never chosen.
"""

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 1
    top_p: float = 0.0

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"--temperature {self.temperature}: must be > 0 (greedy is --top-k 1)")
        if self.top_k < 0:
            raise ValueError(f"--top-k {self.top_k}: must be >= 0 (0: no top-k filter)")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"--top-p {self.top_p}: must be in [0, 1] (0: no top-p filter)")


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[b, v] logits scaled by the temperature, with -inf outside the top-k and the nucleus."""
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token once the tokens before it already hold top_p; the first always stays.
        drop = (cumulative - ordered.softmax(dim=-1)) >= params.top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, vocab_size: int, params: SamplingParams,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """[b, padded_vocab] -> [b] token ids in [0, vocab_size), drawn on the CPU (one seeded
    generator whatever the device)."""
    probs = filter_logits(logits[..., :vocab_size].cpu(), params).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
