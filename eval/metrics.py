"""Zero-shot metrics on plain numpy arrays, with clip_benchmark's (and DataComp's) definitions.

Classification (``logits``: images x classes): ``acc1``, ``acc5`` (None with fewer than 5 classes,
as DataComp), ``mean_per_class_recall`` (sklearn's balanced accuracy: the mean over the classes
present in the targets of the fraction of their images predicted right).

Retrieval (``scores``: texts x images, ``text_image``: the image index of each text; an image may
have several captions): ``image_retrieval_recall@k`` is text -> image (share of texts whose image is
among the k best images), ``text_retrieval_recall@k`` is image -> text (share of images with at
least one of their captions among the k best texts), ``mean_recall@1`` their mean at k=1 (DataComp's
main retrieval metric). Ties count in the candidate's favour; k larger than the candidates is
capped (recall 1).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


def classification_metrics(logits: np.ndarray, targets: np.ndarray) -> dict[str, float | None]:
    """``acc1``, ``acc5`` and ``mean_per_class_recall`` of class scores against true classes."""
    logits = np.asarray(logits)
    targets = np.asarray(targets).astype(np.int64)
    if logits.ndim != 2 or len(logits) != len(targets) or len(targets) == 0:
        raise ValueError(f"need logits of shape (n, classes) and n targets, got {logits.shape} and {targets.shape}")
    n_classes = logits.shape[1]
    pred = logits.argmax(axis=1)
    acc5 = None
    if n_classes >= 5:
        top5 = np.argpartition(-logits, 4, axis=1)[:, :5]
        acc5 = float((top5 == targets[:, None]).any(axis=1).mean())
    return {
        "acc1": float((pred == targets).mean()),
        "acc5": acc5,
        "mean_per_class_recall": mean_per_class_recall(pred, targets),
    }


def mean_per_class_recall(pred: np.ndarray, targets: np.ndarray) -> float:
    """Mean over the classes present in ``targets`` of each class's recall (balanced accuracy)."""
    classes, inverse = np.unique(targets, return_inverse=True)
    hits = np.bincount(inverse, weights=(pred == targets).astype(np.float64), minlength=len(classes))
    totals = np.bincount(inverse, minlength=len(classes))
    return float((hits / totals).mean())


def retrieval_metrics(scores: np.ndarray, text_image: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image->text and text->image recall@k of text x image similarities, and ``mean_recall@1``."""
    scores = np.asarray(scores)
    text_image = np.asarray(text_image).astype(np.int64)
    n_texts, n_images = scores.shape
    if len(text_image) != n_texts or n_texts == 0:
        raise ValueError(f"need one image index per text row, got {len(text_image)} for {n_texts} rows")
    true = scores[np.arange(n_texts), text_image]
    # text -> image: how many images beat the text's own image
    text_rank = (scores > true[:, None]).sum(axis=1)
    # image -> text: how many texts beat the image's best caption (images without one never hit)
    best = np.full(n_images, -np.inf, dtype=np.float64)
    np.maximum.at(best, text_image, true.astype(np.float64))
    image_rank = (scores > best[None, :]).sum(axis=0)
    has_caption = ~np.isneginf(best)
    out: dict[str, float] = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = float((text_rank < k).mean())
        out[f"text_retrieval_recall@{k}"] = float(((image_rank < k) & has_caption).mean())
    if 1 in ks:
        out["mean_recall@1"] = 0.5 * (out["image_retrieval_recall@1"] + out["text_retrieval_recall@1"])
    return out


def average_main_metric(results: Iterable[dict[str, Any]]) -> float | None:
    """Plain mean of ``metrics.main_metric`` over results that have one (DataComp's average)."""
    values = [r["metrics"].get("main_metric") for r in results]
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None
