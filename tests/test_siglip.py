"""SigLIP: the distributed pairwise sigmoid loss equals one process's on the same global batch, in loss and
in every gradient (both towers, temperature, bias), under FSDP2 on 2 and 4 real gloo processes, and no
rank ever holds a global-batch × global-batch tensor."""

import contextlib
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import bigvit
from bigvit.models.two_tower import TwoTower
from bigvit.parallel.distributed import teardown
from bigvit.parallel.materialize import materialize
from bigvit.parallel.mesh import build_mesh, resolve_dims
from bigvit.parallel.parallelize import apply_fsdp
from bigvit.train.siglip import data_parallel_group, sigmoid_pair_loss
from tests.helpers import free_port

GLOBAL_BATCH = 12  # no model dimension is 12, so a (12, 12) tensor can only be the global similarity matrix
VOCAB, CONTEXT = 50, 8
TOWERS = dict(
    depth=2, width=32, heads=2, mlp_dim=64, image_size=16, patch_size=4, num_classes=10, class_token=False,
    pool="map",
    text=dict(vocab_size=VOCAB, context_length=CONTEXT, width=24, depth=2, heads=2, mlp_dim=48),
)


class _FsdpCfg:
    reduce_dtype = "fp32"
    cpu_offload = False
    reshard_after_forward = True


class Shapes(TorchDispatchMode):
    """Records the shape of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, tuple | list) else (out,):
            if isinstance(value, torch.Tensor):
                self.shapes.add(tuple(value.shape))
        return out


def pairs_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=generator)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, CONTEXT), generator=generator)
    return images, tokens


def loss_and_grads(model, images, tokens, group) -> tuple[torch.Tensor, dict, set]:
    recorder = Shapes()
    with recorder:
        loss = sigmoid_pair_loss(*model(images, tokens), group)
        loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return loss.detach(), grads, recorder.shapes


@contextlib.contextmanager
def gloo_rank(rank: int, world_size: int, port: int):
    """This spawned process as `rank` of a gloo process group, torn down after."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        yield
    finally:
        teardown()


def assert_grads_match(got: dict, grads: dict) -> None:
    for name, grad in grads.items():
        # fp32: within 1e-5 of the tensor's gradient scale (some reach ~200 at the initial bias of -10).
        scale = max(1.0, grad.abs().max().item())
        torch.testing.assert_close(got[name], grad, rtol=0, atol=1e-5 * scale, msg=name)


def distributed_worker(rank: int, world_size: int, port: int, out: str) -> None:
    with gloo_rank(rank, world_size, port):
        model = bigvit.build_model(TOWERS, device="meta")
        dims = resolve_dims({"dp_shard": -1}, world_size)
        mesh = build_mesh(dims, "cpu")
        apply_fsdp(model, mesh["dp_shard"], cfg=_FsdpCfg(), precision="fp32")
        materialize(model, torch.device("cpu"), seed=7)
        images, tokens = pairs_batch()
        local = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
        loss, grads, shapes = loss_and_grads(model, images[local], tokens[local], data_parallel_group(mesh, dims))
        dist.all_reduce(loss)  # the mean over ranks is the global loss
        full = {name: grad.full_tensor() for name, grad in grads.items()}
        if rank == 0:
            torch.save({"loss": loss / world_size, "grads": full, "shapes": sorted(shapes)}, out)


def tensor_parallel_worker(rank: int, world_size: int, port: int, out: str) -> None:
    """Both towers split over tp=2 ranks with sequence parallel: every rank scores the whole batch."""
    with gloo_rank(rank, world_size, port):
        from bigvit.parallel.tensor import apply_tp

        model = bigvit.build_model(TOWERS, device="meta")
        mesh = build_mesh(resolve_dims({"tp": -1}, world_size), "cpu")
        apply_tp(model, mesh["tp"], sequence_parallel=True)
        materialize(model, torch.device("cpu"), seed=7)
        loss, grads, _ = loss_and_grads(model, *pairs_batch(), None)
        full = {name: grad.full_tensor() for name, grad in grads.items()}
        if rank == 0:
            torch.save({"loss": loss, "grads": full, "text_multiple": model.text.token_multiple}, out)


@pytest.fixture(scope="module")
def single():
    model = materialize(bigvit.build_model(TOWERS, device="meta"), torch.device("cpu"), seed=7)
    return loss_and_grads(model, *pairs_batch(), None)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_distributed_sigmoid_loss_and_gradients_equal_one_process(world_size, single, tmp_path):
    out = str(tmp_path / "result.pt")
    mp.spawn(distributed_worker, args=(world_size, free_port(), out), nprocs=world_size, join=True)
    result = torch.load(out)
    loss, grads, single_shapes = single
    assert abs(result["loss"].item() - loss.item()) <= 1e-6 * max(1.0, abs(loss.item()))
    assert result["grads"].keys() == grads.keys()
    assert_grads_match(result["grads"], grads)
    # Both towers, the temperature and the bias all learn.
    for name in ("image.blocks.0.attn.qkv.weight", "text.blocks.0.attn.qkv.weight", "logit_scale", "logit_bias"):
        assert grads[name].abs().max() > 1e-6, name
    # One process scores the whole batch at once (the check below can fail); a rank never does.
    assert (GLOBAL_BATCH, GLOBAL_BATCH) in single_shapes
    local = GLOBAL_BATCH // world_size
    assert (local, local) in result["shapes"]
    assert not [s for s in result["shapes"] if sum(d == GLOBAL_BATCH for d in s) >= 2]


@pytest.mark.slow
def test_tensor_parallel_towers_equal_one_process(single, tmp_path):
    out = str(tmp_path / "tp.pt")
    mp.spawn(tensor_parallel_worker, args=(2, free_port(), out), nprocs=2, join=True)
    result = torch.load(out)
    loss, grads, _ = single
    assert result["text_multiple"] == 2  # the text tower's tokens are sharded too
    assert abs(result["loss"].item() - loss.item()) <= 1e-6 * max(1.0, abs(loss.item()))
    assert_grads_match(result["grads"], grads)


def test_sigmoid_loss_equals_the_papers_formula():
    generator = torch.Generator().manual_seed(0)
    zimg = F.normalize(torch.randn(5, 7, generator=generator), dim=-1)
    ztxt = F.normalize(torch.randn(5, 7, generator=generator), dim=-1)
    temperature, bias = torch.tensor([0.7]).exp(), torch.tensor([-2.0])
    expected = 0.0
    for i in range(5):
        for j in range(5):
            z = 1.0 if i == j else -1.0
            logit = temperature.item() * float(zimg[i] @ ztxt[j]) + bias.item()
            expected -= float(torch.log(torch.sigmoid(torch.tensor(z * logit, dtype=torch.float64))))
    loss = sigmoid_pair_loss(zimg, ztxt, temperature, bias)
    assert abs(loss.item() - expected / 5) < 1e-6


def test_two_tower_starts_at_the_papers_temperature_and_bias_with_unit_embeddings():
    model = materialize(bigvit.build_model(TOWERS, device="meta"), torch.device("cpu"), seed=0)
    assert isinstance(model, TwoTower)
    assert model.logit_scale.item() == pytest.approx(2.302585)  # log 10
    assert model.logit_bias.item() == -10.0
    zimg, ztxt, temperature, bias = model(*pairs_batch())
    assert temperature.item() == pytest.approx(10.0) and bias.item() == -10.0
    torch.testing.assert_close(zimg.norm(dim=-1), torch.ones(GLOBAL_BATCH))
    torch.testing.assert_close(ztxt.norm(dim=-1), torch.ones(GLOBAL_BATCH))
    # Texts alone (zero-shot prompts): the same embeddings.
    _, alone, _, _ = model(None, pairs_batch()[1])
    torch.testing.assert_close(alone, ztxt)


# -- sizes ------------------------------------------------------------------------------------------


def published_tower(width: int, depth: int, mlp: int, patch: int, image: int) -> int:
    """A SigLIP image tower from its published dimensions: patch conv, positions (no class token),
    pre-LN blocks with biases, final LN, MAP head (probe, q/kv/out projections, LN, MLP), no projection."""
    block = 2 * 2 * width + (3 * width * width + 3 * width) + (width * width + width) + (2 * width * mlp + mlp + width)
    patches = (image // patch) ** 2
    map_head = width + (3 * width * width + 3 * width) + (width * width + width) + 2 * width + (2 * width * mlp + mlp + width)
    return (3 * patch * patch * width + width) + patches * width + depth * block + 2 * width + map_head


def published_text(width: int, depth: int, mlp: int, vocab: int, length: int, embed: int) -> int:
    block = 2 * 2 * width + (3 * width * width + 3 * width) + (width * width + width) + (2 * width * mlp + mlp + width)
    return vocab * width + length * width + depth * block + 2 * width + (width * embed + embed)


@pytest.mark.parametrize(
    "name,image,text",
    [
        # Zhai et al. 2023: B/16 at 224 px, text B over 64 tokens of 32k (203.16M in all).
        ("siglip_b16", dict(width=768, depth=12, mlp=3072, patch=16, image=224), dict(length=64)),
        # Alabdulmohsin et al. 2023: So400m/14 at 224 px, a text tower of the same shape over 16 tokens.
        ("siglip_so400m14", dict(width=1152, depth=27, mlp=4304, patch=14, image=224), dict(length=16)),
    ],
)
def test_siglip_parameter_counts_equal_the_published_dimensions(name, image, text):
    from bigvit.scaling.flops import param_breakdown, param_count

    model = bigvit.build_model(name, device="meta")
    expected_image = published_tower(**image)
    expected_text = published_text(image["width"], image["depth"], image["mlp"], 32000, text["length"], image["width"])
    expected = expected_image + expected_text + 2  # + temperature and bias
    assert bigvit.count_params(model.image) == expected_image
    assert bigvit.count_params(model.text) == expected_text
    assert bigvit.count_params(model) == param_count(model.cfg) == expected
    assert param_breakdown(model.cfg)["text"] == expected_text
    if name == "siglip_b16":
        assert round(expected / 1e4) == 20316  # the released checkpoint's 203.16M


def test_text_tower_flops_are_counted_in_training_flops():
    from bigvit.scaling.flops import forward_flops_breakdown, train_flops

    cfg = bigvit.model_config("siglip_b16")
    parts = forward_flops_breakdown(cfg)
    # 12 blocks over 64 tokens: qkv + out proj + MLP + attention scores/values, 2 FLOPs per multiply-add.
    width, tokens = 768, 64
    block = 2 * tokens * width * 3 * width + 2 * tokens * width * width + 4 * tokens * width * 3072 + 4 * tokens**2 * width
    assert parts["text_blocks"] == 12 * block
    assert parts["text_head"] == 2 * width * width and parts["head"] == 0
    assert train_flops(cfg) == 3 * sum(parts.values())
    assert train_flops(cfg) > train_flops(cfg.tower(num_classes=0))


# -- evaluation -------------------------------------------------------------------------------------


def test_retrieval_recall_counts_a_caption_equal_to_the_querys_own():
    from bigvit.train.zeroshot import class_embeddings, retrieval

    eye = torch.eye(4)
    captions = torch.tensor([[1, 5], [2, 5], [3, 5], [4, 5]])  # four distinct captions
    swapped = retrieval(eye, eye[[0, 1, 3, 2]], captions)  # images 2 and 3 sit nearest each other's caption
    assert swapped["i2t_recall@1"] == swapped["t2i_recall@1"] == 0.5
    assert swapped["i2t_recall@5"] == swapped["t2i_recall@5"] == 1.0
    # Two images share each caption: either copy is right, and the distinct captions are the gallery.
    shared = retrieval(eye[[0, 0, 1, 1]], eye[[0, 0, 1, 1]], torch.tensor([[7], [7], [8], [8]]))
    assert shared["i2t_recall@1"] == shared["t2i_recall@1"] == 1.0 and shared["distinct_captions"] == 2
    # Zero-shot classes: the mean of each class's prompt embeddings, renormalized.
    prompts = F.normalize(torch.tensor([[1.0, 0.2], [1.0, -0.2], [0.1, 1.0], [-0.1, 1.0]]), dim=-1)
    torch.testing.assert_close(class_embeddings(prompts, 2), torch.eye(2))


def test_the_planner_plans_siglip_with_its_text_tower_and_no_context_parallelism():
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "bigvit.scaling.plan_cli", "model=siglip_b16", "cluster.gpus=8", "cluster.gpu=h100"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "n/a fsdp_cp2: an image–text model (model.text) does not run under cp=2" in result.stdout
    assert "recommendation:" in result.stdout and "n/a fsdp_tp2 " not in result.stdout
