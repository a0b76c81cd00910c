"""The on-disk formats of trained members, one module each (saelens, crosscoder, circuit_tracer),
and `load_any`: whatever a member directory holds, its configuration, weights and forward on raw
inputs read side by side."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

Forward = Callable  # raw inputs [B, I] → (f [B, F], ŷ [B, O])


@dataclass(frozen=True)
class Loaded:
    """A member as its format stores it."""

    format: str  # saelens | crosscoder | circuit_tracer_clt
    config: dict = field(repr=False)
    weights: dict = field(repr=False)
    forward: Forward = field(repr=False)
    d_sae: int = 0  # latents (over every layer, for a cross-layer transcoder)
    sources: tuple[str, ...] = ()  # the source names the format records (crosscoders), else ()


def load_any(directory: str | Path, device: str = "cpu") -> Loaded:
    """The member in `directory`, whichever format it is in."""
    from formats import circuit_tracer
    from formats.crosscoder import crosscoder_forward, is_crosscoder_dir, load_crosscoder
    from formats.saelens import load_saelens, saelens_forward

    directory = Path(directory)
    if circuit_tracer.is_circuit_tracer_dir(directory):
        config, layers = circuit_tracer.load(directory, device)
        L, d = len(layers), layers[0]["W_enc"].shape[1]
        weights = {f"{k}_{layer}": v for layer, t in enumerate(layers) for k, v in t.items()}
        return Loaded("circuit_tracer_clt", config, weights,
                      lambda x_BI: circuit_tracer.forward(config, layers, x_BI.view(-1, L, d)), L * layers[0]["W_enc"].shape[0])
    if is_crosscoder_dir(directory):
        config, weights = load_crosscoder(directory, device)
        S, D = config["n_sources"], config["d_in"]

        def forward(x_BI):
            f_BF, x_hat_BSD = crosscoder_forward(config, weights, x_BI.view(-1, S, D))
            return f_BF, x_hat_BSD.flatten(1)

        return Loaded("crosscoder", config, weights, forward, config["d_sae"], tuple(s["name"] for s in config["sources"]))
    config, weights = load_saelens(directory, device)
    return Loaded("saelens", config, weights, lambda x: saelens_forward(config, weights, x), config["d_sae"])
