"""Megatron-LM's (legacy, per-rank) checkpoint layout, shared by training save/load and convert_ckpt.py.

    DIR/latest_checkpointed_iteration.txt          the iteration (or ``release``); written last
    DIR/iter_0000100/mp_rank_00/model_optim_rng.pt       PP = 1  (mp_rank_{tp:02d})
    DIR/iter_0000100/mp_rank_00_000/model_optim_rng.pt   PP > 1  (mp_rank_{tp:02d}_{pp:03d})

A rank file is a ``torch.save``d dict with Megatron's keys: ``args`` (an ``argparse.Namespace``
with the model-defining flags under Megatron-LM's names, see ``args.py``),
``checkpoint_version`` (3.0), ``iteration`` and ``model`` (the rank's GPTModel state dict,
``_extra_state`` entries that are None left out); training adds ``optimizer``, ``rng_state``
and the like. A checkpoint is complete only once the tracker names it: every writer here is
atomic (temp file in the same directory, fsync, ``os.replace``) and the tracker goes last.

Rank files are pickles (as in Megatron-LM, they hold a Namespace and RNG states): load only
checkpoints you trust.
"""

import os
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Union

import torch

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
RANK_FILENAME = "model_optim_rng.pt"
DISTRIB_OPTIM_FILENAME = "distrib_optim.pt"  # beside it, with --use-distributed-optimizer
RELEASE = "release"
CHECKPOINT_VERSION = 3.0

Iteration = Union[int, str]  # an int, or RELEASE


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the run; the message names the file."""


# ---------------------------------------------------------------------------------------------
# Paths and the tracker


def iteration_dir(root, iteration: Iteration) -> Path:
    """``root/iter_{iteration:07d}``, or ``root/release`` for Megatron's release checkpoints."""
    if iteration == RELEASE:
        return Path(root) / RELEASE
    return Path(root) / f"iter_{int(iteration):07d}"


def rank_dir_name(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    if pp_size == 1:
        return f"mp_rank_{tp_rank:02d}"
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def rank_file(root, iteration: Iteration, tp_rank: int, pp_rank: int, pp_size: int) -> Path:
    """The ``model_optim_rng.pt`` of rank (tp_rank, pp_rank) in iteration ``iteration``."""
    return iteration_dir(root, iteration) / rank_dir_name(tp_rank, pp_rank, pp_size) / RANK_FILENAME


def tracker_file(root) -> Path:
    return Path(root) / TRACKER_FILENAME


def read_tracker(root) -> Optional[Iteration]:
    """The iteration the tracker names: an int, ``RELEASE`` ("release") for a Megatron release
    checkpoint, or None when ``root`` has no tracker (no complete checkpoint there)."""
    path = tracker_file(root)
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read checkpoint tracker {path}: {exc}") from exc
    if text == RELEASE:
        return RELEASE
    try:
        iteration = int(text)
    except ValueError:
        raise CheckpointError(
            f"checkpoint tracker {path} is corrupt: expected an iteration number or "
            f"'{RELEASE}', found {text[:40]!r}"
        ) from None
    if iteration < 0:
        raise CheckpointError(f"checkpoint tracker {path} is corrupt: negative iteration {iteration}")
    return iteration


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write) -> None:
    """Call ``write(fileobj)`` on a temp file next to ``path``, fsync, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def write_tracker(root, iteration: Iteration) -> None:
    """Point the tracker at ``iteration`` (atomically). Write it after every rank file."""
    if iteration != RELEASE:
        iteration = int(iteration)
    _atomic_write(tracker_file(root), lambda handle: handle.write(f"{iteration}\n".encode()))


# ---------------------------------------------------------------------------------------------
# Rank files


def save_rank_file(path, payload: dict) -> None:
    """``torch.save(payload)`` to ``path`` atomically (temp name in the same directory)."""
    _atomic_write(Path(path), lambda handle: torch.save(payload, handle))


def load_rank_file(path, *, mmap: bool = True) -> dict:
    """Load a rank file on the CPU. With ``mmap`` (the default) tensors are memory-mapped and
    paged in when used (copy-on-write: changing them never touches the file); pass
    ``mmap=False`` to read everything into memory now. Files from torch < 1.6 (not zip) are read
    without mmap."""
    path = Path(path)
    if not path.is_file():
        hint = "" if path.parent.parent.is_dir() else f" ({path.parent.parent} does not exist)"
        raise CheckpointError(f"checkpoint file {path} is missing{hint}")

    def load(use_mmap):
        return torch.load(path, map_location="cpu", mmap=use_mmap, weights_only=False)

    try:
        try:
            payload = load(mmap)
        except RuntimeError as exc:
            if not mmap or "zipfile" not in str(exc):
                raise
            payload = load(False)  # the legacy (pre-zip) format cannot be mapped
    except Exception as exc:  # truncated zip, bad pickle, I/O error
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(
            f"checkpoint file {path} is truncated or unreadable ({type(exc).__name__}: {first_line})"
        ) from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint file {path} holds a {type(payload).__name__}, not a dict")
    return payload


def model_keys(chunks: int) -> List[str]:
    """Megatron-LM's entries of the model in a checkpoint: ``model``, or with virtual pipeline
    stages (the interleaved schedule) ``model0``, ``model1``, ... one per model chunk."""
    return ["model"] if chunks == 1 else [f"model{i}" for i in range(chunks)]


def model_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The model's state dict as stored in a rank file (None ``_extra_state`` entries dropped)."""
    return {
        name: value for name, value in model.state_dict().items()
        if not (name.endswith("._extra_state") and value is None)
    }


def load_model_state_dict(model: torch.nn.Module, state_dict: Mapping, path,
                          keys: Optional[Callable[[str], bool]] = None) -> None:
    """Load a rank file's ``model`` into ``model`` strictly, naming ``path`` on a mismatch;
    with ``keys``, only the model's entries it accepts are expected (and loaded).

    ``_extra_state`` entries the file leaves out (they were None) are put back as None.
    """
    state_dict = dict(state_dict)
    expected = {name: value for name, value in model.state_dict().items()
                if keys is None or keys(name)}
    for name, value in expected.items():
        if name.endswith("._extra_state") and name not in state_dict and value is None:
            state_dict[name] = None
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(
        f"{name} {tuple(state_dict[name].shape)} vs model {tuple(expected[name].shape)}"
        for name in set(expected) & set(state_dict)
        if torch.is_tensor(expected[name]) and torch.is_tensor(state_dict[name])
        and expected[name].shape != state_dict[name].shape
    )
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append(f"shape mismatch {'; '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}")
        raise CheckpointError(f"checkpoint file {path} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=keys is None)
