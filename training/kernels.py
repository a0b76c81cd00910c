"""Custom autograd kernels of the dictionaries: the sparse TopK encoder and the JumpReLU
straight-through estimators. Each is tested against the dense computation or the smoothed loss
whose gradient it stands for (tests/test_architectures.py).

Dimension key: U units (one encoder each: members × a cross-layer transcoder's layers), B batch,
I a unit's input width, F latents per unit, K latents kept per row.
"""
from __future__ import annotations

import torch


def keep_top(values_UBN: torch.Tensor, k_U: torch.Tensor, score_UBN: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the entries of each row of unit u with the k_u largest scores (default: the values
    themselves; AbsTopK ranks by |value|), zero the rest.  → [U, B, N]

    One topk at the largest k, then a rank mask per unit: units may differ in k."""
    k_max = int(k_U.max())
    top_index = (values_UBN if score_UBN is None else score_UBN).topk(k_max, dim=-1, sorted=True).indices
    rank_mask = torch.arange(k_max, device=values_UBN.device) < k_U.view(-1, 1, 1)
    return torch.zeros_like(values_UBN).scatter(-1, top_index, values_UBN.gather(-1, top_index) * rank_mask)


class TopKEncode(torch.autograd.Function):
    """(values, indices) of the k_u largest ReLU pre-activations of each row, pre = x W_enc + bias,
    with a sparse backward: only the B·k selected entries carry gradient, so W_enc's gradient is a
    sparse [F, B] × dense [B, I] product instead of a dense [I, B] × [B, F] one.
    x [U or 1, B, I] (1: every unit reads the same rows), W_enc [U, I, F], bias [U, 1, F], k [U],
    optional width mask [U, 1, F]  → values [U, B, K], indices [U, B, K] (K = max k)."""

    @staticmethod
    def forward(ctx, x_UBI, W_enc_UIF, bias_U1F, k_U, mask_U1F=None):
        U, B = W_enc_UIF.shape[0], x_UBI.shape[1]
        pre_UBF = torch.baddbmm(bias_U1F, x_UBI.expand(U, B, -1), W_enc_UIF)
        if mask_U1F is not None:
            pre_UBF = pre_UBF * mask_U1F
        values, index = torch.relu(pre_UBF).topk(int(k_U.max()), dim=-1)
        keep = (values > 0) & (torch.arange(values.shape[-1], device=values.device) < k_U.view(-1, 1, 1))
        ctx.save_for_backward(x_UBI, index, keep)
        ctx.d_sae = W_enc_UIF.shape[-1]
        ctx.mark_non_differentiable(index)
        return values * keep, index

    @staticmethod
    def backward(ctx, grad_values, grad_index):
        x_UBI, index, keep = ctx.saved_tensors
        g_UBK = (grad_values * keep).to(x_UBI.dtype)  # ReLU and rank mask (float32: bf16 autocast covers the forward only)
        U, B, K = g_UBK.shape
        grad_bias = g_UBK.new_zeros(U, 1, ctx.d_sae).scatter_add_(-1, index.reshape(U, 1, B * K), g_UBK.reshape(U, 1, B * K))
        rows = torch.arange(B, device=x_UBI.device).repeat_interleave(K)
        grad_W = []
        for u in range(U):
            sparse_FB = torch.sparse_coo_tensor(torch.stack([index[u].reshape(-1), rows]), g_UBK[u].reshape(-1),
                                                (ctx.d_sae, B), check_invariants=False)  # valid by construction
            grad_W.append(torch.sparse.mm(sparse_FB, x_UBI[u if len(x_UBI) > 1 else 0]).T)  # [I, F]
        return None, torch.stack(grad_W), grad_bias, None, None


class JumpReLU(torch.autograd.Function):
    """f = z · H(z − θ). Straight-through estimator (Rajamanoharan et al. 2024, eq. 11):
    ∂f/∂z = H(z − θ); ∂f/∂θ = −(θ/ε) K((z − θ)/ε), K(u) = 1[|u| < ½]."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta, eps)
        return z * (z > theta)

    @staticmethod
    def backward(ctx, grad_f):
        z, theta, eps = ctx.saved_tensors
        in_window = ((z - theta).abs() < eps / 2).to(z.dtype)
        grad_theta = -(theta / eps) * in_window * grad_f
        return grad_f * (z > theta), sum_to(grad_theta, theta.shape), None


class Step(torch.autograd.Function):
    """H(z − θ), with ∂H/∂θ = −(1/ε) K((z − θ)/ε) and no gradient to z (the L0 penalty trains
    thresholds only; Rajamanoharan et al. 2024, eq. 12)."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta, eps)
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad_h):
        z, theta, eps = ctx.saved_tensors
        in_window = ((z - theta).abs() < eps / 2).to(z.dtype)
        return None, sum_to(-(1 / eps) * in_window * grad_h, theta.shape), None


def sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast gradient back to the shape of the tensor it came from."""
    dims = [i for i, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1]
    return grad.sum(dim=dims, keepdim=True)
