"""Prove a permutation spec on the network itself: a random permutation must not change it.

Renaming hidden units consistently leaves the function unchanged; a spec that forgets one tensor,
or permutes one that must stay, changes it. So a spec is checked by drawing a random permutation
of every group, applying it to a state dict, and comparing the network's eval-mode outputs on
real inputs before and after, in float64 so that summation order cannot hide a small error.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from modeconn.models.spec import PermutationSpec, apply_permutation, check_spec, random_permutation

__all__ = ["SpecCheckError", "check_permutation_invariance", "perturb_state"]


class SpecCheckError(RuntimeError):
    """A permutation spec changed the network's function: it is wrong for this network."""


@torch.no_grad()
def check_permutation_invariance(
    model: nn.Module,
    spec: PermutationSpec,
    inputs: Tensor,
    *,
    state: Mapping[str, Tensor] | None = None,
    seed: int = 0,
    atol: float = 1e-6,
    dtype: torch.dtype = torch.float64,
) -> float:
    """Largest output change a random permutation causes, relative to ``max(1, max |f(x)|)``.

    Args:
        model: the network; run in eval mode with :func:`torch.func.functional_call` (its own
            parameters and mode are left as they were).
        spec: the permutation spec to check; must cover every key of ``state``.
        inputs: a batch of real inputs.
        state: the weights to check with (default ``model.state_dict()``).
        seed: seeds the random permutation.
        atol: the largest relative change accepted.
        dtype: precision of the check (float64 by default: a correct spec then agrees to ~1e-12).

    Raises:
        SpecCheckError: the change exceeds ``atol``; the message names the first group whose
            permutation alone changes the outputs.
    """
    state = dict(model.state_dict() if state is None else state)
    check_spec(spec, state)
    perms = random_permutation(spec, state, torch.Generator().manual_seed(seed))
    device = inputs.device
    constants = {
        name: b.to(device=device, dtype=dtype) if b.is_floating_point() else b.to(device)
        for name, b in model.named_buffers()
        if name not in state
    }

    def run(weights: Mapping[str, Tensor]) -> Tensor:
        cast = {
            k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
            for k, v in weights.items()
        }
        out = functional_call(
            model, {**cast, **constants}, (inputs.to(dtype),), strict=False, tie_weights=False
        )
        return out if isinstance(out, Tensor) else _first_tensor(out)

    was_training = model.training
    model.eval()
    try:
        expected = run(state)
        scale = max(1.0, float(expected.abs().max()))
        diff = float((run(apply_permutation(state, spec, perms)) - expected).abs().max()) / scale
        if diff <= atol:
            return diff
        culprit = next(
            (
                g
                for g in perms
                if float(
                    (run(apply_permutation(state, spec, {g: perms[g]})) - expected).abs().max()
                )
                / scale
                > atol
            ),
            None,
        )
    finally:
        model.train(was_training)
    where = f"; permuting group {culprit!r} alone changes it" if culprit else ""
    raise SpecCheckError(
        f"the permutation spec changes the network's outputs: max |f(pi(w)) - f(w)| / {scale:.3g} "
        f"= {diff:.3g} > {atol:g} on {len(inputs)} inputs{where}"
    )


def perturb_state(
    model: nn.Module, inputs: Tensor, *, seed: int = 0, scale: float = 0.5
) -> dict[str, Tensor]:
    """A copy of ``model``'s state with every float tensor perturbed and BN statistics refreshed.

    Freshly initialised networks hide spec errors: BN statistics are 0 and 1, norm affines are 1
    and 0, and layer scales may be 1e-6, so permuting them or not looks the same. The check on
    random weights runs on this state instead. BN statistics are recomputed on ``inputs`` (a
    forward pass with the BN layers in train mode, momentum 1, on a copy), so activations stay
    normalised.
    """
    import copy

    gen = torch.Generator().manual_seed(seed)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for value in clone.state_dict().values():
            if value.is_floating_point() and value.numel() > 0:
                size = float(value.abs().mean()) or 1.0
                noise = torch.randn(value.shape, generator=gen, dtype=value.dtype)
                value.add_(noise.to(value.device) * scale * max(size, 1e-2))
        # Only the BN layers run in train mode: dropout and stochastic depth stay off, so the
        # statistics are those of the network that eval mode runs.
        clone.eval()
        for module in clone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = 1.0
                module.train()
        clone(inputs)
    return {k: v.detach().clone() for k, v in clone.state_dict().items()}


def _first_tensor(out) -> Tensor:
    if isinstance(out, Mapping):
        out = list(out.values())
    for value in out:
        if isinstance(value, Tensor):
            return value
    raise TypeError(f"the model returned {type(out).__name__} without a tensor")
