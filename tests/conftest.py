"""Shared fixtures: tiny random-initialised models of both families, and one demo run per session."""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from interp.models import new_model
from interp.tl import HookedTransformer, HookedTransformerConfig

# Tiny models: one thread is faster than two, and the suite shares the machine with itself.
torch.set_num_threads(1)


def gpt2_config(**overrides) -> HookedTransformerConfig:
    """GPT-2-style: LayerNorm, learned absolute positions, GELU MLP."""
    kw = dict(n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=32, d_vocab=50,
              act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard",
              seed=0, dtype=torch.float32, device="cpu")
    kw.update(overrides)
    return HookedTransformerConfig(**kw)


def llama_config(**overrides) -> HookedTransformerConfig:
    """Llama-style: RMSNorm, rotary, grouped-query attention (2 KV groups for 4 heads), gated MLP."""
    kw = dict(n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=32, d_vocab=50,
              act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
              rotary_dim=8, n_key_value_heads=2, gated_mlp=True, final_rms=True, seed=0,
              dtype=torch.float32, device="cpu")
    kw.update(overrides)
    return HookedTransformerConfig(**kw)


# A norm's scale: HookedTransformer names (blocks.0.ln1.w, ln_final.w) and, on TL 4, the native
# bridge's (layers.0._original_component.ln1._original_component.weight, ln_out...).
_NORM_SCALE = re.compile(r"(ln1|ln2|ln_final|ln_out)(\._original_component)?\.(w|weight)$")


def _randomise(model: HookedTransformer, seed: int) -> HookedTransformer:
    # TL initialises biases and LN weights to constants; give every parameter random values so
    # that tests cannot pass because of a symmetric initialisation.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if _NORM_SCALE.search(name):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.ndim > 1 else 0.05))
    return model


@pytest.fixture(scope="session")
def gpt2_model() -> HookedTransformer:
    return _randomise(new_model(gpt2_config()), 1)


@pytest.fixture(scope="session")
def llama_model() -> HookedTransformer:
    return _randomise(new_model(llama_config()), 2)


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def any_model(request, gpt2_model, llama_model) -> HookedTransformer:
    return gpt2_model if request.param == "gpt2" else llama_model


# Natural prompts of different token lengths whose names span several tokens (with bpe_tokenizer:
# 8..20 tokens plus BOS, within the fixtures' n_ctx of 32).
CITY_PROMPTS = [("the eiffel tower is in", "eiffel tower", " paris"), ("the colosseum is in", "colosseum", " rome"),
                ("big ben is in", "big ben", " london"), ("the statue of liberty is in", "statue of liberty", " new york"),
                ("the brandenburg gate is in", "brandenburg gate", " berlin")]


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A byte-pair-encoding tokenizer (Metaspace, like Llama's) trained offline with the `tokenizers`
    library to the fixtures' vocabulary of 50: a Hugging Face fast tokenizer with offsets and a BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    texts = [f"{p} {a.strip()}" for p, _, a in CITY_PROMPTS] * 20
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=50, special_tokens=["<s>", "<unk>"]))
    # like Llama's: the post-processor prepends BOS (Prompts.from_text follows the tokenizer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<s>", unk_token="<unk>",
                                   pad_token="<s>")


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------- the demo, run once per session

@dataclass(frozen=True)
class DemoRun:
    """The five investigations on the shipped organisms (fast sizes), run once for the whole
    suite: test_demo checks the report and its JSON, test_hypotheses the typed results."""

    results: dict
    report: Path
    summary: dict


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> DemoRun:
    from rich.console import Console

    from interp.demo import run_demo, run_investigations
    from interp.hypotheses.run import Sizes
    from interp.models import list_organisms

    missing = {"multihop", "planning", "induction", "retrieval-learned", "retrieval-rotary",
               "retrieval-nope"} - set(list_organisms())
    if missing:  # a shipped checkpoint that is missing is a failure, not a skip
        pytest.fail(f"shipped organisms missing: {sorted(missing)} (train with `interp organisms train NAME`)")
    results = run_investigations(Sizes.fast(), console=Console(file=io.StringIO()))
    out = tmp_path_factory.mktemp("demo") / "demo.html"
    run_demo(out, fast=True, results=results)
    return DemoRun(results, out, json.loads(out.with_suffix(".json").read_text()))


# ------------------------------------------------- Hugging Face families (tests/hf_zoo.py), offline

from hf_zoo import FAMILIES as HF_FAMILIES  # noqa: E402


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory):
    """`hf_folder(family) -> Path`: the family's tiny random HF folder (config.json, safetensors,
    tokenizer), built once per session."""
    import hf_zoo

    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = hf_zoo.build(family, tmp_path_factory.mktemp(f"hf_{family}"))
        return built[family]

    return get


@pytest.fixture(scope="session")
def bridge_model(hf_folder):
    """`bridge_model(family, dtype=torch.float32)`: the folder booted with
    `TransformerBridge.boot_transformers` on CPU, once per session and dtype."""
    from interp.tl import TransformerBridge

    booted: dict = {}

    def get(family: str, dtype: torch.dtype = torch.float32):
        if (family, dtype) not in booted:
            booted[family, dtype] = TransformerBridge.boot_transformers(str(hf_folder(family)), device="cpu",
                                                                        dtype=dtype)
        return booted[family, dtype]

    return get


@pytest.fixture(params=HF_FAMILIES)
def family(request) -> str:
    """Parametrises a test over the HF families of tests/hf_zoo.py."""
    return request.param
# ------------------------------------------- the SAE tests (sae-lens pins transformer-lens < 4)

def _has_sae_lens() -> bool:
    import importlib.util

    return importlib.util.find_spec("sae_lens") is not None


# test_sae.py imports sae_lens at module level: without it (the TL 4 environment) it is not collected
collect_ignore = [] if _has_sae_lens() else ["test_sae.py"]


def _is_sae_test(item) -> bool:
    return item.path.name == "test_sae.py" or "sae" in item.name.lower()


def pytest_collection_modifyitems(config, items):
    """Mark the SAE tests `sae` (deselect with ``-m "not sae"``) and skip them where sae_lens is
    not installed: the TransformerLens 4 environment of `make test-tl4` has no sae-lens."""
    missing = not _has_sae_lens()
    for item in items:
        if _is_sae_test(item):
            item.add_marker(pytest.mark.sae)
            if missing:
                item.add_marker(pytest.mark.skip(reason="sae_lens is not installed (sae-lens pins "
                                                        "transformer-lens < 4; the TL4 environment has none)"))


# ------------------------------------------------- one local Ray instance for the Ray-backend tests

@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance with one CPU, started once for the suite (its start is the slow part)."""
    ray = pytest.importorskip("ray", reason="ray is not installed (optional extra: pip install 'interp[ray]')")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
