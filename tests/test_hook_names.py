"""Nodes, not strings (STYLE.md section 2): only `interp.graph` turns a layer into a
TransformerLens hook name. Any f-string that builds ``blocks.{layer}...`` elsewhere in the
package (read with `ast`, so docstrings and comments do not count) is a regression."""

from __future__ import annotations

import ast
from pathlib import Path

import interp

ROOT = Path(interp.__file__).parent
ALLOWED = {"graph.py"}  # the one module that owns hook names


def fstring_hook_names(tree: ast.AST) -> list[int]:
    """Line numbers of f-strings whose text starts with ``blocks.`` and has a formatted field."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr) and node.values:
            head = node.values[0]
            if (isinstance(head, ast.Constant) and isinstance(head.value, str) and head.value.startswith("blocks.")
                    and any(isinstance(v, ast.FormattedValue) for v in node.values)):
                out.append(node.lineno)
    return out


def test_detector_finds_an_fstring_hook_name_and_ignores_docstrings():
    src = '"""blocks.{l}.hook_z in a docstring"""\nname = "blocks.0.hook_z"\nx = f"blocks.{layer}.attn.hook_z"\n'
    assert fstring_hook_names(ast.parse(src)) == [3]


def test_no_fstring_hook_names_outside_graph():
    found = {str(p.relative_to(ROOT)): lines for p in sorted(ROOT.rglob("*.py"))
             if str(p.relative_to(ROOT)) not in ALLOWED and (lines := fstring_hook_names(ast.parse(p.read_text())))}
    assert not found, (f"raw f-string hook names: expected none outside interp/graph.py, got {found}; "
                       "build them with interp.graph.Node(layer, Site.X).hook_name")
