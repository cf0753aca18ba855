"""``stream: true`` and ``n`` > 1 on ``generate_gpt.py --port``, at 1 rank and at TP=2.

References: the same requests without ``stream`` from a one-rank server (``test_server.py``
checks those answers against ``generate_gpt.py`` and ``transformers``), the same requests with
``n=1`` and each derived seed, ``transformers``' greedy tokens for a stop string, and Python's
own UTF-8 decoding for the incremental text. Server-sent events are read with urllib.
"""

import json
import re
import socket
import urllib.request

import pytest
import torch

from megatron_ext.generation.streaming import StableText
from megatron_ext.tokenizer.base import ByteTokenizer
from tests.generation.serving import CHAT_TEMPLATE, EOD, TIMEOUT_S, USER, Server

NEW = 8
PROMPT = [1, 2, 3, 4, 5]
SAMPLED = {"temperature": 0.8, "top_k": 5}
CHAT = {"messages": [{"role": "system", "content": "9 9"}, USER], "max_tokens": NEW}
BEST = {"prompt": "1 2 3 4 5", "max_tokens": NEW, "temperature": 1.0, "seed": 5, "n": 2,
        "best_of": 3}
LONG = 900  # PROMPT's greedy answer has no EOD this early: only a cancellation ends it sooner


def test_stable_text_never_splits_a_character_nor_sends_a_stop_string():
    """Byte by byte (each byte a token: every multi-byte character split), the text sent is
    always the start of the whole decoded text, holds no U+FFFD and, with stop strings, no
    part of the one that ends the text (nor of one that began but never came whole: sent once
    it diverged); with the rest it is exactly the text cut before the stop string."""
    tokenizer = ByteTokenizer()
    text = "Grüße,\n\n  日本語 — 🙂 naïve STOP after"
    ids = list(text.encode("utf-8"))
    for stops, final in ([], text), (["STOP", "日本語 — 🙂 x"], text[:text.index("STOP")]):
        stable, sent = StableText(tokenizer.detokenize, stops), ""
        for i in range(1, len(ids) + 1):
            sent += stable.delta(ids[:i])
            assert final.startswith(sent) and "\ufffd" not in sent, (ids[:i], sent)
            if not stops:  # every whole character goes out at once (but a last space)
                assert sent == bytes(ids[:i]).decode("utf-8", errors="ignore").removesuffix(" ")
        assert sent + stable.rest(final) == final


def _events(url, path, body):
    """The ``data:`` events of a streamed answer (JSON, and the final "[DONE]")."""
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        raw = response.read().decode()
    assert raw.endswith("\n\n"), raw
    events = [block[len("data: "):] for block in raw[:-2].split("\n\n")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def _joined(events, chat):
    """{choice index: its text, joined} and {index: finish_reason}, checking each chunk's place:
    one id, a role first in each chat choice, the finish_reason last, usage in the last chunk."""
    assert events[-1] == "[DONE]"
    chunks, texts, reasons = events[:-1], {}, {}
    assert len({(c["id"], c["created"], c["model"], c["object"]) for c in chunks}) == 1
    assert chunks[0]["object"] == ("chat.completion.chunk" if chat else "text_completion")
    for chunk in chunks[:-1]:
        assert chunk["usage"] is None and len(chunk["choices"]) == 1, chunk
    assert chunks[-1]["choices"] == [], chunks[-1]  # stream_options.include_usage
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        index = choice["index"]
        assert index not in reasons, f"a chunk after choice {index}'s finish_reason: {chunk}"
        if chat:
            if index not in texts:
                assert choice["delta"] == {"role": "assistant", "content": ""}, chunk
            piece = choice["delta"].get("content", "")
        else:
            piece = choice["text"]
        texts[index] = texts.get(index, "") + piece
        if choice["finish_reason"] is not None:
            reasons[index] = choice["finish_reason"]
    return texts, reasons, chunks[-1]["usage"]


def _check_stream(events, answer, chat):
    texts, reasons, usage = _joined(events, chat)
    choices = answer["choices"]
    assert texts == {c["index"]: c["message"]["content"] if chat else c["text"] for c in choices}
    assert reasons == {c["index"]: c["finish_reason"] for c in choices}
    assert usage == answer["usage"]


def _cases(stop):
    """(path, body without stream) of each request streamed, and the n=1 requests each choice
    of an n=2 request equals: {case index: [(choice index, path, body)]}."""
    completion = {"prompt": "1 2 3 4 5", "max_tokens": NEW}
    cases = [("/v1/completions", {**completion, "temperature": 0, "stop": [stop]}),
             ("/v1/completions", {**completion, "prompt": ["1 2 3 4 5", "200 17 9"], "n": 2,
                                  "seed": 7, "echo": True, **SAMPLED}),
             ("/v1/chat/completions", {**CHAT, "n": 2, "seed": 3, "temperature": 1.0}),
             ("/v1/chat/completions", {**CHAT, "temperature": 0})]  # cut at the template's " 13"
    singles = {1: [(p * 2 + i, "/v1/completions", {**cases[1][1], "prompt": prompt, "n": 1,
                                                  "seed": 7 + i})
                   for p, prompt in enumerate(cases[1][1]["prompt"]) for i in range(2)],
               2: [(i, "/v1/chat/completions", {**cases[2][1], "n": 1, "seed": 3 + i})
                   for i in range(2)]}
    return cases, singles


def _greedy(hf, prompt, new):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new,
                          eos_token_id=EOD, pad_token_id=0)[0, len(prompt):].tolist()
    return out[:out.index(EOD)] if EOD in out else out


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    path = tmp_path_factory.mktemp("stream") / "numbers.json"
    path.write_text(json.dumps(CHAT_TEMPLATE))
    return ["--prompt-type", str(path)]


@pytest.fixture(scope="module")
def greedy_stop(hf_model):
    """A stop string of two of transformers' greedy tokens after PROMPT (its 3rd and 4th), and
    the completion's text cut before it."""
    new = _greedy(hf_model, PROMPT, NEW)
    assert len(new) == NEW, new
    stop = f" {new[2]} {new[3]}"
    text = "".join(f" {t}" for t in new)
    return stop, text[:text.index(stop)]


@pytest.fixture(scope="module")
def answers(checkpoint, template, greedy_stop):
    """A one-rank server's answers without stream to ``_cases``, and to their n=1 requests."""
    cases, singles = _cases(greedy_stop[0])
    server = Server(1, checkpoint[1], *template)
    try:
        answered = [server.request("POST", path, body) for path, body in cases]
        single = {case: [server.request("POST", path, body) for _, path, body in bodies]
                  for case, bodies in singles.items()}
        streamed = [_events(server.url, path, {**body, "stream": True,
                                               "stream_options": {"include_usage": True}})
                    for path, body in cases]
        bad = [server.request("POST", "/v1/completions", {"prompt": "1", **body})
               for body, _ in BAD]
        best = [server.request("POST", "/v1/completions", body) for body in [BEST] + [
            {**BEST, "n": 1, "best_of": 1, "seed": 5 + i, "logprobs": 0} for i in range(3)]]
        assert server.stop() == 0, "".join(server.log[-40:])
    finally:
        server.kill()
    assert all(status == 200 for status, _ in answered), answered
    assert all(status == 200 for status, _ in best), best
    return [a for _, a in answered], single, streamed, bad, [a for _, a in best]


BAD = [({"stream": True, "logprobs": 1}, "logprobs with stream=true is not supported"),
       ({"stream_options": {"include_usage": True}}, "stream_options is only allowed with stream"),
       ({"stream": True, "stream_options": {"usage": True}},
        "unknown stream_options field(s) usage"),
       ({"stream": 1}, "stream must be a boolean"),
       ({"n": 0}, "n must be an integer >= 1"),
       ({"stream": True, "best_of": 2}, "best_of > n with stream=true is not supported"),
       ({"n": 64, "best_of": 129}, "best_of=129 x 1 prompt(s) makes 129 choices"),
       ({"n": 129}, "n=129 x 1 prompt(s) makes 129 choices; at most 128")]


def test_stream_joins_to_the_answer_and_n_choices_to_their_seeds(answers, greedy_stop):
    """Streamed (greedy with a two-token stop string, sampled with n=2 over two prompts and
    echo, chat sampled with n=2, chat greedy with the template's stop), the deltas of each
    choice join to its answer without stream; choice i of n=2 with seed S is the answer with
    n=1 and seed S + i; the greedy stop cuts where transformers' tokens first hold it; best_of
    answers the n of its candidates (those seeds' answers) of highest mean log-probability."""
    answered, single, streamed, bad, best = answers
    cases, _ = _cases(greedy_stop[0])
    for (path, _), answer, events in zip(cases, answered, streamed):
        _check_stream(events, answer, chat="chat" in path)
    assert answered[0]["choices"][0]["text"] == greedy_stop[1]
    assert answered[0]["choices"][0]["finish_reason"] == "stop"
    for case, requests in _cases(greedy_stop[0])[1].items():
        chat = "chat" in cases[case][0]
        text = (lambda c: c["message"]["content"]) if chat else (lambda c: c["text"])
        got = [text(c) for c in answered[case]["choices"]]
        assert [text(a["choices"][0]) for _, a in single[case]] == [got[k] for k, *_ in requests]
        assert got[0] != got[1], "choices drawn from one seed would prove nothing"
    assert len(answered[1]["choices"]) == 4 and answered[1]["usage"]["prompt_tokens"] == 8
    for (status, error), (_, message) in zip(bad, BAD):
        assert status == 400 and message in error["error"]["message"], (message, error)
    # best_of 3, n 2: the two of the three seeds' answers of highest mean log-probability.
    candidates = [a["choices"][0] for a in best[1:]]
    ranked = sorted(candidates, key=lambda c: -sum(c["logprobs"]["token_logprobs"]) /
                    len(c["logprobs"]["token_logprobs"]))
    assert [c["text"] for c in best[0]["choices"]] == [c["text"] for c in ranked[:2]]
    assert ranked[:2] != candidates[:2], "the first two seeds' answers would prove no ranking"
    assert all(c["logprobs"] is None for c in best[0]["choices"])  # ranked, not asked for


def _leave_mid_stream(url, body):
    """Send a streamed request, read up to its first event, and close the connection."""
    host, port = re.match(r"http://([\d.]+):(\d+)", url).groups()
    data = json.dumps(body).encode()
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
        received = b""
        while b"data: " not in received:
            chunk = sock.recv(4096)
            assert chunk, received
            received += chunk
    assert received.startswith(b"HTTP/1.0 200"), received


def test_stream_tp2_answers_as_one_rank_and_survives_a_client_that_leaves(
        checkpoint, template, greedy_stop, answers):
    """At TP=2 the same streams join to the one-rank answers; a client that closes its
    connection after the first event cancels its generation on both ranks within a few tokens
    (not LONG), the next request is answered as before, and SIGTERM ends both ranks with 0."""
    answered = answers[0]
    cases, _ = _cases(greedy_stop[0])
    server = Server(2, checkpoint[1], "--tensor-model-parallel-size", "2", *template)
    try:
        for (path, body), answer in zip(cases, answered):
            events = _events(server.url, path, {**body, "stream": True,
                                                "stream_options": {"include_usage": True}})
            _check_stream(events, answer, chat="chat" in path)
        _leave_mid_stream(server.url, {"prompt": PROMPT, "max_tokens": LONG, "temperature": 0,
                                       "stream": True})
        status, answer = server.request("POST", *cases[0])
        assert status == 200 and answer["choices"] == answered[0]["choices"], answer
        assert server.stop() == 0, "".join(server.log[-40:])
    finally:
        server.kill()
    log = "".join(server.log)
    assert "the client left mid-stream" in log, log[-3000:]
    (made,) = re.findall(rf"choice 0 cancelled after (\d+) of {LONG} tokens", log)
    assert 0 < int(made) < LONG
