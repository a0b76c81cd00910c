"""Downstream loss with activations replaced: how much of the model survives a dictionary.

A splice is a set of hooks run in one forward pass: some only record the activation they see
(a transcoder's input), others replace theirs (an SAE's reconstruction, a transcoder's output
computed from the input recorded earlier in the same pass, a whole cross-layer transcoder's
outputs at once). For each splice r:

    CE_r        mean over predicted tokens of −log p_r(next token)
    KL_r        mean over predicted tokens of KL(p_clean ‖ p_r)
    recovered   (CE_ablation − CE_spliced) / (CE_ablation − CE_clean)   (zero or mean ablation)

Positions before `first_pos` (BOS when the cache excluded it) and tokens in `exclude_tokens`
keep their clean activation, as the dictionary never saw them. Sums are per token (float64), so
results do not depend on batch sizes.

What it costs: per batch of sequences, one clean pass records the residual stream entering each
layer where a splice starts (its earliest hooked block), and every splice runs only the blocks
from there on. Splices that start at the same layer are stacked along the batch, up to
`stack_sequences` sequences per pass, so the later blocks run once for many members. No pass
computes logits: each stops at the final residual stream, and the final norm and unembedding run
on positions of the clean pass and of every spliced pass at once, a tile of the vocabulary at a
time, with an online softmax: no [positions, V] block exists (V = 262,144 for Gemma-3: the whole
[b, T, V] is a gigabyte at b = 8).

Dimension key: b sequences of a batch, M splices stacked, T positions, D d_model, V vocabulary.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from itertools import groupby
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

# (raw activations [rows, d] at this hook in this pass, the activations recorded so far in this
# pass {hook: [rows, d]}, the batch's sequences as a slice of `sequences`) → [rows, d]
Replace = Callable[[torch.Tensor, dict, slice], torch.Tensor]
STACKED_ROWS = 1152  # rows (positions × stacked passes) of one unembedding matmul
CHUNK_ELEMENTS = 2**22  # rows × vocabulary of one tile of logits (16 MB in float32)
STACK_SEQUENCES = 64  # sequences of stacked splices per pass through the later blocks


@dataclass(frozen=True)
class Splice:
    """Hooks of one forward pass: `record` only store their activation, `replace` swap theirs."""

    replace: tuple[tuple[str, Replace], ...]
    record: tuple[str, ...] = ()

    def start_layer(self) -> int | None:
        """The first block any of its hooks is in (None: a hook before the blocks, e.g. hook_embed)."""
        layers = [_block_of(h) for h in (*self.record, *(h for h, _ in self.replace))]
        return None if any(layer is None for layer in layers) else min(layers)


def budgeted_batches(n: int, batch_size: int, budget_s: float | None, what: str, bar) -> Iterator[int]:
    """The first sequence of each batch of `n`. After the first batch, it says what all of them
    will take at that pace and, where that passes `budget_s`, stops after as many batches as the
    budget allows (at least one): so a short run's evaluation cannot dwarf its training."""
    starts = range(0, n, batch_size)
    limit, started = len(starts), time.perf_counter()
    for i, first in enumerate(starts):
        if i == limit:
            return
        yield first
        if i == 0:
            per_batch = time.perf_counter() - started
            if budget_s is not None and per_batch * len(starts) > budget_s:
                limit = max(1, int(budget_s // per_batch))
                bar.total = min(n, limit * batch_size)  # the bar counts what will run
            if bar.disable and limit == len(starts):  # quiet (a library call), and nothing was cut
                continue
            bar.write(f"{what}: {n} held-out sequences would take ≈ {_minutes(per_batch * len(starts))} "
                      f"({per_batch:.1f} s per batch of {batch_size})"
                      + (f"; the budget of {_minutes(budget_s)} (--eval_budget) allows {min(n, limit * batch_size)}"
                         if limit < len(starts) else ""))


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def single(hook: str, fn: Callable[[torch.Tensor, slice], torch.Tensor]) -> Splice:
    """One hook's activation replaced by fn(activation, batch)."""
    return Splice(((hook, lambda x, recorded, batch: fn(x, batch)),))


def spliced_losses(model, sequences: torch.Tensor, splices: dict[str, Splice], *, first_pos: int = 0,
                   exclude_tokens: tuple[int, ...] = (), batch_size: int = 8, stack_sequences: int = STACK_SEQUENCES,
                   desc: str | None = None, budget_s: float | None = None) -> dict[str, dict[str, float]]:
    """{"clean": {"ce", "sequences"}, name: {"ce", "kl"} for each splice}: over the sequences
    `budget_s` leaves time for (`budgeted_batches`; "sequences" says how many).  sequences [N, T] token ids"""
    sums = {name: torch.zeros(2, dtype=torch.float64) for name in ["clean", *splices]}
    n_tokens = done = 0
    device = model.cfg.device
    by_start = sorted(splices, key=lambda n: _order(splices[n].start_layer()))
    groups = [(start, list(names)) for start, names in groupby(by_start, key=lambda n: splices[n].start_layer())]
    starts = sorted({s for s, _ in groups if s is not None})
    with torch.inference_mode(), tqdm(total=len(sequences), desc=desc, unit="sequence", leave=False,
                                      disable=desc is None) as bar:
        for first in budgeted_batches(len(sequences), batch_size, budget_s, desc or "spliced CE/KL", bar):
            tokens = sequences[first: first + batch_size].to(device)
            batch = slice(first, first + len(tokens))
            clean_rows = _clean_rows(tokens, first_pos, exclude_tokens)
            embedded = _embed(model, tokens)
            entering: dict[int, torch.Tensor] = {}
            clean_BTD = _run(model, embedded, 0, _recorders(starts, entering))
            targets = tokens[:, 1:].reshape(-1)
            n_tokens += targets.numel()
            clean_counted = False
            for start, names in groups or [(0, [])]:
                per_stack = max(1, stack_sequences // len(tokens))
                for i in range(0, max(len(names), 1), per_stack):
                    stack = names[i: i + per_stack]
                    spliced = []
                    if stack:
                        hooks = _stacked_hooks([splices[n] for n in stack], len(tokens), first_pos, batch, clean_rows)
                        spliced = (_run(model, tokens, None, hooks, len(stack)) if start is None else
                                   _run(model, (entering[start], *embedded[1:]), start, hooks, len(stack))).split(len(tokens))
                    clean_ce, per_splice = _chunked_losses(model, clean_BTD, spliced, targets)
                    if not clean_counted:
                        sums["clean"][0] += clean_ce
                        clean_counted = True
                    for name, values in zip(stack, per_splice):
                        sums[name] += values
            bar.update(len(tokens))
            done += len(tokens)
    return _means(sums, n_tokens, done)


def spliced_losses_hf(model, sequences: torch.Tensor, splices: dict[str, Splice], *, first_pos: int = 0,
                      exclude_tokens: tuple[int, ...] = (), batch_size: int = 8,
                      desc: str | None = None, budget_s: float | None = None) -> dict[str, dict[str, float]]:
    """`spliced_losses` for a model run through transformers (cache/hf_models.py's HFModel), whose
    hooks are module paths: one whole forward per splice and batch, with PyTorch forward hooks
    doing what the TransformerLens hooks do (a module's output, its first element when a tuple),
    and the losses from the model's own logits.  sequences [N, T] token ids"""
    sums = {name: torch.zeros(2, dtype=torch.float64) for name in ["clean", *splices]}
    n_tokens = done = 0
    with torch.inference_mode(), tqdm(total=len(sequences), desc=desc, unit="sequence", leave=False,
                                      disable=desc is None) as bar:
        for first in budgeted_batches(len(sequences), batch_size, budget_s, desc or "spliced CE/KL", bar):
            tokens = sequences[first: first + batch_size].to(model.device)
            batch = slice(first, first + len(tokens))
            clean_rows = _clean_rows(tokens, first_pos, exclude_tokens)
            targets = tokens[:, 1:]
            n_tokens += targets.numel()
            clean_lp = _log_probs(model, tokens, [])
            sums["clean"][0] += -clean_lp.gather(-1, targets.unsqueeze(-1)).double().sum().cpu()
            for name, splice in splices.items():
                lp = _log_probs(model, tokens, _stacked_hooks([splice], len(tokens), first_pos, batch, clean_rows))
                sums[name][0] += -lp.gather(-1, targets.unsqueeze(-1)).double().sum().cpu()
                sums[name][1] += (clean_lp.exp() * (clean_lp - lp)).double().sum().cpu()  # KL(clean ‖ spliced)
            bar.update(len(tokens))
            done += len(tokens)
    return _means(sums, n_tokens, done)


def _clean_rows(tokens: torch.Tensor, first_pos: int, exclude_tokens: tuple[int, ...]) -> torch.Tensor | None:
    """Rows (positions from `first_pos` on, batch-major) whose token keeps its clean activation.  → [b·T', 1] | None"""
    if not exclude_tokens:
        return None
    return torch.isin(tokens[:, first_pos:], torch.tensor(exclude_tokens, device=tokens.device)).reshape(-1, 1)


def _means(sums: dict[str, torch.Tensor], n_tokens: int, n_sequences: int) -> dict[str, dict[str, float]]:
    """Per-token CE (and KL for the splices) from the float64 sums over `n_tokens` predicted tokens."""
    out = {"clean": {"ce": sums["clean"][0].item() / n_tokens, "sequences": n_sequences}}
    out.update({name: {"ce": s[0].item() / n_tokens, "kl": s[1].item() / n_tokens} for name, s in sums.items() if name != "clean"})
    return out


def _log_probs(model, tokens: torch.Tensor, hooks: list) -> torch.Tensor:
    """Log-probabilities of the next token at every predicting position, with `hooks` ((module
    path, TransformerLens-style hook_fn(act, hook) → replacement or None)) on module outputs.
    → [b, T − 1, V] float32"""
    def on_output(fn):
        def hook(module, args, output):
            act = output[0] if isinstance(output, tuple) else output
            new = fn(act, None)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return hook

    handles = [model.model.get_submodule(path).register_forward_hook(on_output(fn)) for path, fn in hooks]
    try:
        logits = model.model(input_ids=tokens, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    return F.log_softmax(logits[:, :-1].float(), dim=-1)


def recovered(ce_spliced: float, ce_clean: float, ce_ablated: float) -> float:
    """Fraction of the ablation's loss increase that the reconstruction gives back."""
    gap = ce_ablated - ce_clean
    return (ce_ablated - ce_spliced) / gap if gap != 0 else float("nan")


# ---------------------------------------------------------------- partial passes
def _block_of(hook: str) -> int | None:
    match = re.match(r"blocks\.(\d+)\.", hook)
    return int(match.group(1)) if match else None


def _order(start: int | None) -> int:
    return -1 if start is None else start


def _embed(model, tokens: torch.Tensor) -> tuple:
    """(residual entering block 0, shortformer positional embedding, attention mask), exactly as
    the model's own forward computes them from tokens."""
    residual, _, shortformer, mask = model.input_to_embed(tokens)
    return residual, shortformer, mask


def _run(model, source, start: int | None, fwd_hooks: list, stack: int = 1) -> torch.Tensor:
    """Blocks `start` … L−1 (start None: the whole model from tokens, for hooks before the blocks)
    on `stack` copies of the batch side by side, with `fwd_hooks`.  `source`: the embedded batch
    (residual entering block `start`, shortformer embedding, attention mask), or tokens
    → the final residual stream [stack·b, T, D], before the final norm"""
    def repeat(t):
        return t if t is None or stack == 1 else t.repeat(stack, *([1] * (t.dim() - 1)))

    if start is None:
        return model.run_with_hooks(repeat(source), stop_at_layer=model.cfg.n_layers, fwd_hooks=fwd_hooks)
    residual, shortformer, mask = source
    return model.run_with_hooks(repeat(residual), start_at_layer=start, stop_at_layer=model.cfg.n_layers,
                                shortformer_pos_embed=repeat(shortformer), attention_mask=repeat(mask), fwd_hooks=fwd_hooks)


def _recorders(layers: list[int], entering: dict[int, torch.Tensor]) -> list:
    """Hooks that keep the clean residual stream entering each of `layers` in `entering`."""
    def keep(layer: int):
        def fn(act: torch.Tensor, hook) -> None:
            entering[layer] = act.clone()
        return fn

    return [(f"blocks.{layer}.hook_resid_pre", keep(layer)) for layer in layers]


def _stacked_hooks(stack: list[Splice], b: int, first_pos: int, batch: slice, clean_rows: torch.Tensor | None) -> list:
    """One hook per hooked point for a stack of splices: slot j (rows j·b … (j+1)·b of the pass)
    records and replaces what splice j does there, from what slot j recorded earlier in the pass."""
    recorded = [dict() for _ in stack]
    names = list(dict.fromkeys(h for s in stack for h in (*s.record, *(h for h, _ in s.replace))))

    def at(name: str):
        records = [j for j, s in enumerate(stack) if name in s.record]
        replaces = [(j, fn) for j, s in enumerate(stack) for h, fn in s.replace if h == name]

        def hook_fn(act: torch.Tensor, hook):  # act [M·b, T, d]
            kept = act[:, first_pos:]
            for j in records:
                recorded[j][name] = kept[j * b:(j + 1) * b].reshape(-1, kept.shape[-1]).float()
            if not replaces:
                return None
            act = act.clone()
            for j, fn in replaces:
                x = kept[j * b:(j + 1) * b].reshape(-1, kept.shape[-1]).float()
                rows = fn(x, recorded[j], batch)
                if clean_rows is not None:
                    rows = torch.where(clean_rows, x, rows)
                act[j * b:(j + 1) * b, first_pos:] = rows.reshape(b, -1, kept.shape[-1]).to(act.dtype)
            return act

        return hook_fn

    return [(name, at(name)) for name in names]


# ---------------------------------------------------------------- losses, a chunk of positions at a time
def _unembedding(model) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
    """(W_U as [V, D] rows, b_U or None, the logit soft-cap or None): what turns a final-normed
    residual row into logits, as the model's Unembed computes them (F.linear over W_Uᵀ)."""
    cap = getattr(model.cfg, "output_logits_soft_cap", None)
    return model.unembed.W_U.T, getattr(model.unembed, "b_U", None), cap if cap is not None and cap > 0 else None


def _chunked_losses(model, clean_BTD: torch.Tensor, spliced: list[torch.Tensor] | tuple, targets: torch.Tensor
                    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(clean [CE sum], each spliced pass's [CE sum, KL(clean ‖ spliced) sum]) over the predicted
    positions.

    The clean pass and every spliced pass (S of them) are stacked, n positions of each, into one
    matmul against a tile of the vocabulary at a time: [(1 + S)·n, D] × [D, V_tile], with
    (1 + S)·n ≈ STACKED_ROWS for the matmul's throughput (the demo model's unembedding, 2 cores:
    65 GFLOP/s at 64 rows, 100–110 from 256 rows) and V_tile so that a tile holds CHUNK_ELEMENTS
    logits. Over the tiles, each row keeps a running maximum m,
    Σ exp(z − m), its target's logit, and Σ exp(z_clean − m_clean) · z (the online softmax), so
    no [rows, V] block exists. With lse(z) = m + log Σ exp(z − m) and p the clean distribution:
        CE = lse(z) − z_target,   Σ_v p_v log q_v = p·z − lse(z),
        KL(p ‖ q) = (p·z_clean − lse_clean) − (p·z − lse)."""
    D = clean_BTD.shape[-1]
    W_VD, b_V, cap = _unembedding(model)
    V = W_VD.shape[0]
    rows_ND = [source[:, :-1].reshape(-1, D) for source in (clean_BTD, *spliced)]
    n_sources, n_positions = len(rows_ND), len(rows_ND[0])
    chunk = max(1, STACKED_ROWS // n_sources)
    tile = max(1, CHUNK_ELEMENTS // (chunk * n_sources))
    sums_S2 = torch.zeros(n_sources, 2, dtype=torch.float64)  # [CE, KL] of each source; the clean KL is 0
    for a in range(0, n_positions, chunk):
        n = min(chunk, n_positions - a)
        x_MD = torch.cat([rows[a: a + n] for rows in rows_ND])
        if model.cfg.normalization_type is not None:
            x_MD = model.ln_final(x_MD.unsqueeze(0)).squeeze(0)
        target_n = targets[a: a + n]
        top_Sn = torch.full((n_sources, n), -torch.inf, device=x_MD.device)
        sum_exp_Sn, p_dot_z_Sn, target_logit_Sn = (torch.zeros(n_sources, n, device=x_MD.device) for _ in range(3))
        for v in range(0, V, tile):
            z_SnT = F.linear(x_MD, W_VD[v: v + tile], None if b_V is None else b_V[v: v + tile]).float()
            if cap is not None:
                z_SnT = cap * torch.tanh(z_SnT / cap)
            z_SnT = z_SnT.view(n_sources, n, -1)
            here_n = (target_n >= v) & (target_n < v + z_SnT.shape[-1])
            target_logit_Sn[:, here_n] = z_SnT[:, here_n].gather(-1, (target_n[here_n] - v).view(1, -1, 1)
                                                                 .expand(n_sources, -1, 1)).squeeze(-1)
            new_top_Sn = torch.maximum(top_Sn, z_SnT.amax(-1))
            rescale_Sn = torch.exp(top_Sn - new_top_Sn)  # exp(-inf) = 0 on the first tile
            e_SnT = torch.exp(z_SnT - new_top_Sn.unsqueeze(-1))
            sum_exp_Sn = sum_exp_Sn * rescale_Sn + e_SnT.sum(-1)
            p_dot_z_Sn = p_dot_z_Sn * rescale_Sn[:1] + torch.einsum("nt,snt->sn", e_SnT[0], z_SnT)
            top_Sn = new_top_Sn
        lse_Sn = top_Sn + sum_exp_Sn.log()
        p_log_q_Sn = p_dot_z_Sn / sum_exp_Sn[:1] - lse_Sn  # Σ p log q; the clean row's is Σ p log p
        sums_S2[:, 0] += (lse_Sn - target_logit_Sn).double().sum(-1).cpu()
        sums_S2[:, 1] += (p_log_q_Sn[:1] - p_log_q_Sn).double().sum(-1).cpu()
    return sums_S2[0, 0], list(sums_S2[1:])
