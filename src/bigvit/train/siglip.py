"""SigLIP's pairwise sigmoid loss over the global batch (Zhai et al. 2023), without a global similarity matrix.

    L = -1/B Σ_i Σ_j log σ(z_ij · (e^t' x_i·y_j + b)),   z_ij = +1 for a matching pair (i = j), −1 otherwise,

x_i, y_j the L2-normalized image and text embeddings of the B pairs of the global batch. Every pair is an
independent binary decision, so no softmax normalizer couples a row: each rank scores its b images
against every rank's texts one rank's chunk at a time (b × b logits), with the texts all-gathered *with*
gradient (backward sums each text's gradient from every rank back to its owner). A rank holds the
gathered texts (B × D) and b × b logits per chunk, never a B × B tensor. Its loss is its images' share
times the data-parallel world (its b rows over b, not B), so the mean that data parallelism takes over
ranks — of the loss and of the gradients — is exactly L and ∂L.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F

from bigvit.errors import ConfigError
from bigvit.train.zeroshot import ZeroShotRetrieval


def gathered_with_grad(x: torch.Tensor, group) -> tuple[list[torch.Tensor], int]:
    """(every rank's `x` in rank order, this rank's index): autograd flows back to each owner."""
    if group is None or dist.get_world_size(group) == 1:
        return [x], 0
    with warnings.catch_warnings():  # deprecated in favour of the functional collectives; this one is
        warnings.simplefilter("ignore", FutureWarning)  # synchronous on every backend, gloo included
        return list(dist_nn.all_gather(x, group=group)), dist.get_rank(group)


def sigmoid_pair_loss(
    zimg: torch.Tensor, ztxt: torch.Tensor, temperature: torch.Tensor, bias: torch.Tensor, group=None
) -> torch.Tensor:
    """This rank's share of L (module docstring): its (b, D) images against the texts of every rank in
    `group` (None: one process, the whole batch here). Chunk by chunk: the largest tensor is b × b."""
    texts, own = gathered_with_grad(ztxt, group)
    scale = temperature.float()
    total = zimg.new_zeros((), dtype=torch.float32)
    for index, chunk in enumerate(texts):
        logits = scale * (zimg.float() @ chunk.float().T) + bias.float()
        signs = -torch.ones_like(logits)
        if index == own:
            signs.diagonal().fill_(1.0)
        total = total - F.logsigmoid(signs * logits).sum()
    return total / zimg.shape[0]


class SigLIP:
    """The `siglip` objective: model inputs (images, caption tokens), the pairwise sigmoid loss over the
    data-parallel group's global micro-batch. Logs the temperature e^t' and bias b it last saw."""

    def __init__(self, group):
        self.group = group
        self.evaluator = ZeroShotRetrieval()  # the trainer's evaluation of this objective's model
        self.seen: tuple[torch.Tensor, torch.Tensor] | None = None

    def inputs(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple:
        return images, tokens

    def __call__(self, outputs, tokens: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        zimg, ztxt, temperature, bias = outputs
        self.seen = (temperature.detach(), bias.detach())
        return sigmoid_pair_loss(zimg, ztxt, temperature, bias, self.group)

    def figures(self, image_size: int) -> dict[str, float]:
        if self.seen is None:
            return {}
        temperature, bias = self.seen
        return {"siglip_temperature": temperature.item(), "siglip_bias": bias.item()}


def check_vocabulary(tokenizer, text) -> None:
    """ConfigError unless the text tower (model.text) embeds every id and position the tokenizer produces."""
    if tokenizer.vocab_size > text.vocab_size or tokenizer.context_length > text.context_length:
        raise ConfigError(
            f"the captions' {tokenizer.kind} tokenizer has {tokenizer.vocab_size} tokens of up to "
            f"{tokenizer.context_length} per caption (data.context_length); model.text.vocab_size="
            f"{text.vocab_size} and model.text.context_length={text.context_length} must be at least that"
        )


def data_parallel_group(mesh, dims):
    """The process group of ranks that read different pairs (tp ranks share theirs), None for one process."""
    if mesh is None or dims.dp == 1:
        return None
    if dims.dp_replicate > 1 and dims.dp_shard > 1:
        return mesh["dp_replicate", "dp_shard"]._flatten("dp_pairs").get_group()
    return mesh["dp_replicate" if dims.dp_replicate > 1 else "dp_shard"].get_group()


def build_siglip(cfg, mesh, dims, device: torch.device) -> SigLIP:
    if cfg.model.get("text") is None:
        raise ConfigError(
            "objective=siglip needs an image–text model with a text tower (model.text); use e.g. "
            "model=siglip_b16, or experiment=siglip_digits"
        )
    if cfg.get("distill") is not None and cfg.distill.name != "none":
        raise ConfigError(f"distill.name={cfg.distill.name!r} distils class logits; use distill=none with objective=siglip")
    return SigLIP(data_parallel_group(mesh, dims))
