"""Weight import (timm, big_vision, bigvit) through bigvit-convert and build_model(weights=), and ONNX export:
converted weights give the source model's logits; mismatches are named."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bigvit
from bigvit.errors import CheckpointError
from bigvit.models.convert import (
    export_safetensors,
    from_big_vision,
    import_safetensors,
    safetensors_metadata,
)
from bigvit.train import convert_cli
from tests.timm_shim import import_timm

timm = import_timm()
needs_timm = pytest.mark.skipif(timm is None, reason="timm (dev extra, installed by `make venv`) is missing")

SMALL_TIMM = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=10)
SMALL_BIGVIT = ["image_size=32", "patch_size=8", "width=64", "depth=2", "heads=4", "mlp_dim=128", "num_classes=10"]


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (zero-initialized heads, biases and tokens would hide layout errors)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.eval()


def convert_and_load(tmp_path, source, src, overrides, model="vit_ti16"):
    dst = tmp_path / "converted.safetensors"
    convert_cli.main(["--from", source, "--model", model, *overrides, str(src), str(dst)])
    values = convert_cli.parse_overrides(overrides)
    return bigvit.build_model(model, weights=dst, **values).eval(), dst


@needs_timm
def test_timm_vit_s16_converts_to_identical_logits(tmp_path, capsys):
    reference = randomized(timm.create_model("vit_small_patch16_224", pretrained=False))
    torch.save({"model": reference.state_dict()}, tmp_path / "vit_s16.pth")
    ours, dst = convert_and_load(tmp_path, "timm", tmp_path / "vit_s16.pth", [], model="vit_s16")
    assert "converted" in capsys.readouterr().out
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(images), reference(images), rtol=0, atol=1e-5)
    meta = safetensors_metadata(dst)
    assert json.loads(meta["model"])["width"] == 384 and meta["source"].startswith("timm:")
    assert all(t.dtype == torch.float32 for t in import_safetensors(dst).values())


TIMM_VARIANTS = {
    "map": (dict(global_pool="map", class_token=False), ["pool=map", "class_token=false"]),
    "registers_qk_norm_layer_scale": (
        dict(reg_tokens=4, qk_norm=True, init_values=1e-5),
        ["num_registers=4", "qk_norm=true", "layer_scale=1e-5"],
    ),
    "registers_no_embed_class": (dict(reg_tokens=2, no_embed_class=True), ["num_registers=2"]),
    "gap_fc_norm": (
        dict(global_pool="avg", fc_norm=True, class_token=False),
        ["pool=gap", "class_token=false", "fc_norm=true"],
    ),
}


@needs_timm
@pytest.mark.parametrize("variant", TIMM_VARIANTS.values(), ids=TIMM_VARIANTS.keys())
def test_timm_variants_convert_to_identical_logits(tmp_path, variant):
    timm_kwargs, overrides = variant
    reference = randomized(timm.models.vision_transformer.VisionTransformer(**SMALL_TIMM, **timm_kwargs))
    torch.save(reference.state_dict(), tmp_path / "variant.pth")
    ours, _ = convert_and_load(tmp_path, "timm", tmp_path / "variant.pth", SMALL_BIGVIT + overrides)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(images), reference(images), rtol=0, atol=1e-5)


@needs_timm
def test_unsupported_timm_parts_and_mismatches_are_named(tmp_path, capsys):
    pre_norm = timm.models.vision_transformer.VisionTransformer(**SMALL_TIMM, pre_norm=True)
    torch.save(pre_norm.state_dict(), tmp_path / "pre_norm.pth")
    with pytest.raises(SystemExit, match=r"bigvit: error: .*norm before the blocks"):
        convert_cli.main(["--from", "timm", "--model", "vit_ti16", *SMALL_BIGVIT, str(tmp_path / "pre_norm.pth"),
                          str(tmp_path / "out.safetensors")])
    plain = timm.models.vision_transformer.VisionTransformer(**SMALL_TIMM)
    torch.save(plain.state_dict(), tmp_path / "plain.pth")
    with pytest.raises(SystemExit) as error:  # one block fewer and a wider MLP than the checkpoint's
        convert_cli.main(["--from", "timm", "--model", "vit_ti16", *SMALL_BIGVIT, "depth=1", "mlp_dim=64",
                          str(tmp_path / "plain.pth"), str(tmp_path / "out.safetensors")])
    message = str(error.value)
    assert message.startswith("bigvit: error: ") and "\n" not in message
    assert "unexpected: blocks.1.attn.proj.bias" in message
    assert "blocks.0.mlp.fc1.weight (128, 64) (model: (64, 64))" in message
    assert not (tmp_path / "out.safetensors").exists()


# -- big_vision --------------------------------------------------------------------------------

BV = dict(width=32, heads=4, mlp=48, depth=2, patch=4, grid=4, classes=5, chans=3)


def big_vision_params(pool: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Random big_vision ViT params, flattened as big_vision's npz writer does ('/'-joined, per block)."""
    rng = np.random.default_rng(seed)
    w, h, m, p = BV["width"], BV["heads"], BV["mlp"], BV["patch"]

    def r(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    def dense(prefix, n_in, n_out):
        return {f"{prefix}/kernel": r(n_in, n_out), f"{prefix}/bias": r(n_out)}

    def norm(prefix):
        return {f"{prefix}/scale": 1 + r(w), f"{prefix}/bias": r(w)}

    def mha(prefix):
        out = {f"{prefix}/{n}/kernel": r(w, h, w // h) for n in ("query", "key", "value")}
        out.update({f"{prefix}/{n}/bias": r(h, w // h) for n in ("query", "key", "value")})
        return {**out, f"{prefix}/out/kernel": r(h, w // h, w), f"{prefix}/out/bias": r(w)}

    params = {"embedding/kernel": r(p, p, BV["chans"], w), "embedding/bias": r(w),
              "pos_embedding": r(1, BV["grid"] ** 2, w), **norm("Transformer/encoder_norm"),
              **dense("head", w, BV["classes"])}
    if pool == "tok":
        params["cls"] = r(1, 1, w)
    for i in range(BV["depth"]):
        b = f"Transformer/encoderblock_{i}"
        params.update({**norm(f"{b}/LayerNorm_0"), **mha(f"{b}/MultiHeadDotProductAttention_0"),
                       **norm(f"{b}/LayerNorm_1"), **dense(f"{b}/MlpBlock_0/Dense_0", w, m),
                       **dense(f"{b}/MlpBlock_0/Dense_1", m, w)})
    if pool == "map":
        params.update({"MAPHead_0/probe": r(1, 1, w), **mha("MAPHead_0/MultiHeadDotProductAttention_0"),
                       **norm("MAPHead_0/LayerNorm_0"), **dense("MAPHead_0/MlpBlock_0/Dense_0", w, m),
                       **dense("MAPHead_0/MlpBlock_0/Dense_1", m, w)})
    return params


def big_vision_forward(params: dict[str, np.ndarray], images: torch.Tensor, pool: str) -> torch.Tensor:
    """big_vision's ViT forward, written from its parameter names (NHWC conv, flax attention, posemb on
    the patches before the class token is prepended). GELU is exact erf here, as bigvit's and timm's ports."""
    t = {k: torch.from_numpy(v) for k, v in params.items()}

    def ln(x, prefix):
        return F.layer_norm(x, (x.shape[-1],), t[f"{prefix}/scale"], t[f"{prefix}/bias"], eps=1e-6)

    def dense(x, prefix):
        return x @ t[f"{prefix}/kernel"] + t[f"{prefix}/bias"]

    def mha(q_in, kv_in, prefix):
        q, k, v = (torch.einsum("bnw,whd->bnhd", x, t[f"{prefix}/{n}/kernel"]) + t[f"{prefix}/{n}/bias"]
                   for x, n in ((q_in, "query"), (kv_in, "key"), (kv_in, "value")))
        weights = torch.einsum("bqhd,bkhd->bhqk", q / math.sqrt(q.shape[-1]), k).softmax(-1)
        out = torch.einsum("bhqk,bkhd->bqhd", weights, v)
        return torch.einsum("bqhd,hdw->bqw", out, t[f"{prefix}/out/kernel"]) + t[f"{prefix}/out/bias"]

    def mlp(x, prefix):
        return dense(F.gelu(dense(x, f"{prefix}/Dense_0")), f"{prefix}/Dense_1")

    x = F.conv2d(images, t["embedding/kernel"].permute(3, 2, 0, 1), t["embedding/bias"], stride=BV["patch"])
    x = x.flatten(2).transpose(1, 2) + t["pos_embedding"]
    if pool == "tok":
        x = torch.cat([t["cls"].expand(x.shape[0], -1, -1), x], dim=1)
    for i in range(BV["depth"]):
        b = f"Transformer/encoderblock_{i}"
        y = ln(x, f"{b}/LayerNorm_0")
        x = x + mha(y, y, f"{b}/MultiHeadDotProductAttention_0")
        x = x + mlp(ln(x, f"{b}/LayerNorm_1"), f"{b}/MlpBlock_0")
    x = ln(x, "Transformer/encoder_norm")
    if pool == "map":
        probe = t["MAPHead_0/probe"].expand(x.shape[0], -1, -1)
        y = mha(probe, x, "MAPHead_0/MultiHeadDotProductAttention_0")
        x = (y + mlp(ln(y, "MAPHead_0/LayerNorm_0"), "MAPHead_0/MlpBlock_0"))[:, 0]
    else:
        x = x[:, 0] if pool == "tok" else x.mean(dim=1)
    return dense(x, "head")


def big_vision_layout(params: dict[str, np.ndarray], scanned: bool, prefixed: bool) -> dict[str, np.ndarray]:
    if scanned:  # nn.scan stacks the blocks: Transformer/encoderblock/... with a leading depth axis
        out = {k: v for k, v in params.items() if not k.startswith("Transformer/encoderblock_")}
        for key in [k for k in params if k.startswith("Transformer/encoderblock_0/")]:
            rest = key.removeprefix("Transformer/encoderblock_0/")
            out[f"Transformer/encoderblock/{rest}"] = np.stack(
                [params[f"Transformer/encoderblock_{i}/{rest}"] for i in range(BV["depth"])]
            )
        params = out
    return {("params/" if prefixed else "") + k: v for k, v in params.items()}


POOLS = {"tok": ["pool=cls"], "gap": ["pool=gap", "class_token=false"], "map": ["pool=map", "class_token=false"]}


@pytest.mark.parametrize("scanned,prefixed", [(False, False), (True, True)], ids=["per_block", "scanned_params"])
@pytest.mark.parametrize("pool", POOLS)
def test_big_vision_npz_gives_reference_logits(tmp_path, pool, scanned, prefixed):
    params = big_vision_params(pool)
    np.savez(tmp_path / "bv.npz", **big_vision_layout(params, scanned, prefixed))
    sizes = [f"width={BV['width']}", f"heads={BV['heads']}", f"mlp_dim={BV['mlp']}", f"depth={BV['depth']}",
             f"patch_size={BV['patch']}", f"image_size={BV['patch'] * BV['grid']}", f"num_classes={BV['classes']}"]
    ours, dst = convert_and_load(tmp_path, "big_vision", tmp_path / "bv.npz", sizes + POOLS[pool])
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(images), big_vision_forward(params, images, pool), rtol=0, atol=1e-5)
    # The written file holds exactly the converted tensors.
    direct = from_big_vision(big_vision_layout(params, scanned, prefixed), ours.cfg)
    written = import_safetensors(dst)
    assert written.keys() == direct.keys() and all(torch.equal(written[k], direct[k]) for k in direct)


# -- build_model(weights=) and ONNX ------------------------------------------------------------


def test_build_model_weights_resamples_positions_and_names_bad_keys(tmp_path):
    source = bigvit.build_model("vit_ti16", depth=1, image_size=32, patch_size=8, num_classes=3)
    state = source.state_dict()
    export_safetensors(state, tmp_path / "w.safetensors")
    bigger = bigvit.build_model("vit_ti16", depth=1, image_size=64, patch_size=8, num_classes=3,
                                weights=tmp_path / "w.safetensors")
    assert bigger.pos_embed.shape == (1, 65, 192)
    assert torch.equal(bigger.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    with pytest.raises(CheckpointError, match=r"missing: blocks\.1\.attn\.proj\.bias.*"):
        bigvit.build_model("vit_ti16", depth=2, image_size=32, patch_size=8, num_classes=3,
                           weights=tmp_path / "w.safetensors")
    assert bigvit.build_model("vit_ti16", device="meta").pos_embed.is_meta


def test_onnx_export_matches_pytorch_logits(tmp_path):
    """A fixed batch here; test_bigvit_run_converts_and_exports_onnx exports a dynamic one through the CLI."""
    ort = pytest.importorskip("onnxruntime")
    from bigvit.train.onnx_export import export_onnx

    model = randomized(bigvit.build_model("vit_ti16", depth=2, width=48, heads=3, mlp_dim=96, image_size=16,
                                          patch_size=4, num_classes=7))
    export_onnx(model, tmp_path / "model.onnx", 2)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    (logits,) = session.run(["logits"], {"images": images.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), model(images), rtol=0, atol=1e-4)


def test_bigvit_run_converts_and_exports_onnx(tmp_path, capsys):
    from bigvit.train import export
    from tests.helpers import TINY, final_params, run_train

    run = tmp_path / "run"
    run_train(run, [*TINY, "data=synthetic", "data.batch_size=4", "trainer.max_steps=2",
                    "trainer.checkpoint_every=2", "trainer.precision=fp32"])
    trained = final_params(run)
    model_cfg = export.load_full_state(export.resolve_checkpoint(run))[1]["model"]
    overrides = [f"{k}={json.dumps(v)}" for k, v in model_cfg.items() if k != "name"]
    ours, dst = convert_and_load(tmp_path, "bigvit", run, overrides)
    written = import_safetensors(dst)
    assert written.keys() == trained.keys() and all(torch.equal(written[k], trained[k]) for k in trained)
    export.main([str(run), str(tmp_path / "run.onnx"), "--format", "onnx", "--batch", "dynamic"])
    assert "wrote the ONNX graph of step 2" in capsys.readouterr().out
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(tmp_path / "run.onnx"), providers=["CPUExecutionProvider"])
    for size in (1, 5):  # a dynamic batch dim
        images = torch.randn(size, 3, 16, 16)
        (logits,) = session.run(["logits"], {"images": images.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(logits), ours(images), rtol=0, atol=1e-4)
