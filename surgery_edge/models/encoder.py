"""The image encoder: open_clip's VisionTransformer with the seams that surgery needs.

The encoder owns a real ``open_clip.transformer.VisionTransformer`` under ``self.visual``, so its
state-dict keys (``visual.conv1.weight``, ``visual.transformer.resblocks.0.attn.in_proj_weight``,
...) are exactly the image-tower keys of an open_clip CLIP checkpoint. The forward pass is split
into ``embed`` -> ``blocks`` -> ``pool_project`` so a caller can act between blocks (SurgeryV2
corrects every block's output) without copying the blocks' code.
"""

from __future__ import annotations

import torch
from torch import nn

from surgery_edge.models.archs import ArchSpec


def _build_visual(arch: ArchSpec) -> nn.Module:
    from open_clip.transformer import QuickGELU, VisionTransformer

    return VisionTransformer(
        image_size=arch.image_size,
        patch_size=arch.patch_size,
        width=arch.width,
        layers=arch.layers,
        heads=arch.heads,
        mlp_ratio=arch.mlp_ratio,
        output_dim=arch.embed_dim,
        act_layer=QuickGELU if arch.quick_gelu else nn.GELU,
    )


class ImageEncoder(nn.Module):
    """A CLIP ViT image tower; ``forward(images) -> features (B, embed_dim)``."""

    def __init__(self, arch: ArchSpec):
        super().__init__()
        self.arch = arch
        self.visual = _build_visual(arch)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.visual.transformer.resblocks

    def embed(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, N, width)
        v = self.visual
        x = v.conv1(images)
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        return v.ln_pre(x)

    def pool_project(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, N, width) -> (B, embed)
        v = self.visual
        return v.ln_post(tokens[:, 0]) @ v.proj

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, embed)
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        return self.pool_project(x)

    def forward_with_blocks(
        self,
        images: torch.Tensor,  # (B, 3, H, W)
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return the final feature (B, embed) and every block's output (B, N, width)."""
        x = self.embed(images)
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return self.pool_project(x), outputs


def build_encoder(arch: ArchSpec) -> ImageEncoder:
    return ImageEncoder(arch)
