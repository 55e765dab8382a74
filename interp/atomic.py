"""Atomic writes that never delete what the toolkit did not write.

One writer for files and one for artefact directories, used by every module that saves (JSON
through `write_json_atomic`, tensors through `write_tensors_atomic`):

- `atomic_file(path)` yields a temporary path beside `path` and renames it onto `path` only when
  the block succeeds, so a reader never sees half a file; `write_json_atomic` is built on it.
- `atomic_dir(path, artefact, overwrite=...)` writes one of the toolkit's artefact directories
  (a model, an SAE). A new path is built in a temporary sibling and renamed into place whole. An
  existing directory is written only if it is empty or is an artefact of the same kind and
  `overwrite=True`; then only the artefact's own files are replaced (each by a rename, the
  manifest last, so a save killed half-way leaves a manifest whose sha256 no longer matches and
  loading refuses it) and every other file in the folder survives. A non-empty folder that is not
  such an artefact, or an existing file, is refused before anything is written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
_TEMP = re.compile(r"^\..+\.tmp$")  # our temporary names: ".NAME.XXXX.tmp" and ".interp-XXXX.tmp"


class DestinationError(ValueError):
    """A save refused because it would replace or mix with files the toolkit did not write."""


@dataclass(frozen=True, kw_only=True)
class Artefact:
    """A kind of directory the toolkit writes: the files it owns there and how to recognise one.

    A directory is such an artefact when its ``manifest.json`` is a JSON object holding
    `manifest_key` and the `marker` file exists. Files named in `files` (or matching `pattern`)
    are the toolkit's; every other file in the directory belongs to the user.
    """

    kind: str
    files: frozenset[str]
    manifest_key: str
    marker: str | None = None
    pattern: str | None = None

    def owns(self, name: str) -> bool:
        return name in self.files or bool(self.pattern and re.fullmatch(self.pattern, name))

    def recognises(self, d: Path) -> bool:
        try:
            manifest = json.loads((d / MANIFEST).read_text())
        except (OSError, ValueError):
            return False
        return (isinstance(manifest, dict) and self.manifest_key in manifest
                and (self.marker is None or (d / self.marker).is_file()))


def _entries(d: Path) -> list[str]:
    """The directory's entries, without the temporaries of a killed toolkit write."""
    return sorted(n for n in os.listdir(d) if not _TEMP.match(n))


def check_destination(path: str | Path, artefact: Artefact, *, overwrite: bool = False) -> Path:
    """The absolute destination for saving `artefact` to `path`, or `DestinationError`; writes nothing.

    Accepted: a new path (its parents are created), an empty directory (``"."`` included), or an
    existing artefact of the same kind with `overwrite=True`.
    """
    p = Path(os.path.abspath(path))
    what = f"{artefact.kind} destination {str(path)!r}"
    for up in (p, *p.parents):
        if up.exists():
            if not up.is_dir():
                got = "an existing file" if up == p else f"a path under the file {up}"
                raise DestinationError(f"{what}: expected a directory (new, empty, or an interp {artefact.kind} "
                                       f"to overwrite), got {got}; choose another path (nothing was written)")
            break
    if not p.is_dir():
        return p
    entries = _entries(p)
    if not entries:
        return p
    if not artefact.recognises(p):
        shown = entries[:6] + (["..."] if len(entries) > 6 else [])
        raise DestinationError(
            f"{what}: expected a new or empty directory, or an interp {artefact.kind} directory, got a "
            f"non-empty directory that is not one (holds {shown}); choose a new path: the toolkit never "
            f"replaces or deletes files it did not write (nothing was written)")
    if not overwrite:
        raise DestinationError(
            f"{what}: expected a new or empty directory, got an existing interp {artefact.kind}; pass "
            f"overwrite=True to replace its files (other files in the folder are kept), or choose a new "
            f"path (nothing was written)")
    return p


@contextmanager
def atomic_dir(path: str | Path, artefact: Artefact, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory; on success its files become the artefact at `path`.

    See the module docstring for what is accepted and what is replaced. The destination is
    checked before the block runs, so a refused save costs no work.
    """
    p = check_destination(path, artefact, overwrite=overwrite)
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp"))
        try:
            yield tmp
            tmp.rename(p)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return
    for leftover in os.listdir(p):  # a killed earlier save's temporaries: ours, never listed
        if _TEMP.match(leftover) and leftover.startswith(".interp-"):
            shutil.rmtree(p / leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=p, prefix=".interp-", suffix=".tmp"))
    try:
        yield tmp
        written = sorted(os.listdir(tmp), key=lambda n: n == MANIFEST)  # the manifest last
        foreign = [n for n in written if not artefact.owns(n) or not (tmp / n).is_file()]
        if foreign:
            raise RuntimeError(f"{artefact.kind} save: expected only its own files {sorted(artefact.files)}, "
                               f"got {foreign} (a bug in the writer; nothing was replaced)")
        for n in written[:-1]:
            os.replace(tmp / n, p / n)
        for n in os.listdir(p):  # own files this save did not write again (an old tokenizer.json)
            if artefact.owns(n) and n not in written and (p / n).is_file():
                (p / n).unlink()
        if written:
            os.replace(tmp / written[-1], p / written[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds it is renamed onto `path`.

    The parent directory is created. On failure the temporary file is removed and `path` is
    untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to `path` via a temp file and rename, so readers never see half a file."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_tensors_atomic(path: str | Path, tensors: Mapping[str, Any]) -> None:
    """Write tensors as one safetensors file via a temp file and rename (copied to the CPU first)."""
    from safetensors.torch import save_file  # torch stays out of this module's import

    with atomic_file(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
