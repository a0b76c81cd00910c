"""The hook vocabulary: what a source's hook name says about it (its layer and kind), and how
`--layers` selects blocks. The store records each source's layer and kind with it; training
wires dictionaries by them; only stage 1 (cache/models.py) needs a model to resolve names.
"""
from __future__ import annotations

import re
from typing import Literal, get_args

# Hook kinds: `--layers L --hook KIND` caches blocks.L.<suffix>. mlp_in_normalized is what the MLP
# reads after its LayerNorm/RMSNorm (TransformerLens folds the norm's weights into the MLP), and
# caching it also caches that norm's per-token scale (blocks.L.ln2.hook_scale, one value a row).
HOOK_KINDS = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "mlp_in": "hook_mlp_in",
    "mlp_in_normalized": "ln2.hook_normalized",
    "mlp_in_scale": "ln2.hook_scale",
    "mlp_post": "mlp.hook_post",
}
HookKind = Literal["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mlp_in", "mlp_in_normalized", "mlp_in_scale",
                   "mlp_post"]  # the keys of HOOK_KINDS as a type: generate_activations.py's --hook choices
assert tuple(HOOK_KINDS) == get_args(HookKind), "HookKind must list HOOK_KINDS"
SCALE_OF = {"mlp_in_normalized": "mlp_in_scale"}  # kinds cached with their norm's scale beside them


class HookError(ValueError):
    """A layer or hook selection that does not fit the model."""


def hook_kind(hook: str) -> tuple[int | None, str | None]:
    """(layer, kind) of a full hook name, e.g. blocks.3.ln2.hook_normalized → (3, mlp_in_normalized);
    (None, None) where it is not blocks.L.<a known kind>."""
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook)
    if match is None:
        return None, None
    kinds = {suffix: kind for kind, suffix in HOOK_KINDS.items()}
    return int(match.group(1)), kinds.get(match.group(2))


def parse_layers(layers: tuple, n_layers: int) -> list[int]:
    """`--layers 2 3` or `--layers all` against a model of `n_layers` blocks."""
    if any(str(x).lower() == "all" for x in layers):
        if len(layers) > 1:
            raise HookError("--layers all stands alone (it means every layer)")
        return list(range(n_layers))
    out = []
    for layer in layers:
        try:
            value = int(layer)
        except ValueError:
            raise HookError(f"--layers {layer!r}: give layer numbers or all") from None
        if not 0 <= value < n_layers:
            raise HookError(f"layer {value} is out of range: the model has {n_layers} layers (0-{n_layers - 1})")
        out.append(value)
    return out
