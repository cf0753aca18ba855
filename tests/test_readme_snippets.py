"""The README's and docs' commands leave nothing in the repository: every path they write is
git-ignored, and the README's preprocessing commands (with tiny sizes) followed by a short
training run from their shard, run in a scratch git repository with the project's .gitignore,
leave ``git status`` clean and nothing beside the shards."""

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from tests.launcher import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
WRITE_FLAGS = ("--output-dir", "--output-prefix", "--save", "--save-dir", "--tensorboard-dir",
               "--data-cache-path", "-o")


def _commands(path):
    """Shell commands of the ```bash blocks: continuation lines joined, comments dropped."""
    text = open(path).read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for command in re.sub(r"\\\n\s*", " ", block).splitlines():
            command = command.split(" #")[0].strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def _written_paths(command):
    words = shlex.split(command)
    return [words[i + 1] for i, word in enumerate(words[:-1])
            if word in WRITE_FLAGS and words[i + 1] != "..."]  # "..." stands for any path


def test_every_path_a_snippet_writes_is_ignored():
    paths = [(os.path.relpath(doc, ROOT), path) for doc in DOCS for command in _commands(doc)
             for path in _written_paths(command)]
    assert len(paths) >= 10, paths  # the parser found the snippets
    for doc, path in paths:
        ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT)
        assert ignored.returncode == 0, f"{doc}: {path} is not covered by .gitignore"


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_readme_preprocessing_and_a_run_leave_the_repository_clean(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(os.path.join(ROOT, ".gitignore"), repo / ".gitignore")
    for script in ("preprocess_data.py", "pretrain_gpt.py"):
        shutil.copy(os.path.join(ROOT, script), repo / script)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"],
                   cwd=repo, check=True)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
    readme = _commands(os.path.join(ROOT, "README.md"))
    corpus = next(c for c in readme if "default_corpus" in c)
    preprocess = next(c for c in readme if c.startswith("python preprocess_data.py --input"))
    inspect = next(c for c in readme if "megatron_ext.data.inspect" in c)
    for command in (corpus + " --max-bytes 200000 --vocab-size 400", preprocess, inspect):
        done = subprocess.run(command.replace("python ", f"{sys.executable} ", 1), shell=True,
                              cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (command, done.stderr[-2000:])
    shard = "runs/data/stdlib_text_document"
    shard_files = sorted(os.listdir(repo / "runs" / "data"))
    train = [sys.executable, "pretrain_gpt.py", "--num-layers", "2", "--hidden-size", "32",
             "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2",
             "--train-iters", "2", "--eval-interval", "2", "--eval-iters", "1",
             "--data-path", "0.5", shard, "0.5", shard, "--split", "90,10,0",
             "--tokenizer-type", "GPTSentencePieceTokenizer",
             "--tokenizer-model", "runs/data/tokenizer.model",
             "--save", "runs/ckpt", "--tensorboard-dir", "runs/tensorboard"]
    done = subprocess.run(train, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    # The dataset caches went to SAVE/data_cache, nothing beside the shards.
    assert sorted(os.listdir(repo / "runs" / "data")) == shard_files
    assert any("BlendedDataset" in path.name for path in (repo / "runs/ckpt/data_cache").glob(
        "indices-*/*"))
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=repo,
                            capture_output=True, text=True, check=True)
    assert status.stdout == ""
