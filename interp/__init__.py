"""interp: a mechanistic-interpretability toolkit built on TransformerLens.

The public face: load and save models, address nodes of the computation, cache activations,
and intervene with hooks that are always removed. Subpackages hold the methods
(`interp.patching`, `interp.lens`, `interp.probing`, `interp.sae`, `interp.hypotheses`).
Nothing runs at import: the names below are imported on first use (PEP 562), so that
`import interp` (and `interp --help`) does not pay for torch and TransformerLens.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from interp.arch import Arch, Model
    from interp.graph import Node, Site
    from interp.models import load_model, load_tokenizer, save_model
    from interp.prompts import Prompts, read_prompts
    from interp.tokens import Batch, Tokenizer, VocabTokenizer

_LAZY = {"Arch": "interp.arch", "Node": "interp.graph", "Site": "interp.graph", "load_model": "interp.models",
         "save_model": "interp.models", "Batch": "interp.tokens", "Tokenizer": "interp.tokens",
         "VocabTokenizer": "interp.tokens", "Prompts": "interp.prompts", "read_prompts": "interp.prompts"}

__all__ = ["Arch", "Batch", "Node", "Prompts", "Site", "Tokenizer", "VocabTokenizer", "load_model", "read_prompts",
           "save_model"]
__version__ = "0.1.0"
# any model (issue 12): the model-kind alias (HookedTransformer | TransformerBridge) and tokenizer loading
_LAZY.update({"Model": "interp.arch", "load_tokenizer": "interp.models"})
__all__ += ["Model", "load_tokenizer"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'interp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
