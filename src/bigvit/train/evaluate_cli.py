"""`bigvit-eval classify WEIGHTS [OVERRIDES...] [--json FILE]`: top-1 of trained weights on the configured
evaluation split, at the image and patch sizes the overrides ask for, e.g.

    bigvit-eval classify outputs/2025-01-01/12-00-00_vit_digits data.image_size=32,48,64

`bigvit-eval fewshot WEIGHTS [OVERRIDES...]`: few-shot linear probes of the frozen weights' pre-logit
features (train/fewshot.py; fewshot.shots, fewshot.draws, fewshot.ridge), one table of errors per k.

WEIGHTS is a run dir, its checkpoints/ dir, one checkpoint dir, or a .safetensors file (bigvit-export).
The config is the run's config.yaml with the Hydra overrides on top; a .safetensors file has no run, so
conf/train.yaml is composed with the overrides and the model keys come from the file's metadata. As in
train.yaml, the model follows data.image_size unless model.image_size is given. Position and patch
embeddings are adapted to the model built (`adapt_state_dict`); the data, the resize of every image to
data.image_size and the scores are the trainer's own (`build_data`, `BatchPrep`, train/scores.py); digits
shards are read as the run wrote them, not rewritten at the new size (`stored_digits`).
Comma lists sweep as in Hydra's multirun: one table line per point.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf, open_dict

from bigvit.config import check_positive
from bigvit.data import build_data, digits_captions
from bigvit.data.shards import ensure_digits, split_urls
from bigvit.errors import ConfigError
from bigvit.models.convert import import_safetensors, safetensors_metadata
from bigvit.models.registry import build_model, load_fitted
from bigvit.overrides import compose, parse_overrides
from bigvit.parallel.parallelize import autocast_context
from bigvit.scaling.sweep import compose_config
from bigvit.train.cli import USER_ERRORS
from bigvit.train.export import load_full_state, resolve_checkpoint
from bigvit.train.fewshot import check_fewshot, collect_features, errors_for
from bigvit.train.scores import add_scores, empty_scores, score_figures

RUN_CONFIG = "config.yaml"  # what bigvit-train writes into every run dir
HEADER = f"{'image':>5}  {'patch':>5}  {'grid':>5}  {'top-1':>6}  {'loss':>6}  {'images':>6}  {'data':<10}  adapted"


@dataclass
class Weights:
    """Full trained weights and what is known of the run that made them."""

    source: Path  # the checkpoint dir or .safetensors file read
    state: dict[str, torch.Tensor]
    model: dict  # the model config they were trained with
    step: int | None
    run_dir: Path | None  # holds the run's config.yaml
    trained_image_size: int  # data.image_size of that run: the size its digits shards were written at


def load_weights(path: Path) -> Weights:
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"no weights file {path}")
        metadata = safetensors_metadata(path)
        if "model" not in metadata:
            raise ConfigError(f"{path} has no 'model' metadata (the model config bigvit-export writes)")
        model = json.loads(metadata["model"])
        step = int(metadata["step"]) if "step" in metadata else None
        return Weights(path, import_safetensors(path), model, step, None, model["image_size"])
    checkpoint = resolve_checkpoint(path)
    state, meta = load_full_state(checkpoint)
    run_dir = checkpoint.parent.parent  # <run_dir>/checkpoints/step_N
    if not (run_dir / RUN_CONFIG).is_file():
        raise FileNotFoundError(
            f"no {RUN_CONFIG} in {run_dir} beside checkpoint {checkpoint}; give a run dir, or export the "
            "weights (bigvit-export) and evaluate the .safetensors file with data=... overrides"
        )
    trained = OmegaConf.load(run_dir / RUN_CONFIG).data.image_size
    return Weights(checkpoint, state, meta["model"], meta["step"], run_dir, trained)


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """Hydra multirun's expansion: every combination of the comma lists (and range()s) in `overrides`."""
    parsed = parse_overrides(overrides)
    choices = []
    for override in parsed:
        if not override.is_sweep_override():
            choices.append([override.input_line])
        elif override.is_discrete_sweep():
            key = override.get_key_element()
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            raise ConfigError(f"{override.input_line}: only lists and range() sweep here, not intervals")
    return [list(point) for point in itertools.product(*choices)]


def compose_run(run_dir: Path, overrides: list[str]):
    """The run's config.yaml with Hydra `overrides` on top (Hydra's errors as one line)."""
    what = f"{run_dir / RUN_CONFIG} with {overrides}"
    return compose(run_dir.resolve(), Path(RUN_CONFIG).stem, overrides, what)


def point_config(weights: Weights, overrides: list[str]):
    """The composed config of one evaluation: the run's (or train.yaml with the weights' model keys) with
    `overrides` on top; data.image_size, when given, sets model.image_size unless that is given too."""
    keys = {override.key_or_group for override in parse_overrides(overrides)}
    if weights.run_dir is not None:
        cfg = compose_run(weights.run_dir, overrides)
    else:
        cfg = compose_config("train", overrides, f"bigvit-eval {weights.source}")
        for key, value in weights.model.items():
            if f"model.{key}" not in keys:
                cfg.model[key] = value
        if "data.image_size" not in keys:
            cfg.data.image_size = weights.model["image_size"]
    # config.yaml is stored resolved, which drops train.yaml's `model.image_size: ${data.image_size}`.
    if "data.image_size" in keys and "model.image_size" not in keys:
        cfg.model.image_size = cfg.data.image_size
    check_positive("data.batch_size", cfg.data.batch_size)
    return cfg


def stored_digits(data_cfg, trained_image_size: int):
    """digits data read from the shards the run trained on (written again at its size if missing) like any
    stored dataset, as data.kind=webdataset with their URLs: each image is resized to data.image_size on the
    device. As data.kind=digits, another data.image_size would rewrite the shards under data.root."""
    if data_cfg.kind != "digits":
        return data_cfg
    index = ensure_digits(data_cfg.root, trained_image_size, data_cfg.split_seed, digits_captions(data_cfg))
    stored = copy.deepcopy(data_cfg)
    with open_dict(stored):
        stored.kind = "webdataset"
        stored.train_urls = split_urls(data_cfg.root, index, "train")
        stored.eval_urls = split_urls(data_cfg.root, index, "test")
    return stored


def fitted_model(
    weights: Weights, model_cfg: dict, device: torch.device
) -> tuple[torch.nn.Module, list[str]]:
    """The ViT of `model_cfg` holding `weights`, adapted to its grid and patch size; and what was adapted."""
    model = build_model(model_cfg, device="meta")
    notes = load_fitted(model, weights.state, f"the weights of {weights.source}")
    return model.to(device).eval(), notes


@torch.no_grad()
def classify(weights: Weights, overrides: list[str], device: torch.device) -> dict:
    """One evaluation pass of `weights` under the config `overrides` make: sizes, figures, adaptations."""
    cfg = point_config(weights, overrides)
    model, notes = fitted_model(weights, OmegaConf.to_container(cfg.model, resolve=True), device)
    data_cfg = stored_digits(cfg.data, weights.trained_image_size)
    data = build_data(data_cfg, rank=0, world_size=1, local_batch=cfg.data.batch_size, seed=cfg.trainer.seed)
    if data.make_eval is None:
        raise ConfigError(f"data.kind={cfg.data.kind!r} has no evaluation split here: set data.eval_urls")
    autocast = autocast_context("single", cfg.trainer.precision, device)  # as the trainer's forward casts
    scores = empty_scores(device)
    for batch in data.make_eval():
        images, labels = data.eval_batch(batch, device)
        with autocast():
            logits = model(images)
        add_scores(scores, logits.float(), labels)
    mcfg = model.cfg
    return {
        "overrides": overrides,
        "data": cfg.data.kind,
        "image_size": cfg.data.image_size,
        "model_image_size": mcfg.image_size,
        "patch_size": mcfg.patch_size,
        "grid": mcfg.image_size // mcfg.patch_size,
        **score_figures(scores),
        "adapted": notes,
    }


@torch.no_grad()
def fewshot(weights: Weights, overrides: list[str], device: torch.device) -> dict:
    """Few-shot errors of `weights` under the config `overrides` make: support pool from the training
    split, query set the evaluation split, both with evaluation preprocessing."""
    cfg = point_config(weights, overrides)
    settings = check_fewshot(cfg.get("fewshot"))
    model, notes = fitted_model(weights, OmegaConf.to_container(cfg.model, resolve=True), device)
    data_cfg = stored_digits(cfg.data, weights.trained_image_size)
    data = build_data(data_cfg, rank=0, world_size=1, local_batch=cfg.data.batch_size, seed=cfg.trainer.seed)
    if data.make_eval is None or data.make_support is None:
        raise ConfigError(f"data.kind={cfg.data.kind!r} has no training and evaluation split to probe here")
    autocast = autocast_context("single", cfg.trainer.precision, device)
    model.features_only = True

    def forward(images: torch.Tensor) -> torch.Tensor:
        with autocast():
            return model(images)

    support = collect_features(data.make_support(), data.eval_batch, forward, device)
    query = collect_features(data.make_eval(), data.eval_batch, forward, device)
    errors = errors_for(settings, support, query, model.cfg.num_classes)
    return {
        "overrides": overrides,
        "data": cfg.data.kind,
        "image_size": cfg.data.image_size,
        "support_samples": len(support[1]),
        "query_samples": len(query[1]),
        "draws": settings["draws"],
        "ridge": settings["ridge"],
        "errors": {str(k): e for k, e in errors.items()},
        "adapted": notes,
    }


def fewshot_table(row: dict) -> str:
    head = (
        f"{' '.join(row['overrides']) or 'as trained'}: {row['support_samples']} support, {row['query_samples']} "
        f"query samples, {row['draws']} draws, ridge {row['ridge']:g}\n{'shots':>5}  {'error':>6}"
    )
    return head + "".join(f"\n{k:>5}  {e:>6.4f}" for k, e in row["errors"].items())


def table_line(row: dict) -> str:
    grid = f"{row['grid']}x{row['grid']}"
    return (
        f"{row['image_size']:>5}  {row['patch_size']:>5}  {grid:>5}  {row['eval_top1']:>6.4f}  "
        f"{row['eval_loss']:>6.4f}  {row['eval_samples']:>6}  {row['data']:<10}  {'; '.join(row['adapted']) or '-'}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bigvit-eval", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    classify_cmd = commands.add_parser("classify", help="top-1 and loss on the evaluation split")
    classify_cmd.add_argument("weights", type=Path, help="run dir, checkpoint dir, or .safetensors file")
    classify_cmd.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.image_size=32,48,64")
    classify_cmd.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    fewshot_cmd = commands.add_parser("fewshot", help="few-shot linear probe errors of the frozen features")
    fewshot_cmd.add_argument("weights", type=Path, help="run dir, checkpoint dir, or .safetensors file")
    fewshot_cmd.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. fewshot.shots=[1,5]")
    fewshot_cmd.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        points = sweep_points(args.overrides)
        weights = load_weights(args.weights)
        rows = []
        evaluate, line = (classify, table_line) if args.command == "classify" else (fewshot, fewshot_table)
        for point in points:
            rows.append(evaluate(weights, point, device))
            if len(rows) == 1:  # after the first point composed and ran: errors come alone
                step = "" if weights.step is None else f" (step {weights.step})"
                print(f"weights {weights.source}{step}" + (f"\n{HEADER}" if args.command == "classify" else ""))
            print(line(rows[-1]), flush=True)
    except USER_ERRORS as error:
        raise SystemExit(f"bigvit: error: {error}") from None
    if args.json:
        report = {"weights": str(weights.source), "step": weights.step, "runs": rows}
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
