"""Tuned lens (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the Tuned Lens").

For every lens layer l < n_layers an affine translator ``h -> h A_l + b_l`` with A_l = I + delta_l
(delta_l and b_l initialised to zero, so an untrained tuned lens *is* the logit lens) is trained so that
``unembed(final_norm(h W_l + b_l))`` matches the model's final distribution: the loss is
KL(final || lens) averaged over token positions, summed over layers (the layers are independent
problems trained together). The final lens layer is the model's output and keeps the identity.
The model is frozen: the final norm and unembedding are applied with detached parameters.

Training uses cached residuals (collected from tokens, or passed in as a tensor in the lens-grid
layout [layer, n, d_model]) and Adam; minibatch k is drawn from a generator seeded by
(seed, k), so a run resumed from a checkpoint continues exactly as if uninterrupted. A
checkpoint directory holds ``translators.safetensors``, ``optimizer.safetensors`` and
``state.json`` (model name, hooks, config, step, a fingerprint of the training data); it is
written every `checkpoint_every` steps and at the end, and `TunedLens.load` reads it.

Differences from the paper: AdamW (decay on delta only) instead of SGD with Nesterov momentum, and a full (not
low-rank-initialised) matrix per layer. Memory: n_layers x d_model^2 translator parameters,
plus Adam's two moments.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm

from interp.atomic import write_json_atomic, write_tensors_atomic
from interp.configs import from_dict
from interp.lens.logit import LensResult, logit_lens, run_lens, summarise
from interp.lens.residual import (
    UNSET,
    Decoder,
    compute_dtype,
    kl_from_final,
    layer_labels,
    lens_hooks,
    model_device,
    model_name,
    residual_stack,
)
from interp.prompts import Prompts, as_prompts
from interp.tl import HookedTransformer
from interp.tokens import Batch
from interp.viz import curves

log = logging.getLogger(__name__)

TRANSLATORS = "translators.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"


@dataclass(frozen=True, kw_only=True)
class TunedLensConfig:
    """How to train the translators. `steps` counts optimizer steps of `batch_tokens` positions."""

    steps: int = 300
    lr: float = 1e-3
    batch_tokens: int = 256
    weight_decay: float = 0.0
    checkpoint_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_tokens", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TunedLensConfig.{name}: expected a positive int, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TunedLensConfig.lr: expected a positive finite number, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"TunedLensConfig.weight_decay: expected >= 0, got {self.weight_decay!r}")

    @staticmethod
    def from_dict(d: dict[str, Any]) -> TunedLensConfig:
        """Build from a dict (e.g. parsed YAML); unknown keys are an error."""
        return from_dict(TunedLensConfig, d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LensComparison:
    """KL(final || lens) per lens layer for the logit and the tuned lens on the same positions."""

    model_name: str
    labels: tuple[str, ...]
    logit: Float[Tensor, "layer n"]
    tuned: Float[Tensor, "layer n"]

    @property
    def values(self) -> Float[Tensor, "2 layer"]:
        """Mean KL in nats: row 0 the logit lens, row 1 the tuned lens."""
        return torch.stack([self.logit.mean(1), self.tuned.mean(1)])

    def to_frame(self, *, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> pd.DataFrame:
        """One row per (lens, layer): mean KL (nats) with a bootstrap CI over token positions."""
        rows = []
        for lens, kl in (("logit", self.logit), ("tuned", self.tuned)):
            n_layer, n = kl.shape
            rows.append(pd.DataFrame({
                "lens": lens, "layer": torch.arange(n_layer).repeat_interleave(n).numpy(),
                "example": torch.arange(n).repeat(n_layer).numpy(), "pos": 0,
                "kl": kl.flatten().double().numpy()}))
        s = summarise(pd.concat(rows), "kl", n_boot=n_boot, alpha=alpha, seed=seed, by=("lens", "layer"))
        s["label"] = [self.labels[i] for i in s["layer"]]
        s["model"] = self.model_name
        return s.rename(columns={"mean": "kl"})

    def plot(self) -> go.Figure:
        return curves(self.to_frame(), x="layer", y="kl", group="lens", low="ci_low", high="ci_high",
                      title=f"KL(final || lens) by layer ({self.model_name})", y_title="KL (nats)",
                      x_labels=self.labels)


def _fingerprint(acts: Tensor) -> dict[str, Any]:
    a = acts.detach()
    return {"shape": list(a.shape), "sum": float(a.double().sum()), "abs_sum": float(a.double().abs().sum())}


class TunedLens(torch.nn.Module):
    """Per-layer affine translators for the lens layers of one model (see the module docstring).

    `weight[l]` = I + `delta[l]` is applied on the right (``h @ weight[l] + bias[l]``) for lens
    layers l < n_layers; the final lens layer is untouched. Parameters live on the model's device in
    at least float32.
    """

    def __init__(self, *, model_name: str, n_layers: int, d_model: int, d_vocab: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.model_name = model_name
        self.n_layers = n_layers
        self.d_model = d_model
        self.d_vocab = d_vocab
        self.hook_names = lens_hooks(n_layers)
        self.step = 0
        # Parametrised as identity + delta (as Belrose et al.), so weight decay pulls towards the
        # logit lens, not towards zero.
        self.delta = torch.nn.Parameter(torch.zeros(n_layers, d_model, d_model, device=device, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(n_layers, d_model, device=device, dtype=dtype))

    @property
    def weight(self) -> Float[Tensor, "layer d_model d_model"]:
        """The translators' matrices A_l = I + delta_l (applied as h @ A_l + b_l)."""
        return self.delta + torch.eye(self.d_model, device=self.delta.device, dtype=self.delta.dtype)

    @staticmethod
    def for_model(model: HookedTransformer, *, name: str | None = None) -> TunedLens:
        """Identity translators (== the logit lens) for `model`, on its device."""
        return TunedLens(model_name=name or model_name(model), n_layers=model.cfg.n_layers,
                         d_model=model.cfg.d_model, d_vocab=model.cfg.d_vocab_out,
                         device=model_device(model), dtype=compute_dtype(model.cfg.dtype))

    def check_model(self, model: HookedTransformer) -> None:
        """Raise if `model` does not have the shape this lens was trained for."""
        got = (model.cfg.n_layers, model.cfg.d_model, model.cfg.d_vocab_out)
        want = (self.n_layers, self.d_model, self.d_vocab)
        if got != want:
            raise ValueError(f"tuned lens for {self.model_name!r}: expected a model with (n_layers, "
                             f"d_model, d_vocab) = {want}, got {got} ({model_name(model)!r})")
        if model_name(model) not in (self.model_name, "custom", "unnamed"):  # TL's name for local models
            log.warning("tuned lens trained on %r applied to %r", self.model_name, model_name(model))

    def forward(self, resid: Float[Tensor, "layer *rest d_model"]) -> Float[Tensor, "layer *rest d_model"]:
        """Translate stacked residuals of all n_layers + 1 lens layers (the last one unchanged)."""
        if resid.shape[0] != self.n_layers + 1 or resid.shape[-1] != self.d_model:
            raise ValueError(f"tuned lens input: expected (layer={self.n_layers + 1}, ..., "
                             f"d_model={self.d_model}), got {tuple(resid.shape)}")
        x = resid.to(self.delta.dtype)
        head, final = x[:-1], x[-1:]
        flat = head.reshape(self.n_layers, -1, self.d_model)
        out = flat + torch.baddbmm(self.bias[:, None, :], flat, self.delta)
        return torch.cat([out.reshape(head.shape), final], dim=0)

    # --------------------------------------------------------------------------------- training

    @staticmethod
    def fit(
        model: HookedTransformer,
        data: Int[Tensor, "batch pos"] | Batch | Prompts | Float[Tensor, "layer n d_model"],
        config: TunedLensConfig = TunedLensConfig(),
        *,
        checkpoint_dir: str | Path | None = None,
        name: str | None = None,
        batch_size: int | None = 64,
        progress: bool = True,
    ) -> TunedLens:
        """Train translators on cached residuals; resume from `checkpoint_dir` if it holds a run.

        `data` is a token tensor or padded `Prompts`/`Batch` (their residuals at every real
        position are collected first, with `interp.hooks.run`) or the residuals themselves in
        the lens-grid layout [n_layers + 1, n, d_model].
        """
        acts = TunedLens._training_acts(model, data, batch_size, progress)
        lens = TunedLens.for_model(model, name=name)
        opt = torch.optim.AdamW([{"params": [lens.delta], "weight_decay": config.weight_decay},
                                 {"params": [lens.bias], "weight_decay": 0.0}], lr=config.lr)
        fingerprint = _fingerprint(acts)
        ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
        if ckpt is not None and (ckpt / STATE).is_file():
            lens._resume(ckpt, opt, config, fingerprint)
        decoder = Decoder(model, lens.delta.dtype)
        n = acts.shape[1]
        losses: list[float] = []
        bar = tqdm(total=config.steps, initial=lens.step, desc="tuned lens", disable=not progress,
                   leave=False)
        while lens.step < config.steps:
            g = torch.Generator().manual_seed(config.seed * 1_000_003 + lens.step)
            idx = torch.randint(0, n, (min(config.batch_tokens, n),), generator=g)
            h = acts[:, idx.to(acts.device)].to(lens.delta.device, lens.delta.dtype)
            with torch.no_grad():
                final = decoder(h[-1])
            kl = kl_from_final(final[None].expand(lens.n_layers, -1, -1), decoder(lens(h)[:-1]))
            loss = kl.mean(dim=1).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lens.step += 1
            losses.append(float(loss.detach()) / lens.n_layers)
            bar.update(1)
            bar.set_postfix(kl=f"{losses[-1]:.4f}")
            if ckpt is not None and (lens.step % config.checkpoint_every == 0 or lens.step == config.steps):
                lens._checkpoint(ckpt, opt, config, fingerprint)
        bar.close()
        if losses:
            log.info("tuned lens %s: step %d, mean KL per layer %.4f", lens.model_name, lens.step, losses[-1])
        return lens

    @staticmethod
    def _training_acts(model: HookedTransformer, data: Tensor | Batch, batch_size: int | None,
                       progress: bool) -> Tensor:
        if isinstance(data, Batch):  # padded prompts: every real position, no pads
            p = as_prompts(data).right()
            acts = residual_stack(model, p, batch_size=batch_size, progress=progress)
            return acts[:, p.mask.to(acts.device)]
        if not isinstance(data, Tensor):
            raise TypeError(f"tuned lens data: expected a token tensor (batch, pos) or residuals "
                            f"(layer, n, d_model), got {type(data).__name__}")
        if data.dtype.is_floating_point:
            want = (model.cfg.n_layers + 1, model.cfg.d_model)
            if data.ndim != 3 or (data.shape[0], data.shape[2]) != want:
                raise ValueError(f"tuned lens residuals: expected (layer={want[0]}, n, d_model={want[1]}) "
                                 f"in the lens-grid layout (resid_pre of each block, then the final "
                                 f"resid_post), got {tuple(data.shape)}")
            return data.detach()
        acts = residual_stack(model, data, batch_size=batch_size, progress=progress)
        return acts.reshape(acts.shape[0], -1, acts.shape[-1])

    def _state(self, config: TunedLensConfig, fingerprint: dict[str, Any]) -> dict[str, Any]:
        return {"model_name": self.model_name, "hooks": self.hook_names, "n_layers": self.n_layers,
                "d_model": self.d_model, "d_vocab": self.d_vocab, "step": self.step,
                "config": config.to_dict(), "data": fingerprint, "dtype": str(self.delta.dtype)}

    def _checkpoint(self, ckpt: Path, opt: torch.optim.Optimizer, config: TunedLensConfig,
                    fingerprint: dict[str, Any]) -> None:
        ckpt.mkdir(parents=True, exist_ok=True)
        sd = opt.state_dict()
        tensors, scalars = {}, {}
        for pid, st in sd["state"].items():
            for key, value in st.items():
                if isinstance(value, Tensor):
                    tensors[f"{pid}.{key}"] = value
                else:
                    scalars[f"{pid}.{key}"] = value
        write_tensors_atomic(ckpt / TRANSLATORS, {"delta": self.delta, "bias": self.bias})
        write_tensors_atomic(ckpt / OPTIMIZER, tensors)
        state = self._state(config, fingerprint)
        state["optimizer"] = {"param_groups": sd["param_groups"], "scalars": scalars}
        write_json_atomic(ckpt / STATE, state)  # written last: it marks the checkpoint complete

    def _resume(self, ckpt: Path, opt: torch.optim.Optimizer, config: TunedLensConfig,
                fingerprint: dict[str, Any]) -> None:
        state = json.loads((ckpt / STATE).read_text())
        self._check_state(state, ckpt)
        saved = TunedLensConfig.from_dict(state["config"])
        if dataclasses.replace(saved, steps=config.steps) != config:
            raise ValueError(f"tuned lens checkpoint {ckpt}: expected the same training config as the "
                             f"saved run {saved} (only `steps` may change), got {config}")
        if state["data"]["shape"] != fingerprint["shape"] or not math.isclose(
                state["data"]["sum"], fingerprint["sum"], rel_tol=1e-6, abs_tol=1e-6):
            raise ValueError(f"tuned lens checkpoint {ckpt}: expected the same training data as the "
                             f"saved run (fingerprint {state['data']}), got {fingerprint}; use a fresh "
                             f"checkpoint directory for new data")
        self._load_translators(ckpt)
        self.step = int(state["step"])
        tensors = load_file(str(ckpt / OPTIMIZER), device=str(self.delta.device))
        per_param: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            pid, name = key.split(".", 1)
            per_param.setdefault(int(pid), {})[name] = value
        for key, value in state["optimizer"]["scalars"].items():
            pid, name = key.split(".", 1)
            per_param.setdefault(int(pid), {})[name] = value
        opt.load_state_dict({"state": per_param, "param_groups": state["optimizer"]["param_groups"]})
        log.info("tuned lens: resumed %s at step %d", ckpt, self.step)

    def _check_state(self, state: dict[str, Any], where: Path) -> None:
        got = (state["n_layers"], state["d_model"], state["d_vocab"])
        want = (self.n_layers, self.d_model, self.d_vocab)
        if got != want:
            raise ValueError(f"tuned lens checkpoint {where}: expected (n_layers, d_model, d_vocab) = "
                             f"{want} for {self.model_name!r}, got {got} (trained on {state['model_name']!r})")

    def _load_translators(self, d: Path) -> None:
        t = load_file(str(d / TRANSLATORS), device=str(self.delta.device))
        with torch.no_grad():
            self.delta.copy_(t["delta"])
            self.bias.copy_(t["bias"])

    # ------------------------------------------------------------------------------ save / load

    def save(self, path: str | Path) -> Path:
        """Write the translators and their facts (model name, hooks, step) to directory `path`."""
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        write_tensors_atomic(d / TRANSLATORS, {"delta": self.delta, "bias": self.bias})
        state = {"model_name": self.model_name, "hooks": self.hook_names, "n_layers": self.n_layers,
                 "d_model": self.d_model, "d_vocab": self.d_vocab, "step": self.step,
                 "dtype": str(self.delta.dtype)}
        write_json_atomic(d / STATE, state)
        return d

    @staticmethod
    def load(path: str | Path, *, device: torch.device | str | None = None) -> TunedLens:
        """Read a lens written by `save` (or a training checkpoint directory)."""
        d = Path(path)
        missing = [f for f in (STATE, TRANSLATORS) if not (d / f).is_file()]
        if missing:
            raise FileNotFoundError(f"tuned lens {d}: expected {STATE} and {TRANSLATORS} "
                                    f"(written by TunedLens.save or fit), missing {missing}")
        state = json.loads((d / STATE).read_text())
        dtype = getattr(torch, state.get("dtype", "torch.float32").removeprefix("torch."))
        lens = TunedLens(model_name=state["model_name"], n_layers=state["n_layers"],
                         d_model=state["d_model"], d_vocab=state["d_vocab"], device=device, dtype=dtype)
        if state["hooks"] != lens.hook_names:
            raise ValueError(f"tuned lens {d}: expected hooks {lens.hook_names}, got {state['hooks']}")
        lens._load_translators(d)
        lens.step = int(state["step"])
        return lens

    # --------------------------------------------------------------------------------- reading

    def run(
        self,
        model: HookedTransformer,
        prompts: Int[Tensor, "batch pos"] | Batch | Prompts,
        *,
        at: str = "last",
        pos: int | Int[Tensor, " batch"] | Int[Tensor, "batch sel"] | None | object = UNSET,
        answer: Int[Tensor, " batch"] | Int[Tensor, "batch sel"] | None = None,
        target: Int[Tensor, " batch"] | Int[Tensor, "batch sel"] | None = None,
        k: int = 5,
        batch_size: int | None = None,
        keep_logits: bool = False,
        progress: bool = True,
    ) -> LensResult:
        """The tuned lens at every layer: same arguments and result as `interp.lens.logit_lens`."""
        self.check_model(model)
        return run_lens(model, prompts, lens="tuned", translate=self, decode_dtype=self.delta.dtype,
                        at=at, pos=pos, answer=answer, target=target, k=k, batch_size=batch_size,
                        keep_logits=keep_logits, progress=progress)

    def compare(
        self,
        model: HookedTransformer,
        prompts: Int[Tensor, "batch pos"] | Batch | Prompts,
        *,
        at: str = "last",
        pos: int | Int[Tensor, " batch"] | Int[Tensor, "batch sel"] | None | object = None,
        batch_size: int | None = None,
    ) -> LensComparison:
        """KL(final || lens) per layer for the logit lens and this lens on the same (held-out)
        prompts: every position of unpadded prompts by default (`pos=None`); padded prompts (or
        ``pos=UNSET``) are read at each prompt's named position `at`."""
        if pos is None and isinstance(prompts, Batch) and bool((prompts.lengths < prompts.tokens.shape[1]).any()):
            pos = UNSET
        logit = logit_lens(model, prompts, at=at, pos=pos, k=1, batch_size=batch_size, progress=False)
        tuned = self.run(model, prompts, at=at, pos=pos, k=1, batch_size=batch_size, progress=False)
        return LensComparison(model_name=self.model_name, labels=tuple(layer_labels(self.n_layers)),
                              logit=logit.kl.flatten(1), tuned=tuned.kl.flatten(1))
