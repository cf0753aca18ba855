"""``generate_gpt.py --port N``: Megatron-LM's text generation server (stdlib ``http.server``).

Endpoints (formats and checks in ``endpoints.py``): ``PUT /api``, ``POST /completions`` (also
``/v1/completions``) and, with ``--prompt-type``, ``POST /chat/completions`` (also
``/v1/chat/completions``). A bad request gets 400 with a message before any rank is involved;
a request that fails after (in generation, or formatting its answer) gets 500 with the error, and
the server goes on with the next one. (A failure on some ranks only, which no check here
foresees, leaves the others waiting in a collective, as in Megatron-LM.)

Rank 0 listens; its handler threads only parse and queue. Rank 0's main thread takes one job at a
time (Megatron's lock), shares it with every rank (``Session.shared``), and all ranks generate it
together; SIGTERM/SIGINT queue a stop that rank 0 shares the same way, so every rank leaves
its loop and exits cleanly, after the request in progress.
"""

import json
import logging
import queue
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

import torch.distributed as dist

from megatron_ext.generation.endpoints import (BadRequest, api_answer, chat_answer,
                                               completions_answer, parse_api, parse_chat,
                                               parse_completions, stop_when)

logger = logging.getLogger("megatron_ext")

# -- serving ---------------------------------------------------------------------------------
class _Request:
    def __init__(self, job):
        self.job, self.results, self.done = job, None, threading.Event()


def _handler(session, jobs):
    tokenizer = session.tokenizer
    max_length = session.max_length
    # Handler threads run side by side; a Hugging Face fast tokenizer may refuse to be entered
    # from two threads at once ("Already borrowed"): tokenizing and decoding take turns.
    tokenizing = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status, payload):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _serve(self, parse, answer, error):
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if not isinstance(body, dict):
                    raise BadRequest("the request body must be a JSON object")
                with tokenizing:
                    job, *rest = parse(body, tokenizer, max_length)
            except (BadRequest, json.JSONDecodeError, UnicodeDecodeError) as e:
                return self._reply(400, error(str(e)))
            except Exception as e:  # a check missing above: said, not a dropped connection
                return self._failed(error, "reading the request", e)
            request = _Request(job)
            jobs.put(request)
            request.done.wait()
            if isinstance(request.results, Exception):
                return self._failed(error, "generating", request.results)
            try:
                with tokenizing:
                    payload = answer(job, *rest, request.results, tokenizer)
            except Exception as e:
                return self._failed(error, "formatting the answer", e)
            self._reply(200, payload)

        def _failed(self, error, stage, exception):
            logger.error(f"{self.command} {self.path} failed {stage}: "
                         f"{type(exception).__name__}: {exception}")
            self._reply(500, error(f"{stage} failed: {type(exception).__name__}: {exception}"))

        def do_PUT(self):
            if self.path != "/api":
                return self._reply(404, {"message": f"no PUT {self.path}: PUT /api"})
            self._serve(parse_api, api_answer, lambda m: {"message": m})

        def do_POST(self):
            error = lambda m: {"error": {"message": m, "type": "invalid_request_error"}}  # noqa
            if self.path in ("/completions", "/v1/completions"):
                return self._serve(parse_completions, completions_answer, error)
            if self.path in ("/chat/completions", "/v1/chat/completions"):
                return self._serve(lambda *a: parse_chat(*a, session), chat_answer, error)
            self._reply(404, {"message": f"no POST {self.path}: POST /completions or "
                                         "/chat/completions"})

        def log_message(self, format, *args):
            logger.info("%s %s", self.address_string(), format % args)

    return Handler


def bind(host: str, port: int) -> ThreadingHTTPServer:
    """The listening socket, opened on rank 0 before any process group (a taken port fails
    here, at once); the handler comes with ``serve``."""
    try:
        server = ThreadingHTTPServer((host, port), BaseHTTPRequestHandler)
    except OSError as error:
        raise OSError(f"--port {port} on --host {host}: {error.strerror} (a port in use? pick "
                      f"another, or 0 for any free one)") from None
    server.daemon_threads = True  # a request left waiting at shutdown does not hold the exit
    return server


def serve(session, server: Optional[ThreadingHTTPServer]) -> None:
    """Answer requests until SIGTERM/SIGINT; ``server`` on rank 0, None on the other ranks."""
    jobs = queue.Queue()
    if server is not None:
        server.RequestHandlerClass = _handler(session, jobs)
        # The handler runs between two bytecodes of the main thread, possibly inside
        # ``jobs.get``: a new thread queues the stop, so the queue's lock is never re-entered.
        stop = lambda *_: threading.Thread(target=jobs.put, args=(None,)).start()  # noqa: E731
        threading.Thread(target=server.serve_forever, daemon=True).start()
        host, port = server.server_address[:2]
        chat = ", POST /chat/completions" if session.encoder is not None else ""
        logger.info(f"serving on http://{host}:{port} (PUT /api, POST /completions{chat})")
    else:
        stop = lambda *_: None  # noqa: E731  rank 0 ends the loop for every rank
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    try:
        while True:
            request = jobs.get() if server is not None else None
            job = session.shared(None if request is None else request.job)
            if job is None:
                break
            try:
                if job.seed is not None:
                    session.rng.manual_seed(job.seed)
                results = [session.generator.generate(
                    ids, job.max_new_tokens, job.params, session.rng, logprobs=job.logprobs,
                    stop_when=stop_when(job, ids, session.tokenizer, session.encoder))
                    for ids in job.prompts]
            except Exception as error:  # answered with 500; the next request is served
                results = error
            if request is not None:
                request.results = results
                request.done.set()
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
    if dist.get_rank() == 0:
        logger.info("server stopped")
