"""Files written so that a crash never leaves half of one, and file fingerprints: what every stage uses."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from benchharness.errors import HarnessError


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and a rename.

    On any failure the temporary file is removed and `path` keeps its previous content;
    an OSError (disk full, permissions) becomes one clear HarnessError naming the file.
    """
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        raise HarnessError(f"could not write {path}: {exc.strerror or exc}. Fix: free disk space or choose a writable folder (--output, --cache), then finish the run with --resume.") from exc
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp: str | None) -> None:
    if tmp is not None:
        Path(tmp).unlink(missing_ok=True)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
