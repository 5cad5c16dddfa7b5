"""Files: a file or a whole directory appears complete or not at all; JSON read with one-line errors."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

STAGING_TAG = ".tmp-"  # a staged directory is built in `.{name}.tmp-XXXX` beside its destination


def _umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """An open temporary file beside `path` ("w" text as UTF-8, or "wb"); when the block succeeds
    it is synced to disk and renamed onto `path`, on any error it is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes the file private; the result gets the usual mode
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())  # the rename must not reach the disk before the data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` via a temporary file, so readers never see half of it."""
    with atomic_file(path) as fh:
        fh.write(text)


def read_json(path: str | Path, label: str | None = None) -> Any:
    """The JSON value in `path`; malformed JSON is a ValueError naming `label` (default: the path)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{label or path}: not valid JSON ({exc})") from None


def read_text(path: str | Path, errors: str = "strict") -> str:
    """A UTF-8 text file's contents, decompressed first when its name ends in `.gz`; `errors` as
    in bytes.decode ("replace" for a file whose last line an interrupted writer may have cut)."""
    data = Path(path).read_bytes()
    if Path(path).suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{path}: not a readable gzip file ({exc})") from None
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}); a gzipped file needs a .gz name") from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def refuse_overwrite(out: str | Path, overwrite: bool, flag: str) -> None:
    """ValueError when the output directory `out` is a file, or is not empty and the CLI's `flag`
    (which sets `overwrite`) was not given."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out}: exists and is not empty (pass {flag} to replace it)")


def replace_dir(tmp: Path, path: Path) -> None:
    """Swap a finished temporary directory into place; the old one is removed only afterwards."""
    if not path.exists():
        os.replace(tmp, path)
        return
    # A fresh holder per swap: a fixed name could meet one a killed process left behind.
    holder = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
    os.replace(path, holder / "prev")
    os.replace(tmp, path)
    shutil.rmtree(holder, ignore_errors=True)


@contextmanager
def staged_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory in a temporary sibling and swap it into `path` when the block succeeds
    (what was at `path` stays there until the swap); on any error the temporary is removed and
    `path` is left as it was. A location that cannot be written is a ValueError."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}{STAGING_TAG}"))
    except OSError as exc:
        raise ValueError(f"{path}: cannot write there ({exc.strerror})") from None
    try:
        yield tmp
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a published directory gets the usual mode
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_staging(parent: Path, names: str = "*") -> None:
    """Remove what killed `staged_dir` blocks left in `parent` for destinations matching `names`."""
    for tmp in parent.glob(f".{names}{STAGING_TAG}*"):
        shutil.rmtree(tmp, ignore_errors=True)


def cache_root() -> Path:
    """$DIFFCODER_HOME, else $XDG_CACHE_HOME/diffcoder, else ~/.cache/diffcoder."""
    if os.environ.get("DIFFCODER_HOME"):
        return Path(os.environ["DIFFCODER_HOME"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "diffcoder"
