"""Spliced CE/KL: the prefix-sharing, stacked, chunked computation equals the straightforward one
(a full forward per splice with [b, T, V] log-probabilities), and its memory does not grow with
the batch's positions × vocabulary."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from evaluation.splice import Splice, single, spliced_losses


def tiny_model(d_vocab: int = 64, soft_cap: float = -1.0, d_model: int = 16):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(n_layers=3, d_model=d_model, n_ctx=32, d_head=4, n_heads=d_model // 4, d_mlp=32,
                                  d_vocab=d_vocab, act_fn="gelu", normalization_type="LN",
                                  output_logits_soft_cap=soft_cap)
    return HookedTransformer(cfg).eval()


def straightforward(model, sequences, splices, first_pos, exclude_tokens, batch_size):
    """The reference: every splice reruns the whole model, log-probabilities of the whole batch."""
    sums = {name: torch.zeros(2, dtype=torch.float64) for name in ["clean", *splices]}
    n = 0
    with torch.inference_mode():
        for start in range(0, len(sequences), batch_size):
            tokens = sequences[start: start + batch_size]
            batch = slice(start, start + len(tokens))
            clean = model(tokens).log_softmax(-1)[:, :-1]
            targets = tokens[:, 1:].unsqueeze(-1)
            sums["clean"][0] += -clean.gather(-1, targets).double().sum()
            n += targets.numel()
            keep_clean = torch.isin(tokens[:, first_pos:], torch.tensor(exclude_tokens)).reshape(-1, 1)
            for name, splice in splices.items():
                recorded = {}

                def record(act, hook):
                    recorded[hook.name] = act[:, first_pos:].reshape(-1, act.shape[-1]).float()

                def replacing(fn):
                    def hook_fn(act, hook):
                        x = act[:, first_pos:].reshape(-1, act.shape[-1]).float()
                        rows = torch.where(keep_clean, x, fn(x, recorded, batch))
                        act = act.clone()
                        act[:, first_pos:] = rows.reshape(act[:, first_pos:].shape)
                        return act
                    return hook_fn

                hooks = [(h, record) for h in splice.record] + [(h, replacing(fn)) for h, fn in splice.replace]
                logp = model.run_with_hooks(tokens, fwd_hooks=hooks).log_softmax(-1)[:, :-1]
                sums[name] += torch.stack([-logp.gather(-1, targets).double().sum(),
                                           (clean.exp() * (clean - logp)).sum(-1).double().sum()])
    out = {"clean": {"ce": sums["clean"][0].item() / n}}
    out.update({k: {"ce": v[0].item() / n, "kl": v[1].item() / n} for k, v in sums.items() if k != "clean"})
    return out


def some_splices(d: int) -> dict[str, Splice]:
    g = torch.Generator().manual_seed(1)
    A, B, C = (torch.randn(d, d, generator=g) * 0.3 + torch.eye(d) for _ in range(3))
    W = torch.randn(d, d, generator=g) * 0.2
    transcoder = Splice((("blocks.0.hook_mlp_out", lambda x, rec, b: rec["blocks.0.ln2.hook_normalized"] @ W),),
                        record=("blocks.0.ln2.hook_normalized",))
    # a cross-layer replacement: layer 1's output from layer 0's and 1's inputs, as they flow
    clt = Splice((("blocks.0.hook_mlp_out", lambda x, rec, b: rec["blocks.0.ln2.hook_normalized"] @ W),
                  ("blocks.1.hook_mlp_out", lambda x, rec, b: (rec["blocks.0.ln2.hook_normalized"]
                                                               + rec["blocks.1.ln2.hook_normalized"]) @ W)),
                 record=("blocks.0.ln2.hook_normalized", "blocks.1.ln2.hook_normalized"))
    return {
        "zero@2": single("blocks.2.hook_resid_post", lambda x, _: torch.zeros_like(x)),
        "sae_a@1": single("blocks.1.hook_resid_post", lambda x, _: x @ A),
        "sae_b@1": single("blocks.1.hook_resid_post", lambda x, _: x @ B),
        "sae_c@2": single("blocks.2.hook_mlp_out", lambda x, _: x @ C),
        "by_batch@1": single("blocks.1.hook_resid_pre", lambda x, batch: x * (1 + 0.1 * batch.start)),
        "transcoder@0": transcoder,
        "clt@0-1": clt,
        "embed": single("hook_embed", lambda x, _: x * 0.5),
    }


@pytest.mark.parametrize("soft_cap", [-1.0, 3.0])
def test_prefix_sharing_stacked_chunked_losses_equal_full_forwards(soft_cap, monkeypatch):
    import evaluation.splice as splice

    model = tiny_model(soft_cap=soft_cap)
    g = torch.Generator().manual_seed(2)
    sequences = torch.randint(0, 64, (7, 12), generator=g)
    sequences[:, 0] = 1  # a BOS that the cache excluded
    splices = some_splices(16)
    monkeypatch.setattr(splice, "STACKED_ROWS", 40)  # a few positions per block: many blocks, the last one short
    monkeypatch.setattr(splice, "CHUNK_ELEMENTS", 40 * 7)  # 7 vocabulary columns per tile: many tiles, the last short
    expected = straightforward(model, sequences, splices, first_pos=1, exclude_tokens=(3, 7), batch_size=3)
    for stack in (1, 6, 64):  # one splice per pass, some stacked, all of a layer stacked
        got = spliced_losses(model, sequences, splices, first_pos=1, exclude_tokens=(3, 7), batch_size=3,
                             stack_sequences=stack)
        assert got.keys() == expected.keys()
        for name in expected:
            for key, value in expected[name].items():
                assert got[name][key] == pytest.approx(value, rel=1e-6, abs=1e-7), (stack, name, key)
    # the excluded tokens matter (the test would pass vacuously otherwise)
    unexcluded = spliced_losses(model, sequences, splices, first_pos=1, batch_size=3)
    assert unexcluded["sae_a@1"]["kl"] != pytest.approx(expected["sae_a@1"]["kl"], rel=1e-3)


def test_the_budget_says_what_the_whole_would_take_and_splices_only_what_fits(capsys):
    model = tiny_model()
    sequences = torch.randint(0, 64, (7, 12), generator=torch.Generator().manual_seed(2))
    splices = some_splices(16)
    capped = spliced_losses(model, sequences, splices, batch_size=3, budget_s=1e-9, desc="CE/KL")
    said = capsys.readouterr()
    assert "CE/KL: 7 held-out sequences would take ≈" in said.out + said.err
    assert "(--eval_budget) allows 3" in said.out + said.err
    first_batch = straightforward(model, sequences[:3], splices, first_pos=0, exclude_tokens=(), batch_size=3)
    assert capped["clean"]["sequences"] == 3
    assert capped["sae_a@1"]["kl"] == pytest.approx(first_batch["sae_a@1"]["kl"], rel=1e-6)
    whole = spliced_losses(model, sequences, splices, batch_size=3, budget_s=3600.0, desc="CE/KL")
    assert whole["clean"]["sequences"] == 7 and "allows" not in capsys.readouterr().out


def test_no_splices_gives_the_clean_loss():
    model = tiny_model()
    sequences = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(3))
    expected = straightforward(model, sequences, {}, first_pos=0, exclude_tokens=(), batch_size=2)
    assert spliced_losses(model, sequences, {}, batch_size=2)["clean"]["ce"] == pytest.approx(expected["clean"]["ce"], rel=1e-6)


# The peak is read from VmHWM, the high-water mark of this process's own memory map, reset after
# the warm-up. ru_maxrss would not do: across exec Linux keeps the larger of the parent's and the
# child's peak, so a child of a large pytest process reports the parent's peak and grows by 0.
_PEAK = textwrap.dedent('''
    import sys, torch
    sys.path.insert(0, {root!r})

    def peak_kib():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    from tests.test_splice import tiny_model, some_splices, straightforward
    from evaluation.splice import spliced_losses
    model = tiny_model(d_vocab=50_000, d_model=16)
    sequences = torch.randint(0, 50_000, (1, 4), generator=torch.Generator().manual_seed(0))
    splices = {{k: v for k, v in some_splices(16).items() if k in ("sae_a@1", "sae_b@1", "sae_c@2")}}
    run = (lambda: spliced_losses(model, sequences, splices, batch_size=1)) if {new} else (
        lambda: straightforward(model, sequences, splices, 0, (), 1))
    run()  # warm-up at a tiny size: lazy imports, first-call allocations
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident size
    print(peak_kib())
    sequences = torch.randint(0, 50_000, (48, 32), generator=torch.Generator().manual_seed(1))
    run = (lambda: spliced_losses(model, sequences, splices, batch_size=48)) if {new} else (
        lambda: straightforward(model, sequences, splices, 0, (), 48))
    run()
    print(peak_kib())
''')


def _peak_growth_mib(new: bool) -> float:
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", _PEAK.format(root=root, new=new)], capture_output=True, text=True, check=True)
    before, after = (int(v) for v in out.stdout.split())
    return (after - before) / 1024  # VmHWM is in KiB


def test_splice_memory_stays_bounded_where_whole_batch_log_probs_do_not():
    """48 sequences × 32 positions × V 50,000: one [b, T, V] float32 tensor is 307 MB and the
    straightforward path holds several; the chunked path holds a few tiles of logits (16 MB each),
    whatever the batch."""
    old, new = _peak_growth_mib(new=False), _peak_growth_mib(new=True)
    assert old > 1000, f"the straightforward path grew by only {old:.0f} MiB: the bound below proves nothing"
    assert new < 500, f"the chunked path grew by {new:.0f} MiB"
