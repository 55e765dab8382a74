"""`reach-*`: in-context graph reachability, trained three ways (no CoT, token CoT, continuous thought).

Task (ProsQA-like; Hao et al. 2024 "Training Large Language Models to Reason in a Continuous Latent
Space" (Coconut); Zhu et al. 2025 "Reasoning by Superposition"): the prompt lists the 10 edges
of a random directed graph on 12 of 16 node labels, one token ``u>v`` per edge, then
``? s c1 c2`` (a start node and two candidate targets), then ``:``. The graph is two disjoint trees of depth K = 3 with levels of
size 1, 2, 2, 1 (out-degree 0-2); ``s`` is the root of one, the other root is a distractor. The
candidates are the two depth-3 leaves; the answer is the one reachable from ``s`` (3 hops).

    <bos> u>v u>v ... u>v  ?  s c1 c2  :  [step 1] [step 2]  -> answer (read at the last step)

An edge token's embedding is trained as first[u] + second[v] (`training.PairEmbedding`; the shipped
table is ordinary), so "find the edge leaving u and read its head" is one attention step.

Three ways to fill the steps (same architecture, data, optimiser and number of steps):

- ``reach-direct``: no steps: ``... c2 :`` -> answer.
- ``reach-cot``: token chain of thought: the steps are the path nodes a1, a2 (s -> a1 -> a2 -> answer).
- ``reach-continuous``: continuous thoughts (Coconut): the input at step i is the model's own last
  hidden state (the final-norm output, what the unembedding reads) at the previous position, in
  place of a token embedding (the position embedding is still added). Coconut's curriculum: stage
  j writes the first j steps as thoughts and the rest as tokens (stage 0 = token CoT), stage by
  stage; the final stage thinks both steps. With replay (`REPLAY`): each step of stage j trains a
  stage drawn from 0..j. Without replay the model stayed at chance after 3,000 and 5,000 steps
  (data/organisms/reach-continuous-attempts/); with it, 0.997 held out at the same 5,000 steps.

Measured (n = 1000 held out, 5,000 steps each, batch 64): no CoT 0.494 (chance), token CoT 0.776
(its first node needs a two-step look-ahead), continuous 0.997.

Ground truth per example (`ReachData`): the edges, the start, candidates, the path, the answer and
the frontier: the nodes reachable from ``s`` in exactly i steps (always two nodes at i = 1, 2).
A breadth-first search holds both frontier nodes; a token chain must commit to one at step 1,
which needs a 2-step look-ahead to choose right (so token CoT is expected below continuous).
Known mechanism (expected, to be measured, never hard-coded): the i-th thought holds the frontier
at depth i in superposition (Zhu et al.); the answer is read as the child of the second frontier.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from interp.organisms.base import Criterion
from interp.organisms.training import (
    IGNORE,
    PairEmbedding,
    TrainConfig,
    TrainLog,
    fit,
    init_model,
    native_final_hidden,
    num_threads,
)
from interp.tl import HookedTransformer, HookedTransformerConfig, is_native
from interp.tokens import VocabTokenizer

Mode = Literal["direct", "cot", "continuous"]
MODES: tuple[Mode, ...] = ("direct", "cot", "continuous")
NAME = "reach"
NAMES = tuple(f"{NAME}-{m}" for m in MODES)
TASK = ("graph reachability in context (12 nodes, 10 edges, two depth-3 trees): which of two "
        "candidates is reachable from the start; 3 hops")
N_NODES = 16
USED = 12
HOPS = 3
STEPS = HOPS - 1  # written / continuous steps before the answer
N_EDGES = 10
LEVELS = (1, 2, 2, 1)
BATCH = 64
DEFAULT_STEPS = 5000
STAGE_FRACTIONS = (0.3, 0.3, 0.4)  # continuous curriculum: share of steps per stage 0..STEPS
REPLAY = True  # each step of stage j trains a stage drawn from 0..j (without replay: chance, see attempts)

BOS = 0
NODE0 = 1
Q = NODE0 + N_NODES
THINK = Q + 1  # ":" (Coconut's <bot>)
THOUGHT = THINK + 1  # placeholder: its embedding is replaced by a continuous thought
EDGE0 = THOUGHT + 1  # edge u -> v is token EDGE0 + N_NODES * (u - NODE0) + (v - NODE0)
D_VOCAB = EDGE0 + N_NODES * N_NODES

Q_POS = 1 + N_EDGES  # 11
START_POS = Q_POS + 1
CAND_POS = (START_POS + 1, START_POS + 2)
THINK_POS = START_POS + 3  # 15
SEQ_LEN = THINK_POS + 1 + STEPS  # 18: ... ":" step step; the answer is predicted at the last step

# The baselines must have learned the task's form (no CoT: a candidate as the answer; token CoT: a
# chain along the graph's edges, and the right answer after the right chain); their accuracy is
# the measurement, not a bar. The continuous model must solve the task.
TASK_ACCEPTANCE = {
    "direct": (Criterion(metric="candidate_rate", op=">=", threshold=0.95,
                         what="answers that are one of the two candidates (no chain of thought)"),),
    "cot": (Criterion(metric="valid_chain", op=">=", threshold=0.9,
                      what="greedy token chains that follow the graph's edges from the start"),
            Criterion(metric="accuracy_given_right_chain", op=">=", threshold=0.95,
                      what="answer accuracy where the greedy chain is the path to the answer")),
    "continuous": (Criterion(metric="accuracy", op=">=", threshold=0.9,
                             what="held-out answer accuracy after 2 continuous thoughts"),),
}


def tokenizer() -> VocabTokenizer:
    """``<bos>``, nodes ``n0``..``n15``, ``?``, ``:``, ``<thought>``, edges ``n{u}>n{v}``."""
    return VocabTokenizer(("<bos>",) + tuple(f"n{i}" for i in range(N_NODES)) + ("?", ":", "<thought>")
                          + tuple(f"n{u}>n{v}" for u in range(N_NODES) for v in range(N_NODES)))


def edge_tokens(edges: Int[Tensor, "... 2"]) -> Int[Tensor, "..."]:
    """The token of each edge (u, v) (node token ids)."""
    return EDGE0 + N_NODES * (edges[..., 0] - NODE0) + (edges[..., 1] - NODE0)


def config(mode: Mode = "continuous") -> HookedTransformerConfig:
    return HookedTransformerConfig(
        n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, n_ctx=SEQ_LEN, d_vocab=D_VOCAB,
        act_fn="gelu", normalization_type="LN", positional_embedding_type="standard",
        original_architecture=f"interp-organism-{NAME}-{mode}", seed=None, dtype=torch.float32, device="cpu")


@dataclass(frozen=True)
class ReachData:
    """Graphs and their ground truth (node ids are token ids).

    `edges[:, j]` = (u, v), the edge token at position j + 1; `path[:, i]` is the node at depth i
    on the way from `start` (i = 0) to `answer` (i = HOPS); `frontier[:, i]` is the multi-hot set
    over the 16 node labels of nodes reachable in exactly i steps (i = 0..HOPS);
    `candidates[:, 0/1]` are the two leaves as written; `label` is 0/1: which candidate is reachable.
    `distractor_path` / `distractor_frontier`: the same for the other tree (from its root).
    """

    edges: Int[Tensor, "n edge 2"]
    start: Int[Tensor, "n"]
    candidates: Int[Tensor, "n 2"]
    label: Int[Tensor, "n"]
    path: Int[Tensor, "n hop"]
    distractor_path: Int[Tensor, "n hop"]
    frontier: Bool[Tensor, "n hop node"]
    distractor_frontier: Bool[Tensor, "n hop node"]

    @property
    def answer(self) -> Int[Tensor, "n"]:
        return self.path[:, HOPS]

    @property
    def distractor(self) -> Int[Tensor, "n"]:
        return self.distractor_path[:, HOPS]

    @property
    def n(self) -> int:
        return int(self.start.shape[0])

    @property
    def tokens(self) -> Int[Tensor, "n pos"]:
        """The whole token chain of thought, answer excluded (`tokens_for("cot")`)."""
        return self.tokens_for("cot")

    def tokens_for(self, mode: Mode = "cot", stage: int = STEPS) -> Int[Tensor, "n pos"]:
        """The model input: the prompt, ``:``, then (``cot``/``continuous``) the steps, the answer being
        predicted at the last position; in ``continuous`` mode the first `stage` steps are `THOUGHT`
        placeholders, the rest the path."""
        n = self.n
        head = torch.cat([torch.full((n, 1), BOS), edge_tokens(self.edges), torch.full((n, 1), Q),
                          self.start[:, None], self.candidates], 1)
        if mode == "direct":
            return torch.cat([head, torch.full((n, 1), THINK)], 1)
        steps = self.path[:, 1:HOPS].clone()
        if mode == "continuous":
            steps[:, :stage] = THOUGHT
        elif mode != "cot":
            raise ValueError(f"ReachData.tokens mode: expected one of {MODES}, got {mode!r}")
        return torch.cat([head, torch.full((n, 1), THINK), steps], 1)

    def rows(self, index: Int[Tensor, "m"]) -> ReachData:
        return ReachData(**{f: getattr(self, f)[index] for f in self.__dataclass_fields__})

    def partner(self) -> ReachData:
        """The same graphs and candidates, started from the other tree's root: the answer becomes
        the other candidate and every frontier the other tree's (the patching counterfactual)."""
        return ReachData(edges=self.edges, start=self.distractor_path[:, 0], candidates=self.candidates,
                         label=1 - self.label, path=self.distractor_path, distractor_path=self.path,
                         frontier=self.distractor_frontier, distractor_frontier=self.frontier)

    def reordered(self, seed: int) -> ReachData:
        """The same graphs, start and answers with the edges listed in another random order (a
        control: every frontier is unchanged, every position of the edge list moves)."""
        g = torch.Generator().manual_seed(seed)
        order = torch.stack([torch.randperm(N_EDGES, generator=g) for _ in range(self.n)])
        edges = self.edges.gather(1, order[:, :, None].expand(-1, -1, 2))
        return ReachData(**{**{f: getattr(self, f) for f in self.__dataclass_fields__}, "edges": edges})


def _tree(labels: list[int], g: torch.Generator) -> tuple[list[tuple[int, int]], list[list[int]], list[int]]:
    """A depth-3 tree with levels of LEVELS sizes on `labels`: its edges, levels and root-to-leaf path.

    Level 1 = {a1, b1}, level 2 = {a2, b2}, leaf T; T's parent is a2, a2's parent a1, and b2's
    parent is a1 or b1 at random (so a1 has out-degree 1 or 2 and b1 0 or 1)."""
    root, a1, b1, a2, b2, leaf = labels
    b2_parent = a1 if int(torch.randint(0, 2, (1,), generator=g)) else b1
    edges = [(root, a1), (root, b1), (a1, a2), (b2_parent, b2), (a2, leaf)]
    return edges, [[root], [a1, b1], [a2, b2], [leaf]], [root, a1, a2, leaf]


def dataset(n: int, seed: int) -> ReachData:
    """`n` graphs, deterministic in `seed`."""
    g = torch.Generator().manual_seed(seed)
    edges, start, cands, label, path, dpath = [], [], [], [], [], []
    frontier = torch.zeros(2, n, HOPS + 1, N_NODES, dtype=torch.bool)
    for i in range(n):
        labels = (torch.randperm(N_NODES, generator=g)[:USED] + NODE0).tolist()
        e1, levels, p1 = _tree(labels[:6], g)
        e2, levels2, p2 = _tree(labels[6:], g)
        es = e1 + e2
        order = torch.randperm(len(es), generator=g).tolist()
        edges.append([es[j] for j in order])
        flip = int(torch.randint(0, 2, (1,), generator=g))
        cands.append([p2[-1], p1[-1]] if flip else [p1[-1], p2[-1]])
        label.append(flip)
        start.append(p1[0])
        path.append(p1)
        dpath.append(p2)
        for tree, lv in enumerate((levels, levels2)):
            for depth, level in enumerate(lv):
                for node in level:
                    frontier[tree, i, depth, node - NODE0] = True
    return ReachData(edges=torch.tensor(edges), start=torch.tensor(start), candidates=torch.tensor(cands),
                     label=torch.tensor(label), path=torch.tensor(path), distractor_path=torch.tensor(dpath),
                     frontier=frontier[0], distractor_frontier=frontier[1])


def bfs_frontier(edges: list[tuple[int, int]], start: int, depth: int) -> list[set[int]]:
    """Nodes reachable from `start` in exactly 0..`depth` steps (a plain breadth-first search)."""
    out, cur = [{start}], {start}
    for _ in range(depth):
        cur = {v for u, v in edges if u in cur}
        out.append(cur)
    return out


# ---------------------------------------------------------------- continuous forward


def _hidden(model: HookedTransformer, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
    """The final-norm output (what the unembedding reads) from input embeddings `x` (token or
    thought vectors, position embeddings not yet added): the HookedTransformer's own computation,
    fused (plain matmuls and scaled_dot_product_attention) for CPU training speed."""
    if is_native(model):  # TL 4: the organism loads as TransformerLens's native model
        return native_final_hidden(model, x)
    cfg = model.cfg
    batch, n, _ = x.shape
    x = x + model.pos_embed.W_pos[:n]
    heads, d_head = cfg.n_heads, cfg.d_head
    for block in model.blocks:
        attn = block.attn
        h = F.layer_norm(x, (cfg.d_model,), block.ln1.w, block.ln1.b, cfg.eps)
        w_qkv = torch.cat([attn.W_Q, attn.W_K, attn.W_V], dim=0).permute(1, 0, 2).reshape(cfg.d_model, -1)
        b_qkv = torch.cat([attn.b_Q, attn.b_K, attn.b_V], dim=0).reshape(-1)
        q, k, v = (h @ w_qkv + b_qkv).view(batch, n, 3 * heads, d_head).split(heads, dim=2)
        z = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, scale=1.0 / float(attn.attn_scale))
        x = x + z.transpose(1, 2).reshape(batch, n, heads * d_head) @ attn.W_O.reshape(heads * d_head, -1) + attn.b_O
        h = F.layer_norm(x, (cfg.d_model,), block.ln2.w, block.ln2.b, cfg.eps)
        x = x + F.gelu(h @ block.mlp.W_in + block.mlp.b_in) @ block.mlp.W_out + block.mlp.b_out
    return F.layer_norm(x, (cfg.d_model,), model.ln_final.w, model.ln_final.b, cfg.eps)


def think(model: HookedTransformer, tokens: Int[Tensor, "batch pos"], n_thoughts: int,
          W_E: Float[Tensor, "d_vocab d_model"] | None = None) -> tuple[Float[Tensor, "batch pos d_vocab"], Float[Tensor, "batch thought d_model"]]:
    """Logits of `tokens` whose positions ``THINK_POS + 1 ..`` + `n_thoughts` hold continuous thoughts.

    Thought i (1-based) is the final-norm hidden state at position ``THINK_POS + i - 1`` of the run
    that already holds thoughts 1..i-1; it replaces the token embedding at ``THINK_POS + i``.
    Differentiable (training backpropagates through all thoughts); `W_E` replaces the embedding
    table (the structured table during training). Returns (logits, thoughts)."""
    table = model.embed.W_E if W_E is None else W_E
    x = table[tokens.to(table.device)]
    thoughts = []
    for i in range(n_thoughts):
        p = THINK_POS + i
        t = _hidden(model, x[:, :p + 1])[:, p]
        thoughts.append(t)
        x = torch.cat([x[:, :p + 1], t[:, None], x[:, p + 2:]], 1)
    logits = _hidden(model, x) @ model.unembed.W_U + model.unembed.b_U
    empty = x.new_zeros(x.shape[0], 0, x.shape[2])
    return logits, (torch.stack(thoughts, 1) if thoughts else empty)


# ---------------------------------------------------------------- training


def _targets(data: ReachData, mode: Mode, stage: int) -> tuple[Tensor, Tensor]:
    tokens = data.tokens_for(mode, stage)
    targets = torch.full_like(tokens, IGNORE)
    targets[:, -1] = data.answer
    if mode != "direct":
        for i in range(stage if mode == "continuous" else 0, STEPS):  # written steps get a loss
            targets[:, THINK_POS + i] = data.path[:, 1 + i]
    return tokens, targets


def _sampler(mode: Mode):  # noqa: ANN202
    def sample(step: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        return _targets(dataset(BATCH, int(torch.randint(0, 2**62, (1,), generator=g))), mode, 0)
    return sample


def stage_bounds(steps: int) -> list[int]:
    """First step of each curriculum stage 0..STEPS (and `steps` at the end)."""
    cum = [0]
    for f in STAGE_FRACTIONS[:-1]:
        cum.append(cum[-1] + round(f * steps))
    return [*cum, steps]


def _fit_continuous(model: HookedTransformer, emb: PairEmbedding, tc: TrainConfig, progress: bool,
                    replay: bool = REPLAY) -> TrainLog:
    """Coconut's curriculum: stage j (steps `stage_bounds`) thinks the first j steps; the optimiser
    is reset at each stage (as in Coconut); each stage warms up and decays its own learning rate.
    The embedding is `emb`'s structured table (written into ``W_E`` at the end, as `fit` does).
    `replay`: each step of stage j trains a stage drawn uniformly from 0..j (earlier stages replayed)."""
    model.embed.W_E.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if n != "embed.W_E"] + list(emb.parameters())
    gen = torch.Generator().manual_seed(tc.seed)
    bounds = stage_bounds(tc.steps)
    losses: list[float] = []
    model.train()
    start = time.perf_counter()
    with num_threads(tc.threads):
        bar = tqdm(range(tc.steps), desc=f"{NAME}-continuous", disable=not progress, mininterval=1.0)
        opt, stage = None, -1
        for step in bar:
            s = max(j for j in range(len(bounds) - 1) if bounds[j] <= step)
            if s != stage:
                stage = s
                decay = [p for p in params if p.ndim >= 2]
                opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                        lr=tc.lr, betas=tc.betas)
                sub = TrainConfig(steps=bounds[s + 1] - bounds[s], lr=tc.lr, warmup=min(tc.warmup, 50),
                                  final_lr_frac=tc.final_lr_frac, seed=tc.seed)
            data = dataset(BATCH, int(torch.randint(0, 2**62, (1,), generator=gen)))
            drawn = int(torch.randint(0, stage + 1, (1,), generator=gen)) if replay else stage
            tokens, targets = _targets(data, "continuous", drawn)
            for group in opt.param_groups:
                group["lr"] = sub.lr_at(step - bounds[stage])
            logits, _ = think(model, tokens, drawn, emb())
            where = targets != IGNORE
            loss = F.cross_entropy(logits[where].float(), targets[where])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            opt.step()
            losses.append(float(loss.detach()))
            if step % 50 == 0:
                bar.set_postfix(stage=stage, loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    seconds = time.perf_counter() - start
    with torch.no_grad():
        model.embed.W_E.copy_(emb())
    model.embed.W_E.requires_grad_(True)
    model.eval()
    return TrainLog(loss=tuple(losses), seconds=seconds, steps=tc.steps, seed=tc.seed,
                    extra={f"stage{j}_start": float(b) for j, b in enumerate(bounds[:-1])})


def train(mode: Mode, steps: int = DEFAULT_STEPS, seed: int = 0, progress: bool = True,
          threads: int | None = 1) -> tuple[HookedTransformer, TrainLog]:
    """Train from scratch: AdamW 1e-3, batch 64, the same data stream and steps in every mode."""
    model = init_model(config(mode), seed)
    emb = PairEmbedding(model.embed.W_E[:EDGE0], N_NODES, N_NODES, float(model.cfg.initializer_range), seed)
    tc = TrainConfig(steps=steps, lr=1e-3, warmup=100, seed=seed, threads=threads)
    if mode == "continuous":
        return model, _fit_continuous(model, emb, tc, progress)
    return model, fit(model, _sampler(mode), tc, embedding=(emb, list(emb.parameters())), progress=progress,
                      desc=f"{NAME}-{mode}")


# ---------------------------------------------------------------- inference


@dataclass(frozen=True)
class Rollout:
    """One model's answers on `data`: per-example `correct`, the `steps` it wrote (token CoT; -1
    where it thought), the answer `logits` at the last position, the step distributions `step_logits` [n, step,
    d_vocab] (what the position before step i predicts) and the continuous `thoughts`."""

    correct: Bool[Tensor, "n"]
    answer_logits: Float[Tensor, "n d_vocab"]
    steps: Int[Tensor, "n written"]
    step_logits: Float[Tensor, "n slot d_vocab"]
    thoughts: Float[Tensor, "n thought d_model"]


@torch.inference_mode()
def rollout(model: HookedTransformer, data: ReachData, mode: Mode, *, batch_size: int = 500) -> Rollout:
    """Greedy answers: ``direct`` reads ``:`` at once; ``cot`` writes each step greedily; ``continuous``
    feeds both thoughts. Uses the fused forward (equal to the HookedTransformer's to float error)."""
    outs = []
    for i in range(0, data.n, batch_size):
        d = data.rows(torch.arange(i, min(data.n, i + batch_size)))
        tokens = d.tokens_for(mode, STEPS).to(model.cfg.device)
        thoughts = torch.zeros(d.n, 0, model.cfg.d_model)
        if mode == "continuous":
            logits, thoughts = think(model, tokens, STEPS)
        elif mode == "cot":
            for s in range(STEPS):  # greedy: each written step is the argmax of the previous position
                logits = _hidden(model, model.embed.W_E[tokens]) @ model.unembed.W_U + model.unembed.b_U
                tokens[:, THINK_POS + 1 + s] = logits[:, THINK_POS + s].argmax(-1)
            logits = _hidden(model, model.embed.W_E[tokens]) @ model.unembed.W_U + model.unembed.b_U
        else:
            logits = _hidden(model, model.embed.W_E[tokens]) @ model.unembed.W_U + model.unembed.b_U
        ans = logits[:, -1].float().cpu()
        steps = tokens[:, THINK_POS + 1:THINK_POS + 1 + STEPS].cpu() if mode == "cot" else \
            torch.full((d.n, STEPS if mode == "continuous" else 0), -1)
        step_logits = logits[:, THINK_POS:THINK_POS + STEPS].float().cpu() if mode != "direct" else \
            torch.zeros(d.n, 0, logits.shape[-1])
        outs.append((ans.argmax(-1) == d.answer, ans, steps, step_logits, thoughts.float().cpu()))
    return Rollout(*(torch.cat(x) for x in zip(*outs, strict=True)))


def evaluate(model: HookedTransformer, n: int = 1000, seed: int = 1, mode: Mode | None = None) -> dict[str, object]:
    """Held-out answer accuracy (argmax over the whole vocabulary at the last position) with a bootstrap CI; for
    token CoT also the share of chains that chose the right first / second step."""
    from interp.stats import bootstrap

    mode = mode or mode_of(model)
    data = dataset(n, seed)
    r = rollout(model, data, mode)
    ci = bootstrap(r.correct.float(), seed=seed)
    out: dict[str, object] = {"accuracy": ci.value, "accuracy_ci": [ci.low, ci.high], "n_eval": n,
                              "eval_seed": seed, "mode": mode, "thought_steps": 0 if mode == "direct" else STEPS}
    pred = r.answer_logits.argmax(-1)
    out["candidate_rate"] = float(((pred == data.candidates[:, 0]) | (pred == data.candidates[:, 1])).float().mean())
    if mode == "cot":
        out["step_accuracy"] = [round(float(v), 4) for v in (r.steps == data.path[:, 1:HOPS]).float().mean(0)]
        out["valid_chain"] = float(valid_chain(data, r.steps).float().mean())
        right = (r.steps == data.path[:, 1:HOPS]).all(1)
        out["accuracy_given_right_chain"] = float(r.correct[right].float().mean()) if bool(right.any()) else 0.0
    return out


def valid_chain(data: ReachData, steps: Int[Tensor, "n step"]) -> Bool[Tensor, "n"]:
    """Whether each written chain follows edges of its graph from the start (s -> w1 -> w2)."""
    ok = torch.ones(data.n, dtype=torch.bool)
    prev = data.start
    for i in range(steps.shape[1]):
        hop = (data.edges[:, :, 0] == prev[:, None]) & (data.edges[:, :, 1] == steps[:, i, None])
        ok &= hop.any(1)
        prev = steps[:, i]
    return ok


def mode_of(model: HookedTransformer) -> Mode:
    arch = str(model.cfg.original_architecture or "")
    for m in MODES:
        if arch == f"interp-organism-{NAME}-{m}":
            return m
    raise ValueError(f"reach mode of a model: expected original_architecture 'interp-organism-reach-MODE' "
                     f"with MODE in {MODES}, got {arch!r}; pass mode=")


@dataclass(frozen=True)
class Variant:
    """``reach-direct`` / ``reach-cot`` / ``reach-continuous`` (what `interp.organisms.get` returns):
    same task, data, architecture, optimiser and steps; they differ in how the steps are filled."""

    NAME: str
    mode: Mode
    TASK: str = TASK
    DEFAULT_STEPS: int = DEFAULT_STEPS

    @property
    def MECHANISM(self) -> str:  # noqa: N802
        return {"direct": "answer read at '=' with no intermediate steps (3 hops inside 2 layers)",
                "cot": "writes the path s->a1->a2 then the answer; must choose a1 by looking ahead",
                "continuous": "two continuous thoughts (last hidden state fed back); expected to hold the "
                              "depth-1 and depth-2 frontiers in superposition"}[self.mode]

    @property
    def ACCEPTANCE(self) -> tuple[Criterion, ...]:  # noqa: N802
        return TASK_ACCEPTANCE[self.mode]

    def config(self) -> HookedTransformerConfig:
        return config(self.mode)

    def tokenizer(self) -> VocabTokenizer:
        return tokenizer()

    def dataset(self, n: int, seed: int) -> ReachData:
        return dataset(n, seed)

    def train(self, steps: int = DEFAULT_STEPS, seed: int = 0, progress: bool = True,
              threads: int | None = 1) -> tuple[HookedTransformer, TrainLog]:
        return train(self.mode, steps, seed, progress, threads)

    def evaluate(self, model: HookedTransformer, n: int = 1000, seed: int = 1) -> dict[str, object]:
        return evaluate(model, n, seed, self.mode)


def variant(name: str) -> Variant:
    if name not in NAMES:
        raise ValueError(f"reach variant: expected one of {list(NAMES)}, got {name!r}")
    return Variant(NAME=name, mode=name.removeprefix(f"{NAME}-"))  # type: ignore[arg-type]


__all__ = ["HOPS", "MODES", "NAMES", "STEPS", "ReachData", "Rollout", "Variant", "bfs_frontier", "dataset",
           "edge_tokens", "evaluate", "rollout", "think", "train", "valid_chain", "variant"]
