"""BERT-small-style encoder (4 layers, hidden 512, 8 heads, sequence 512) classifying on [CLS]."""

from __future__ import annotations

import torch
from torch import nn

VOCAB_SIZE = 30522
SEQ_LEN = 512
HIDDEN = 512
HEADS = 8
LAYERS = 4
FFN = 2048
NUM_CLASSES = 2


class EncoderLayer(nn.Module):
    """Post-LayerNorm transformer block: self-attention and a GELU feed-forward network."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(HIDDEN, HEADS, batch_first=True)
        self.norm1 = nn.LayerNorm(HIDDEN)
        self.ffn_in = nn.Linear(HIDDEN, FFN)
        self.act = nn.GELU()
        self.ffn_out = nn.Linear(FFN, HIDDEN)
        self.norm2 = nn.LayerNorm(HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attn(x, x, x, need_weights=False)
        x = self.norm1(x + attended)
        return self.norm2(x + self.ffn_out(self.act(self.ffn_in(x))))


class BertSmall(nn.Module):
    """Token + learned position embeddings, encoder layers, tanh pooler on [CLS], classifier.

    The position embedding is a root-level parameter, so tracing must attach it to the
    layer that adds it (DESIGN: "a root-level parameter belongs to the stage that uses it").
    """

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB_SIZE, HIDDEN)
        self.positions = nn.Parameter(torch.randn(1, SEQ_LEN, HIDDEN) * 0.02)
        self.norm = nn.LayerNorm(HIDDEN)
        self.layers = nn.ModuleList(EncoderLayer() for _ in range(LAYERS))
        self.pooler = nn.Linear(HIDDEN, HIDDEN)
        self.pool_act = nn.Tanh()
        self.classifier = nn.Linear(HIDDEN, NUM_CLASSES)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq_len = input_ids.size(1)
        x = self.norm(self.tokens(input_ids) + self.positions[:, :seq_len])
        for layer in self.layers:
            x = layer(x)
        return self.classifier(self.pool_act(self.pooler(x[:, 0])))


def build_model() -> nn.Module:
    return BertSmall()


def sample_batch(batch_size: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    ids = torch.randint(0, VOCAB_SIZE, (batch_size, SEQ_LEN))
    return (ids,), torch.randint(0, NUM_CLASSES, (batch_size,))


def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs, targets)
