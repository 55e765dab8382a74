"""Ground truth on the `induction` organism: induction runs through K-composition.

The organism (interp.organisms.induction) is a 2-layer attention-only model trained on random
tokens with a repeated span. Its known mechanism: a layer-0 previous-token head writes "my
previous token was x" at each position, and a layer-1 induction head finds the earlier
occurrence of the current token through its KEY at the source position (K-composition), then
copies the token there.

Corruption: the earlier occurrence of the query token (source - 1) is replaced by another
token, so no key says "my previous token was x". Routes, path-patched with everything else
frozen (interp.patching.path_patch):
- K-route: previous-token head at the source -> residual at the source -> KEY of the induction
  head, read by the last position only (stream="kv": up, then right);
- Q-route: previous-token head at the last position -> QUERY of the induction head there
  (stream="residual": up only).
Necessity (noising: corrupt only that route inside the clean run): cutting the K-route must
remove most of the clean-vs-corrupted gap, cutting the Q-route almost none of it.
Sufficiency (denoising): the K-route must restore (nearly) all that the induction heads' own
output restores, the Q-route nothing. (Measured on the shipped checkpoint: the K-route cuts 1.00
and restores 1.00 of the gap, the Q-route 0.00 both ways. An earlier checkpoint also had a
layer-0 duplicate-token edge, which the same corruption removes; with the final LayerNorm
coupling the heads' outputs, no single route restored the whole gap there.)
"""

from __future__ import annotations

from collections import Counter

import torch

from interp.graph import Node
from interp.models import load_model
from interp.patching import logprob, patch, path_patch

# The induction organism is shipped: a missing or corrupted checkpoint fails these tests (load_model
# raises ModelLoadError), never skips them.


def _aligned_batch(n_max: int = 24, offset: int = 3):
    """Examples sharing the repeat's start and length, cut after a query in the second copy.

    Returns clean/corrupted tokens, the answer, the source position (the token after the earlier
    occurrence of the query token) and the query (last) position.
    """
    from interp.organisms import induction

    data = induction.dataset(6000, seed=1234)
    groups = Counter(zip(data.start.tolist(), data.length.tolist(), strict=True))
    (start, length), _ = max(((k, c) for k, c in groups.items() if k[1] > offset + 2), key=lambda kc: kc[1])
    rows = [i for i in range(len(data.start)) if (int(data.start[i]), int(data.length[i])) == (start, length)][:n_max]
    query = start + length + offset  # a position in the second copy
    source = query - length + 1  # the induction head's target: the token after the earlier occurrence
    clean = data.tokens[rows, : query + 1]
    answer = data.tokens[rows, query + 1]
    assert torch.equal(answer, clean[:, source])
    # symmetric corruption: replace the earlier occurrence of the query token (position source - 1)
    g = torch.Generator().manual_seed(7)
    corrupt = clean.clone()
    shift = torch.randint(1, induction.N_RANDOM, (len(rows),), generator=g)
    corrupt[:, source - 1] = (clean[:, source - 1] - 1 + shift) % induction.N_RANDOM + 1
    return clean, corrupt, answer, source, query


def test_k_route_carries_the_induction_effect_and_the_q_route_does_not():
    from interp.organisms import induction

    model = load_model("organism:induction")
    clean, corrupt, answer, source, query = _aligned_batch()
    # the heads come from the organism's measured scores, not from a hard-coded index
    ind_scores, prev_scores = induction.head_scores(model, induction.dataset(256, seed=99))
    # (previous-token heads: score >= PREV_HEAD_MIN; this checkpoint shares the job between two)
    prev_heads = [h for h in range(model.cfg.n_heads) if prev_scores[0, h] >= induction.PREV_HEAD_MIN]
    ind_heads = [h for h in range(model.cfg.n_heads) if ind_scores[1, h] >= induction.INDUCTION_HEAD_MIN]
    assert prev_heads and ind_heads, (prev_scores, ind_scores)

    metric = logprob(answer, pos=-1)
    k_senders = [tuple(Node(0, "head", pos=source, head=h) for h in prev_heads)]
    k_receivers = [Node(1, "k", pos=source, head=h) for h in ind_heads]
    q_senders = [tuple(Node(0, "head", pos=query, head=h) for h in prev_heads)]
    q_receivers = [Node(1, "q", pos=query, head=h) for h in ind_heads]
    results = {}
    for direction in ("noising", "denoising"):
        k_route = path_patch(model, clean, corrupt, metric, k_senders, k_receivers,
                             stream="kv", reader=[query], direction=direction)
        q_route = path_patch(model, clean, corrupt, metric, q_senders, q_receivers,
                             stream="residual", direction=direction)
        gap = k_route.clean_metric - k_route.corrupt_metric
        assert gap > 1.0, f"corruption should cost the answer > 1 nat of log-prob, got {gap:.3f}"
        # metric change caused by the route, in units of the clean-vs-corrupted gap
        results[direction] = (float(k_route.effect[0]) / gap, float(q_route.effect[0]) / gap)

    k_cut, q_cut = results["noising"]
    assert -k_cut > 0.5, f"cutting the K-route removes {-k_cut:.3f} of the gap (expected most)"
    assert abs(q_cut) < 0.1, f"cutting the Q-route removes {-q_cut:.3f} of the gap (expected ~0)"

    k_restore, q_restore = results["denoising"]
    head_out = patch(model, clean, corrupt, metric, [Node(1, "head", pos=query, head=h) for h in ind_heads])
    through_head = float(head_out.effect[0]) / (head_out.clean_metric - head_out.corrupt_metric)
    print(f"routes: K cut {-k_cut:.3f}, Q cut {-q_cut:.3f}, K restores {k_restore:.3f}, Q restores "
          f"{q_restore:.3f}, the induction heads' output restores {through_head:.3f} (previous-token heads "
          f"{prev_heads}, induction heads {ind_heads})")
    assert through_head > 0.2, f"the induction head's output restores {through_head:.3f} of the gap"
    assert k_restore > 0.8 * through_head, (
        f"K-route restores {k_restore:.3f}, the induction head's whole output {through_head:.3f}")
    assert abs(q_restore) < 0.1, f"Q-route restores {q_restore:.3f} of the gap (expected ~0)"
