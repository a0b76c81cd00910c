"""training/rules.py: each activation rule's forward equals a plain reference implementation on
random inputs, its inference rule is what the formats know, and its record's memory term counts
exactly the parameters it creates."""
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
            elif activation == "jumprelu":
                out[e, b] = z * (z > d.jump_threshold[e])
            elif activation == "gated":
                magnitude = (z - d.b_enc[e]) * d.r_mag[e].exp() + d.b_mag[e]
                out[e, b] = (z > 0) * torch.relu(magnitude)
    return out


@pytest.mark.parametrize("activation", sorted(RULES))
def test_each_rules_forward_equals_a_plain_reference(activation):
    d = _dictionary(activation)
    pre = torch.randn(E, B, F, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(RULES[activation].forward(d, pre), _reference(activation, d, pre))


@pytest.mark.parametrize("activation", sorted(RULES))
def test_each_rule_exports_as_a_rule_the_formats_know_and_counts_its_parameters(activation):
    from training.memory import parameter_count

    d = _dictionary(activation)
    rule = RULES[activation]
    assert d.rule is rule is rule_of(d.spec)
    assert d.inference_rule(0).activation == rule.exports_as in ("relu", "topk", "jumprelu", "gated")
    assert parameter_count(d.members) == sum(p.numel() for p in d.parameters())
