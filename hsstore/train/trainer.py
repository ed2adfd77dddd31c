"""The `hsstore train` recipe: setup -> train -> evaluate -> checkpoint -> export, on Accelerate.

Read top to bottom like a torchtune recipe. `check_inputs` does every check that can fail on user
input (store roles, draft vocab, draft config vs store, target lm_head, eval split, tracker) before
a process group exists, so a bad flag costs seconds, not a failed job. The teacher is the target's
norm + lm_head over the stored last layer, or, for a store written with `--teacher topk`, the stored
top-k distribution (`TopkTeacher`: no lm_head is loaded for it). `TrainRecipe` then runs the
same code single-process, under DDP or FSDP, as `accelerate launch` sets it up:

- the draft is the only prepared module; the teacher (target norm + lm_head rows, or the draft-vocab
  map of a top-k teacher) is a frozen buffer module on every rank, never wrapped or sharded;
- the TrainLoader's sampler already shards batches by rank, so the DataLoader is not prepared;
- AdamW over the trainable parameters (the embedding is frozen), warmup + cosine, grad clipping,
  gradient accumulation through `accelerator.accumulate`; fp32 master weights, bf16 autocast if asked;
- metrics are summed over the log window and all-reduced before dividing, so every rank's tokens count.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from rich.console import Console

from ..errors import HSStoreError
from .checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .config import DraftConfig
from .loss import StepMetrics, ttt_loss
from .model import Eagle3Draft
from .split import Split
from .teacher import Teacher, TopkTeacher

console = Console(soft_wrap=True)  # one line per log entry, however narrow the terminal

ReportTo = Literal["none", "tensorboard", "wandb", "trackio"]
MixedPrecision = Literal["auto", "no", "bf16"]
ExportFormat = Literal["vllm", "speculators"]
TeacherChoice = Literal["auto", "last", "topk"]
TRACKER_PROJECT = "hsstore-train"
METRICS_FILE = "metrics.jsonl"  # every logged entry, also without a tracker


@dataclass(frozen=True)
class TrainSettings:
    """Every option of `hsstore train`; saved in each checkpoint."""

    store: str
    target: str
    out: str
    draft_config: str | None = None
    eval_fraction: float = 0.0
    eval_store: str | None = None
    max_tokens_per_batch: int = 4096
    epochs: int = 1
    max_steps: int | None = None
    lr: float = 1e-4
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 0.5
    grad_accum: int = 1
    ttt_steps: int = 7
    ttt_decay: float = 0.8
    noise_std: float = 0.0
    num_workers: int = 2
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    resume: bool = False
    log_every: int = 10
    eval_every: int = 500
    report_to: ReportTo = "none"
    export_format: ExportFormat = "vllm"
    mixed_precision: MixedPrecision = "auto"
    teacher: TeacherChoice = "auto"

    def __post_init__(self) -> None:
        positive = ("max_tokens_per_batch", "epochs", "grad_accum", "ttt_steps", "log_every", "max_steps")
        non_negative = ("warmup_steps", "weight_decay", "grad_clip", "noise_std", "num_workers")
        non_negative += ("checkpoint_every", "keep_checkpoints", "eval_every")
        for names, low in ((positive, 1), (non_negative, 0)):
            for name in names:
                value = getattr(self, name)
                if value is not None and value < low:
                    raise HSStoreError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise HSStoreError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_fraction and self.eval_store:
            raise HSStoreError("pass either --eval-fraction or --eval-store, not both")
        if not 0.0 < self.ttt_decay <= 1.0:
            raise HSStoreError(f"--ttt-decay must be in (0, 1], got {self.ttt_decay}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- checks before anything runs ----------------------------------------------------------------------
@dataclass
class RunInputs:
    """What the checks produced: all of it is needed to train, none of it needs a process group."""

    config: DraftConfig
    d2t: torch.Tensor
    t2d: torch.Tensor
    split: Split
    teacher: Teacher | TopkTeacher
    resume_from: Path | None


def teacher_kind(manifest: Any, choice: str = "auto") -> str:
    """Which teacher a store trains with: "topk" if it keeps one (unless --teacher last), else "last"."""
    if choice not in ("auto", "last", "topk"):
        raise HSStoreError(f"--teacher {choice!r}: choose auto, last or topk")
    if choice == "auto":
        return "topk" if manifest.teacher is not None else "last"
    return choice


def require_training_roles(reader: Any, teacher: str = "auto") -> None:
    """EAGLE-3 reads the aux layers; the teacher reads the last layer or the stored top-k."""
    m = reader.manifest
    roles = m.roles
    if "aux" not in roles:
        raise HSStoreError(
            f"{reader.location} has hidden roles {roles}, no 'aux' (the draft's input features); regenerate it "
            "with `hsstore generate`"
        )
    kind = teacher_kind(m, teacher)
    if kind == "last" and "last" not in roles:
        held = " (it keeps a top-k teacher: train with --teacher topk or auto)" if m.teacher is not None else ""
        raise HSStoreError(
            f"{reader.location} has hidden roles {roles}, no 'last' (the target's last layer, the teacher's "
            f"input){held}; regenerate it with `hsstore generate --teacher last` (or --teacher topk)"
        )
    if kind == "topk" and m.teacher is None:
        raise HSStoreError(
            f"{reader.location} keeps no top-k teacher; train with --teacher last, or regenerate it with "
            "`hsstore generate --teacher topk`"
        )
    if not len(reader):
        raise HSStoreError(f"{reader.location} holds no committed samples")


def build_teacher(
    manifest: Any, choice: str, target: str, d2t: torch.Tensor, t2d: torch.Tensor
) -> Teacher | TopkTeacher:
    """The teacher module for a store: a top-k one needs only the draft-vocab maps, not the target's lm_head."""
    if teacher_kind(manifest, choice) == "topk":
        return TopkTeacher(d2t, t2d)
    return Teacher.from_target(target, d2t, t2d)  # refuses an lm_head of another vocab


def load_draft_config(path: str | None, target: str, manifest: Any, draft_vocab_size: int) -> DraftConfig:
    """A config file if given, else sized from the target with the store's aux layers."""
    if path:
        return DraftConfig.from_file(path)
    return DraftConfig.from_target(target, draft_vocab_size, manifest.hidden_spec("aux").layer_ids)


def check_tracker(report_to: str) -> None:
    """Accelerate's trackers import their package lazily; fail now, not after the first log step."""
    if report_to == "none":
        return
    from accelerate.utils import is_tensorboard_available, is_trackio_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "trackio": is_trackio_available}
    if report_to not in available:
        raise HSStoreError(f"--report-to {report_to!r}: choose none, tensorboard, wandb or trackio")
    if not available[report_to]():
        raise HSStoreError(f"--report-to {report_to} needs the {report_to} package (pip install {report_to})")


def warn_if_other_target(manifest: Any, target: str) -> None:
    """Sizes are checked strictly elsewhere; a different config.json with equal sizes only earns a warning."""
    from ..generate.pipeline import config_hash

    stored, ours = manifest.target.config_hash, config_hash(target)
    if stored and ours and stored != ours and os.environ.get("RANK", "0") == "0":  # once, not per rank
        console.print(
            f"[yellow]warning:[/] {target}/config.json differs from the one the store was made with "
            f"({manifest.target.name_or_path}); sizes match, so training goes on",
            highlight=False,
        )


def check_inputs(s: TrainSettings) -> RunInputs:
    """Every user-input error, with its fix, before a process group or a tensor on the device exists."""
    from ..reader import StoreReader
    from ..vocab import read_draft_vocab
    from .split import split_store

    if not s.resume and list_checkpoints(s.out):
        raise HSStoreError(f"{s.out} already holds checkpoints; pass --resume to continue, or another --out")
    reader = StoreReader(s.store)
    require_training_roles(reader, s.teacher)
    vocab = read_draft_vocab(reader)
    d2t, t2d = torch.as_tensor(vocab.d2t), torch.as_tensor(vocab.t2d)
    config = load_draft_config(s.draft_config, s.target, reader.manifest, len(d2t))
    config.check_store(reader.manifest, len(d2t))
    eval_reader = None
    if s.eval_store:
        eval_reader = StoreReader(s.eval_store)
        require_training_roles(eval_reader, teacher_kind(reader.manifest, s.teacher))  # the train store's teacher
        config.check_store(eval_reader.manifest)
    split = split_store(reader, eval_fraction=s.eval_fraction, eval_reader=eval_reader)
    warn_if_other_target(reader.manifest, s.target)
    check_tracker(s.report_to)
    teacher = build_teacher(reader.manifest, s.teacher, s.target, d2t, t2d)
    resume_from = latest_checkpoint(s.out) if s.resume else None
    return RunInputs(config, d2t, t2d, split, teacher, resume_from)


# --- pieces of the recipe ----------------------------------------------------------------------------
def resolve_mixed_precision(choice: str) -> str:
    """auto: the launcher's setting if `accelerate launch` gave one, else bf16 on a bf16 GPU, else no."""
    if choice != "auto":
        return choice
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launched:
        return launched
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def fsdp_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def make_accelerator(s: TrainSettings) -> Any:
    """An Accelerator for whatever `accelerate launch` asked; plain `hsstore train` gets one process.

    On a machine without GPUs accelerate runs multi-process jobs as MULTI_CPU (gloo) only when told
    cpu=True, and then turns an FSDP request silently into DDP (it enables FSDP for GPU-like backends
    only). torch's FSDP2 does run on gloo, so for fsdp_version 2 the shared state is marked as a
    multi-device run before the AcceleratorState reads it; anything else asked for FSDP is refused.
    """
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType

    cpu = not torch.cuda.is_available()
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if cpu and multi and fsdp_requested():
        if os.environ.get("FSDP_VERSION", "1") != "2":
            raise HSStoreError("FSDP on CPU runs only as FSDP2: set fsdp_version: 2 in the accelerate config")
        PartialState(cpu=True).distributed_type = DistributedType.MULTI_GPU  # shared state; see docstring
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=resolve_mixed_precision(s.mixed_precision),
        gradient_accumulation_steps=s.grad_accum,
        log_with=None if s.report_to == "none" else s.report_to,
        project_dir=s.out,
    )
    if fsdp_requested() and multi and accelerator.distributed_type != DistributedType.FSDP:
        raise HSStoreError(f"FSDP was asked for, accelerate set up {accelerator.distributed_type}; refusing to train")
    return accelerator


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak over `warmup` steps, then cosine to zero at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def metrics_dict(m: StepMetrics, decay: float) -> dict[str, float]:
    """The summary plus the objective itself (decay-weighted sum of the per-step losses)."""
    weights = decay ** torch.arange(len(m.count), dtype=torch.float64, device=m.count.device)
    return {"loss": float((weights * m.loss).sum()), **m.summary()}


def format_metrics(values: dict[str, float], steps: int) -> str:
    accs = " ".join(f"{values[f'acc_{k}']:.2f}" for k in range(steps))
    accepts = " ".join(f"{values[f'accept_{k}']:.2f}" for k in range(steps))
    return (
        f"loss [bold]{values['loss']:.4f}[/] | acc {accs} | accept {accepts} | "
        f"τ [bold]{values['acceptance_length_greedy']:.2f}[/] (chained {values['acceptance_length_chained']:.2f}, "
        f"sampled {values['acceptance_length_sampled']:.2f})"
    )


@dataclass
class Window:
    """Sums since the last log line; reduced across ranks before use."""

    metrics: StepMetrics
    decay: float
    tokens: float = 0.0
    wait: float = 0.0
    elapsed: float = 0.0
    grad_norm: float = float("nan")

    def reduce(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor], world: int) -> dict[str, float]:
        """One all-reduce of every sum, then the logged values (metrics, tokens/s, data-wait share)."""
        shape = self.metrics.as_tensor().shape
        extras = torch.tensor([self.tokens, self.wait, self.elapsed], dtype=torch.float64, device=self.device)
        total = reduce_sum(torch.cat([self.metrics.as_tensor().flatten(), extras]))
        tokens, wait, elapsed = total[-3:].tolist()
        wall = elapsed / world  # the ranks' mean time
        return {
            **metrics_dict(StepMetrics.from_tensor(total[:-3].view(shape)), self.decay),
            "tokens_per_s": tokens / max(wall, 1e-9),
            "data_wait_share": wait / max(elapsed, 1e-9),
            "grad_norm": self.grad_norm,
        }

    @property
    def device(self) -> torch.device:
        return self.metrics.count.device


# --- the recipe --------------------------------------------------------------------------------------
@dataclass
class TrainRecipe:
    settings: TrainSettings
    inputs: RunInputs
    step: int = 0
    total_steps: int = 0
    saved_step: int = -1

    def setup(self) -> None:
        from accelerate.utils import set_seed

        from .data import NoiseConfig
        from .loader import build_loader

        s, inp = self.settings, self.inputs
        self.accelerator = acc = make_accelerator(s)
        self.device = acc.device
        Path(s.out).mkdir(parents=True, exist_ok=True)
        set_seed(s.seed)  # the same draft init on every rank (FSDP shards each rank's own copy)
        draft = Eagle3Draft.from_target(inp.config, s.target, inp.d2t, inp.t2d)
        self.teacher = inp.teacher.to(self.device).requires_grad_(False)
        optimizer = torch.optim.AdamW(
            draft.trainable_parameters(), lr=s.lr, betas=(0.9, 0.95), weight_decay=s.weight_decay
        )
        self.model, self.optimizer = acc.prepare(draft, optimizer)
        common = dict(max_tokens=s.max_tokens_per_batch, rank=acc.process_index, world_size=acc.num_processes)
        noise = NoiseConfig("uniform", s.noise_std) if s.noise_std > 0 else None
        self.train_loader = build_loader(
            s.store, indices=inp.split.train, seed=s.seed, num_workers=s.num_workers, noise=noise, **common
        )
        self.eval_loader = None
        if len(inp.split.eval):
            where = inp.split.eval_location or s.store
            self.eval_loader = build_loader(
                where, indices=inp.split.eval, shuffle=False, num_workers=min(s.num_workers, 1), **common
            )
        self.total_steps = s.max_steps or max(
            1, sum(self.train_loader.sampler.steps(e) for e in range(s.epochs)) // s.grad_accum
        )
        # not prepared: accelerate would step it once per process; checkpointed through accelerate anyway
        self.scheduler = warmup_cosine(self.optimizer.optimizer, s.warmup_steps, self.total_steps)
        acc.register_for_checkpointing(self.scheduler)
        gen_device = self.device if self.device.type != "cpu" else "cpu"
        self.noise_rng = torch.Generator(gen_device).manual_seed(s.seed * 1_000_003 + acc.process_index)
        if inp.resume_from is not None:
            self.restore(inp.resume_from)
        elif s.resume and acc.is_main_process:
            console.print(f"--resume: no checkpoint in {s.out}/checkpoints yet, starting from step 0", highlight=False)
        if s.report_to != "none":
            acc.init_trackers(TRACKER_PROJECT, config={k: str(v) if v is None else v for k, v in s.to_dict().items()})
        self.print_header()

    def print_header(self) -> None:
        acc, s, split = self.accelerator, self.settings, self.inputs.split
        trainable = sum(p.numel() for p in self.optimizer.optimizer.param_groups[0]["params"])
        if acc.is_main_process:
            console.print(
                f"train: {len(split.train):,} samples, eval: {len(split.eval):,} | {acc.num_processes} process(es), "
                f"{acc.distributed_type.value}, mixed precision {acc.mixed_precision}, device {self.device} | "
                f"{self.total_steps} steps of {s.grad_accum} x {s.max_tokens_per_batch} tokens per rank | "
                f"{trainable:,} trainable parameters",
                highlight=False,
            )

    # --- checkpoints --------------------------------------------------------------------------------
    def save(self) -> None:
        s = self.settings
        meta = {"settings": s.to_dict(), "draft_config": self.inputs.config.to_dict(), "total_steps": self.total_steps}
        rank_state = {"loader": self.train_loader.state_dict(), "noise_rng": self.noise_rng.get_state()}
        path = save_checkpoint(self.accelerator, s.out, self.step, meta, rank_state, s.keep_checkpoints)
        self.saved_step = self.step
        if self.accelerator.is_main_process:
            console.print(f"checkpoint {path}", highlight=False)

    def restore(self, path: Path) -> None:
        meta, rank_state = load_checkpoint(self.accelerator, path)
        try:
            self.train_loader.load_state_dict(rank_state["loader"])
        except ValueError as e:
            raise HSStoreError(f"--resume from {path}: {e}") from None
        self.noise_rng.set_state(rank_state["noise_rng"])
        self.step = self.saved_step = int(meta["step"])
        if self.accelerator.is_main_process:
            console.print(f"resumed from {path} at step {self.step}", highlight=False)

    # --- loops --------------------------------------------------------------------------------------
    def batches(self) -> Iterator[dict[str, Any]]:
        """The train loader, epoch after epoch, for as many steps as asked."""
        while True:
            yield from self.train_loader

    def train(self) -> None:
        s, acc = self.settings, self.accelerator
        batches = self.batches()
        window = Window(StepMetrics.zeros(s.ttt_steps, self.device), s.ttt_decay)
        while self.step < self.total_steps:
            started = time.perf_counter()
            for _ in range(s.grad_accum):
                t0 = time.perf_counter()
                batch = self.train_loader.to_device(next(batches), self.device, generator=self.noise_rng)
                window.wait += time.perf_counter() - t0
                with acc.accumulate(self.model):
                    loss, metrics = ttt_loss(self.model, batch, self.teacher, s.ttt_steps, s.ttt_decay)
                    acc.backward(loss)
                    if acc.sync_gradients:  # max_norm inf: measure the norm without clipping
                        max_norm = s.grad_clip or float("inf")
                        window.grad_norm = _to_float(acc.clip_grad_norm_(self.model.parameters(), max_norm))
                    self.optimizer.step()
                    self.optimizer.zero_grad()
                window.metrics = window.metrics + metrics
                window.tokens += float((batch["seq_ids"] >= 0).sum())
            self.scheduler.step()
            self.step += 1
            window.elapsed += time.perf_counter() - started
            if self.step % s.log_every == 0 or self.step == self.total_steps:
                self.log_train(window)
                window = Window(StepMetrics.zeros(s.ttt_steps, self.device), s.ttt_decay)
            if s.eval_every and self.step % s.eval_every == 0 and self.step < self.total_steps:
                self.evaluate()
            if s.checkpoint_every and self.step % s.checkpoint_every == 0:
                self.save()

    def log_train(self, window: Window) -> None:
        acc = self.accelerator
        values = window.reduce(lambda t: acc.reduce(t, reduction="sum"), acc.num_processes)
        values |= {"lr": self.scheduler.get_last_lr()[0], "epoch": float(self.train_loader.epoch)}
        self.record("train", values)
        if acc.is_main_process:
            console.print(
                f"step {self.step}/{self.total_steps} | {format_metrics(values, self.settings.ttt_steps)} | "
                f"lr {values['lr']:.2e} | gnorm {values['grad_norm']:.3f} | "
                f"{values['tokens_per_s']:,.0f} tok/s | data wait {values['data_wait_share']:.1%}",
                highlight=False,
            )

    def record(self, split: str, values: dict[str, float]) -> None:
        """To the trackers and to OUT/metrics.jsonl (main process)."""
        self.accelerator.log({f"{split}/{k}": v for k, v in values.items()}, step=self.step)
        if self.accelerator.is_main_process:
            with open(Path(self.settings.out) / METRICS_FILE, "a") as f:
                f.write(json.dumps({"split": split, "step": self.step, **values}) + "\n")

    def evaluate(self) -> dict[str, float] | None:
        if self.eval_loader is None:
            return None
        acc, s = self.accelerator, self.settings
        metrics = evaluate(self.model, self.teacher, self.eval_loader, self.device, s.ttt_steps, s.ttt_decay)
        metrics = StepMetrics.from_tensor(acc.reduce(metrics.as_tensor(), reduction="sum"))
        values = metrics_dict(metrics, s.ttt_decay)
        self.record("eval", values)
        if acc.is_main_process:
            console.print(f"[cyan]eval[/] step {self.step} | {format_metrics(values, s.ttt_steps)}", highlight=False)
        return values

    def export(self) -> Path:
        from .export import export_draft

        acc, s = self.accelerator, self.settings
        state = acc.get_state_dict(self.model)  # collective: gathers FSDP shards
        out = Path(s.out) / "draft"
        if acc.is_main_process:
            export_draft(acc.unwrap_model(self.model), out, s.target, s.export_format, state_dict=state)
            console.print(f"[green]exported[/] the draft ({s.export_format} format) to {out}", highlight=False)
        acc.wait_for_everyone()
        return out

    def run(self) -> Path:
        self.setup()
        try:
            self.train()
            self.evaluate()
            if self.saved_step != self.step:
                self.save()
            return self.export()
        finally:
            self.accelerator.end_training()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    teacher: Teacher | TopkTeacher,
    loader: Any,
    device: torch.device | str,
    steps: int,
    decay: float,
) -> StepMetrics:
    """One pass over this rank's eval batches; per-step sums (reduce them across ranks before dividing)."""
    was_training = model.training
    model.eval()
    total = StepMetrics.zeros(steps, device)
    for batch in loader:
        _, metrics = ttt_loss(model, loader.to_device(batch, device), teacher, steps, decay, walk=True)
        total = total + metrics
    model.train(was_training)
    return total


@dataclass(frozen=True)
class EvalResult:
    checkpoint: Path
    samples: int
    steps: int
    values: dict[str, float]
    counts: list[int]


def evaluate_checkpoint(
    checkpoint: str | Path,
    store: str,
    target: str | None = None,
    max_tokens: int | None = None,
    ttt_steps: int | None = None,
    num_workers: int = 1,
    teacher: TeacherChoice = "auto",
) -> EvalResult:
    """`hsstore eval`: a checkpoint's metrics over every sample of a store, in one process.

    The teacher follows the evaluated store (auto: its top-k if it keeps one), not the training run's."""
    from ..reader import StoreReader
    from .checkpoint import read_meta, resolve_checkpoint, restore_draft
    from .loader import build_loader

    path = resolve_checkpoint(checkpoint)
    run = read_meta(path)["settings"]
    draft = restore_draft(path)
    reader = StoreReader(store)
    require_training_roles(reader, teacher)
    draft.config.check_store(reader.manifest)
    teacher_module = build_teacher(reader.manifest, teacher, target or run["target"], draft.d2t, draft.t2d)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    max_tokens = max_tokens or run["max_tokens_per_batch"]
    loader = build_loader(store, max_tokens=max_tokens, shuffle=False, num_workers=num_workers)
    steps = ttt_steps or run["ttt_steps"]
    metrics = evaluate(draft.to(device), teacher_module.to(device), loader, device, steps, run["ttt_decay"])
    values = metrics_dict(metrics, run["ttt_decay"])
    return EvalResult(path, len(reader), steps, values, [int(c) for c in metrics.count.tolist()])


def _to_float(x: Any) -> float:
    """Grad norms come back as tensors, DTensors under FSDP2, or None."""
    if x is None:
        return float("nan")
    if hasattr(x, "full_tensor"):
        x = x.full_tensor()
    return float(x)


def run_training(settings: TrainSettings) -> Path:
    """`hsstore train`: checks, then the recipe; returns the export directory."""
    inputs = check_inputs(settings)
    return TrainRecipe(settings, inputs).run()
