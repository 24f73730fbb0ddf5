"""MultiTaskModel: one merged backbone, an AdapterBank and every task's head.

Two ways to call it:
- routed: ``model(images, task_ids)`` answers each image for its own task; logits are padded to
  the largest class count with ``-inf`` so one tensor holds every task's answer.
- all-tasks: ``model.forward_all_tasks(images)`` answers every image for every task. Surgery V1
  runs the backbone once and fans out only at the final adapter and heads; SurgeryV2 corrects
  every block, so its forward pass is task-specific from block 0: the batch is expanded to
  (T x B) rows that share one set of weights.

``method="none"`` gives the plain merged model with the same interface (the baseline rows).

``fused=True`` (see :mod:`surgery_edge.surgery.fused`) swaps in the Triton kernels: each block's
correction is fused with the LayerNorm that follows it, and V1's all-tasks final site runs in
one launch. Both paths read the same parameters, so they share one state-dict layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from surgery_edge import kernels  # cheap: the kernel modules load on first use
from surgery_edge.models.encoder import ImageEncoder
from surgery_edge.models.heads import ClassificationHead, normalize_per_task, uniform_normalize
from surgery_edge.surgery.adapters import AdapterBank
from surgery_edge.surgery.functional import TaskGroups


class MultiTaskModel(nn.Module):
    """Merged encoder + per-task adapters + per-task heads.

    Args:
        encoder: the merged backbone (frozen; never modified).
        heads: one head per task, in task-id order.
        tasks: task names, in task-id order.
        bank: the adapters; ``None`` for the plain merged model.
        class_names: per task, for engines and predictions.
    """

    def __init__(
        self,
        encoder: ImageEncoder,
        heads: Sequence[ClassificationHead],
        tasks: Sequence[str],
        bank: AdapterBank | None = None,
        class_names: Sequence[Sequence[str]] | None = None,
    ):
        super().__init__()
        if bank is not None and list(bank.tasks) != list(tasks):
            raise ValueError(f"adapter tasks {bank.tasks} != model tasks {list(tasks)}")
        self.encoder, self.bank, self.tasks = encoder, bank, list(tasks)
        self.class_names = [list(c) for c in class_names] if class_names else None
        counts = [h.num_classes for h in heads]
        c_max, e = max(counts), encoder.arch.embed_dim
        weight = torch.zeros(len(heads), c_max, e)
        bias = torch.full((len(heads), c_max), float("-inf"))
        for t, h in enumerate(heads):
            weight[t, : h.num_classes] = h.weight.detach()
            bias[t, : h.num_classes] = h.bias.detach()
        self.register_buffer("head_weight", weight)  # (T, C_max, e), zero-padded
        self.register_buffer("head_bias", bias)  # (T, C_max), -inf beyond each class count
        self.class_counts = counts
        # each head decides whether it normalises the feature (the reference decides per head);
        # ``normalize`` is True only when every head does (the fused V1 kernel's condition)
        self.uniform_normalize = uniform_normalize(heads)
        self.normalize = self.uniform_normalize is True
        flags = torch.tensor([bool(h.normalize) for h in heads])
        self.register_buffer("head_normalize", flags, persistent=False)  # (T,)
        self.fused = False  # inference only: the kernels have no backward

    @property
    def method(self) -> str:
        return "none" if self.bank is None else self.bank.method

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    # --- representations -------------------------------------------------------------------

    def _correct(
        self, site: str, z: torch.Tensor, task_ids: torch.Tensor | TaskGroups
    ) -> torch.Tensor:
        return z if self.bank is None else self.bank.correct(site, z, task_ids)

    def representations(
        self,
        images: torch.Tensor,  # (B, 3, H, W)
        task_ids: torch.Tensor | TaskGroups,  # (B,), or the batch's runs of one task each
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Corrected final feature (B, e) and every corrected block output's token mean (B, d)."""
        x = self.encoder.embed(images)
        block_means = []
        for i, block in enumerate(self.encoder.blocks):
            x = self._correct(f"block.{i}", block(x), task_ids)
            block_means.append(x.mean(dim=1))
        final = self._correct("final", self.encoder.pool_project(x), task_ids)
        return final, block_means

    def features(self, images: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """Routed final feature (B, e), after every correction."""
        if self.fused:
            return self._fused_features(images, task_ids)
        x = self.encoder.embed(images)
        for i, block in enumerate(self.encoder.blocks):
            x = self._correct(f"block.{i}", block(x), task_ids)
        return self._correct("final", self.encoder.pool_project(x), task_ids)

    # --- heads -----------------------------------------------------------------------------

    def _prep(self, z: torch.Tensor, rows) -> torch.Tensor:
        """``z`` as each row's head takes it; ``rows`` index ``head_normalize`` (read only when
        the heads differ, so a uniform model's graph has no select)."""
        uniform = self.uniform_normalize
        return normalize_per_task(
            z, None if uniform is not None else self.head_normalize[rows], uniform
        )

    def routed_logits(self, z: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """(B, e) features, (B,) task ids -> (B, C_max) logits, -inf beyond each class count."""
        w, b = self.head_weight[task_ids], self.head_bias[task_ids]
        z = self._prep(z, task_ids)
        return torch.einsum("be,bce->bc", z, w) + b

    # --- the two modes ---------------------------------------------------------------------

    def forward(self, images: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """Routed: (B, 3, H, W), (B,) int64 -> (B, C_max) logits."""
        return self.routed_logits(self.features(images, task_ids), task_ids)

    def forward_all_tasks(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Every task for every image: a list of T tensors (B, C_t)."""
        B, T = images.shape[0], self.num_tasks
        if (
            self.fused
            and self.normalize
            and self.bank is not None
            and self.bank.sites == ("final",)
        ):
            down, up = self.bank.weights("final")
            _, logits = kernels.final_site_all_tasks(
                self.encoder(images).contiguous(),
                down,
                up,
                self.head_weight,
                self.head_bias,
            )
            return [logits[t, :, : self.class_counts[t]] for t in range(T)]
        if self.bank is None or self.bank.sites == ("final",):
            z = (
                self.features(images, torch.zeros(B, dtype=torch.long, device=images.device))
                if self.bank is None
                else self.encoder(images)
            )
            zt = (
                z.unsqueeze(0).expand(T, B, -1)
                if self.bank is None
                else self.bank.correct_all_tasks("final", z)
            )  # (T, B, e)
            zt = self._prep(zt, (slice(None), None))
            logits = torch.einsum("tbe,tce->tbc", zt, self.head_weight)
            logits = logits + self.head_bias.unsqueeze(1)
            return [logits[t, :, : self.class_counts[t]] for t in range(T)]
        # expand+reshape, not repeat_interleave: the ONNX exporter gets the latter wrong for a
        # dynamic batch
        task_ids = torch.arange(T, device=images.device)[:, None].expand(T, B).reshape(-1)
        logits = self(images.repeat(T, 1, 1, 1), task_ids).view(T, B, -1)
        return [logits[t, :, : self.class_counts[t]] for t in range(T)]

    def _fused_features(self, images: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """Blocks run on pre-normalised input: the kernel that corrects block i's output also
        computes the LayerNorm that follows it (block i+1's ``ln_1``, or ``ln_post``)."""
        enc = self.encoder
        x = enc.embed(images)
        h = enc.blocks[0].ln_1(x)
        for i in range(len(enc.blocks)):
            x = enc.run_block(i, x, normed=h)
            norm, site = enc.norm_after(i), f"block.{i}"
            if self.bank is not None and self.bank.has(site):
                down, up = self.bank.weights(site)
                x, h = kernels.surgery_correct_layernorm(
                    x.contiguous(), task_ids, down, up, norm.weight, norm.bias, norm.eps
                )
            else:
                h = norm(x)
        return self._correct("final", enc.project(h[:, 0]), task_ids)
