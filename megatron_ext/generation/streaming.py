"""``stream: true``: OpenAI's server-sent events for ``/completions`` and ``/chat/completions``.

The main loop (``server.py``) hands the request's handler thread one event at a time: a choice
begins, a token was generated, a choice ended (its ``Generation``), the request ended. A
``Stream`` turns each into ``data: {...}\\n\\n`` events as OpenAI and vLLM send them: chunks of
``object`` ``text_completion`` (``text``) or ``chat.completion.chunk`` (``delta``; the first
of a choice carries the role), a last chunk per choice with its ``finish_reason``, with
``stream_options.include_usage`` a chunk of the usage and no choices, then ``data: [DONE]``.

Text goes out only once no later token can change it (``StableText``), so the deltas of a
choice, joined, are exactly its text in the answer without ``stream``: the last chunk carries
what is left of that answer, computed by the same function (``completion_text``/``chat_text``).
"""

import json

from megatron_ext.generation.chat_endpoint import chat_text
from megatron_ext.generation.endpoints import completion_text, continuation, head, usage

DONE = b"data: [DONE]\n\n"


def _held(text, stops):
    """The length of ``text``'s longest end that begins a stop string: the next tokens may
    complete it, and an answer never holds any of a stop string."""
    return max((n for s in stops for n in range(1, min(len(s) - 1, len(text)) + 1)
                if text.endswith(s[:n])), default=0)


class StableText:
    """The text of a growing answer, handed out as it becomes final. ``decode(tokens)`` is
    the answer's text so far, as the answer decodes it; it is cut before the first stop string."""

    def __init__(self, decode, stops):
        self.decode, self.stops, self.sent = decode, stops, ""

    def delta(self, tokens) -> str:
        """What ``tokens`` add that no later token can change (may be empty)."""
        text = self.decode(tokens)
        cut = min((text.find(s) for s in self.stops if s in text), default=-1)
        if cut >= 0:
            text = text[:cut]
        else:
            # U+FFFD: bytes of a character whose other bytes are still to come (SentencePiece's
            # byte pieces, byte-level BPE). A last space: a tokenizer's clean-up may join it with
            # the punctuation that comes next (" ." -> "."); other whitespace goes out.
            text = text.rstrip("\ufffd").removesuffix(" ")
            text = text[:len(text) - _held(text, self.stops)]
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def rest(self, final: str) -> str:
        """The end of ``final`` (the answer's text) not sent yet."""
        if not final.startswith(self.sent):
            raise RuntimeError(f"the streamed text {self.sent!r} is not the start of the answer "
                               f"{final!r} (the tokenizer decodes a prefix differently)")
        delta, self.sent = final[len(self.sent):], final
        return delta


class Stream:
    """One streaming request's events, from the main loop's (``on``)."""

    def __init__(self, job, tokenizer, kind):
        self.job, self.tokenizer = job, tokenizer
        self.head = head(job, kind)
        self.tokens, self.text, self.generated = [], None, 0

    def _event(self, payload) -> bytes:
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

    def _chunk(self, choice) -> bytes:
        payload = {**self.head, "choices": [choice]}
        if self.job.usage:  # OpenAI's: null in every chunk but the last
            payload["usage"] = None
        return self._event(payload)

    def on(self, kind, value) -> bytes:
        """The events of a main-loop event: ``choice`` (its index), ``token``, ``result``
        ((index, Generation)), ``end`` (the results, or the exception generation raised)."""
        if kind == "choice":
            self.index, self.tokens = value, []
            self.text = StableText(self._decoder(value), self._stops())
            opening = self._opening(value)
            return b"" if opening is None else self._chunk(opening)
        if kind == "token":
            self.tokens.append(value)
            delta = self.text.delta(self.tokens)
            return self._chunk(self._piece(delta, None)) if delta else b""
        if kind == "result":
            index, result = value
            final, kept, reason = self._final(index, result)
            self.generated += kept
            return self._chunk(self._piece(self.text.rest(final), reason))
        if isinstance(value, Exception):  # after the 200 status: said in the stream
            return self.error(f"generating failed: {type(value).__name__}: {value}")
        events = b""
        if self.job.usage:
            events = self._event({**self.head, "choices": [],
                                  "usage": usage(self.job, self.generated)})
        return events + DONE

    def error(self, message) -> bytes:
        """An error event (vLLM's), then the end of the stream."""
        return self._event({"error": {"message": message, "type": "server_error"}}) + DONE


class CompletionStream(Stream):
    def __init__(self, job, texts, echo, tokenizer):
        super().__init__(job, tokenizer, "text_completion")
        self.texts, self.echo = texts, echo

    def _prompt(self, index):
        return index // self.job.n

    def _decoder(self, index):
        ids = self.job.prompts[self._prompt(index)]
        return lambda tokens: continuation(self.tokenizer, ids, tokens)

    def _stops(self):
        return self.job.stops

    def _opening(self, index):  # echo: the prompt first, as in the answer's text
        text = self.texts[self._prompt(index)]
        return {"index": index, "text": text, "logprobs": None, "finish_reason": None} \
            if self.echo and text else None

    def _piece(self, text, reason):
        return {"index": self.index, "text": text, "logprobs": None, "finish_reason": reason}

    def _final(self, index, result):
        return completion_text(self.job, self.job.prompts[self._prompt(index)], result,
                               self.tokenizer)


class ChatStream(Stream):
    def __init__(self, job, encoder, tokenizer):
        super().__init__(job, tokenizer, "chat.completion.chunk")
        self.encoder = encoder

    def _decoder(self, index):  # as ``encoder.reply`` decodes
        return lambda tokens: self.tokenizer.detokenize(list(tokens))

    def _stops(self):
        return self.encoder.stop_texts(self.job.stops)

    def _opening(self, index):
        return {"index": index, "delta": {"role": "assistant", "content": ""},
                "logprobs": None, "finish_reason": None}

    def _piece(self, text, reason):
        return {"index": self.index, "delta": {"content": text} if text or reason is None else {},
                "logprobs": None, "finish_reason": reason}

    def _final(self, index, result):
        return chat_text(self.job, self.encoder, result)
