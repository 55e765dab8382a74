"""The investigations' one baseline policy: what a measurement is compared with, and when the
random-initialised model of the same shape is built.

Every investigation (`interp.hypotheses`) and the lens trajectory (`interp.decoding.trajectory`)
takes ``baseline=``:

- a model: used as it is (a control model, e.g. the same architecture trained on shuffled data);
- ``"random"``: a random-initialised model of the same shape, kind, device and dtype
  (`random_like`), built for the measurement that needs it;
- ``"none"``: no baseline; no verdict is stated, and the result says so;
- ``"auto"`` (the default; ``None`` and ``True`` mean the same): ``"random"`` when the model's
  parameters take at most `AUTO_MAX_BYTES` (1 GiB: the organisms and the tests' tiny models,
  whose results are unchanged), otherwise no baseline, with a note saying how to get one.
  ``False`` means ``"none"``.

Memory: a random baseline of a 7B model in bf16 is a second 14 GB model. It is built only when
the statistic that needs it runs, after the main measurement (`Baseline.run`), and released
right after it (no reference kept; `torch.cuda.empty_cache()` on CUDA), so at most one extra
model is alive at a time and never beside anything else the investigation holds on the device.
"""

from __future__ import annotations

import copy
import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch

from interp import models
from interp.arch import Arch, Model, device_of, dtype_of, model_name, tokenizer_of

AUTO_MAX_BYTES = 1 << 30  # baseline="auto" builds a random baseline only up to this many parameter bytes

BaselineSpec = Literal["auto", "random", "none"]
BASELINE_CHOICES = ("auto", "random", "none")
T = TypeVar("T")


def random_like(model: Model, seed: int = 0, *, offset: int = 10_000) -> Model:
    """A random-initialised model of the same shape, kind, device and dtype (`interp.models.random_like`
    for a HookedTransformer; for a TransformerBridge the Hugging Face class's own initialisation from
    the same config, seeded with `offset` + `seed` in a private RNG stream)."""
    from interp.tl import is_native

    if Arch.of(model).kind == "hooked" or is_native(model):  # TL 4: organisms are native bridges
        return models.random_like(model, seed)
    from transformers import AutoModelForCausalLM

    from interp.tl import TransformerBridge

    dev, dt = device_of(model), dtype_of(model)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else [], device_type=dev.type):
        torch.manual_seed(offset + seed)
        hf = AutoModelForCausalLM.from_config(copy.deepcopy(model.original_model.config),
                                              attn_implementation="eager", dtype=dt)
    return TransformerBridge.boot_transformers(model_name(model), hf_model=hf.to(dev).eval(), device=dev, dtype=dt,
                                               tokenizer=tokenizer_of(model)).eval()


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's parameters take (each tensor counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class Baseline:
    """A resolved baseline choice for one model: `kind` is "model" (the caller's), "random" (a
    random-initialised model of the same shape, built by `run`), "none" (asked for none) or
    "withheld" (``"auto"`` above `AUTO_MAX_BYTES`); `note` says which, or why there is none and
    how to get one."""

    kind: Literal["model", "random", "none", "withheld"]
    note: str
    given: Model | None = None
    seed: int = 0
    model_bytes: int = 0

    @property
    def available(self) -> bool:
        return self.kind in ("model", "random")

    @property
    def label(self) -> str:
        """A short name for tables: "random-init", "baseline" (a given model) or "none"."""
        return {"random": "random-init", "model": "baseline"}.get(self.kind, "none")

    def run(self, model: Model, measure: Callable[[Model], T]) -> T | None:
        """`measure(baseline model)`, or None without one. A random baseline is built here and
        released when `measure` returns (it must not return the model itself)."""
        if self.given is not None:
            return measure(self.given)
        if self.kind != "random":
            return None
        base = random_like(model, self.seed)
        on_cuda = device_of(base).type == "cuda"
        try:
            return measure(base)
        finally:
            del base
            gc.collect()  # a bridge's modules hold reference cycles
            if on_cuda:
                torch.cuda.empty_cache()


def baseline_for(model: Model, baseline: Any = "auto", *, seed: int = 0, what: str = "baseline") -> Baseline:
    """Resolve `baseline` (a model, "auto", "random", "none"; None/True mean "auto", False "none")
    for `model`; nothing is built here."""
    if isinstance(baseline, torch.nn.Module):
        return Baseline("model", f"the given model {model_name(baseline)!r}", given=baseline, seed=seed)
    if baseline is None or baseline is True:
        baseline = "auto"
    elif baseline is False:
        baseline = "none"
    if not isinstance(baseline, str) or baseline not in BASELINE_CHOICES:
        raise ValueError(f"{what}: expected a model, 'auto', 'random' or 'none', got {baseline!r}")
    size = parameter_bytes(model)
    if baseline == "none":
        return Baseline("none", "none (baseline='none'); pass baseline='random' (interp run: --baseline random; "
                                f"cost: a second model of {_gib(size)}) or a control model for a verdict", seed=seed,
                        model_bytes=size)
    if baseline == "random" or size <= AUTO_MAX_BYTES:
        how = "" if baseline == "random" else f" (baseline='auto': the model takes {_gib(size)})"
        return Baseline("random", f"a random-initialised model of the same shape{how}", seed=seed, model_bytes=size)
    return Baseline("withheld", (
        f"withheld: the model's parameters take {_gib(size)}, above baseline='auto''s limit of "
        f"{_gib(AUTO_MAX_BYTES)}, so no random-initialised baseline was built; pass baseline='random' (interp run: "
        f"--baseline random; cost: a second model of {_gib(size)}) or a control model (baseline=MODEL)"), seed=seed,
        model_bytes=size)


def unbaselined(note: str, measured: str) -> str:
    """The sentence of a verdict withheld for want of a baseline, with what was measured anyway."""
    return f"unbaselined, so no claim is made (baseline: {note}); measured without it: {measured}"
