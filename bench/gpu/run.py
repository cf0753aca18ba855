"""The GPU proof in one command (bench/gpu/README.md): install, check kernels, time, report.

Steps, each a subprocess under its own timeout and all under one deadline, so that a failing or
hanging step costs only its own time and the report is always written:
  0. install the carried wheels (bench/gpu/wheels/, offline, --no-deps: torch is never touched;
     a wheel whose version is already installed is skipped) into this run's own folder; if
     that fails, or megatron-core is still not importable, no step is run;
  1. bench/gpu/kernels.py: every available varlen kernel against the exact fp32 reference;
  2. bench/train_step.py --gpu: the 1B Llama, bf16, seq 4096, without and with
     --reset-position-ids: tokens/s, TFLOP/s, MFU;
  3. bench/varlen.py: attention forward+backward, varlen vs full causal, seq 8192, mean
     document 256..4096, in the bench's default shape and in the 1B model's (GQA, head dim 64);
  (only with ``--only context-parallel``) bench/context_parallel.py --gpu: activation memory
     per rank and tokens/s at 32k-128k tokens, for the CP sizes the GPUs allow.
The report (``results.md``, plus ``results.json`` and the steps' output in ``run.log``) is
rewritten after every step into ``--out`` (default ``$OUT``, the folder the device tool brings
back); the exit status is 1 when any step failed. ``--dry-run`` runs the same steps at tiny
sizes on this machine (CPU: the GPU kernels are reported as not available) and claims no GPU
figure.

    bash bench/gpu/run.sh               # on the lent GPU machine
    bash bench/gpu/run.sh --dry-run --out /tmp/gpu-dry-run
"""

import argparse
import datetime
import glob
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)

import report  # noqa: E402

WHEEL_DIR = os.path.join(ROOT, "bench", "gpu", "wheels")

# name: (timeout s, GPU args, dry-run args); the script is the first argument.
TRAIN = ["bench/train_step.py", "--gpu"]
VARLEN = ["bench/varlen.py", "--seq-length"]
STEPS = {
    "kernels": (75, ["bench/gpu/kernels.py"], ["bench/gpu/kernels.py", "--dry-run"]),
    "train": (130, TRAIN + ["--micro-batch-size", "2", "--global-batch-size", "16"],
              TRAIN + ["--dry-run", "--micro-batch-size", "2", "--global-batch-size", "4",
                       "--warmup", "1", "--steps", "2"]),
    "train-varlen": (130, TRAIN + ["--micro-batch-size", "2", "--global-batch-size", "16",
                                   "--reset-position-ids"],
                     TRAIN + ["--dry-run", "--micro-batch-size", "2", "--global-batch-size", "4",
                              "--warmup", "1", "--steps", "2", "--reset-position-ids"]),
    "varlen": (60, VARLEN + ["8192", "--mean-lengths", "256", "512", "1024", "2048", "4096",
                             "--warmup", "3", "--reps", "10"],
               VARLEN + ["256", "--heads", "4", "--head-dim", "16", "--mean-lengths", "32", "64",
                         "--warmup", "1", "--reps", "1"]),
    "varlen-1b-shape": (60, VARLEN + ["8192", "--heads", "32", "--kv-heads", "8", "--head-dim",
                                      "64", "--mean-lengths", "256", "1024", "4096",
                                      "--warmup", "3", "--reps", "10"],
                        VARLEN + ["256", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                                  "--mean-lengths", "32", "--warmup", "1", "--reps", "1"]),
    # Not in the default run (its 450 s are spoken for): --only context-parallel. One GPU
    # measures CP=1 at 32k-128k tokens; CP=2 and 4 need as many GPUs and are listed as skipped.
    "context-parallel": (150, ["bench/context_parallel.py", "--gpu", "--warmup", "1", "--steps",
                               "2"],
                         ["bench/context_parallel.py", "--gpu", "--dry-run", "--seq-lengths",
                          "256", "--cp", "1", "2", "--warmup", "0", "--steps", "1"]),
}
OPTIONAL = ("context-parallel",)
RESERVE_S = 10  # kept back from the deadline for writing the report


def install(wheel_dir, site, env, log) -> dict:
    """Step 0: pip's offline install into ``site`` of the carried wheels that are not installed
    at their version already (--no-deps: torch and the image's packages stay as they are)."""
    wheels = sorted(glob.glob(os.path.join(wheel_dir, "*.whl")))
    needed = []
    for wheel in wheels:
        name, version = os.path.basename(wheel).split("-")[:2]
        try:
            if metadata.version(name) == version:
                continue
        except metadata.PackageNotFoundError:
            pass
        needed.append(wheel)
    if not needed:
        present = ", ".join(os.path.basename(w) for w in wheels)
        return dict(name="install", status="ok", seconds=0.0, command="-",
                    note=f"already installed: {present}" if wheels else "no wheels carried")
    argv = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
            "--no-compile", "--no-cache-dir", "--upgrade", "--target", site] + needed
    status, seconds, tail = run_step("install", argv, 60, env, log)
    return dict(name="install", status=status, seconds=seconds, command=shlex.join(argv),
                tail=tail)


def check_megatron_core(installed, site) -> None:
    """Fail the install step when the steps could not import megatron-core (a failed pip, or
    no wheels carried to a machine without it): every step needs it, so none is run. Leaves
    ``site`` on sys.path, so that the report names the versions the steps import."""
    sys.path.append(site)
    if installed["status"] != "ok":
        return
    try:
        found = importlib.util.find_spec("megatron.core") is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        installed["status"] = ("failed: megatron-core is not importable; run "
                               "bench/gpu/prepare_wheels.py and pass carry=[\"bench/gpu/wheels\"]")


def run_step(name, argv, timeout, env, log):
    """Run one step, its output to stdout and the log; returns (status, seconds, tail)."""
    start = time.monotonic()
    header = f"\n===== {name}: {shlex.join(argv)} (timeout {timeout:.0f} s)\n"
    sys.stdout.write(header)
    log.write(header)
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace",
                            start_new_session=True)
    lines = []

    def pump():
        for line in proc.stdout:
            lines.append(line)
            sys.stdout.write(line)
            log.write(line)
        sys.stdout.flush()
        log.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
        status = "ok" if rc == 0 else f"failed: exit code {rc}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        status = f"failed: timed out after {timeout:.0f} s"
    reader.join(timeout=5)
    return status, time.monotonic() - start, "".join(lines[-40:])


def _git(*args) -> str:
    """git's output, or "" where there is no git or no repository."""
    try:
        run = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return run.stdout.strip() if run.returncode == 0 else ""


def environment(dry_run, wheel_dir):
    import torch

    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": "dry run (tiny sizes, no GPU figure)" if dry_run else "GPU",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no CUDA)",
    }
    for dist in ("megatron-core", "flash-attn", "triton", "transformer-engine"):
        try:
            env[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            env[dist] = "not installed"
    try:
        env["nvidia-smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        env["nvidia-smi"] = "not available"
    # The device machine gets the files without .git: there the wheels' manifest names the
    # commit they were prepared at.
    commit, dirty = _git("rev-parse", "HEAD"), _git("status", "--porcelain")
    manifest = os.path.join(wheel_dir, "manifest.json")
    if commit:
        env["tree"] = f"commit {commit}{' + uncommitted changes' if dirty else ''}"
    elif os.path.exists(manifest):
        with open(manifest) as f:
            m = json.load(f)
        env["tree"] = (f"commit {m['commit']}{' + uncommitted changes' if m['uncommitted_changes'] else ''}"
                       f" (when the wheels were prepared, {m['prepared_utc']})")
    else:
        env["tree"] = "unknown"
    return env


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on this machine")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "out"),
                   help="where results.md, results.json and run.log go (default $OUT)")
    p.add_argument("--deadline-s", type=float, default=450,
                   help="all steps end within this many seconds of the start")
    p.add_argument("--only", nargs="+", choices=list(STEPS), help="a subset of the steps")
    p.add_argument("--wheel-dir", default=WHEEL_DIR, help="the carried wheels (prepare_wheels.py)")
    args = p.parse_args()
    start = time.monotonic()
    os.makedirs(args.out, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="gpu-proof-")
    # This run's own install folder, ahead of the interpreter's packages: one shared across
    # runs kept what another Python or version had put there (a cp312 megatron-core shadowed
    # the 3.11 one here, even when this run's install was skipped).
    site = os.path.join(scratch, "site")
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(
                   p for p in [ROOT, site, os.environ.get("PYTHONPATH")] if p))
    if args.dry_run:  # tiny sizes on a shared CPU: thread pools only add spin-waiting
        env["OMP_NUM_THREADS"] = "1"
    with open(os.path.join(args.out, "run.log"), "w") as log:
        installed = install(args.wheel_dir, site, env, log)
        check_megatron_core(installed, site)
        results = {"environment": environment(args.dry_run, args.wheel_dir),
                   "command": shlex.join(sys.argv), "steps": [installed]}
        for name in args.only or [name for name in STEPS if name not in OPTIONAL]:
            timeout, gpu_argv, dry_argv = STEPS[name]
            json_path = os.path.join(scratch, f"{name}.json")
            argv = [sys.executable] + (dry_argv if args.dry_run else gpu_argv) + ["--json", json_path]
            step = dict(name=name, command=shlex.join(["python"] + argv[1:-2]))
            left = args.deadline_s - (time.monotonic() - start) - RESERVE_S
            if installed["status"] != "ok":
                step.update(status="failed: not run, the install failed", seconds=0.0)
            elif left < 15:
                step.update(status="failed: not run, the deadline was reached", seconds=0.0)
            else:
                status, seconds, tail = run_step(name, argv, min(timeout, left), env, log)
                step.update(status=status, seconds=seconds, tail=tail)
                if os.path.exists(json_path):
                    with open(json_path) as f:
                        step["result"] = json.load(f)
            results["steps"].append(step)
            report.write(args.out, results, args.dry_run)
        results["seconds"] = time.monotonic() - start
        report.write(args.out, results, args.dry_run)
    shutil.rmtree(scratch, ignore_errors=True)  # the steps' JSON is in results now
    print(f"\n{report.summary(results, args.dry_run)}\nreport: {os.path.join(args.out, 'results.md')}")
    failed = [s["name"] for s in results["steps"] if s["status"] != "ok"]
    if failed:  # the device tool's rc shows it; the report has each one's output tail
        sys.exit(f"failed steps: {', '.join(failed)} (see the report's Failed steps)")


if __name__ == "__main__":
    main()
