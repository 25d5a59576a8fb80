"""What the training loop reads, as the official scripts read it: PIL-bicubic images, PIL-bilinear
masks binarised at 0.5 (:mod:`clipad.data.official`, shared with ``clipad eval --resize pil``), a new
seeded order each epoch, and k normal references per query."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..data.official import official_image_transform, official_mask
from ..errors import ClipadError

__all__ = ["ReferenceSampler", "epoch_orders", "official_image_transform", "official_mask"]


def epoch_orders(n: int, seed: int) -> Iterator[torch.Tensor]:
    """The sample order of epoch 0, 1, 2, ...: successive ``randperm(n)`` of one seeded generator."""
    g = torch.Generator().manual_seed(int(seed))
    while True:
        yield torch.randperm(n, generator=g)


class ReferenceSampler:
    """k normal reference images for each training query (methods with ``training_references``).

    The official AdaptCLIP ``train.py`` gives every query one normal image of its own class,
    drawn uniformly (``random.choice``) from the class's training normals (meta.json ``train``:
    ``train/good`` of MVTec AD, the normal training rows of VisA), in its data-loader workers.
    Here the draw has the same distribution, with replacement, from a generator seeded by (training
    seed, step), so a resumed run draws what an uninterrupted one does. A class without training
    normals (the folder layout) draws from the normal images among the training samples of that
    class, other than the query itself where there is another.

    Args:
        pool: normal reference candidates (typically the dataset's ``train`` split normals).
        samples: the training samples (fallback pool).
        k: references per query.
        size: model input size (images are resized as the training images).
        seed: the training seed.
    """

    def __init__(self, pool: Sequence, samples: Sequence, k: int, size: int, seed: int) -> None:
        self.k, self.seed = int(k), int(seed)
        self.transform = official_image_transform(size)
        self.pools: dict[str, list] = {}
        for s in pool:
            if s.label == 0:
                self.pools.setdefault(s.class_name, []).append(s)
        self.fallback: dict[str, list] = {}
        for s in samples:
            if s.label == 0 and s.class_name not in self.pools:
                self.fallback.setdefault(s.class_name, []).append(s)

    def draw(self, batch_samples: Sequence, step: int) -> list[list]:
        """The k reference samples of each query of the batch at ``step`` (0-based)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))
        out = []
        for s in batch_samples:
            pool = self.pools.get(s.class_name)
            if pool is None:
                pool = [r for r in self.fallback.get(s.class_name, []) if r.image_path != s.image_path]
                pool = pool or self.fallback.get(s.class_name, [])
            if not pool:
                raise ClipadError(
                    f"class '{s.class_name}' has no normal image to serve as a training reference; add normal images "
                    "(a train split or normal samples of that class)"
                )
            out.append([pool[int(i)] for i in torch.randint(len(pool), (self.k,), generator=g)])
        return out

    def load(self, batch_samples: Sequence, step: int) -> torch.Tensor:
        """[B, k, 3, S, S] float images in [0, 1] (not CLIP-normalised)."""
        from ..data.images import load_image

        picks = self.draw(batch_samples, step)
        return torch.stack([torch.stack([self.transform(load_image(r.image_path)) for r in refs]) for refs in picks])
