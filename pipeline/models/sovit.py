"""So-ViT: a ViT whose visual tokens come from a light ResNet stem and whose classifier adds second-order pooling.

Xie et al., "So-ViT: Mind Visual Tokens for Vision Transformer", arXiv:2104.10935.

* Token embedding: conv3x3 -> maxpool -> three ResNet bottlenecks -> 1x1 conv to embed_dim. The last bottleneck
  strides by ``img_size // 112`` as in the authors' code, so 224 px gives a 14x14 grid; unlike their code, any
  multiple of 8 from 32 px up works (112 -> 14x14, 160 -> 20x20, 64 -> 8x8), for small-data runs.
* Transformer: class token, fixed sinusoidal position embedding, pre-norm blocks (T2T-ViT-7/10/14/19 settings).
* Head: logits = fc(class token) + fc(vec(SVPN(Q))), Q the cross-covariance of two reductions of the visual tokens.
  The embedding (``num_classes=0``, ``forward_head(pre_logits=True)``) is [class token, vec(SVPN(Q))]: the one vector
  that a single linear layer maps to these logits (docs/design.md says why).

Each ``@register_model`` function passes a fresh dict: the authors' register functions mutated shared module-level
dicts, so building one variant changed the next.
"""

# No ``from __future__ import annotations`` here: torch.fx copies forward's annotations into the code it generates,
# where TorchScript cannot resolve a string one (scripting a traced So-ViT failed: "Unknown type name '_Tensor_'").
import math
from typing import Any, Literal

import torch
import torch.fx
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import calculate_drop_path_rates, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from .second_order import cross_covariance, svpn

__all__ = ["SoViT"]

# torch.fx records these as single calls instead of tracing into them: their argument checks branch on shapes and
# SVPN switches autocast off by device type, neither of which a symbolic trace can follow.
torch.fx.wrap("cross_covariance")
torch.fx.wrap("svpn")

_BN = {"eps": 1e-3, "momentum": 0.01}  # the authors' BatchNorm settings in the token embedding


class Bottleneck(nn.Module):
    """torchvision-style ResNet bottleneck (stride on the 3x3) with a 1x1 conv + BN projection shortcut."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int):
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, **_BN)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, **_BN)
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch, **_BN)
        self.act = nn.ReLU(inplace=True)
        self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                        nn.BatchNorm2d(out_ch, **_BN))

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act(out + self.downsample(x))


def token_grid(img_size: int | tuple[int, int]) -> int:
    """Side of the visual-token grid for a square input; a clear error where no grid can be built."""
    img_size = _square(img_size)
    if img_size < 32 or img_size % 8:
        raise ValueError(f"So-ViT img_size={img_size} is invalid: expected a multiple of 8, at least 32 "
                         f"(the token embedding downsamples by 8, then by img_size // 112)")
    return math.ceil(img_size // 8 / max(1, img_size // 112))


def _square(img_size: int | tuple[int, int]) -> int:
    """timm passes ``img_size`` as (H, W) from pretrained_cfg; So-ViT's fixed position table needs H == W."""
    if isinstance(img_size, (tuple, list)):
        if len(img_size) != 2 or img_size[0] != img_size[1]:
            raise ValueError(f"So-ViT img_size={tuple(img_size)} is invalid: expected a square size, e.g. 224")
        img_size = img_size[0]
    return int(img_size)


class TokenEmbed(nn.Module):
    """Image (B, 3, H, W) -> visual tokens (B, N, embed_dim) through a small hierarchical conv stem."""

    def __init__(self, img_size: int | tuple[int, int], embed_dim: int, in_chans: int = 3, width: int = 64):
        super().__init__()
        img_size = _square(img_size)
        self.grid = token_grid(img_size)
        self.num_patches = self.grid**2
        self.reduction = 8 * max(1, img_size // 112)  # input pixels per token side, timm's feature_info reduction
        self.conv1 = nn.Conv2d(in_chans, width, 3, stride=1, padding=1, bias=True)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layers = nn.Sequential(Bottleneck(width, width, 2),
                                    Bottleneck(width * 4, width, 2),
                                    Bottleneck(width * 4, width, max(1, img_size // 112)))
        self.proj = nn.Conv2d(width * 4, embed_dim, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(self.layers(self.pool(self.conv1(x))))
        return x.flatten(2).transpose(1, 2)


def sinusoid_table(n_position: int, dim: int) -> Tensor:
    """The fixed (not learned) position encoding of "Attention is all you need", (1, n_position, dim)."""
    pos = torch.arange(n_position, dtype=torch.float64)[:, None]
    i = torch.arange(dim, dtype=torch.float64)[None, :]
    angle = pos / torch.pow(10000.0, 2 * torch.div(i, 2, rounding_mode="floor") / dim)
    table = torch.where(i % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float().unsqueeze(0)


class SecondOrderHead(nn.Module):
    """Visual tokens -> vec(SVPN(cross-covariance of two 1x1-conv reductions)), shape (B, d1 * d2)."""

    def __init__(self, embed_dim: int, d1: int, d2: int, alpha: float = 0.5, top_k: int = 1, iters: int = 1):
        super().__init__()
        self.reduce1 = nn.Sequential(nn.Conv1d(embed_dim, d1, 1, bias=False), nn.BatchNorm1d(d1), nn.ReLU(True))
        self.reduce2 = nn.Sequential(nn.Conv1d(embed_dim, d2, 1, bias=False), nn.BatchNorm1d(d2), nn.ReLU(True))
        self.svpn_init = nn.Parameter(torch.randn(d2, top_k))  # learnable power-iteration start vectors
        self.alpha, self.top_k, self.iters = alpha, top_k, iters
        self.out_dim = d1 * d2

    def forward(self, tokens: Tensor) -> Tensor:
        x = tokens.transpose(1, 2)  # (B, D, N): a 1x1 conv over the token grid is a Conv1d over N
        q = cross_covariance(self.reduce1(x), self.reduce2(x))
        # SVPN computes in fp32; hand its result back in the tokens' dtype (bf16 weights under DeepSpeed)
        return svpn(q, self.alpha, self.top_k, self.iters, init=self.svpn_init).to(x.dtype).flatten(1)


class SoViT(nn.Module):
    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 256,
        depth: int = 7,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        so_dims: tuple[int, int] = (48, 24),
        head: Literal["so", "cls"] = "so",
        head_drop_rate: float = 0.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        svpn_alpha: float = 0.5,
        svpn_top_k: int = 1,
        svpn_iters: int = 1,
    ):
        super().__init__()
        if head not in ("so", "cls"):
            raise ValueError(f"So-ViT head={head!r} is invalid: expected 'so' (class token + second-order) or 'cls'")
        self.num_classes, self.head_type = num_classes, head
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = TokenEmbed(img_size, embed_dim, in_chans)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sinusoid_table(self.patch_embed.num_patches + 1, embed_dim),
                             persistent=False)
        self.pos_drop = nn.Dropout(drop_rate)
        self.grad_checkpointing = False
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=False, proj_drop=drop_rate, attn_drop=attn_drop_rate,
                  drop_path=rate)
            for rate in calculate_drop_path_rates(drop_path_rate, depth)])
        self.feature_info = [{"module": f"blocks.{i}", "num_chs": embed_dim, "reduction": self.patch_embed.reduction}
                             for i in range(depth)]
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()
        self.so_pool = (SecondOrderHead(embed_dim, *so_dims, alpha=svpn_alpha, top_k=svpn_top_k, iters=svpn_iters)
                        if head == "so" else None)
        self.head_drop = nn.Dropout(head_drop_rate)
        self.so_head = self._so_classifier(num_classes)
        self.head_hidden_size = self._embedding_width()
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    def _embedding_width(self) -> int:
        """Width of the pooled embedding [class token, vec(SVPN(Q))] (timm's ``head_hidden_size``)."""
        return self.embed_dim + (self.so_pool.out_dim if self.so_pool is not None else 0)

    def _so_classifier(self, num_classes: int) -> nn.Module | None:
        if self.so_pool is None:
            return None
        return nn.Linear(self.so_pool.out_dim, num_classes) if num_classes else nn.Identity()

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.Conv2d, nn.Conv1d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed", "so_pool.svpn_init"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups by depth, as timm's ViT: timm's layer-wise lr decay (``param_groups_layer_decay``) and
        ``model.group_matcher`` users rely on it. The token embedding is the stem; the final norm joins the last
        block; the classifiers and the second-order head (unmatched) come last."""
        return {
            "stem": r"^cls_token|^pos_embed|^patch_embed",
            "blocks": r"^blocks\.(\d+)" if coarse else [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        }

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer block in backward instead of keeping its activations (timm's
        ``checkpoint_seq``). The convolutional token embedding is not checkpointed: recomputing it would update its
        BatchNorm running statistics twice per step."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New classifiers (``num_classes=0``: none, the forward returns the embedding). The pooling is the model's
        own, fixed by ``head`` at construction, so ``global_pool`` is accepted only as None (timm's "keep")."""
        if global_pool is not None:
            raise ValueError(f"So-ViT global_pool={global_pool!r} is invalid: its pooling is fixed by head='so' or "
                             f"'cls' at construction; pass None")
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes else nn.Identity()
        self.so_head = self._so_classifier(num_classes)
        self.head_hidden_size = self._embedding_width()

    def _embed(self, x: Tensor) -> Tensor:
        """Image -> class token + visual tokens with their position encoding, before the blocks."""
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x: Tensor) -> Tensor:
        """Image -> normalised tokens (B, 1 + N, embed_dim), class token first."""
        x = self._embed(x)
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return self.norm(checkpoint_seq(self.blocks, x))
        return self.norm(self.blocks(x))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Block outputs for dense tasks, as timm's ViT: ``indices`` an int takes the last n blocks, a list picks
        blocks (negative from the end), None all. Visual tokens come as (B, C, grid, grid) for NCHW or (B, N, C) for
        NLC; ``return_prefix_tokens`` pairs each with its class token. Returns the intermediates, or (final
        ``forward_features`` output, intermediates)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"So-ViT output_fmt={output_fmt!r} is invalid: expected 'NCHW' or 'NLC'")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        x = self._embed(x)
        intermediates = []
        for i, block in enumerate(blocks):
            x = checkpoint(block, x) if self.grad_checkpointing and torch.is_grad_enabled() else block(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        prefix = [y[:, :1] for y in intermediates]
        intermediates = [y[:, 1:] for y in intermediates]
        if output_fmt == "NCHW":
            grid = self.patch_embed.grid
            intermediates = [y.reshape(y.shape[0], grid, grid, -1).permute(0, 3, 1, 2).contiguous()
                             for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix, strict=True))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop what ``forward_intermediates(indices)`` never reaches (timm's ``features_only`` calls this): the
        blocks after the last one taken, the final norm if asked, the classifiers and the second-order head."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.so_pool = None
            self.reset_classifier(0)
        return take_indices

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens -> logits, or the embedding [class token, vec(SVPN(Q))] for ``pre_logits`` or no classifier."""
        cls = x[:, 0]
        if self.so_pool is None:
            return cls if pre_logits else self.head(cls)
        so = self.head_drop(self.so_pool(x[:, 1:]))
        if pre_logits or self.num_classes == 0:
            return torch.cat([cls, so], dim=1)
        return self.head(cls) + self.so_head(so)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.conv1", "classifier": ("head", "so_head"), "license": "apache-2.0",
        "min_input_size": (3, 32, 32), "paper_ids": "arXiv:2104.10935",
        "paper_name": "So-ViT: Mind Visual Tokens for Vision Transformer",
        "origin_url": "https://github.com/jiangtaoxie/So-ViT",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({f"sovit_{n}": _cfg() for n in (7, 10, 14, 19)})


def _create_sovit(variant: str, pretrained: bool = False, **kwargs: Any) -> SoViT:
    # features_only: the last three blocks through forward_intermediates, as timm builds its ViTs
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(SoViT, variant, pretrained,
                                feature_cfg={"out_indices": out_indices, "feature_cls": "getter"}, **kwargs)


@register_model
def sovit_7(pretrained: bool = False, **kwargs: Any) -> SoViT:
    args = dict(embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0, so_dims=(48, 24))
    return _create_sovit("sovit_7", pretrained, **dict(args, **kwargs))


@register_model
def sovit_10(pretrained: bool = False, **kwargs: Any) -> SoViT:
    args = dict(embed_dim=256, depth=10, num_heads=4, mlp_ratio=2.0, so_dims=(48, 24))
    return _create_sovit("sovit_10", pretrained, **dict(args, **kwargs))


@register_model
def sovit_14(pretrained: bool = False, **kwargs: Any) -> SoViT:
    args = dict(embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0, so_dims=(64, 48), head_drop_rate=0.5)
    return _create_sovit("sovit_14", pretrained, **dict(args, **kwargs))


@register_model
def sovit_19(pretrained: bool = False, **kwargs: Any) -> SoViT:
    args = dict(embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.0, so_dims=(96, 48), head_drop_rate=0.5)
    return _create_sovit("sovit_19", pretrained, **dict(args, **kwargs))
