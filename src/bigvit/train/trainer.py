"""The training loop: the one place where model, parallel layout, data and optimizer meet."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import torch
from omegaconf import OmegaConf

from bigvit.config import local_batch_size, validate
from bigvit.data import build_data, prepare
from bigvit.data.resolution import ResolutionSchedule, Stage, scheduled_batch
from bigvit.errors import ConfigError
from bigvit.models.registry import build_model, count_params
from bigvit.optim import apply_lr, lr_factor, param_groups, schedule_args
from bigvit.optim.lean import LeanAdam
from bigvit.optim.schedule import warmup_warning
from bigvit.parallel.distributed import DistEnv, all_reduce, barrier
from bigvit.parallel.mesh import build_mesh, resolve_dims
from bigvit.parallel.parallelize import DTYPES
from bigvit.scaling.flops import train_flops
from bigvit.train import chaos
from bigvit.train.checkpoint import Checkpointer, rng_state, set_rng_state
from bigvit.train.ema import EMAEvaluation, build_ema
from bigvit.train.engine import build_engine
from bigvit.train.fewshot import FewShotEvaluation, filled_batches
from bigvit.train.init_weights import load_initial_weights
from bigvit.train.loggers import build_loggers, console_line
from bigvit.train.metrics import Throughput, live_tensor_bytes, peak_flops, peak_memory_bytes
from bigvit.train.objectives import build_objective
from bigvit.train.preemption import Preempted, StopSignal, clear_preempted, mark_preempted
from bigvit.train.scores import add_scores, empty_scores, score_figures
from bigvit.train.siglip import check_vocabulary
from bigvit.train.watchdog import StepWatchdog

log = logging.getLogger("bigvit")


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay, cfg.no_decay)
    # Each group carries its lr_scale; the schedule sets every group's LR before each step.
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.name == "lean":
        return LeanAdam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


class Trainer:
    def __init__(self, cfg, env: DistEnv, run_dir: Path):
        validate(cfg)
        self.cfg, self.env, self.run_dir = cfg, env, run_dir
        tcfg = cfg.trainer
        if env.is_main and (warning := warmup_warning(cfg.schedule, tcfg.max_steps)):
            log.warning(warning)
        self.dims = resolve_dims(cfg.parallel, env.world_size)
        dp_rank = env.rank // (self.dims.cp * self.dims.tp)  # ranks sharing a cp×tp group read the same data
        # Drop-path and patch-dropout draws differ between data-parallel ranks but not within a tp×cp
        # group, whose ranks compute one forward of the same images; weights do not depend on it.
        torch.manual_seed(tcfg.seed + dp_rank)
        self.local_batch = local_batch_size(cfg.data.batch_size, self.dims.dp, tcfg.grad_accum)

        model = build_model(OmegaConf.to_container(cfg.model, resolve=True), device="meta")
        self.model_cfg, self.num_params = model.cfg, count_params(model)
        mesh = build_mesh(self.dims, env.device.type) if env.distributed else None
        self.engine = build_engine(
            model, mesh, self.dims, cfg, env.device, lambda m: build_optimizer(m, cfg.optim)
        )
        self.ema = build_ema(cfg.get("ema"), self.engine)  # checkpointed with the engine's state

        self.objective = build_objective(cfg, mesh, self.dims, env.device)

        if env.is_main:
            prepare(cfg.data)
        barrier()
        self.data = build_data(
            cfg.data, rank=dp_rank, world_size=self.dims.dp, local_batch=self.local_batch, seed=tcfg.seed
        )
        if self.data.tokenizer is not None and self.model_cfg.text is not None:
            check_vocabulary(self.data.tokenizer, self.model_cfg.text)
        self.checkpoint_at = set(tcfg.get("checkpoint_at") or ())
        asynchronous = bool(tcfg.get("checkpoint_async", False))
        if asynchronous and not self.engine.saves_async:
            raise ConfigError(
                f"trainer.checkpoint_async=true needs DCP's async save, which parallel.strategy="
                f"{cfg.parallel.strategy} does not use; set trainer.checkpoint_async=false"
            )
        self.checkpointer = Checkpointer(
            run_dir / "checkpoints",
            env.rank,
            tcfg.keep_checkpoints,
            pinned=tuple(self.checkpoint_at),
            asynchronous=asynchronous,
        )
        self.logger = build_loggers(
            cfg.logger, run_dir, OmegaConf.to_container(cfg, resolve=True), env.is_main
        )
        self.checkpointer.on_complete = self.logger.checkpoint
        if env.is_main and self.data.tokenizer is not None:  # what turns the run's captions into tokens
            self.data.tokenizer.save(run_dir / "tokenizer.json")
        self.step = 0
        self.stop = StopSignal(env.device)
        if env.is_main:
            clear_preempted(run_dir)

        self.resolution = ResolutionSchedule.from_config(cfg.data, tcfg.max_steps, self.model_cfg.patch_size)
        self._flops: dict[int, tuple[int, int]] = {}
        flops_per_image = self.step_flops(cfg.data.image_size)[0]
        peak = peak_flops(env.device, DTYPES[tcfg.precision], cfg.hardware.peak_tflops) * env.world_size
        self.throughput = Throughput(peak)
        log.info(
            "model %s: %s parameters, %.2f GFLOP/image (train) | layout %s %s | global batch %d = %d/rank "
            "× %d dp × %d accum | peak %.1f TFLOP/s",
            self.model_cfg.name,
            f"{self.num_params:,}",
            flops_per_image / 1e9,
            cfg.parallel.strategy,
            self.dims,
            cfg.data.batch_size,
            self.local_batch,
            self.dims.dp,
            tcfg.grad_accum,
            peak / 1e12,
        )
        if len(self.resolution.stages) > 1:
            log.info("resolution schedule: %s", self.resolution.describe(tcfg.max_steps))
        self.evaluators = self.build_evaluators()
        chaos.install(self)  # fault injection for resume tests; off unless BIGVIT_CHAOS is set

    def step_flops(self, image_size: int) -> tuple[int, int]:
        """(model, executed) training FLOPs per image at `image_size`. Executed FLOPs also count what
        activation checkpointing recomputes and the padding of a token-sharded layout."""
        if image_size in self._flops:
            return self._flops[image_size]
        recompute = self.cfg.parallel.activation_checkpointing == "full"
        sequence_parallel = self.dims.tp > 1 and self.cfg.parallel.get("sequence_parallel", True)
        shards = self.dims.cp * (self.dims.tp if sequence_parallel else 1)
        executed = train_flops(self.model_cfg, image_size, recompute=recompute, sequence_multiple=shards)
        self._flops[image_size] = train_flops(self.model_cfg, image_size), executed
        return self._flops[image_size]

    def seen(self) -> tuple[int, float]:
        """(training images read so far, their mean model FLOPs per image): compute = the product."""
        by_size = self.resolution.images_by_size(self.step, self.cfg.data.batch_size)
        images = sum(by_size.values())
        if not images:
            return 0, self.step_flops(self.cfg.data.image_size)[0]
        return images, sum(self.step_flops(size)[0] * n for size, n in by_size.items()) / images

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> dict:
        tcfg = self.cfg.trainer
        start = time.perf_counter()
        self.resume()
        batches = iter(self.data.train)
        eval_metrics, metrics = {}, {}
        first_step = self.step
        stop_step = min(tcfg.stop_step or tcfg.max_steps, tcfg.max_steps)
        with StepWatchdog(tcfg.watchdog_s, tcfg.watchdog_action, self.env.rank) as watchdog:
            while self.step < stop_step:
                lr = self.set_lr()
                stage = self.resolution.stage_at(self.step)
                loss, grad_norm = self.train_step(batches, stage)
                self.step += 1
                images = self.cfg.data.batch_size * stage.batch_multiple
                self.throughput.step(images, *(images * f for f in self.step_flops(stage.image_size)))
                last = self.step == stop_step
                log_step = self.step % self.cfg.logger.console_every == 0 or last
                if log_step:
                    metrics = self.log_train_metrics(loss, lr, grad_norm, stage.image_size)
                if self.ema is not None:
                    self.ema.update(self.step)
                if figures := self.evaluate(final=last):
                    eval_metrics.update(figures)  # each evaluator's latest figures
                    self.throughput.reset()  # evaluation time is not training throughput
                periodic = tcfg.checkpoint_every and self.step % tcfg.checkpoint_every == 0
                if periodic or self.step in self.checkpoint_at or last:
                    self.save()
                    self.throughput.reset()
                elif log_step and self.stop.requested():  # agreed where the loop syncs anyway, not every step
                    self.stop_for_preemption()
                watchdog.beat(self.step)
        self.checkpointer.finish()  # an asynchronous save still in flight completes
        if not eval_metrics:  # resumed at the final step: still report the model's quality
            eval_metrics = self.evaluate(final=True)
        summary = self.summary(metrics, eval_metrics, time.perf_counter() - start, first_step)
        self.logger.summary(summary)
        self.logger.finish()
        return summary

    def log_train_metrics(self, loss: torch.Tensor, lr: float, grad_norm: torch.Tensor, resolution: int) -> dict:
        metrics = {
            "loss": all_reduce(loss).item(),
            "lr": lr,
            "grad_norm": grad_norm.item(),
            "resolution": resolution,
            "peak_memory_gib": peak_memory_bytes(self.env.device) / 2**30,
            **self.throughput.report(),
            **self.objective.figures(resolution),
            **{f"data/{k}": v for k, v in self.skip_counts(self.data.train).items()},
        }
        max_steps = self.cfg.trainer.max_steps
        log.info(console_line(self.step, max_steps, metrics, metrics["step_time"] * (max_steps - self.step)))
        self.logger.log({f"train/{k}": v for k, v in metrics.items()}, self.step)
        return metrics

    def stop_for_preemption(self) -> NoReturn:
        """A scheduler asked to stop: checkpoint, leave the marker launch scripts requeue on, leave."""
        self.save()
        self.checkpointer.finish()
        self.logger.finish()
        signal_name = self.stop.received or "a signal on another rank"
        if self.env.is_main:
            mark_preempted(self.run_dir, signal_name, self.step)
        raise Preempted(signal_name, self.step)

    def set_lr(self) -> float:
        factor = lr_factor(self.step, **schedule_args(self.cfg.schedule, self.cfg.trainer.max_steps))
        return apply_lr(self.engine, self.cfg.optim.lr, factor)

    def train_step(self, batches, stage: Stage) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over `grad_accum` micro-batches at the stage's resolution; returns (mean
        loss on this rank, grad norm)."""
        accum = self.cfg.trainer.grad_accum
        total_loss = torch.zeros((), device=self.env.device)
        self.engine.zero_grad()
        for micro in range(accum):
            images, targets = scheduled_batch(self.data.device_batch, batches, self.env.device, stage)
            inputs = self.objective.inputs(images, targets)
            outputs = self.engine.forward(*inputs, sync_grads=micro == accum - 1)
            loss = self.objective(outputs, targets, images)
            self.engine.backward(loss / accum)
            total_loss += loss.detach()
        return total_loss / accum, self.engine.step()

    @torch.no_grad()
    def evaluate(self, final: bool = False) -> dict:
        """The figures of every evaluator due at this step (all of them when `final`), logged as eval/<name>."""
        due = [e for every, e in self.evaluators if final or (every and self.step % every == 0)]
        if not due:
            return {}
        self.engine.train(False)
        result = {}
        for evaluator in due:
            result.update(evaluator(self))
        self.engine.train(True)
        self.logger.log({f"eval/{k}": v for k, v in result.items()}, self.step)
        return result

    def build_evaluators(self) -> list[tuple[int, Callable[[Trainer], dict]]]:
        """(steps between runs, 0 = only at the end; evaluator) pairs: plain, EMA, few-shot."""
        tcfg, found = self.cfg.trainer, []
        if self.data.make_eval is not None:
            found.append((tcfg.eval_every, Trainer.classification))
            if self.ema is not None:
                found.append((tcfg.eval_every, EMAEvaluation(self.ema)))
        if tcfg.get("fewshot_every"):
            probe = FewShotEvaluation(self.cfg.get("fewshot"), self.model_cfg.num_classes, self.data, self.cfg.data.kind)
            found.append((tcfg.fewshot_every, probe))
        return found

    def classification(self) -> dict:
        """The plain evaluation of the live weights (as the objective scores them), logged to the console."""
        result = self.held_out_scores()
        skipped = sum(v for k, v in result.items() if k.startswith("skipped_"))
        # The objective's mean figures (sigmoid's precision and recall, siglip's zero-shot and recalls) join
        # the line; per-label ones ("eval_precision/3") stay in the logs.
        shown = {
            key.removeprefix("eval_"): value
            for key, value in result.items()
            if isinstance(value, float) and "/" not in key and not key.startswith("skipped_")
        }
        if "top1" in shown:  # top-1 and loss first, as they always were
            shown = {"top-1": shown.pop("top1"), "loss": shown.pop("loss"), **shown}
        figures = " | ".join(f"{name} {value:.4f}" for name, value in shown.items())
        samples = result.get("eval_samples", result.get("retrieval_samples", 0))
        log.info("eval step %d | %s | %d samples | %d bad skipped", self.step, figures, samples, skipped)
        return result

    def held_out_scores(self) -> dict:
        """The held-out figures of the weights now in the model, as the objective scores them (its
        `evaluator`: train/objectives.py), else softmax top-1 and loss (classify)."""
        return (getattr(self.objective, "evaluator", None) or Trainer.classify)(self)

    @torch.no_grad()
    def classify(self) -> dict:
        """Top-1 and loss over the whole held-out set with the weights now in the model; every sample counted
        once across ranks."""
        sums = empty_scores(self.env.device)
        loader = self.data.make_eval()
        for images, labels in self.held_out_batches(loader):
            add_scores(sums, self.engine.forward(images).float(), labels)
        return {**score_figures(self.summed_over_ranks(sums)), **self.skip_counts(loader)}

    def held_out_batches(self, loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) on the device of each of this rank's batches of an evaluation pass, in lockstep
        with the other ranks (sharded forwards are collectives): a rank that has run out feeds a one-row
        filler batch whose labels are all -1, to count for nothing, until every rank is done."""
        for batch, real in filled_batches(loader, self.env.device):
            if not real:
                batch = {**batch, "label": torch.full_like(batch["label"], -1)}
            yield self.data.eval_batch(batch, self.env.device)

    def summed_over_ranks(self, sums: torch.Tensor) -> torch.Tensor:
        """Per-rank sums of an evaluation pass → the whole set's (ranks of one cp×tp group scored the same samples)."""
        return all_reduce(sums, op="sum") / (self.dims.cp * self.dims.tp)

    def skip_counts(self, source) -> dict:
        """{"skipped_<kind>": bad shards/samples skipped so far, summed over data-parallel ranks} of shard data."""
        skipped = getattr(source, "skipped", None)
        if skipped is None:
            return {}
        counts = torch.tensor(list(skipped.values()), device=self.env.device, dtype=torch.float64)
        # Ranks of one cp×tp group read the same data.
        counts = all_reduce(counts, op="sum") / (self.dims.cp * self.dims.tp)
        return {f"skipped_{kind}": round(n) for kind, n in zip(skipped, counts.tolist(), strict=True)}

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoint_meta(self) -> dict:
        return {
            "model": self.model_cfg.to_dict(),
            "world_size": self.env.world_size,
            "parallel": OmegaConf.to_container(self.cfg.parallel, resolve=True),
            "ema": self.ema.decay if self.ema is not None else 0.0,  # EMA weights in the checkpoint (--ema)
            # The captions' tokenizer (JSON) travels with the weights it was trained with (bigvit-export).
            **({"tokenizer": self.data.tokenizer.to_json()} if self.data.tokenizer is not None else {}),
        }

    def save(self) -> None:
        start = time.perf_counter()
        path = self.checkpointer.save(
            self.step, self.engine, {"rng": rng_state()}, self.checkpoint_meta(), self.data.train.state_dict()
        )
        stall = time.perf_counter() - start  # what training waited for (asynchronous: the staging)
        writing = " (writing in the background)" if self.checkpointer.pending else ""
        log.info("checkpoint step %d → %s | stall %.2f s%s", self.step, path, stall, writing)
        self.logger.log({"checkpoint/stall_s": stall}, self.step)

    def resume(self) -> None:
        """Continue from trainer.resume (auto: the newest checkpoint in the run dir); with none, start from
        trainer.branch_from if set (a WSD cooldown branching off a longer run), else from scratch."""
        setting, branch_from = str(self.cfg.trainer.resume), self.cfg.trainer.get("branch_from")
        path = (
            self.checkpointer.latest() if setting == "auto" else None if setting == "never" else Path(setting)
        )
        if path is None and branch_from:
            path = Path(branch_from)
            log.info("branching from %s (trainer.branch_from)", path)
        if path is None:
            self.start_from_weights()
            return
        if not path.exists():  # a mistyped path: name the key (a damaged checkpoint names its file)
            key = "trainer.resume" if setting not in ("auto", "never") else "trainer.branch_from"
            raise ConfigError(
                f"{key}={path}: no such checkpoint; give a checkpoint directory (<run_dir>/checkpoints/step_N)"
                + (", or trainer.resume=auto | never" if key == "trainer.resume" else "")
            )
        expect = {"model": self.model_cfg.to_dict()}
        self.step, rank_state, data_state = self.checkpointer.load(path, self.engine, expect=expect)
        if data_state is not None:
            self.data.train.load_state_dict(data_state)
        if rank_state is not None:
            set_rng_state(rank_state["rng"])
        else:
            log.warning("checkpoint %s came from another world size: the RNG streams start afresh", path)
        log.info("resumed from %s at step %d", path, self.step)

    def start_from_weights(self) -> None:
        """A fresh run starts from trainer.init_weights where set (a resumed run continues from its checkpoint)."""
        path = self.cfg.trainer.get("init_weights")
        if path:
            load_initial_weights(self.engine.model, path, self.model_cfg, self.cfg.trainer.get("init_fresh") or ())
            if self.ema is not None:  # the average starts at the loaded weights, not the random init
                self.ema.restart()

    def summary(self, metrics: dict, eval_metrics: dict, wall_seconds: float, first_step: int) -> dict:
        examples, flops_per_image = self.seen()
        summary = {
            "final_step": self.step,
            "first_step": first_step,
            "train_loss": metrics.get("loss"),
            "eval_top1": eval_metrics.get("eval_top1"),
            "eval_loss": eval_metrics.get("eval_loss"),
            "eval": eval_metrics,  # every evaluator's metrics, for results files and sweeps
            "global_batch": self.cfg.data.batch_size,
            "examples_seen": examples,
            "flops_per_image": flops_per_image,  # the mean over a resolution schedule
            "resolution": self.resolution.stage_at(max(self.step - 1, 0)).image_size,
            "images_per_sec": metrics.get("images_per_sec"),
            "mfu": metrics.get("mfu"),
            "world_size": self.env.world_size,
            "wall_seconds": wall_seconds,
            "params": self.num_params,
            "peak_memory_bytes": peak_memory_bytes(self.env.device),
            "tensor_bytes": live_tensor_bytes(self.env.device),
            "model": self.model_cfg.name,
            "strategy": self.cfg.parallel.strategy,
            **self.objective.figures(self.resolution.stage_at(max(self.step - 1, 0)).image_size),
        }
        if self.env.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary
