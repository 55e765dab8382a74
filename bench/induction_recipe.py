"""Why do some seeds of the `induction` organism fail the textbook test, and which recipe fixes it?

    python bench/induction_recipe.py --seed 1 --max-steps 16000 --every 1000 --out runs/s1
        [--resume runs/s1/state_8000.pt] [--decay-from 8000] [--wd-after 0.1]

Trains like `interp.organisms.induction.train` (the same initial weights, data stream, AdamW
groups and forward as `interp.organisms.training.fit`; constant lr after a 100-step warm-up),
and every `--every` steps appends one JSON line to OUT/curve.jsonl (step, seconds, the textbook
test on the stopping eval seed: best induction / previous-token score, repeated-half loss and
ratio, every head's scores) and saves the full training state (model, optimiser, data
generator) to OUT/state_STEP.pt, so that a different continuation can branch from any step:
`--decay-from S` decays the lr from step S to 0 at `--max-steps` (cosine), `--wd-after W` sets
the weight decay from the resumed step on. Not part of CI (a run is minutes of CPU). The
defaults are `induction.train`'s recipe (bit-identical weights: checked for 20 steps, seed 1).

Recipe search for seeds 1 and 2 (issue 15 item 4), 2026-12-03, one thread on a 2-core machine
shared with ~6 other jobs (seconds are wall time to that step). Columns: step, seconds, best
induction score, best previous-token score, repeated-half loss (nats), loss ratio, on the
stopping eval seed (500, n = 64 per period). Seed 1 first (the harder one); a run was stopped
once its curve was flat or its attention showed a non-canonical solution. Runs marked (*) used
data options removed afterwards (skip-bigram chains, `a b a` triples: in commit cbd87de).

- rotary (RoPE on all 16 dims), old data, seed 1: 1000 67 s 0.060 0.078 3.52 0.84 | 2000 139 s
  0.050 0.037 0.68 0.16 | 3000 218 s 0.050 0.038 0.65 0.15. Layer-0 heads attend to fixed offsets
  8 and 9 (0.91-0.96), layer-1 heads to offset 3 (period 12): a shifted solution, not induction.
- learned positions, late-start repeats from step 0 (LATE_SHARE 0.6), seed 1: 2000 159 s 0.172
  0.080 0.64 0.15 | 3000 228 s 0.173 0.077 0.52 0.12 | 5000 404 s 0.170 0.078 0.51 0.12. Layer-0
  heads average a window 6-11 tokens back (a bag of earlier tokens); no previous-token head.
- period-2 runs to the end of the context in 25% of rows, seed 1: 2000 79 s 0.040 0.917 1.02
  0.24 | 3000 134 s 0.039 0.942 0.73 0.17 | 6000 343 s 0.050 0.942 0.66 0.16. A previous-token
  head (L0H2, 0.99) forms, but the other layer-0 heads average odd offsets (1, 3, 5: the long
  runs reward that too) and layer 1 attends to offset T - 2 and reads the previous-token head
  through its values: not induction.
- (*) skip-bigram chains x[k] = sigma(x[k-2]) in 25% of rows (all rows for 500 steps), seed 1:
  2000 129 s 0.056 0.226 3.92 0.94 | 4000 252 s 0.086 0.165 3.41 0.81: nothing forms.
- (*) `a b a` triples in 25% of rows, seed 1: 2000 130 s 0.832 0.407 0.73 0.17 | 4000 285 s 0.876
  0.431 0.53 0.13. Canonical induction heads, but the previous-token head (L0H0) attends to
  i - 1 with 0.97-0.99 at positions 2-17 and 0.00 from position 20 on: the old seeds' failure.
- (*) rotary + triples, seed 1: 2000 222 s 0.049 0.083 0.81 0.19 (no previous-token head).
- (*) learned positions + triples + late-start repeats from step 0, seed 1: 2000 110 s 0.175
  0.083 0.74 0.18 (window heads again).
- period-2 runs of 6-12 tokens at a random start in 25% of rows (`--pair-share 0.25 --pair-len
  6 12 --stop-from 2000`), seed 1: 1000 67 s 0.392 0.153 2.76 0.65 | 2000 136 s 0.886 0.673 0.42
  0.10 | 3000 220 s 0.958 0.939 0.173 0.041: passes (reporting seed 1: 0.957 0.939 0.175 0.042).
  Short runs reward the previous token and little else (a window over odd offsets runs out of
  the run), so a previous-token head forms at every position; all four layer-1 heads attend to
  i - T + 1 with 0.85-0.94 at every position (canonical induction).
- the same, seed 2: 1000 86 s 0.266 0.109 3.10 0.74 | 2000 180 s 0.878 0.565 0.40 0.095 | 3000
  235 s 0.918 0.615 0.235 0.056 | 5000 359 s 0.958 0.797 0.112 0.027 | 7000 468 s 0.963 0.903
  0.115 0.027: passes (reporting seed 1: 0.964 0.903 0.110 0.026); its previous-token head L0H0
  sharpens slowly and evenly over positions (0.6 at step 3,000 at positions 5-47).
- the same as `induction.train` (the recipe then in the module: these data, stopping checks from
  step 2,000, late-start repeats from 8,000), seed 0, `interp organisms train induction`: runs all
  16,000 steps (808 s) without passing a check; held-out: previous-token 0.670 < 0.9, the other
  three criteria pass. Not saved (the seed-0 checkpoint and recipe were left as they were).
  Rerun here to see why (`--seed 0 --max-steps 6000 --pair-share 0.25 --pair-len 6 12
  --stop-from 2000`): 1000 56 s 0.595 0.194 2.13 0.50 | 2000 141 s 0.903 0.404 0.29 0.069 | 3000
  225 s 0.940 0.457 0.149 0.035 | 6000 365 s 0.966 0.503 0.134 0.032. Induction forms, but the
  previous-token job is split between L0H0 and L0H3 (step 6,000: 0.42-0.60 and 0.33-0.55 at
  positions 5-47), which share it instead of one head taking it over. Without weight decay
  (`--wd 0`, same data) nothing changes: 2000 0.905 0.397 0.29 | 3000 0.942 0.452 0.146 | 5000
  0.955 0.491 0.150 (159 s to step 5,000 on a quieter machine).
- period-2 runs in 50% of rows (`--pair-share 0.5 --pair-len 6 12`), seed 0: 1000 41 s 0.815
  0.382 0.87 0.20 | 2000 115 s 0.903 0.467 0.28 0.068 | 3000 186 s 0.933 0.511 0.196 0.047 |
  5000 348 s 0.943 0.552 0.159 0.038 (stopped). Induction forms fast, but the previous-token job
  stays spread over three layer-0 heads (step 5,000: L0H0 / L0H1 / L0H2 attend to i - 1 with
  0.44-0.56 / 0.33-0.40 / 0.50-0.62 at positions 5-47): the criterion asks for one head >= 0.9.

- period-2 runs of 4-8 tokens in 25% of rows (`--pair-len 4 8`, checks from step 2,000): seed 0
  passes at step 4,000 (0.966 0.953); seed 1 stays at 0.848 0.408 0.490 (flat from step 2,000,
  stopped at 8,000); seed 2 ends at 0.886 0.795 0.533 (8,000).
- period-2 runs of 4-12 tokens in 25% of rows (`--pair-len 4 12`): seed 0 passes at 9,000
  (0.965 0.927 0.134 0.032; 0.868 previous-token at 8,000), seed 1 at 4,000 (0.944 0.961 0.197
  0.047), seed 2 at 6,000 (0.969 0.926 0.132 0.032): all three. This is the shipped recipe, with
  a stopping margin (`induction.STOP_ACCEPTANCE`) added after seed 1's step-4,000 state, 0.197 on
  this seed, reported 0.204 on the reporting seed (a fail); with the margin seed 1 stops at 5,000
  (0.965 0.986 0.134). Resuming reproduces an uninterrupted run: seed 1 resumed from its
  step-4,000 state gives at 5,000 the numbers `induction.train`'s check printed (0.9651 0.9856
  0.1335 0.0319). (A first resume reached 0.958 0.985 0.167 because `--late-from` then defaulted
  to STOP_FROM, i.e. late-start repeats from step 4,000; it defaults to LATE_FROM now.)

Declared circuits of the two passing states (`interp.circuits.declare`, n = 64, seed 100), seeds
1 / 2 under the 6-12 period-2-run data (for the shipped 4-12 recipe see bench/seeds.json): L0H0 B<-A (0.997 / 0.974), seed 2 also L0H3 B<-A (0.078), and
all four layer-1 heads last<-B (0.40-0.71 / 0.41-0.77); largest undeclared share 0.038 / 0.009.
The same roles in both seeds (not the same edges: seed 2's extra L0H3), and neither has the
shipped seed 0's duplicate-token edge L0 last<-A. Removing the previous-token head's output from
the induction heads' key / query / value input raises the repeated-half loss from 0.175 to 3.29 /
2.99 / 0.41 nats (seed 1) and from 0.110 to 2.60 / 2.05 / 0.17 (seed 2).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from interp.organisms import induction as I
from interp.organisms.base import failures
from interp.organisms.training import IGNORE, fast_forward, init_model


def parser() -> argparse.ArgumentParser:
    """The command line; its defaults are `induction.train`'s recipe (tests/test_organisms.py)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=I.DEFAULT_STEPS)
    ap.add_argument("--every", type=int, default=I.STOP_EVERY)
    ap.add_argument("--eval-seed", type=int, default=I.STOP_EVAL_SEED)
    ap.add_argument("--eval-n", type=int, default=I.STOP_EVAL_N)
    ap.add_argument("--wd", type=float, default=0.01)
    ap.add_argument("--wd-after", type=float, default=None)
    ap.add_argument("--decay-from", type=int, default=None)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--positional", choices=("standard", "rotary"), default=I.POSITIONAL)
    ap.add_argument("--stop-from", type=int, default=I.STOP_FROM, help="stop at the first check from here that passes")
    ap.add_argument("--late-from", type=int, default=I.LATE_FROM, help="phase 2 (late-start repeats) from this step")
    ap.add_argument("--late-share", type=float, default=I.LATE_SHARE)
    ap.add_argument("--pair-share", type=float, default=I.PAIR_SHARE, help="share of rows with a period-2 run")
    ap.add_argument("--pair-len", type=int, nargs=2, default=I.PAIR_LEN, help="its length range (tokens)")
    ap.add_argument("--pair-to-end", action="store_true", help="period-2 runs continue to the end of the context")
    ap.add_argument("--resume", type=Path, default=None)
    ap.add_argument("--out", type=Path, required=True)
    return ap


def main() -> None:
    args = parser().parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    model = init_model(I.config(args.layers, args.positional), args.seed)
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.wd},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(args.seed)
    start = 0
    if args.resume is not None:
        st = torch.load(args.resume, weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        start = st["step"]
    if args.wd_after is not None:
        opt.param_groups[0]["weight_decay"] = args.wd_after

    def lr_at(step: int) -> float:
        if step < 100:
            return 1e-3 * (step + 1) / 100
        if args.decay_from is not None and step >= args.decay_from:
            frac = (step - args.decay_from) / max(1, args.max_steps - args.decay_from)
            return 1e-3 * 0.5 * (1 + math.cos(math.pi * frac))
        return 1e-3

    sample = I.sampler(I.BATCH, late_from=args.late_from, late_share=args.late_share, pair_share=args.pair_share,
                       pair_len=None if args.pair_to_end else tuple(args.pair_len))
    t0 = time.perf_counter()
    model.train()
    for step in range(start, args.max_steps):
        tokens, targets = sample(step, gen)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        where = targets != IGNORE
        loss = F.cross_entropy(fast_forward(model, tokens, None, where).float(), targets[where])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = step + 1
        if done % args.every:
            continue
        model.eval()
        t = I.textbook_scores(model, n=args.eval_n, seed=args.eval_seed)
        model.train()
        ind, prev = t["induction"].mean(0), t["prev_token"].mean(0)
        first, rep = float(t["loss_first_half"].mean()), float(t["loss_repeated_half"].mean())
        row = {"step": done, "seconds": round(time.perf_counter() - t0, 1), "train_loss": round(float(loss), 4),
               "best_induction_score": round(float(ind.max()), 4),
               "best_prev_token_score": round(float(prev.max()), 4),
               "loss_repeated_half": round(rep, 4), "loss_first_half": round(first, 4),
               "loss_ratio": round(rep / first, 4),
               "induction": [[round(float(v), 3) for v in r] for r in ind],
               "prev_token": [[round(float(v), 3) for v in r] for r in prev]}
        with (args.out / "curve.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "step": done},
                   args.out / f"state_{done}.pt")
        metrics = {"best_induction_score": float(ind.max()), "best_prev_token_score": float(prev.max()),
                   "loss_repeated_half": rep, "loss_ratio": rep / first}
        if args.stop_from is not None and done >= args.stop_from and not failures(I.STOP_ACCEPTANCE, metrics):
            break  # the early-stopping rule of `induction.train` (same seed, n and checks)


if __name__ == "__main__":
    main()
