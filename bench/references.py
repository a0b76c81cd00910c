"""The reference trainers, each run through its own library's code, behind one small interface for
bench/quality.py: given a `Plan` (architecture, shape, steps, lr, schedule, sparsity knob) and the
same batches in the same order, train one dictionary and return its inference forward.

    dictionary_learning 0.1.0   its trainer modules (`TopKTrainer`, `BatchTopKTrainer`,
                                `MatryoshkaBatchTopKTrainer`, `StandardTrainer`, `JumpReluTrainer`,
                                `GatedSAETrainer`), stepped with `.update(step, x)`. Installed with
                                `pip install --no-deps dictionary-learning==0.1.0` (install.sh bench);
                                its package `__init__` imports nnsight, so the trainers are imported
                                under a bare package module instead.
    SAELens 6.x                 its `*TrainingSAE` + `SAETrainer.fit()` on an iterator of the batches,
                                its defaults except the shared schedule; the inference model it saves,
                                loaded back with `SAE.load_from_disk`.
    sparsify 1.3.3              `SparseCoder` stepped by the body of its `Trainer.fit` (first-batch bias
                                init, fvu loss, decoder gradient projection, its default optimiser:
                                signum under a schedule-free wrapper at 5e-3/√(F/2¹⁴)); TopK only.

Every forward maps rows in our normalised space (mean norm √d) to (f, x̂) in that space, whatever
scale the reference trained at, so one evaluator scores them all. Each reference trains on the
rows scaled the way its own pipeline scales them: dictionary_learning divides by √E‖x‖² (unit mean
squared norm), SAELens's `expected_average_only_in` and ours give mean norm √d, sparsify trains on
what it is given.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import tempfile
import types
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

Forward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # x [B, d] → (f [B, F], x̂ [B, d])


K_ARCHS = ("topk", "abstopk", "batchtopk", "matryoshka", "matching_pursuit")  # the sparsity knob is k


@dataclass(frozen=True)
class Plan:
    """One dictionary to train, as every trainer is told it."""

    arch: str  # topk | abstopk | batchtopk | matryoshka | matching_pursuit | relu | jumprelu | gated (our names)
    d: int
    d_sae: int
    steps: int
    lr: float
    lr_warmup_steps: int
    lr_decay_start: int  # step from which the lr decays linearly to 0 (steps: no decay)
    sparsity_warmup_steps: int
    threshold_start_step: int
    k: int = 32  # matching_pursuit: its most steps
    residual_threshold: float = 1e-2  # matching_pursuit
    coeff: float = 0.0  # our sparsity coefficient (mean-over-d convention), for relu | jumprelu | gated
    target_l0: float | None = None  # dictionary_learning's JumpReLU knob, in place of coeff
    group_fractions: tuple[float, ...] = (1 / 32, 1 / 16, 1 / 8, 1 / 4)
    seed: int = 0

    @property
    def knob(self) -> str:
        if self.arch in K_ARCHS:
            return f"k={self.k}"
        return f"target_l0={self.target_l0:g}" if self.target_l0 is not None else f"λ={self.coeff:.3g}"


# ---------------------------------------------------------------- dictionary_learning 0.1.0
def dictionary_learning_trainers():
    """dictionary_learning.trainers without its package __init__ (which imports nnsight)."""
    if "dictionary_learning.trainers" in sys.modules:
        return sys.modules["dictionary_learning.trainers"]
    spec = importlib.util.find_spec("dictionary_learning")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("dictionary_learning is not installed: pip install --no-deps dictionary-learning==0.1.0 "
                           "(bash install.sh bench does it)")
    package = types.ModuleType("dictionary_learning")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["dictionary_learning"] = package
    return importlib.import_module("dictionary_learning.trainers")


def train_dictionary_learning(plan: Plan, batches: Iterable[torch.Tensor], unit: float) -> Forward:
    """`unit`: the factor our rows are divided by for it (√E‖x‖², its own normalisation)."""
    trainers = dictionary_learning_trainers()
    common = dict(steps=plan.steps, activation_dim=plan.d, dict_size=plan.d_sae, layer=0, lm_name="bench",
                  lr=plan.lr, warmup_steps=plan.lr_warmup_steps, device="cpu",
                  decay_start=plan.lr_decay_start if plan.lr_decay_start < plan.steps else None)
    # its loss sums the reconstruction over d on rows divided by `unit`: λ_dl = λ · d / unit (see quality.py)
    l1 = plan.coeff * plan.d / unit
    if plan.arch in ("topk", "batchtopk"):
        cls = trainers.TopKTrainer if plan.arch == "topk" else trainers.BatchTopKTrainer
        trainer = cls(k=plan.k, threshold_start_step=plan.threshold_start_step, seed=plan.seed, **common)
    elif plan.arch == "matryoshka":
        from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer

        fractions = [*plan.group_fractions, 1 - sum(plan.group_fractions)]
        trainer = MatryoshkaBatchTopKTrainer(k=plan.k, group_fractions=fractions, threshold_start_step=plan.threshold_start_step,
                                             seed=plan.seed, **common)
    elif plan.arch == "relu":
        trainer = trainers.StandardTrainer(l1_penalty=l1, sparsity_warmup_steps=plan.sparsity_warmup_steps or None,
                                           seed=plan.seed, **common)
    elif plan.arch == "gated":
        trainer = trainers.GatedSAETrainer(l1_penalty=l1, sparsity_warmup_steps=plan.sparsity_warmup_steps or None,
                                           seed=plan.seed, **common)
    elif plan.arch == "jumprelu":
        torch.manual_seed(plan.seed)  # its trainer takes a seed but does not seed its own init
        trainer = trainers.JumpReluTrainer(target_l0=plan.target_l0, sparsity_warmup_steps=plan.sparsity_warmup_steps or None,
                                           seed=plan.seed, **common)
    else:
        raise ValueError(f"dictionary_learning has no trainer for {plan.arch}")
    for step, x in enumerate(batches):
        trainer.update(step, x / unit)
    ae = trainer.ae.eval()

    @torch.no_grad()
    def forward(x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = ae.encode(x_BD / unit)  # BatchTopK/Matryoshka: its inference threshold (its default)
        return f, ae.decode(f) * unit

    return forward


# ---------------------------------------------------------------- SAELens
def train_saelens(plan: Plan, batches: Iterable[torch.Tensor], batch_size: int, total_rows: int) -> Forward:
    """`total_rows`: rows in all the batches (its loop counts rows, and an epoch's last batch may be short)."""
    inference = fit_saelens(plan, batches, batch_size, total_rows)

    @torch.no_grad()
    def forward(x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = inference.encode(x_BD)
        return f, inference.decode(f)

    return forward


def fit_saelens(plan: Plan, batches: Iterable[torch.Tensor], batch_size: int, total_rows: int):
    """SAELens's trainer on the batches; → the inference `SAE` it saves, loaded back with
    `SAE.load_from_disk` (in eval mode, on rows scaled as the batches were)."""
    from sae_lens import SAE
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(plan.seed)
    sae = _saelens_training_sae(plan)
    cfg = SAETrainerConfig(total_training_samples=total_rows, train_batch_size_samples=batch_size, lr=plan.lr,
                           lr_end=plan.lr, lr_warm_up_steps=plan.lr_warmup_steps,
                           lr_decay_steps=max(0, plan.steps - plan.lr_decay_start), adam_beta1=_betas(plan)[0],
                           adam_beta2=_betas(plan)[1], device="cpu", logger=LoggingConfig(log_to_wandb=False))
    SAETrainer(cfg, sae, data_provider=iter(batches)).fit()
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_inference_model(tmp)
        return SAE.load_from_disk(tmp, device="cpu").eval()


def _betas(plan: Plan) -> tuple[float, float]:
    return (0.0, 0.999) if plan.arch in ("jumprelu", "gated") else (0.9, 0.999)


def _saelens_training_sae(plan: Plan):
    """The architecture's TrainingSAE at SAELens's defaults; coefficients in its convention (the
    reconstruction summed over d: λ_SAELens = λ · d)."""
    import sae_lens

    base = dict(d_in=plan.d, d_sae=plan.d_sae, normalize_activations="none", device="cpu")
    coeff = plan.coeff * plan.d
    warm = plan.sparsity_warmup_steps
    if plan.arch == "topk":
        return sae_lens.TopKTrainingSAE(sae_lens.TopKTrainingSAEConfig(k=plan.k, **base))
    if plan.arch == "abstopk":
        return sae_lens.AbsTopKTrainingSAE(sae_lens.AbsTopKTrainingSAEConfig(k=plan.k, **base))
    if plan.arch == "matching_pursuit":
        return sae_lens.MatchingPursuitTrainingSAE(sae_lens.MatchingPursuitTrainingSAEConfig(
            max_iterations=plan.k, residual_threshold=plan.residual_threshold, **base))
    if plan.arch == "batchtopk":
        return sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(k=plan.k, **base))
    if plan.arch == "matryoshka":
        widths, total = [], 0
        for fraction in plan.group_fractions:
            total += round(fraction * plan.d_sae)
            widths.append(total)
        return sae_lens.MatryoshkaBatchTopKTrainingSAE(
            sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(k=plan.k, matryoshka_widths=[*widths, plan.d_sae], **base))
    if plan.arch == "relu":
        return sae_lens.StandardTrainingSAE(sae_lens.StandardTrainingSAEConfig(l1_coefficient=coeff, l1_warm_up_steps=warm,
                                                                               **base))
    if plan.arch == "jumprelu":
        return sae_lens.JumpReLUTrainingSAE(sae_lens.JumpReLUTrainingSAEConfig(l0_coefficient=coeff, l0_warm_up_steps=warm,
                                                                               **base))
    if plan.arch == "gated":
        return sae_lens.GatedTrainingSAE(sae_lens.GatedTrainingSAEConfig(l1_coefficient=coeff, l1_warm_up_steps=warm, **base))
    raise ValueError(f"SAELens has no trainer for {plan.arch} here")


# ---------------------------------------------------------------- sparsify
def train_sparsify(plan: Plan, batches: Iterable[torch.Tensor]) -> Forward:
    """Its TopK SparseCoder, stepped as its Trainer.fit steps it for the fvu loss (auxk_alpha 0, its default)."""
    if plan.arch != "topk":
        raise ValueError("sparsify trains TopK sparse coders only")
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    torch.manual_seed(plan.seed)
    sae = SparseCoder(plan.d, SparseCoderConfig(k=plan.k, num_latents=plan.d_sae), "cpu", dtype=torch.float32)
    optimizer = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": 5e-3 / math.sqrt(plan.d_sae / 2**14)}]),
                                    momentum=0.95)
    optimizer.train()
    for step, x in enumerate(batches):
        if step == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x=x, y=x, dead_mask=None)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
    optimizer.eval()  # schedule-free: evaluate at the averaged weights, as its trainer saves them
    sae.set_decoder_norm_to_unit_norm()

    @torch.no_grad()
    def forward(x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top_acts, top_indices, _ = sae.encode(x_BD)
        f = torch.zeros(len(x_BD), plan.d_sae).scatter_(-1, top_indices, top_acts)
        return f, sae.decode(top_acts, top_indices)

    return forward


def available() -> dict[str, str | None]:
    """Each reference library: None if it imports, else why not."""
    problems = {}
    for name, probe in (("dictionary_learning", dictionary_learning_trainers), ("saelens", lambda: importlib.import_module("sae_lens")),
                        ("sparsify", lambda: importlib.import_module("sparsify"))):
        try:
            probe()
            problems[name] = None
        except Exception as err:  # a missing optional library: the bench skips it and says why
            problems[name] = f"{type(err).__name__}: {err}"
    return problems

