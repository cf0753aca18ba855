"""The requests and answers of ``generate_gpt.py --port`` (``server.py`` serves them).

Megatron-LM's formats (core_v0.16-0.19 ``text_generation_server``): ``PUT /api``
(``{"prompts": [...], "tokens_to_generate": N, ...}`` -> ``{"text", "segments", "tokens",
"logprobs"}``), the OpenAI-style ``POST /completions``, and with ``--prompt-type`` OpenAI's
``POST /chat/completions`` (megatron-core 0.19's fields). Each ``parse_*`` checks a body and
raises ``BadRequest`` (answered with 400 before any rank is involved); each ``*_answer`` formats
the generations of its ``Job``. A request's stop strings (and the chat template's stop text) end
its generation as soon as they appear (``stop_when``), and the answer is cut before them.
OpenAI's ``n`` choices per prompt and ``stream`` (``streaming.py``'s events) are fields of the
``Job``; ``*_text`` is one choice's final text, for both the answer and the stream.
``chat_endpoint.py`` has ``/chat/completions``, on the same fields.
"""

import time
import uuid
from dataclasses import dataclass
from typing import List, Optional, Tuple

from megatron_ext.generation.sampling import SamplingParams

MAX_PROMPTS = 128  # Megatron-LM's limit per request
MAX_TOP_LOGPROBS = 10
SEEDS = 2 ** 64  # torch.Generator.manual_seed's range: [0, 2**64)


class BadRequest(ValueError):
    """Answered with 400 and this message."""


@dataclass(frozen=True)
class Job:
    """What every rank needs to generate one request (shared from rank 0)."""
    prompts: List[List[int]]
    max_new_tokens: int
    params: SamplingParams
    seed: Optional[int]  # reseeds the sampling generator (else it goes on)
    logprobs: Optional[int]  # None: none; N: with the N most likely alternatives
    stops: Tuple[str, ...] = ()  # stop strings: generation ends once the answer holds one
    chat: bool = False  # a chat answer: the template's stop text ends it too
    n: int = 1  # choices per prompt answered
    stream: bool = False  # answered as server-sent events, token by token
    usage: bool = False  # stream_options.include_usage: a last event with the usage
    model: str = "EMPTY"  # the request's, echoed (megatron-core's answer when it has none)
    best_of: int = 1  # choices per prompt generated (>= n): the n most likely are answered

    def runs(self):
        """(prompt index, seed or None) of each choice generated, prompt by prompt. With
        several per prompt, choice i is drawn after reseeding with seed + i: the answer of the
        same request with n=1 and that seed (so each is reproducible alone); with one, the seed
        reseeds once and the generator goes on over the prompts (as ``generate_gpt.py``)."""
        for p in range(len(self.prompts)):
            for i in range(self.best_of):
                reseed = self.seed is not None and (self.best_of > 1 or p == 0)
                yield p, (self.seed + i) % SEEDS if reseed else None

    @property
    def scored(self) -> Optional[int]:
        """``Generator.generate``'s ``logprobs``: best_of ranks choices by theirs."""
        return 0 if self.logprobs is None and self.best_of > self.n else self.logprobs

    def answered(self, results):
        """(prompt index, Generation) of each choice answered, in the answer's order: with
        best_of > n, each prompt's n of highest mean log-probability per token (OpenAI's),
        best first; an empty answer (its stop token's log-probability is not kept) last."""
        def mean(result):
            return sum(result.logprobs) / len(result.logprobs) if result.tokens else -float("inf")

        for p in range(len(self.prompts)):
            mine = results[p * self.best_of:(p + 1) * self.best_of]
            if self.best_of > self.n:
                mine = sorted(mine, key=mean, reverse=True)
            yield from ((p, r) for r in mine[:self.n])


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _field(body, name, default, ok, message):
    if name not in body:
        return default
    if not ok(body[name]):
        raise BadRequest(message)
    return body[name]


def _unsupported(body, defaults):
    """Megatron-LM fields this server does not implement: accepted at their default only."""
    for name, default in defaults.items():
        if name in body and body[name] != default:
            raise BadRequest(f"{name}={body[name]!r} is not supported by this server "
                             f"(only {default!r}); leave it out")


def _known(body, names):
    unknown = sorted(set(body) - set(names))
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(names))}")


def _check_length(prompts, new_tokens, max_length, what):
    for i, ids in enumerate(prompts):
        if len(ids) + new_tokens > max_length:
            raise BadRequest(f"prompt {i}: {len(ids)} tokens + {what} {new_tokens} exceeds the "
                             f"model's {max_length} positions (--max-position-embeddings, by "
                             f"default --seq-length)")


# -- PUT /api (Megatron-LM's MegatronGenerate) ----------------------------------------------
_API_RETIRED = {"max_len": "max_len is no longer used.  Replace with tokens_to_generate",
                "sentences": "sentences is no longer used.  Replace with prompts",
                "beam_width": "Beam search is no longer supported."}
_API_UNSUPPORTED = {"top_p_decay": 0.0, "top_p_bound": 0.0, "stop_on_double_eol": False,
                    "stop_on_eol": False, "prevent_newline_after_colon": False,
                    "length_penalty": 1}
_API_FIELDS = {"prompts", "tokens_to_generate", "logprobs", "temperature", "top_k", "top_p",
               "add_BOS", "random_seed", "no_log", "stop_token", *_API_UNSUPPORTED}


def parse_api(body, tokenizer, max_length):
    """(Job, prompt texts) of a ``PUT /api`` body, with Megatron-LM's checks and defaults
    (64 tokens, temperature 1, top-k 0 and top-p 0: plain sampling)."""
    for name, message in _API_RETIRED.items():
        if name in body:
            raise BadRequest(message)
    if "prompts" not in body:
        raise BadRequest("prompts argument required")
    _known(body, _API_FIELDS)
    prompts = body["prompts"]
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise BadRequest("prompts is not a list of strings")
    if not prompts:
        raise BadRequest("prompts is empty")
    if len(prompts) > MAX_PROMPTS:
        raise BadRequest(f"Maximum number of prompts is {MAX_PROMPTS}")
    new = _field(body, "tokens_to_generate", 64, lambda v: _is_int(v) and v >= 0,
                 "tokens_to_generate must be an integer greater than or equal to 0")
    logprobs = _field(body, "logprobs", False, lambda v: isinstance(v, bool),
                      "logprobs must be a boolean value")
    if new == 0 and not logprobs:
        raise BadRequest("tokens_to_generate=0 implies logprobs should be True")
    temperature = _field(body, "temperature", 1.0, lambda v: _is_number(v) and 0 < v <= 100,
                         "temperature must be a positive number less than or equal to 100.0")
    top_k = _field(body, "top_k", 0, lambda v: _is_int(v) and 0 <= v <= 1000,
                   "top_k must be an integer equal to or greater than 0 and less than or equal "
                   "to 1000")
    top_p = _field(body, "top_p", 0.0, lambda v: _is_number(v) and 0 <= v <= 1,
                   "top_p must be a positive float less than or equal to 1.0")
    if top_p > 0 and top_k > 0:
        raise BadRequest("cannot set both top-k and top-p samplings.")
    add_bos = _field(body, "add_BOS", False, lambda v: isinstance(v, bool),
                     "add_BOS must be a boolean value")
    seed = _field(body, "random_seed", None, lambda v: _is_int(v) and 0 <= v < SEEDS,
                  "random_seed must be an integer in [0, 2**64)")
    _field(body, "no_log", False, lambda v: isinstance(v, bool), "no_log must be a boolean value")
    _unsupported(body, {**_API_UNSUPPORTED, "stop_token": tokenizer.eod})
    if any(not p for p in prompts) and not add_bos:
        raise BadRequest("Empty prompts require add_BOS=true")
    ids = [([tokenizer.eod] if add_bos else []) + tokenizer.tokenize(p) for p in prompts]
    if any(not i for i in ids):
        raise BadRequest("a prompt tokenizes to no tokens: nothing to condition on")
    _check_length(ids, new, max_length, "tokens_to_generate")
    params = SamplingParams(float(temperature), top_k, float(top_p))
    return Job(ids, new, params, seed, 0 if logprobs else None), prompts


def continuation(tokenizer, prompt_ids, new_ids) -> str:
    """The text ``new_ids`` add after ``prompt_ids`` (decoded in context: SentencePiece and
    NullTokenizer put the space before a word in the word's token)."""
    head, full = tokenizer.detokenize(prompt_ids), tokenizer.detokenize(prompt_ids + new_ids)
    return full[len(head):] if full.startswith(head) else tokenizer.detokenize(new_ids)


def api_answer(job, texts, results, tokenizer):
    answer = {"text": [], "segments": [], "tokens": []}
    for text, ids, result in zip(texts, job.prompts, results):
        tokens = ids + result.tokens
        answer["text"].append(text + continuation(tokenizer, ids, result.tokens))
        answer["segments"].append([tokenizer.detokenize([t]) for t in tokens])
        answer["tokens"].append(tokens)
    if job.logprobs is not None:  # Megatron-LM's: each token's after the first
        answer["logprobs"] = [r.prompt_logprobs + r.logprobs for r in results]
    return answer


# -- POST /completions (OpenAI's, as Megatron-LM's MegatronCompletions) --------------------
_PENALTIES = {"presence_penalty": 0, "frequency_penalty": 0}  # accepted at 0 only
# Fields completions and chat share (sampling, choices, stream); ``user`` is ignored.
_OPENAI_FIELDS = {"max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "n", "stream",
                  "stream_options", "model", "user", *_PENALTIES}
_COMPLETION_FIELDS = {"prompt", "logprobs", "echo", "best_of", *_OPENAI_FIELDS}


def _openai_sampling(body):
    """(SamplingParams, seed) of OpenAI's sampling fields (completions and chat)."""
    temperature = _field(body, "temperature", 1.0, lambda v: _is_number(v) and 0 <= v <= 100,
                         "temperature must be a number in [0, 100] (0: greedy)")
    top_k = _field(body, "top_k", 0, lambda v: _is_int(v) and v >= 0,
                   "top_k must be an integer >= 0")
    top_p = _field(body, "top_p", 1.0, lambda v: _is_number(v) and 0 <= v <= 1,
                   "top_p must be a number in [0, 1]")
    seed = _field(body, "seed", None, lambda v: v is None or (_is_int(v) and 0 <= v < SEEDS),
                  "seed must be an integer in [0, 2**64)")
    # OpenAI's temperature 0 is greedy; its top_p 1 is no nucleus (Megatron-LM's top_p 0).
    params = (SamplingParams(top_k=1) if temperature == 0 else
              SamplingParams(float(temperature), top_k, 0.0 if top_p == 1 else float(top_p)))
    return params, seed


def _choices(body, prompts, logprobs, best_of=False):
    """The fields of ``Job`` from OpenAI's ``n``, ``stream``, ``stream_options``, ``model``
    (completions and chat) and, where ``best_of``, ``best_of`` (completions)."""
    n = _field(body, "n", 1, lambda v: _is_int(v) and v >= 1, "n must be an integer >= 1")
    best = _field(body, "best_of", None, lambda v: v is None or (_is_int(v) and v >= n),
                  f"best_of must be an integer >= n ({n})") if best_of else None
    best = n if best is None else best
    if best * prompts > MAX_PROMPTS:
        raise BadRequest(f"{'best_of' if best > n else 'n'}={best} x {prompts} prompt(s) makes "
                         f"{best * prompts} choices; at most {MAX_PROMPTS} per request")
    stream = _field(body, "stream", False, lambda v: isinstance(v, bool),
                    "stream must be a boolean")
    if stream and best > n:
        raise BadRequest("best_of > n with stream=true is not supported (the best are known "
                         "once all are generated); leave one of them out")
    options = _field(body, "stream_options", None, lambda v: v is None or isinstance(v, dict),
                     "stream_options must be an object")
    if options is not None and not stream:
        raise BadRequest("stream_options is only allowed with stream=true")
    options = options or {}
    if set(options) - {"include_usage"}:
        raise BadRequest(f"unknown stream_options field(s) "
                         f"{', '.join(sorted(set(options) - {'include_usage'}))}; known: "
                         f"include_usage")
    usage = _field(options, "include_usage", False, lambda v: isinstance(v, bool),
                   "stream_options.include_usage must be a boolean")
    if stream and logprobs is not None:
        raise BadRequest("logprobs with stream=true is not supported by this server (they are "
                         "computed once an answer is complete); leave one of them out")
    model = _field(body, "model", "EMPTY", lambda v: isinstance(v, str), "model must be a string")
    return {"n": n, "best_of": best, "stream": stream, "usage": usage, "model": model}


def _stops(body):
    """OpenAI's ``stop``: a string or a list of them (empty ones left out)."""
    stop = _field(body, "stop", None, lambda v: v is None or isinstance(v, str) or (
        isinstance(v, list) and all(isinstance(s, str) for s in v)),
        "stop must be a string or a list of strings")
    return tuple(s for s in ([stop] if isinstance(stop, str) else stop or []) if s)


def stop_when(job, prompt_ids, tokenizer, encoder):
    """The per-step test that ends ``job``'s generation after ``prompt_ids`` once its answer
    holds a stop string, decoded as its ``*_answer`` decodes it (None: nothing to test)."""
    if job.chat:
        return lambda new: encoder.reply(new, job.stops)[2]
    if not job.stops:
        return None
    return lambda new: any(s in continuation(tokenizer, prompt_ids, new) for s in job.stops)


def parse_completions(body, tokenizer, max_length):
    """(Job, prompt texts, echo) of a ``POST /completions`` body."""
    _known(body, _COMPLETION_FIELDS)
    _unsupported(body, _PENALTIES)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise BadRequest("prompt must be a string, or a non-empty list of strings, of token "
                         "ids, or of token id lists")
    strings = all(isinstance(p, str) for p in prompt)
    if strings:
        ids = [tokenizer.tokenize(p) for p in prompt]
    elif all(_is_int(t) for t in prompt):
        ids = [prompt]
    elif all(isinstance(p, list) and all(_is_int(t) for t in p) for p in prompt):
        ids = prompt
    else:
        raise BadRequest("prompt must be str, list[str], list[int] or list[list[int]]")
    if any(not 0 <= t < tokenizer.vocab_size for p in ids for t in p):
        raise BadRequest(f"prompt token ids must be in [0, {tokenizer.vocab_size})")
    texts = prompt if strings else [tokenizer.detokenize(p) for p in ids]
    if len(ids) > MAX_PROMPTS:
        raise BadRequest(f"Maximum number of prompts is {MAX_PROMPTS}")
    if any(not p for p in ids):
        raise BadRequest("a prompt tokenizes to no tokens: nothing to condition on")
    new = _field(body, "max_tokens", 16, lambda v: _is_int(v) and v >= 0,
                 "max_tokens must be an integer >= 0")
    params, seed = _openai_sampling(body)
    logprobs = _field(body, "logprobs", None,
                      lambda v: v is None or (_is_int(v) and 0 <= v <= MAX_TOP_LOGPROBS),
                      f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}]")
    echo = _field(body, "echo", False, lambda v: isinstance(v, bool), "echo must be a boolean")
    stops = _stops(body)
    if not echo and new == 0:
        raise BadRequest("echo=False not supported when max_tokens == 0 (nothing to answer)")
    _check_length(ids, new, max_length, "max_tokens")
    choices = _choices(body, len(ids), logprobs, best_of=True)
    return Job(ids, new, params, seed, logprobs, stops, **choices), texts, echo


def _offsets(tokenizer, ids, start):
    """Each of ``ids[start:]``'s character offset in the text decoded after ``ids[:start]``."""
    head = len(tokenizer.detokenize(ids[:start]))
    return [len(tokenizer.detokenize(ids[:i])) - head for i in range(start, len(ids))]


def completion_text(job, ids, result, tokenizer):
    """(text, tokens kept, finish_reason) of one completion's generation after ``ids``."""
    new, reason = result.tokens, "stop" if result.stopped else "length"
    answer = continuation(tokenizer, ids, new)
    cut = min((answer.find(s) for s in job.stops if s in answer), default=-1)
    kept = len(new)
    if cut >= 0:  # OpenAI's stop: the text up to the first stop string, without it
        answer, reason = answer[:cut], "stop"
        kept = sum(o < cut for o in _offsets(tokenizer, ids + new, len(ids)))
    return answer, kept, reason


def head(job, kind):
    """The fields OpenAI's answers and stream events open with (``kind``: their object)."""
    prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
            "model": job.model}


def usage(job, generated):
    """OpenAI's usage: each prompt counted once, whatever its number of choices."""
    prompt = sum(map(len, job.prompts))
    return {"prompt_tokens": prompt, "completion_tokens": generated,
            "total_tokens": prompt + generated}


def completions_answer(job, texts, echo, results, tokenizer):
    choices, generated = [], 0
    for index, (p, result) in enumerate(job.answered(results)):
        text, ids, new = texts[p], job.prompts[p], result.tokens
        answer, kept, reason = completion_text(job, ids, result, tokenizer)
        generated += kept
        logprobs = None
        if job.logprobs is not None:
            tokens = (ids if echo else []) + new[:kept]
            values = ([None] + result.prompt_logprobs if echo else []) + result.logprobs[:kept]
            top = ([None] + result.prompt_top_logprobs if echo else []) + result.top_logprobs[:kept]
            # Offsets in the prompt + answer text, as OpenAI's (echo or not).
            offsets = [len(text) + o for o in _offsets(tokenizer, ids + new[:kept], len(ids))]
            if echo:
                offsets = _offsets(tokenizer, ids, 0) + offsets
            logprobs = {"tokens": [tokenizer.detokenize([t]) for t in tokens],
                        "token_logprobs": values, "text_offset": offsets,
                        "top_logprobs": [None if t is None else
                                         {tokenizer.detokenize([i]): v for i, v in t}
                                         for t in top] if job.logprobs else None}
        choices.append({"index": index, "text": (text if echo else "") + answer,
                        "logprobs": logprobs, "finish_reason": reason})
    return {**head(job, "text_completion"), "choices": choices, "usage": usage(job, generated)}
