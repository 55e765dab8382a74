"""Load and save SAEs: sae-lens's on-disk format, pretrained releases, and the shipped ones.

A saved SAE directory is exactly sae-lens's format (``cfg.json`` + ``sae_weights.safetensors``,
readable by ``sae_lens.SAE.load_from_disk``) plus a toolkit ``manifest.json`` holding training
facts, evaluation numbers, the sha256 of the weights (checked on load) and ``model_weights``, the
fingerprint of the model the SAE was trained on (`interp.models.weights_fingerprint`). `load`
puts that fingerprint into ``sae.cfg.metadata.model_weights``, so every call that uses the SAE with
a model checks it (`interp.sae.checks.check_sae`).

``load("sae:NAME")`` reads ``data/sae/NAME``; ``load(path)`` a local directory;
``load(release, sae_id=...)`` a sae-lens pretrained release from the Hugging Face hub. With no
network and no local copy, loading a release fails at once with a message saying how to get the
weights, never a hang.
"""

from __future__ import annotations

import difflib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME

from interp.atomic import Artefact, atomic_dir, write_json_atomic
from interp.models import MANIFEST, data_dir, hub_reachable, sha256_file

log = logging.getLogger(__name__)

SAE_PREFIX = "sae:"


class SAELoadError(RuntimeError):
    """An SAE could not be loaded; the message says why and how to fix it."""


def saes_dir() -> Path:
    """Where shipped SAEs live: $INTERP_DATA/sae or the repo's data/sae."""
    return data_dir() / "sae"


def list_saes() -> list[str]:
    root = saes_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / SAE_WEIGHTS_FILENAME).is_file())


SAE_DIR = Artefact(kind="SAE", files=frozenset({SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, MANIFEST,
                                                  "sparsity.safetensors"}),
                   manifest_key="sha256", marker=SAE_WEIGHTS_FILENAME)


def save(sae: SAE, path: str | Path, *, manifest: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write `sae` in sae-lens's on-disk format plus a manifest (with sha256), atomically.

    `path` must be new, an empty directory, or (with `overwrite=True`) an SAE directory written
    here before; only the SAE's own files are replaced, any other file in the folder is kept.
    """
    path = Path(path)
    with atomic_dir(path, SAE_DIR, overwrite=overwrite) as tmp:
        sae.save_model(tmp)
        facts = dict(manifest or {})
        facts["sha256"] = sha256_file(tmp / SAE_WEIGHTS_FILENAME)
        facts.setdefault("architecture", sae.cfg.architecture())
        facts.setdefault("d_in", sae.cfg.d_in)
        facts.setdefault("d_sae", sae.cfg.d_sae)
        facts.setdefault("hook_name", sae.cfg.metadata.hook_name)
        facts.setdefault("model_weights", sae.cfg.metadata.get("model_weights"))
        write_json_atomic(tmp / MANIFEST, facts)
    return path


def read_manifest(spec: str | Path) -> dict[str, Any]:
    """The toolkit manifest of a saved SAE directory or ``sae:NAME``."""
    f = _resolve(str(spec)) / MANIFEST
    if not f.is_file():
        raise SAELoadError(f"SAE manifest: expected {f}, got no such file")
    return json.loads(f.read_text())


def _resolve(spec: str) -> Path:
    if spec.startswith(SAE_PREFIX):
        name = spec.removeprefix(SAE_PREFIX)
        d = saes_dir() / name
        if not (d / SAE_WEIGHTS_FILENAME).is_file():
            have = list_saes()
            close = difflib.get_close_matches(name, have, n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise SAELoadError(f"SAE {name!r}: expected one of the shipped SAEs {have} in {saes_dir()}, got "
                               f"none{hint} (retrain it with `interp sae train`)")
        return d
    return Path(spec)


def load(spec: str | Path, *, sae_id: str | None = None, device: str | torch.device | None = None,
         dtype: torch.dtype | None = None, verify: bool = True) -> SAE:
    """An inference SAE from ``sae:NAME``, a local sae-lens directory, or a pretrained release.

    For a release, pass its sae-lens name and `sae_id` (e.g. ``load("gpt2-small-res-jb",
    sae_id="blocks.7.hook_resid_pre")``).
    """
    s = str(spec)
    dtype_str = str(dtype).removeprefix("torch.") if dtype is not None else None
    if sae_id is None:
        d = _resolve(s)
        if not d.is_dir():
            raise SAELoadError(f"SAE {s!r}: expected 'sae:NAME', a directory in sae-lens format ({SAE_CFG_FILENAME} + "
                               f"{SAE_WEIGHTS_FILENAME}), or a release name with sae_id=...; got no such directory")
        missing = [n for n in (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME) if not (d / n).is_file()]
        if missing:
            raise SAELoadError(f"SAE directory {d}: expected {SAE_CFG_FILENAME} and {SAE_WEIGHTS_FILENAME} "
                               f"(sae-lens format), missing {missing}")
        manifest = json.loads((d / MANIFEST).read_text()) if (d / MANIFEST).is_file() else {}
        if verify and manifest:
            want = manifest.get("sha256")
            got = sha256_file(d / SAE_WEIGHTS_FILENAME)
            if want is not None and want != got:
                raise SAELoadError(f"SAE weights {d / SAE_WEIGHTS_FILENAME}: expected sha256 {want} (from "
                                   f"{MANIFEST}), got {got}; the weights are corrupted or were replaced — "
                                   f"restore or retrain them")
        try:
            sae = SAE.load_from_disk(d, device=str(device or "cpu"), dtype=dtype_str)
        except Exception as e:
            raise SAELoadError(f"SAE directory {d}: loading failed: {type(e).__name__}: {e}") from e
        if manifest.get("model_weights") and "model_weights" not in sae.cfg.metadata:
            sae.cfg.metadata.model_weights = manifest["model_weights"]  # the model it was trained on
        return sae.eval()
    return _load_release(s, sae_id, device=str(device or "cpu"), dtype=dtype_str or "float32")


def _load_release(release: str, sae_id: str, *, device: str, dtype: str) -> SAE:
    from huggingface_hub import try_to_load_from_cache
    from sae_lens.loading.pretrained_saes_directory import (
        get_pretrained_saes_directory,
        get_repo_id_and_folder_name,
    )

    directory = get_pretrained_saes_directory()
    if release not in directory and "/" not in release:
        close = difflib.get_close_matches(release, list(directory), n=4)
        hint = f"; did you mean {close}?" if close else ""
        raise SAELoadError(f"SAE release {release!r}: expected a sae-lens release name or a hub repo id, "
                           f"got neither{hint}")
    if release in directory and sae_id not in directory[release].saes_map:
        ids = list(directory[release].saes_map)
        close = difflib.get_close_matches(sae_id, ids, n=4)
        raise SAELoadError(f"SAE id {sae_id!r}: expected one of release {release!r}'s {len(ids)} ids "
                           f"(e.g. {ids[:3]}), got an unknown id" + (f"; did you mean {close}?" if close else ""))
    repo_id, folder = get_repo_id_and_folder_name(release, sae_id)
    cached = any(isinstance(try_to_load_from_cache(repo_id, f"{folder}/{name}".lstrip("/")), str)
                 for name in (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, "params.npz"))
    if not cached and not hub_reachable():
        raise SAELoadError(
            f"SAE {release}/{sae_id} ({repo_id}): expected its weights in the local Hugging Face cache or a "
            f"reachable hub, got neither (offline). Download it on a connected machine "
            f"(`huggingface-cli download {repo_id} --include '{folder}/*'`) and copy the cache here, or save it "
            f"once with interp.sae.save and load that directory."
        )
    try:
        sae = SAE.from_pretrained(release, sae_id, device=device, dtype=dtype)
    except (OSError, ValueError) as e:
        raise SAELoadError(f"SAE {release}/{sae_id}: loading from the hub failed: {e}") from e
    return sae.eval()
