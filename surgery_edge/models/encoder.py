"""The image encoder: open_clip's VisionTransformer with the seams that surgery needs.

The encoder owns a real ``open_clip.transformer.VisionTransformer`` under ``self.visual``, so its
state-dict keys (``visual.conv1.weight``, ``visual.transformer.resblocks.0.attn.in_proj_weight``,
...) are exactly the image-tower keys of an open_clip CLIP checkpoint. The forward pass is split
into ``embed`` -> ``blocks`` -> ``pool_project`` so a caller can act between blocks (SurgeryV2
corrects every block's output) without copying the blocks' code. The fused path, whose kernels
compute each block's output *and* the LayerNorm that follows it, uses three more seams:
``norm_after(i)``, ``run_block(i, x, normed)`` and ``project(normed_cls)``.
"""

from __future__ import annotations

import torch
from torch import nn

from surgery_edge.errors import ConfigError
from surgery_edge.models.archs import ArchSpec


def _build_visual(arch: ArchSpec) -> nn.Module:
    # deferred: importing open_clip takes seconds and loads Triton (`import surgery_edge.models`
    # must stay cheap, e.g. for `surgery-edge --help`)
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


def check_batch_first(visual: nn.Module) -> None:
    """Refuse a tower whose attention is sequence-first.

    surgery-edge runs the blocks on (B, N, width) tensors. open_clip up to 2.25 built
    ``nn.MultiheadAttention`` sequence-first and permuted to (N, B, width) inside its own
    forward: called batch-first, such a block mixes images instead of tokens, every image gets
    the same feature and every result is at chance, without an error.
    """
    for i, block in enumerate(visual.transformer.resblocks):
        attn = getattr(block, "attn", None)
        if isinstance(attn, nn.MultiheadAttention) and not attn.batch_first:
            raise ConfigError(
                f"Block {i} of the image tower runs its attention sequence-first (open_clip "
                "before 2.26 builds it so); surgery-edge feeds blocks batch-first, which would "
                "silently mix images. Upgrade: pip install 'open_clip_torch>=2.26'."
            )


class ImageEncoder(nn.Module):
    """A CLIP ViT image tower; ``forward(images) -> features (B, embed_dim)``."""

    def __init__(self, arch: ArchSpec):
        super().__init__()
        self.arch = arch
        self.visual = _build_visual(arch)
        check_batch_first(self.visual)

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
        return self.project(self.visual.ln_post(tokens[:, 0]))

    def project(self, normed_cls: torch.Tensor) -> torch.Tensor:  # (B, width) -> (B, embed)
        """The class token, already through ``ln_post``, projected to the feature."""
        return normed_cls @ self.visual.proj

    def norm_after(self, i: int) -> nn.LayerNorm:
        """The LayerNorm applied next to block ``i``'s output: block ``i+1``'s ``ln_1``, or
        ``ln_post`` after the last block."""
        blocks = self.blocks
        return blocks[i + 1].ln_1 if i + 1 < len(blocks) else self.visual.ln_post

    def run_block(
        self,
        i: int,
        x: torch.Tensor,  # (B, N, width), the block's input
        normed: torch.Tensor | None = None,  # its ln_1(x), when already computed
    ) -> torch.Tensor:  # (B, N, width)
        """Block ``i`` on ``x``; with ``normed`` the block skips its own ``ln_1``, exactly as
        open_clip's ``ResidualAttentionBlock.forward`` is otherwise."""
        block = self.blocks[i]
        if normed is None:
            return block(x)
        x = x + block.ls_1(block.attention(q_x=normed))
        return x + block.ls_2(block.mlp(block.ln_2(x)))

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
