"""Stage 2: the dictionary math, the ensemble invariant, the optimiser, the stream."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from store.zarr_store import ActivationStore, RowBlock, SourceInfo
from store.stream import ActivationStream, StreamConfig
from training.dictionary import Dictionary
from training.members import MemberConfig
from training.ensemble import BatchedAdam, Ensemble


def members(n: int = 3, d_in: int = 6, d_sae: int = 10, **kw) -> list[MemberConfig]:
    return [MemberConfig(d_in=d_in, d_sae=d_sae, l1_coeff=10.0 ** (-3 + e), lr=1e-2, **kw) for e in range(n)]


def test_relu_loss_known_answer():
    """Hand-computed loss of a 2-latent dictionary on one input."""
    d = Dictionary([MemberConfig(d_in=2, d_sae=2, l1_coeff=0.5)])
    with torch.no_grad():
        d.W_enc[0] = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
        d.b_enc[0] = torch.tensor([0.0, 0.5])
        d.W_dec[0] = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        d.b_dec[0] = torch.tensor([1.0, 0.0])
    x = torch.tensor([[3.0, 2.0]])
    # x − b_dec = (2, 2); pre = (2, −2 + 0.5) → f = (2, 0); x̂ = (2, 0) + (1, 0) = (3, 0)
    out = d.loss(x)
    assert out.codes.dense[0, 0].tolist() == [2.0, 0.0]
    assert out.x_hat[0, 0].tolist() == [3.0, 0.0]
    assert out.mse.item() == pytest.approx((0 + 4) / 2)
    assert out.total.item() == pytest.approx(2.0 + 0.5 * 2.0)
    assert out.l0.item() == 1.0


def test_folded_b_dec_matches_subtracting_it_and_gradients_agree():
    torch.manual_seed(0)
    d = Dictionary(members())
    with torch.no_grad():
        d.b_dec.normal_()
        d.b_enc.normal_(std=0.1)
    x = torch.randn(7, 6)
    direct = torch.relu(torch.einsum("ebd,edf->ebf", x - d.b_dec[:, None], d.W_enc) + d.b_enc[:, None])
    torch.testing.assert_close(d.encode(x), direct)
    (g_folded,) = torch.autograd.grad(d.loss(x).total.sum(), [d.b_dec])
    x_hat = torch.einsum("ebf,efd->ebd", direct, d.W_dec) + d.b_dec[:, None]
    ref = (x_hat - x).pow(2).mean((1, 2)) + d.l1_coeff * direct.sum(-1).mean(-1)
    (g_direct,) = torch.autograd.grad(ref.sum(), [d.b_dec])
    torch.testing.assert_close(g_folded, g_direct)


def test_decoder_rows_stay_unit_norm_and_gradient_is_projected():
    torch.manual_seed(0)
    ensemble = Ensemble(members())
    W = ensemble.dictionary.W_dec
    W.grad = torch.randn_like(W)
    ensemble.dictionary.before_step_()
    assert (W.grad * W).sum(-1).abs().max() < 1e-5  # tangent to the unit sphere
    for _ in range(5):
        ensemble.step(torch.randn(16, 6) * 3)
    torch.testing.assert_close(W.norm(dim=-1), torch.ones(3, 10))


def test_batched_adam_equals_torch_adam_per_member():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3, 4, 5))
    q = [torch.nn.Parameter(p[e].detach().clone()) for e in range(3)]
    lrs = [1e-3, 1e-2, 1e-1]
    ours = BatchedAdam([p], torch.tensor(lrs))
    theirs = [torch.optim.Adam([q[e]], lr=lrs[e], betas=(0.9, 0.99)) for e in range(3)]
    for _ in range(4):
        g = torch.randn(3, 4, 5)
        p.grad = g.clone()
        ours.step()
        for e in range(3):
            q[e].grad = g[e].clone()
            theirs[e].step()
    for e in range(3):
        torch.testing.assert_close(p[e], q[e])


@pytest.mark.parametrize("member_chunk", [None, 1, 3])
def test_ensemble_member_equals_the_same_member_trained_alone(member_chunk):
    torch.manual_seed(0)
    configs = members(4)
    batches = [torch.randn(32, 6) * 2 for _ in range(6)]
    together = Ensemble(configs, member_chunk=member_chunk)
    alone = [Ensemble([c]) for c in configs]
    for x in batches:
        out = together.step(x)
        solo_outs = [solo.step(x) for solo in alone]
    for e, solo in enumerate(alone):
        for name, tensor in together.dictionary.named_parameters():
            torch.testing.assert_close(tensor[e], getattr(solo.dictionary, name)[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.mse[e], solo_outs[e].mse[0])
        assert torch.equal(together.dictionary.tokens_since_fired[e], solo.dictionary.tokens_since_fired[0])


def test_training_reduces_the_loss_on_planted_features():
    """Sparse combinations of 8 unit directions in 6-d: reconstruction error falls well below the variance."""
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(8, 6, generator=g), dim=-1)
    ensemble = Ensemble([MemberConfig(d_in=6, d_sae=16, l1_coeff=1e-3, lr=1e-2)])
    for _ in range(300):
        codes = torch.rand(64, 8, generator=g) * (torch.rand(64, 8, generator=g) < 0.2)
        out = ensemble.step(codes @ dirs)
    assert out.mse.item() < 0.1 * (codes @ dirs).var(0).mean().item()


def test_checkpoint_round_trip_restores_parameters_and_optimizer():
    torch.manual_seed(0)
    a = Ensemble(members())
    x = torch.randn(16, 6)
    a.step(x)
    b = Ensemble(members())
    b.load_state_dict(a.state_dict())
    a.step(x)
    b.step(x)
    for (name, pa), pb in zip(a.dictionary.named_parameters(), b.dictionary.parameters()):
        torch.testing.assert_close(pa, pb, msg=name)
    with pytest.raises(ValueError, match="other members"):
        Ensemble(members(2)).load_state_dict(a.state_dict())


# ---------------------------------------------------------------- the stream


def _indexed_store(path, n_rows=1000, chunk_rows=64, d=4) -> ActivationStore:
    """A store whose row i holds the value i in every column (fp32), so rows can be identified."""
    store = ActivationStore.create(
        path, identity={}, sources=[SourceInfo("s", "m", "h", d)], n_rows=n_rows, n_sequences=n_rows,
        context_length=1, chunk_rows=chunk_rows, block_rows=n_rows, storage_dtype="float32",
        info={"model_name": "m", "context_length": 1, "prepend_bos": False, "exclude_bos": False, "dataset": "x"},
    )
    ids = np.arange(n_rows, dtype=np.int32)
    values = np.repeat(np.arange(n_rows, dtype=np.float32)[:, None], d, axis=1)
    norms = np.linalg.norm(values, axis=1).astype(np.float64)
    store.write_block(0, RowBlock(ids, ids, ids, {"s": values}, {"s": (norms.sum(), (norms**2).sum(), n_rows)}, ids[:, None]))
    store.finish()
    return store


def test_stream_sees_every_training_row_once_per_epoch_and_never_the_held_out_rows(tmp_path):
    store = _indexed_store(tmp_path / "idx")
    cfg = StreamConfig(batch_size=50, eval_rows=100, shuffle_chunks=3, prefetch=2, seed=1, normalise=False)
    stream = ActivationStream(store, "s", cfg)
    orders = []
    for epoch in range(2):
        batches = list(stream.train_batches(epoch))
        assert all(len(b) == 50 for b in batches[:-1]) and len(batches) == stream.batches_per_epoch
        rows = torch.cat(batches)[:, 0].long()
        assert sorted(rows.tolist()) == list(range(900))  # exactly once, held-out rows 900.. never
        orders.append(rows)
    assert not torch.equal(orders[0], orders[1])  # a new order each epoch
    assert (orders[0][:100].diff() != 1).sum() > 50  # shuffled within chunks, not just chunk order
    assert torch.cat(list(stream.eval_batches()))[:, 0].long().tolist() == list(range(900, 1000))
    resumed = torch.cat(list(stream.train_batches(1, start_batch=7)))[:, 0].long()
    assert torch.equal(resumed, orders[1][7 * 50 :])


def test_stream_normalises_by_the_stored_scale(tmp_path):
    store = _indexed_store(tmp_path / "idx", d=4)
    stream = ActivationStream(store, "s", StreamConfig(batch_size=100, eval_rows=0))
    x = torch.cat(list(stream.train_batches(0)))
    assert x.norm(dim=1).mean().item() == pytest.approx(2.0, rel=1e-4)  # √d


def test_b_dec_starts_at_the_normalised_sample_mean(tmp_path):
    store = _indexed_store(tmp_path / "idx")
    stream = ActivationStream(store, "s", StreamConfig(batch_size=100, eval_rows=100))
    mean = stream.sample_mean(n_rows=50)
    torch.testing.assert_close(mean, torch.full((4,), 24.5) / stream.scale)
    d = Dictionary(members(2, d_in=4))
    d.init_b_dec_(mean)
    torch.testing.assert_close(d.b_dec, mean.expand(2, 4))


def test_held_out_rows_are_whole_sequences_even_inside_a_shuffled_block(tmp_path):
    """One shuffled block of 250 sequences × 4 rows: the held-out set is every row of the last
    sequences, wherever the shuffle put them, and training never sees one of them."""
    n_rows, per_seq, d = 1000, 4, 2
    seq_of_row = np.random.default_rng(0).permutation(np.arange(n_rows) // per_seq).astype(np.int32)
    store = ActivationStore.create(
        tmp_path / "blk", identity={}, sources=[SourceInfo("s", "m", "h", d)], n_rows=n_rows, n_sequences=n_rows // per_seq,
        context_length=per_seq, chunk_rows=64, block_rows=n_rows, storage_dtype="float32", info={},
    )
    values = np.repeat(np.arange(n_rows, dtype=np.float32)[:, None], d, axis=1)
    ids = np.arange(n_rows, dtype=np.int32)
    store.write_block(0, RowBlock(ids, ids % per_seq, seq_of_row, {"s": values}, {"s": (1.0, 1.0, n_rows)},
                               np.zeros((n_rows // per_seq, per_seq), dtype=np.int32)))
    store.finish()
    stream = ActivationStream(store, "s", StreamConfig(batch_size=37, eval_rows=90, shuffle_chunks=2, normalise=False))
    assert stream.eval_sequence_start == 250 - 23  # ceil(90 / 4) whole sequences
    held_out = set(np.flatnonzero(seq_of_row >= 227).tolist())
    trained = torch.cat(list(stream.train_batches(0)))[:, 0].long().tolist()
    assert sorted(trained) == sorted(set(range(n_rows)) - held_out)
    assert sorted(torch.cat(list(stream.eval_batches()))[:, 0].long().tolist()) == sorted(held_out)
    assert stream.n_eval == 92 and stream.n_train == 908
    # held-out rows come in whole batches (what the evaluation's progress bar counts on): 37, 37, 18
    assert [len(b) for b in stream.eval_batches()] == [37, 37, 18]
    batches_with_ids = list(stream.eval_batches_with_ids())
    assert [len(ids) for _, ids in batches_with_ids] == [37, 37, 18]
    assert all(torch.equal(x[:, 0].long(), ids[:, 0]) for x, ids in batches_with_ids)  # rows and ids stay aligned
    resumed = torch.cat(list(stream.train_batches(0, start_batch=5)))[:, 0].long().tolist()
    assert resumed == trained[5 * 37 :]


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "matryoshka", "jumprelu", "gated"])
def test_encoder_starts_at_the_decoder_transpose_scaled_so_that_the_first_reconstruction_is_about_x(arch):
    """The rules kept after bench/quality.py's ablations: W_enc = W_decᵀ · 2I/F where decoder rows are
    unit norm (E[ReLU(w·x) w] = x/(2I) for random unit rows w), W_decᵀ itself where k latents are
    chosen (the top-k family), b_enc 0, decoder rows unit norm."""
    d = Dictionary([MemberConfig(d_in=64, d_sae=4096, arch=arch, k=4096, l1_coeff=0.0, seed=3)])
    W_dec = d.W_dec[0]
    torch.testing.assert_close(W_dec.norm(dim=-1), torch.ones(4096))
    scale = 1.0 if arch in ("topk", "batchtopk", "matryoshka") else 2 * 64 / 4096
    torch.testing.assert_close(d.W_enc[0], W_dec.T * scale)
    assert d.b_enc.abs().max() == 0
    if arch == "relu":  # with every latent able to fire, x̂ ≈ x from the first step
        x = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
        x_hat = d.loss(x).x_hat[0]
        assert (x_hat - x).pow(2).sum() / x.pow(2).sum() < 0.1
