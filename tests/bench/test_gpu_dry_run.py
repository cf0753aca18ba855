"""The GPU proof (bench/gpu/) rehearsed on this machine: the dry run through its shell entry,
the kernel checker's verdicts, step isolation, the report's target verdicts, the wheel check."""

import base64
import hashlib
import json
import math
import os
import subprocess
import sys
import zipfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bench", "gpu"))

import kernels  # noqa: E402
import prepare_wheels  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402

from megatron_ext.model import attention_backends  # noqa: E402

# One of each script and of the varlen training path; bench/gpu/README.md runs all steps.
DRY_RUN_STEPS = ["kernels", "train-varlen", "varlen"]
# Three interpreters importing megatron-core on a shared 2-core machine: ~40 s of CPU time,
# minutes of wall time under load. The run's own deadline ends it before the test gives up.
DEADLINE_S, TIMEOUT_S = 400, 480


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-dry-run")
    env = dict(os.environ, PYTHON=sys.executable)  # run.sh's interpreter: this one
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "bench", "gpu", "run.sh"), "--dry-run", "--out", str(out),
         "--only", *DRY_RUN_STEPS, "--deadline-s", str(DEADLINE_S)],
        env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "results.json") as f:
        results = json.load(f)
    return out, results, proc.stdout


def test_dry_run_runs_every_step_and_writes_the_report(dry_run):
    out, results, stdout = dry_run
    steps = {s["name"]: s for s in results["steps"]}
    assert list(steps) == ["install", *DRY_RUN_STEPS]
    assert all(s["status"] == "ok" for s in steps.values()), steps
    assert sorted(os.listdir(out)) == ["results.json", "results.md", "run.log"]
    md = (out / "results.md").read_text()
    assert md.startswith("# GPU proof: dry run on this machine (tiny sizes; no GPU figure)")
    # Nothing in a dry run is compared with the GPU targets.
    for target, _, verdict in report.targets(results, dry_run=True):
        assert verdict.startswith("n/a (dry run"), (target, verdict)
    assert "| target | measured | verdict |" in stdout  # the summary ends the output


def test_dry_run_kernel_check_reports_unavailable_kernels_and_passes_sdpa(dry_run):
    _, results, _ = dry_run
    rows = next(s for s in results["steps"] if s["name"] == "kernels")["result"]["rows"]
    by = {(r["kernel"], r["dtype"], r["case"]): r for r in rows}
    for dtype in ("bf16", "fp16"):
        for case, (micro_batch, *_) in kernels.DRY_RUN_CASES.items():
            row = by[("sdpa", dtype, case)]
            assert row["status"] == "ok", row
            assert row["docs"] > micro_batch  # documents packed, not one per row
        if not torch.cuda.is_available():  # reported, not faked
            assert by[("torch", dtype, "*")]["status"].startswith("not available: ")


def test_dry_run_training_step_is_a_real_step(dry_run):
    _, results, _ = dry_run
    r = next(s for s in results["steps"] if s["name"] == "train-varlen")["result"]
    assert r["reset_position_ids"] and "--reset-position-ids" in r["argv"]
    assert r["tokens_per_s"] > 0 and len(r["times"]) == 2
    # An untrained model predicts uniformly over the padded vocabulary (1024 ids).
    assert abs(r["loss"] - math.log(1024)) < 0.3, r["loss"]
    varlen = next(s for s in results["steps"] if s["name"] == "varlen")["result"]
    assert [row["mean"] for row in varlen["attention"] if row["backend"] == "sdpa"] == [32, 64]


def _attends_across_documents(q, k, v, cu_seqlens, max_seqlen, scale, dropout):
    whole = torch.tensor([0, q.size(0)], dtype=torch.int32)
    return attention_backends._sdpa_varlen(q, k, v, whole, q.size(0), scale, dropout)


def _mixes_rows(q, k, v, cu_seqlens, max_seqlen, scale, dropout):
    """Right per row, wrong flattening: the rows' documents taken in (s, b) order."""
    half = q.size(0) // 2
    order = torch.stack([torch.arange(half), torch.arange(half) + half], 1).flatten()
    out = attention_backends._sdpa_varlen(q[order], k[order], v[order], cu_seqlens, max_seqlen,
                                          scale, dropout)
    return out[order.argsort()]


@pytest.mark.parametrize("broken", [_attends_across_documents, _mixes_rows])
def test_kernel_check_fails_a_kernel_that_breaks_document_isolation(monkeypatch, broken):
    monkeypatch.setitem(attention_backends._VARLEN, "sdpa", broken)
    shape = kernels.DRY_RUN_CASES["many-short-gqa"]
    row = kernels.check_case("sdpa", "bf16", "many-short-gqa", shape, torch.device("cpu"), 0)
    assert row["status"] == "FAIL", row


def test_a_failing_or_hanging_step_is_reported_and_the_next_one_runs(tmp_path):
    with open(tmp_path / "log", "w") as log:
        failed = run.run_step("fail", [sys.executable, "-c", "import sys; print('boom'); "
                                       "sys.exit(3)"], 30, dict(os.environ), log)
        hung = run.run_step("hang", [sys.executable, "-c", "import time; time.sleep(60)"], 1,
                            dict(os.environ), log)
        ok = run.run_step("ok", [sys.executable, "-c", "print('fine')"], 30, dict(os.environ), log)
    assert failed[0] == "failed: exit code 3" and "boom" in failed[2]
    assert hung[0] == "failed: timed out after 1 s" and hung[1] < 30
    assert ok[0] == "ok" and ok[2] == "fine\n"


def _pure_wheel(wheel_dir, name="gpuproof_probe", version="1.0"):
    """A minimal valid wheel of one module (``VALUE = 7``)."""
    files = {f"{name}/__init__.py": "VALUE = 7\n",
             f"{name}-{version}.dist-info/METADATA":
                 f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{name}-{version}.dist-info/WHEEL":
                 "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = f"{name}-{version}.dist-info/RECORD"
    lines = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        lines.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    files[record] = "\n".join(lines + [f"{record},,"]) + "\n"
    os.makedirs(wheel_dir, exist_ok=True)
    path = os.path.join(wheel_dir, f"{name}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as z:
        for name_, text in files.items():
            z.writestr(name_, text)
    return path


def test_install_step_installs_carried_wheels_offline_into_its_own_folder(tmp_path):
    env = dict(os.environ, PIP_NO_INPUT="1")
    with open(tmp_path / "log", "w") as log:
        assert run.install(str(tmp_path / "none"), str(tmp_path / "site"), env, log)["note"] \
            == "no wheels carried"
        _pure_wheel(str(tmp_path / "wheels"))
        step = run.install(str(tmp_path / "wheels"), str(tmp_path / "site"), env, log)
    assert step["status"] == "ok", step
    assert "--no-index" in step["command"] and "--no-deps" in step["command"]
    probe = subprocess.run([sys.executable, "-c", "import gpuproof_probe; print(gpuproof_probe.VALUE)"],
                           env=dict(os.environ, PYTHONPATH=str(tmp_path / "site")),
                           capture_output=True, text=True)
    assert probe.stdout == "7\n", probe.stderr


def test_a_failed_install_runs_no_step_exits_nonzero_and_still_writes_the_report(tmp_path):
    wheels, out = tmp_path / "wheels", tmp_path / "out"
    wheels.mkdir()
    (wheels / "gpuproof_probe-1.0-py3-none-any.whl").write_bytes(b"not a zip: a broken carry")
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "bench", "gpu", "run.sh"), "--dry-run", "--out", str(out),
         "--wheel-dir", str(wheels), "--only", "kernels", "varlen"],
        env=dict(os.environ, PYTHON=sys.executable, PIP_NO_INPUT="1"), capture_output=True,
        text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "failed steps: install, kernels, varlen" in proc.stderr
    with open(out / "results.json") as f:
        steps = {s["name"]: s for s in json.load(f)["steps"]}
    assert steps["install"]["status"].startswith("failed: exit code")
    assert "--no-index" in steps["install"]["command"]
    for name in ("kernels", "varlen"):  # no step spends its time on a missing megatron-core
        assert steps[name]["status"] == "failed: not run, the install failed"
    md = (out / "results.md").read_text()
    assert "### install: failed: exit code" in md
    assert "gpuproof" in steps["install"]["tail"]  # pip's own error names the wheel


def _gpu_results(mfu, speedup, kernel_status="ok"):
    train = dict(mfu_percent=mfu, tokens_per_s=1.0)
    return {"steps": [
        {"name": "kernels", "result": {"rows": [
            dict(kernel="torch", dtype="bf16", case="c", status=kernel_status, errors={})]}},
        {"name": "train", "result": train},
        {"name": "varlen", "result": {"attention": [
            dict(backend="torch", mean=1024, speedup=speedup, varlen_ms=1.0, causal_ms=speedup),
            dict(backend="sdpa", mean=1024, speedup=99.0, varlen_ms=1.0, causal_ms=99.0)]}},
    ]}


@pytest.mark.parametrize("mfu, speedup, kernel_status, verdicts", [
    (46.0, 3.2, "ok", ["met", "met", "met"]),
    (56.0, 3.0, "ok", ["met", "met, moonshot too", "met"]),
    (44.9, 2.9, "FAIL", ["NOT MET: torch bf16 c", "NOT MET", "NOT MET"]),
])
def test_report_compares_gpu_numbers_with_the_targets(mfu, speedup, kernel_status, verdicts):
    # sdpa's 99x is not a varlen kernel's figure: only flash/torch count.
    rows = report.targets(_gpu_results(mfu, speedup, kernel_status), dry_run=False)
    assert [verdict for _, _, verdict in rows] == verdicts


def _wheel(path, requires):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("pkg-1.0.dist-info/METADATA",
                   "Name: pkg\nVersion: 1.0\n" + "".join(f"Requires-Dist: {r}\n" for r in requires))
    return str(path)


def test_wheel_requirements_missing_on_the_gpu_image_are_named(tmp_path):
    ok = _wheel(tmp_path / "pkg-1.0-py3-none-any.whl",
                ["torch>=2.6.0", "numpy", "packaging>=24.2", "pytest; extra == 'dev'"])
    prepare_wheels.check_requirements([ok])
    bad = _wheel(tmp_path / "other-1.0-py3-none-any.whl", ["Nvidia_Foo (>=1)", "numpy"])
    with pytest.raises(SystemExit, match="nvidia-foo"):
        prepare_wheels.check_requirements([ok, bad])
