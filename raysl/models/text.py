"""CLIP's text tower: open_clip's causal TextTransformer over BPE ids, pooled at the end-of-text token.

The end-of-text id (49407) is the largest id in the vocabulary, so "argmax" pooling picks its position
in each caption; a linear projection maps the pooled width to the shared embedding size.
"""

from __future__ import annotations

import torch
import torch.nn as nn

VOCAB_SIZE = 49408  # open_clip's BPE vocabulary (see raysl.data.text)


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
