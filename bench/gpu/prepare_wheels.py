"""Download, on a machine with PyPI, the wheels the lent GPU machine lacks (run there: none).

The GPU machine (bench/gpu/README.md) has Python 3.12, torch 2.11 + CUDA 13 and most of our
dependencies, but no megatron-core and no network. This fetches cp312 manylinux x86_64 wheels
of ``WHEELS`` (no dependencies: each wheel's requirements are checked against what the image
has, ``ON_GPU_IMAGE``) into ``bench/gpu/wheels/`` (git-ignored, passed to the device tool as a
``carry`` path), writes ``manifest.json`` there (the tree's commit, each wheel's size and
sha256) and checks that the tree plus the wheels stay within what travels.

    python bench/gpu/prepare_wheels.py
"""

import argparse
import datetime
import email.parser
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
WHEEL_DIR = os.path.join(ROOT, "bench", "gpu", "wheels")

# The version tested here, so the GPU runs the code the CPU suite passed on.
WHEELS = [f"megatron-core=={metadata.version('megatron-core')}"]
# What the lent machine's image holds among our (and megatron-core's) requirements, as listed
# for it (2026-11): these are never carried.
ON_GPU_IMAGE = {"torch", "numpy", "packaging", "sentencepiece", "transformers", "tokenizers",
                "safetensors", "tensorboard", "pyarrow", "pytest", "triton", "einops", "psutil"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]
TRAVEL_LIMIT_MIB = 64  # tracked + untracked-not-ignored files + carried paths, per call
HEADROOM_MIB = 16  # keep this much free for what a session adds before the call


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def download(specs, dest) -> None:
    shutil.rmtree(dest, ignore_errors=True)  # one version of each: two stop the install there
    os.makedirs(dest)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "-d", dest]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd + list(specs), check=True)


def requirements(wheel_path) -> list:
    """The wheel's unconditional requirements (names only)."""
    with zipfile.ZipFile(wheel_path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        message = email.parser.Parser().parsestr(z.read(meta).decode())
    names = []
    for req in message.get_all("Requires-Dist") or []:
        if "extra ==" in req or "extra==" in req:
            continue
        names.append(_normalize(re.match(r"[A-Za-z0-9._-]+", req).group(0)))
    return names


def check_requirements(wheels) -> None:
    carried = {_normalize(os.path.basename(w).split("-")[0]) for w in wheels}
    missing = {}
    for wheel in wheels:
        for name in requirements(wheel):
            if name not in carried and name not in ON_GPU_IMAGE:
                missing.setdefault(name, []).append(os.path.basename(wheel))
    if missing:
        raise SystemExit(f"not on the GPU image and not carried: {missing}; add them to WHEELS "
                         f"in {os.path.relpath(__file__, ROOT)}")


def travelling_tree_bytes() -> int:
    """Bytes of what the device tool sends besides carried paths: tracked and untracked files
    that git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, check=True).stdout
    paths = [os.path.join(ROOT, p) for p in out.decode().split("\0") if p]
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(p))


def _git(*args) -> str:
    run = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return run.stdout.strip() if run.returncode == 0 else "unknown"


def write_manifest(wheels, dest) -> dict:
    entries = []
    for wheel in wheels:
        with open(wheel, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        entries.append({"file": os.path.basename(wheel), "bytes": os.path.getsize(wheel),
                        "sha256": digest})
    manifest = {
        "prepared_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(_git("status", "--porcelain")),
        "wheels": entries,
    }
    tmp = os.path.join(dest, "manifest.json.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(dest, "manifest.json"))
    return manifest


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dest", default=WHEEL_DIR)
    p.add_argument("specs", nargs="*", default=WHEELS, help=f"default: {' '.join(WHEELS)}")
    args = p.parse_args()
    download(args.specs, args.dest)
    wheels = sorted(os.path.join(args.dest, f) for f in os.listdir(args.dest) if f.endswith(".whl"))
    check_requirements(wheels)
    manifest = write_manifest(wheels, args.dest)
    mib = lambda n: n / 2**20  # noqa: E731
    wheel_bytes = sum(e["bytes"] for e in manifest["wheels"])
    tree = travelling_tree_bytes()
    for e in manifest["wheels"]:
        print(f"{mib(e['bytes']):8.2f} MiB  {e['file']}")
    print(f"{mib(wheel_bytes):8.2f} MiB  wheels in {os.path.relpath(args.dest, ROOT)}/")
    print(f"{mib(tree):8.2f} MiB  working tree that travels (tracked + untracked, not ignored)")
    total = mib(wheel_bytes + tree)
    print(f"{total:8.2f} MiB  in all, of {TRAVEL_LIMIT_MIB} MiB per call; commit "
          f"{manifest['commit'][:12]}{' + uncommitted changes' if manifest['uncommitted_changes'] else ''}")
    if total > TRAVEL_LIMIT_MIB - HEADROOM_MIB:
        raise SystemExit(f"{total:.1f} MiB would travel: keep it under "
                         f"{TRAVEL_LIMIT_MIB - HEADROOM_MIB} MiB (ignore or drop large files)")


if __name__ == "__main__":
    main()
