"""Multi-task fine-tuning (MFTCoder): task ids through preprocessing and packing, per-task
losses, and every --weighted-loss-mode against a direct computation from its definition.

The reference takes every conversation alone through a plain model (batch 1, plain causal
attention) and builds the modes' losses from the per-token losses by their definitions
(docs/finetune.md): case1 = sum / tokens; case2 = the mean over conversations of their
per-token means; case3 = the mean over tasks of each task's per-token mean; case4 = the mean
over tasks of the mean over the task's conversations. The runs under test go through the product path (preprocess_data.py, ``Trainer``,
``pretrain_gpt.forward_step``, megatron-core's schedule) on one global batch, packed or not,
on one process and with DP=2 + gradient accumulation and TP=2 x PP=2; their per-task losses
and gradients must equal the reference's. A torchrun run with 2 DP ranks, stopped and resumed,
logs the per-task curves (and CoBa's weights) of the uninterrupted single-process run.
"""

import json
import math
import random

import numpy as np
import pytest
import torch

import pretrain_gpt
from megatron_ext.config import ConfigError, parse_args
from megatron_ext.data.cli import main as preprocess_main
from megatron_ext.data.indexed import IndexedDatasetReader
from megatron_ext.data.instruct.pipeline import output_prefixes
from megatron_ext.data.instruct.tasks import read_tasks, task_ids_prefix
from megatron_ext.training.coba import CoBa
from megatron_ext.training.metrics import parse_log
from megatron_ext.training.trainer import Trainer
from megatron_ext.parallel import ParallelTopology
from tests.launcher import launch, torchrun
from tests.sft.reference import conversation_loss, single_process_model
from tests.sft.test_packed_training import (MODEL, PACKED_ROWS, SEQ, _one_global_batch,
                                            _records)

pytestmark = pytest.mark.usefixtures("tmp_cwd")

TASKS = ["code", "math", "chat"]
# --task-weights (MFTCoder's task_weights): uneven, one task left out of the loss.
WEIGHTS = {"code": 0.5, "math": 3.0, "chat": 0.0}
LOSS_RTOL = 1e-5
GRAD_ATOL = 1e-6


def _tagged(records, seed=5):
    """MFTCoder records: uneven tasks (so that case3 differs from case1)."""
    rng = random.Random(seed)
    return [{"data_name": rng.choices(TASKS, weights=[5, 2, 1])[0], **r} for r in records]


@pytest.fixture(scope="module")
def data(tmp_path_factory, char_tokenizer_dir):
    directory = tmp_path_factory.mktemp("multitask")
    path = directory / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _tagged(_records(31))))
    common = ["--input", str(path), "--tokenizer-type", "HuggingFaceTokenizer",
              "--tokenizer-model", char_tokenizer_dir, "--handler-name",
              "OpenAIStyleInstructionHandler", "--prompt-type", "mftcoder",
              "--seq-length", str(SEQ), "--log-interval", "0"]
    preprocess_main(common + ["--output-prefix", str(directory / "packed"), "--pack"])
    preprocess_main(common + ["--output-prefix", str(directory / "single")])
    single = str(directory / "single")
    ids, mask, tasks = (IndexedDatasetReader(p) for p in (*output_prefixes(single),
                                                          task_ids_prefix(single)))
    names = read_tasks(single)
    conversations = []
    for i in range(ids.num_documents):
        task = tasks.document(i)
        assert (task == task[0]).all()
        conversations.append((ids.document(i).astype(np.int64),
                              mask.document(i).astype(np.int64), names[task[0]]))
    argv = MODEL + ["--tokenizer-type", "HuggingFaceTokenizer",
                    "--tokenizer-model", char_tokenizer_dir]
    return dict(argv=argv, packed=str(directory / "packed"), single=single,
                conversations=conversations, records=path)


def test_task_ids_survive_packing(data):
    """Each packed conversation keeps its record's data_name, token by token."""
    packed = data["packed"]
    # Every record is tagged: the unnamed task (id 0, the padding's) has no conversation.
    assert read_tasks(packed) == read_tasks(data["single"])
    assert read_tasks(packed)[0] is None and sorted(read_tasks(packed)[1:]) == sorted(TASKS)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ids, mask, tasks = (IndexedDataset(p) for p in (*output_prefixes(packed),
                                                    task_ids_prefix(packed)))
    names = read_tasks(packed)
    found = []
    for i in range(len(ids)):  # sequences: conversations and the padding
        task = tasks[i]
        if not mask[i].any():  # padding: task 0, never trained
            assert (task == 0).all()
            continue
        assert (task == task[0]).all() and task[0] > 0
        found.append((tuple(ids[i].tolist()), names[task[0]]))
    expected = [(tuple(c[0].tolist()), c[2]) for c in data["conversations"]]
    assert sorted(found) == sorted(expected)


def test_blend_tasks_are_named_and_untagged_datasets_are_tasks(data, tmp_path,
                                                                char_tokenizer_dir):
    """The run's tasks: each data_name once over the blend; a dataset's untagged records are
    the task named after the dataset (MFTCoder's one dataset per task)."""
    from megatron_ext.training.sft_dataset import InstructionShards, task_names

    path = tmp_path / "plain.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records(4, seed=9)))
    preprocess_main(["--input", str(path), "--tokenizer-type", "HuggingFaceTokenizer",
                     "--tokenizer-model", char_tokenizer_dir, "--handler-name",
                     "OpenAIStyleInstructionHandler", "--prompt-type", "mftcoder",
                     "--output-prefix", str(tmp_path / "plain"), "--log-interval", "0"])
    config = parse_args(data["argv"] + ["--data-path", "0.5", data["packed"], "0.3",
                                        data["single"], "0.2", str(tmp_path / "plain")],
                        world_size=1)
    names = task_names(config)
    assert sorted(names[:3]) == sorted(TASKS) and names[3:] == ["plain"]
    plain = InstructionShards(str(tmp_path / "plain"), names)
    assert all((plain.document(i)[2] == 3).all() for i in range(len(plain)))
    single = InstructionShards(data["single"], names)
    assert [names[single.document(i)[2][0]] for i in range(len(single))] == \
        [c[2] for c in data["conversations"]]


def _reference(argv, conversations, state):
    """Each conversation alone; the modes' losses and gradients from their definitions."""
    model = single_process_model(argv, state)
    # Each conversation alone: its summed loss, trained tokens and gradient; every mode is
    # linear in them (megatron-core's cross entropy allows one backward per graph).
    sums, counts, conv_grads = [], [], []
    for ids, mask, _ in conversations:
        model.zero_grad(set_to_none=True)
        total, count = conversation_loss(model, ids, mask)
        total.backward()
        sums.append(total.item())
        counts.append(count)
        conv_grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    tasks = [c[2] for c in conversations]
    names = sorted(set(tasks))
    task_tokens = {t: sum(n for n, u in zip(counts, tasks) if u == t) for t in names}
    task_convs = {t: tasks.count(t) for t in names}
    n_tokens, n_convs, n_tasks = sum(counts), len(conversations), len(names)
    w, w_sum = WEIGHTS, sum(WEIGHTS[t] for t in names)
    coefficients = {  # d loss / d (conversation's summed loss), from the definitions
        "case1": [1 / n_tokens for _ in counts],
        "case2": [1 / (n_convs * n) for n in counts],
        "case3": [1 / (n_tasks * task_tokens[t]) for t in tasks],
        "case4": [1 / (n_tasks * task_convs[t] * n) for n, t in zip(counts, tasks)],
        # sum_t w_t L_t / sum_t w_t, L_t as in case3 and case4 (MFTCoder's loss_func_mft)
        "case3-weighted": [w[t] / (w_sum * task_tokens[t]) for t in tasks],
        "case4-weighted": [w[t] / (w_sum * task_convs[t] * n) for n, t in zip(counts, tasks)],
    }
    losses = {mode: sum(c * v for c, v in zip(cs, sums)) for mode, cs in coefficients.items()}
    grads = {mode: {n: sum(c * g[n] for c, g in zip(cs, conv_grads)) for n in conv_grads[0]}
             for mode, cs in coefficients.items()}
    per_task = {t: sum(v for v, u in zip(sums, tasks) if u == t) / task_tokens[t]
                for t in names}
    ParallelTopology.destroy()
    return per_task, losses, grads


@pytest.fixture(scope="module")
def single(data):
    argv = data["argv"] + ["--data-path", data["packed"], "--micro-batch-size", "2",
                           "--global-batch-size", str(PACKED_ROWS),
                           "--weighted-loss-mode", "case3"]
    return launch(_one_global_batch, 1, argv, 1, None)[0]


@pytest.fixture(scope="module")
def reference(data, single):
    argv = data["argv"] + ["--data-path", data["packed"]]
    return launch(_reference, 1, argv, data["conversations"], single[3])[0]


def _assert_mode(run, reference, mode):
    loss, tokens, grads, _, per_task = run
    ref_tasks, ref_losses, ref_grads = reference
    # lm loss stays the plain per-token mean; the tasks' losses are their samples' alone.
    assert loss == pytest.approx(ref_losses["case1"], rel=LOSS_RTOL)
    assert per_task.keys() == ref_tasks.keys() == set(TASKS)
    for task, value in ref_tasks.items():
        assert per_task[task] == pytest.approx(value, rel=LOSS_RTOL), task
    assert grads.keys() == ref_grads[mode].keys()
    for name, grad in ref_grads[mode].items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=GRAD_ATOL, msg=name)


def test_case3_gradient_is_the_mean_of_the_task_means(single, reference):
    _assert_mode(single, reference, "case3")
    # The comparisons can fail: the modes differ on these uneven tasks and conversations.
    ref_grads = reference[2]
    for a, b in [("case1", "case3"), ("case1", "case2"), ("case3", "case4"), ("case2", "case4"),
                 ("case3", "case3-weighted"), ("case4", "case4-weighted")]:
        assert max((ref_grads[a][n] - g).abs().max() for n, g in ref_grads[b].items()) \
            > 100 * GRAD_ATOL, (a, b)


RUNS = {
    # name: (world size, data, micro-batch size, flags)
    "case1-unpacked": (1, "single", 1, "--weighted-loss-mode case1"),
    "case3-unpacked": (1, "single", 1, "--weighted-loss-mode case3"),
    "case3-dp2-accumulation": (2, "packed", 1, "--weighted-loss-mode case3"),
    "case3-tp2-pp2-sp": (4, "packed", 2, "--weighted-loss-mode case3 "
                         "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 "
                         "--sequence-parallel"),
    "case2-packed": (1, "packed", 2, "--weighted-loss-mode case2"),
    "case2-dp2-accumulation": (2, "packed", 1, "--weighted-loss-mode case2"),
    "case4-cp2-dp2": (4, "packed", 2, "--weighted-loss-mode case4 "
                      "--context-parallel-size 2"),
    "case3-cp2-tp2-sp": (4, "packed", 2, "--weighted-loss-mode case3 --sequence-parallel "
                      "--context-parallel-size 2 --tensor-model-parallel-size 2"),
    "case4-unpacked": (1, "single", 1, "--weighted-loss-mode case4"),
    "case4-tp2-pp2-sp": (4, "packed", 2, "--weighted-loss-mode case4 "
                         "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 "
                         "--sequence-parallel"),
}


@pytest.mark.parametrize("name", RUNS)
def test_modes_under_packing_and_parallelism(data, single, reference, name):
    world_size, dataset, micro_batch, flags = RUNS[name]
    rows = PACKED_ROWS if dataset == "packed" else len(data["conversations"])
    argv = data["argv"] + ["--data-path", data[dataset], "--micro-batch-size", str(micro_batch),
                           "--global-batch-size", str(rows)] + flags.split()
    run = launch(_one_global_batch, world_size, argv, world_size, single[3])[0]
    _assert_mode(run, reference, flags.split()[1])


def _task_weights_flag(prefix, by_name):
    """--task-weights with WEIGHTS: in the run's task order (that of the data's task table),
    or NAME:W in another order."""
    if by_name:
        return ["--task-weights"] + [f"{n}:{w}" for n, w in sorted(WEIGHTS.items())]
    return ["--task-weights", ",".join(str(WEIGHTS[n]) for n in read_tasks(prefix) if n)]


@pytest.mark.parametrize("mode", ["case3", "case4"])
def test_modes_under_the_interleaved_schedule(data, mode):
    """4 layers at PP2 x VPP2 (each model chunk reads the global batch through its own
    iterator, the task counts taken per chunk alike) == one process: lm loss, task losses,
    gradients."""
    four = list(data["argv"])
    four[four.index("--num-layers") + 1] = "4"
    argv = four + ["--data-path", data["packed"], "--micro-batch-size", "1",
                   "--global-batch-size", str(PACKED_ROWS), "--weighted-loss-mode", mode]
    loss, _, ref_grads, initial, ref_tasks = launch(_one_global_batch, 1, argv, 1, None)[0]
    run = launch(_one_global_batch, 2, argv + ["--pipeline-model-parallel-size", "2",
                                               "--num-virtual-stages-per-pipeline-rank", "2"],
                 2, initial)[0]
    assert run[0] == pytest.approx(loss, rel=LOSS_RTOL)
    assert run[4].keys() == ref_tasks.keys() == set(TASKS)
    for task, value in ref_tasks.items():
        assert run[4][task] == pytest.approx(value, rel=LOSS_RTOL), task
    for name, grad in ref_grads.items():
        torch.testing.assert_close(run[2][name], grad, rtol=0, atol=GRAD_ATOL, msg=name)


@pytest.mark.parametrize("mode,world_size,micro_batch,by_name", [
    ("case3", 1, 2, False), ("case4", 2, 1, False), ("case3", 1, 2, True)])
def test_fixed_task_weights_weigh_the_task_losses(data, single, reference, mode, world_size,
                                                  micro_batch, by_name):
    """--task-weights: the gradient of sum_t w_t L_t / sum_t w_t (a task of weight 0 trains
    nothing), on one process and with DP=2 + gradient accumulation; by position or name."""
    argv = data["argv"] + ["--data-path", data["packed"], "--micro-batch-size", str(micro_batch),
                           "--global-batch-size", str(PACKED_ROWS), "--weighted-loss-mode",
                           mode] + _task_weights_flag(data["packed"], by_name)
    run = launch(_one_global_batch, world_size, argv, world_size, single[3])[0]
    _assert_mode(run, reference, f"{mode}-weighted")


def test_a_global_batch_of_zero_weight_tasks_trains_nothing():
    """Only tasks of weight 0 in the global batch: L = 0 (no gradient), not 0 / 0 (NaN)."""
    from megatron_ext.training.multitask import task_scales

    tokens, samples = torch.tensor([0.0, 0.0, 7.0]), torch.tensor([0.0, 0.0, 2.0])
    for mode in ("case3", "case4"):
        scale = task_scales(mode, tokens, samples, torch.tensor([1.0, 2.0, 0.0]))
        assert torch.equal(scale, torch.zeros(2, 3)), mode


def test_task_weights_are_checked(data):
    base = data["argv"] + ["--data-path", data["packed"]]
    for extra, message in [
            (["--task-weights", "1", "2", "3"], "--task-weights weighs the tasks of "
             "--weighted-loss-mode case3 or case4, not case1"),
            (["--weighted-loss-mode", "coba", "--eval-iters", "1", "--task-weights", "1"],
             "not coba"),
            (["--weighted-loss-mode", "case3", "--task-weights", "1", "-2", "1"],
             "--task-weights 1 -2 1: -2: a weight must be finite and >= 0"),
            (["--weighted-loss-mode", "case4", "--task-weights", "[1,x,1]"], "'x' is not a"),
            (["--weighted-loss-mode", "case3", "--task-weights", "0", "0", "0"], "all weights"),
            (["--weighted-loss-mode", "case3", "--task-weights", "code:1", "2"],
             "give every weight as NAME:W, or none"),
            (["--weighted-loss-mode", "case3", "--task-weights", "code:1", "code:2"],
             "task 'code' is given twice")]:
        with pytest.raises(ConfigError, match=message):
            parse_args(base + extra, world_size=1)
    # The count and names need the data's tasks: checked when the run reads them, naming them.
    names = ", ".join(n for n in read_tasks(data["packed"]) if n)
    for weights, message in [(["1", "2"], "--task-weights gives 2 weights, the run has 3 "
                               f"tasks: {names} "),
                             (["code:1", "math:1", "prose:1"], "--task-weights: no task "
                              f"'prose'; the run's tasks are {names} "),
                             (["code:1", "math:1"], "no weight for task 'chat'")]:
        with pytest.raises(RuntimeError, match=message):
            launch(_one_global_batch, 1, base + ["--global-batch-size", str(PACKED_ROWS),
                                                 "--weighted-loss-mode", "case3",
                                                 "--task-weights", *weights], 1, None)


def _coba_direct(history, tau, history_length):
    """CoBa's weights written out from the published formulas, step by step (numpy)."""
    n = len(history[0])
    slopes, totals, weights = [], [], []

    def slope(values):
        x = np.array([i for i, v in enumerate(values) if not math.isnan(v)], float)
        y = np.array([v for v in values if not math.isnan(v)], float)
        return 0.0 if x.size < 2 else np.polyfit(x, y, 1)[0]

    def softmax(z):
        e = np.exp(z - z.max())
        return e / e.sum()

    for t in range(1, len(history) + 1):
        window = history[max(0, t - history_length):t]
        s = np.array([slope([v[i] for v in window]) for i in range(n)])
        slopes.append(s)
        totals.append(slope([np.nanmax(v) for v in window]))
        rcs = softmax(n * s / np.abs(s).sum())
        recent = np.array(slopes[-history_length:])
        acs = softmax(-len(recent) * s / np.abs(recent).sum(axis=0))
        S = np.array(totals)
        df = len(S) * softmax(-tau * len(S) * S / np.abs(S).sum())[-1]
        w = softmax(n * (df * rcs + (1 - df) * acs))
        if (w < 1 / (10 * n)).any():
            w = w * 0.9 + 1 / (10 * n)
        weights.append(w)
    return weights


def test_coba_weights_follow_the_published_formulas():
    rng = np.random.default_rng(0)
    steps = np.arange(12)
    # Three tasks: one converging fast, one slowly, one turning up (over-fitting).
    history = np.stack([1 - 0.06 * steps, 1 - 0.01 * steps,
                        1 - 0.05 * steps + 0.008 * steps ** 2], axis=1)
    history = history + rng.normal(0, 0.002, history.shape)
    history[4, 1] = math.nan  # a measurement without task 1
    coba = CoBa(3, history_length=5, tau=5.0)
    ours = []
    for row in history:
        coba.record(row.tolist())
        ours.append(coba.weights().numpy())
    with np.errstate(invalid="ignore"):
        direct = _coba_direct(history.tolist(), 5.0, 5)
    # One measurement has no slope: the formulas divide 0 by 0 (MFTCoder's nan); equal here.
    np.testing.assert_allclose(ours[0], [1 / 3] * 3)
    for t, (a, b) in enumerate(zip(ours[1:], direct[1:]), 1):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12, err_msg=f"step {t}")
        assert a.sum() == pytest.approx(1.0)
    # While all fall, the slowest task weighs most; once one rises, it weighs least.
    assert ours[3].argmax() == 1 and ours[-1].argmin() == 2


def test_flags_are_checked(data):
    base = data["argv"] + ["--data-path", data["packed"]]
    without = [a for a in base if a != "--calculate-per-token-loss"]
    with pytest.raises(ConfigError, match="--calculate-per-token-loss"):
        parse_args(without + ["--weighted-loss-mode", "case3"], world_size=1)
    with pytest.raises(ConfigError, match="--coba-tau needs --weighted-loss-mode coba"):
        parse_args(base + ["--coba-tau", "2"], world_size=1)
    with pytest.raises(ConfigError, match="--eval-iters"):
        parse_args(base + ["--weighted-loss-mode", "coba"], world_size=1)


def _curves(stdout):
    train, valid = parse_log(stdout)
    keys = lambda r: {k: float(v) for k, v in r.items()  # noqa: E731
                      if k.startswith(("lm loss [", "task weight ["))}
    return [keys(r) for r in train], [keys(r) for r in valid]


def test_cli_dp2_resumed_logs_the_single_process_task_curves(data, tmp_path):
    """pretrain_gpt.py with CoBa: per-task training and validation losses and CoBa's weights
    in every log line (and TensorBoard), the same with 2 DP ranks, stopped after step 2
    (--exit-interval, torch_dist) and resumed with --load, as on one process uninterrupted."""
    iters = 3
    # Later flags override the one-batch runs' (argparse keeps the last).
    args = data["argv"] + ["--data-path", data["packed"], "--micro-batch-size", "1", "--global-batch-size",
             "4", "--train-iters", str(iters), "--eval-interval", "3", "--eval-iters", "1",
             "--split", "75,25,0", "--weighted-loss-mode", "coba", "--coba-warmup-steps", "1",
             "--coba-history-length", "3"]
    ckpt, tb = tmp_path / "ckpt", tmp_path / "tb2"
    runs = {}
    for name, nproc, flags in [("one", 1, ["--tensorboard-dir", tmp_path / "tb1"]),
                               ("stopped", 2, ["--save", ckpt, "--exit-interval", "2"]),
                               ("resumed", 2, ["--load", ckpt, "--tensorboard-dir", tb])]:
        out = torchrun(nproc, args + flags, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        runs[name] = _curves(out.stdout + out.stderr)
        # The start-up line naming the tasks, whatever the number of ranks.
        assert f"tasks (data_name): {', '.join(n for n in read_tasks(data['packed']) if n)}; " \
            "--weighted-loss-mode coba" in out.stdout + out.stderr, name
    train, valid = runs["one"]
    assert len(train) == iters and len(valid) == 1
    assert all(any(k.startswith("lm loss [") for k in r) for r in train + valid)
    assert set(train[-1]) >= {f"task weight [{t}]" for t in TASKS}
    assert train[0]["task weight [code]"] == pytest.approx(1 / 3, abs=1e-4)  # warmup: equal
    # After the resume: CoBa's weights from the saved history, not a new warmup's.
    assert train[-1]["task weight [code]"] != pytest.approx(train[0]["task weight [code]"])
    dp2 = [a + b for a, b in zip(runs["stopped"], runs["resumed"])]
    for got, want in zip(dp2, runs["one"]):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a.keys() == b.keys()
            for key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4), key
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"lm loss [code]", "lm loss validation [code]", "task weight [code]"} <= tags


def _coba_run(argv):
    """(CoBa's weights and the per-task loss totals of every step, the warnings logged)."""
    import logging

    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("megatron_ext").addHandler(handler)
    try:
        trainer = Trainer(parse_args(argv, world_size=1), pretrain_gpt.forward_step,
                          world_size=1)
        steps = [(s["task_weights"], s["task_totals"]) for s in trainer.train()]
        trainer.close()
    finally:
        logging.getLogger("megatron_ext").removeHandler(handler)
    return steps, warnings


@pytest.mark.parametrize("ckpt_format", ["torch", "torch_dist"])
def test_coba_resumes_exactly(data, tmp_path, ckpt_format):
    """Stopped at iteration 2 (--exit-interval) and resumed: CoBa's weights and the per-task
    losses go on as in the uninterrupted run, bit for bit, in either format; a checkpoint
    without CoBa's state starts it afresh with a warning, one of other tasks is refused by
    name (shown on the torch format's rank file, which is plain torch.save). 2 DP ranks: the
    CLI test."""
    from megatron_ext.checkpoint import format as ckpt

    argv = data["argv"] + ["--data-path", data["packed"], "--micro-batch-size", "2",
                           "--global-batch-size", "4", "--train-iters", "4", "--split",
                           "75,25,0", "--eval-iters", "1", "--weighted-loss-mode", "coba",
                           "--coba-warmup-steps", "1", "--coba-history-length", "3",
                           "--ckpt-format", ckpt_format]
    full, _ = launch(_coba_run, 1, argv)[0]
    first, _ = launch(_coba_run, 1, argv + ["--save", str(tmp_path), "--exit-interval", "2"])[0]
    resumed, warnings = launch(_coba_run, 1, argv + ["--load", str(tmp_path)])[0]
    assert len(first) == len(resumed) == 2 and not warnings
    assert not torch.equal(full[2][0], full[0][0])  # the weights moved: the test can fail
    for step, ((weights, totals), (want_weights, want_totals)) in enumerate(
            zip(first + resumed, full), 1):
        assert torch.equal(weights, want_weights), step
        assert torch.equal(totals, want_totals), step
    if ckpt_format != "torch":
        return
    # The checkpoint's state is plain data; without it (an older checkpoint) CoBa starts
    # afresh: equal weights again.
    path = next(tmp_path.glob("iter_0000002/mp_rank_00/model_optim_rng.pt"))
    payload = ckpt.load_rank_file(path, mmap=False)
    assert sorted(payload["coba"]["tasks"]) == sorted(TASKS)
    assert payload["coba"]["history"].shape == (2, len(TASKS))  # measured after steps 1, 2
    state = payload.pop("coba")
    ckpt.save_rank_file(path, payload)
    fresh, warnings = launch(_coba_run, 1, argv + ["--load", str(tmp_path), "--train-iters", "3",
                                                   "--use-checkpoint-opt_param-scheduler"])[0]
    assert any("holds no CoBa state" in w for w in warnings), warnings
    torch.testing.assert_close(fresh[0][0], torch.full((3,), 1 / 3, dtype=torch.float64))
    ckpt.save_rank_file(path, dict(payload, coba=dict(state, tasks=["code", "prose", "chat"])))
    with pytest.raises(RuntimeError, match=r"tasks \['code', 'prose', 'chat'\], this run has"):
        launch(_coba_run, 1, argv + ["--load", str(tmp_path)])


def test_coba_without_a_validation_split_is_refused(data):
    """CoBa weighs by the validation losses: --split without a validation share names it."""
    argv = data["argv"] + ["--data-path", data["packed"], "--micro-batch-size", "2",
                           "--global-batch-size", "4", "--train-iters", "2", "--split",
                           "100,0,0", "--eval-iters", "1", "--weighted-loss-mode", "coba"]
    with pytest.raises(RuntimeError, match=r"--weighted-loss-mode coba measures the validation "
                       r"split, and --split 100,0,0 leaves it empty"):
        launch(_coba_run, 1, argv)


def test_a_task_table_without_its_shard_is_named(data, tmp_path):
    import glob
    import shutil

    from megatron_ext.training.sft_dataset import check_prefix

    for path in glob.glob(data["packed"] + "_*"):
        if "_task_ids_document" not in path:
            shutil.copy(path, tmp_path)
    prefix = str(tmp_path / "packed")
    with pytest.raises(ConfigError, match="packed_task_ids_document.bin"):
        check_prefix(prefix)
