"""training/rules.py: each activation rule's forward equals a plain reference implementation on
random inputs (matching pursuit: SAELens's own encoder), its inference rule is what the formats
know, and its record's memory term counts exactly the parameters it creates."""
from __future__ import annotations

import pytest
import torch

from training.dictionary import Dictionary
from training.members import ARCHS, MemberConfig
from training.rules import RULES, rule_of

E, B, F = 2, 6, 12


def _dictionary(activation: str) -> Dictionary:
    arch = next(name for name, spec in ARCHS.items() if spec.activation == activation and not spec.nested)
    members = [MemberConfig(d_in=5, d_sae=F, arch=arch, k=3, threshold_init=0.2, seed=e) for e in range(E)]
    d = Dictionary(members)
    with torch.no_grad():
        for p in d.parameters():
            p.normal_(generator=torch.Generator().manual_seed(p.numel()))
        if activation == "jumprelu":
            d.jump_threshold.abs_()
    return d


def _reference(activation: str, d: Dictionary, pre: torch.Tensor) -> torch.Tensor:
    """The rule written plainly, member by member and row by row.  pre [E, B, F] → f [E, B, F]"""
    out = torch.zeros_like(pre)
    for e in range(E):
        k = int(d.k[e])
        if activation == "batchtopk":  # the k·B largest ReLU values over the member's whole batch
            flat = torch.relu(pre[e]).flatten()
            kept = flat.topk(k * B).indices
            out[e].view(-1)[kept] = flat[kept]
            continue
        for b in range(B):
            z = pre[e, b]
            if activation == "relu":
                out[e, b] = torch.relu(z)
            elif activation == "topk":
                kept = torch.relu(z).topk(k).indices
                out[e, b, kept] = torch.relu(z)[kept]
            elif activation == "abstopk":  # the k largest |z|, signed
                kept = z.abs().topk(k).indices
                out[e, b, kept] = z[kept]
            elif activation == "jumprelu":
                out[e, b] = z * (z > d.jump_threshold[e])
            elif activation == "gated":
                magnitude = (z - d.b_enc[e]) * d.r_mag[e].exp() + d.b_mag[e]
                out[e, b] = (z > 0) * torch.relu(magnitude)
    return out


@pytest.mark.parametrize("activation", sorted(set(RULES) - {"matching_pursuit"}))
def test_each_rules_forward_equals_a_plain_reference(activation):
    d = _dictionary(activation)
    pre = torch.randn(E, B, F, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(RULES[activation].forward(d, pre), _reference(activation, d, pre))


@pytest.mark.parametrize("threshold", [0.0, 0.8])
def test_matching_pursuit_codes_equal_saelens_own_encoder(threshold):
    """Per member (its own k steps and residual threshold), the ensemble's pursuit gives the codes
    of SAELens's `_encode_matching_pursuit`, which its exported files run."""
    from sae_lens.saes.matching_pursuit_sae import _encode_matching_pursuit

    d = _dictionary("matching_pursuit")
    with torch.no_grad():
        d.W_dec.copy_(torch.nn.functional.normalize(d.W_dec, dim=-1))
        d.k_active.copy_(torch.tensor([3, 7]))
        d.residual_threshold.fill_(threshold)
        x = torch.randn(40, 5, generator=torch.Generator().manual_seed(2))
        ours = d.encode(x)
        for e in range(E):
            theirs = _encode_matching_pursuit(x - d.b_dec[e], d.W_dec[e], threshold, max_iterations=int(d.k_active[e]),
                                              stop_on_duplicate_support=True)
            torch.testing.assert_close(ours[e], theirs)
    assert ((ours != 0).sum(-1) <= d.k_active.view(E, 1)).all() and (ours[1] != 0).sum(-1).max() > 3
    # and the same gradient to the decoder as SAELens's training code gets
    W_ours = d.W_dec.detach().clone().requires_grad_()
    d.W_dec = torch.nn.Parameter(W_ours)
    (d.encode(x)[0] @ d.W_dec[0] - x).pow(2).sum().backward()
    W_theirs = d.W_dec.detach()[0].clone().requires_grad_()
    codes = _encode_matching_pursuit(x - d.b_dec[0].detach(), W_theirs, threshold, max_iterations=3, stop_on_duplicate_support=True)
    (codes @ W_theirs - x).pow(2).sum().backward()
    torch.testing.assert_close(d.W_dec.grad[0], W_theirs.grad)


@pytest.mark.parametrize("activation", sorted(RULES))
def test_each_rule_exports_as_a_rule_the_formats_know_and_counts_its_parameters(activation):
    from training.memory import parameter_count

    d = _dictionary(activation)
    rule = RULES[activation]
    assert d.rule is rule is rule_of(d.spec)
    assert d.inference_rule(0).activation == rule.exports_as in ("relu", "topk", "abstopk", "jumprelu", "gated",
                                                                "matching_pursuit")
    assert parameter_count(d.members) == sum(p.numel() for p in d.parameters())


@pytest.mark.parametrize("arch", ["abstopk", "matching_pursuit"])
def test_rules_with_no_transcoder_or_crosscoder_form_are_refused_there_with_the_fix(arch):
    with pytest.raises(ValueError, match=f"{arch} is for SAEs only.*use topk or jumprelu"):
        MemberConfig(d_in=4, d_sae=8, arch=arch, inputs=("a",), targets=("b",))
    with pytest.raises(ValueError, match=f"{arch} is for SAEs only"):
        MemberConfig(d_in=4, d_sae=8, arch=arch, n_sources=2)
