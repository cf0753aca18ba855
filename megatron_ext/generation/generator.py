"""Autoregressive decoding on a megatron-core GPTModel of any TP/PP, with its KV cache.

The cache is megatron-core's own (``StaticInferenceContext`` passed to ``GPTModel.forward``):
the prompt is run once (prefill), then one token per step attends to the cached keys/values
(our core attention honours the ``no_mask`` megatron-core passes for those steps).

Every rank runs the same loop on the same tokens. Pipeline stages hand their hidden states
[s, b, h] to the next stage point to point; the last stage has the logits gathered over TP,
samples, and the token is broadcast from the last rank to all, so every rank
(DP replicas included) agrees on each token and on when to stop.

A model built with sequence parallelism (a training run's) cannot split a one-token step over
TP ranks: it decodes without cache, recomputing the prefix (right-padded to a multiple of TP;
causal attention keeps the padding out of the real positions) each step.
"""

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext

from megatron_ext.generation.sampling import SamplingParams, sample


@dataclass
class Generation:
    tokens: List[int]  # the new tokens, without the stop token
    stopped: bool  # ended at a stop token or by ``stop_when`` (else at max_new_tokens)
    logits: List[torch.Tensor] = field(default_factory=list)  # per step [vocab], last stage only
    # With ``logprobs=N``, on every rank: log-probabilities (log_softmax of the real vocabulary's
    # logits, before temperature and filters) of each new token, of each prompt token after the
    # first, and the N most likely (id, log-probability) at each of those positions.
    logprobs: List[float] = field(default_factory=list)
    prompt_logprobs: List[float] = field(default_factory=list)
    top_logprobs: List[List[Tuple[int, float]]] = field(default_factory=list)
    prompt_top_logprobs: List[List[Tuple[int, float]]] = field(default_factory=list)


class Generator:
    def __init__(self, model, vocab_size: int, stop_ids: Sequence[int], use_cache: bool = True):
        self.model = model
        self.config = model.config
        self.vocab_size = vocab_size
        self.stop_ids = {i for i in stop_ids if i is not None}
        self.use_cache = use_cache and not self.config.sequence_parallel
        self.device = next(model.parameters()).device

    # -- one forward pass over the pipeline ------------------------------------------------
    def _forward(self, tokens: torch.Tensor, context) -> Optional[torch.Tensor]:
        """tokens [b, s] from position ``context.sequence_len_offset`` (or 0): logits [b, s', V]
        over the whole padded vocabulary on the last stage (s' = 1 with the cache), else None."""
        b, s = tokens.shape
        start = context.sequence_len_offset if context is not None else 0
        position_ids = torch.arange(start, start + s, device=self.device).unsqueeze(0).expand(b, s)
        if not parallel_state.is_pipeline_first_stage():
            rows = s // self.config.tensor_model_parallel_size if self.config.sequence_parallel else s
            hidden = torch.empty(rows, b, self.config.hidden_size, dtype=self.config.pipeline_dtype,
                                 device=self.device)
            dist.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
            self.model.set_input_tensor(hidden)
        # The output layer gathers the vocabulary-parallel logits over TP (megatron-core
        # requires it with an inference context).
        out = self.model(tokens, position_ids, None, inference_context=context,
                         runtime_gather_output=True)
        if not parallel_state.is_pipeline_last_stage():
            dist.send(out.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
            return None
        return out

    def _next_logits(self, tokens: List[int], context, fed: int) -> Optional[torch.Tensor]:
        """[V] logits after ``tokens`` (the first ``fed`` of them already in the cache)."""
        if context is not None:
            context.sequence_len_offset = fed
            logits = self._forward(torch.tensor([tokens[fed:]], device=self.device), context)
            return None if logits is None else logits[0, -1]
        logits = self._uncached_logits(tokens)
        return None if logits is None else logits[-1]

    def _uncached_logits(self, tokens: List[int]) -> Optional[torch.Tensor]:
        """[len(tokens), V] logits of a plain causal forward over ``tokens`` (last stage)."""
        ids = list(tokens)
        if self.config.sequence_parallel:
            tp = self.config.tensor_model_parallel_size
            ids += [ids[-1]] * (-len(ids) % tp)
        logits = self._forward(torch.tensor([ids], device=self.device), None)
        return None if logits is None else logits[0, : len(tokens)]

    def _logprobs(self, logits: torch.Tensor, chosen: torch.Tensor, top: int):
        """Log-probabilities [n] of ``chosen`` [n] under ``logits`` [n, V] (real rows only), and
        the ``top`` most likely (id, log-probability) of each row."""
        logprobs = torch.log_softmax(logits[:, : self.vocab_size].float(), dim=-1)
        picked = logprobs.gather(-1, chosen.view(-1, 1).to(logprobs.device)).squeeze(-1).tolist()
        values, ids = torch.topk(logprobs, min(top, self.vocab_size), dim=-1)
        return picked, [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]

    def _broadcast(self, token: Optional[torch.Tensor]) -> int:
        last = dist.get_world_size() - 1  # pipeline-outermost rank order: on the last stage
        buffer = torch.zeros(1, dtype=torch.long, device=self.device)
        if dist.get_rank() == last:
            buffer.copy_(token.reshape(1))
        dist.broadcast(buffer, src=last)
        return int(buffer.item())

    # -- the loop ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt: Sequence[int], max_new_tokens: int, params: SamplingParams,
                 rng: Optional[torch.Generator] = None, keep_logits: bool = False,
                 logprobs: Optional[int] = None,
                 stop_when: Optional[Callable[[List[int]], bool]] = None) -> Generation:
        """Up to ``max_new_tokens`` (0: none, for ``logprobs`` of the prompt alone) tokens after
        ``prompt`` (the same on every rank); ``logprobs=N`` adds their log-probabilities and the
        prompt's, with the N most likely alternatives at each position. ``stop_when(new
        tokens)``, asked after each token on every rank (the same tokens everywhere, so every
        rank stops at the same step), ends generation with True: a stop string, as soon as it
        is there."""
        if not prompt:
            raise ValueError("the prompt is empty: nothing to condition on")
        tokens, new = list(prompt), []
        limit = len(tokens) + max_new_tokens
        table = getattr(self.model, "max_sequence_length", None)
        if getattr(self.model, "position_embedding_type", "rope") == "learned_absolute" \
                and table is not None and limit > table:
            raise ValueError(f"prompt ({len(tokens)} tokens) + --max-new-tokens {max_new_tokens} "
                             f"exceeds the position table (--max-position-embeddings {table})")
        context = StaticInferenceContext(1, limit) if self.use_cache else None
        result = Generation(tokens=new, stopped=False)
        fed, chosen = 0, []  # chosen: (logits, token) of each step, for logprobs
        for _ in range(max_new_tokens):
            logits = self._next_logits(tokens, context, fed)
            fed = len(tokens)
            choice = None
            if logits is not None:
                choice = sample(logits.unsqueeze(0), self.vocab_size, params, rng)
                if keep_logits:
                    result.logits.append(logits[: self.vocab_size].float().cpu())
            token = self._broadcast(choice)
            if token in self.stop_ids:
                result.stopped = True
                break
            if logits is not None and logprobs is not None:
                chosen.append(logits)
            tokens.append(token)
            new.append(token)
            if stop_when is not None and stop_when(new):
                result.stopped = True
                break
        if logprobs is not None:
            self._add_logprobs(result, list(prompt), chosen, logprobs)
        return result

    def _add_logprobs(self, result: Generation, prompt: List[int], chosen, top: int) -> None:
        """Fill ``result``'s log-probabilities on the last stage, then share them from the last
        rank (the first stage, which answers requests, has no logits under PP)."""
        last = dist.get_world_size() - 1
        # The cache computed the prompt's last position only: its other positions come from a
        # plain forward over the prompt (every rank takes part: pipeline stages pass it on).
        prompt_logits = self._uncached_logits(prompt) if len(prompt) > 1 else None
        box = [None]
        if dist.get_rank() == last:
            if prompt_logits is not None:
                result.prompt_logprobs, result.prompt_top_logprobs = self._logprobs(
                    prompt_logits[:-1], torch.tensor(prompt[1:]), top)
            if chosen:
                result.logprobs, result.top_logprobs = self._logprobs(
                    torch.stack(chosen), torch.tensor(result.tokens), top)
            box = [(result.logprobs, result.prompt_logprobs, result.top_logprobs,
                    result.prompt_top_logprobs)]
        dist.broadcast_object_list(box, src=last)
        (result.logprobs, result.prompt_logprobs, result.top_logprobs,
         result.prompt_top_logprobs) = box[0]
