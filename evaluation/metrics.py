"""Reconstruction and sparsity metrics of E dictionaries, accumulated over evaluation batches.

Dimension key: B batch, D d_in, F d_sae, E members. All sums are float64 and per token, so the
results do not depend on how the evaluation set is cut into batches.

    L0        mean_b #{f_i > 0}
    MSE       mean_{b,d} (x̂ − x)²
    FVU       Σ_b ‖x − x̂‖² / Σ_b ‖x − x̄‖²   (ratio of sums, against the mean x̄ of the set)
    cosine    mean_b cos(x, x̂);   L2 ratio  mean_b ‖x̂‖ / ‖x‖ (below 1: shrinkage)
    density   fraction of tokens on which latent i fires; dead: never fires on the set
"""
from __future__ import annotations

import torch


class MetricAccumulator:
    def __init__(self, n_members: int, d_in: int, d_sae: int, device: str | torch.device = "cpu"):
        kw = {"dtype": torch.float64, "device": device}
        self.n_tokens = 0
        self.sum_x_D = torch.zeros(d_in, **kw)
        self.sum_x_sq = torch.zeros((), **kw)
        self.sse_E = torch.zeros(n_members, **kw)
        self.l0_E = torch.zeros(n_members, **kw)
        self.cos_E = torch.zeros(n_members, **kw)
        self.l2_ratio_E = torch.zeros(n_members, **kw)
        self.fires_EF = torch.zeros(n_members, d_sae, **kw)

    @torch.no_grad()
    def update(self, x_BD: torch.Tensor, x_hat_EBD: torch.Tensor, f_EBF: torch.Tensor) -> None:
        x = x_BD.double()
        x_hat = x_hat_EBD.double()
        self.n_tokens += x.shape[0]
        self.sum_x_D += x.sum(0)
        self.sum_x_sq += x.pow(2).sum()
        self.sse_E += (x_hat - x).pow(2).sum(dim=(1, 2))
        active_EBF = f_EBF != 0  # signed codes (abstopk) are active below 0 too
        self.l0_E += active_EBF.sum(dim=(1, 2)).double()
        self.fires_EF += active_EBF.sum(dim=1).double()
        x_norm_B = x.norm(dim=-1).clamp_min(1e-12)
        x_hat_norm_EB = x_hat.norm(dim=-1)
        self.cos_E += ((x_hat * x).sum(-1) / (x_hat_norm_EB.clamp_min(1e-12) * x_norm_B)).sum(-1)
        self.l2_ratio_E += (x_hat_norm_EB / x_norm_B).sum(-1)

    def density(self) -> torch.Tensor:
        """Firing frequency of every latent.  → [E, F]"""
        return self.fires_EF / max(self.n_tokens, 1)

    def results(self) -> list[dict[str, float]]:
        """One dict of metrics per member."""
        n = max(self.n_tokens, 1)
        d = self.sum_x_D.numel()
        total_var = self.sum_x_sq - self.sum_x_D.pow(2).sum() / n  # Σ_b ‖x − x̄‖²
        fvu_E = self.sse_E / total_var.clamp_min(1e-30)
        density_EF = self.density()
        rows = []
        for e in range(len(self.sse_E)):
            rows.append(
                {
                    "l0": (self.l0_E[e] / n).item(),
                    "mse": (self.sse_E[e] / (n * d)).item(),
                    "fvu": fvu_E[e].item(),
                    "explained_variance": 1 - fvu_E[e].item(),
                    "cosine": (self.cos_E[e] / n).item(),
                    "l2_ratio": (self.l2_ratio_E[e] / n).item(),
                    "dead_fraction": (density_EF[e] == 0).double().mean().item(),
                    "dense_fraction_10pct": (density_EF[e] > 0.1).double().mean().item(),
                    "dense_fraction_1pct": (density_EF[e] > 0.01).double().mean().item(),
                    "n_tokens": self.n_tokens,
                }
            )
        return rows
