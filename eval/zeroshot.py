"""Run one task: stream its shards, embed images and texts with the CLIP, score with :mod:`.metrics`.

Classification follows clip_benchmark's ``zero_shot_classifier``: every class name is put in every
template (``template.format(c=name)``), the prompts are encoded and L2-normalised, averaged per
class and normalised again; an image's logits are ``100 * normalised image embedding @ classes``.
Retrieval encodes every caption of every image (``.txt``, one caption a line) and scores texts
against images by cosine similarity.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from dcdb.errors import TaskError

from .metrics import classification_metrics, retrieval_metrics
from .tasks import IMAGE_EXTS, Task

TEXT_BATCH = 512


def _collate(samples: list[tuple[Any, Any]]):
    import torch

    images, targets = zip(*samples)
    return torch.stack(images), list(targets)


def _captions(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def task_batches(task: Task, transform: Callable, *, batch_size: int, workers: int) -> Iterator[tuple[Any, list]]:
    """``(images, targets)`` batches of ``task``'s test split (targets: class ids or caption lists)."""
    import webdataset as wds
    from webdataset.handlers import reraise_exception

    from dcdb.train.data import tar_samples

    label = "txt" if task.type == "retrieval" else "cls"
    convert = _captions if task.type == "retrieval" else int
    shards = task.shards
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(shards),
        wds.split_by_worker,
        tar_samples(reraise_exception),
        wds.decode(wds.autodecode.ImageHandler("pil", extensions=list(IMAGE_EXTS))),
        wds.to_tuple(";".join(IMAGE_EXTS), label),
        wds.map_tuple(transform, convert),
        wds.batched(batch_size, collation_fn=_collate, partial=True),
    )
    loader = wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=min(workers, len(shards)))
    try:
        yield from loader
    except ValueError as exc:  # to_tuple: a sample without an image or a label
        raise TaskError(f"task {task.name!r}: a sample in {task.path} lacks a member: {exc}",
                        hint=f"each sample needs an image ({'/'.join(IMAGE_EXTS)}) and a .{label}") from None


def encode_texts(model, tokenizer: Callable, texts: list[str], device: str):
    """L2-normalised text embeddings of ``texts`` (encoded in chunks)."""
    import torch
    import torch.nn.functional as F

    out = []
    with torch.no_grad():
        for i in range(0, len(texts), TEXT_BATCH):
            tokens = tokenizer(texts[i : i + TEXT_BATCH]).to(device)
            out.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    return torch.cat(out)


def encode_images(model, images, device: str):
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        return F.normalize(model.encode_image(images.to(device)).float(), dim=-1)


def zero_shot_classifier(model, tokenizer: Callable, classnames: list[str], templates: list[str], device: str):
    """``(dim, classes)`` matrix of template-averaged, normalised class embeddings."""
    import torch.nn.functional as F

    prompts = [t.format(c=name) for name in classnames for t in templates]
    emb = encode_texts(model, tokenizer, prompts, device)
    per_class = emb.reshape(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1).T


def evaluate_classification(model, transform, tokenizer, task: Task, *, device: str, batch_size: int,
                            workers: int) -> dict[str, Any]:
    """Zero-shot classification metrics of ``task``."""
    import torch

    classnames = task.classnames()
    classifier = zero_shot_classifier(model, tokenizer, classnames, task.templates(), device)
    logits, targets = [], []
    for images, labels in task_batches(task, transform, batch_size=batch_size, workers=workers):
        logits.append((100.0 * encode_images(model, images, device) @ classifier).cpu())
        targets.extend(labels)
    if not targets:
        raise TaskError(f"task {task.name!r} has no samples in {task.path}", hint="rewrite the task folder")
    targets_np = np.asarray(targets)
    bad = (targets_np < 0) | (targets_np >= len(classnames))
    if bad.any():
        raise TaskError(f"task {task.name!r}: class index {int(targets_np[bad][0])} is outside classnames.txt "
                        f"({len(classnames)} classes)", hint="the task's labels and classnames.txt disagree: rewrite the task")
    metrics = classification_metrics(torch.cat(logits).numpy(), targets_np)
    return {**metrics, "num_samples": len(targets)}


def evaluate_retrieval(model, transform, tokenizer, task: Task, *, device: str, batch_size: int,
                       workers: int) -> dict[str, Any]:
    """Image<->text retrieval recall@1/5/10 of ``task`` and their ``mean_recall@1``."""
    import torch

    image_emb, texts, text_image = [], [], []
    for images, captions in task_batches(task, transform, batch_size=batch_size, workers=workers):
        first = sum(len(e) for e in image_emb)
        image_emb.append(encode_images(model, images, device).cpu())
        for j, caps in enumerate(captions):
            texts.extend(caps)
            text_image.extend([first + j] * len(caps))
    if not texts:
        raise TaskError(f"retrieval task {task.name!r} has no captions in {task.path}",
                        hint="each sample needs a .txt with one caption a line")
    text_emb = encode_texts(model, tokenizer, texts, device).cpu()
    scores = (text_emb @ torch.cat(image_emb).T).numpy()
    metrics = retrieval_metrics(scores, np.asarray(text_image), ks=(1, 5, 10))
    return {**metrics, "num_images": int(scores.shape[1]), "num_texts": len(texts)}


EVALUATORS = {"classification": evaluate_classification, "retrieval": evaluate_retrieval}
