"""Knowledge distillation: a frozen teacher's soft targets mixed into another objective.

    loss = alpha · T² · KL(softmax(teacher / T) ‖ softmax(student / T)) + (1 − alpha) · base

(Hinton et al. 2015; T² keeps the soft term's gradients on the scale of the hard one's as T grows.) The
teacher is a bigvit ViT built on the meta device with the student's layout (parallel.parallelize_frozen:
FSDP2-sharded, tensor/context parallel like the student, replicated under DDP), loaded from a weights file
or run dir (train/init_weights.py), in eval mode and run without gradients on every micro-batch.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from bigvit.errors import ConfigError
from bigvit.models.registry import build_model, model_config
from bigvit.parallel.materialize import materialize
from bigvit.parallel.parallelize import autocast_context, parallelize_frozen
from bigvit.scaling.flops import forward_flops
from bigvit.train.init_weights import load_initial_weights, stored_model_config
from bigvit.train.objectives import Objective

log = logging.getLogger("bigvit")


class Teacher:
    """A frozen model: `teacher(images)` → float32 logits, computed in eval mode without autograd."""

    def __init__(self, model: nn.Module, autocast):
        self.model, self.autocast = model.eval(), autocast
        self.cfg = model.cfg

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.model(images).float()


def soft_target_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher / T) ‖ softmax(student / T)), averaged over the batch; gradients flow to `student`."""
    t = temperature
    kl = F.kl_div(
        F.log_softmax(student.float() / t, dim=-1),
        F.log_softmax(teacher.float() / t, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    return kl * t * t


class SoftDistillation:
    """alpha · soft_target_loss(student, teacher(images), T) + (1 − alpha) · base(logits, labels, images)."""

    def __init__(self, base: Objective, teacher: Teacher, temperature: float, alpha: float):
        self.base, self.teacher, self.temperature, self.alpha = base, teacher, temperature, alpha

    def inputs(self, images: torch.Tensor, targets: torch.Tensor) -> tuple:
        return self.base.inputs(images, targets)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        soft = soft_target_loss(logits, self.teacher(images), self.temperature)
        return self.alpha * soft + (1.0 - self.alpha) * self.base(logits, labels, images)

    def figures(self, image_size: int) -> dict[str, float]:
        return {
            **self.base.figures(image_size),
            "teacher_flops_per_image": forward_flops(self.teacher.cfg, image_size),
        }


def teacher_config(tcfg, image_size: int):
    """The teacher's ViTConfig: `distill.teacher.model` (a zoo name) or the config stored with its weights,
    with `distill.teacher.overrides`, at the student's resolution (positions resampled once, at load)."""
    overrides = tcfg.get("overrides")
    overrides = OmegaConf.to_container(overrides, resolve=True) if overrides is not None else {}
    base = tcfg.get("model") or stored_model_config(tcfg.weights, "distill.teacher.weights")
    if base is None:
        raise ConfigError(
            f"distill.teacher.weights={tcfg.weights} stores no model config: name the architecture with "
            "distill.teacher.model=NAME (a conf/model/*.yaml) and distill.teacher.overrides"
        )
    return model_config(base, **{"image_size": image_size, **overrides})


def build_teacher(cfg, mesh, dims, device: torch.device) -> Teacher:
    """The frozen teacher of `cfg.distill.teacher`, laid out as the student (`cfg.parallel`) on every rank."""
    tcfg, precision = cfg.distill.teacher, cfg.trainer.precision
    model_cfg = teacher_config(tcfg, cfg.data.image_size)
    if model_cfg.num_classes != cfg.model.num_classes:
        raise ConfigError(
            f"the teacher has {model_cfg.num_classes} classes, the student model.num_classes="
            f"{cfg.model.num_classes}: soft targets need the same label set (distill.teacher.overrides)"
        )
    model = parallelize_frozen(build_model(model_cfg, device="meta"), mesh, dims, cfg.parallel, precision)
    materialize(model, device, cfg.trainer.seed)
    load_initial_weights(model, tcfg.weights, model_cfg, what="distill.teacher.weights", new_head=False)
    return Teacher(model, autocast_context(cfg.parallel.strategy, precision, device))


def build_distillation(base: Objective, cfg, mesh, dims, device: torch.device) -> SoftDistillation:
    """`base` wrapped in cfg.distill's soft-target distillation (keys checked by bigvit.config.check_distill)."""
    dcfg = cfg.distill
    teacher = build_teacher(cfg, mesh, dims, device)
    objective = SoftDistillation(base, teacher, float(dcfg.temperature), float(dcfg.alpha))
    log.info(
        "distillation from teacher %s (%.2f GFLOP/image forward, not in MFU) | T=%g alpha=%g",
        teacher.cfg.name,
        objective.figures(cfg.data.image_size)["teacher_flops_per_image"] / 1e9,
        objective.temperature,
        objective.alpha,
    )
    return objective
