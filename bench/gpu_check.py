"""GPU readiness in one prepared run, for the day a GPU is at hand (issue 14, item 6).

Sections (each in its own try/except: a failure is recorded as its `error` and the next one runs):
  attention  flash-attn vs SDPA (default dispatch and each backend) vs the math reference, bf16, at
             197 / 577 / 1025 tokens: max error against an fp32 reference, forward and forward+backward ms
  fsdp_step  a bf16 FSDP2 training step of ViT-B/16 and ViT-L/16 through bigvit's own engine (one process,
             a world-size-1 process group): step time, images/s, MFU against the datasheet peak
             (bigvit.scaling.hardware), and peak memory against the planner's prediction (scaling/memory.py)
  timm       timm's VisionTransformer of the same architecture, sharded by the same FSDP2 recipe on the
             same GPU: images/s and MFU, and bigvit's speed as a ratio of timm's
  compile    torch.compile of each block (the parallel.compile=true recipe) on ViT-B/16: compile time, step
             time against eager, graph breaks
The whole run stays within --budget-s (default 450 s: under 8 minutes); a section that would start
after it is recorded as skipped. One JSON: bench/results/gpu_check.json (bench/common.py's report()).

    python bench/gpu_check.py                  # on a CUDA machine
    python bench/gpu_check.py --cpu-smoke      # every section with tiny shapes on CPU (what CI runs)

Without CUDA and without --cpu-smoke it prints one line and exits 0, writing nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import socket
import statistics
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import common
import torch
import torch.nn.functional as F

from tests.helpers import TINY

try:
    import bigvit  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(common.ROOT / "src"))

from bigvit.models.attention import attention, math_attention, resolve_impl
from bigvit.models.registry import build_model
from bigvit.parallel.distributed import teardown
from bigvit.parallel.mesh import ParallelDims, build_mesh, dp_mesh
from bigvit.parallel.parallelize import apply_compile, apply_fsdp
from bigvit.scaling.assumptions import Assumptions
from bigvit.scaling.flops import train_flops
from bigvit.scaling.layouts import Layout
from bigvit.scaling.memory import memory_breakdown
from bigvit.train.engine import build_engine
from bigvit.train.metrics import peak_flops
from bigvit.train.trainer import build_optimizer

GIB = 2**30
BF16_ATOL = 2e-2  # bf16 keeps 8 bits of mantissa: outputs of size ~1 agree to about 4e-3; a margin on top

# (name, global batch, overrides): the GPU cases and their tiny CPU stand-ins (same code path).
GPU_MODELS = [("vit_b16", 128, ["model=vit_b16"]), ("vit_l16", 64, ["model=vit_l16"])]
SMOKE_MODELS = [("vit_tiny", 4, [o for o in TINY if o.startswith(("model", "data"))])]  # tests/helpers.py's


def model_cases(args, budget: Budget, results: dict):
    """(name, batch, overrides, result dict) of each model case with time left; the others are marked."""
    for name, batch, overrides in SMOKE_MODELS if args.cpu_smoke else GPU_MODELS:
        if budget.left() < 30:
            results[name] = {"skipped": "time budget spent"}
            continue
        results[name] = {"batch": batch}
        yield name, batch, overrides, results[name]
GPU_ATTENTION = dict(batch=32, heads=12, head_dim=64, tokens=(197, 577, 1025))  # ViT-B/16's heads
SMOKE_ATTENTION = dict(batch=1, heads=2, head_dim=16, tokens=(197, 577, 1025))


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, reps: int, warmup: int) -> float:
    """Median seconds of `fn()` over `reps` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def error_text(error: BaseException) -> str:
    tail = traceback.format_exception(type(error), error, error.__traceback__)[-3:]
    return f"{type(error).__name__}: {error}"[:2000] + " | " + " ".join(line.strip() for line in tail)[-1000:]


# -- attention -----------------------------------------------------------------------------------


def sdpa_backends(device: torch.device) -> dict:
    """SDPA under each single backend (CUDA only), as context-manager factories."""
    if device.type != "cuda":
        return {}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {
        "sdpa_flash": "FLASH_ATTENTION",
        "sdpa_efficient": "EFFICIENT_ATTENTION",
        "sdpa_cudnn": "CUDNN_ATTENTION",
    }
    return {
        n: (lambda b=b: sdpa_kernel([getattr(SDPBackend, b)]))
        for n, b in names.items()
        if hasattr(SDPBackend, b)
    }


def attention_case(tokens: int, shape: dict, device: torch.device, reps: int) -> list[dict]:
    generator = torch.Generator(device=device).manual_seed(tokens)
    size = (shape["batch"], tokens, shape["heads"], shape["head_dim"])
    q, k, v = (torch.randn(size, device=device, generator=generator, dtype=torch.bfloat16) for _ in range(3))
    reference = math_attention(*(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    grad = torch.randn_like(q)
    variants = {"flash_attn": ("flash_attn", None), "sdpa": ("sdpa", None), "math": ("math", None)}
    variants.update({name: ("sdpa", context) for name, context in sdpa_backends(device).items()})
    results = []
    for name, (impl, context) in variants.items():
        result = {"tokens": tokens, "impl": name}
        try:
            with context() if context else contextlib.nullcontext():
                result.update(attention_variant((q, k, v), grad, impl, reference, device, reps))
        except Exception as failure:
            result["error"] = f"{type(failure).__name__}: {failure}".splitlines()[0][:500]
        results.append(result)
    return results


def attention_variant(qkv, grad, impl: str, reference, device: torch.device, reps: int) -> dict:
    """Error against the fp32 reference and the forward / forward+backward time of one kernel."""
    if impl == "flash_attn":
        resolve_impl("flash_attn", qkv[0])  # a ConfigError naming what is missing (package, CUDA, dtype)
    error = (attention(*qkv, impl).float() - reference).abs().max().item()
    leaves = [t.detach().requires_grad_() for t in qkv]

    def forward():
        with torch.no_grad():
            attention(*qkv, impl)

    def forward_backward():
        attention(*leaves, impl).backward(grad)

    return {
        "max_abs_err": error,
        "rel_err": error / reference.abs().max().item(),
        "close": error <= BF16_ATOL,
        "forward_ms": 1e3 * timed(forward, device, reps, warmup=2),
        "forward_backward_ms": 1e3 * timed(forward_backward, device, reps, warmup=2),
    }


def check_attention(args, device, rows: list[dict]) -> dict:
    shape = SMOKE_ATTENTION if args.cpu_smoke else GPU_ATTENTION
    cases = []
    for tokens in shape["tokens"]:
        for result in attention_case(tokens, shape, device, reps=2 if args.cpu_smoke else 10):
            cases.append(result)
            value = result.get("forward_backward_ms")
            rows.append(
                row(
                    "attention",
                    f"{result['impl']} N={tokens}",
                    value,
                    "ms fwd+bwd",
                    result.get("error") or f"max err {result.get('max_abs_err', float('nan')):.2e}",
                )
            )
    mismatched = [c for c in cases if c.get("close") is False]
    return {
        "shape": {k: v for k, v in shape.items() if k != "tokens"},
        "cases": cases,
        "all_close": not mismatched,
        "tolerance_abs": BF16_ATOL,
    }


# -- FSDP2 training steps ------------------------------------------------------------------------


def compose_case(overrides: list[str], batch: int):
    """The bigvit-train config of one case: FSDP2, bf16 parameters, fp32 reduction, AdamW, 1000 classes."""
    from bigvit.overrides import compose
    from bigvit.train.cli import CONF_DIR

    common_overrides = [
        "data=synthetic",
        "data.num_classes=1000",
        f"data.batch_size={batch}",
        "parallel=fsdp",
        "trainer.precision=bf16",
        "logger=none",
        "optim=adamw",
    ]
    return compose(CONF_DIR, "train", [*common_overrides, *overrides], "gpu_check")


def bigvit_engine(cfg, mesh, device, compile_backend: str | None = None):
    """bigvit's TorchEngine for `cfg` (FSDP2 on `mesh`); with compile_backend, each block is compiled first,
    the order parallelize() uses for parallel.compile=true, with the backend chosen here."""
    from omegaconf import OmegaConf

    model = build_model(OmegaConf.to_container(cfg.model, resolve=True), device="meta")
    if compile_backend:
        apply_compile(model, backend=compile_backend)
    dims = ParallelDims(1, 1, 1, 1)
    return build_engine(model, mesh, dims, cfg, device, lambda m: build_optimizer(m, cfg.optim))


def engine_step(engine, images, labels):
    def step():
        engine.zero_grad()
        loss = F.cross_entropy(engine.forward(images).float(), labels)
        engine.backward(loss)
        engine.step()

    return step


def predicted_memory(model_cfg, batch: int, reduce_dtype: str) -> dict:
    layout = Layout("fsdp", "fsdp", ParallelDims(1, 1, 1, 1))
    memory = memory_breakdown(model_cfg, layout, batch, 1, Assumptions(), "adamw", "bf16", reduce_dtype)
    tensors = sum(
        memory[k]
        for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "buffers_bytes")
    )
    return {
        "tensor_bytes": tensors,
        "with_overhead_bytes": tensors + memory["overhead_bytes"],
        "total_bytes": memory["total_bytes"],
        "breakdown": memory,
    }


def measured_memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"note": "CPU: no allocator peak to compare (peak RSS counts the whole process)"}
    return {
        "max_allocated_bytes": torch.cuda.max_memory_allocated(device),
        "max_reserved_bytes": torch.cuda.max_memory_reserved(device),
    }


def batch_of(cfg, batch: int, device: torch.device):
    size = cfg.data.image_size
    images = torch.randn(batch, 3, size, size, device=device)
    return images, torch.randint(0, cfg.data.num_classes, (batch,), device=device)


def check_fsdp(args, device, mesh, peak: float, rows: list[dict], budget: Budget) -> dict:
    results = {}
    for name, batch, overrides, result in model_cases(args, budget, results):
        try:
            free_memory(device)
            cfg = compose_case(overrides, batch)
            engine = bigvit_engine(cfg, mesh, device)
            model_cfg = engine.model.cfg
            images, labels = batch_of(cfg, batch, device)
            probe = torch.zeros(
                1, 1, model_cfg.heads, model_cfg.head_dim, device=device, dtype=torch.bfloat16
            )
            result["attn_impl"] = resolve_impl(model_cfg.attn_impl, probe)
            step_s = timed(
                engine_step(engine, images, labels), device, *((2, 1) if args.cpu_smoke else (10, 3))
            )
            flops = train_flops(model_cfg, cfg.data.image_size, batch=batch)
            result.update(
                params=sum(p.numel() for p in engine.model.parameters()),
                step_s=step_s,
                images_per_s=batch / step_s,
                model_tflops_per_s=flops / step_s / 1e12,
                mfu=flops / step_s / peak,
                memory={
                    "measured": measured_memory(device),
                    "planner": predicted_memory(model_cfg, batch, cfg.parallel.reduce_dtype),
                },
            )
            measured = result["memory"]["measured"].get("max_allocated_bytes")
            if measured:
                result["memory"]["measured_over_predicted"] = (
                    measured / result["memory"]["planner"]["tensor_bytes"]
                )
            rows.append(
                row(
                    "fsdp_step",
                    f"{name} b{batch}",
                    result["mfu"],
                    "MFU",
                    f"{result['images_per_s']:.1f} img/s",
                )
            )
            if measured:
                rows.append(
                    row(
                        "memory",
                        name,
                        measured / GIB,
                        "GiB peak allocated",
                        f"planner {result['memory']['planner']['tensor_bytes'] / GIB:.2f} GiB tensors",
                    )
                )
            del engine
        except Exception as error:
            result["error"] = error_text(error)
            rows.append(row("fsdp_step", name, None, "MFU", result["error"][:120]))
    return results


# -- timm on the same GPU ------------------------------------------------------------------------


def timm_model(timm, model_cfg, device):
    """timm's VisionTransformer with bigvit's architecture (class token, token pooling, 1000 classes)."""
    from timm.models.vision_transformer import VisionTransformer

    kwargs = dict(
        img_size=model_cfg.image_size,
        patch_size=model_cfg.patch_size,
        embed_dim=model_cfg.width,
        depth=model_cfg.depth,
        num_heads=model_cfg.heads,
        mlp_ratio=model_cfg.mlp_dim / model_cfg.width,
        num_classes=model_cfg.num_classes,
    )
    try:
        return VisionTransformer(**kwargs, device=device)
    except TypeError:  # a timm without device=
        return VisionTransformer(**kwargs).to(device)


def timm_case(timm, cfg, mesh, device: torch.device, peak: float, smoke: bool) -> dict:
    """One timm training step measured like bigvit's: FSDP2 by bigvit's recipe, AdamW, bf16."""
    from omegaconf import OmegaConf

    from bigvit.models.registry import model_config

    model_cfg = model_config(OmegaConf.to_container(cfg.model, resolve=True))
    model = timm_model(timm, model_cfg, device)
    apply_fsdp(model, dp_mesh(mesh, ParallelDims(1, 1, 1, 1)), cfg.parallel, "bf16")  # bigvit's recipe
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    batch = cfg.data.batch_size
    images, labels = batch_of(cfg, batch, device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images).float(), labels).backward()
        optimizer.step()

    step_s = timed(step, device, *((2, 1) if smoke else (10, 3)))
    flops = train_flops(model_cfg, cfg.data.image_size, batch=batch)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "step_s": step_s,
        "images_per_s": batch / step_s,
        "mfu": flops / step_s / peak,
        "memory": measured_memory(device),
    }


def check_timm(args, device, mesh, peak: float, fsdp: dict, rows: list[dict], budget: Budget) -> dict:
    from tests.timm_shim import import_timm

    timm = import_timm()
    if timm is None:
        return {"skipped": "timm is not installed (pip install --no-deps timm)"}
    results = {"timm": timm.__version__}
    for name, batch, overrides, result in model_cases(args, budget, results):
        try:
            free_memory(device)
            result.update(timm_case(timm, compose_case(overrides, batch), mesh, device, peak, args.cpu_smoke))
            ours = fsdp.get(name, {}).get("images_per_s")
            if ours:
                result["bigvit_over_timm"] = ours / result["images_per_s"]
            rows.append(
                row(
                    "timm",
                    f"{name} b{batch}",
                    result["mfu"],
                    "MFU",
                    f"bigvit/timm speed {result.get('bigvit_over_timm', float('nan')):.3f}",
                )
            )
        except Exception as error:
            result["error"] = error_text(error)
            rows.append(row("timm", name, None, "MFU", result["error"][:120]))
    return results


# -- torch.compile per block ---------------------------------------------------------------------


def check_compile(args, device, mesh, fsdp: dict, rows: list[dict]) -> dict:
    import torch._dynamo

    name, batch, overrides = (SMOKE_MODELS if args.cpu_smoke else GPU_MODELS)[0]
    # Inductor on a 2-core CPU takes ~40 s for one block: the smoke run checks the path with aot_eager.
    backend = "aot_eager" if args.cpu_smoke else "inductor"
    free_memory(device)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cfg = compose_case(overrides, batch)
    engine = bigvit_engine(cfg, mesh, device, compile_backend=backend)
    images, labels = batch_of(cfg, batch, device)
    step = engine_step(engine, images, labels)
    start = time.perf_counter()
    step()
    sync(device)
    first_s = time.perf_counter() - start
    step_s = timed(step, device, *((2, 1) if args.cpu_smoke else (10, 3)))
    eager = fsdp.get(name, {}).get("step_s")
    breaks = dict(torch._dynamo.utils.counters.get("graph_break", {}))
    result = {
        "model": name,
        "batch": batch,
        "backend": backend,
        "first_step_s": first_s,
        "step_s": step_s,
        "eager_step_s": eager,
        "speedup": eager / step_s if eager else None,
        "graph_breaks": sum(breaks.values()),
        "graph_break_reasons": {str(k)[:200]: v for k, v in breaks.items()},
        "memory": measured_memory(device),
    }
    rows.append(
        row(
            "compile",
            f"{name} {backend}",
            result["speedup"],
            "× eager speed",
            f"first step {first_s:.1f} s, {result['graph_breaks']} graph breaks",
        )
    )
    del engine
    return result


# -- the run -------------------------------------------------------------------------------------


def row(section: str, case: str, value, unit: str, note: str = "") -> dict:
    """A line of the printed table and of the JSON's rows."""
    shown = value if isinstance(value, float) and math.isfinite(value) else ("-" if value is None else value)
    return {"section": section, "case": case, "value": shown, "unit": unit, "note": note}


def init_single_process_group(device: torch.device):
    """A world-size-1 process group on a local TCP store (nccl on CUDA, gloo on CPU) and its 4-D mesh."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    options = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=1,
        timeout=timedelta(seconds=300),
        **options,
    )
    return build_mesh(ParallelDims(1, 1, 1, 1), device.type)


def device_info(device: torch.device, peak: float) -> dict:
    info = {"device": str(device), "peak_tflops": peak / 1e12}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name,
            memory_gib=props.total_memory / GIB,
            cuda=torch.version.cuda,
            capability=f"{props.major}.{props.minor}",
            peak_source="datasheet (bigvit.scaling.hardware)",
        )
    else:
        info["peak_source"] = "measured bf16 matmul (bigvit.train.metrics.peak_flops)"
    try:
        import flash_attn

        info["flash_attn"] = flash_attn.__version__
    except ImportError:
        info["flash_attn"] = None
    return info


def run_section(name: str, fn, sections: dict, budget: Budget, device: torch.device) -> None:
    if budget.left() <= 0:
        sections[name] = {"skipped": "time budget spent"}
        return
    start = time.monotonic()
    try:
        sections[name] = fn()
    except Exception as error:
        sections[name] = {"error": error_text(error)}
    sections[name]["seconds"] = time.monotonic() - start
    free_memory(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu-smoke", action="store_true", help="run every section with tiny shapes on CPU")
    parser.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget (default 450 s)")
    parser.add_argument(
        "--results-dir", type=Path, default=None, help="where the JSON goes (default bench/results)"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print(
            f"gpu_check: skipped, no CUDA device (torch {torch.__version__}); run it on a GPU machine, "
            "or with --cpu-smoke to exercise it on CPU"
        )
        return 0
    started, budget = time.monotonic(), Budget(args.budget_s)
    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    rows: list[dict] = []
    sections: dict = {}
    peak = peak_flops(device, torch.bfloat16)
    mesh = init_single_process_group(device)
    try:
        run_section("attention", lambda: check_attention(args, device, rows), sections, budget, device)
        run_section(
            "fsdp_step", lambda: check_fsdp(args, device, mesh, peak, rows, budget), sections, budget, device
        )
        fsdp = sections.get("fsdp_step", {})
        run_section(
            "timm", lambda: check_timm(args, device, mesh, peak, fsdp, rows, budget), sections, budget, device
        )
        run_section(
            "compile", lambda: check_compile(args, device, mesh, fsdp, rows), sections, budget, device
        )
    finally:
        teardown()
    for name, section in sections.items():
        if "error" in section or "skipped" in section:
            rows.append(
                row(name, "section", None, "", section.get("error", section.get("skipped", ""))[:120])
            )
    if args.results_dir is not None:
        common.RESULTS = args.results_dir
    extra = {
        "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
        "device": device_info(device, peak),
        "sections": sections,
        "wall_s": time.monotonic() - started,
        "budget_s": args.budget_s,
    }
    common.report(
        "gpu_check", "GPU readiness (bench/gpu_check.py)", rows or [row("none", "-", None, "")], extra
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
