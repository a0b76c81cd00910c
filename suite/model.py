"""The sparsely connected suite (SCAE): at every layer a TopK SAE on the attention output and a
TopK transcoder from the MLP's normalised input to its output, and the pruned pass in which each
transcoder latent depends on a few upstream latents only.

Dimension key: B rows, L layers, d model width, F latents per module, k active latents per row,
C connections per latent, U a downstream module's upstream latents (all its upstream modules'
latents side by side, in `Suite.upstream(m)` order).

Residual-stream algebra, in raw units. The MLP at layer m reads x̃_m = N(r_m)/σ_m: the residual
r_m, centred for LayerNorm (not for RMSNorm), divided by the norm's per-token scale σ_m (cached as
`ln2.hook_scale`; TransformerLens folds the norm's weights into the MLP, and the transcoder reads
x̃_m, so they are folded into its encoder). r_m is the embedding e (token, plus position where the
model has learned positions) plus the outputs of the earlier attention layers (and of layer m's
own, unless attention and MLP run in parallel) and of the earlier MLPs. With the suite's modules
standing in for those outputs, transcoder m's pre-activation of latent i is linear in the upstream
latents:

    pre_i = [ Ẽ_i · (e + Σ_u b_u) + Σ_{u, j} f_j^u V_ji ] / σ_m + b_enc,i        V_ji = W_dec,j^u · Ẽ_i

with Ẽ_i the transcoder's encoder column in raw units (centred over d for LayerNorm), b_u and
W_dec^u each upstream module's raw output bias and decoder. Every upstream module's bias enters
once; the embedding always enters. The connection score of upstream latent j for latent i is the
mean over tokens of its direct contribution, V_ji f_j^u / σ_m = V_ji · E[f_j^u / σ_m], so one pass
accumulating E[f^u / σ_m] per (upstream module, downstream layer) is enough; a latent keeps the C
upstream latents of largest |score| over all its upstream modules (suite/connections.py). The
pruned pass keeps only those in the sum, for the latents active in the vanilla pass, and decodes
them without a new top-k (attention SAEs stay leaves: their activations are the vanilla ones).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F_

from training.dictionary import Dictionary
from training.members import MemberConfig


class ConnectionWeights(torch.autograd.Function):
    """V[i, c] = E[:, i] · W[idx[i, c]]: the virtual weight of each connection, computed for the
    connected pairs only (F·C·d multiply-adds, not the F·U·d of every pair) in chunks of latents.
    Backward recomputes the gathered rows chunk by chunk, so only E, W and the indices are kept
    between the passes (a [F, U] product or [F, C, d] gather per transcoder would not fit a
    many-layer suite's step in memory)."""

    CHUNK_VALUES = 2**22  # gathered values per chunk (16 MB in fp32)

    @staticmethod
    def forward(ctx, E_dF: torch.Tensor, W_Ud: torch.Tensor, idx_FC: torch.Tensor) -> torch.Tensor:
        V_FC = torch.empty(idx_FC.shape, dtype=E_dF.dtype, device=E_dF.device)
        for part in ConnectionWeights._chunks(idx_FC, E_dF.shape[0]):
            V_FC[part] = torch.einsum("fcd,df->fc", W_Ud[idx_FC[part]], E_dF[:, part])
        ctx.save_for_backward(E_dF, W_Ud, idx_FC)
        return V_FC

    @staticmethod
    def backward(ctx, grad_FC: torch.Tensor):
        E_dF, W_Ud, idx_FC = ctx.saved_tensors
        grad_E = torch.zeros_like(E_dF) if ctx.needs_input_grad[0] else None
        grad_W = torch.zeros_like(W_Ud) if ctx.needs_input_grad[1] else None
        for part in ConnectionWeights._chunks(idx_FC, E_dF.shape[0]):
            g_fC = grad_FC[part]
            if grad_E is not None:
                grad_E[:, part] = torch.einsum("fc,fcd->df", g_fC, W_Ud[idx_FC[part]])
            if grad_W is not None:
                rows_fCd = g_fC.unsqueeze(-1) * E_dF[:, part].T.unsqueeze(1)
                grad_W.index_add_(0, idx_FC[part].flatten(), rows_fCd.flatten(0, 1))
        return grad_E, grad_W, None

    @staticmethod
    def _chunks(idx_FC: torch.Tensor, d: int) -> list[slice]:
        F, C = idx_FC.shape
        step = max(1, ConnectionWeights.CHUNK_VALUES // max(1, C * d))
        return [slice(s, min(s + step, F)) for s in range(0, F, step)]


@dataclass(frozen=True)
class SuiteLayout:
    """The store's sources the suite reads, per layer, and the model facts its algebra needs."""

    attn: tuple[str, ...]  # source of each layer's attention output
    mlp_in: tuple[str, ...]  # each MLP's normalised input (ln2.hook_normalized)
    scale: tuple[str, ...]  # each MLP norm's per-token scale (ln2.hook_scale)
    mlp_out: tuple[str, ...]  # each MLP's output
    centred: bool  # the norm centres (LayerNorm); RMSNorm does not
    parallel: bool  # attention and MLP read the same residual (GPT-NeoX): layer m's MLP does not see attention m

    @property
    def n_layers(self) -> int:
        return len(self.attn)

    def upstream(self, m: int) -> list[tuple[str, int]]:
        """The modules whose outputs reach MLP m directly, in a fixed order: ("attn", l), ("mlp", l)."""
        last_attn = m - 1 if self.parallel else m
        return [("attn", layer) for layer in range(last_attn + 1)] + [("mlp", layer) for layer in range(m)]


class Suite(torch.nn.Module):
    """The suite's modules as two ensembles (all attention SAEs, all transcoders: each member
    reads its own layer's columns of a batch) and the raw-unit views the pruned pass uses.
    `scales`: each source's normalisation factor (the ensembles train on normalised columns)."""

    def __init__(self, layout: SuiteLayout, d: int, d_sae: int, k: int, columns: dict[str, tuple[int, int]],
                 scales: dict[str, float], lr: float, seed: int = 0, dead_tokens: int = 10_000_000):
        super().__init__()
        self.layout = layout
        self.columns = columns
        self.d_sae = d_sae
        L = layout.n_layers
        attn = [MemberConfig(d_in=d, d_sae=d_sae, arch="topk", k=k, inputs=(layout.attn[layer],), lr=lr, seed=seed + layer)
                for layer in range(L)]
        mlp = [MemberConfig(d_in=d, d_sae=d_sae, arch="topk", k=k, inputs=(layout.mlp_in[layer],),
                            targets=(layout.mlp_out[layer],), lr=lr, seed=seed + L + layer) for layer in range(L)]
        self.attn = Dictionary(attn, columns, aux_dead_tokens=dead_tokens)
        self.mlp = Dictionary(mlp, columns, aux_dead_tokens=dead_tokens)
        self.register_buffer("attn_scale", torch.tensor([scales[s] for s in layout.attn]))
        self.register_buffer("in_scale", torch.tensor([scales[s] for s in layout.mlp_in]))
        self.register_buffer("out_scale", torch.tensor([scales[s] for s in layout.mlp_out]))
        self.sigma_scale = [scales[s] for s in layout.scale]  # σ is read normalised like every source

    # ---------------------------------------------------------------- raw-unit views
    def decoder(self, module: tuple[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_dec [F, d], b_dec [d]) of an upstream module in raw residual units."""
        part, layer = module
        d, s = (self.attn, self.attn_scale[layer]) if part == "attn" else (self.mlp, self.out_scale[layer])
        return d.W_dec[layer] * s, d.b_dec[layer] * s

    def encoder(self, m: int) -> torch.Tensor:
        """Transcoder m's encoder on raw residual contributions, centred over d for LayerNorm:
        Ẽ with pre = Ẽᵀ (N(v) / σ) for a residual vector v.  → [d, F]"""
        E = self.mlp.W_enc[m] / self.in_scale[m]
        return E - E.mean(0, keepdim=True) if self.layout.centred else E

    def sigma(self, x_BC: torch.Tensor, m: int) -> torch.Tensor:
        """MLP m's norm scale of every row, raw.  → [B]"""
        start, _ = self.columns[self.layout.scale[m]]
        return x_BC[:, start] * self.sigma_scale[m]

    # ---------------------------------------------------------------- one module on raw activations
    def encode(self, part: str, layer: int, x_raw_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A module's TopK latents on raw activations of its input (what its ensemble computes on
        the normalised ones).  → (values [B, k], indices [B, k])"""
        d = self.attn if part == "attn" else self.mlp
        scale = self.attn_scale[layer] if part == "attn" else self.in_scale[layer]
        bias = d.b_enc[layer] - (d.b_dec[layer] @ d.W_enc[layer] if d.subtract_b_dec else 0)
        pre = torch.relu((x_raw_BD / scale) @ d.W_enc[layer] + bias)
        values, index = pre.topk(int(d.k[layer]), dim=-1)
        return values, index

    def decode(self, part: str, layer: int, values_BK: torch.Tensor, index_BK: torch.Tensor) -> torch.Tensor:
        """A module's output in raw units from its active latents.  → [B, d]"""
        d = self.attn if part == "attn" else self.mlp
        scale = self.attn_scale[layer] if part == "attn" else self.out_scale[layer]
        y = F_.embedding_bag(index_BK, d.W_dec[layer], per_sample_weights=values_BK, mode="sum") + d.b_dec[layer]
        return y * scale

    def reconstructed_pre(self, m: int, codes: dict, embed_Bd: torch.Tensor, sigma_B: torch.Tensor) -> torch.Tensor:
        """Transcoder m's pre-activations of every latent on the residual the suite rebuilds (the
        embedding plus every upstream module's output): what the pruned pass gives with every
        upstream latent connected.  → [B, F]"""
        residual = embed_Bd + sum(codes[u] @ self.decoder(u)[0] + self.decoder(u)[1] for u in self.layout.upstream(m))
        return residual @ self.encoder(m) / sigma_B.unsqueeze(1) + self.mlp.b_enc[m]

    # ---------------------------------------------------------------- the passes
    def vanilla(self, x_BC: torch.Tensor):
        """Both ensembles' losses (MSE, AuxK) and codes on a batch.  → (attn LossOutput, mlp LossOutput)"""
        return self.attn.loss(x_BC), self.mlp.loss(x_BC)

    def dense_codes(self, attn_out, mlp_out) -> dict[tuple[str, int], torch.Tensor]:
        """Every module's latents as dense rows (differentiable in the kept values).  → module: [B, F]"""
        attn_f, mlp_f = attn_out.codes.to_dense(self.d_sae), mlp_out.codes.to_dense(self.d_sae)
        codes = {("attn", layer): attn_f[layer] for layer in range(self.layout.n_layers)}
        codes.update({("mlp", layer): mlp_f[layer] for layer in range(self.layout.n_layers)})
        return codes

    def virtual_weights(self, m: int, index_FC: torch.Tensor) -> torch.Tensor:
        """V_ji for each latent i of transcoder m and each of its connections j (indices into the
        upstream latent space), from the current weights.  → [F, C]"""
        W_Ud = torch.cat([self.decoder(module)[0] for module in self.layout.upstream(m)])  # upstream decoder rows
        return ConnectionWeights.apply(self.encoder(m), W_Ud, index_FC)

    def constant(self, m: int, embed_Bd: torch.Tensor) -> torch.Tensor:
        """Ẽᵀ(e + Σ_u b_u) of every row and latent of transcoder m (before ÷ σ).  → [B, F]"""
        bias = sum(self.decoder(module)[1] for module in self.layout.upstream(m))
        return (embed_Bd + bias) @ self.encoder(m)

    def pruned_pre(self, m: int, codes: dict, sigma_B: torch.Tensor, embed_Bd: torch.Tensor, index_FC: torch.Tensor,
                   active_BK: torch.Tensor, V_FC: torch.Tensor | None = None) -> torch.Tensor:
        """Pruned pre-activations of transcoder m's latents `active` of each row, from the
        upstream latents `codes` (module: [B, F]) through its connections `index` (V computed from
        the current weights unless given), with the norm scale σ frozen at its value.  → [B, K]"""
        const = self.constant(m, embed_Bd).gather(1, active_BK)
        modules = self.layout.upstream(m)
        connected = torch.zeros_like(const)
        if modules and index_FC.shape[1]:
            U = torch.cat([codes[module] for module in modules], dim=-1)  # [B, U]
            V_FC = self.virtual_weights(m, index_FC) if V_FC is None else V_FC
            B, K = active_BK.shape
            idx_BKC = index_FC[active_BK]  # [B, K, C]
            # indexing, not gather: its backward keeps only the indices, not U
            f_BKC = U[torch.arange(B, device=U.device).view(B, 1, 1), idx_BKC]
            connected = (f_BKC * V_FC[active_BK]).sum(-1)
        return (const + connected) / sigma_B.unsqueeze(1) + self.mlp.b_enc[m][active_BK]

    def pruned_output(self, m: int, pre_BK: torch.Tensor, active_BK: torch.Tensor, alive_BK: torch.Tensor) -> torch.Tensor:
        """Transcoder m's output from the pruned activations of its vanilla active latents
        (`alive`: kept with a positive value in the vanilla pass), in its target's normalised
        units (no new top-k).  → [B, d_out]"""
        values = torch.relu(pre_BK) * alive_BK
        return F_.embedding_bag(active_BK, self.mlp.W_dec[m], per_sample_weights=values, mode="sum") + self.mlp.b_dec[m]

    def pruned_mse(self, m: int, y_hat_BO: torch.Tensor, x_BC: torch.Tensor) -> torch.Tensor:
        """MSE of a pruned output against MLP m's output, in its normalised units."""
        start, width = self.columns[self.layout.mlp_out[m]]
        return (y_hat_BO - x_BC[:, start:start + width]).pow(2).mean()


def active_latents(mlp_loss, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The latents transcoder m keeps in each row of the vanilla pass, and which of them are
    positive there.  → ([B, k] indices, [B, k] bool)"""
    codes = mlp_loss.codes
    return codes.index[m], codes.values[m].detach() > 0
