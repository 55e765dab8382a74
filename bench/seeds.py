"""Robustness of the ground truth: retrain each organism from more seeds and check that it meets
its acceptance criteria and declares the same circuit as the shipped checkpoint.

    python bench/seeds.py [--seeds 1 2] [--organisms induction multihop ...] [--out bench/seeds.json]

For each (organism, seed): train from scratch on one thread (one training at a time), evaluate
on held-out data, declare the circuit with `interp.circuits.declare` (noising path patching of
every candidate attention edge), and compare it with the shipped manifest's circuit:
``same_circuit`` (identical edges up to a per-layer head permutation, the heads mapped by their
edges) and ``same_roles`` (the same (layer, query role, key role) edges, whatever the heads and
their number). The one-layer induction control is checked for failing the textbook test.
Results are appended to `--out` as they come (a rerun skips what is there); a summary table is
printed at the end. Not part of CI (minutes of CPU per organism).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from interp import circuits as C
from interp.organisms import evaluate, get, train
from interp.organisms.base import failures
from interp.organisms.training import TrainLog, init_model
from interp.tl import HookedTransformer

ORGANISMS = ("induction", "induction-1layer", "multihop", "retrieval-learned", "retrieval-rotary",
             "retrieval-nope", "planning")


def roles(c: C.Circuit) -> set[tuple[int, str, str]]:
    return {(e.layer, e.query, e.key) for e in c.edges}


def from_state(name: str, path: Path) -> tuple[HookedTransformer, int]:
    """A model trained by bench/induction_recipe.py (a `state_STEP.pt` it saved) and its step."""
    state = torch.load(path, weights_only=True)
    model = init_model(get(name).config(), 0)
    model.load_state_dict(state["model"])
    return model.eval(), int(state["step"])


def run_one(name: str, seed: int, state: Path | None = None, state_seconds: float = 0.0) -> dict[str, object]:
    org = get(name)
    t0 = time.perf_counter()
    if state is None:
        model, log = train(name, seed=seed, progress=False)
        train_s = time.perf_counter() - t0
    else:  # trained elsewhere (resumable, same steps as `train`); its wall time is given
        model, steps = from_state(name, state)
        log = TrainLog(loss=(), seconds=state_seconds, steps=steps, seed=seed, extra={"state": str(state)})
        train_s = state_seconds
    metrics = evaluate(model, name=name)
    failed = failures(org.ACCEPTANCE, metrics)
    row: dict[str, object] = {"organism": name, "seed": seed, "steps": log.steps, "train_seconds": round(train_s, 1),
                              **({"training": log.extra} if log.extra else {}),
                              "accepted": not failed, "failures": failed,
                              "metrics": {k: v for k, v in metrics.items() if isinstance(v, float)}}
    if name in C.CIRCUIT_ORGANISMS:
        t1 = time.perf_counter()
        shipped = C.circuit_of(name)
        try:
            mine = C.declare(name, model, n=int(shipped.evidence.get("n_prompts", 64)))
        except ValueError as e:  # no edge carries the task: a different (or no) mechanism; record it
            return row | {"declare_seconds": round(time.perf_counter() - t1, 1), "declare_error": str(e),
                          "same_circuit": False, "same_roles": False}
        perm = C.same_circuit(shipped, mine)
        row |= {"declare_seconds": round(time.perf_counter() - t1, 1),
                "circuit": [e.__dict__ for e in mine.edges],
                "same_circuit": perm is not None,
                "head_map": None if perm is None else {f"L{k[0]}H{k[1]}": f"L{k[0]}H{v}" for k, v in perm.items()},
                "same_roles": roles(shipped) == roles(mine),
                "roles_only_shipped": sorted(map(list, roles(shipped) - roles(mine))),
                "roles_only_here": sorted(map(list, roles(mine) - roles(shipped)))}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--organisms", nargs="+", default=list(ORGANISMS))
    ap.add_argument("--out", type=Path, default=Path("bench/seeds.json"))
    ap.add_argument("--state", type=Path, default=None,
                    help="evaluate this bench/induction_recipe.py state instead of training (one organism and seed)")
    ap.add_argument("--state-seconds", type=float, default=0.0, help="the wall time that state took to train")
    args = ap.parse_args()
    if args.state is not None and (len(args.organisms) != 1 or len(args.seeds) != 1):
        ap.error(f"--state: expected one organism and one seed, got {args.organisms} and {args.seeds}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")  # early-stopping checks
    done: list[dict[str, object]] = json.loads(args.out.read_text()) if args.out.is_file() else []
    have = {(r["organism"], r["seed"]) for r in done}
    for name in args.organisms:
        for seed in args.seeds:
            if (name, seed) in have:
                continue
            row = run_one(name, seed, args.state, args.state_seconds)
            done.append(row)
            args.out.write_text(json.dumps(done, indent=1, default=float))
            print(json.dumps({k: row[k] for k in row if k not in ("circuit", "metrics")}, default=float), flush=True)
    print("\n| organism | seed | train s | accepted | same circuit (heads permuted) | same roles |")
    print("|---|---|---|---|---|---|")
    for r in done:
        print(f"| {r['organism']} | {r['seed']} | {r['train_seconds']} | {r['accepted']} | "
              f"{r.get('same_circuit', '—')} | {r.get('same_roles', '—')} |")


if __name__ == "__main__":
    main()
