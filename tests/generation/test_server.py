"""``generate_gpt.py --port``: Megatron-LM's HTTP API over a converted HF Llama, under torchrun.

Each answer is checked against a path that shares no code with the server: the same prompts and
sampling through ``generate_gpt.py --prompt`` (its stdout), and ``transformers``' forward for
greedy tokens and for every log-probability (log_softmax over prompt + answer). Bad requests get
400 with Megatron-LM's message; SIGTERM to rank 0 stops every rank with exit status 0.
"""

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.generation.serving import (CHAT_TEMPLATE, EOD, FLAGS, TIMEOUT_S, USER, Server, env,
                                      request)
from tests.launcher import ROOT, free_port

PROMPTS = ["1 2 3 4 5", "200 17 9"]
SAMPLED = {"temperature": 0.8, "top_k": 5, "random_seed": 7}  # /api's fields
NEW = 8


@pytest.fixture(scope="module")
def cli_sampled(checkpoint):
    """generate_gpt.py's answers to PROMPTS with SAMPLED's sampling (one process, stdout)."""
    cmd = [sys.executable, f"{ROOT}/generate_gpt.py", "--load", str(checkpoint[1]), *FLAGS,
           "--max-new-tokens", str(NEW), "--temperature", "0.8", "--top-k", "5", "--seed", "7",
           "--prompt", PROMPTS[0], "--prompt", PROMPTS[1]]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S,
                            env={**env(), "MASTER_PORT": str(free_port())})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.splitlines()


def _hf_logprobs(hf, tokens):
    """log_softmax of a plain forward over ``tokens``: each token's after the first."""
    with torch.no_grad():
        logits = hf(torch.tensor([tokens])).logits[0].float()
    return torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]


def _check_api_answer(answer, cli_lines, hf):
    for prompt, text, tokens, logprobs, cli in zip(PROMPTS, answer["text"], answer["tokens"],
                                                   answer["logprobs"], cli_lines):
        n = len(prompt.split())
        assert tokens[:n] == [int(t) for t in prompt.split()]
        assert tokens[n:] == [int(t) for t in cli.split()]  # the CLI's answer, token for token
        assert text == " ".join([prompt] + cli.split())  # prompt + answer, spaced as decoded
        torch.testing.assert_close(torch.tensor(logprobs), _hf_logprobs(hf, tokens),
                                   atol=1e-4, rtol=1e-4)
    assert any(len(c.split()) > 1 for c in cli_lines), "an empty answer would prove little"


BAD_REQUESTS = [  # (method, path, body, part of the message)
    ("PUT", "/api", {"prompts": ["1"], "tokens_to_generate": -1},
     "tokens_to_generate must be an integer greater than or equal to 0"),
    ("PUT", "/api", {"prompts": []}, "prompts is empty"),
    ("PUT", "/api", {"tokens_to_generate": 4}, "prompts argument required"),
    ("PUT", "/api", {"prompts": ["1 2"], "tokens_to_generate": 2047},
     "2 tokens + tokens_to_generate 2047 exceeds the model's 2048 positions"),
    ("PUT", "/api", {"prompts": ["1"], "top_k": 2, "top_p": 0.5},
     "cannot set both top-k and top-p samplings."),
    ("PUT", "/api", {"prompts": ["1"], "tokens_to_generate": 0},
     "tokens_to_generate=0 implies logprobs should be True"),
    ("PUT", "/api", {"prompts": ["1"], "top-k": 2}, "unknown field(s) top-k"),
    ("PUT", "/api", b"{not json", "Expecting property name"),
    ("POST", "/v1/completions", {"prompt": "1", "n": 2, "best_of": 1},
     "best_of must be an integer >= n (2)"),
    ("POST", "/completions", {"prompt": [1, 250]}, "prompt token ids must be in [0, 250)"),
    ("POST", "/chat/completions", {"messages": [{"role": "user", "content": "1"}]},
     "start the server with --prompt-type NAME"),
]
BAD_CHATS = [  # (messages, part of the message)
    ([], "messages must be a non-empty list"),
    ([{"role": "tool", "content": "1"}], "messages[0]: unknown role 'tool'"),
    ([USER, {"role": "assistant", "content": "4"}], "the last message must be the user's"),
    ([{"role": "user", "content": [1, 2]}], "messages[0].content must be a string"),
    ([USER, {"role": "system", "content": "4"}, USER], "messages[1]: a system message may only"),
    ([USER, USER], "messages[1]: user where the assistant's turn comes"),
    ([{**USER, "name": "ann"}], "messages[0] must be an object of role and content"),
    ([{"role": "user", "content": "x"}], "messages: 'x' is not an integer token id"),
]


def test_server_answers_as_generate_gpt_and_transformers(checkpoint, hf_model, cli_sampled):
    server = Server(1, checkpoint[1])
    try:
        body = {"prompts": PROMPTS, "tokens_to_generate": NEW, "logprobs": True, **SAMPLED}
        status, answer = server.request("PUT", "/api", body)
        assert status == 200, answer
        _check_api_answer(answer, cli_sampled, hf_model)
        # Served one at a time: concurrent requests, each reseeding, get the same answer.
        with ThreadPoolExecutor(3) as pool:
            again = list(pool.map(lambda _: server.request("PUT", "/api", body), range(3)))
        assert again == [(200, answer)] * 3
        # OpenAI's completions, greedy (temperature 0), against transformers' generate.
        prompt = [int(t) for t in PROMPTS[1].split()]
        status, answer = server.request("POST", "/v1/completions", {
            "model": "tiny", "prompt": PROMPTS[1], "max_tokens": NEW, "temperature": 0,
            "logprobs": 2, "echo": True})
        assert status == 200, answer
        with torch.no_grad():
            greedy = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW,
                                       eos_token_id=EOD, pad_token_id=0)[0].tolist()
        greedy = [t for t in greedy if t != EOD]
        choice = answer["choices"][0]
        assert choice["text"] == " ".join(map(str, greedy))
        lp = choice["logprobs"]
        assert lp["tokens"] == [str(t) for t in greedy] and lp["token_logprobs"][0] is None
        torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:]),
                                   _hf_logprobs(hf_model, greedy), atol=1e-4, rtol=1e-4)
        for token, value, top in zip(lp["tokens"][len(prompt):], lp["token_logprobs"][len(prompt):],
                                     lp["top_logprobs"][len(prompt):]):
            assert len(top) == 2 and list(top)[0] == token and top[token] == value  # greedy
        # Megatron-LM's client: prompt, number of tokens; answers and errors as it prints them.
        client = subprocess.run(
            [sys.executable, f"{ROOT}/tools/text_generation_cli.py", server.url.split("//")[1]],
            input="1 2 3\n4\n1 2\n-1\n", capture_output=True, text=True, timeout=TIMEOUT_S)
        assert client.returncode == 0, client.stderr
        shown = client.stdout.split("Enter prompt: ")
        assert re.fullmatch(r"Enter number of tokens to generate: Megatron Response: \n"
                            r"1 2 3( \d+){0,4}\n", shown[1]), shown
        assert shown[2] == ("Enter number of tokens to generate: Error 400: tokens_to_generate "
                            "must be an integer greater than or equal to 0\n"), shown
        for method, path, body, message in BAD_REQUESTS:
            status, error = server.request(method, path, body)
            assert status == 400, (body, error)
            assert message in json.dumps(error), (body, error)
        assert server.stop() == 0, "".join(server.log[-40:])
        assert "server stopped" in "".join(server.log)
    finally:
        server.kill()


def test_server_tp2_answers_as_one_rank(checkpoint, hf_model, cli_sampled):
    server = Server(2, checkpoint[1], "--tensor-model-parallel-size", "2")  # saved at TP=1
    try:
        status, answer = server.request("PUT", "/api", {
            "prompts": PROMPTS, "tokens_to_generate": NEW, "logprobs": True, **SAMPLED})
        assert status == 200, answer
        _check_api_answer(answer, cli_sampled, hf_model)
        assert server.stop() == 0, "".join(server.log[-40:])
    finally:
        server.kill()


def test_bad_port_fails_before_loading(checkpoint, capsys):
    from megatron_ext.generation.cli import main

    argv = ["--load", str(checkpoint[1]), *FLAGS]
    with pytest.raises(SystemExit) as error:
        main(argv + ["--port", "70000"])
    assert error.value.code == 2  # argparse's usage error, on every rank
    assert "--port 70000: must be in [0, 65535]" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        in_use = f"--port {port} on --host 127.0.0.1: Address already in use"
        with pytest.raises(SystemExit, match=in_use):
            main(argv + ["--port", str(port), "--host", "127.0.0.1"])
    import torch.distributed as dist

    assert not dist.is_initialized()  # failed before any process group (and any model)


def test_chat_completions_answer_as_interactive_chat(checkpoint, hf_model, tmp_path):
    """POST /chat/completions renders as ``--interactive --prompt-type`` does: the same greedy
    answer as that CLI (one user line on stdin, --system), and as transformers' greedy tokens
    after the template's rendering, cut at its stop text " 13"; bad messages get 400."""
    template = tmp_path / "numbers.json"
    template.write_text(json.dumps(CHAT_TEMPLATE))
    chat = ["--prompt-type", str(template), "--max-new-tokens", str(NEW)]
    cli = subprocess.run(
        [sys.executable, f"{ROOT}/generate_gpt.py", "--load", str(checkpoint[1]), *FLAGS, *chat,
         "--interactive", "--system", "9 9"], input=USER["content"] + "\n", cwd=ROOT,
        capture_output=True, text=True, timeout=TIMEOUT_S,
        env={**env(), "MASTER_PORT": str(free_port())})
    assert cli.returncode == 0, cli.stderr[-3000:]
    expected = cli.stdout.split("\n")[0]  # the answer's line (a chat answer has no newline)
    server = Server(1, checkpoint[1], *chat)
    try:
        status, answer = server.request("POST", "/v1/chat/completions", {
            "model": "tiny", "temperature": 0, "logprobs": True, "top_logprobs": 1,
            "messages": [{"role": "system", "content": "9 9"}, USER]})
        assert status == 200, answer
        (choice,) = answer["choices"]
        assert choice["message"] == {"role": "assistant", "content": expected}
        prompt = [9, 9, 10, 1, 2, 3, 11, 12]  # CHAT_TEMPLATE's rendering, spelled out
        with torch.no_grad():
            greedy = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW,
                                       eos_token_id=EOD, pad_token_id=0)[0, len(prompt):].tolist()
        new = greedy[:greedy.index(EOD)] if EOD in greedy else greedy
        kept = new.index(13) if 13 in new else len(new)
        assert 0 < kept < len(new), f"{new}: to test the stop, the answer holds a 13 (not first)"
        assert choice["message"]["content"] == " ".join(map(str, new[:kept]))
        assert answer["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": kept,
                                   "total_tokens": len(prompt) + kept}
        assert choice["finish_reason"] == ("length" if kept == NEW else "stop")
        content = choice["logprobs"]["content"]
        assert [c["token"] for c in content] == [str(t) for t in new[:kept]]
        torch.testing.assert_close(torch.tensor([c["logprob"] for c in content]),
                                   _hf_logprobs(hf_model, prompt + new[:kept])[len(prompt) - 1:],
                                   atol=1e-4, rtol=1e-4)
        assert all(c["top_logprobs"][0]["token"] == c["token"] for c in content)  # greedy
        for messages, message in BAD_CHATS:
            status, error = server.request("POST", "/chat/completions", {"messages": messages})
            assert status == 400 and message in error["error"]["message"], (messages, error)
        assert server.stop() == 0, "".join(server.log[-40:])
    finally:
        server.kill()


FAILING = [7, 7, 7]  # a prompt whose generation fails (as out of memory would), in process


def _serve_in_process(argv, requests):
    """generate_gpt.py ``argv`` --port 0 as rank 0 of 1 in this process, ``requests`` sent
    from a thread once it serves, then SIGTERM: (exit code, [(status, answer)], the number of
    tokens each generation made)."""
    from megatron_ext.generation import cli, generator

    urls, answers, made = queue.Queue(), [], []
    real_bind, real = cli.bind, generator.Generator.generate

    def bind(*args):  # its port (0: any free one), once it serves
        server = real_bind(*args)
        urls.put("http://127.0.0.1:%d" % server.server_address[1])
        return server

    cli.bind = bind

    def generate(self, prompt, *args, **kwargs):
        if list(prompt) == FAILING:
            raise RuntimeError("injected failure")
        result = real(self, prompt, *args, **kwargs)
        made.append(len(result.tokens))
        return result

    generator.Generator.generate = generate

    def client():
        try:
            url = urls.get(timeout=TIMEOUT_S)
            answers.extend(request(url, *asked) for asked in requests)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=client, daemon=True).start()
    code = cli.main(argv + ["--port", "0", "--host", "127.0.0.1"])
    return code, answers, made


def _stopped_at(pieces, stop):
    """How many of the decoded ``pieces`` make a text holding ``stop`` (all: never)."""
    return next((i + 1 for i in range(len(pieces)) if stop in "".join(pieces[:i + 1])),
                len(pieces))


def test_stop_strings_end_generation_and_errors_leave_the_server_serving(checkpoint, hf_model,
                                                                         tmp_path):
    """Generation ends as soon as a stop string (or the chat template's stop text) is there,
    not at max_tokens; bad parameters get 400 naming the field, a failing generation 500, and
    the next request is served. The stop points come from transformers' greedy tokens."""
    from tests.launcher import launch

    template = tmp_path / "numbers.json"
    template.write_text(json.dumps(CHAT_TEMPLATE))
    with torch.no_grad():
        def greedy(prompt):
            out = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW,
                                    eos_token_id=EOD, pad_token_id=0)[0, len(prompt):].tolist()
            return out[:out.index(EOD)] if EOD in out else out

        prompt, chat_prompt = [1, 2, 3, 4, 5], [9, 9, 10, 1, 2, 3, 11, 12]  # CHAT_TEMPLATE's
        new, chat_new = greedy(prompt), greedy(chat_prompt)
    stop = f" {new[3]}"
    pieces = [f" {t}" for t in new]  # /completions' text: the continuation of the prompt
    stopped = _stopped_at(pieces, stop)
    chat_stopped = _stopped_at([f"{' ' if i else ''}{t}" for i, t in enumerate(chat_new)], " 13")
    assert stopped < len(new) == NEW and chat_stopped < len(chat_new), (new, chat_new)
    completion = {"prompt": "1 2 3 4 5", "max_tokens": NEW, "temperature": 0, "stop": [stop]}
    bad = [({"temperature": -1}, "temperature must be a number in [0, 100]"),
           ({"top_p": 1.5}, "top_p must be a number in [0, 1]"),
           ({"max_tokens": 2.5}, "max_tokens must be an integer >= 0"),
           ({"max_tokens": 2047}, "2 tokens + max_tokens 2047 exceeds the model's 2048"),
           ({"seed": 2 ** 64}, "seed must be an integer in [0, 2**64)")]
    requests = [("POST", "/completions", completion),
                ("POST", "/chat/completions", {"temperature": 0, "max_tokens": NEW, "messages": [
                    {"role": "system", "content": "9 9"}, USER]}),
                *[("POST", "/completions", {"prompt": "1 2", **body}) for body, _ in bad],
                ("POST", "/chat/completions", {"messages": [USER], "top_p": 2}),
                ("POST", "/completions", {"prompt": FAILING}),
                ("POST", "/completions", completion)]
    argv = ["--load", str(checkpoint[1]), *FLAGS, "--prompt-type", str(template)]
    code, answers, made = launch(_serve_in_process, 1, argv, requests)[0]
    assert code == 0 and len(answers) == len(requests), answers
    (status, first), (chat_status, chat), *errors, (failed, failure), again = answers
    assert status == chat_status == 200, (first, chat)
    assert made == [stopped, chat_stopped, stopped]  # not NEW: stopped at the stop strings
    cut = "".join(pieces[:stopped])
    assert first["choices"][0]["text"] == cut[:cut.index(stop)]
    assert first["choices"][0]["finish_reason"] == "stop"
    assert chat["choices"][0]["message"]["content"] == " ".join(map(str, chat_new[:chat_stopped - 1]))
    for (code, error), message in zip(errors, [m for _, m in bad] + ["top_p must be"]):
        assert code == 400 and message in error["error"]["message"], (message, error)
    assert failed == 500 and failure["error"]["message"] == (
        "generating failed: RuntimeError: injected failure"), failure
    assert again[0] == 200 and again[1]["choices"] == first["choices"]
