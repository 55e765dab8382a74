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
the weight decay from the resumed step on. Not part of CI (a run is minutes of CPU).
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=16000)
    ap.add_argument("--every", type=int, default=1000)
    ap.add_argument("--eval-seed", type=int, default=I.STOP_EVAL_SEED if hasattr(I, "STOP_EVAL_SEED") else 500)
    ap.add_argument("--eval-n", type=int, default=64)
    ap.add_argument("--wd", type=float, default=0.01)
    ap.add_argument("--wd-after", type=float, default=None)
    ap.add_argument("--decay-from", type=int, default=None)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--positional", choices=("standard", "rotary"), default=I.POSITIONAL)
    ap.add_argument("--stop-from", type=int, default=None, help="stop at the first check from here that passes")
    ap.add_argument("--late-from", type=int, default=None, help="phase 2 (late-start repeats) from this step")
    ap.add_argument("--late-share", type=float, default=I.LATE_SHARE)
    ap.add_argument("--pair-share", type=float, default=0.0, help="share of rows with a period-2 run")
    ap.add_argument("--skip-share", type=float, default=0.0, help="share of rows with a skip-bigram chain")
    ap.add_argument("--skip-only", type=int, default=0, help="steps with only skip-bigram rows first")
    ap.add_argument("--triple-share", type=float, default=0.0, help="share of rows made of a b a triples")
    ap.add_argument("--pair-len", type=int, nargs=2, default=None, help="period-2 run length range")
    ap.add_argument("--resume", type=Path, default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
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
        st = torch.load(args.resume, weights_only=False)
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
                       skip_share=args.skip_share, skip_only=args.skip_only,
                       triple_share=args.triple_share,
                       pair_len=None if args.pair_len is None else tuple(args.pair_len))
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
        if args.stop_from is not None and done >= args.stop_from and not failures(I.ACCEPTANCE, metrics):
            break  # the early-stopping rule of `induction.train` (same seed, n and checks)


if __name__ == "__main__":
    main()
