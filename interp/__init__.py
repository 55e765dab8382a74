"""interp: a mechanistic-interpretability toolkit built on TransformerLens.

The public face: load and save models, address nodes of the computation, cache activations,
and intervene with hooks that are always removed. Subpackages hold the methods
(`interp.patching`, `interp.lens`, `interp.probing`, `interp.sae`, `interp.hypotheses`).
Nothing runs at import.
"""

from interp.arch import Arch
from interp.graph import Node, Site
from interp.models import load_model, save_model
from interp.tokens import Batch, Tokenizer, VocabTokenizer

__all__ = ["Arch", "Batch", "Node", "Site", "Tokenizer", "VocabTokenizer", "load_model", "save_model"]
__version__ = "0.1.0"
