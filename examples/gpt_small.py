"""GPT-style decoder (4 pre-LN blocks, hidden 256, 4 heads, sequence 64) predicting next tokens."""

from __future__ import annotations

import torch
from torch import nn

VOCAB_SIZE = 512
SEQ_LEN = 64
HIDDEN = 256
HEADS = 4
LAYERS = 4
FFN = 1024


class DecoderBlock(nn.Module):
    """Pre-LayerNorm causal self-attention and a GELU feed-forward network, both residual."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(HIDDEN)
        self.attn = nn.MultiheadAttention(HIDDEN, HEADS, batch_first=True)
        self.norm2 = nn.LayerNorm(HIDDEN)
        self.ffn_in = nn.Linear(HIDDEN, FFN)
        self.act = nn.GELU()
        self.ffn_out = nn.Linear(FFN, HIDDEN)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        attended, _ = self.attn(h, h, h, attn_mask=mask, need_weights=False)
        x = x + attended
        return x + self.ffn_out(self.act(self.ffn_in(self.norm2(x))))


class GPTSmall(nn.Module):
    """Token + learned position embeddings, decoder blocks, final LayerNorm, LM head.

    The causal mask is a buffer (the same for every sample), so only the hidden states
    cross the cuts between blocks; the position embedding is a root-level parameter.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB_SIZE, HIDDEN)
        self.positions = nn.Parameter(torch.randn(1, SEQ_LEN, HIDDEN) * 0.02)
        self.blocks = nn.ModuleList(DecoderBlock() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB_SIZE, bias=False)
        causal = torch.triu(torch.ones(SEQ_LEN, SEQ_LEN, dtype=torch.bool), diagonal=1)
        self.register_buffer("causal_mask", causal)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(input_ids) + self.positions
        for block in self.blocks:
            x = block(x, self.causal_mask)
        return self.lm_head(self.norm(x))


def build_model() -> nn.Module:
    return GPTSmall()


def sample_batch(batch_size: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    tokens = torch.randint(0, VOCAB_SIZE, (batch_size, SEQ_LEN + 1))
    return (tokens[:, :-1],), tokens[:, 1:]


def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs.flatten(0, 1), targets.flatten())
