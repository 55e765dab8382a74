"""Route every TransformerLens import of interp/, probes/, tests/ and bench/ through `interp.tl`.

A mechanical, idempotent rewrite (re-run it after a merge brings new imports):

    python tools/rewrite_tl_imports.py            # rewrite in place, list the files changed
    python tools/rewrite_tl_imports.py --check    # exit 1 if anything is left to rewrite

Then `ruff check --fix interp probes tests bench` re-sorts the import blocks (and drops imports
the edits left unused).

Besides the imports, four exact edits in interp/models.py give it the TL 4 path (HookedTransformer
checkpoints on TL's native TransformerBridge): `HookedTransformer(cfg)` -> `tl.build_model(cfg)`,
the config field list and unknown-key check from `interp.tl`, `random_like` without
`dataclasses.replace`, and the weights through `tl.load_weights`. An edit whose source line is not
found (the file changed) is reported, to be made by hand.
Left alone: interp/tl.py itself, and imports of TL-4-only names inside tests that check TL 4
(`transformer_lens.utilities.tl_checkpoint_conversion`).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOTS = ("interp", "probes", "tests", "bench")
SKIP = {Path("interp/tl.py"), Path("tools/rewrite_tl_imports.py")}

# (pattern, replacement), applied in order to each line (multi-line patterns carry re.M / re.S)
RULES: list[tuple[re.Pattern[str], str]] = [
    # the TL 3 model and config (TL 4: stand-ins, see interp.tl)
    (re.compile(r"^(\s*)from transformer_lens import (HookedTransformer(?:, HookedTransformerConfig)?|"
                r"HookedTransformerConfig)[ \t]*$", re.M), r"\1from interp.tl import \2"),
    (re.compile(r"^(\s*)from transformer_lens import (ActivationCache|HookedRootModule|TransformerBridgeConfig)[ \t]*$",
                re.M), r"\1from interp.tl import \2"),
    (re.compile(r"^(\s*)from transformer_lens\.hook_points import (HookPoint|HookedRootModule)[ \t]*$", re.M),
     r"\1from interp.tl import \2"),
    (re.compile(r"^(\s*)from transformer_lens\.model_bridge import TransformerBridge[ \t]*$", re.M),
     r"\1from interp.tl import TransformerBridge"),
    # utilities (transformer_lens.utils is gone in TL 4)
    (re.compile(r"^(\s*)from transformer_lens\.(?:utilities|utils) import get_act_name[ \t]*$", re.M),
     r"\1from interp.tl import get_act_name"),
    (re.compile(r"^(\s*)from transformer_lens\.utilities\.attention import simple_attn_linear[ \t]*$", re.M),
     r"\1from interp.tl import simple_attn_linear"),
    (re.compile(r"^(\s*)from transformer_lens\.utilities\.activation_functions import apply_softcap[ \t]*$", re.M),
     r"\1from interp.tl import apply_softcap"),
    (re.compile(r"^(\s*)from transformer_lens import patching as (\w+)[ \t]*$", re.M),
     r"\1from interp.tl import patching as \2"),
    # the K/V cache (TL 3.x spelled it by module path; TL 4 also at the top level)
    (re.compile(r"^(\s*)try:[^\n]*\n\s*from transformer_lens\.cache\.key_value_cache import "
                r"TransformerLensKeyValueCache as KVCache\n\s*except ImportError:[^\n]*\n\s*from "
                r"transformer_lens\.past_key_value_caching import [^\n]*\n", re.M),
     r"\1from interp.tl import KVCache\n"),
    (re.compile(r"^(\s*)from transformer_lens\.cache\.key_value_cache import TransformerLensKeyValueCache as (\w+)[ \t]*$",
                re.M), r"\1from interp.tl import KVCache as \2"),
    (re.compile(r"^(\s*)from transformer_lens\.cache\.key_value_cache import TransformerLensKeyValueCache[ \t]*$", re.M),
     r"\1from interp.tl import KVCache as TransformerLensKeyValueCache"),
    (re.compile(r"^(\s*)from transformer_lens\.cache\.key_value_cache_entry import "
                r"TransformerLensKeyValueCacheEntry[ \t]*$", re.M),
     r"\1from interp.tl import KVCacheEntry as TransformerLensKeyValueCacheEntry"),
    # pretrained names (loading_from_pretrained is gone in TL 4)
    (re.compile(r"^(\s*)from transformer_lens\.loading_from_pretrained import get_official_model_name[ \t]*$", re.M),
     r"\1from interp.tl import official_model_name as get_official_model_name"),
    (re.compile(r"^(\s*)from transformer_lens\.loading_from_pretrained import OFFICIAL_MODEL_NAMES[ \t]*$", re.M),
     r"\1from interp.tl import OFFICIAL_MODEL_NAMES"),
    (re.compile(r"^(\s*)from transformer_lens import loading_from_pretrained as (\w+)[ \t]*$", re.M),
     r"\1from interp.tl import loading_from_pretrained as \2"),
]

# exact (old, new) edits of interp/models.py: the TL 4 path of new_model / random_like / configs / load_local
MODEL_EDITS: list[tuple[str, str]] = [
    ("        model = HookedTransformer(cfg)\n", "        model = tl.build_model(cfg)\n"),
    ("    return new_model(dataclasses.replace(model.cfg, seed=10_000 + seed))\n",
     "    if not tl.HAS_HOOKED_TRANSFORMER:  # TL 4: a bridge config is rebuilt from its fields\n"
     "        return new_model(config_to_dict(model.cfg) | {\"seed\": 10_000 + seed})\n"
     "    return new_model(dataclasses.replace(model.cfg, seed=10_000 + seed))\n"),
    ("    for f in dataclasses.fields(cfg):\n        if not f.init or f.name == \"device\":\n            continue\n"
     "        value = getattr(cfg, f.name)\n",
     "    for name, value in tl.config_fields(cfg).items():\n        if name == \"device\":\n            continue\n"),
    ("        out[f.name] = value\n", "        out[name] = value\n"),
    ("    unknown = unknown_keys(HookedTransformerConfig, d)\n", "    unknown = tl.unknown_config_keys(d)\n"),
    ("        missing_keys, unexpected = _st_load_model(model, str(d / WEIGHTS), strict=False,\n"
     "                                                  device=str(cfg.device or \"cpu\"))\n",
     "        missing_keys, unexpected = tl.load_weights(model, d / WEIGHTS, device=cfg.device)\n"),
    ("from interp.tl import HookedTransformer, HookedTransformerConfig\n",
     "from interp import tl\nfrom interp.tl import HookedTransformer, HookedTransformerConfig\n"),
]
MODELS = Path("interp/models.py")

# after the merge with the Bridge adapter (branch anycore): on TL 4 the organisms are *native* bridges
# (no Hugging Face model): their random baseline and their save are the HookedTransformer-checkpoint
# ones. Applied where the source line exists; a tree without those lines is left alone.
POST_MERGE_EDITS: dict[Path, list[tuple[str, str]]] = {
    Path("interp/hypotheses/base.py"): [
        ('    if Arch.of(model).kind == "hooked":\n        return models.random_like(model, seed)\n',
         '    from interp.tl import is_native\n\n'
         '    if Arch.of(model).kind == "hooked" or is_native(model):  # TL 4: organisms are native bridges\n'
         '        return models.random_like(model, seed)\n'),
    ],
    MODELS: [
        ("    bridge = is_bridge(model)\n    tok = tokenizer_of(model)\n",
         "    bridge = is_bridge(model) and not tl.is_native(model)  # a native bridge (TL 4) saves as a TL checkpoint\n"
         "    tok = tokenizer_of(model)\n"),
    ],
}

# what must not be left after the rewrite (outside SKIP): any other TL import is reported
LEFT = re.compile(r"^[ \t]*(?:from transformer_lens[\w.]* import|import transformer_lens)", re.M)
ALLOWED_LEFT = ("transformer_lens.utilities.tl_checkpoint_conversion",)


def rewrite(text: str, path: Path | None = None, missed: list[str] | None = None) -> str:
    for pattern, repl in RULES:
        text = pattern.sub(repl, text)
    if path == MODELS:
        for old, new in MODEL_EDITS:
            done = "\nfrom interp import tl\n" if new.startswith("from interp import tl") else new
            if done in text:
                continue  # applied before (idempotent; ruff may have moved the import)
            if old not in text:
                if missed is not None:
                    missed.append(f"{path}: {old.strip().splitlines()[0]}")
                continue
            text = text.replace(old, new, 1)
    for old, new in POST_MERGE_EDITS.get(path, []) if path is not None else []:
        if new not in text and old in text:
            text = text.replace(old, new, 1)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file would change")
    args = ap.parse_args(argv)
    changed: list[Path] = []
    left: list[str] = []
    missed: list[str] = []
    for root in ROOTS:
        for path in sorted(Path(root).rglob("*.py")):
            if path in SKIP:
                continue
            text = path.read_text()
            new = rewrite(text, path, missed)
            if new != text:
                changed.append(path)
                if not args.check:
                    path.write_text(new)
            for m in LEFT.finditer(new):
                line = new[m.start():new.index("\n", m.start())].strip()
                if not any(a in line for a in ALLOWED_LEFT):
                    left.append(f"{path}: {line}")
    for p in changed:
        print(("would rewrite " if args.check else "rewrote ") + str(p))
    for line in left:
        print(f"left (rewrite by hand): {line}", file=sys.stderr)
    for line in missed:
        print(f"models.py edit not applied (source line not found; edit by hand): {line}", file=sys.stderr)
    return 1 if (args.check and changed) or left or missed else 0


if __name__ == "__main__":
    sys.exit(main())
