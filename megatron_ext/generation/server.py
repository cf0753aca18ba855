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

With ``stream``, rank 0's main thread hands each token to the request's handler thread as it is
generated (``streaming.py`` writes the events), and after each token shares one decision with
every rank: go on, or stop (a stop string, or a client that went away: its handler's write
failed). So a client that leaves mid-stream ends its generation at the next token on every rank
together, and the server goes on with the next request.
"""

import json
import logging
import queue
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

import torch.distributed as dist

from megatron_ext.generation.chat_endpoint import chat_answer, parse_chat
from megatron_ext.generation.endpoints import (BadRequest, api_answer, completions_answer,
                                               parse_api, parse_completions, stop_when)
from megatron_ext.generation.streaming import ChatStream, CompletionStream

logger = logging.getLogger("megatron_ext")

# -- serving ---------------------------------------------------------------------------------
class _Request:
    """A job and what the main loop tells its handler thread: ``(kind, value)`` events, the last
    ``("end", results or the exception generation raised)``; with ``stream``, every step's."""

    def __init__(self, job):
        self.job, self.events, self.cancelled = job, queue.Queue(), threading.Event()


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

        def _serve(self, parse, answer, error, stream):
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
            if job.stream:
                return self._stream(request, stream(job, *rest, tokenizer), error)
            _, results = request.events.get()
            if isinstance(results, Exception):
                return self._failed(error, "generating", results)
            try:
                with tokenizing:
                    payload = answer(job, *rest, results, tokenizer)
            except Exception as e:
                return self._failed(error, "formatting the answer", e)
            self._reply(200, payload)

        def _stream(self, request, stream, error):
            """The events of ``request`` as they come; the status once its generation starts
            (a failure before is a plain 500). A write that fails (the client left) cancels it."""
            started = False
            while True:
                kind, value = request.events.get()
                if not started and isinstance(value, Exception):
                    return self._failed(error, "generating", value)
                try:
                    try:
                        with tokenizing:
                            data = stream.on(kind, value)
                    except Exception as e:  # said in the stream; generation is cancelled
                        logger.error(f"{self.command} {self.path} failed formatting the stream: "
                                     f"{type(e).__name__}: {e}")
                        kind, data = "end", stream.error(f"formatting the stream failed: "
                                                         f"{type(e).__name__}: {e}")
                    if not started:
                        self.send_response(200)
                        self.send_header("Content-Type", "text/event-stream")
                        self.send_header("Cache-Control", "no-cache")
                        self.end_headers()  # HTTP/1.0: the stream ends when the connection does
                        started = True
                    self.wfile.write(data)
                except OSError as e:  # BrokenPipeError, ConnectionResetError
                    logger.info(f"{self.command} {self.path}: the client left mid-stream "
                                f"({type(e).__name__}); its generation is cancelled")
                    kind = "end"
                if kind == "end":
                    request.cancelled.set()  # the rest of its generation is for no one
                    return

        def _failed(self, error, stage, exception):
            logger.error(f"{self.command} {self.path} failed {stage}: "
                         f"{type(exception).__name__}: {exception}")
            self._reply(500, error(f"{stage} failed: {type(exception).__name__}: {exception}"))

        def do_PUT(self):
            if self.path != "/api":
                return self._reply(404, {"message": f"no PUT {self.path}: PUT /api"})
            self._serve(parse_api, api_answer, lambda m: {"message": m}, None)

        def do_POST(self):
            error = lambda m: {"error": {"message": m, "type": "invalid_request_error"}}  # noqa
            if self.path in ("/completions", "/v1/completions"):
                return self._serve(parse_completions, completions_answer, error, CompletionStream)
            if self.path in ("/chat/completions", "/v1/chat/completions"):
                return self._serve(lambda *a: parse_chat(*a, session), chat_answer, error,
                                   ChatStream)
            self._reply(404, {"message": f"no POST {self.path}: POST /completions or "
                                         "/chat/completions"})

        def log_message(self, format, *args):
            logger.info("%s %s", self.address_string(), format % args)

    return Handler


def _generate(session, job, request):
    """Every choice of ``job``, on every rank (``request``: rank 0's, else None)."""
    results = []
    tell = request.events.put if request is not None and job.stream else lambda event: None
    for index, (p, seed) in enumerate(job.runs()):
        # A client that left: no more choices for it (rank 0's word, on every rank).
        if job.stream and session.shared(request is not None and request.cancelled.is_set()):
            break
        if seed is not None:
            session.rng.manual_seed(seed)
        tell(("choice", index))
        ids = job.prompts[p]
        results.append(session.generator.generate(
            ids, job.max_new_tokens, job.params, session.rng, logprobs=job.scored,
            stop_when=_step(session, job, ids, request, tell)))
        tell(("result", (index, results[-1])))
        if request is not None and request.cancelled.is_set():
            logger.info(f"stream closed (the client left): choice {index} cancelled after "
                        f"{len(results[-1].tokens)} of {job.max_new_tokens} tokens")
    return results


def _step(session, job, ids, request, tell):
    """``Generator.generate``'s ``stop_when`` for ``job``'s choice after ``ids``."""
    stop = stop_when(job, ids, session.tokenizer, session.encoder)
    if not job.stream:
        return stop

    def step(new):
        tell(("token", new[-1]))
        # Rank 0 decides (it alone knows whether the client is still there), every rank follows.
        return session.shared(request is not None and (
            request.cancelled.is_set() or (stop is not None and stop(new))))
    return step


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
                results = _generate(session, job, request)
            except Exception as error:  # answered with 500; the next request is served
                results = error
            if request is not None:
                request.events.put(("end", results))
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
    if dist.get_rank() == 0:
        logger.info("server stopped")
