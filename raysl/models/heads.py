"""Small heads written here because no kept library offers them as-is: the BYOL MLP, the I-JEPA predictor."""

from __future__ import annotations

import torch
import torch.nn as nn


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """BYOL projector / predictor: Linear → BN → ReLU → Linear (paper §3.3)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, out_dim),
    )


class JEPAPredictor(nn.Module):
    """I-JEPA's narrow ViT predictor, built from timm Blocks with fixed 2-D sin-cos positions.

    Input: context tokens (B, K, D_enc) at patch indices ctx_idx (B, K), and target indices tgt_idx
    (B, M, T). For each of the M target blocks the context is joined by T mask tokens carrying the
    targets' positions; the predictor returns those tokens projected back to D_enc: (B, M, T, D_enc).
    """

    def __init__(self, grid: tuple[int, int], enc_dim: int, width: int, depth: int, heads: int) -> None:
        super().__init__()
        from timm.layers import build_sincos2d_pos_embed
        from timm.models.vision_transformer import Block

        self.embed = nn.Linear(enc_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        pos = build_sincos2d_pos_embed(list(grid), dim=width).reshape(grid[0] * grid[1], width)
        self.pos: torch.Tensor
        self.register_buffer("pos", pos, persistent=False)  # (N, width), fixed as in the paper
        self.blocks = nn.Sequential(*[Block(width, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, enc_dim)

    def forward(self, ctx: torch.Tensor, ctx_idx: torch.Tensor, tgt_idx: torch.Tensor) -> torch.Tensor:
        b, m, t = tgt_idx.shape
        x = self.embed(ctx) + self.pos[ctx_idx]  # (B, K, W)
        x = x.repeat_interleave(m, dim=0)  # (B·M, K, W): one copy of the context per target block
        queries = self.mask_token + self.pos[tgt_idx.reshape(b * m, t)]  # (B·M, T, W)
        out = self.blocks(torch.cat([x, queries], dim=1))
        out = self.proj(self.norm(out[:, -t:]))  # (B·M, T, D_enc)
        return out.reshape(b, m, t, -1)
