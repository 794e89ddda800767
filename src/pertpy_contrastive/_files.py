"""Files written whole or not at all: under a temporary name beside the target, then renamed."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def written_whole(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; move it to ``target`` if the block succeeds.

    A rename within a directory is atomic, so a job killed mid-write leaves at most a hidden
    ``.<name>.partial-<pid><suffix>`` beside the target, never a truncated file under the
    target's name. On an error (or Ctrl-C, or SIGTERM turned into an exception) the temporary
    file or directory is removed, and the target is left as it was.
    """
    target = Path(target)
    temporary = target.with_name(f".{target.stem}.partial-{os.getpid()}{target.suffix}")
    _remove(temporary)
    try:
        yield temporary
        if temporary.is_dir() and target.is_dir():
            # A directory cannot replace a non-empty one in a single rename.
            shutil.rmtree(target)
        temporary.replace(target)
    except BaseException:
        _remove(temporary)
        raise


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
