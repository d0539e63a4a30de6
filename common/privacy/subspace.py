"""DP-SGD in a public subspace: the real patches' gradients are projected before clipping and noise.

With n patches per hospital the signal-to-noise ratio of DP-SGD grows like n x epsilon / sqrt(d) for
d covered parameters (docs/results.md, "What DP costs"): at the tiny preset's 108,000 the noise
swamps the signal at any useful epsilon. Projecting each real patch's gradient on a k-dimensional
subspace first (Zhou et al. 2021, "Bypassing the ambient dimension", PDP-SGD) puts the noise in k
dimensions instead of d. The subspace must not depend on the private data beyond earlier private
outputs; here it is spanned by the gradients of the generator's images, which depend on the real
patches only through the private discriminator (post-processing), so they are public in the sense
DP needs.

Per step: the gradients of this and the last ``history - 1`` steps' generated images (each
normalised to norm 1) give, by SVD, the top ``dim`` directions V (d x k, orthonormal). Each real
patch's coefficients ``c_i = V^T g_i`` are clipped to C, summed, and N(0, sigma^2 C^2 I_k) is added;
the covered parameters receive ``V (sum_i clip(c_i) + z) / B``. It is the same Gaussian mechanism on
a sum of vectors of norm at most C as plain DP-SGD, so the accounting does not change. What is lost
is the part of each real gradient outside the span.
"""

from __future__ import annotations

from collections import deque

import torch


class PublicSubspace:
    """The top ``dim`` directions of the recent generated-image gradients, over the parameters ``names``."""

    def __init__(self, names: list[str], shapes: list[tuple[int, ...]], dim: int, history: int) -> None:
        if dim < 1 or history < 1:
            raise ValueError(f"subspace dim and history must be >= 1, got {dim} and {history}")
        self.names = list(names)
        self.shapes = [tuple(s) for s in shapes]
        self.sizes = [int(torch.Size(s).numel()) for s in self.shapes]
        self.dim = int(dim)
        self.recent: deque[torch.Tensor] = deque(maxlen=int(history))

    def flatten(self, per_sample: dict[str, torch.Tensor]) -> torch.Tensor:
        """(b, d): each example's gradient over ``names`` as one row."""
        first = per_sample[self.names[0]]
        return torch.cat([per_sample[n].reshape(first.shape[0], -1) for n in self.names], dim=1)

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """A (d,) vector back as ``{name: tensor}`` in ``names`` order."""
        parts = torch.split(vector, self.sizes)
        return {n: p.reshape(s) for n, p, s in zip(self.names, parts, self.shapes)}

    def observe(self, per_sample: dict[str, torch.Tensor]) -> None:
        """Keep this step's public (generated-image) per-example gradients, each normalised to norm 1."""
        rows = self.flatten(per_sample).detach()
        norms = rows.norm(dim=1, keepdim=True)
        rows = rows[norms.squeeze(1) > 0] / norms[norms.squeeze(1) > 0]
        if rows.shape[0]:
            self.recent.append(rows)

    def basis(self) -> torch.Tensor:
        """(d, k) orthonormal: the top ``dim`` right singular vectors of the kept public gradients."""
        if not self.recent:
            raise RuntimeError("privacy.subspace: no generated-image gradient to span the subspace yet")
        public = torch.cat(list(self.recent), dim=0)
        _, _, vh = torch.linalg.svd(public, full_matrices=False)
        return vh[: min(self.dim, vh.shape[0])].T.contiguous()
