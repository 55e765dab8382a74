"""Sharded on-disk activation stores: safetensors shards plus a JSON manifest.

Layout of a store directory::

    manifest.json          model, hooks (per-row shape, dtype), positions, shards (rows, bytes, sha256)
    shard_00000.safetensors one tensor per hook [rows, n_pos, ...] plus "__lengths__" [rows]

Writes are atomic: a shard is written to a temp file and renamed, then the manifest is rewritten
the same way, so a store killed at any moment holds only whole shards and a manifest that lists
exactly them. Reopening resumes after the last listed shard: no duplicated and no lost rows.

A store is identified by what determines its content, never by a model's name: the build's
`meta` (for `interp.cache.collect`: a fingerprint of the weights and of the config, the hooks,
positions and storage dtype) and a digest of the tokens of every row written (right-padded
tokens and lengths: the layout rows are computed and stored in). Resuming with any of these
different is refused with the field that differs; `overwrite=True` replaces the store (only
its own files), and a folder that is not a store is never written into.

Reading is lazy: `safe_open` memory-maps each shard and only the rows asked for are read. On
open every shard is checked against the manifest (presence, byte size, readable header, and by
default its sha256), so a truncated or corrupted shard is an error, never silent garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from safetensors import safe_open
from torch import Tensor

from interp.atomic import Artefact, atomic_file, check_destination, write_json_atomic
from interp.models import sha256_file

MANIFEST = "manifest.json"
LENGTHS = "__lengths__"
FORMAT_VERSION = 1
STORE_DIR = Artefact(kind="activation store", files=frozenset({MANIFEST}), manifest_key="shards",
                     pattern=r"shard_\d{5}\.safetensors")
INFO_KEYS = frozenset({"model"})  # descriptive meta, not compared on resume


class StoreError(RuntimeError):
    """A store on disk that does not match its manifest or the requested build."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class ShardInfo:
    file: str
    start: int
    rows: int
    bytes: int
    sha256: str


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
              torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(path: str | Path, tensors: Mapping[str, Tensor]) -> None:
    """Write a safetensors file streaming each tensor's bytes (no serialised copy in memory)."""
    header: dict[str, Any] = {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise StoreError(f"store tensor {name}: expected one of {list(_ST_DTYPES)}, got {t.dtype}")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors.values():
            if t.numel():
                f.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())


class RowDigest:
    """A running sha256 of token rows: the same digest however the rows are split into batches."""

    def __init__(self) -> None:
        self._tokens = hashlib.sha256()
        self._shape = hashlib.sha256()
        self.rows = 0

    def update(self, tokens: Int[Tensor, "batch pos"], lengths: Int[Tensor, "batch"]) -> None:
        t = tokens.detach().to("cpu", torch.int64).contiguous()
        shape = torch.stack([torch.full_like(lengths.cpu(), t.shape[1]), lengths.cpu()], 1).to(torch.int64)
        self._tokens.update(t.numpy().tobytes())
        self._shape.update(shape.contiguous().numpy().tobytes())
        self.rows += t.shape[0]

    def hexdigest(self) -> str:
        return hashlib.sha256(self._tokens.digest() + self._shape.digest()).hexdigest()


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


class StoreWriter:
    """Appends rows to a store directory shard by shard; resumes an interrupted build.

    Rows are copied into one preallocated buffer per hook (about `shard_bytes` in all) and each
    full buffer is streamed to disk, so memory stays at one shard plus the caller's batch.
    Shards end on batch boundaries, so a resumed build sees exactly the batches of an
    uninterrupted one. The caller passes the rows already on disk to `check_rows` (their tokens
    must match the store's digest) and the new ones to `append`.
    """

    def __init__(self, path: str | Path, meta: Mapping[str, Any], *, shard_bytes: int = 64 << 20,
                 resume: bool = True, overwrite: bool = False) -> None:
        self.path = check_destination(path, STORE_DIR, overwrite=True)  # an existing store resumes below
        self.shard_bytes = int(shard_bytes)
        self.path.mkdir(parents=True, exist_ok=True)
        for leftover in self.path.glob(".*.tmp"):
            target = re.fullmatch(r"\.(.+)\.\w+\.tmp", leftover.name)
            if target and STORE_DIR.owns(target[1]):
                leftover.unlink()  # a temp file from a killed write of ours: never listed, safe to drop
        mf = self.path / MANIFEST
        if mf.exists() and overwrite:
            for f in self.path.iterdir():
                if STORE_DIR.owns(f.name) and f.is_file():
                    f.unlink()
        if mf.exists():
            existing = _read_manifest(self.path)
            if not resume:
                raise StoreError(f"store {self.path}: expected an empty directory (resume=False), "
                                 f"got an existing store with {existing['n_rows']} rows; pass overwrite=True "
                                 f"to replace it")
            mismatched = [k for k in meta if k not in INFO_KEYS and existing["meta"].get(k) != meta[k]]
            if mismatched:
                raise StoreError(
                    f"store {self.path}: expected the same build to resume, got different "
                    + ", ".join(f"{k} ({_short(existing['meta'].get(k))} on disk vs {_short(meta[k])})"
                                for k in mismatched)
                    + "; use a new directory, or pass overwrite=True to replace this store"
                )
            _check_shards(self.path, existing, verify=True)
            self.manifest = existing
        else:
            self.manifest = {"version": FORMAT_VERSION, "meta": dict(meta), "shards": [], "n_rows": 0,
                             "complete": False, "hooks": {}, "tokens": RowDigest().hexdigest()}
            write_json_atomic(mf, self.manifest)
        self._digest = RowDigest()
        self._buf: dict[str, Tensor] = {}
        self._fill = 0

    def check_rows(self, tokens: Int[Tensor, "batch pos"], lengths: Int[Tensor, "batch"]) -> None:
        """Account for rows already on disk (right-padded); refuse tokens the store was not built from."""
        if self._digest.rows + tokens.shape[0] > self.rows_done:
            raise StoreError(f"store {self.path}: expected at most the {self.rows_done} rows it holds before "
                             f"new ones, got more (a bug in the caller)")
        self._digest.update(tokens, lengths)
        if self._digest.rows == self.rows_done:
            self._check_tokens()

    def more_rows_error(self) -> StoreError:
        return StoreError(f"store {self.path}: expected the same build, got more rows of data than the "
                          f"{self.rows_done} of the complete store; use a new directory, or pass "
                          f"overwrite=True to replace this store")

    def _check_tokens(self) -> None:
        want, got = self.manifest.get("tokens"), self._digest.hexdigest()
        if want != got:
            raise StoreError(
                f"store {self.path}: expected the same build to resume, got different tokens (sha256 "
                f"{_short(want)} of its first {self.rows_done} rows on disk vs {_short(got)} given); use a "
                f"new directory, or pass overwrite=True to replace this store")

    @property
    def rows_done(self) -> int:
        """Rows safely on disk (buffered rows are not counted)."""
        return int(self.manifest["n_rows"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    def _allocate(self, acts: Mapping[str, Tensor]) -> None:
        rows = next(iter(acts.values())).shape[0]
        row_bytes = sum(t[0].numel() * t.element_size() for t in acts.values())
        capacity = max(rows, self.shard_bytes // max(row_bytes, 1) // rows * rows)
        self._buf = {k: torch.empty((capacity, *t.shape[1:]), dtype=t.dtype) for k, t in acts.items()}

    def append(self, acts: Mapping[str, Tensor], lengths: Int[Tensor, "batch"], *,
               tokens: Int[Tensor, "batch pos"]) -> None:
        """Copy one batch of rows (and the right-padded tokens they came from) into the shard buffer.

        The shard is written when the buffer is full.
        """
        if self.complete:
            raise self.more_rows_error()
        if self._digest.rows < self.rows_done:
            raise StoreError(f"store {self.path}: expected its {self.rows_done} rows on disk passed to "
                             f"check_rows before new ones, got {self._digest.rows} (a bug in the caller)")
        rows = lengths.shape[0]
        acts = {**acts, LENGTHS: lengths}
        for name, t in acts.items():
            if t.shape[0] != rows:
                raise StoreError(f"store append {name}: expected {rows} rows, got {t.shape[0]}")
        known = self.manifest["hooks"]
        for name, t in acts.items():
            want = known.get(name) or ({"shape": list(self._buf[name].shape[1:])} if name in self._buf else None)
            if name != LENGTHS and want is not None and list(t.shape[1:]) != list(want["shape"]):
                raise StoreError(f"store append {name}: expected rows of shape {tuple(want['shape'])}, got "
                                 f"{tuple(t.shape[1:])}; a store needs one width for all prompts "
                                 f"(pass an interp.tokens.Batch to pad them)")
        if self._buf and self._fill + rows > next(iter(self._buf.values())).shape[0]:
            self.flush()
        if not self._buf:
            self._allocate(acts)
        for name, t in acts.items():
            self._buf[name][self._fill: self._fill + rows] = t.detach()
        self._fill += rows
        self._digest.update(tokens, lengths)

    def flush(self) -> None:
        """Write the buffered rows as one shard (temp file + rename), then the manifest."""
        if not self._fill:
            return
        tensors = {k: v[: self._fill] for k, v in self._buf.items()}
        idx = len(self.manifest["shards"])
        fname = f"shard_{idx:05d}.safetensors"
        with atomic_file(self.path / fname) as tmp:
            write_safetensors(tmp, tensors)
            info = ShardInfo(fname, self.rows_done, self._fill, os.path.getsize(tmp), sha256_file(tmp))
        for k, t in tensors.items():
            if k != LENGTHS:
                self.manifest["hooks"][k] = {"shape": list(t.shape[1:]), "dtype": _dtype_name(t.dtype)}
        self.manifest["shards"].append(info.__dict__)
        self.manifest["n_rows"] = self.rows_done + self._fill
        self.manifest["tokens"] = self._digest.hexdigest()  # every buffered row is in this shard
        write_json_atomic(self.path / MANIFEST, self.manifest)
        self._fill = 0

    def close(self) -> Store:
        """Flush, mark the store complete and reopen it for reading.

        Refuses (before marking it complete) data with fewer rows than the store already holds.
        """
        if self._digest.rows < self.rows_done:
            raise StoreError(f"store {self.path}: expected the same build, got {self._digest.rows} rows of data "
                             f"for a store holding {self.rows_done}; use a new directory, or pass "
                             f"overwrite=True to replace this store")
        self.flush()
        self._buf = {}
        self.manifest["complete"] = True
        write_json_atomic(self.path / MANIFEST, self.manifest)
        return open_store(self.path, verify=False)


def _read_manifest(path: Path) -> dict[str, Any]:
    mf = path / MANIFEST
    if not mf.is_file():
        raise StoreError(f"store {path}: expected {MANIFEST}, got no such file (not a store directory?)")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"store manifest {mf}: expected JSON, got a parse error: {e}") from e
    if manifest.get("version") != FORMAT_VERSION:
        raise StoreError(f"store {path}: expected format version {FORMAT_VERSION}, got {manifest.get('version')}")
    return manifest


def _check_shards(path: Path, manifest: Mapping[str, Any], verify: bool) -> None:
    for s in manifest["shards"]:
        f = path / s["file"]
        if not f.is_file():
            raise StoreError(f"store shard {f}: expected it (listed in {MANIFEST}), got no such file")
        size = f.stat().st_size
        if size != s["bytes"]:
            raise StoreError(f"store shard {f}: expected {s['bytes']} bytes, got {size} (truncated or "
                             f"overwritten); delete the store and rebuild it")
        try:
            with safe_open(str(f), framework="pt") as h:
                keys = set(h.keys())
        except Exception as e:
            raise StoreError(f"store shard {f}: expected a readable safetensors file, got {e}") from e
        if LENGTHS not in keys:
            raise StoreError(f"store shard {f}: expected a {LENGTHS} tensor, got keys {sorted(keys)}")
        if verify:
            digest = sha256_file(f)
            if digest != s["sha256"]:
                raise StoreError(f"store shard {f}: expected sha256 {s['sha256']}, got {digest} (corrupted)")


class Store:
    """A read-only, lazily loaded view of a store directory (see `open_store`)."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self._shards = [ShardInfo(**s) for s in manifest["shards"]]

    @property
    def hook_names(self) -> list[str]:
        return list(self.manifest["hooks"])

    @property
    def n_examples(self) -> int:
        return int(self.manifest["n_rows"])

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.manifest["meta"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def lengths(self) -> Tensor:
        return self.rows(LENGTHS, 0, self.n_examples)

    def _key(self, key: str | tuple[str, int]) -> str:
        if isinstance(key, tuple):
            from interp.tl import get_act_name

            key = get_act_name(*key)
        if key not in self.manifest["hooks"] and key != LENGTHS:
            import difflib

            close = difflib.get_close_matches(str(key), self.hook_names, n=3)
            raise KeyError(f"store {self.path}: expected one of the stored hooks {self.hook_names}, got "
                           f"{key!r}" + (f"; did you mean {close}?" if close else ""))
        return key

    def rows(self, key: str | tuple[str, int], start: int, stop: int) -> Tensor:
        """Rows [start, stop) of one hook, reading only the shards that hold them."""
        name = self._key(key)
        if not 0 <= start <= stop <= self.n_examples:
            raise IndexError(f"store rows: expected 0 <= start <= stop <= {self.n_examples}, got [{start}, {stop})")
        parts = []
        for s in self._shards:
            lo, hi = max(start, s.start), min(stop, s.start + s.rows)
            if lo >= hi:
                continue
            with safe_open(str(self.path / s.file), framework="pt") as h:
                parts.append(h.get_slice(name)[lo - s.start: hi - s.start])
        if not parts:
            info = self.manifest["hooks"].get(name)
            shape = info["shape"] if info else []
            dtype = getattr(torch, info["dtype"]) if info else torch.long
            return torch.empty((0, *shape), dtype=dtype)
        return torch.cat(parts)

    def __getitem__(self, key: str | tuple[str, int]) -> Tensor:
        return self.rows(key, 0, self.n_examples)

    def __contains__(self, key: object) -> bool:
        return key in self.manifest["hooks"]

    def __len__(self) -> int:
        return self.n_examples

    def iter_batches(self, key: str | tuple[str, int], batch_size: int, *, shuffle: bool = False,
                     seed: int = 0) -> Iterator[Tensor]:
        """Batches of rows, reading shard by shard (memory bounded by a shard plus a batch).

        With `shuffle`, shard order and rows within each shard are permuted (seeded).
        """
        name = self._key(key)
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self._shards), generator=g).tolist() if shuffle else range(len(self._shards))
        carry: Tensor | None = None
        for i in order:
            s = self._shards[i]
            with safe_open(str(self.path / s.file), framework="pt") as h:
                block = h.get_tensor(name)
            if shuffle:
                block = block[torch.randperm(block.shape[0], generator=g)]
            if carry is not None:
                block = torch.cat([carry, block])
            n_full = block.shape[0] // batch_size * batch_size
            for j in range(0, n_full, batch_size):
                yield block[j: j + batch_size]
            carry = block[n_full:] if n_full < block.shape[0] else None
        if carry is not None and carry.shape[0]:
            yield carry

    def verify(self) -> None:
        """Hash every shard against the manifest."""
        _check_shards(self.path, self.manifest, verify=True)

    def __repr__(self) -> str:
        return f"Store({self.path}, rows={self.n_examples}, hooks={self.hook_names}, complete={self.complete})"


def open_store(path: str | Path, *, verify: bool = True) -> Store:
    """Open a store directory lazily, checking every shard (sha256 too unless `verify=False`)."""
    p = Path(path)
    manifest = _read_manifest(p)
    _check_shards(p, manifest, verify=verify)
    return Store(p, manifest)
