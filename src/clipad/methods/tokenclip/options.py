"""TokenCLIP's options: AnomalyCLIP's (same meaning and defaults) plus its own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ...errors import InvalidValueError
from ..anomalyclip.options import AnomalyCLIPOptions


@dataclass(frozen=True)
class TokenCLIPOptions(AnomalyCLIPOptions):
    """Options of :class:`~clipad.methods.tokenclip.TokenCLIP`; the inherited ones are
    :class:`~clipad.methods.anomalyclip.options.AnomalyCLIPOptions`."""

    n_subspaces: int = 4
    """K learnable (normal, abnormal) prompt pairs, one per textual subspace."""
    topk: int = 2
    """Subspaces kept per token after assignment (>= K keeps the dense plan)."""
    assignment: Literal["ot", "softmax"] = "ot"
    """"ot" (Sinkhorn, uniform marginals) or "softmax" (row softmax of -cost / epsilon; ablation)."""
    orthogonality: Literal["construction", "penalty", "none"] = "construction"
    """"construction" (block Gram-Schmidt each forward), "penalty" (added to the loss), "none"."""
    orthogonality_weight: float = 1.0
    """Weight of the orthogonality penalty in the training loss ("penalty" only)."""
    cost: Literal["max", "mean"] = "max"
    """Token-subspace cost ``1 - sim``, sim the max or the mean cosine with the subspace's pair."""
    epsilon: float = 0.05
    """Entropic regularisation of OT and temperature of the softmax assignment."""
    ot_iters: int = 100
    """Sinkhorn iteration cap."""
    ot_tol: float = 1e-6
    """Sinkhorn marginal tolerance."""
    ot_check_every: int = 1
    """Test the tolerance every this many iterations. Each test reads one number back from the
    device; 10 on a GPU removes 90 % of those waits at the price of up to 9 extra (harmless: the
    plan only gets closer to its marginals) iterations."""
    plan_grad: bool = False
    """Let gradients flow through the assignment (False: a fixed plan)."""
    image_score: Literal["mean", "affinity"] = "mean"
    """"mean" over the subspaces or "affinity"-weighted (see the model's module docstring)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        # 2 x n_subspaces prompts are built; 2K <= the embedding width (<= 1280 for open_clip's ViTs)
        if not 1 <= self.n_subspaces <= 640:
            raise InvalidValueError(f"option n_subspaces must be in [1, 640] (2 x n_subspaces prompts must fit the "
                                    f"embedding width); got {self.n_subspaces}")
        if self.topk < 1:
            raise InvalidValueError(f"option topk must be an int >= 1 (>= n_subspaces keeps the dense plan); got {self.topk}")
        if self.epsilon <= 0:
            raise InvalidValueError(f"option epsilon must be a finite number > 0; got {self.epsilon}")
        if self.ot_iters < 1:
            raise InvalidValueError(f"option ot_iters must be an int >= 1; got {self.ot_iters}")
        if self.ot_tol < 0:
            raise InvalidValueError(f"option ot_tol must be >= 0; got {self.ot_tol}")
        if self.ot_check_every < 1:
            raise InvalidValueError(f"option ot_check_every must be an int >= 1; got {self.ot_check_every}")
