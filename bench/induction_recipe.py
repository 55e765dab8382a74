"""Why do some seeds of the `induction` organism fail the textbook test, and which recipe fixes it?

    python bench/induction_recipe.py --seed 1 --max-steps 24000 --every 1000 --out runs/ind_s1.jsonl
        [--wd 0.0] [--batch 64] [--schedule constant|cosine] [--lr 1e-3] [--layers 2]

Trains like `interp.organisms.induction.train` (the same data stream and initial weights for a
seed) with the recipe given, and every `--every` steps writes one JSON line: the step, the
running training loss, the textbook test (eval seed `--eval-seed`, n per period `--eval-n`):
the best induction / previous-token scores, repeated-half loss, ratio, and every head's scores.
Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from interp.organisms import induction as I
from interp.organisms.training import TrainConfig, fit, init_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=24000)
    ap.add_argument("--every", type=int, default=1000)
    ap.add_argument("--eval-seed", type=int, default=7)
    ap.add_argument("--eval-n", type=int, default=32)
    ap.add_argument("--wd", type=float, default=0.01)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=I.BATCH)
    ap.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model = init_model(I.config(args.layers), args.seed)
    tc = TrainConfig(steps=args.max_steps, lr=args.lr, weight_decay=args.wd, warmup=100,
                     final_lr_frac=1.0 if args.schedule == "constant" else 0.0,
                     betas=(0.9, 0.999), grad_clip=0.0, seed=args.seed, threads=1)
    t0 = time.perf_counter()
    sample = I.sampler(args.batch)

    def stop(model, done: int) -> bool:
        if done % args.every:
            return False
        t = I.textbook_scores(model, n=args.eval_n, seed=args.eval_seed)
        ind, prev = t["induction"].mean(0), t["prev_token"].mean(0)
        first, rep = float(t["loss_first_half"].mean()), float(t["loss_repeated_half"].mean())
        row = {"step": done, "seconds": round(time.perf_counter() - t0, 1),
               "best_induction_score": round(float(ind.max()), 4),
               "best_prev_token_score": round(float(prev.max()), 4),
               "loss_repeated_half": round(rep, 4), "loss_first_half": round(first, 4),
               "loss_ratio": round(rep / first, 4),
               "induction": [[round(float(v), 3) for v in r] for r in ind],
               "prev_token": [[round(float(v), 3) for v in r] for r in prev]}
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return False

    fit(model, sample, tc, progress=False, stop=stop, desc="induction")


if __name__ == "__main__":
    main()
