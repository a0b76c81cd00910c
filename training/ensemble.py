"""Train E dictionaries as one: stacked parameters, one batched step, per-member optimiser knobs.

Every member reads the same batch, so reading and moving data is paid once for E dictionaries.
The members' losses are summed before backward: member e's parameters only enter its own loss,
so each gets exactly the gradient it would get alone. Adam is elementwise, so one Adam over
[E, ...] tensors is E independent Adams; `BatchedAdam` adds a per-member learning rate (a [E]
tensor), which torch.optim.Adam cannot give to slices of one tensor.
Invariant (tested): member e of an ensemble equals the same configuration trained alone.
"""
from __future__ import annotations

import contextlib
import math
import time
from functools import partial
from typing import Callable, NamedTuple, TypeVar

import torch
from torch import nn
from torch.func import functional_call

from training.dictionary import Dictionary, Stats, default_columns
from training.members import MemberConfig

K = TypeVar("K")


class BatchedAdam:
    """Adam over parameters with a leading member axis and a per-member learning rate.

    Update per element (Kingma & Ba 2015): m ← β1 m + (1−β1) g; v ← β2 v + (1−β2) g²;
    p ← p − lr_e · m̂ / (√v̂ + ε) with bias-corrected m̂, v̂.
    """

    def __init__(self, params: list[nn.Parameter], lr_E: torch.Tensor, betas=(0.9, 0.99), eps: float = 1e-8,
                 multipliers: list[float] | None = None):
        """`multipliers`: one factor per parameter on the members' learning rates (default 1)."""
        self.params = params
        self.lr_E = lr_E
        self.multipliers = multipliers or [1.0] * len(params)
        self.lr_scale = 1.0  # schedule factor applied to every member's lr, set by the trainer
        self.betas = betas
        self.eps = eps
        self.step_count = 0
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self) -> None:
        self.step_count += 1
        beta1, beta2 = self.betas
        bias1 = 1 - beta1**self.step_count
        bias2 = 1 - beta2**self.step_count
        for p, m, v, factor in zip(self.params, self.exp_avg, self.exp_avg_sq, self.multipliers):
            if p.grad is None:
                continue
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (v / bias2).sqrt_().add_(self.eps)
            lr = (self.lr_E * (self.lr_scale * factor / bias1)).view(-1, *([1] * (p.dim() - 1)))  # [E, 1, ...]
            p.addcdiv_(m * lr, denom, value=-1.0)

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = state["step_count"]
        for mine, saved in zip(self.exp_avg + self.exp_avg_sq, state["exp_avg"] + state["exp_avg_sq"]):
            mine.copy_(saved)


class StepOutput(NamedTuple):
    """What one step reports per member (no batch-sized tensors)."""

    total: torch.Tensor  # [E]
    mse: torch.Tensor  # [E]
    sparsity: torch.Tensor  # [E]
    l0: torch.Tensor  # [E]


HEADROOM = 0.8  # of a device's free memory a sweep plans to use (the allocator, kernels' workspaces keep the rest)


def cuda_free_bytes(device: torch.device) -> int:
    """What this process can still allocate on the GPU: the driver's free memory and the blocks
    PyTorch's allocator holds unused."""
    free = torch.cuda.mem_get_info(device)[0]
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def group_size(members: list[MemberConfig], batch_size: int, device: torch.device, member_chunk: int | None = None,
               free_bytes: int | None = None, resident_bytes: int | None = None) -> int:
    """The most members one forward/backward group may hold: as many as fit in HEADROOM of the
    device's free memory (`free_bytes`, default what CUDA reports, or the host's available
    memory) beside `resident_bytes` still to be placed there (default every member's weights,
    gradients and Adam moments); a sweep that cannot fit one member's step is refused. Which
    size up to this one runs fastest is measured (`choose_group_size`)."""
    from training.memory import available_bytes, parameter_count, step_bytes_per_member

    if member_chunk is not None:
        return member_chunk
    per_member = step_bytes_per_member(members, batch_size)
    free = free_bytes if free_bytes is not None else (cuda_free_bytes(device) if device.type == "cuda"
                                                      else available_bytes(device))
    if free is None:
        return len(members)
    resident = resident_bytes if resident_bytes is not None else 16 * parameter_count(members)
    room = HEADROOM * free - resident
    if room < per_member:
        raise ValueError(f"{len(members)} × {members[0].arch} ({max(m.d_sae for m in members):,} latents) do not fit on "
                         f"{device}: {free / 2**30:.1f} GiB free, {resident / 2**30:.1f} GiB for the weights and "
                         f"Adam, {per_member / 2**30:.2f} GiB for one member's step: fewer members per process "
                         "(torchrun), fewer latents or a smaller --batch_size")
    return max(1, min(len(members), int(room // per_member)))


def candidate_group_sizes(limit: int) -> list[int]:
    """The group sizes a run times: one member, the geometric middle and `limit`."""
    return sorted({1, round(math.sqrt(limit)), limit})


def choose_group_size(limit: int, seconds_per_member: Callable[[list[int]], dict[int, float]]) -> int:
    """Of `candidate_group_sizes(limit)`, the one whose step costs least per member, as
    `seconds_per_member` (sizes → seconds of a group's forward/backward ÷ its members) measures."""
    if limit <= 1:
        return 1
    cost = seconds_per_member(candidate_group_sizes(limit))
    return min(cost, key=cost.get)


def time_best(calls: dict[K, Callable[[], object]], device: torch.device, repeats: int = 3) -> dict[K, float]:
    """Seconds of each call: the best of `repeats` rounds after a warm-up call each, the calls
    taking turns within a round (their order rotating), so a slow spell of a shared machine
    falls on all of them alike."""
    def timed(call: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    keys = list(calls)
    for key in keys:
        calls[key]()
    best = dict.fromkeys(keys, math.inf)
    for r in range(repeats):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            best[key] = min(best[key], timed(calls[key]))
    return best


class Ensemble:
    """E members of one architecture, trained together on shared batches (members of different
    widths as masks inside the widest, see training.dictionary).

    The forward/backward runs over groups of members (the optimiser step always covers all of
    them). Larger groups are not always faster: on a CPU the [E, B, F] intermediates of a whole
    ensemble overflow the caches. So unless `member_chunk` fixes it, the group size is measured
    on the first batch of each size: the forward/backward of 1, a middle number and as many
    members as memory allows is timed, and the cheapest per member is kept (`choose_group_size`).
    The result does not depend on the grouping: members never interact.
    """

    def __init__(self, members: list[MemberConfig], device: str | torch.device = "cpu", member_chunk: int | None = None,
                 dead_tokens: int = 10_000_000, columns: dict[str, tuple[int, int]] | None = None,
                 precision: str = "fp32", compile: bool = False, topk_decode: str = "sparse"):
        """`columns`: where each source sits in the batches (see training.dictionary.Dictionary).
        `precision`: fp32 | tf32 (a CUDA matmul mode, set by the trainer) | bf16 (the encoder and
        decoder products autocast to bfloat16; weights, gradients, Adam moments and every loss
        term stay float32). `compile`: torch.compile the per-group forward (its backward follows).
        `topk_decode`: sparse (a gather of the k active decoder rows) or dense (a [B, F] × [F, O]
        product) for TopK members; training/trainer.py chooses per device."""
        self.members = list(members)
        self.device = torch.device(device)
        self.dictionary = Dictionary(self.members, columns, dead_tokens).to(self.device)
        self.dictionary.sparse_topk = topk_decode == "sparse"
        self.member_chunk = member_chunk
        self._group_sizes: dict[int, int] = {}
        self.precision = precision
        self._forward = torch.compile(self._functional_loss, dynamic=False) if compile else self._functional_loss
        lr_E = torch.tensor([m.lr for m in self.members], device=self.device)
        named = list(self.dictionary.named_parameters())
        self.optimizer = BatchedAdam([p for _, p in named], lr_E, betas=self.dictionary.spec.betas,
                                     multipliers=[self.dictionary.lr_multiplier(n) for n, _ in named])
        clip = [m.grad_clip if m.grad_clip is not None else math.inf for m in self.members]
        self.grad_clip_E = torch.tensor(clip, device=self.device)
        self.sync = None  # data-parallel: a training.parallel.GradientSync over the ranks sharing these members

    def sync_gradients(self, sync) -> None:
        """Step on slices of each batch, summing gradients over `sync`'s ranks (data-parallel)."""
        spec = self.dictionary.spec
        batch_wide = self.dictionary.rule.batch_wide
        if batch_wide or spec.penalty == "lp":
            raise ValueError(f"--data_parallel cannot split the batch of {self.members[0].arch}: its "
                             + ("code of a row depends on the whole batch" if batch_wide else
                                "p-annealing rescales λ by the batch's penalty")
                             + "; run it ensemble-parallel (without --data_parallel)")
        self.sync = sync

    def __len__(self) -> int:
        return len(self.members)

    def step(self, x_BC: torch.Tensor, batch_rows: int | None = None) -> StepOutput:
        """One optimisation step of every member on the batch x [B, C]. The losses change no
        state; what they observed (dead-latent counters, thresholds, p-annealing) is applied after
        the optimiser step, so a step is applied whole or not at all. Data-parallel: x is this
        rank's part of a batch of `batch_rows` rows."""
        params = dict(self.dictionary.named_parameters())
        for p in params.values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        outputs, stats = [], []
        for group in self._groups(x_BC):
            out, grads = self._loss_and_grads(group, x_BC)
            for p, g in zip(params.values(), grads):
                p.grad[group] = g
            outputs.append(StepOutput(out.total.detach(), out.mse.detach(), out.sparsity.detach(), out.l0.detach()))
            stats.append(out.stats)
        observed, rows = Stats(*(torch.cat(parts) for parts in zip(*stats))), batch_rows or len(x_BC)
        if self.sync is not None:
            fired = self.sync.reduce_([p.grad for p in params.values()], observed.fired, len(x_BC), rows)
            observed = observed._replace(fired=fired)
        self._clip_per_member_(list(params.values()))
        self.dictionary.before_step_()
        self.optimizer.step()
        self.dictionary.after_step_()
        self.dictionary.observe_(observed, rows)
        return StepOutput(*(torch.cat(parts) for parts in zip(*outputs)))

    def _loss_and_grads(self, group: slice, x_BC: torch.Tensor) -> tuple:
        """The loss of the members in `group` on x and its gradients, one per parameter (no state
        changes). Detached slices are leaves of their own: the backward of one group writes only
        that group's gradients, with no full-size zero-filled gradient per group."""
        with torch.enable_grad():  # also when first called under no_grad (the group timing of resampling's losses)
            leaves = {n: p[group].detach().requires_grad_() for n, p in self.dictionary.named_parameters()}
            buffers = {n: b[group] for n, b in self.dictionary.named_buffers()}
            with self._autocast():
                out = self._forward({**leaves, **buffers}, x_BC)
            # a tied encoder (matching pursuit) leaves W_enc, b_enc out of the loss: zero gradient
            return out, torch.autograd.grad(out.total.sum(), list(leaves.values()), allow_unused=True,
                                            materialize_grads=True)

    def _functional_loss(self, tensors: dict[str, torch.Tensor], x_BC: torch.Tensor):
        return functional_call(self.dictionary, (tensors,), (x_BC,))

    def _autocast(self):
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @torch.no_grad()
    def _clip_per_member_(self, params: list[nn.Parameter]) -> None:
        """Scale member e's gradient so that the norm over all its parameters of the gradient of
        its loss *summed* over the values it writes is at most grad_clip_e (never a norm over the
        whole ensemble, which would couple the members). The references clip the gradient of a
        reconstruction summed over d (dictionary_learning, SAELens: clip 1); ours averages over
        d, so its gradient is theirs / d, and a clip of 1 on it would almost never act (measured
        in bench/RESULTS.md "Quality")."""
        if torch.isinf(self.grad_clip_E).all():
            return
        norm_E = torch.sqrt(sum(p.grad.pow(2).flatten(1).sum(-1) for p in params)) * self.dictionary.summed_loss_scale
        factor_E = (self.grad_clip_E / (norm_E + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad.mul_(factor_E.view(-1, *([1] * (p.dim() - 1))))

    def _groups(self, x_BC: torch.Tensor) -> list[slice]:
        """Sized once per batch size, on the first batch x of that size (`fastest_group_size`)."""
        if len(x_BC) not in self._group_sizes:
            self._group_sizes[len(x_BC)] = self.member_chunk or self.fastest_group_size(x_BC)
        E, chunk = len(self.members), self._group_sizes[len(x_BC)]
        return [slice(i, min(i + chunk, E)) for i in range(0, E, chunk)]

    @property
    def group_sizes(self) -> dict[int, int]:
        """Members per forward/backward group, by batch size (those stepped so far)."""
        return dict(self._group_sizes)

    def fastest_group_size(self, x_BC: torch.Tensor, repeats: int = 3) -> int:
        """The group size whose forward/backward on x costs least per member, of 1, a middle
        number and as many members as fit in memory once this ensemble's own weights,
        gradients and moments are in place (they are by the first step)."""
        limit = group_size(self.members, len(x_BC), self.device, resident_bytes=0)

        def seconds_per_member(sizes: list[int]) -> dict[int, float]:
            seconds = time_best({g: partial(self._loss_and_grads, slice(0, g), x_BC) for g in sizes}, self.device, repeats)
            return {g: s / g for g, s in seconds.items()}

        return choose_group_size(limit, seconds_per_member)

    @torch.no_grad()
    def resample_dead_(self, pool_ND: torch.Tensor, window: int, step: int, row_batch: int = 4096) -> torch.Tensor:
        """Anthropic-style resampling (Bricken et al. 2023, "Neuron resampling") of the latents
        that have not fired for `window` tokens, drawing inputs from `pool` [N, D] (rows read
        from the store for this purpose; Anthropic used ~800k):

          * each member computes its loss ‖x − x̂‖² on every pool row; its dead latents draw rows
            with probability ∝ loss² (the reference's weighting), without replacement while
            enough rows have a non-zero loss, so no two dead latents get the same input;
          * a dead latent's decoder row becomes its row's direction (x − b_dec where the encoder
            subtracts b_dec), at unit norm, or at the alive rows' mean norm where norms are free;
          * its encoder column becomes the same direction × 0.2 × the alive columns' mean norm;
          * its encoder bias (and gated magnitude parameters) become 0, its Adam moments 0.

        Each member draws from its own generator seeded by (its seed, step), so a member
        resamples the same in any ensemble and on resume.  → [E] latents resampled per member"""
        d = self.dictionary
        if not d.spec.resamples or self.members[0].is_transcoder or d.G > 1:
            raise ValueError(f"resampling is for the L1 architectures' SAEs and crosscoders, not {self.members[0].arch}"
                             + (" transcoders" if self.members[0].is_transcoder else ""))
        dead_EF = d.dead_latents(window)
        n_dead_E = dead_EF.sum(-1)
        if not n_dead_E.any():
            return n_dead_E
        alive_EF = d.width_mask & ~dead_EF
        for group in self._groups(pool_ND[:row_batch]):
            loss_EN = torch.cat([(self._reconstruct(rows, group) - rows).pow(2).sum(-1)
                                 for rows in pool_ND.split(row_batch)], dim=1)
            for i, e in enumerate(range(group.start, group.stop)):
                if n_dead_E[e]:
                    self._resample_member_(e, dead_EF[e].nonzero().squeeze(1), alive_EF[e], pool_ND, loss_EN[i], step)
        d.tokens_since_fired.masked_fill_(dead_EF, 0)
        return n_dead_E

    def _reconstruct(self, x_BD: torch.Tensor, group: slice) -> torch.Tensor:
        """x̂ of the members in `group` (the loss changes no state).  → [E_group, B, D]"""
        d = self.dictionary
        tensors = {n: t[group] for n, t in (*d.named_parameters(), *d.named_buffers())}
        return functional_call(d, (tensors,), (x_BD,)).x_hat

    def _resample_member_(self, e: int, cols: torch.Tensor, alive_F: torch.Tensor, x_BD: torch.Tensor,
                          loss_B: torch.Tensor, step: int) -> None:
        d = self.dictionary
        generator = torch.Generator().manual_seed(self.members[e].seed * 1_000_003 + step)
        weights = loss_B.double().pow(2).cpu()
        if not weights.sum() > 0:
            weights = torch.ones_like(weights)
        distinct = len(cols) <= int((weights > 0).sum())
        picked = torch.multinomial(weights, len(cols), replacement=not distinct, generator=generator).to(x_BD.device)
        inputs_nD = x_BD[picked] - d.b_dec[e] if d.subtract_b_dec else x_BD[picked]
        dirs_nD = inputs_nD / inputs_nD.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        has_alive = bool(alive_F.any())
        dec_norm = d.W_dec[e, alive_F].norm(dim=-1).mean() if has_alive and not d.spec.unit_norm_decoder else 1.0
        enc_norm = d.W_enc[e][:, alive_F].norm(dim=0).mean() if has_alive else 1.0
        d.W_dec[e, cols] = dirs_nD * dec_norm
        d.W_enc[e][:, cols] = dirs_nD.T * (0.2 * enc_norm)
        moments = {id(p): (m, v) for p, m, v in zip(self.optimizer.params, self.optimizer.exp_avg, self.optimizer.exp_avg_sq)}
        for name, p, axis in d.latent_params():
            if name in ("b_enc", "r_mag", "b_mag"):
                p[e, cols] = 0.0
            for moment in moments[id(p)]:
                moment[e].index_fill_(axis - 1, cols, 0.0)

    def state_dict(self) -> dict:
        return {
            "members": [m.to_dict() for m in self.members],
            "dictionary": self.dictionary.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        saved = [MemberConfig.from_dict(m) for m in state["members"]]
        if saved != self.members:
            raise ValueError("checkpoint was written for other members than this sweep's")
        self.dictionary.load_state_dict(state["dictionary"])
        self.optimizer.load_state_dict(state["optimizer"])


@contextlib.contextmanager
def matmul_precision(device: str | torch.device, precision: str):
    """TF32 tensor cores for float32 matmuls while the block runs, where `precision` is tf32 on
    CUDA; the previous mode is restored after it. Elsewhere nothing changes."""
    if torch.device(device).type != "cuda":
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def time_topk_decodes(members: list[MemberConfig], device: str, batch_size: int, columns: dict | None,
                      repeats: int = 3) -> dict[str, float]:
    """Seconds of one training step of `members` with the sparse and with the dense TopK decode,
    on seeded random rows (`time_best`)."""
    width = max(start + w for start, w in (columns or default_columns(members[0])).values())
    x = torch.randn(batch_size, width, generator=torch.Generator().manual_seed(0)).to(device)
    ensembles = {decode: Ensemble(members, device, columns=columns, topk_decode=decode) for decode in ("sparse", "dense")}
    return time_best({decode: partial(e.step, x) for decode, e in ensembles.items()}, torch.device(device), repeats)
