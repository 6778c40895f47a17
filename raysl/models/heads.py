"""Heads: the BYOL MLP and the I-JEPA predictor (timm Blocks), written here because no kept library offers
them as-is; and CLIP's text tower, a thin wrapper over open_clip's TextTransformer."""

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


# CLIP's text tower: open_clip's causal TextTransformer over BPE ids, pooled at the end-of-text token
# (its id, 49407, is the largest, so "argmax" pooling finds it); a linear projection to the shared space.
VOCAB_SIZE = 49408  # open_clip's BPE vocabulary (see raysl.data.tokenizer)


class TextTower(nn.Module):
    def __init__(self, context_length: int, width: int, heads: int, layers: int, embed_dim: int) -> None:
        super().__init__()
        from open_clip.transformer import TextTransformer

        if width % heads:
            raise ValueError(f"method.text_width ({width}) must be a multiple of method.text_heads ({heads})")
        self.context_length = context_length
        self.net = TextTransformer(context_length=context_length, vocab_size=VOCAB_SIZE, width=width, heads=heads,
                                   layers=layers, output_dim=embed_dim, pool_type="argmax")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids → (B, embed_dim)."""
        out: torch.Tensor = self.net(tokens)
        return out
