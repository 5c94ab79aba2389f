"""Where an actor's output goes: a file of its own in the run directory, not the user's console.

vLLM, DeepSpeed, PyTorch's C++ core and Hugging Face print warnings and progress bars a user cannot act on
(tcmalloc not preloaded, Triton missing, NUMA binding, shard loading). Inside an actor of a run, everything the
process prints from then on goes to `<run>/logs/<pool>-<index>.log`; the console, where Ray streams the actor's
original output, keeps only this project's warnings and any library's errors. Exceptions still reach the driver
through Ray. On a cluster without a shared filesystem the file is written on the node that ran the actor.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


class _WorthShowing(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or (record.name.startswith("ebft") and record.levelno >= logging.WARNING)


def send_output_to(log_file: str | os.PathLike | None) -> None:
    """Point this process's stdout and stderr (file descriptors 1 and 2, so C++ output too) at `log_file`,
    appending; None leaves the output where it is (an engine built in the user's own process)."""
    if log_file is None:
        return
    path = Path(log_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    console = os.fdopen(os.dup(2), "w", buffering=1)
    sys.stdout.flush()
    sys.stderr.flush()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    os.close(descriptor)
    shown = logging.StreamHandler(console)
    shown.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    shown.addFilter(_WorthShowing())
    logging.getLogger().addHandler(shown)
