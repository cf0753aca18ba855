"""What a run prints and writes, through torchrun: the start-up summary once, library notices
once or not at all (everything with --verbose), shared messages once, TensorBoard scalars equal
to the console's, and ``python -m megatron_ext.plot`` drawing them from the log and from the
event files."""

import importlib.util
import os
import subprocess
import sys

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_ext import plot
from megatron_ext.training.metrics import parse_log
from tests.training.test_launch import ROOT, RUN_TIMEOUT_S, TINY, _torchrun

ITERS = 4
# megatron-core warns when either is missing (as on the CPU machine).
APEX_OR_TE_MISSING = any(importlib.util.find_spec(name) is None
                         for name in ("apex", "transformer_engine"))
# PP=2 puts the last rank (the one that logs progress) on a first-in-stage rank, where
# megatron-core lists the distributed optimizer's buckets.
FLAGS = TINY + ["--pipeline-model-parallel-size", "2", "--use-distributed-optimizer",
                "--global-batch-size", "4", "--train-iters", str(ITERS), "--log-interval", "1",
                "--eval-interval", "2", "--eval-iters", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    result = _torchrun(2, FLAGS + ["--save", str(tmp / "ckpt"), "--load", str(tmp / "ckpt"),
                                   "--tensorboard-dir", str(tmp / "tb")], RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = tmp / "train.log"
    log.write_text(result.stdout)
    return result, tmp


def _console(stdout):
    """{iteration: {field: value}} of the console's iteration lines (numbers only)."""
    return {int(r["iteration"]): {k: float(v.rstrip("%")) for k, v in r.items()
                                  if plot._NUMBER.match(v)}
            for r in parse_log(stdout)[0]}


def test_summary_once_and_library_noise_filtered(run):
    result, _ = run
    out, err = result.stdout, result.stderr
    assert out.count("run summary ---") == 1, out
    summary = out[out.index("run summary"):]
    for heading in ("model ", "vocabulary ", "parameters ", "layout ", "  stage 0: embedding",
                    "  stage 1: layer 2 + final norm", "batch ", "precision ", "attention  sdpa (",
                    "data ", "checkpoint ", "memory ", "  stage 1: weights"):
        assert heading in summary, (heading, summary)
    # Printed by every rank before; now once.
    assert out.count("latest_checkpointed_iteration.txt") == 1, out
    assert out.count("Apex / Transformer Engine not installed") == int(APEX_OR_TE_MISSING), out
    for noise in ("UserWarning", "FutureWarning", "Params for bucket", "Setting up",
                  "path_to_cache is None", "Megatron-FSDP"):
        assert noise not in out + err, noise
    assert [it for it in _console(out)] == list(range(1, ITERS + 1))


def test_iteration_lines_are_megatron_lm_s(run):
    # Megatron-LM's line: "iteration 1/ 4 | consumed samples: 4 | ... | lm loss: 5.5E+00 |
    # ..."; fields are read by name (one parser, metrics.parse_log), so order does not matter.
    result, _ = run
    records, validation = parse_log(result.stdout)
    # One line per iteration, written once (by the last rank), not once per rank.
    assert [int(r["iteration"]) for r in records] == list(range(1, ITERS + 1)), result.stdout
    for fields in records:
        iteration = int(fields["iteration"])
        assert int(fields["iterations"]) == ITERS
        for name in ("consumed samples", "elapsed time per iteration (ms)", "learning rate",
                     "global batch size", "lm loss", "loss scale", "grad norm",
                     "number of skipped iterations", "number of nan iterations", "tokens/s"):
            assert name in fields, (name, fields)
        assert int(fields["consumed samples"]) == 4 * iteration
        assert int(fields["global batch size"]) == 4
        # Untrained: cross entropy near ln(vocab): 256 ids padded to 256, ln 256 = 5.55.
        assert 4.5 < float(fields["lm loss"]) < 6.5
        assert float(fields["grad norm"]) > 0 and float(fields["tokens/s"]) > 0
        assert 0 <= float(fields["learning rate"]) <= 1e-3
        assert int(fields["number of skipped iterations"]) == 0
    # The evaluation at the last iteration is the interval's; the test split follows, once.
    assert [(v["iteration"], v["split"], v["final"]) for v in validation] == [
        ("2", "validation", False), ("4", "validation", False), ("4", "test", True)], validation
    assert 4.5 < float(validation[0]["lm loss value"]) < 6.5


def test_verbose_shows_everything(tmp_path):
    result = _torchrun(2, FLAGS + ["--verbose", "--train-iters", "1"], RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    for shown in ("Params for bucket", "Setting up DistributedDataParallel"):
        assert shown in output, shown
    if APEX_OR_TE_MISSING:
        assert "UserWarning" in output and "are not installed" in output


def test_tensorboard_holds_every_console_scalar(run):
    result, tmp = run
    events = EventAccumulator(str(tmp / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"lm loss", "learning-rate", "grad-norm", "loss-scale", "batch-size",
                "consumed-samples", "trained-tokens", "iteration-time", "tokens-per-sec",
                "throughput", "lm loss validation", "lm loss validation ppl"}
    assert expected <= tags, expected - tags
    console = _console(result.stdout)
    for tag, field in (("lm loss", "lm loss"), ("learning-rate", "learning rate"),
                       ("grad-norm", "grad norm"), ("trained-tokens", "trained tokens"),
                       ("consumed-samples", "consumed samples"), ("tokens-per-sec", "tokens/s")):
        written = {e.step: e.value for e in events.Scalars(tag)}
        assert sorted(written) == list(range(1, ITERS + 1)), tag
        for step, value in written.items():
            # The console rounds (6 significant digits, tokens/s to integers).
            assert value == pytest.approx(console[step][field], rel=1e-3, abs=1), (tag, step)
    validation = {e.step: e.value for e in events.Scalars("lm loss validation")}
    logged = {int(r["iteration"]): float(r["lm loss value"])
              for r in parse_log(result.stdout)[1] if r["split"] == "validation"}
    assert sorted(validation) == sorted(logged) == [2, 4]
    for step, value in logged.items():
        assert validation[step] == pytest.approx(value, rel=1e-5)


def test_plot_from_the_log_and_from_tensorboard(run):
    result, tmp = run
    png = tmp / "curves.png"
    done = subprocess.run([sys.executable, "-m", "megatron_ext.plot", str(tmp / "train.log"),
                           str(tmp / "tb"), "-o", str(png)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for line, path in zip(lines, (tmp / "train.log", tmp / "tb")):
        assert line == (f"{path}: lm loss ({ITERS}), validation lm loss (2), learning rate "
                        f"({ITERS}), grad norm ({ITERS}), tokens/s ({ITERS})"), done.stdout
    assert lines[-1] == f"wrote {png}"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (1200, 800)


def test_plot_reads_megatron_lm_lines_and_resumes(tmp_path):
    # Megatron-LM's training_log / evaluate_and_print_results lines, as it writes them; the
    # second iteration-2 line is a resume, which wins.
    log = tmp_path / "megatron.log"
    log.write_text(
        " [2026-12-01 10:00:00] iteration        1/       3 | consumed samples:           16 | "
        "elapsed time per iteration (ms): 1000.0 | learning rate: 1.000000E-04 | global batch "
        "size:    16 | lm loss: 9.000000E+00 | loss scale: 1.0 | grad norm: 3.000 | number of "
        "skipped iterations:   0 | number of nan iterations:   0 |\n"
        " [2026-12-01 10:00:01] iteration        2/       3 | consumed samples:           32 | "
        "learning rate: 2.000000E-04 | lm loss: 8.000000E+00 | grad norm: 2.500 |\n"
        "-" * 60 + "\n validation loss at iteration 2 on validation set | lm loss value: "
        "8.100000E+00 | lm loss PPL: 3.294468E+03 | \n"
        " [2026-12-01 10:05:00] iteration        2/       3 | consumed samples:           32 | "
        "learning rate: 2.000000E-04 | lm loss: 7.900000E+00 | grad norm: 2.400 |\n")
    found = plot.read_log(str(log))
    assert found["lm loss"] == {1: 9.0, 2: 7.9}
    assert found["learning rate"] == {1: 1e-4, 2: 2e-4}
    assert found["grad norm"] == {1: 3.0, 2: 2.4}
    assert found["validation lm loss"] == {2: 8.1}
    assert found["tokens/s"] == {}
    assert plot.report(str(log), found).endswith("; not found: tokens/s")


def test_plot_names_a_path_without_curves(tmp_path):
    (tmp_path / "empty.log").write_text("nothing here\n")
    done = subprocess.run([sys.executable, "-m", "megatron_ext.plot", str(tmp_path / "empty.log"),
                           str(tmp_path / "missing"), "-o", str(tmp_path / "x.png")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"{tmp_path / 'empty.log'}: no lm loss" in done.stderr
    assert not os.path.exists(tmp_path / "x.png")


def test_a_log_interval_line_sums_up_its_steps(tmp_path):
    """--log-interval 2 against 1 of the same run, with a batch-size ramp-up (global batches of
    2, 4, 4, 4 samples): each line of 2 steps has their mean loss and the sum of their trained
    tokens, and its tokens/s are the tokens of both batches over both steps' time."""
    flags = TINY + ["--global-batch-size", "4", "--rampup-batch-size", "2", "2", "2",
                    "--train-iters", "4", "--eval-iters", "0", "--eod-mask-loss"]
    lines = {}
    for interval in (1, 2):
        result = _torchrun(1, flags + ["--log-interval", str(interval)], RUN_TIMEOUT_S)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        lines[interval] = _console(result.stdout)
    each, pairs = lines[1], lines[2]
    assert [each[i]["global batch size"] for i in (1, 2, 3, 4)] == [2, 4, 4, 4]
    assert sorted(pairs) == [2, 4]
    for end in (2, 4):
        steps = (each[end - 1], each[end])
        assert pairs[end]["lm loss"] == pytest.approx(sum(s["lm loss"] for s in steps) / 2,
                                                      rel=1e-5)
        assert pairs[end]["trained tokens"] == sum(s["trained tokens"] for s in steps)
        assert pairs[end]["consumed samples"] == each[end]["consumed samples"]
        seconds = 2 * pairs[end]["elapsed time per iteration (ms)"] / 1000
        tokens = 16 * sum(s["global batch size"] for s in steps)  # --seq-length 16
        assert pairs[end]["tokens/s"] == pytest.approx(tokens / seconds, rel=0.02, abs=1)
