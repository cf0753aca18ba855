"""Loss curves as a picture: ``python -m megatron_ext.plot RUN ... -o curves.png``.

Each RUN is a console log of ``pretrain_gpt.py`` (or of Megatron-LM), a TensorBoard event
file, or a directory holding either (event files are preferred, found recursively; else its
``*.log``/``*.txt`` files). One figure, one colour per run: lm loss (train, and validation
dashed), learning rate, grad norm and tokens/s against the iteration. It prints which series
it found per run, so a missing one is said, not silently left blank.

Console lines are Megatron-LM's (``key: value | ...``, which ours follow), read by field name
with ``metrics.parse_log``, so added or reordered fields keep it working. A resumed run's
repeated iterations take the later value.
"""

import argparse
import glob
import os
import re
import sys
from typing import Dict, List

Series = Dict[int, float]

# Plotted series and the names they go by: console fields (lower case, colon stripped) and
# TensorBoard tags (metrics.py writes Megatron-LM's).
SERIES = {
    "lm loss": ("lm loss",),
    "validation lm loss": ("lm loss validation",),
    "learning rate": ("learning rate", "learning-rate"),
    "grad norm": ("grad norm", "grad-norm"),
    "tokens/s": ("tokens/s", "tokens-per-sec", "tokens per sec"),
}
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?%?$")


def read_log(path: str) -> Dict[str, Series]:
    """The series of a console log (Megatron-LM's line format, read by ``metrics.parse_log``);
    a resumed run's repeated iterations take the later value."""
    from megatron_ext.training.metrics import parse_log

    with open(path, errors="replace") as log:
        train, valid = parse_log(log.read())
    found: Dict[str, Series] = {name: {} for name in SERIES}
    for record in train:
        for name, keys in SERIES.items():
            key = next((k for k in keys if k in record), None)
            if key and name != "validation lm loss" and _NUMBER.match(record[key]):
                found[name][int(record["iteration"])] = float(record[key].rstrip("%"))
    for record in valid:
        # The blend's loss; the losses of --multiple-validation-sets are not one curve.
        if record["split"] == "validation" and "set" not in record and "lm loss value" in record:
            found["validation lm loss"][int(record["iteration"])] = float(record["lm loss value"])
    return found


def read_events(paths: List[str]) -> Dict[str, Series]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: Dict[str, Series] = {name: {} for name in SERIES}
    for path in sorted(paths, key=os.path.getmtime):  # a resume's events come later
        events = EventAccumulator(path, size_guidance={"scalars": 0})
        events.Reload()
        tags = set(events.Tags()["scalars"])
        for name, keys in SERIES.items():
            for tag in (k for k in keys if k in tags):
                found[name].update((e.step, e.value) for e in events.Scalars(tag))
    return found


def read_run(path: str) -> Dict[str, Series]:
    """The series of one run argument (a log, an event file or a directory)."""
    if os.path.isdir(path):
        events = glob.glob(os.path.join(path, "**", "events.out.tfevents.*"), recursive=True)
        if events:
            return read_events(events)
        logs = sorted(glob.glob(os.path.join(path, "**", "*.log"), recursive=True)
                      + glob.glob(os.path.join(path, "**", "*.txt"), recursive=True))
        if not logs:
            raise ValueError(f"{path}: no TensorBoard event files and no *.log/*.txt logs in it")
        found: Dict[str, Series] = {name: {} for name in SERIES}
        for log in logs:
            for name, series in read_log(log).items():
                found[name].update(series)
        return found
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file or directory")
    if os.path.basename(path).startswith("events.out.tfevents."):
        return read_events([path])
    return read_log(path)


def report(path: str, found: Dict[str, Series]) -> str:
    have = [f"{name} ({len(series)})" for name, series in found.items() if series]
    missing = [name for name, series in found.items() if not series]
    return (f"{path}: {', '.join(have) or 'nothing'}"
            + (f"; not found: {', '.join(missing)}" if missing else ""))


def plot(runs: Dict[str, Dict[str, Series]], output: str) -> None:
    try:
        import matplotlib
    except ImportError:
        sys.exit("python -m megatron_ext.plot needs matplotlib: pip install matplotlib "
                 "(or pip install -e '.[plot]')")
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(12, 8))
    panels = [("lm loss", axes[0][0]), ("learning rate", axes[0][1]),
              ("grad norm", axes[1][0]), ("tokens/s", axes[1][1])]
    for index, (label, found) in enumerate(runs.items()):
        color = f"C{index % 10}"
        for name, ax in panels:
            series = found[name]
            if series:
                steps = sorted(series)
                ax.plot(steps, [series[s] for s in steps], color=color, label=label)
        validation = found["validation lm loss"]
        if validation:
            steps = sorted(validation)
            axes[0][0].plot(steps, [validation[s] for s in steps], color=color, linestyle="--",
                            marker="o", markersize=3, label=f"{label} (validation)")
    for name, ax in panels:
        ax.set_title(name)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    figure.tight_layout()
    directory = os.path.dirname(os.path.abspath(output))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(output)}.tmp.png")
    figure.savefig(tmp, dpi=100)
    os.replace(tmp, output)  # a reader never sees half a picture
    plt.close(figure)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_ext.plot",
        description="Draw lm loss (train, validation), learning rate, grad norm and tokens/s of "
                    "one or several runs from console logs or TensorBoard event files.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR_OR_LOG",
                        help="a console log, an events.out.tfevents.* file, or a directory "
                             "holding either (e.g. the --tensorboard-dir)")
    parser.add_argument("-o", "--output", default="curves.png", help="PNG to write")
    args = parser.parse_args(argv)
    runs = {}
    for path in args.runs:
        try:
            found = read_run(path)
        except ValueError as error:
            sys.exit(f"error: {error}")
        print(report(path, found))
        if not any(found.values()):
            sys.exit(f"error: {path}: no lm loss, learning rate, grad norm or tokens/s found; "
                     f"is it a pretrain_gpt.py log or a --tensorboard-dir?")
        runs[path] = found
    plot(runs, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
