"""End to end through torchrun: ``python -m torch.distributed.run pretrain_gpt.py ...``.

A bad topology must stop every rank quickly, before any process group exists (a rank waiting
in a rendezvous for a peer that already exited would hang until the timeout); a tiny valid run
must train and print Megatron-style iteration lines.
"""

import re

from tests.launcher import torchrun

# A hang shows as a test failure after these, not as a stuck session. Failing on a bad flag
# takes a few seconds (two interpreters importing torch); a training run also builds the model
# and mock datasets, and a 2-core machine shared with other jobs can be several times slower.
FAIL_TIMEOUT_S = 60
RUN_TIMEOUT_S = 240

TINY = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
    "--micro-batch-size 2 --tokenizer-type NullTokenizer --vocab-size 255 --mock-data "
    "--attention-dropout 0 --hidden-dropout 0 --lr 1e-3 --seed 11"
).split()


def _torchrun(nproc, args, timeout, launcher_flags=()):
    return torchrun(nproc, "pretrain_gpt.py", args, timeout, launcher_flags)


def test_invalid_topology_stops_every_rank_naming_the_flag():
    # 2 ranks cannot hold TP 3. Once one worker has failed, torchrun's agent terminates the
    # others at its next check (every 0.1 s by default); checking every 5 s instead lets a rank
    # that started slower on a loaded machine reach its own argument check and exit by itself.
    result = _torchrun(2, TINY + ["--tensor-model-parallel-size", "3"], FAIL_TIMEOUT_S,
                       launcher_flags=["--monitor-interval", "5"])
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    # Both workers write to the same stderr pipe, so their lines may interleave: look for each
    # rank's message anywhere in the output rather than at the start of a line.
    for rank in (0, 1):
        assert (f"[rank {rank}] invalid arguments: world size 2 is not divisible by "
                f"--tensor-model-parallel-size 3") in output, output
    # torchrun's failure summary lists both workers with a non-zero exit code.
    exitcodes = re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)",
                           output)
    assert sorted(int(r) for r, _ in exitcodes) == [0, 1], output
    assert all(int(code) != 0 for _, code in exitcodes), output
    assert "iteration" not in result.stdout


def test_tiny_tp2_run_logs_iterations():
    iters = 3
    result = _torchrun(2, TINY + [
        "--tensor-model-parallel-size", "2", "--global-batch-size", "4",
        "--train-iters", str(iters), "--log-interval", "1", "--eval-interval", "1000",
        "--eval-iters", "1",
    ], RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Megatron-style line: "iteration 1/3 | consumed samples 4 | lm loss 5.5E+00 | ...";
    # fields are read by name, so added or reordered fields do not matter.
    records = []
    for line in result.stdout.splitlines():
        found = re.search(rf"iteration\s+(\d+)/{iters} \| (.*)$", line)
        if found:
            pairs = (f.strip().rsplit(" ", 1) for f in found.group(2).split(" | "))
            fields = {name.strip(): value for name, value in pairs}
            records.append((int(found.group(1)), fields))
    # One line per iteration, written once (by the last rank), not once per rank.
    assert [it for it, _ in records] == list(range(1, iters + 1)), result.stdout
    for iteration, fields in records:
        for name in ("consumed samples", "lm loss", "grad norm", "learning rate", "tokens/s"):
            assert name in fields, (name, fields)
        assert int(fields["consumed samples"]) == 4 * iteration
        # Untrained: cross entropy near ln(vocab): 256 ids padded to 256, ln 256 = 5.55.
        assert 4.5 < float(fields["lm loss"]) < 6.5
        assert float(fields["grad norm"]) > 0 and float(fields["tokens/s"]) > 0
        assert 0 <= float(fields["learning rate"]) <= 1e-3
    assert "validation at iteration 3 | lm loss" in result.stdout
