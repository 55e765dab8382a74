"""Ground truth on the `induction` organism: induction runs through K-composition.

The organism (interp.organisms.induction) is a 2-layer attention-only model trained on random
tokens with a repeated span. Its known mechanism: a layer-0 previous-token head writes "my
previous token was x" at each position, and a layer-1 induction head finds the earlier
occurrence of the current token through its KEY at the source position (K-composition), then
copies the token there. So, path patching the previous-token head's output at the source
position into the induction head's key, read by the last position (route "up at the source,
then right": stream="kv"), must recover most of the clean-vs-corrupted gap, while the route into
the induction head's QUERY at the last position must recover almost none of it.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from interp.graph import Node
from interp.models import load_model, organisms_dir
from interp.patching import logprob, path_patch

CHECKPOINT = organisms_dir() / "induction" / "model.safetensors"

pytestmark = pytest.mark.skipif(
    not CHECKPOINT.is_file(),
    reason=f"the induction organism checkpoint is absent ({CHECKPOINT}); train and save it with "
           f"interp.organisms.induction (issue 3) to run this ground-truth test")


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
    prev_heads = [h for h in range(model.cfg.n_heads) if prev_scores[0, h] > 0.5]
    ind_heads = [h for h in range(model.cfg.n_heads) if ind_scores[1, h] > 0.5]
    assert prev_heads and ind_heads, (prev_scores, ind_scores)

    metric = logprob(answer, pos=-1)
    k_route = path_patch(model, clean, corrupt, metric,
                         [tuple(Node(0, "head", pos=source, head=h) for h in prev_heads)],
                         [Node(1, "k", pos=source, head=h) for h in ind_heads],
                         stream="kv", reader=[query])
    q_route = path_patch(model, clean, corrupt, metric,
                         [tuple(Node(0, "head", pos=query, head=h) for h in prev_heads)],
                         [Node(1, "q", pos=query, head=h) for h in ind_heads],
                         stream="residual")
    gap = k_route.clean_metric - k_route.corrupt_metric
    assert gap > 1.0, f"corruption should hurt the answer's log-prob by > 1 nat, got {gap:.3f}"
    r_k = float(k_route.normalised()[0])
    r_q = float(q_route.normalised()[0])
    assert r_k > 0.5, f"K-route recovery {r_k:.3f} (expected most of the effect)"
    assert abs(r_q) < 0.1, f"Q-route recovery {r_q:.3f} (expected about none of the effect)"
