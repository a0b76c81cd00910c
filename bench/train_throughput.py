"""Training throughput of N SAEs of one architecture, in token·SAEs/s, up to four ways on the same data.

    python -m bench.train_throughput                  # ReLU: d_in 512, d_sae 4096, batch 4096, N=8
    python -m bench.train_throughput --arch topk      # TopK k=32: d_in 512, d_sae 16384, batch 4096, N=2
    python -m bench.train_throughput --arch gated     # any architecture of training.dictionary.ARCHS
    python -m bench.train_throughput --widths 1024,2048,4096   # a width sweep: masks inside the widest
    python -m bench.train_throughput --arch crosscoder --n_sources 2 --d_in 640 --d_sae 16384 --n_members 4
    python -m bench.train_throughput --quick          # tiny sizes, one step: a smoke test (either --arch)
    python -m bench.train_throughput --n_members 16 --steps 5

Every variant trains the same N members (same d_in, d_sae, batch size, fp32, learning rate; for
ReLU a different L1 coefficient per member, for TopK the same k) on the same in-memory batches of
normalised Gaussian rows (mean norm √d_in), in this one process:

  (a) vectorised   one `training.ensemble.Ensemble` of N members: one batched step trains all N;
  (b) sequential   each member as an Ensemble of 1, trained one after another (same code, no batching);
  (c) SAELens      each member as SAELens's own training SAE of that architecture, trained one
                   after another by SAELens's own `SAETrainer` (skipped when sae_lens is not
                   installed): `StandardTrainingSAE` ("standard") for --arch relu,
                   `TopKTrainingSAE` ("topk") for --arch topk; the other architectures are
                   measured against (b) only. Kept for comparison with earlier runs.
  (d) MultiSAE     the same N SAELens SAEs trained by SAELens's `MultiSAETrainer`, its way of
                   training several SAEs on one stream: one `SAETrainer` per SAE, stepped in
                   lockstep by its `fit()` loop (a loop over the SAEs, not vectorised).

Ours is built only through `MemberConfig(arch=..., k=..., l1_coeff=..., lr=...)` and
`Ensemble(members).step(x)`; nothing here depends on how our TopK computes its step (dense or
sparse decode) or how the ensemble groups its members (it times a few group sizes on its first
batch and keeps the cheapest per member), so the numbers follow whatever `training/` does when
the script runs. The header names the `training/` code that ran (commit, uncommitted changes,
a hash of dictionary.py + ensemble.py).

All models of all variants are built first, and each takes `--warmup` untimed steps
(first-step allocations, Adam state, our group sizing). Then the timed batches are rounds: each
goes through every variant (the vectorised ensemble's one step; each one-at-a-time model's step
in turn), the order of the variants rotating from round to round (A B C D, B C D A, …), so a
slow spell of a shared machine hits every variant alike. token·SAEs/s = timed steps × batch × N
/ that variant's timed seconds. The ratio of two variants is computed per round and printed as
the median with its minimum and maximum over the rounds; absolute numbers depend on the
machine and its load. (The one-at-a-time variants compute exactly what training the N models
one after another computes; only the order of the steps differs.)

How (c) is driven: an `SAETrainer` is built per SAE exactly as SAELens's runner builds it
(torch Adam, constant lr scheduler, coefficient schedulers, no autocast, no wandb), and each
step runs the body of `SAETrainer.fit()`'s loop: `maybe_reset_sparsity()`, the public
`step(batch)` seam (activation scaler → `_train_step`: `training_forward_pass`, firing
statistics, backward, grad-norm clipping to 1, Adam step, zero_grad, scheduler steps), then
`n_training_steps += 1`. Only `fit()`'s wandb logging, checkpointing and progress bar are left
out (all of them off or no-ops in this configuration). (d) is driven through
`MultiSAETrainer.fit()` itself, as `MultiSAETrainingRunner.run()` drives it, with a data
provider that yields the bench's batch under one hook name for every SAE; each timed step is
one call of `fit()` with `total_training_samples` raised by one batch (so its per-call
epilogue, folding no scaling factor and writing the SAEs' final metadata, is timed too; it
touches [F] vectors only). Both sides get `normalize_activations=
"none"` (the data is already normalised, as ours is), the same lr, and the Adam betas of our
architecture: (0.9, 0.99) for relu, (0.9, 0.999) for topk (SAELens's default). The two
implementations still differ per step in what each library does; those differences are part of
what each library costs per step, so they stay:

  relu  SAELens's L1 coefficient is set to λ·d_in, the same objective as ours up to the loss
        scale (SAELens sums the squared error over d, ours averages it). SAELens weights the L1
        term by decoder row norms and clips the gradient norm; ours projects the decoder
        gradient and renormalises decoder rows.
  topk  SAELens's `TopKTrainingSAEConfig` defaults, only k, sizes and normalisation set:
        apply_b_dec_to_input, rescale_acts_by_decoder_norm (pre-activations × ‖W_dec,i‖ before
        the top-k, activations ÷ ‖W_dec,i‖ before decoding; free decoder norms, initialised to
        0.1), AuxK with aux_loss_coefficient 1 and k_aux = d_in/2, and use_sparse_activations
        False. Its step is dense throughout: encode x W_enc [B, F], torch.topk(k), ReLU of the
        kept values scattered into a dense zero [B, F] tensor, decode as a dense [B, F] @ [F, D]
        matmul (as many FLOPs as a ReLU SAE's decode), dense backward, firing statistics on
        the dense [B, F] activations. (use_sparse_activations=True would build a COO tensor and
        decode with torch.sparse.mm; it is not measured: with rescale_acts_by_decoder_norm on,
        its backward fails on CPU in torch 2.13 ("aten::view" has no SparseCPU kernel).) Ours
        (MemberConfig defaults): unit-norm decoder rows kept by gradient projection and
        renormalisation, no gradient clipping, AuxK coefficient 1/32.
        AuxK is on for both but costs nothing extra in a run this short unless latents die:
        SAELens counts a latent dead after `dead_feature_window` = 1000 steps without firing,
        ours after 10M tokens, so by default both only check for dead latents each step.
        `--force_auxk` makes both count a latent dead after a single batch without firing
        (SAELens dead_feature_window=0, ours `Ensemble(dead_tokens=batch)`), so the AuxK top-k
        and decode run whenever some latent stayed silent in the previous batch.

Memory: after the timed rounds each variant is run again alone in a child process of this
script (`--only`, one warm-up and one timed step, the same sizes), and its peak resident set
(the child's own ru_maxrss) is reported, with its growth over the child's RSS once its imports
are done (torch, and sae_lens for (c) and (d)): the models, Adam state and one step's working
memory, our group-size trial included. This does not measure data loading (the batches are in
memory), accuracy, or GPU throughput (it runs on whatever device `--device` names, CPU by
default).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import math
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import click
import torch

if not __package__:  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import Ratio, format_table, interleaved, mib, run_measured  # noqa: E402
from training.members import ARCHS as OUR_ARCHS  # noqa: E402
from training.members import MemberConfig  # noqa: E402
from training.ensemble import Ensemble  # noqa: E402

ARCHS = tuple(OUR_ARCHS)
SAELENS_BASELINES = ("relu", "topk")  # architectures variant (c) is built for
# Our Adam betas per architecture (MemberConfig's spec where it says, else these); SAELens gets the same.
ADAM_BETAS = {"relu": (0.9, 0.99), "topk": (0.9, 0.999)}
# Defaults per architecture: (d_sae, n_members). TopK's width is the target config of the issue;
# N=2 keeps the default TopK run (3 variants × N SAEs × 4 batches, ~7 s per dense step on 2 cores)
# to a few minutes. The others: ReLU's width, 4 members.
DEFAULTS = {"relu": (4096, 8), "topk": (16384, 2)}
OTHER_DEFAULT = (4096, 4)


@dataclass(frozen=True)
class BenchConfig:
    arch: str
    d_in: int
    d_sae: int
    batch_size: int
    n_members: int
    steps: int
    warmup: int
    lr: float
    device: str
    k: int = 32  # topk family only
    force_auxk: bool = False  # topk only: a latent counts dead after one silent batch, both sides
    widths: tuple[int, ...] = ()  # a width sweep: member i gets widths[i % len(widths)] (d_sae is the widest)
    n_sources: int = 1  # crosscoders: sources read side by side, each d_in wide


@dataclass(frozen=True)
class Result:
    n_saes: int
    batch_size: int
    seconds: list[float]  # per timed round, all SAEs together
    peak: tuple[int, int] | None = None  # (peak RSS, its growth over the imports) of a child running it alone

    @property
    def token_saes_per_s(self) -> float:
        """Rows consumed per second (each SAE sees every row) × SAEs."""
        return len(self.seconds) * self.batch_size * self.n_saes / sum(self.seconds)


def make_batches(n: int, batch_size: int, d_in: int, device: str, seed: int = 0) -> list[torch.Tensor]:
    """`n` batches of Gaussian rows scaled to mean norm √d_in (the store's normalisation), fp32."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        x = torch.randn(batch_size, d_in, generator=generator)
        x *= math.sqrt(d_in) / x.norm(dim=1).mean()
        batches.append(x.to(device))
    return batches


def make_members(cfg: BenchConfig) -> list[MemberConfig]:
    """N members of one architecture and width (or of `cfg.widths` in turn), seeds 0 … N−1, and
    the architecture's sparsity coefficient spread geometrically: L1 over 1e-3 … 1e-1, L0 over
    1e-4 … 1e-2; the TopK family shares one k."""
    n = cfg.n_members
    knobs = OUR_ARCHS[cfg.arch].knobs
    spread = [100 ** (i / max(n - 1, 1)) for i in range(n)]
    members = []
    for i in range(n):
        d_sae = cfg.widths[i % len(cfg.widths)] if cfg.widths else cfg.d_sae
        knob = {"k": min(cfg.k, d_sae)} if "k" in knobs else {}
        if "l1_coeff" in knobs:
            knob = {"l1_coeff": 1e-3 * spread[i]}
        elif "l0_coeff" in knobs:
            knob = {"l0_coeff": 1e-4 * spread[i]}
        members.append(MemberConfig(cfg.d_in, d_sae, arch=cfg.arch, n_sources=cfg.n_sources, lr=cfg.lr, seed=i, **knob))
    return members


StepFn = Callable[[torch.Tensor], object]


@dataclass
class Variant:
    """One way of training the N SAEs: the step functions that together train all N on a batch."""

    key: str  # a, b, c or d (VARIANTS)
    n_saes: int
    steps: list[StepFn]  # one per model: 1 for an ensemble or a MultiSAETrainer, N for one-at-a-time training

    def step_all(self, x: torch.Tensor) -> None:
        for step in self.steps:
            step(x)


def our_betas(member: MemberConfig) -> tuple[float, float]:
    """The Adam betas our ensemble uses for `member`'s architecture (what SAELens is given)."""
    spec = getattr(member, "spec", None)
    return tuple(getattr(spec, "betas", None) or ADAM_BETAS[member.arch])


def make_ensemble(cfg: BenchConfig, members: list[MemberConfig]) -> Ensemble:
    if cfg.force_auxk:
        # a latent that did not fire in the last batch counts dead (SAELens: dead_feature_window=0)
        return Ensemble(members, device=cfg.device, dead_tokens=cfg.batch_size)
    return Ensemble(members, device=cfg.device)


def vectorised_steps(cfg: BenchConfig, members: list[MemberConfig]) -> list[StepFn]:
    return [make_ensemble(cfg, members).step]


def sequential_steps(cfg: BenchConfig, members: list[MemberConfig]) -> list[StepFn]:
    return [make_ensemble(cfg, [member]).step for member in members]


def saelens_sae(cfg: BenchConfig, member: MemberConfig):
    """SAELens's own training SAE for `member`'s architecture (see the module docstring)."""
    if member.arch == "topk":
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

        # Everything else at SAELens's defaults: rescale_acts_by_decoder_norm, AuxK (coefficient
        # 1), decoder_init_norm 0.1, apply_b_dec_to_input, use_sparse_activations=False (dense).
        return TopKTrainingSAE(
            TopKTrainingSAEConfig(
                d_in=member.d_in,
                d_sae=member.d_sae,
                k=member.k,
                dtype="float32",
                device=cfg.device,
                normalize_activations="none",
            )
        )
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig

    return StandardTrainingSAE(
        StandardTrainingSAEConfig(
            d_in=member.d_in,
            d_sae=member.d_sae,
            dtype="float32",
            device=cfg.device,
            normalize_activations="none",
            l1_coefficient=member.l1_coeff * member.d_in,  # SAELens sums the squared error over d
        )
    )


def saelens_trainer_config(cfg: BenchConfig, member: MemberConfig):
    """SAELens's trainer configuration for `member`, as its runner fills it in (no wandb, no checkpoints)."""
    from sae_lens.config import SAETrainerConfig

    beta1, beta2 = our_betas(member)
    return SAETrainerConfig(
        total_training_samples=(cfg.warmup + cfg.steps) * cfg.batch_size,
        train_batch_size_samples=cfg.batch_size,
        lr=member.lr,
        lr_end=member.lr / 10,  # what LanguageModelSAERunnerConfig fills in
        adam_beta1=beta1,
        adam_beta2=beta2,
        device=cfg.device,
        **({"dead_feature_window": 0} if cfg.force_auxk else {}),
    )


def seeded_saelens_sae(cfg: BenchConfig, member: MemberConfig):
    torch.manual_seed(member.seed)  # SAELens initialises from the global generator
    return saelens_sae(cfg, member)


def saelens_step_fn(cfg: BenchConfig, member: MemberConfig) -> StepFn:
    """One SAELens `SAETrainer` for `member`, returned as the body of its `fit()` loop."""
    from sae_lens.training.sae_trainer import SAETrainer

    sae = seeded_saelens_sae(cfg, member)
    trainer = SAETrainer(cfg=saelens_trainer_config(cfg, member), sae=sae,
                         data_provider=iter(()))  # batches are handed to step() directly
    sae.to(cfg.device)  # as fit() does

    def step(x: torch.Tensor) -> object:
        trainer.maybe_reset_sparsity()
        out = trainer.step(x)
        trainer.n_training_steps += 1
        return out

    return step


def saelens_steps(cfg: BenchConfig, members: list[MemberConfig]) -> list[StepFn]:
    return [saelens_step_fn(cfg, member) for member in members]


def saelens_multi_steps(cfg: BenchConfig, members: list[MemberConfig]) -> list[StepFn]:
    """SAELens's `MultiSAETrainer` over all N SAEs, as one step function: each call runs its
    `fit()` for one more batch (the batch it is given, under one hook name for every SAE)."""
    from sae_lens.training.multi_sae_trainer import MultiSAETrainer

    saes = {f"sae_{i}": seeded_saelens_sae(cfg, m) for i, m in enumerate(members)}
    batch: list[torch.Tensor] = []

    def provider():
        while True:
            yield {"hook": batch[-1]}

    multi = MultiSAETrainer(cfg=saelens_trainer_config(cfg, members[0]), saes=saes,
                            hook_names=dict.fromkeys(saes, "hook"), data_provider=provider())

    def step(x: torch.Tensor) -> object:
        batch[:] = [x]
        multi.cfg = replace(multi.cfg, total_training_samples=multi.n_training_samples + len(x))
        with contextlib.redirect_stderr(io.StringIO()):  # fit()'s progress bar, opened once per call here
            return multi.fit()

    return [step]


VARIANTS: dict[str, tuple[str, Callable[[BenchConfig, list[MemberConfig]], list[StepFn]]]] = {
    "a": ("(a) ours, vectorised", vectorised_steps),
    "b": ("(b) ours, sequential", sequential_steps),
    "c": ("(c) SAELens SAETrainer, sequential", saelens_steps),
    "d": ("(d) SAELens MultiSAETrainer", saelens_multi_steps),
}


def build_and_warm_up(key: str, cfg: BenchConfig, members: list[MemberConfig], warmup: list[torch.Tensor]) -> Variant:
    """Build a variant's models and give each the untimed warm-up steps."""
    variant = Variant(key, len(members), VARIANTS[key][1](cfg, members))
    for x in warmup:
        variant.step_all(x)
    return variant


def run_timed(variants: list[Variant], batches: list[torch.Tensor]) -> dict[str, list[float]]:
    """Seconds of each variant per timed batch, the variants' order rotating from batch to batch (`interleaved`)."""
    return interleaved({v.key: lambda r, v=v: v.step_all(batches[r]) for v in variants}, len(batches))


def child_command(cfg: BenchConfig, key: str) -> list[str]:
    """This script training variant `key` alone at `cfg`'s sizes: one warm-up and one timed step."""
    command = [sys.executable, "-m", "bench.train_throughput", "--only", key, "--arch", cfg.arch, "--k", str(cfg.k),
               "--d_in", str(cfg.d_in), "--d_sae", str(cfg.d_sae), "--batch_size", str(cfg.batch_size),
               "--n_members", str(cfg.n_members), "--steps", "1", "--warmup", "1", "--lr", str(cfg.lr),
               "--device", cfg.device, "--n_sources", str(cfg.n_sources)]
    return command + (["--widths", ",".join(map(str, cfg.widths))] if cfg.widths else []) \
        + (["--force_auxk"] if cfg.force_auxk else [])


def peak_rss(cfg: BenchConfig, key: str) -> tuple[int, int]:
    """(peak RSS, its growth over the peak once the imports are done) of variant `key` run alone
    in a child process, as the child reads its own high-water mark (VmHWM: unlike the
    ru_maxrss wait4 reports, it does not start from the parent's RSS at the fork)."""
    out = run_measured(child_command(cfg, key), cwd=Path(__file__).resolve().parents[1])[0]
    marks = dict(line.split() for line in out.splitlines() if line.startswith("vmhwm_"))
    return int(marks["vmhwm_end"]), int(marks["vmhwm_end"]) - int(marks["vmhwm_imports"])


def high_water_mark() -> int:
    """This process's peak resident set so far, in bytes (Linux's VmHWM)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024


def run_alone(key: str, cfg: BenchConfig, members: list[MemberConfig], batches: list[torch.Tensor]) -> None:
    """The child of `peak_rss`: train the variant alone, printing the peak RSS once its libraries
    are imported and at the end."""
    if key in ("c", "d"):
        import sae_lens.training.multi_sae_trainer  # noqa: F401
    print(f"vmhwm_imports {high_water_mark()}")
    build_and_warm_up(key, cfg, members, batches[:cfg.warmup]).step_all(batches[-1])
    print(f"vmhwm_end {high_water_mark()}")


def our_code_version() -> str:
    """Which `training/` code variants (a) and (b) ran: git commit (+ whether training/ has
    uncommitted changes) and a hash of the imported dictionary/ensemble source files, so runs
    made while `training/` changes can be told apart."""
    import training.dictionary
    import training.ensemble

    digest = hashlib.sha256()
    for module in (training.dictionary, training.ensemble):
        digest.update(Path(module.__file__).read_bytes())
    root = Path(training.dictionary.__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "training"],
                               capture_output=True, text=True, check=True).stdout.strip()
        where = f"git {head}" + (" + uncommitted changes in training/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        where = "not a git checkout"
    return f"ours: {where}; sha256(dictionary.py+ensemble.py)={digest.hexdigest()[:12]}"


def saelens_version() -> str | None:
    try:
        import sae_lens
    except ImportError:
        return None
    return sae_lens.__version__


def print_report(results: dict[str, Result]) -> None:
    header = ["variant", "SAEs", "timed steps", "median s/step (all SAEs)", "token·SAEs/s", "peak RSS MiB",
              "growth over imports MiB"]
    rows = [[VARIANTS[key][0], r.n_saes, len(r.seconds), f"{sorted(r.seconds)[len(r.seconds) // 2]:.3f}",
             f"{r.token_saes_per_s:,.0f}", mib(r.peak and r.peak[0]), mib(r.peak and r.peak[1])]
            for key, r in sorted(results.items())]
    print()
    print(format_table(header, rows))
    print()
    for fast, slow, label in (("a", "b", "vectorised / sequential (ours)"), ("a", "c", "vectorised / SAELens SAETrainer"),
                              ("a", "d", "vectorised / SAELens MultiSAETrainer"),
                              ("b", "c", "sequential (ours) / SAELens SAETrainer")):
        if fast in results and slow in results:
            print(f"{label:38s} {Ratio.of(results[slow].seconds, results[fast].seconds)}  (token·SAEs/s, per round)")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--arch", type=click.Choice(ARCHS), default="relu", help="Architecture of every SAE.")
@click.option("--k", type=int, default=32, help="Active latents per row (--arch topk).")
@click.option("--d_in", type=int, default=512, help="Activation width.")
@click.option("--d_sae", type=int, default=None, show_default="4096 relu, 16384 topk", help="Latents per SAE.")
@click.option("--batch_size", type=int, default=4096, help="Rows per step.")
@click.option("--n_members", type=int, default=None, show_default="8 relu, 2 topk", help="SAEs trained (N).")
@click.option("--steps", type=int, default=5, help="Timed steps per SAE (rounds of the interleaved timing).")
@click.option("--warmup", type=int, default=1, help="Untimed steps per SAE before the timed ones.")
@click.option("--lr", type=float, default=1e-4, help="Adam learning rate of every SAE.")
@click.option("--device", default="cpu", help="Torch device.")
@click.option("--skip_saelens", is_flag=True, help="Do not run variant (c).")
@click.option("--force_auxk", is_flag=True,
              help="topk: count a latent dead after one batch without firing, both sides, so AuxK runs.")
@click.option("--n_sources", type=int, default=1, help="Crosscoders: sources read side by side (rows are n_sources × d_in wide).")
@click.option("--widths", default="", help="Comma-separated d_sae values: a width sweep (members cycle through them).")
@click.option("--quick", is_flag=True, help="Tiny sizes (k ≤ 8) and one timed step (smoke test); overrides the sizes.")
@click.option("--only", type=click.Choice(list(VARIANTS)), default=None, hidden=True,
              help="Train this variant alone and print the RSS after its imports (the memory measurement's child).")
def main(arch, k, d_in, d_sae, batch_size, n_members, steps, warmup, lr, device, skip_saelens, force_auxk, n_sources,
         widths, quick, only) -> None:
    """Token·SAEs/s of our vectorised ensemble vs sequential training vs SAELens's trainers."""
    d_sae = DEFAULTS.get(arch, OTHER_DEFAULT)[0] if d_sae is None else d_sae
    n_members = DEFAULTS.get(arch, OTHER_DEFAULT)[1] if n_members is None else n_members
    width_list = tuple(int(w) for w in widths.split(",") if w.strip())
    if quick:
        d_in, d_sae, batch_size, n_members, steps, warmup = 32, 128, 256, 3, 2, 1
        k = min(k, 8)
        width_list = tuple(min(w, d_sae) for w in width_list)
    if width_list:
        d_sae = max(width_list)
    if min(d_in, d_sae, batch_size, n_members, steps) < 1 or warmup < 0:
        raise click.BadParameter("sizes and --steps must be positive, --warmup ≥ 0")
    if arch == "topk" and not 1 <= k <= d_sae:
        raise click.BadParameter(f"--k must be between 1 and d_sae={d_sae}")
    if force_auxk and arch != "topk":
        raise click.BadParameter("--force_auxk applies to --arch topk only")
    cfg = BenchConfig(arch, d_in, d_sae, batch_size, n_members, steps, warmup, lr, device, k, force_auxk, width_list,
                      n_sources)
    baseline = arch in SAELENS_BASELINES and not width_list and n_sources == 1
    members = make_members(cfg)
    batches = make_batches(warmup + steps, batch_size, d_in * n_sources, device)
    if only:
        return run_alone(only, cfg, members, batches)
    version = None if skip_saelens or not baseline else saelens_version()
    arch_desc = f"arch={arch}" + (f" k={k}" if "k" in OUR_ARCHS[arch].knobs else "") + (" force_auxk" if force_auxk else "")
    arch_desc += f" widths={','.join(map(str, width_list))}" if width_list else ""
    arch_desc += f" n_sources={n_sources}" if n_sources > 1 else ""
    print(f"{arch_desc} d_in={d_in} d_sae={d_sae} batch={batch_size} N={n_members} fp32 device={device} "
          f"lr={lr} adam_betas={our_betas(members[0])} torch {torch.__version__} threads={torch.get_num_threads()} "
          f"warmup={warmup} timed steps={steps} (per SAE) sae_lens={version or 'not run'}")
    print(our_code_version())
    if version is None and not skip_saelens and baseline:
        print("note: sae_lens is not installed; variants (c) and (d) skipped")
    keys = ["a", "b"] + (["c", "d"] if version is not None else [])
    variants = [build_and_warm_up(key, cfg, members, batches[:warmup]) for key in keys]
    ensemble = variants[0].steps[0].__self__  # (a)'s one step function is its Ensemble.step
    print(f"(a) steps its {n_members} members in groups of {ensemble.group_sizes[batch_size]}")
    seconds = run_timed(variants, batches[warmup:])
    del variants
    print_report({key: Result(n_members, batch_size, seconds[key], peak_rss(cfg, key)) for key in keys})

if __name__ == "__main__":
    main()
