"""Where outputs go: the output directory, OS errors that name the path and the way out, and
the temporary files a killed run left.

Outputs are written under temporary names (``PREFIX.bin.tmp-PID-HEX``, see ``indexed.py``) and
renamed when complete; a process killed outright leaves those behind, and the next writer of
the same prefix removes them.
"""

import errno
import glob
import os
import re
import sys

from megatron_ext.data.shard_meta import META_SUFFIX


class OutputError(OSError):
    """An OS error while writing an output, with the path and what to do in its message."""

    def __str__(self) -> str:
        return self.strerror


_WAY_OUT = {
    errno.ENOSPC: "free space there or give an --output-prefix on another file system",
    errno.EDQUOT: "free space there or give an --output-prefix on another file system",
    errno.EACCES: "give an --output-prefix in a directory you can write to",
    errno.EPERM: "give an --output-prefix in a directory you can write to",
    errno.EROFS: "give an --output-prefix on a writable file system",
}


def output_error(error: OSError, path: str) -> OutputError:
    """``error`` (raised writing ``path``) as a message that names the path and the way out."""
    if isinstance(error, OutputError):
        return error
    way_out = _WAY_OUT.get(error.errno, "check the path and the file system")
    return OutputError(error.errno, f"{path}: {error.strerror or error}; {way_out}")


def prepare_output_dir(output_prefix: str) -> None:
    """Create ``output_prefix``'s directory; a component that is a file is named (``makedirs``
    would only say "File exists")."""
    directory = os.path.dirname(output_prefix)
    if not directory:
        return
    path = directory
    while path and not os.path.lexists(path):
        path = os.path.dirname(path)
    if path and not os.path.isdir(path):
        raise OutputError(errno.ENOTDIR, f"--output-prefix {output_prefix}: {path} is a file, "
                          "not a directory; move it away or give another --output-prefix")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise output_error(e, directory) from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


_TEMPORARY = re.compile(r"\.tmp-(\d+)(?:-[0-9a-f]+)?")  # after PREFIX.bin/.idx/.meta.json


def remove_stale_temporaries(path_prefix: str, log=None) -> None:
    """Delete the temporary files a killed run on ``path_prefix`` left (``PREFIX.bin.tmp-PID-X``,
    ``.idx``, ``.meta.json``): only those whose process is gone, so a run writing the same
    prefix now keeps its files. PIDs are this machine's; a run on another host sharing the
    directory would look dead, which is why each removal is reported."""
    for suffix in (".bin", ".idx", META_SUFFIX):
        for path in glob.glob(glob.escape(path_prefix + suffix) + ".tmp-*"):
            match = _TEMPORARY.fullmatch(path[len(path_prefix + suffix):])
            if match is None or _pid_alive(int(match.group(1))):
                continue
            try:
                os.remove(path)
            except FileNotFoundError:
                continue
            print(f"removed {path}: a temporary file of an earlier run (pid {match.group(1)}) "
                  "that did not finish", file=log or sys.stderr)
