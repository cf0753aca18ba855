"""A ``generate_gpt.py --port`` server under torchrun, and requests to it (the server tests')."""

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import psutil

from tests.launcher import ROOT, free_port

TIMEOUT_S = 120
EOD = 249  # NullTokenizer --vocab-size 249: ids 0..248, EOD 249 (the HF model's vocabulary 250)
FLAGS = ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(EOD)]
# A chat template NullTokenizer can tokenize (numbers): system, user, assistant markers.
CHAT_TEMPLATE = {"system": "{content} 10 ", "user": "{content} 11", "assistant_prefix": " 12 ",
                 "assistant": "{content} 13{eos}"}
USER = {"role": "user", "content": "1 2 3"}


def env():
    variables = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    variables.pop("WORLD_SIZE", None)
    return variables


def request(url, method, path, body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


class Server:
    """``generate_gpt.py --port 0`` under torchrun; ``url`` once it announces its port."""

    def __init__(self, nproc, load, *extra):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
             "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
             f"{ROOT}/generate_gpt.py", "--load", str(load), *FLAGS, "--port", "0",
             "--host", "127.0.0.1", *extra],
            cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        self.log, lines = [], queue.Queue()
        self.reader = threading.Thread(target=self._read, args=(lines,), daemon=True)
        self.reader.start()
        try:
            while True:  # bounded: each wait ends at the timeout or at the server's exit
                line = lines.get(timeout=TIMEOUT_S)
                assert line is not None, "server exited:\n" + "".join(self.log[-60:])
                found = re.search(r"serving on (http://127\.0\.0\.1:\d+)", line)
                if found:
                    self.url = found.group(1)
                    break
        except BaseException:
            self.kill()
            raise

    def _read(self, lines):
        for line in self.proc.stderr:
            self.log.append(line)
            lines.put(line)
        lines.put(None)

    def request(self, method, path, body):
        return request(self.url, method, path, body)

    def stop(self) -> int:
        """SIGTERM to rank 0 (as a scheduler stops a job's main process): every rank exits."""
        rank0 = [p for p in psutil.Process(self.proc.pid).children()
                 if p.environ().get("RANK") == "0"]
        assert len(rank0) == 1
        rank0[0].send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=TIMEOUT_S)
            self.reader.join(timeout=TIMEOUT_S)  # the log complete
            return code
        finally:
            self.kill()

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


