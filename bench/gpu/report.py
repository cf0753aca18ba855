"""The GPU proof's report: results.md (for bench/results/) and results.json, from run.py's steps.

Targets (issue 15): MFU >= 45% (moonshot 55%) for the 1B Llama in bf16 without document
isolation; varlen attention >= 3x faster than full causal at mean document 1024 (seq 8192) with
a real varlen kernel (flash or torch); every available kernel within tolerance
(bench/gpu/kernels.py) in bf16 and fp16. A dry run compares nothing: it is no GPU figure.
"""

import json
import os

MFU_TARGET, MFU_MOONSHOT, SPEEDUP_TARGET, SPEEDUP_MEAN = 45.0, 55.0, 3.0, 1024
GPU_KERNELS = ("flash", "torch")


def _step(results, name):
    return next((s for s in results["steps"] if s["name"] == name), None)


def _result(results, name):
    step = _step(results, name)
    return (step or {}).get("result")


def _fmt(value, spec=".3g"):
    return "-" if value is None else format(value, spec)


def _mfu(train) -> str:
    if train is None:
        return "no result"
    mfu = "n/a" if train["mfu_percent"] is None else f"{train['mfu_percent']:.1f}%"
    return f"MFU {mfu}, {train['tokens_per_s']:,.0f} tokens/s"


def targets(results, dry_run):
    """[(target, measured, verdict)] rows."""
    rows = []
    kernels = _result(results, "kernels")
    if kernels is None:
        rows.append(("kernel errors within bf16/fp16 tolerance", "no result", "not measured"))
    else:
        checked = [r for r in kernels["rows"] if "errors" in r or r["status"].startswith("error")]
        bad = [r for r in checked if r["status"] != "ok"]
        gpu_ok = {(r["kernel"], r["dtype"]) for r in checked
                  if r["kernel"] in GPU_KERNELS and r["status"] == "ok"}
        measured = (f"{len(checked) - len(bad)}/{len(checked)} checks within tolerance; "
                    f"GPU kernels checked: {', '.join(sorted({k for k, _ in gpu_ok})) or 'none'}")
        if bad:
            verdict = "NOT MET: " + ", ".join(f"{r['kernel']} {r['dtype']} {r['case']}" for r in bad)
        elif dry_run:
            verdict = "n/a (dry run: the checker ran; no GPU kernel)" if not gpu_ok else "n/a (dry run)"
        else:
            verdict = "met" if gpu_ok else "NOT MET: no GPU varlen kernel ran"
        rows.append(("kernel errors within bf16/fp16 tolerance", measured, verdict))

    train = _result(results, "train")
    mfu = (train or {}).get("mfu_percent")
    if dry_run:
        verdict = "n/a (dry run)"
    elif mfu is None:
        verdict = "not measured"
    else:
        verdict = ("met, moonshot too" if mfu >= MFU_MOONSHOT else "met" if mfu >= MFU_TARGET
                   else "NOT MET")
    varlen_train = _result(results, "train-varlen")
    measured = (f"{_mfu(train)}; with --reset-position-ids {_mfu(varlen_train)} "
                f"(nominal causal FLOPs)")
    rows.append((f"MFU >= {MFU_TARGET:.0f}% (moonshot {MFU_MOONSHOT:.0f}%), 1B Llama bf16 seq 4096",
                 measured, verdict))

    varlen = _result(results, "varlen")
    best = None
    for row in (varlen or {}).get("attention", []):
        if row["backend"] in GPU_KERNELS and row["mean"] == SPEEDUP_MEAN:
            if best is None or row["speedup"] > best["speedup"]:
                best = row
    if best is None:
        measured = "no flash/torch row at mean 1024"
        verdict = "n/a (dry run)" if dry_run else "not measured"
    else:
        measured = f"{best['speedup']:.2f}x ({best['backend']}: {best['varlen_ms']:.3g} vs {best['causal_ms']:.3g} ms)"
        verdict = ("n/a (dry run)" if dry_run else
                   "met" if best["speedup"] >= SPEEDUP_TARGET else "NOT MET")
    rows.append((f"varlen >= {SPEEDUP_TARGET:.0f}x faster than full causal at mean document "
                 f"{SPEEDUP_MEAN}, seq 8192", measured, verdict))
    return rows


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _kernel_section(result):
    rows = []
    for r in result["rows"]:
        if "errors" not in r:
            rows.append((r["kernel"], r["dtype"], r["case"], "-", "-", "-", "-", r["status"]))
            continue
        cells = [f"{e['max_abs']:.2e} / {e['rel_l2']:.1e} ({e['baseline_max_abs']:.1e})"
                 for e in r["errors"].values()]
        rows.append((r["kernel"], r["dtype"], r["case"], *cells, r["status"]))
    cases = ", ".join(f"{k} {tuple(v)}" for k, v in result["cases"].items())
    return (f"Cases (micro-batch, seq per row, mean document, heads, query groups, head dim): "
            f"{cases}. Cells: max abs / relative L2 error vs the fp32 reference (max abs error "
            f"of the same plain math in the dtype).\n\n"
            + _table(("kernel", "dtype", "case", "out", "dq", "dk", "dv", "status"), rows))


def _train_section(results):
    rows = []
    for name in ("train", "train-varlen"):
        r = _result(results, name)
        if r is None:
            continue
        memory = "-" if r["max_memory_gb"] is None else f"{r['max_memory_gb']:.1f}"
        rows.append((name, "yes" if r["reset_position_ids"] else "no",
                     f"{r['docs_per_sample']:.2f}", f"{r['step_s']:.3f}",
                     f"{r['fastest_s']:.3f}..{r['slowest_s']:.3f}", f"{r['tokens_per_s']:,.0f}",
                     f"{r['tflops']:.1f}", "-" if r["mfu_percent"] is None else f"{r['mfu_percent']:.1f}%",
                     memory, f"{r['loss']:.4f}"))
    if not rows:
        return "No result."
    first = _result(results, "train") or _result(results, "train-varlen")
    return (f"{first['params'] / 1e9:.3f} B parameters, {first['flops_per_token'] / 1e9:.2f} GFLOP "
            f"per token (model FLOPs, full causal attention in both rows), "
            f"{first['tokens_per_step']} tokens per step, peak "
            f"{_fmt(first['peak_tflops'])} TFLOP/s; median of {len(first['times'])} timed steps.\n\n"
            + _table(("run", "reset-position-ids", "docs/sample", "step s", "min..max s",
                      "tokens/s", "TFLOP/s", "MFU", "peak GiB", "last loss"), rows))


def _varlen_section(result):
    rows = [(r["backend"], r["mean"], r["docs"], f"{r['varlen_ms']:.3f}", f"{r['causal_ms']:.3f}",
             f"{r['speedup']:.2f}x", f"{r['varlen_tflops']:.3g}", f"{r['causal_tflops']:.3g}")
            for r in result["attention"]]
    skipped = "".join(f"\n- {k}: not available: {v}" for k, v in result["skipped"].items())
    return (f"{result['header']}. TFLOP/s count useful per-document causal work "
            f"(3.5 x 4 x sum(len^2) / 2 x heads x head_dim).\n\n"
            + _table(("backend", "mean doc", "docs", "varlen ms", "causal ms", "speedup",
                      "varlen TFLOP/s", "causal TFLOP/s"), rows)
            + (f"\n\nSkipped backends:{skipped}" if skipped else ""))


def markdown(results, dry_run) -> str:
    env = results["environment"]
    title = "GPU proof: dry run on this machine (tiny sizes; no GPU figure)" if dry_run else \
        f"GPU proof on {env['device']}"
    lines = [f"# {title}", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += [f"- command: `{results['command']}`",
              f"- total: {_fmt(results.get('seconds'), '.0f')} s"
              + ("" if "seconds" in results else " (still running, or cut off)"), "",
              "## Targets", "", _table(("target", "measured", "verdict"), targets(results, dry_run)),
              "", "## Steps", "",
              _table(("step", "status", "seconds", "command"),
                     [(s["name"], s["status"] + (f" ({s['note']})" if "note" in s else ""),
                       f"{s['seconds']:.0f}", f"`{s['command']}`")
                      for s in results["steps"]])]
    kernels = _result(results, "kernels")
    lines += ["", "## 1. Varlen kernels vs the exact fp32 reference", "",
              _kernel_section(kernels) if kernels else "No result.",
              "", "## 2. Training step (bench/train_step.py --gpu)", "", _train_section(results),
              "", "## 3. Attention forward+backward, varlen vs full causal (bench/varlen.py)", ""]
    for name in ("varlen", "varlen-1b-shape"):
        r = _result(results, name)
        lines += [f"### {name}", "", _varlen_section(r) if r else "No result.", ""]
    failed = [s for s in results["steps"] if s["status"] != "ok"]
    if failed:
        lines += ["## Failed steps", ""]
        for s in failed:
            lines += [f"### {s['name']}: {s['status']}", "", "```", s.get("tail", "").rstrip()
                      or "(no output)", "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def summary(results, dry_run) -> str:
    return _table(("target", "measured", "verdict"), targets(results, dry_run))


def _atomic_write(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write(out, results, dry_run) -> None:
    _atomic_write(os.path.join(out, "results.md"), markdown(results, dry_run))
    _atomic_write(os.path.join(out, "results.json"), json.dumps(results, indent=1))
