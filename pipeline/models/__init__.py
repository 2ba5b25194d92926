"""So-ViT models; importing this package registers ``sovit_7/10/14/19`` with timm."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .second_order import cross_covariance, svpn, svpn_svd
from .sovit import SoViT

__all__ = ["SoViT", "cross_covariance", "forward_flops", "svpn", "svpn_svd"]


def forward_flops(model: torch.nn.Module, img_size: int, in_chans: int = 3) -> int:
    """Forward FLOPs of one image, counted by torch's FlopCounterMode (the engine's MFU is built on it).

    Counted on a batch of 2 (BatchNorm in train mode rejects a batch of 1) in eval mode, then halved.
    """
    param = next(model.parameters())
    x = torch.zeros(2, in_chans, img_size, img_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
