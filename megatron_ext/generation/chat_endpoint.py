"""``POST /chat/completions`` (also ``/v1/chat/completions``): OpenAI's, as megatron-core
0.19's ``chat_completions``. The messages are rendered by ``--prompt-type``'s template
(``Session.chat_prompt``, as the interactive chat); the answer is cut before the template's stop
text and the request's stop strings. Sampling, ``n``, ``stream`` and ``stop`` are the fields
of completions (``endpoints.py``).
"""

from megatron_ext.generation.endpoints import (_OPENAI_FIELDS, _PENALTIES, MAX_TOP_LOGPROBS,
                                               BadRequest, Job, _check_length, _choices, _field,
                                               _is_int, _known, _openai_sampling, _stops,
                                               _unsupported, head, usage)

_CHAT_FIELDS = {"messages", "logprobs", "top_logprobs", *_OPENAI_FIELDS}
_ROLES = ("system", "user", "assistant")


def _turns(messages):
    """OpenAI's messages as the chat template's turns, checked."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {\"role\", \"content\"} objects")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise BadRequest(f"messages[{i}] must be an object of role and content")
        role, content = message["role"], message["content"]
        if role not in _ROLES:
            raise BadRequest(f"messages[{i}]: unknown role {role!r}; known: {', '.join(_ROLES)}")
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string")
        if role == "system" and i > 0:
            raise BadRequest(f"messages[{i}]: a system message may only come first")
        # The templates render user and assistant turns in turn (as they were trained).
        expected = "user" if not turns or turns[-1][0] != "user" else "assistant"
        if role != "system" and role != expected:
            raise BadRequest(f"messages[{i}]: {role} where the {expected}'s turn comes (user "
                             "and assistant messages alternate, the user's first)")
        turns.append((role, content))
    if turns[-1][0] != "user":
        raise BadRequest("the last message must be the user's (the assistant answers it)")
    return turns


def parse_chat(body, tokenizer, max_length, session):
    """(Job, encoder) of a ``POST /chat/completions`` body, rendered by ``session.chat_prompt``
    (the interactive chat's rendering); ``max_tokens`` defaults to --max-new-tokens."""
    if session.encoder is None:
        raise BadRequest("POST /chat/completions needs a chat template: start the server with "
                         "--prompt-type NAME (megatron_ext/data/instruct/templates.json, or hf)")
    _known(body, _CHAT_FIELDS)
    _unsupported(body, _PENALTIES)
    turns = _turns(body.get("messages"))
    new = _field(body, "max_tokens", session.args.max_new_tokens,
                 lambda v: _is_int(v) and v >= 1, "max_tokens must be an integer >= 1")
    params, seed = _openai_sampling(body)
    logprobs = _field(body, "logprobs", False, lambda v: isinstance(v, bool),
                      "logprobs must be a boolean")
    top = _field(body, "top_logprobs", 0, lambda v: _is_int(v) and 0 <= v <= MAX_TOP_LOGPROBS,
                 f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}]")
    stops = _stops(body)
    try:
        ids = session.chat_prompt(turns)[1]
    except ValueError as error:  # the template's: a system message it has no place for, ...
        raise BadRequest(f"messages: {error}") from None
    _check_length([ids], new, max_length, "max_tokens")
    logprobs = top if logprobs else None
    return (Job([ids], new, params, seed, logprobs, stops, chat=True,
                **_choices(body, 1, logprobs)), session.encoder)


def chat_text(job, encoder, result):
    """(content, tokens kept, finish_reason) of one chat answer's generation."""
    content, kept, cut = encoder.reply(result.tokens, job.stops)
    return content, kept, "stop" if result.stopped or cut else "length"


def chat_answer(job, encoder, results, tokenizer):
    def entry(token, value):
        text = tokenizer.detokenize([token])
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    choices, generated = [], 0
    for index, result in enumerate(results):
        content, kept, reason = chat_text(job, encoder, result)
        generated += kept
        logprobs = None
        if job.logprobs is not None:
            logprobs = {"content": [{**entry(t, v), "top_logprobs": [entry(i, p) for i, p in top]}
                                    for t, v, top in zip(result.tokens[:kept], result.logprobs,
                                                         result.top_logprobs)]}
        choices.append({"index": index, "message": {"role": "assistant", "content": content},
                        "logprobs": logprobs, "finish_reason": reason})
    return {**head(job, "chat.completion"), "choices": choices, "usage": usage(job, generated)}
