"""``tools/text_generation_cli.py HOST:PORT``: Megatron-LM's interactive client for the server
(``generate_gpt.py --port``): asks for a prompt and a number of tokens, sends them to
``PUT /api``, prints the answer (the prompt and its continuation). End of input quits.

Standard library only (no torch): it runs anywhere the server can be reached from.
"""

import json
import sys
import urllib.error
import urllib.request


def complete(url: str, prompt: str, tokens_to_generate: int) -> str:
    """The server's ``text`` for one prompt; an HTTP error raises with the server's message."""
    data = json.dumps({"prompts": [prompt], "tokens_to_generate": tokens_to_generate}).encode()
    request = urllib.request.Request(url, data=data, method="PUT",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as response:
            return json.loads(response.read())["text"][0]
    except urllib.error.HTTPError as error:
        raise RuntimeError(f"Error {error.code}: {json.loads(error.read())['message']}") from None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: tools/text_generation_cli.py HOST:PORT (a generate_gpt.py --port server)")
    address = argv[0] if "://" in argv[0] else "http://" + argv[0]
    url = address.rstrip("/") + "/api"
    while True:
        try:
            prompt = input("Enter prompt: ")
            count = input("Enter number of tokens to generate: ")
        except EOFError:
            return 0
        try:
            tokens_to_generate = int(count)
        except ValueError:
            print(f"not a number of tokens: {count!r}", flush=True)
            continue
        try:
            text = complete(url, prompt, tokens_to_generate)
        except RuntimeError as error:  # the server's 400: say it and ask again
            print(error, flush=True)
            continue
        except urllib.error.URLError as error:
            sys.exit(f"cannot reach {url}: {error.reason} (is generate_gpt.py --port running?)")
        print("Megatron Response: ")
        print(text, flush=True)
