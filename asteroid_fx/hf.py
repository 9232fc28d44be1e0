"""Hugging Face transformers while capturing: caches off, attention masks without vmap."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

__all__: list[str] = []

log = logging.getLogger(__name__)

# [Note: Hugging Face models under torch.export]
# Two things in transformers 4.4x-4.57 keep a captured graph from running as stage code:
#
# * key/value caches. Decoders return a ``DynamicCache`` (``past_key_values``) when
#   ``config.use_cache`` is on, an object that is neither a tensor nor a container of
#   them. Training never reads it, so ``use_cache`` is turned off on every config of the
#   model while capturing (as ``transformers.utils.fx`` does): the stages return the
#   model's other outputs.
# * attention masks built with ``torch.vmap`` (``masking_utils.sdpa_mask``, which the
#   sdpa and eager masks of Llama, GPT-2, Mistral ... use). vmap shows up in the graph as
#   functorch calls a stage cannot run, so while capturing, ``sdpa_mask`` evaluates the
#   same mask function on broadcast index tensors instead; the mask functions are
#   elementwise expressions of (batch, head, query, key) indices, so the boolean mask is
#   the same, element for element.
#
# Both are undone when the capture ends; the model itself is not changed.


@contextlib.contextmanager
def capture_context(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model`` is captured as [Note: Hugging Face models under
    torch.export] says; everything is restored afterwards."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(_caches_off(model))
        stack.enter_context(_broadcast_masks())
        yield


@contextlib.contextmanager
def _caches_off(model: nn.Module) -> Iterator[None]:
    configs: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "use_cache", None) is True:
            configs[id(config)] = config
    for config in configs.values():
        config.use_cache = False
    try:
        yield
    finally:
        for config in configs.values():
            config.use_cache = True


@contextlib.contextmanager
def _broadcast_masks() -> Iterator[None]:
    try:
        from transformers import masking_utils
    except ImportError:  # pragma: no cover - older transformers build masks without vmap
        yield
        return
    original = getattr(masking_utils, "sdpa_mask", None)
    interface = getattr(masking_utils, "ALL_MASK_ATTENTION_FUNCTIONS", None)
    mapping = getattr(interface, "_global_mapping", None)
    if original is None:  # pragma: no cover - older transformers
        yield
        return
    replacement = _make_sdpa_mask(masking_utils)
    saved = dict(mapping) if isinstance(mapping, dict) else None
    masking_utils.sdpa_mask = replacement  # eager_mask calls it by this name
    if isinstance(mapping, dict):
        for key, value in list(mapping.items()):
            if value is original:
                mapping[key] = replacement
    try:
        yield
    finally:
        masking_utils.sdpa_mask = original
        if isinstance(mapping, dict) and saved is not None:
            mapping.clear()
            mapping.update(saved)


def _make_sdpa_mask(masking_utils: Any) -> Callable[..., Any]:
    """``masking_utils.sdpa_mask`` evaluated by broadcasting instead of ``torch.vmap``."""

    def sdpa_mask(
        batch_size: int,
        cache_position: torch.Tensor,
        kv_length: int,
        kv_offset: int = 0,
        mask_function: Callable[..., Any] = masking_utils.causal_mask_function,
        attention_mask: torch.Tensor | None = None,
        local_size: int | None = None,
        allow_is_causal_skip: bool = True,
        **kwargs: Any,
    ) -> torch.Tensor | None:
        q_length = cache_position.shape[0]
        padding_mask = masking_utils.prepare_padding_mask(attention_mask, kv_length, kv_offset,
                                                          _slice=False)
        if allow_is_causal_skip and masking_utils._ignore_causal_mask_sdpa(
                padding_mask, q_length, kv_length, kv_offset, local_size):
            return None
        kv_arange = torch.arange(kv_length, device=cache_position.device) + kv_offset
        if padding_mask is not None:
            mask_function = masking_utils.and_masks(
                mask_function, masking_utils.padding_mask_function(padding_mask))
        device = cache_position.device
        batch_idx = torch.arange(batch_size, device=device).view(-1, 1, 1, 1)
        head_idx = torch.arange(1, device=device).view(1, -1, 1, 1)
        q_idx = cache_position.view(1, 1, -1, 1)
        kv_idx = kv_arange.view(1, 1, 1, -1)
        mask = mask_function(batch_idx, head_idx, q_idx, kv_idx)
        return mask.expand(batch_size, 1, q_length, kv_length).contiguous()

    return sdpa_mask
