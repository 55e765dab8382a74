"""The replicator view of softmax decoding.

With payoffs z fixed (the logits), the replicator flow on the probability simplex is

    dx_i/dt = x_i (z_i - x . z),

and from the uniform distribution its solution is x(t) = softmax(t z) (d/dt log x_i = z_i - x.z,
so log x_i(t) = t z_i - log-normaliser). Sampling at temperature T reads the flow at time
t = 1/T; greedy decoding is its limit t -> inf. The multiplicative-weights (exponential-weights)
update x <- x e^{eta z} / sum is its exact discretisation: n steps give softmax(n eta z). The
Euler step of the ODE, x <- x + eta x (z - x.z), converges to it as eta -> 0 (first order).
Top-k / top-p sampling is the same flow restricted to a face of the simplex: the tokens outside
the kept set have x_i = 0, which the flow never leaves, and the flow from the face's barycentre
is softmax(t z) renormalised on the face.

References: Taylor & Jonker 1978 (replicator dynamics); Hofbauer & Sigmund 1998, ch. 7;
Arora, Hazan & Kale 2012 (multiplicative weights).
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor


def replicator_field(x: Float[Tensor, "*rest d_vocab"], z: Float[Tensor, "*rest d_vocab"]) -> Float[Tensor, "*rest d_vocab"]:
    """dx/dt of the replicator flow with payoffs `z` at `x` (entries of z outside the support of x
    may be -inf: those coordinates have x_i = 0 and stay there)."""
    zf = torch.where(x > 0, z, torch.zeros_like(z))
    return x * (zf - (x * zf).sum(-1, keepdim=True))


def face(logits: Float[Tensor, "*rest d_vocab"]) -> Bool[Tensor, "*rest d_vocab"]:
    """The face of the simplex a restricted logit vector lives on (its finite entries)."""
    return torch.isfinite(logits)


def replicator_path(logits: Float[Tensor, "*rest d_vocab"], times: Float[Tensor, "time"] | list[float]
                    ) -> Float[Tensor, "time *rest d_vocab"]:
    """x(t) of the replicator flow with payoffs `logits` from the barycentre of their face
    (uniform over the finite entries): softmax(t z) on the face, 0 off it. t = 0 is the
    barycentre; t = 1/T is sampling at temperature T. Computed in at least float32."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    t = torch.as_tensor(times, dtype=z.dtype, device=z.device)
    if t.ndim != 1:
        raise ValueError(f"replicator_path: times expected a 1-d sequence, got shape {tuple(t.shape)}")
    on = face(z)
    if not bool(on.any(-1).all()):
        raise ValueError("replicator_path: expected at least one finite logit per distribution, got none")
    zt = t.reshape(-1, *([1] * z.ndim)) * torch.where(on, z, torch.zeros_like(z))
    return torch.softmax(zt.masked_fill(~on, float("-inf")), dim=-1)


def multiplicative_weights(logits: Float[Tensor, "*rest d_vocab"], eta: float, steps: int,
                           x0: Float[Tensor, "*rest d_vocab"] | None = None) -> Float[Tensor, "*rest d_vocab"]:
    """`steps` multiplicative-weights updates x <- x e^{eta z} / sum from `x0` (default: the
    barycentre of the logits' face), in log space."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    on = face(z)
    log_x = (torch.log(x0.to(z.dtype)) if x0 is not None
             else torch.where(on, torch.zeros_like(z), torch.full_like(z, float("-inf"))))
    zf = torch.where(on, z, torch.zeros_like(z))
    for _ in range(steps):
        log_x = torch.log_softmax(log_x + eta * zf, dim=-1)
    return log_x.exp()


def euler_path(logits: Float[Tensor, "*rest d_vocab"], t: float, steps: int) -> Float[Tensor, "*rest d_vocab"]:
    """Forward-Euler integration of the replicator ODE to time `t` in `steps` steps from the
    barycentre (first-order: its error to softmax(t z) shrinks like t / steps)."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    on = face(z)
    x = on.to(z.dtype) / on.sum(-1, keepdim=True)
    h = t / steps
    for _ in range(steps):
        x = x + h * replicator_field(x, z)
    return x


def time_of_temperature(temperature: float) -> float:
    """The replicator time at which the flow equals sampling at `temperature` (t = 1/T)."""
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    return 1.0 / temperature
