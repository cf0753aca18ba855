"""--multiple-validation-sets: each --valid-data-path dataset evaluated on its own, a loss per
set under Megatron-LM's labels (validation-0, validation-1 or --validation-set-names), at every
--eval-interval and at the end. The reference is independent of the feature: runs that each
validate on one of the datasets alone. Runs go through ``pretrain`` on in-process ranks."""

import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_ext.config import ConfigError, parse_args
from tests.launcher import launch, pretrain_records
from tests.training import test_data
from tests.training.test_launch import TINY

pytestmark = pytest.mark.usefixtures("tmp_cwd")  # dataset caches there

shards = test_data.shards  # the fixture: A ids 1..99, B ids 100..199, docs k = id k + 1

# Evaluations at 2 and 4, and the final one at 5 ("on validation set"); dropout on, so that
# an evaluation that disturbed training (its RNG, its data) would show in the next ones.
RUN = [a for a in TINY if a != "--mock-data"] + [
    "--global-batch-size", "4", "--train-iters", "5", "--log-interval", "1",
    "--eval-interval", "2", "--eval-iters", "2", "--hidden-dropout", "0.1"]


def _validations(shards, valid, world_size=1, extra=()):
    argv = RUN + ["--train-data-path", shards["A"], "--valid-data-path", *valid, *extra]
    return launch(pretrain_records, world_size, argv)[-1][1]


def _by_set(records):
    """{set: [(iteration, final, lm loss value)]}; the blend's records under None."""
    found = {}
    for r in records:
        found.setdefault(r.get("set"), []).append((r["iteration"], r["final"],
                                                   r["lm loss value"]))
    return found


@pytest.fixture(scope="module")
def separate(shards):
    """Each set validated alone, in a run of its own: 1 rank."""
    return _by_set(_validations(shards, [shards["B"], shards["docs"]], extra=[
        "--multiple-validation-sets"]))


def test_each_set_equals_a_run_validating_on_it_alone(shards, separate):
    assert sorted(separate) == ["0", "1"]
    for index, name in enumerate(["B", "docs"]):
        alone = _by_set(_validations(shards, [shards[name]]))[None]
        assert [(i, f) for i, f, _ in alone] == [("2", False), ("4", False), ("5", True)]
        assert separate[str(index)] == alone
        if name == "B":  # one dataset is a set too (megatron-core builds it alone): "-0"
            assert _by_set(_validations(shards, [shards[name]], extra=[
                "--multiple-validation-sets"])) == {"0": alone}
    assert separate["0"] != separate["1"]  # the two datasets differ: the test can fail


def test_two_data_parallel_ranks_equal_one_with_set_names(shards, tmp_path):
    """Without dropout (its masks depend on the layout): 2 DP ranks == 1, set for set; the
    1-rank run's TensorBoard holds each set's losses under Megatron-LM's tags."""
    sets, flags = [shards["B"], shards["docs"]], ["--multiple-validation-sets",
                                                  "--hidden-dropout", "0"]
    one = _by_set(_validations(shards, sets, extra=flags + ["--tensorboard-dir",
                                                            str(tmp_path)]))
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    for index in ("0", "1"):
        scalars = [(str(e.step), e.value) for e in events.Scalars(f"lm loss validation-{index}")]
        assert [(i, float(v)) for i, _, v in one[index]] == [
            (step, pytest.approx(value, rel=1e-6)) for step, value in scalars]
        assert f"lm loss validation-{index} ppl" in events.Tags()["scalars"]
    assert "lm loss validation" not in events.Tags()["scalars"]
    two = _by_set(_validations(shards, sets, world_size=2, extra=flags + [
        "--validation-set-names", "bee", "docs"]))
    assert sorted(two) == ["bee", "docs"]
    for name, index in (("bee", "0"), ("docs", "1")):
        assert [(i, f) for i, f, _ in two[name]] == [(i, f) for i, f, _ in one[index]]
        assert [float(v) for *_, v in two[name]] == pytest.approx(
            [float(v) for *_, v in one[index]], rel=1e-5)


def test_resumed_sets_continue_where_they_stopped(shards, separate, tmp_path):
    """Stopped at 3 and resumed: every set's evaluations continue where the stopped run's left
    off (one consumed_valid_samples, the position in each set), as one uninterrupted run."""
    sets = [shards["B"], shards["docs"]]
    stopped = _validations(shards, sets, extra=[
        "--multiple-validation-sets", "--save", str(tmp_path), "--save-interval", "3",
        "--exit-interval", "3"])
    resumed = _validations(shards, sets, extra=["--multiple-validation-sets",
                                                "--load", str(tmp_path)])
    assert _by_set(stopped + resumed) == separate


@pytest.mark.parametrize("valid,extra,expected", [
    (["{B}"], ["--validation-set-names", "b"], "--validation-set-names names the datasets of "
     "--multiple-validation-sets; add that flag"),
    (["0.5", "{B}", "0.5", "{docs}"], ["--multiple-validation-sets"], "--valid-data-path with "
     "--multiple-validation-sets: each dataset is evaluated on its own, so the list takes no "
     "weights"),
    (["{B}", "{docs}"], ["--multiple-validation-sets", "--validation-set-names", "b"],
     "--validation-set-names: 1 names for the 2 datasets of --valid-data-path"),
    (None, ["--multiple-validation-sets"], "--multiple-validation-sets evaluates each "
     "--valid-data-path dataset on its own; give the validation datasets with"),
    (None, ["--multiple-validation-sets", "--is-instruction-dataset"], "--multiple-validation-"
     "sets with --is-instruction-dataset: instruction data is one --data-path blend"),
])
def test_where_it_cannot_apply_the_flag_is_named(shards, valid, extra, expected):
    if valid is None:
        source = ["--data-path", shards["A"], "--split", "90,10,0"]
    else:
        source = ["--train-data-path", shards["A"], "--valid-data-path",
                  *[v.format(**shards) for v in valid]]
    with pytest.raises(ConfigError, match=expected):
        parse_args(RUN + source + extra, world_size=1)


def test_a_validation_set_without_a_trained_token_has_no_loss(shards, tmp_path):
    """A set of EOD-only documents with --eod-mask-loss: every label is masked (read back with
    megatron-core), so its loss is 0/0, nan as Megatron-LM's division gives, not 0 (PPL 1)."""
    eod_only = test_data._write(str(tmp_path / "eod_text_document"), [[]] * 20)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    stored = IndexedDataset(eod_only)
    assert {int(t) for i in range(len(stored)) for t in stored[i]} == {test_data.EOD}
    losses = _by_set(_validations(shards, [shards["B"], eod_only], extra=[
        "--multiple-validation-sets", "--eod-mask-loss"]))
    assert len(losses["1"]) == 3 and all(math.isnan(float(v)) for _, _, v in losses["1"]), losses
    assert all(math.isfinite(float(v)) for _, _, v in losses["0"]), losses
