"""Loading the fused ``csrc`` interpolation op (placeholder until the kernel lands).

``get_op(name, device)`` returns a callable for the fused op on ``device`` or ``None``, in which
case ``knnlm.scoring`` uses its torch reference.
"""

from __future__ import annotations

import torch


def get_op(name: str, device: torch.device):
    return None
