"""Routes benchmark: the routes investigation on the induction organism, batched over the
examples, against the per-example loop it replaces, on the same prompts, measured in one run.

Run: .venv/bin/python bench/routes.py [--n 16] [--threads N]
Prints, measured in this run: the time of `interp.hypotheses.routes._route_effects` (one
`path_patch_many` call: a request per receiver, for all examples, every sender of that
receiver in its request)
and of the old loop (kept below as the peer: one `path_patch` call per example and route, on the
pre-"One spine" API), the largest per-example difference between their values, and the ratio.
Both measure the trained model only (the investigation runs each once more on its baseline).
"""

from __future__ import annotations

import argparse
import logging
import warnings

import torch
from timing import best_of

from interp.arch import Arch
from interp.graph import Node, Site
from interp.hypotheses.inputs import induction_routes, route_prompts
from interp.hypotheses.routes import _route_effects
from interp.models import load_model
from interp.patching import logprob, path_patch

warnings.filterwarnings("ignore", category=DeprecationWarning)
log = logging.getLogger("bench.routes")


def old_loop(model, clean, corrupt, answer, source: int, target: int, via: list[int]):  # noqa: ANN001, ANN201
    """The routes investigation's per-example loop before "One spine" (interp/hypotheses/routes.py
    at 6c0799c), unchanged but for the metric factory: every route path-patched for one example
    at a time, with that example's `logprob(answer)` metric."""
    arch = Arch.of(model)
    n = clean.shape[0]
    specs = []
    for c in range(arch.n_layers):
        for rec, site in (("k", Site.K), ("v", Site.V)):
            specs.append((f"U^{c} R@L{c} ({rec})", Node(c, Site.RESID_PRE, pos=source),
                          [Node(c, site, pos=source, head=g) for g in range(arch.n_kv_heads)]))
    for p in via:
        for c1 in range(arch.n_layers):
            for c2 in range(c1 + 1, arch.n_layers):
                for rec, site in (("k", Site.K), ("v", Site.V)):
                    specs.append((f"R@L{c1}->{p}->R@L{c2} ({rec})", Node(c1, Site.ATTN_OUT, pos=p),
                                  [Node(c2, site, pos=p, head=g) for g in range(arch.n_kv_heads)]))
    for c2 in range(arch.n_layers):
        senders = [Node(c2, Site.RESID_PRE, pos=source)] + [Node(c1, Site.ATTN_OUT, pos=p)
                                                           for p in via for c1 in range(c2)]
        for rec, site in (("k", Site.K), ("v", Site.V)):
            specs.append((f"joint -> L{c2} ({rec})", [senders],
                          [Node(c2, site, pos=q, head=g) for q in [source, *via] for g in range(arch.n_kv_heads)]))
    effects = torch.zeros(len(specs), n, dtype=torch.float64)
    total = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        m = logprob(int(answer[i]))
        for j, (_, sender, receivers) in enumerate(specs):
            res = path_patch(model, clean[i: i + 1], corrupt[i: i + 1], m, sender, receivers, stream="kv",
                             reader=[target])
            effects[j, i] = float(res.values.reshape(-1)[0]) - res.corrupt_metric
            total[i] = res.clean_metric - res.corrupt_metric
    return total, [name for name, _, _ in specs], effects


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16, help="examples (the demo uses 16)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model("organism:induction")
    x = induction_routes(args.n, 0)
    p = route_prompts("organism:induction", model, args.n, 0)
    src = p.index("source")
    target = int(p.index("last")[0])

    new = {}
    old = {}
    t_new = best_of(lambda: new.update(r=_route_effects(model, p, src, None)), args.repeats)
    t_old = best_of(lambda: old.update(r=old_loop(model, x.clean, x.corrupt, x.answer, x.source, target, x.via)),
                    args.repeats)
    n_total, n_specs, n_eff = new["r"]
    o_total, o_names, o_eff = old["r"]
    by = {s.name: n_eff[j] for j, s in enumerate(n_specs)}
    if set(by) != set(o_names):
        raise SystemExit(f"routes differ: {sorted(set(by) ^ set(o_names))[:6]}")
    diff = max(float((n_total - o_total).abs().max()),
               max(float((by[name] - o_eff[j]).abs().max()) for j, name in enumerate(o_names)))
    calls_old = len(o_names) * args.n
    print(f"routes on organism:induction, {args.n} examples, {len(o_names)} routes, threads={torch.get_num_threads()}")
    print(f"  per-example loop (old): {t_old:8.2f} s  ({calls_old} path_patch calls)")
    print(f"  batched (ours):         {t_new:8.2f} s")
    print(f"  max |difference| of per-example values: {diff:.2e}")
    print(f"  ratio (old / ours): {t_old / t_new:.1f}x")


if __name__ == "__main__":
    main()
