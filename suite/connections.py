"""Find each transcoder latent's connections: the C upstream latents with the largest average
direct-path contribution (suite/model.py has the algebra).

One streaming pass over store rows accumulates, for every upstream module u and every downstream
layer m it feeds, the running mean of f^u / σ_m (a [F] vector per pair: the contribution's only
data-dependent part). It checkpoints its sums every `checkpoint_every` batches, so a killed pass
resumes where it was; the result is the same as an uninterrupted one. Then, per downstream
layer, scores = V ∘ mean over every upstream latent, and the top C by |score| are kept jointly
over all upstream modules, a column block of latents at a time (memory: F_u·block per module).

Files: connections/means.safetensors (the accumulated means, written when the pass completes) and
connections/L{m}.safetensors per transcoder: `indices` [F, C] into m's upstream latent space
(modules in Suite.upstream order, d_sae latents each) and `scores` [F, C], sorted by |score|
(so the first C' ≤ C are the top C'), with the upstream modules in the metadata.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from runtime.disk import save_tensors
from suite.model import Suite

MEANS = "means.safetensors"
PARTIAL = "means.partial.pt"


def module_key(module: tuple[str, int]) -> str:
    part, layer = module
    return f"{part}{layer:02d}"


@torch.no_grad()
def accumulate_means(suite: Suite, batches: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]], n_batches: int,
                     directory: Path, checkpoint_every: int = 50) -> dict[str, torch.Tensor]:
    """E[f^u / σ_m] for every (upstream module u, downstream layer m) pair over `n_batches`
    batches; `batches(start)` yields (x [B, C], ids [B, 2]) from batch `start` on. Resumes from
    its partial sums.  → "attn03>05": [F]"""
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / MEANS).exists():
        return load_file(directory / MEANS)
    L = suite.layout.n_layers
    pairs = [(module, m) for m in range(L) for module in suite.layout.upstream(m)]
    state = {"batch": 0, "rows": 0, "sums": {f"{module_key(u)}>{m:02d}": torch.zeros(suite.d_sae, dtype=torch.float64)
                                             for u, m in pairs}}
    if (directory / PARTIAL).exists():
        state = torch.load(directory / PARTIAL, weights_only=False)
    bar = tqdm(total=n_batches, initial=state["batch"], desc="finding connections", unit="batch")
    for x_BC, _ in batches(state["batch"]):
        if state["batch"] >= n_batches:
            break
        codes = suite.dense_codes(*suite.vanilla(x_BC))
        inv_sigma_BL = torch.stack([1 / suite.sigma(x_BC, m) for m in range(L)], dim=1).double()  # [B, L]
        for u, m in pairs:
            state["sums"][f"{module_key(u)}>{m:02d}"] += (codes[u].double() * inv_sigma_BL[:, m:m + 1]).sum(0).cpu()
        state["rows"] += len(x_BC)
        state["batch"] += 1
        bar.update()
        if state["batch"] % checkpoint_every == 0:
            _save_atomic(state, directory / PARTIAL)
    bar.close()
    means = {key: (total / max(state["rows"], 1)).float() for key, total in state["sums"].items()}
    save_tensors(means, directory / MEANS)
    (directory / PARTIAL).unlink(missing_ok=True)
    return means


@torch.no_grad()
def select(suite: Suite, m: int, means: dict[str, torch.Tensor], n_connections: int,
           block: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Transcoder m's connections: per latent, the `n_connections` upstream latents of largest
    |V_ji · E[f_j / σ_m]|, jointly over all its upstream modules.  → (indices [F, C], scores [F, C])"""
    E = suite.encoder(m)
    modules = suite.layout.upstream(m)
    F = suite.d_sae
    C = min(n_connections, F * len(modules))
    if C == 0:  # nothing upstream (layer 0's MLP beside a parallel attention): the embedding alone
        return torch.zeros(F, 0, dtype=torch.long), torch.zeros(F, 0)
    indices, scores = [], []
    for start in range(0, F, block):
        columns = slice(start, min(start + block, F))
        S_UB = torch.cat([(suite.decoder(u)[0] @ E[:, columns]) * means[f"{module_key(u)}>{m:02d}"].to(E.device).unsqueeze(1)
                          for u in modules])  # [U, block]: every upstream latent's score for these latents
        top = S_UB.abs().topk(C, dim=0).indices  # [C, block], largest |score| first
        indices.append(top.T)
        scores.append(S_UB.gather(0, top).T)
    return torch.cat(indices), torch.cat(scores)


def save_index(directory: Path, m: int, indices: torch.Tensor, scores: torch.Tensor, suite: Suite) -> Path:
    path = directory / f"L{m:02d}.safetensors"
    metadata = {"upstream": json.dumps([module_key(u) for u in suite.layout.upstream(m)]), "d_sae": str(suite.d_sae)}
    tmp = path.with_suffix(".tmp")
    save_tensors({"indices": indices.contiguous().cpu(), "scores": scores.contiguous().cpu()}, tmp, metadata=metadata)
    os.replace(tmp, path)
    return path


def load_index(directory: Path, m: int, n_connections: int | None = None, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [F, C], scores [F, C]) of transcoder m, the first `n_connections` of each latent's."""
    t = load_file(directory / f"L{m:02d}.safetensors", device=str(device))
    C = n_connections or t["indices"].shape[1]
    return t["indices"][:, :C], t["scores"][:, :C]


def find_connections(suite: Suite, batches, n_batches: int, directory: Path, n_connections: int) -> None:
    """The whole stage: means (resumable), then one index file per transcoder (skipped if written)."""
    means = accumulate_means(suite, batches, n_batches, directory)
    for m in tqdm(range(suite.layout.n_layers), desc="selecting connections", unit="layer"):
        if (directory / f"L{m:02d}.safetensors").exists():
            continue
        indices, scores = select(suite, m, means, n_connections)
        save_index(directory, m, indices, scores, suite)


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
