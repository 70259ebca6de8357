"""Reference methods for comparison, behind one interface: ``apply_peer(transformer, method, **params)``.

* ``none`` - nothing attached (the uncached reference).
* ``fbcache``, ``taylorseer``, ``pab``, ``magcache``, ``seacache`` - diffusers' own hooks (First-Block-Cache,
  TaylorSeer, Pyramid Attention Broadcast, MagCache, SeaCache). ``DiTPipeline`` neither opens a cache
  context nor resets hook state between runs, so without help the hooks silently do nothing or carry state
  from one image into the next. The handle does both: it opens a ``"cond"`` context around every
  transformer forward (with the step index, the run's step count and, given the ``scheduler``, the noise
  level ``sigma``), resets the hooks' state when a new run starts (the timestep goes up again) and tells
  PAB the current timestep.
* ``cachedit`` - cache-dit's DBCache with its TaylorSeer calibrator (optional: PyPI ``cache-dit``, in the
  ``bench`` extra). Attached to the transformer alone; the handle refreshes its cache context at the
  start of every run.

These peers decide per batch, not per sample (MagCache's decisions depend only on the step index, so
its images do not depend on the batch either).

* ``teacache`` and per-sample ``fbcache`` also exist inside FastCache itself (``CacheParams(method=...)``),
  where they decide per sample; use :func:`fastcache_core.apply_fastcache` for those.

MagCache needs magnitude ratios measured on the model: :func:`calibrate_magcache` runs the hook's own
calibration mode on a pipeline and averages the ratios over images; :class:`MagCacheCalibration` keeps
them per (model, steps, guidance) for a benchmark run.

Every handle has ``remove()`` and ``forwards`` (transformer calls seen), like ``FastCache``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

DIFFUSERS_PEERS = ("fbcache", "taylorseer", "pab", "magcache", "seacache")
OPTIONAL_PEERS = ("cachedit",)
CACHEDIT_MISSING = "cache-dit is not installed (pip install -e '.[bench]' or pip install cache-dit)"


class PeerUnavailable(RuntimeError):
    """The peer's package is not installed."""


def peer_unavailable_reason(method: str) -> str | None:
    """Why ``method`` cannot be attached here (a missing optional package), or None when it can."""
    if method == "cachedit":
        try:
            _import_cache_dit()
        except ImportError:
            return CACHEDIT_MISSING
    return None


def _import_cache_dit():
    # cache-dit logs every configuration step, and benign warnings, to *stdout* through its own handler:
    # that would break the benchmark's markdown table (set CACHE_DIT_LOG_LEVEL to see them)
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")
    import cache_dit

    return cache_dit


def dit_raw_vision(module: nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor] | None:
    """SeaCache's ``raw_vision_callback`` for ``DiTTransformer2DModel``: each row of the latent batch
    ``(B, C, H, W)`` as a one-frame video ``(C, 1, H, W)`` (under classifier-free guidance the
    conditional and unconditional rows carry the same latents: duplicates leave the mean distance as is)."""
    hidden_states = kwargs.get("hidden_states", args[0] if args else None)
    if not torch.is_tensor(hidden_states) or hidden_states.ndim != 4:
        return None
    return [latent.unsqueeze(1) for latent in hidden_states]


class PeerHandle:
    """A peer method attached to a transformer."""

    def __init__(self, transformer: nn.Module, method: str, params: dict[str, Any]) -> None:
        self.transformer = transformer
        self.method = method
        params = dict(params)
        self.scheduler = params.pop("scheduler", None)
        self.params = params
        self.forwards = 0
        self.calibration_runs: list[list[float]] = []  # MagCache calibration: the ratios of each run
        self._hooks: list[Any] = []
        self._hook_names: list[str] = []
        self._timestep: float = 1000.0
        self._last_timestep: float | None = None
        self._step = 0
        self._run_steps: int | None = None
        self._mag_config: Any = None
        self._mag_head: Any = None
        self._mag_ratios: torch.Tensor | None = None
        self._cachedit_prior_forward: Any = None
        self._cachedit_attached = False
        if method == "none":
            return
        if method not in DIFFUSERS_PEERS + OPTIONAL_PEERS:
            raise ValueError(f"unknown peer {method!r}; peers: none, {', '.join(DIFFUSERS_PEERS + OPTIONAL_PEERS)}")
        if method == "cachedit":
            self._attach_cachedit(params)
        else:
            self._attach_diffusers_hook(method, params)
        self._hooks.append(transformer.register_forward_pre_hook(self._before, with_kwargs=True))
        self._hooks.append(transformer.register_forward_hook(self._after))

    # ------------------------------------------------------------------------------------------ attaching

    def _attach_diffusers_hook(self, method: str, params: dict[str, Any]) -> None:
        from diffusers.hooks import (
            FirstBlockCacheConfig,
            PyramidAttentionBroadcastConfig,
            TaylorSeerCacheConfig,
            apply_first_block_cache,
            apply_pyramid_attention_broadcast,
            apply_taylorseer_cache,
        )
        from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
        from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK
        from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

        if method == "fbcache":
            apply_first_block_cache(self.transformer, FirstBlockCacheConfig(threshold=params.get("threshold", 0.05)))
            self._hook_names = [_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK]
        elif method == "taylorseer":
            config = TaylorSeerCacheConfig(
                cache_interval=params.get("cache_interval", 3),
                disable_cache_before_step=params.get("disable_cache_before_step", 3),
                max_order=params.get("max_order", 1),
                taylor_factors_dtype=params.get("taylor_factors_dtype", torch.float32),
                # diffusers' default patterns ("...attn") miss DiT/PixArt's "attn1"; predict whole blocks
                cache_identifiers=params.get(
                    "cache_identifiers", [r"^(transformer_blocks|single_transformer_blocks)\.\d+$"]
                ),
            )
            apply_taylorseer_cache(self.transformer, config)
            self._hook_names = [_TAYLORSEER_CACHE_HOOK]
        elif method == "pab":
            skip_range = tuple(params.get("timestep_skip_range", (100, 800)))
            config = PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=params.get("block_skip_range", 2),
                spatial_attention_timestep_skip_range=skip_range,
                spatial_attention_block_identifiers=("transformer_blocks", "single_transformer_blocks"),
                current_timestep_callback=lambda: self._timestep,
            )
            apply_pyramid_attention_broadcast(self.transformer, config)
            self._hook_names = [_PYRAMID_ATTENTION_BROADCAST_HOOK]
        elif method == "magcache":
            self._attach_magcache(params)
        else:
            self._attach_seacache(params)

    def _attach_magcache(self, params: dict[str, Any]) -> None:
        from diffusers.hooks import MagCacheConfig, apply_mag_cache
        from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK, _MAG_CACHE_LEADER_BLOCK_HOOK

        calibrate = bool(params.get("calibrate", False))
        steps = params.get("num_inference_steps")
        if calibrate:
            # the hook clears its ratios (and prints them) once num_inference_steps steps have run; with a
            # bound no run reaches, the ratios stay readable and this handle resets the hook between runs
            steps = 2**31 - 1
        else:
            if params.get("mag_ratios") is None:
                raise ValueError("magcache needs mag_ratios (see calibrate_magcache) or calibrate=True")
            self._mag_ratios = torch.as_tensor(params["mag_ratios"], dtype=torch.float32)
            if steps is None:
                if self.scheduler is None:
                    raise ValueError("magcache needs num_inference_steps or a scheduler to read them from")
                steps = len(self._mag_ratios)  # re-set from the scheduler at the start of every run
        self._mag_config = MagCacheConfig(
            threshold=params.get("threshold", 0.06),
            max_skip_steps=params.get("max_skip_steps", 3),
            retention_ratio=params.get("retention_ratio", 0.2),
            num_inference_steps=int(steps),
            mag_ratios=None if calibrate else self._mag_ratios.clone(),
            calibrate=calibrate,
        )
        apply_mag_cache(self.transformer, self._mag_config)
        self._hook_names = [_MAG_CACHE_LEADER_BLOCK_HOOK, _MAG_CACHE_BLOCK_HOOK]
        self._mag_head = self._find_hook(_MAG_CACHE_LEADER_BLOCK_HOOK)  # holds the state shared by its hooks

    def _attach_seacache(self, params: dict[str, Any]) -> None:
        from diffusers.hooks import SeaCacheConfig, apply_sea_cache
        from diffusers.hooks.sea_cache import (
            _SEA_CACHE_BLOCK_HOOK,
            _SEA_CACHE_LEADER_BLOCK_HOOK,
            _SEA_CACHE_ROOT_HOOK,
        )

        if getattr(self.scheduler, "alphas_cumprod", None) is None:
            raise ValueError("seacache needs the pipeline's scheduler (with alphas_cumprod) to give the hook sigma")
        config = SeaCacheConfig(
            threshold=params.get("threshold", 0.25),
            residual_order=params.get("residual_order", 1),
            retention_steps=params.get("retention_steps", 1),
            cache_end_steps=params.get("cache_end_steps", 1),
            max_consecutive_cached=params.get("max_consecutive_cached", 2),
            power_exp=params.get("power_exp", 3.0),
            raw_vision_callback=params.get("raw_vision_callback", dit_raw_vision),
        )
        apply_sea_cache(self.transformer, config)
        self._hook_names = [_SEA_CACHE_ROOT_HOOK, _SEA_CACHE_LEADER_BLOCK_HOOK, _SEA_CACHE_BLOCK_HOOK]

    def _cachedit_configs(self, steps: int | None) -> tuple[Any, Any]:
        from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig

        p = self.params
        cache_config = DBCacheConfig(
            Fn_compute_blocks=p.get("fn_compute_blocks", 1),
            Bn_compute_blocks=p.get("bn_compute_blocks", 0),
            residual_diff_threshold=p.get("threshold", 0.08),
            max_warmup_steps=p.get("max_warmup_steps", 8),
            max_continuous_cached_steps=p.get("max_continuous_cached_steps", -1),
            num_inference_steps=steps,
            enable_separate_cfg=False,  # DiTPipeline runs both guidance branches in one batched call
        )
        calibrator = TaylorSeerCalibratorConfig(taylorseer_order=p.get("taylorseer_order", 1))
        return cache_config, calibrator

    def _attach_cachedit(self, params: dict[str, Any]) -> None:
        try:
            cache_dit = _import_cache_dit()
        except ImportError as error:
            raise PeerUnavailable(CACHEDIT_MISSING) from error
        # cache-dit replaces transformer.forward (its DiT patch functor, then its block wrapper) and its
        # disable_cache leaves the patched forward behind: remember what was there to restore it exactly
        self._cachedit_prior_forward = self.transformer.__dict__.get("forward")
        cache_config, calibrator = self._cachedit_configs(params.get("num_inference_steps"))
        cache_dit.enable_cache(self.transformer, cache_config=cache_config, calibrator_config=calibrator)
        self._cachedit_attached = True
        self._break_cachedit_module_cycle()

    def _break_cachedit_module_cycle(self) -> None:
        """cache-dit's block wrapper keeps the transformer as a *registered submodule* and is itself swapped
        in as ``transformer.transformer_blocks[0]`` during a forward: a module cycle, on which
        ``torch.utils.flop_counter.FlopCounterMode`` (its module tracker) recurses without end. The
        wrapper only reads the attribute (a parallelism check), so it stays a plain attribute here."""
        seen: set[int] = set()
        pending: list[Any] = [self.transformer.forward]
        while pending:
            item = pending.pop()
            if id(item) in seen:
                continue
            seen.add(id(item))
            if isinstance(item, nn.Module):
                for sub in item.modules():
                    if sub._modules.get("transformer") is self.transformer:
                        del sub._modules["transformer"]
                        object.__setattr__(sub, "transformer", self.transformer)
            elif isinstance(item, dict):
                pending.extend(item.values())
            elif isinstance(item, (list, tuple)):
                pending.extend(item)
            elif callable(item):  # functools.partial, bound methods, closures of the installed forward
                pending.extend(getattr(item, attr) for attr in ("func", "__func__") if hasattr(item, attr))
                for cell in getattr(item, "__closure__", None) or ():
                    with contextlib.suppress(ValueError):  # an empty cell
                        pending.append(cell.cell_contents)

    # ------------------------------------------------------------------------------------------ running

    def _registry(self) -> Any:
        from diffusers.hooks import HookRegistry

        return HookRegistry.check_if_exists_or_initialize(self.transformer)

    def _find_hook(self, name: str) -> Any:
        for module in self.transformer.modules():
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and registry.get_hook(name) is not None:
                return registry.get_hook(name)
        return None

    def _steps_of_run(self) -> int | None:
        steps = getattr(self.scheduler, "num_inference_steps", None)
        return int(steps) if steps else self.params.get("num_inference_steps")

    def _start_run(self) -> None:
        """A new denoising run: fresh hook state, step count from the scheduler."""
        self._run_steps = self._steps_of_run()
        if self._hook_names:
            self._registry().reset_stateful_hooks(recurse=True)
        if self._mag_config is not None:
            if self._mag_config.calibrate:
                self.calibration_runs.append([])
            elif self._run_steps and self._run_steps != self._mag_config.num_inference_steps:
                # the hook indexes mag_ratios by step and resets after num_inference_steps steps: both
                # must follow the run (diffusers' own nearest-neighbour resampling of the ratios)
                from diffusers.hooks.mag_cache import nearest_interp

                self._mag_config.num_inference_steps = self._run_steps
                self._mag_config.mag_ratios = nearest_interp(self._mag_ratios, self._run_steps)
        if self._cachedit_attached:
            import cache_dit

            cache_config, calibrator = self._cachedit_configs(self._run_steps)
            cache_dit.refresh_context(
                self.transformer, cache_config=cache_config, calibrator_config=copy.deepcopy(calibrator)
            )

    def _sigma(self, timestep: float) -> float | None:
        """The flow-matching noise level with the same signal-to-noise ratio as the scheduler at ``timestep``.

        SeaCache's filter assumes ``x_t = (1 - sigma) x_0 + sigma eps``; a DDPM/DDIM latent is
        ``sqrt(ab) x_0 + sqrt(1 - ab) eps``, which divided by ``sqrt(ab) + sqrt(1 - ab)`` is exactly that
        form with ``sigma = sqrt(1 - ab) / (sqrt(ab) + sqrt(1 - ab))`` (the filter is normalised to unit
        mean gain, so the common scale drops out).
        """
        alphas = getattr(self.scheduler, "alphas_cumprod", None)
        if alphas is None:
            return None
        index = min(max(int(round(timestep)), 0), len(alphas) - 1)
        alpha_bar = float(alphas[index])
        signal, noise = math.sqrt(alpha_bar), math.sqrt(max(0.0, 1.0 - alpha_bar))
        return noise / (signal + noise)

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        t = float(timestep.reshape(-1)[0]) if torch.is_tensor(timestep) else float(timestep or 0.0)
        new_run = self._last_timestep is None or t >= self._last_timestep
        if new_run:
            self._start_run()
        self._step = 0 if new_run else self._step + 1
        self._last_timestep = t
        self._timestep = t
        self.forwards += 1
        if self._hook_names:
            _set_cache_context(
                self.transformer,
                CacheContext(
                    "cond", step_index=self._step, num_inference_steps=self._run_steps, timestep=t, sigma=self._sigma(t)
                ),
            )

    def _after(self, module: nn.Module, args: tuple, output: Any) -> None:
        from diffusers.hooks.hooks import _set_cache_context

        if self._mag_config is not None and self._mag_config.calibrate and self.calibration_runs:
            state = self._mag_head.state_manager.get_state()
            self.calibration_runs[-1] = list(state.calibration_ratios)
        if self._hook_names:
            _set_cache_context(self.transformer, None)

    def reset(self) -> None:
        """Forget hook state (the next forward also resets it when the timestep goes up)."""
        if self._hook_names:
            self._registry().reset_stateful_hooks(recurse=True)
        self._last_timestep = None

    def remove(self) -> None:
        """Detach the peer's hooks and this handle's own hooks."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self._hook_names:
            registry = self._registry()
            for name in self._hook_names:
                registry.remove_hook(name, recurse=True)
            registry.invalidate_child_registries_cache()
            self._hook_names = []
        if self._cachedit_attached:
            import cache_dit

            cache_dit.disable_cache(self.transformer)
            self.transformer.__dict__.pop("forward", None)
            if self._cachedit_prior_forward is not None:
                self.transformer.forward = self._cachedit_prior_forward
            self.transformer._modules.pop("_norm1_emb", None)  # the DiT patch functor's alias of a submodule
            self.transformer.__dict__.pop("_is_patched", None)
            self._cachedit_attached = False


def apply_peer(transformer: nn.Module, method: str, **params: Any) -> PeerHandle:
    """Attach a reference method to ``transformer``; ``handle.remove()`` restores it.

    ``fbcache``: ``threshold``. ``taylorseer``: ``cache_interval``, ``disable_cache_before_step``,
    ``max_order``. ``pab``: ``block_skip_range``, ``timestep_skip_range`` (timesteps where attention is
    broadcast). ``magcache``: ``mag_ratios`` (from :func:`calibrate_magcache`) or ``calibrate=True``,
    ``threshold``, ``max_skip_steps``, ``retention_ratio``, ``num_inference_steps`` (else the
    ``scheduler``'s, read at every run). ``seacache``: ``scheduler`` (required: the noise level comes from
    its ``alphas_cumprod``), ``threshold``, ``residual_order`` (0 reuse, 1 linear extrapolation),
    ``retention_steps``, ``cache_end_steps``, ``max_consecutive_cached``, ``power_exp``. ``cachedit``:
    ``threshold`` (DBCache residual difference), ``fn_compute_blocks``, ``bn_compute_blocks``,
    ``max_warmup_steps``, ``max_continuous_cached_steps``, ``taylorseer_order``; raises
    :class:`PeerUnavailable` without cache-dit. Any peer takes ``scheduler`` for the step count.
    """
    return PeerHandle(transformer, method, params)


# ---------------------------------------------------------------------------------------------- MagCache


@torch.no_grad()
def calibrate_magcache(
    pipe: Any, *, num_inference_steps: int, guidance_scale: float, labels: Sequence[int], seeds: Sequence[int]
) -> list[float]:
    """MagCache's magnitude ratios for ``pipe``'s transformer, the way MagCache calibrates: one run per
    image with the hook in calibration mode (nothing skipped), ratio at step i = mean over tokens of
    ``||r_i|| / ||r_(i-1)||`` with ``r`` the residual of the whole block stack (1.0 at step 0), then the
    mean over the images. One ratio per step: DiTPipeline makes one transformer call per step, the two
    guidance branches in one doubled batch."""
    handle = apply_peer(pipe.transformer, "magcache", calibrate=True)
    try:
        for label, seed in zip(labels, seeds, strict=True):
            pipe(
                class_labels=[label],
                guidance_scale=guidance_scale,
                num_inference_steps=num_inference_steps,
                generator=torch.Generator().manual_seed(seed),
                output_type="pt",
            )
    finally:
        handle.remove()
    runs = handle.calibration_runs
    if len(runs) != len(labels) or any(len(run) != num_inference_steps for run in runs):
        raise RuntimeError(
            f"MagCache calibration expected {len(labels)} runs of {num_inference_steps} ratios, "
            f"got {[len(run) for run in runs]}"
        )
    return torch.tensor(runs, dtype=torch.float64).mean(dim=0).tolist()


class MagCacheCalibration:
    """MagCache ratios for one pipeline, calibrated on first use per (model, steps, guidance) and kept.

    ``seeds`` should not be the benchmark's own seeds: the ratios are then a property of the model, not
    of the images they are judged on.
    """

    def __init__(self, pipe: Any, model: str, labels: Sequence[int], seeds: Sequence[int]) -> None:
        self.pipe = pipe
        self.model = model
        self.labels = list(labels)
        self.seeds = list(seeds)
        self._ratios: dict[tuple[str, int, float], list[float]] = {}

    def ratios(self, num_inference_steps: int, guidance_scale: float) -> list[float]:
        key = (self.model, int(num_inference_steps), float(guidance_scale))
        if key not in self._ratios:
            self._ratios[key] = calibrate_magcache(
                self.pipe,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                labels=self.labels,
                seeds=self.seeds,
            )
        return self._ratios[key]
