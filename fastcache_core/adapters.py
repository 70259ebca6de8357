"""One small adapter per diffusers transformer family: where the blocks are, how a block is called,
what it returns, which tokens are text, and how timesteps and positions are read.

Supported: ``DiTTransformer2DModel``, ``PixArtTransformer2DModel``, ``SD3Transformer2DModel`` and
``FluxTransformer2DModel`` (its double-stream blocks followed by its single-stream blocks).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch
from torch import nn

Streams = tuple[torch.Tensor, torch.Tensor | None]
"""A block's transformed state: (image tokens (B, N, D), text tokens (B, M, D) or None)."""


def submodule(parent: nn.Module, name: str) -> nn.Module:
    """``parent.<name>`` as a module (``nn.Module.__getattr__`` is typed as tensor-or-module)."""
    child = getattr(parent, name)
    if not isinstance(child, nn.Module):
        raise TypeError(f"{type(parent).__name__}.{name} is not a module")
    return child


@lru_cache(maxsize=64)
def _signature_of(function: Callable[..., Any]) -> inspect.Signature:
    return inspect.signature(function)


def _signature(forward: Callable[..., Any]) -> inspect.Signature:
    # bound methods of different blocks share one function: cache by it
    function = getattr(forward, "__func__", None)
    if function is None:
        return inspect.signature(forward)
    return _signature_of(function).replace(parameters=list(_signature_of(function).parameters.values())[1:])


class TransformerAdapter:
    """How FastCache drives the blocks of one transformer family.

    Attributes:
        family: short name used in stats and logs.
        text_stream: name of the block argument holding text tokens that the blocks transform
            (joint-attention models), or ``None`` when text only enters as cross-attention context.
        batched_kwargs: block arguments whose first dimension is the batch (sliced per sample).
        rotary_kwarg: block argument holding per-token rotary embeddings (not batched), or ``None``.
        unsupported_forward_kwargs: transformer arguments that change the block loop (ControlNet
            residuals, skipped layers); when one is set the forward runs uncached.
    """

    family = "generic"
    text_stream: str | None = None
    batched_kwargs: tuple[str, ...] = ()
    rotary_kwarg: str | None = None
    unsupported_forward_kwargs: tuple[str, ...] = ()
    timestep_scale = 1000.0
    output_projection_name = "proj_out"
    plain_cond_branch = 0
    """Which half of a plain pipeline call's guided batch is the conditional one (diffusers' DiT puts
    it first; PixArt and SD3 put the unconditional half first)."""

    def blocks(self, transformer: nn.Module) -> list[nn.Module]:
        return list(submodule(transformer, "transformer_blocks").children())

    def normalized_time(self, timestep: torch.Tensor) -> torch.Tensor:
        """Noise level of each row in [0, 1] (1 = pure noise) from the transformer's ``timestep``, as a
        float32 tensor on the timestep's device (no host round trip)."""
        return (timestep.reshape(-1).float() / self.timestep_scale).clamp(0.0, 1.0)

    def output_projection(self, transformer: nn.Module) -> torch.Tensor | None:
        """Weight of the model's last linear layer (stack output -> predicted noise patches): forecast
        errors are measured through it, in the space the sampler integrates. ``None`` if absent."""
        layer = getattr(transformer, self.output_projection_name, None)
        return layer.weight if isinstance(layer, nn.Linear) else None

    def bind_call(self, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Turn a block call's arguments into one keyword dictionary."""
        if not args:
            return dict(kwargs)
        return dict(_signature(forward).bind(*args, **kwargs).arguments)

    def split_streams(self, call: dict[str, Any]) -> Streams:
        text = call.get(self.text_stream) if self.text_stream else None
        return call["hidden_states"], text

    def output_to_streams(self, output: Any) -> Streams:
        return output, None

    def streams_to_output(self, image: torch.Tensor, text: torch.Tensor | None) -> Any:
        return image

    def call_block(
        self,
        forward: Callable[..., Any],
        call: dict[str, Any],
        rows: torch.Tensor | None,
        image: torch.Tensor,
        text: torch.Tensor | None,
        positions: torch.Tensor | None,
    ) -> Streams:
        """Run one block on a subset of rows (``rows``; ``None`` = all) and tokens (``positions``)."""
        kwargs = self.select_rows(call, rows)
        kwargs["hidden_states"] = image
        if self.text_stream:
            kwargs[self.text_stream] = text
        if positions is not None and self.rotary_kwarg and kwargs.get(self.rotary_kwarg) is not None:
            kwargs[self.rotary_kwarg] = self.select_rotary(kwargs[self.rotary_kwarg], text, positions)
        return self.output_to_streams(forward(**kwargs))

    def select_rows(self, call: dict[str, Any], rows: torch.Tensor | None) -> dict[str, Any]:
        """A copy of a block call's arguments with the batched ones restricted to ``rows``."""
        kwargs = dict(call)
        if rows is not None:
            for name in self.batched_kwargs:
                value = kwargs.get(name)
                if isinstance(value, torch.Tensor) and value.ndim > 0:
                    kwargs[name] = value.index_select(0, rows)
        return kwargs

    def select_rotary(self, rotary: Any, text: torch.Tensor | None, positions: torch.Tensor) -> Any:
        raise NotImplementedError

    @property
    def needs_shared_positions(self) -> bool:
        """Whether rows computed together must use identical token positions (rotary tables are unbatched)."""
        return self.rotary_kwarg is not None

    def self_attention(self, block: nn.Module) -> nn.Module | None:
        """The block's image self-attention, where a token refresh keeps the other tokens' keys and values
        (``kv_context.py``); ``None`` when the family has no processor for it (token refresh then forecasts)."""
        return None

    def modulated_input(self, block: nn.Module, call: dict[str, Any], image: torch.Tensor) -> torch.Tensor:
        """The first block's timestep-modulated input (TeaCache's change indicator); ``call`` holds
        the batched arguments of the same rows as ``image``."""
        raise NotImplementedError


class DiTAdapter(TransformerAdapter):
    family = "dit"
    batched_kwargs = ("timestep", "class_labels")
    output_projection_name = "proj_out_2"

    def self_attention(self, block: nn.Module) -> nn.Module | None:
        return submodule(block, "attn1")

    def modulated_input(self, block: nn.Module, call: dict[str, Any], image: torch.Tensor) -> torch.Tensor:
        modulated: torch.Tensor = submodule(block, "norm1")(
            image, call["timestep"], call["class_labels"], hidden_dtype=image.dtype
        )[0]
        return modulated


class PixArtAdapter(TransformerAdapter):
    plain_cond_branch = 1
    family = "pixart"
    batched_kwargs = ("timestep", "encoder_hidden_states", "encoder_attention_mask", "attention_mask")

    def self_attention(self, block: nn.Module) -> nn.Module | None:
        return submodule(block, "attn1")

    def modulated_input(self, block: nn.Module, call: dict[str, Any], image: torch.Tensor) -> torch.Tensor:
        timestep: torch.Tensor = call["timestep"]
        table = block.get_parameter("scale_shift_table")
        shift, scale = (table[None] + timestep.reshape(image.shape[0], 6, -1)).chunk(6, dim=1)[:2]
        normed: torch.Tensor = submodule(block, "norm1")(image)
        return normed * (1 + scale) + shift


class _JointAdapter(TransformerAdapter):
    """Joint-attention blocks that transform both streams and return ``(text, image)``."""

    text_stream = "encoder_hidden_states"
    batched_kwargs = ("temb",)

    def output_to_streams(self, output: Any) -> Streams:
        text, image = output
        return image, text

    def streams_to_output(self, image: torch.Tensor, text: torch.Tensor | None) -> Any:
        return text, image

    def modulated_input(self, block: nn.Module, call: dict[str, Any], image: torch.Tensor) -> torch.Tensor:
        modulated: torch.Tensor = submodule(block, "norm1")(image, emb=call["temb"])[0]
        return modulated


class SD3Adapter(_JointAdapter):
    plain_cond_branch = 1
    family = "sd3"
    unsupported_forward_kwargs = ("block_controlnet_hidden_states", "skip_layers")


class FluxAdapter(_JointAdapter):
    family = "flux"
    rotary_kwarg = "image_rotary_emb"
    unsupported_forward_kwargs = ("controlnet_block_samples", "controlnet_single_block_samples")
    timestep_scale = 1.0  # Flux pipelines pass sigma in [0, 1]; the model multiplies by 1000 itself

    def blocks(self, transformer: nn.Module) -> list[nn.Module]:
        return [
            *submodule(transformer, "transformer_blocks").children(),
            *submodule(transformer, "single_transformer_blocks").children(),
        ]

    def select_rotary(self, rotary: Any, text: torch.Tensor | None, positions: torch.Tensor) -> Any:
        # rotary tables cover [text; image] tokens; keep text rows and the computed image rows, in order
        text_len = 0 if text is None else text.shape[1]
        if positions.ndim == 2:
            if positions.shape[0] != 1 and not bool((positions == positions[:1]).all()):
                raise ValueError("Flux rows computed together must share token positions")
            positions = positions[0]
        index = torch.cat([torch.arange(text_len, device=positions.device), positions + text_len])
        return tuple(r.index_select(0, index) for r in rotary)


ADAPTERS: dict[str, type[TransformerAdapter]] = {
    "DiTTransformer2DModel": DiTAdapter,
    "PixArtTransformer2DModel": PixArtAdapter,
    "SD3Transformer2DModel": SD3Adapter,
    "FluxTransformer2DModel": FluxAdapter,
}


def adapter_for(transformer: nn.Module) -> TransformerAdapter:
    """The adapter of a transformer's family; ``TypeError`` for an unsupported class."""
    for cls in type(transformer).__mro__:
        if cls.__name__ in ADAPTERS:
            return ADAPTERS[cls.__name__]()
    raise TypeError(f"FastCache supports {', '.join(ADAPTERS)}; got {type(transformer).__name__}")
