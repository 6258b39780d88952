"""Image–text evaluation of a SigLIP model on the held-out split: zero-shot classification from prompts
alone, and image↔text retrieval.

Zero-shot (CLIP's recipe): each class name goes into every prompt template ("a photo of the digit {}"),
the texts are embedded, averaged over templates and renormalized; an image's class is the nearest class
embedding. Top-1 counts the held-out samples that carry a class (`.cls`).

Retrieval: every held-out image against the held-out captions (each distinct caption once), and every
caption against the images; recall@k = the share of queries with a correct item among the k nearest. A
retrieved caption is correct when its text equals the query image's own caption, and a retrieved image
when its caption equals the query text: the held-out digits caption every image of a class alike, and
on sets with distinct captions this is the usual one-to-one matching.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bigvit.train.fewshot import filled_batches, from_each_group

RECALL_AT = (1, 5)
QUERY_CHUNK = 1024  # queries scored at a time: the similarity rows held are QUERY_CHUNK × gallery


def prompt_tokens(tokenizer, class_names: list[str], templates: list[str]) -> torch.Tensor:
    """(classes × templates, L) token ids, class-major: every template filled with each class name."""
    return tokenizer.encode([template.format(name) for name in class_names for template in templates])


def class_embeddings(text_embeddings: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(classes × templates, D) normalized prompt embeddings → (classes, D): each class's mean, renormalized."""
    return F.normalize(text_embeddings.view(num_classes, -1, text_embeddings.shape[-1]).mean(dim=1), dim=-1)


def recall_at(similarity_rows, query_ids: torch.Tensor, gallery_ids: torch.Tensor, ks=RECALL_AT) -> dict[int, float]:
    """{k: share of queries with an item of their id among the k most similar} over (chunk, gallery)
    similarity rows, chunk by chunk."""
    hits = dict.fromkeys(ks, 0)
    start = 0
    for rows in similarity_rows:
        top = rows.topk(min(max(ks), rows.shape[1]), dim=1).indices
        correct = gallery_ids[top] == query_ids[start : start + len(rows), None]
        for k in ks:
            hits[k] += int(correct[:, :k].any(dim=1).sum())
        start += len(rows)
    return {k: hits[k] / max(len(query_ids), 1) for k in ks}


def chunked_similarity(queries: torch.Tensor, gallery: torch.Tensor):
    for start in range(0, len(queries), QUERY_CHUNK):
        yield queries[start : start + QUERY_CHUNK] @ gallery.T


def retrieval(zimg: torch.Tensor, ztxt: torch.Tensor, captions: torch.Tensor) -> dict[str, float]:
    """i2t/t2i recall@k of paired embeddings (N, D) whose caption token rows are `captions` (N, L). Images
    are matched against each distinct caption once (copies of one caption embed alike), captions against
    every image."""
    _, caption_ids = torch.unique(captions, dim=0, return_inverse=True)
    distinct = len(caption_ids.unique())
    first = torch.full((distinct,), len(caption_ids), dtype=torch.long).scatter_reduce(
        0, caption_ids, torch.arange(len(caption_ids)), reduce="amin"
    )
    figures = {}
    searches = (("i2t", zimg, ztxt[first], torch.arange(distinct)), ("t2i", ztxt, zimg, caption_ids))
    for name, queries, gallery, gallery_ids in searches:
        for k, value in recall_at(chunked_similarity(queries, gallery), caption_ids, gallery_ids).items():
            figures[f"{name}_recall@{k}"] = value
    figures["distinct_captions"] = distinct
    return figures


class ZeroShotRetrieval:
    """The siglip objective's evaluator: `zeroshot_top1` (when data.class_names and data.templates are
    set), `i2t_recall@{1,5}`, `t2i_recall@{1,5}`, and the sample counts."""

    def __call__(self, trainer) -> dict:
        device, data_cfg, tokenizer = trainer.env.device, trainer.cfg.data, trainer.data.tokenizer
        forward = trainer.engine.forward
        names, templates = list(data_cfg.get("class_names") or []), list(data_cfg.get("templates") or [])
        classes = None
        if names and templates:
            _, prompts, _, _ = forward(None, prompt_tokens(tokenizer, names, templates).to(device))
            classes = class_embeddings(prompts.float(), len(names))
        images_out, texts_out, captions, labels = [], [], [], []
        for batch, real in filled_batches(trainer.data.make_eval(), device):
            images, tokens = trainer.data.eval_batch(batch, device)[0], batch["tokens"].to(device)
            zimg, ztxt, _, _ = forward(images, tokens)
            if real:
                images_out.append(zimg.float().cpu())
                texts_out.append(ztxt.float().cpu())
                captions.append(batch["tokens"])
                labels.append(batch["label"])
        # Ranks of one tp×cp group read the same samples: each group's first rank contributes them.
        local = tuple(map(torch.cat, (images_out, texts_out, captions, labels))) if captions else None
        parts = from_each_group(local, trainer.dims.cp * trainer.dims.tp)
        zimg, ztxt, captions, labels = (torch.cat(column) for column in zip(*parts, strict=True))
        figures = {**retrieval(zimg, ztxt, captions), "retrieval_samples": len(captions)}
        if classes is not None:
            labelled = labels >= 0
            predicted = (zimg[labelled] @ classes.cpu().T).argmax(dim=1)
            figures["zeroshot_top1"] = float((predicted == labels[labelled]).float().mean()) if labelled.any() else 0.0
            figures["zeroshot_samples"] = int(labelled.sum())
        return figures
