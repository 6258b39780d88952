"""ONNX deployment export of a ViT: the eval-mode graph, images (B, C, S, S) float32 in, logits out."""

from __future__ import annotations

from pathlib import Path

import torch

from bigvit.extras import require


def export_onnx(model: torch.nn.Module, path: str | Path, batch: int | str = 1) -> None:
    """Write `model` (eval mode, fp32, CPU) as ONNX to `path`; `batch` is a fixed batch size or
    "dynamic" (a symbolic batch dim). Input `images`, output `logits`."""
    for module in ("onnx", "onnxscript"):
        require(module, "bigvit-export --format onnx")
    model = model.float().eval()
    cfg = model.cfg
    size = 2 if batch == "dynamic" else int(batch)
    example = torch.zeros(size, cfg.in_chans, cfg.image_size, cfg.image_size)
    dynamic = {"images": {0: torch.export.Dim("batch")}} if batch == "dynamic" else None
    with torch.no_grad():
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=dynamic,
            dynamo=True,
            external_data=False,
        )
