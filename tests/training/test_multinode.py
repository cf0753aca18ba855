"""Two torchrun agents on this machine (`--nnodes 2 --node-rank 0|1`, rendezvous on
127.0.0.1) train exactly as one node with the same world size; the dataset index cache is
written once (by rank 0), and a cache another node cannot see stops every rank, naming the flag.

The data is tokenized by GPT2BPETokenizer (`--vocab-file/--merge-file`) in both scripts.
"""

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from tests.launcher import free_port, launch, pretrain_records

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 300
LOSS = re.compile(r"iteration\s+(\d+)/.*?lm loss:? ([0-9.E+-]+)")


@pytest.fixture(scope="module")
def gpt2_data(tmp_path_factory):
    """A tiny GPT-2-format vocab.json/merges.txt and a corpus preprocessed with them."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    directory = tmp_path_factory.mktemp("gpt2_data")
    texts = [f"document {i}: " + " ".join(["alpha", "beta", "gamma", "delta"][: 1 + i % 4] * 3)
             for i in range(200)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.model.save(str(directory))
    source = directory / "corpus.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    files = ["--vocab-file", str(directory / "vocab.json"),
             "--merge-file", str(directory / "merges.txt")]
    subprocess.run([sys.executable, "preprocess_data.py", "--input", str(source),
                    "--output-prefix", str(directory / "corpus"), "--tokenizer-type",
                    "GPT2BPETokenizer", *files, "--append-eod"], cwd=ROOT, check=True,
                   capture_output=True, timeout=120)
    return files + ["--tokenizer-type", "GPT2BPETokenizer",
                    "--data-path", str(directory / "corpus_text_document")]


def _train_args(gpt2_data, cache):
    return gpt2_data + [
        "--data-cache-path", str(cache), "--split", "90,10,0",
        "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "8",
        "--train-iters", "3", "--log-interval", "1", "--eval-interval", "3", "--eval-iters", "1",
        "--attention-dropout", "0", "--hidden-dropout", "0", "--lr", "1e-3", "--seed", "7",
        "--tensor-model-parallel-size", "2"]


def _agents(launches):
    """Start one torchrun agent per (launcher flags, script flags); wait for all of them;
    [(returncode, stdout, stderr)] in order."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher,
                               os.path.join(ROOT, "pretrain_gpt.py"), *args], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for launcher, args in launches]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=TIMEOUT_S)
            results.append((proc.returncode, out, err))
    except subprocess.TimeoutExpired:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("a torchrun agent did not finish (hang?)")
    return results


def _two_nodes(port):
    return [["--nnodes", "2", "--node-rank", str(r), "--nproc-per-node", "1",
             "--master-addr", "127.0.0.1", "--master-port", str(port)] for r in (0, 1)]


def _losses(stdout):
    return [(int(i), float(v)) for i, v in LOSS.findall(stdout)]


def test_two_nodes_train_as_one(gpt2_data, tmp_path):
    # The reference: the same 2 ranks on one node, forked (pretrain_records: the code of a
    # one-agent torchrun run, bit for bit, without two fresh interpreters).
    records = launch(pretrain_records, 2, _train_args(gpt2_data, tmp_path / "c1"))[-1][0]
    reference = [(int(r["iteration"]), float(r["lm loss"])) for r in records]
    assert [i for i, _ in reference] == [1, 2, 3], records

    args = _train_args(gpt2_data, tmp_path / "c2")
    two = _agents([(node, args) for node in _two_nodes(free_port())])
    for rc, _, err in two:
        assert rc == 0, err[-3000:]
    # The last rank (on node 1) logs, as Megatron-LM; bit-identical losses: same world size,
    # same reductions.
    assert _losses("".join(out for _, out, _ in two)) == reference
    # The index cache was written once, by rank 0, and read by both nodes.
    assert sorted(os.listdir(tmp_path / "c2")) == sorted(os.listdir(tmp_path / "c1"))


def _check_cache(directories):
    import torch

    from megatron_ext.training.data import check_cache_visible

    torch.distributed.init_process_group("gloo")
    directory = directories[torch.distributed.get_rank()]
    try:
        check_cache_visible([directory])
    except RuntimeError as e:
        return str(e)
    return None


def test_cache_not_shared_between_nodes_stops_every_rank(tmp_path):
    """Two ranks with their own cache directories, as on nodes with node-local disks."""
    directories = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    for d in directories:
        os.makedirs(d)
    (tmp_path / "node0" / "abc-GPTDataset-train-document_index.npy").write_bytes(b"")
    errors = launch(_check_cache, 2, directories)
    assert all("is not shared by every node" in e and "--data-cache-path" in e for e in errors)
    assert "rank 1 does not see" in errors[1] and "node1/abc-GPTDataset-train" in errors[1]
    # The same files on both: a shared cache passes on every rank.
    (tmp_path / "node1" / "abc-GPTDataset-train-document_index.npy").write_bytes(b"")
    assert launch(_check_cache, 2, directories) == [None, None]


def _build_in_own_copy(root, cache):
    """Build the datasets as a rank on its own node: its copy of the shard, at the same
    (relative) path, in root/node{rank}."""
    import torch

    from megatron_ext.config import parse_args
    from megatron_ext.training.data import build_datasets
    from tests.training.test_data import EOD, FLAGS, VOCAB

    torch.distributed.init_process_group("gloo")
    os.chdir(os.path.join(root, f"node{torch.distributed.get_rank()}"))
    config = parse_args(FLAGS + ["--data-path", "A_text_document", "--split", "100,0,0",
                                 "--data-cache-path", cache], world_size=1)
    train = build_datasets(config, EOD, VOCAB, [40, 0, 0])[0]
    return [train[i]["tokens"].tolist() for i in range(len(train))]


def test_nodes_with_their_own_copies_of_the_shards_share_the_index_cache(tmp_path):
    """Node-local copies of the data (other mtimes: a copy that kept none) and a shared cache:
    every rank reads rank 0's indices, and the same samples."""
    import numpy as np

    from tests.training.test_data import _write

    docs = [np.arange(1, 1 + n % 40 + 5) for n in range(60)]
    for rank in (0, 1):
        os.makedirs(tmp_path / f"node{rank}")
        prefix = _write(str(tmp_path / f"node{rank}" / "A_text_document"), docs)
        for suffix in (".bin", ".idx"):
            os.utime(prefix + suffix, ns=(10**18 + rank, 10**18 + rank))
    samples = launch(_build_in_own_copy, 2, str(tmp_path), str(tmp_path / "cache"))
    assert samples[0] == samples[1] and samples[0]
    assert len(os.listdir(tmp_path / "cache")) == 1  # one indices-* directory, rank 0's
