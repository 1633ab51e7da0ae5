"""This rank's part of a cap-train run (`Trainer`): its pipeline stage, optimizer, data order and
position; the step loop, evals, checkpoints and the final adapters. cap_train.worker runs it.

The loop, per optimizer step t (1-based):
    loss_t = engine.train_batch(gradient_accumulation_steps micro batches of this rank's order)
    Adam step (inside DeepSpeed, gradient clipping), then the decoupled regularization step
    evals at evals_per_run evenly spaced steps (0 and the last included), or with evals_per_epoch
    at step 0 and evenly spaced steps of each epoch (its last step included),
    a checkpoint every checkpoint_interval_hours, at each epoch end and at the last step.
A resume (--resume-from, chosen and checked by cap_train.cli) continues from the checkpoint's
position with this launch's optimizer and schedule settings (cap_train.resume).

Over 300 lines for one reason: Trainer is one object whose set-up steps, step loop, eval and
checkpoint methods share its state (engine, order, position); see docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import functools
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError

from cap_common.adapters.regularize import regularize_model_
from cap_common.config import Config
from cap_common.dtypes import cpu_has_native_bf16, torch_dtype
from cap_common.errors import CapError
from cap_common.files import user_os_errors
from cap_common.models.families import load_hf_config
from cap_train import resume as resuming
from cap_train import startup, watch
from cap_train.checkpoint import FORMAT, Checkpoints, checkpoint_files, file_record, load_legacy_rng, read_state
from cap_train.data import Batches, document_attention, prepared_splits
from cap_train.loss import PipelineLoss
from cap_train.metrics import Metrics
from cap_train.mfu import device_peak_flops, flops_per_token
from cap_train.optim import ClippedAdam, all_finite
from cap_train.order import TrainOrder
from cap_train.outputs import adapter_norms, adapter_tensors, write_epoch_output
from cap_train.profile import StepProfile
from cap_train.schedule import lr_lambda
from cap_train.train_state import load_rng, load_trainable, part_name, save_rng, save_trainable


def peak_memory(device: torch.device) -> dict[str, float]:
    """This process's peak memory so far: CUDA allocator peak, or host peak RSS on CPU."""
    if device.type == "cuda":
        return {"memory/peak_cuda_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    import resource

    return {"memory/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def eval_steps(evals_per_run: int, total_steps: int) -> set[int]:
    """Evenly spaced eval steps including 0 (before any update) and the last."""
    if evals_per_run <= 0:
        return set()
    if evals_per_run == 1 or total_steps == 0:
        return {0}
    return {round(i * total_steps / (evals_per_run - 1)) for i in range(evals_per_run)}


def epoch_eval_steps(evals_per_epoch: int, steps_per_epoch: int, total_steps: int, epoch_start: int = 0) -> set[int]:
    """qlora-pipe-lite's evals_per_epoch: step 0 (before any update), then in every epoch
    e = max(1, min(evals_per_epoch, steps_per_epoch)) evals, after its local steps
    max(1, round(i·steps_per_epoch/e)) for i = 1..e (the last one at the epoch's end; Python's
    round). Epochs start at epoch_start + k·steps_per_epoch; steps past total_steps are dropped."""
    steps = {0}
    if steps_per_epoch <= 0:
        return steps
    e = max(1, min(evals_per_epoch, steps_per_epoch))
    local = {max(1, round(i * steps_per_epoch / e)) for i in range(1, e + 1)}
    for start in range(epoch_start, total_steps, steps_per_epoch):
        steps.update(start + s for s in local if start + s <= total_steps)
    return steps


class Trainer:
    """This rank's part of the run: its pipeline stage, optimizer, data order and position."""

    def __init__(
        self,
        cfg: Config,
        device: torch.device,
        resume_from: Path | None = None,
        restart_epoch: bool = False,
        quiet=contextlib.nullcontext,
        accept_change: bool = False,
    ):
        self.cfg = cfg
        self.accept_change = accept_change  # --accept-config-change: a changed global batch restarts the epoch
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.dp_world = cfg.check_world_size(self.world)
        self.device = device  # cap_train.devices: the accelerator's, matching the process group's backend
        self._warn_bf16_on_cpu()
        self._warn_compile_4bit()
        self._load_data()
        state = self._start_position(resume_from, restart_epoch)
        torch.manual_seed(cfg.seed)
        self.loss = PipelineLoss()
        with quiet():  # DeepSpeed lists the stage's layers and its settings: for the log, not the console
            self.model = self._build_model()
            startup.long_barrier()  # ranks load their stages at different speeds
            self.engine, self.optimizer = self._make_engine()
        self._restore(resume_from, state)
        self._tell_watch(str(resume_from) if resume_from else None)

    # ---------------------------------------------------------------- construction
    def _warn_compile_4bit(self) -> None:
        if self.cfg.compile_layers and not self.cfg.compiles_layers and self.rank == 0:
            print(
                "cap-train: warning: compile_layers = true does not apply with load_in_4bit = true "
                "(torch.compile miscompiles bitsandbytes 4-bit layers); the layers run uncompiled",
                file=sys.stderr,
                flush=True,
            )

    def _warn_bf16_on_cpu(self) -> None:
        if (
            self.device.type == "cpu"
            and self.cfg.model_dtype == "bfloat16"
            and self.rank == 0
            and not cpu_has_native_bf16()
        ):
            print(
                "cap-train: warning: model_dtype = 'bfloat16' on a CPU without native bf16 (no AVX512-BF16 "
                "or AMX): its matmuls run ~60x slower than float32 here; set model_dtype = 'float32'",
                file=sys.stderr,
                flush=True,
            )

    def _load_data(self) -> None:
        """The prepared train / eval splits, this rank's place in the topology and its data order."""
        cfg = self.cfg
        self.train_rows, self.eval_rows = prepared_splits(cfg, self.rank)
        # packed documents attend only to themselves when cap-prep wrote position_ids (its manifest's
        # document_attention): a flag of the model, not a test of each batch's data
        self.document_attention = document_attention(self.train_rows, self.eval_rows)
        self.topology = self._topology()
        coord = self.topology.get_coord(self.rank)
        self.stage, self.dp_rank = coord.pipe, coord.data
        self.order = TrainOrder(
            len(self.train_rows),
            self.dp_rank,
            self.dp_world,
            cfg.seed,
            cfg.micro_batch_size,
            cfg.gradient_accumulation_steps,
        )
        if self.order.steps_per_epoch == 0:
            raise CapError(
                f"{cfg.source}: {len(self.train_rows)} training sequences are fewer than one step needs "
                f"(micro_batch_size × gradient_accumulation_steps × data-parallel = "
                f"{self.order.rows_per_step * self.dp_world})"
            )
        self.batches = Batches(self.train_rows)

    def _start_position(self, resume_from: Path | None, restart_epoch: bool) -> dict | None:
        """Step 0, or the checkpoint's position (whose state is returned; None: a fresh start);
        then the run's total steps."""
        self.step, self.epoch, self.step_in_epoch, self.tokens = 0, 0, 0, 0
        self.restarted = restart_epoch
        state = self._read_resume_state(resume_from, restart_epoch) if resume_from else None
        self.total_steps = self._total_steps()
        return state

    def _restore(self, resume_from: Path | None, state: dict | None) -> None:
        """The run's checkpoints folder; on a resume, the checkpoint's weights, optimizer, schedule and RNG."""
        self.ckpts = Checkpoints(self.cfg.output_dir, self.cfg.max_checkpoints)
        if state is not None:
            self._load_checkpoint(resume_from, state)

    def _topology(self):
        from deepspeed.runtime.pipe.topology import PipeDataParallelTopology, ProcessTopology

        if self.cfg.use_column_major_topology:  # pipeline stages of one replica on neighbouring ranks
            return ProcessTopology(axes=["data", "pipe"], dims=[self.dp_world, self.cfg.pipeline_stages])
        return PipeDataParallelTopology(num_pp=self.cfg.pipeline_stages, num_dp=self.dp_world)

    def _total_steps(self) -> int:
        """Steps of the whole run: epochs × steps per epoch (or max_steps) — counted from the
        checkpoint's step where a changed dataset restarts the current epoch."""
        cfg, per_epoch = self.cfg, self.order.steps_per_epoch
        if self.restarted:
            total = self.step + (cfg.epochs - self.epoch) * per_epoch
        else:
            total = per_epoch * cfg.epochs
        return min(total, cfg.max_steps) if cfg.max_steps else total

    def _build_model(self):
        """This rank's stage of the pipeline model (DeepSpeed builds only its stage's layers)."""
        from deepspeed.pipe import PipelineModule

        from cap_common.models.pipeline import PARTITION_METHOD, layer_specs
        from cap_common.models.spec import ModelSpec

        cfg = self.cfg
        model = PipelineModule(
            layers=layer_specs(ModelSpec.from_config(cfg, self.document_attention), self.device, loss_fn=self.loss),
            topology=self.topology,
            loss_fn=None,
            partition_method=PARTITION_METHOD,
            activation_checkpoint_interval=0,  # each DecoderLayerPipe checkpoints itself (common/models/recompute.py)
        )
        for p in model.parameters():
            if not p.is_contiguous():  # DeepSpeed views parameters as bytes to broadcast and save them
                p.data = p.data.contiguous()
        return model

    def _make_engine(self):
        """The DeepSpeed engine over the model, with ClippedAdam on the trainable parameters and the lr schedule."""
        import deepspeed

        cfg = self.cfg
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not trainable:
            # A stage where layers_to_transform selects no layer still steps with the others and joins
            # the clipping norm's all-reduce. torch refuses an optimizer without parameters and DeepSpeed
            # drops empty param groups, so it gets one 0-element placeholder (never in the model or a file).
            trainable = [torch.nn.Parameter(torch.zeros(0, device=self.device))]
        optimizer = ClippedAdam(
            trainable,
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            foreach=self.device.type == "cuda",  # the per-parameter loop on CPU, as the reference trainer
            max_grad_norm=cfg.max_grad_norm,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, self.total_steps))
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "train_batch_size": cfg.micro_batch_size * cfg.gradient_accumulation_steps * self.dp_world,
            "gradient_clipping": 0.0,  # ClippedAdam clips on the norm over all stages
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
        }
        engine, *_ = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, model_parameters=trainable
        )
        optimizer.pipe_group = engine.grid.get_pipe_parallel_group()
        optimizer.device = self.device
        return engine, optimizer

    # ---------------------------------------------------------------- state
    @functools.cached_property
    def run_record(self) -> dict:
        """What a checkpoint records about this run (compared on resume, cap_train.resume)."""
        return resuming.run_record(
            self.cfg.to_dict(), resuming.data_identity(self.cfg), self.world, resuming.model_shape(self.cfg.model_dir)
        )

    def _read_resume_state(self, path: Path, restart_epoch: bool) -> dict:
        """The checkpoint's position, continued in this run's data order when the global batch is the
        same (any topology for format 3; the writing topology for format 2)."""
        try:
            state = read_state(path)
        except ValueError as e:
            raise CapError(f"{path}: {e}") from None
        old = state.get("run", {})
        self.same_topology = (old.get("processes"), old.get("pipeline_stages")) == (
            self.world,
            self.cfg.pipeline_stages,
        )
        if state.get("format", 1) < 3 and not self.same_topology:
            raise CapError(
                f"{path}: written by an older cap (checkpoint format {state.get('format', 1)}) with "
                f"{old.get('processes')} process(es) × {old.get('pipeline_stages')} stage(s); it resumes only on "
                f"that topology (this run: {self.world} × {self.cfg.pipeline_stages})"
            )
        old_batch = resuming.global_batch(old, old.get("processes")) if "micro_batch_size" in old else None
        batch_changed = old_batch not in (None, self.order.global_batch)
        if batch_changed and self.accept_change:  # --hostfile: the change is seen only here
            restart_epoch = self.restarted = True
        elif batch_changed and not restart_epoch:
            raise CapError(
                f"{path}: the global batch changed from {old_batch} to {self.order.global_batch} rows per step "
                f"(micro_batch_size × gradient_accumulation_steps × data-parallel replicas), so the checkpoint's "
                "position means nothing in this data order; pass --accept-config-change to restart the current "
                "epoch, or keep the global batch (e.g. raise gradient_accumulation_steps as replicas drop)"
            )
        self.step, self.epoch, self.step_in_epoch, self.tokens = (
            state["step"],
            state["epoch"],
            state["step_in_epoch"],
            state["tokens"],
        )
        if restart_epoch:
            self.step_in_epoch = 0
        elif self.step_in_epoch >= self.order.steps_per_epoch:
            raise CapError(
                f"{path}: its position (step {self.step_in_epoch} of epoch {self.epoch + 1}) is past the "
                f"end of this data order ({self.order.steps_per_epoch} steps per epoch)"
            )
        return state

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        """This rank's trainable parameters by name (their global pipeline position leads the name)."""
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def _load_checkpoint(self, path: Path, state: dict) -> None:
        if state.get("format", 1) >= 3:
            load_trainable(path, self.trainable(), self.optimizer, self.device)
            if self.same_topology:
                load_rng(path, self.rank)
            else:  # dropout masks are drawn per rank: a new topology starts its streams afresh
                torch.manual_seed(self.cfg.seed + 1_000_003 * self.step + self.rank)
            self.engine.global_steps = self.step
            self.engine.global_samples = self.step * self.order.global_batch
        else:  # format 2: DeepSpeed's per-rank files, same topology (checked in _read_resume_state)
            self.engine.load_checkpoint(
                str(path), tag="ds", load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=True
            )
            load_legacy_rng(path, self.rank)
        self._apply_schedule()
        if self.rank == 0:
            print(
                f"cap-train: resumed from {path} at step {self.step} (epoch {self.epoch + 1}, step "
                f"{self.step_in_epoch} of {self.order.steps_per_epoch}); lr {self.lr():.3g}",
                file=sys.stderr,
                flush=True,
            )

    def _apply_schedule(self) -> None:
        """This launch's optimizer settings and lr schedule, at the checkpoint's step.

        A checkpoint restores the param groups' hyperparameters and the scheduler's base lr as they
        were; the config of this launch wins: β₁, β₂, ε from it, lr_t = lr · λ(t) with its schedule."""
        scheduler = self.engine.lr_scheduler
        factor = scheduler.lr_lambdas[0]
        for group in self.optimizer.param_groups:
            group.update(
                beta1=self.cfg.beta1,
                beta2=self.cfg.beta2,
                eps=self.cfg.eps,
                initial_lr=self.cfg.lr,
                lr=self.cfg.lr * factor(self.step),
            )
        scheduler.base_lrs = [self.cfg.lr] * len(self.optimizer.param_groups)
        scheduler.last_epoch = self.step
        scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def lr(self) -> float:
        """The lr of the next step: lr · λ(step) (the scheduler advances inside train_batch). From the
        schedule, not the param groups: a stage without trainable parameters has none."""
        return self.cfg.lr * self.engine.lr_scheduler.lr_lambdas[0](self.step)

    def _tell_watch(self, checkpoint: str | None = None) -> None:
        """Where the run stands, for the line that reports a rank that stopped answering (cap_train.watch)."""
        if watch.current is not None:
            watch.current.progress.step = self.step
            if checkpoint:
                watch.current.progress.checkpoint = checkpoint

    def save_checkpoint(self) -> None:
        """Every rank writes its part into the temporary folder, the files are hashed (shared out
        over the ranks), and rank 0 publishes it with state.json."""
        tmp = self.ckpts.tmp_dir(self.step)
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        try:
            if self.dp_rank == 0:  # replicas hold the same weights and optimizer state
                save_trainable(tmp / part_name(self.stage), self.trainable(), self.optimizer)
            save_rng(tmp, self.rank)
        except (OSError, RuntimeError, SafetensorError) as e:  # safetensors' own error type for a full disk
            why = _write_error(e, tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            raise CapError(
                f"{tmp}: cannot write the checkpoint ({why}); the previous checkpoint "
                f"({self.ckpts.newest() or 'none'}) is intact"
            ) from None
        startup.long_barrier()  # one rank may write for long
        box = [checkpoint_files(tmp) if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        mine = {name: file_record(tmp / name) for name in box[0][self.rank :: self.world]}
        records = [None] * self.world
        dist.all_gather_object(records, mine)
        if self.rank == 0:
            files = {k: v for part in records for k, v in part.items()}
            with user_os_errors(tmp, "cannot publish the checkpoint"):
                self.ckpts.publish(
                    self.step,
                    {
                        "format": FORMAT,
                        "step": self.step,
                        "epoch": self.epoch,
                        "step_in_epoch": self.step_in_epoch,
                        "tokens": self.tokens,
                        "global_batch": self.order.global_batch,
                        "total_steps": self.total_steps,
                        "run": self.run_record,
                        "files": dict(sorted(files.items())),
                    },
                )
        startup.long_barrier()  # one rank may write for long
        self._tell_watch(str(self.ckpts.newest()))

    # ---------------------------------------------------------------- eval
    def evaluate(self) -> dict[str, float]:
        """Token-mean eval loss overall and per class, over every whole eval batch; rank 0 shows its
        progress (throttled) and a summary line (cap_train.metrics.EvalProgress)."""
        cfg = self.cfg
        per_batch = self.dp_world * cfg.micro_batch_size * cfg.eval_accumulation
        n_batches = len(self.eval_rows) // per_batch
        # collectives need tensors on the backend's device (NCCL: CUDA)
        stats = torch.zeros(6, dtype=torch.float64, device=self.device)
        if n_batches == 0:
            return {}
        from cap_train.metrics import EvalProgress

        progress = EvalProgress(self.rank == 0, self.step, n_batches * per_batch)
        batches = Batches(self.eval_rows)
        self.loss.eval_stats = True
        try:
            for b in range(n_batches):
                start = b * per_batch + self.dp_rank * cfg.micro_batch_size * cfg.eval_accumulation
                rows = [
                    list(range(start + m * cfg.micro_batch_size, start + (m + 1) * cfg.micro_batch_size))
                    for m in range(cfg.eval_accumulation)
                ]
                self.engine.total_loss = None  # DeepSpeed would add our stats vector to the last train loss
                out = self.engine.eval_batch(
                    iter(batches.micro(r) for r in rows),
                    compute_loss=True,
                    reduce_output="avg",
                    bcast_loss=False,
                    num_micro_batches=cfg.eval_accumulation,
                )
                if self.engine.is_last_stage():
                    stats += out.detach().double().to(self.device)
                progress.update((b + 1) * per_batch)
        finally:
            self.loss.eval_stats = False
        dist.all_reduce(stats)  # only last-stage ranks contribute; the ratios below cancel the scale
        out = {}
        for name, (s, n) in {"all": (0, 1), "class+1": (2, 3), "class-1": (4, 5)}.items():
            if stats[n] > 0:
                out[f"eval/loss_{name}"] = float(stats[s] / stats[n])
        progress.finish(out)
        return out

    # ---------------------------------------------------------------- train
    def flops_per_token(self) -> float:
        """Model FLOPs of one trained token (cap_train/mfu.py), from the model's config.json."""
        cfg = self.cfg
        _, hf_config = load_hf_config(Path(cfg.model_dir))
        first = cfg.layers_to_transform[0] if cfg.layers_to_transform else 0
        return flops_per_token(hf_config, cfg.sequence_len, cfg.full_fine_tune, first)

    def train(self) -> None:
        cfg = self.cfg
        metrics = Metrics(cfg.output_dir, self.rank == 0, self.total_steps, self.step)
        if cfg.evals_per_epoch is not None:  # the current epoch began at step - step_in_epoch
            evals = epoch_eval_steps(
                cfg.evals_per_epoch, self.order.steps_per_epoch, self.total_steps, self.step - self.step_in_epoch
            )
        else:
            evals = eval_steps(cfg.evals_per_run, self.total_steps)
        tokens_per_step = cfg.sequence_len * self.order.rows_per_step * self.dp_world
        step_flops = tokens_per_step * self.flops_per_token()
        peak_flops = self.world * device_peak_flops(self.device, torch_dtype(cfg.model_dtype))[0]
        last_ckpt = time.time()
        if self.step == 0 and 0 in evals:
            metrics.scalars(0, self.evaluate())
        micro = None
        profile = StepProfile.from_env(self.rank == 0, self.device, cfg.output_dir)  # CAP_PROFILE (profile.py)
        while self.step < self.total_steps:
            if micro is None:
                micro = self.batches.iterate(self.order, self.epoch, self.step_in_epoch)
            profile.begin(self.step + 1)
            t0 = time.time()
            rows = self.order.rows(self.epoch)[self.step_in_epoch].reshape(-1)
            lr = self.lr()
            self.batches.pulled = 0.0
            loss = float(self.engine.train_batch(data_iter=micro))
            reg = regularize_model_(self.model, lr, cfg) if cfg.regularizes else {}
            self.step += 1
            self.step_in_epoch += 1
            self.tokens += tokens_per_step
            self.check_finite(loss)
            dt = time.time() - t0
            mfu = step_flops / dt / peak_flops
            values = {
                "train/loss": loss,
                "train/grad_norm": self.optimizer.grad_norm,
                "train/lr": lr,
                "train/tokens_per_s": tokens_per_step / dt,
                "train/mfu": mfu,
                # which rows this rank read, position-weighted: resume tests compare it
                "data/rows_checksum": float(((rows + 1) * (1 + np.arange(len(rows)))).sum()),
            }
            values.update(peak_memory(self.device))
            values.update(self.gather_step_values(reg))
            if self.step in evals:
                values.update(self.evaluate())
            metrics.scalars(self.step, values)
            metrics.progress(self.step, loss, tokens_per_step / dt, lr, mfu)
            profile.end()
            self._tell_watch()
            epoch_end = self.step_in_epoch == self.order.steps_per_epoch
            if epoch_end:
                self.epoch += 1
                self.step_in_epoch = 0
                micro = None
            done = self.step == self.total_steps
            if epoch_end or done:
                self.write_adapters(self.epoch if epoch_end else self.epoch + 1)
            if epoch_end or done or self.time_for_checkpoint(last_ckpt):
                self.save_checkpoint()
                last_ckpt = time.time()
        metrics.close()

    def time_for_checkpoint(self, last: float) -> bool:
        """Rank 0's clock decides, so every rank agrees."""
        flag = torch.tensor(
            [float(time.time() - last >= self.cfg.checkpoint_interval_hours * 3600)], device=self.device
        )
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def check_finite(self, loss: float) -> None:
        weights = all_finite([p for p in self.model.parameters() if p.requires_grad], self.device)
        bad = torch.tensor([0.0 if math.isfinite(loss) else 1.0], device=self.device) + (~weights).float()
        dist.all_reduce(bad)
        if bad.item():
            last = self.ckpts.newest()
            raise CapError(
                f"non-finite {'loss' if not math.isfinite(loss) else 'weights'} at step {self.step}; "
                f"stopped without saving. Last good checkpoint: {last or 'none'} "
                "(lower lr and resume with --resume-from-checkpoint)"
            )

    def gather_step_values(self, reg: dict) -> dict[str, float]:
        """Per-layer adapter norms and regularization size, from every stage to rank 0, and
        data/tokens_checksum: the first stage's replicas' checksums of the token ids DeepSpeed
        pulled this step (data.Batches), summed; one all-gather for both."""
        local = {}
        if self.dp_rank == 0:
            local = adapter_norms(self.model)
            if reg:  # empty without regularization; one copy from the device for all
                removed = torch.stack([s["removed"] for s in reg.values()]).tolist()
                for name, value in zip(reg, removed):  # names start with the pipeline position = layer + 1
                    position, _, rest = name.partition(".")
                    local[f"reg/removed/layer{int(position) - 1:03d}.{rest}"] = value
        everything = [None] * self.world
        dist.all_gather_object(everything, (local, self.batches.pulled if self.stage == 0 else 0.0))
        merged = {}
        for d, _ in everything:
            merged.update(d)
        merged["data/tokens_checksum"] = float(sum(pulled for _, pulled in everything))
        return merged

    def write_adapters(self, epoch: int) -> None:
        folder = Path(self.cfg.output_dir) / f"epoch{epoch}"
        part_dir = folder.with_name(folder.name + ".parts")
        if self.rank == 0:
            shutil.rmtree(part_dir, ignore_errors=True)
            part_dir.mkdir(parents=True)
        dist.barrier()
        try:
            if self.dp_rank == 0:
                from safetensors.torch import save_file

                save_file(adapter_tensors(self.model, self.cfg), str(part_dir / f"stage{self.stage}.safetensors"))
            startup.long_barrier()  # one rank may write for long
            if self.rank == 0:
                write_epoch_output(self.cfg, part_dir, folder)
                shutil.rmtree(part_dir, ignore_errors=True)
                print(f"cap-train: wrote {folder}", file=sys.stderr)
        except (OSError, RuntimeError, SafetensorError) as e:
            why = _write_error(e, part_dir)
            shutil.rmtree(part_dir, ignore_errors=True)
            raise CapError(f"{folder}: cannot write the trained weights ({why})") from None
        startup.long_barrier()  # one rank may write for long


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def _write_error(error: BaseException, folder: Path) -> str:
    """What went wrong writing into `folder`: the OS error, or — for libraries that report a failed
    write without one (torch.save, safetensors) — a full disk when that is what the disk shows."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        usage = None
    if usage is not None and usage.free < min(64 << 20, usage.total // 100):
        return f"No space left on device: {usage.free:,} bytes free; {_first_line(error)}"
    return _first_line(error)
