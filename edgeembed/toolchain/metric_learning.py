"""Metric-learning losses and class-balanced batches for training a projection head.

The losses take a batch of unit-length outputs (PyTorch tensor, one row per photo) and
their class labels. Every pair of rows with the same label is a positive pair and
every pair with different labels a negative one, so a batch needs at least two photos
of some class. `pk_batches` draws batches that guarantee it. PyTorch is imported
inside the functions, so this module loads without it.
"""

from __future__ import annotations

import numpy as np

LOSSES = ("triplet", "contrastive", "supcon")


def _similarities(outputs, labels):
    """Return the cosine matrix of unit rows and the masks of positive and negative pairs."""
    import torch

    similarity = outputs @ outputs.T
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(labels), dtype=torch.bool)
    return similarity, positive, ~same


def triplet_loss(outputs, labels, margin: float):
    """Batch-hard triplet loss: each anchor with its least similar positive and most similar negative."""
    import torch

    similarity, positive, negative = _similarities(outputs, labels)
    hardest_positive = torch.where(positive, similarity, torch.inf).min(dim=1).values
    hardest_negative = torch.where(negative, similarity, -torch.inf).max(dim=1).values
    usable = positive.any(dim=1) & negative.any(dim=1)
    return torch.relu(hardest_negative - hardest_positive + margin)[usable].mean()


def contrastive_loss(outputs, labels, margin: float):
    """Pull positive pairs to similarity 1, push negatives below `margin`, averaging only the
    negatives still above it (online hard-negative mining)."""
    similarity, positive, negative = _similarities(outputs, labels)
    pull = (1.0 - similarity[positive]).mean()
    violations = (similarity[negative] - margin).clamp(min=0)
    hard = violations > 0
    push = violations[hard].mean() if hard.any() else violations.sum()
    return pull + push


def supcon_loss(outputs, labels, temperature: float):
    """Supervised contrastive loss (Khosla et al., 2020) over the batch."""
    import torch

    similarity, positive, _ = _similarities(outputs, labels)
    logits = (similarity / temperature).masked_fill(torch.eye(len(labels), dtype=torch.bool), -torch.inf)
    log_probability = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    counts = positive.sum(dim=1)
    per_anchor = -log_probability.masked_fill(~positive, 0.0).sum(dim=1) / counts.clamp(min=1)
    return per_anchor[counts > 0].mean()


def metric_loss(name: str, outputs, labels, margin: float, temperature: float):
    """Compute one of `LOSSES` on a batch.

    Args:
        name: ``"triplet"``, ``"contrastive"`` or ``"supcon"``.
        outputs: Unit-length rows, a float tensor (N, D).
        labels: Class of each row, an integer tensor (N,).
        margin: Cosine margin of the triplet and contrastive losses.
        temperature: Softmax temperature of the SupCon loss.

    Returns:
        The scalar loss tensor.

    Raises:
        ValueError: For an unknown loss name.
    """
    if name == "triplet":
        return triplet_loss(outputs, labels, margin)
    if name == "contrastive":
        return contrastive_loss(outputs, labels, margin)
    if name == "supcon":
        return supcon_loss(outputs, labels, temperature)
    raise ValueError(f"invalid loss {name!r}; use one of {', '.join(LOSSES)}")


def pk_batches(labels: np.ndarray, classes_per_batch: int, images_per_class: int, min_batches: int,
               rng: np.random.Generator) -> list[np.ndarray]:
    """Draw one epoch of P-K batches: `images_per_class` rows of each of `classes_per_batch` classes.

    Args:
        labels: Class of each training row.
        classes_per_batch: Classes drawn per batch (all of them when there are fewer).
        images_per_class: Rows drawn per class, with repeats when a class has fewer.
        min_batches: Smallest number of batches in the epoch.
        rng: Random generator, for reproducible batches.

    Returns:
        Row indices into `labels`, one array per batch.
    """
    classes = [np.flatnonzero(labels == label) for label in np.unique(labels)]
    per_batch = classes_per_batch * images_per_class
    batch_count = max(min_batches, len(labels) // per_batch)

    batches = []
    for _ in range(batch_count):
        chosen = rng.choice(len(classes), size=min(classes_per_batch, len(classes)), replace=False)
        rows = [rng.choice(classes[c], size=images_per_class, replace=len(classes[c]) < images_per_class)
                for c in chosen]
        batches.append(np.concatenate(rows))
    return batches
