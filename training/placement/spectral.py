"""Block similarity graph, normalised Laplacian, spectral embedding and k-means (step 3 of the search)."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

MAX_SPECTRAL_BLOCKS = 8192
"""Most blocks the dense eigendecomposition takes: an [n, n] fp64 Laplacian (512 MiB at the limit) and
O(n^3) work (minutes on a CPU at the limit). Raise `block_width` to get fewer blocks."""
KMEANS_MAX_ITERATIONS = 100
"""Lloyd iterations per k-means run (runs stop earlier once no assignment changes)."""


def task_profiles(sketches: torch.Tensor) -> torch.Tensor:
    """[num_blocks, num_tasks^2] unit-norm flattened task Gram matrices of [num_blocks, num_tasks, s] sketches.

    G_b = S_b S_b^T estimates <g_bt, g_bu> for every pair of tasks t, u. It does not depend on the block's own
    coordinates (which differ between blocks), only on how the tasks' gradients relate inside the block.
    """
    gram = sketches.double() @ sketches.double().transpose(1, 2)  # [num_blocks, num_tasks, num_tasks]
    flat = gram.flatten(1)  # [num_blocks, num_tasks^2]
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-300)


def knn_graph(features: torch.Tensor, knn: int) -> torch.Tensor:
    """[n, n] symmetric weights: cosine of unit rows, clamped at 0, kept for each row's `knn` nearest."""
    n = features.shape[0]
    cosine = features @ features.T  # [n, n]
    cosine.fill_diagonal_(float("-inf"))
    k = min(knn, n - 1)
    weights = torch.zeros_like(cosine)  # [n, n]
    if k > 0:
        values, neighbours = cosine.topk(k, dim=1)  # [n, k]
        weights.scatter_(1, neighbours, values.clamp_min(0.0))
    return torch.maximum(weights, weights.T)


def normalized_laplacian(weights: torch.Tensor) -> torch.Tensor:
    """L = I - D^-1/2 W D^-1/2 of a symmetric [n, n] weight matrix (isolated nodes get D^-1/2 = 0)."""
    degree = weights.sum(dim=1)  # [n]
    inv_sqrt = torch.where(degree > 0, degree.clamp_min(1e-300).rsqrt(), torch.zeros_like(degree))  # [n]
    eye = torch.eye(weights.shape[0], dtype=weights.dtype, device=weights.device)  # [n, n]
    return eye - inv_sqrt[:, None] * weights * inv_sqrt[None, :]


def spectral_embedding(laplacian: torch.Tensor, dim: int) -> torch.Tensor:
    """[n, dim] rows of the `dim` smallest eigenvectors of the Laplacian, each row scaled to unit norm."""
    n = laplacian.shape[0]
    if n > MAX_SPECTRAL_BLOCKS:
        raise ValueError(f"{n} blocks exceed the dense eigensolver's limit of {MAX_SPECTRAL_BLOCKS}; raise block_width")
    _, vectors = torch.linalg.eigh(laplacian.double())  # [n, n], ascending eigenvalues
    embedding = vectors[:, :dim]  # [n, dim]
    return embedding / embedding.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """[k, d] initial centres: the first uniform, each next drawn with probability ~ squared distance."""
    n = points.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    nearest = (points - points[chosen[0]]).square().sum(dim=1)  # [n]
    for _ in range(1, k):
        if nearest.sum() > 0:
            index = int(torch.multinomial(nearest.float(), 1, generator=generator))
        else:
            index = next(i for i in range(n) if i not in chosen)
        chosen.append(index)
        nearest = torch.minimum(nearest, (points - points[index]).square().sum(dim=1))
    return points[chosen].clone()


def _lloyd(points: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Lloyd iterations from `centres`: (labels [n], inertia); an emptied cluster takes the worst-fit point."""
    labels = torch.full((points.shape[0],), -1, dtype=torch.long)  # [n]
    for _ in range(KMEANS_MAX_ITERATIONS):
        distances = torch.cdist(points, centres).square()  # [n, k]
        new_labels = distances.argmin(dim=1)  # [n]
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
        fit = distances.gather(1, labels[:, None]).squeeze(1)  # [n]
        for c in range(centres.shape[0]):
            members = labels == c
            if members.any():
                centres[c] = points[members].mean(dim=0)
            else:
                worst = int(fit.argmax())
                centres[c], labels[worst], fit[worst] = points[worst], c, float("-inf")
    inertia = torch.cdist(points, centres).square().gather(1, labels[:, None]).sum()
    return labels, float(inertia)


def kmeans(points: torch.Tensor, k: int, seed: int, restarts: int = 4) -> torch.Tensor:
    """[n] cluster labels in [0, k) of [n, d] points: best of `restarts` k-means++ seeded Lloyd runs."""
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= number of points, got k={k} for {n} points")
    generator = torch.Generator().manual_seed(seed)
    points = points.double().cpu()
    best_labels, best_inertia = None, float("inf")
    for _ in range(restarts):
        labels, inertia = _lloyd(points, _kmeans_plus_plus(points, k, generator))
        if inertia < best_inertia - 1e-12:
            best_labels, best_inertia = labels, inertia
    return best_labels


def spectral_clusters(weights: torch.Tensor, num_clusters: int, seed: int, restarts: int = 4) -> torch.Tensor:
    """[n] cluster labels of the nodes of a symmetric [n, n] weight matrix (Ng-Jordan-Weiss)."""
    n = weights.shape[0]
    if not 1 <= num_clusters <= n:
        raise ValueError(f"num_clusters must be in [1, {n}] for {n} blocks, got {num_clusters}")
    if not torch.allclose(weights, weights.T) or (weights < 0).any():
        raise ValueError("the graph's weights must be symmetric and non-negative")
    embedding = spectral_embedding(normalized_laplacian(weights.double()), num_clusters)  # [n, C]
    labels = kmeans(embedding, num_clusters, seed, restarts)
    logger.info("spectral clusters of %d blocks: sizes %s", n, torch.bincount(labels, minlength=num_clusters).tolist())
    return labels
