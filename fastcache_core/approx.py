"""Learnable linear approximation of skipped computation: the maps, their ridge fit, save and load.

A reused block (or a static token's whole-stack path) is approximated to first order around the
step ``t_c`` where it was last computed, in its input and in time:

    out(t) ~ out(t_c) + W (in(t) - in(t_c)) + k * b + gamma * k * v,      W = I + M

with ``k`` the number of steps since ``t_c`` and ``v`` the per-token, per-step change of the block's
residual ``r = out - in`` between its last two real computes (a sample's own trajectory: the time
derivative the input term cannot see, since a DiT block's function moves with the timestep). ``M = 0,
b = 0, gamma = 0`` is residual reuse (W = I), ``M = -I`` output reuse (W = 0). ``M``, ``b`` and the
scalar ``gamma`` are fitted per block, per stream and per phase of the schedule by ridge least squares
on (input, output) pairs recorded from real runs, so the fit can only improve on both reuse rules on
the data it sees. Wide models store ``M`` in low rank (``U V``), chosen by reduced-rank regression.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

CALIBRATION_FILENAME = "fastcache_calibration.safetensors"


def phase_of(normalized_time: float, num_phases: int) -> int:
    """Phase index of a step: ``0`` at pure noise (normalized time 1) up to ``num_phases - 1`` at the end."""
    return min(num_phases - 1, max(0, int((1.0 - normalized_time) * num_phases)))


@dataclass
class LinearApproximator:
    """First-order correction ``out_c + delta + delta @ M + gap * bias + gain * gap * velocity`` for one
    stream of one block.

    ``correction``: full ``M`` per phase, shape (P, D, D), or ``None``; ``u``/``v``: low-rank ``M = U V``,
    shapes (P, D, r) and (P, r, D), or ``None``; ``bias``: (P, D) or ``None``; ``velocity_gain``: gamma
    per phase, (P,), or ``None``. All ``None`` is residual reuse.
    """

    correction: torch.Tensor | None = None
    u: torch.Tensor | None = None
    v: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    velocity_gain: torch.Tensor | None = None

    @property
    def is_identity(self) -> bool:
        return self.correction is None and self.u is None and self.bias is None and self.velocity_gain is None

    @property
    def uses_velocity(self) -> bool:
        return self.velocity_gain is not None

    def macs_per_token(self) -> int:
        """Multiply-accumulates per token of one application (the cost of approximating)."""
        if self.correction is not None:
            return int(self.correction.shape[-1] ** 2)
        if self.u is not None:
            return int(2 * self.u.shape[1] * self.u.shape[2])
        return 0

    def to(self, device: torch.device, dtype: torch.dtype) -> "LinearApproximator":
        move = lambda t: None if t is None else t.to(device=device, dtype=dtype)
        return LinearApproximator(move(self.correction), move(self.u), move(self.v), move(self.bias),
                                  move(self.velocity_gain))

    def apply(self, cached_out: torch.Tensor, delta: torch.Tensor, gaps: torch.Tensor, phases: list[int],
              velocity: torch.Tensor | None = None) -> torch.Tensor:
        """Approximate outputs for rows with ``cached_out``/``delta`` of shape (S, n, D).

        ``gaps``: steps since each row's (S,) or each token's (S, n) last real compute;
        ``phases[i]``: row ``i``'s schedule phase; ``velocity``: per-step residual change (S, n, D)
        between the last two computes (used when the map has a velocity gain).
        """
        out = cached_out + delta
        if self.is_identity:
            return out
        phase_index = torch.tensor(phases, device=delta.device)
        if self.correction is not None:
            out = out + torch.bmm(delta, self.correction[phase_index])
        elif self.u is not None:
            out = out + torch.bmm(torch.bmm(delta, self.u[phase_index]), self.v[phase_index])
        gap = gaps.to(delta.dtype)
        gap = gap[:, None, None] if gap.ndim == 1 else gap[..., None]
        if self.bias is not None:
            out = out + gap * self.bias[phase_index][:, None, :]
        if self.velocity_gain is not None and velocity is not None:
            out = out + (self.velocity_gain[phase_index][:, None, None] * gap) * velocity
        return out


@dataclass
class NormalEquations:
    """Streaming sufficient statistics of a ridge regression ``Y ~ [X, gap] A + gamma Z`` (float64).

    ``X`` is the input change ``in(t) - in(t_c)`` per token, ``Y`` the output change beyond residual
    reuse ``out(t) - out(t_c) - (in(t) - in(t_c))`` and ``Z = gap * v`` the residual-velocity term (one
    shared coefficient ``gamma``). Errors of any ``(A, gamma)`` follow exactly from the statistics,
    which is how held-out errors are measured without keeping the data.
    """

    dim: int
    gram: torch.Tensor = field(init=False)
    cross: torch.Tensor = field(init=False)
    velocity_cross: torch.Tensor = field(init=False)  # [X, gap]^T Z
    target_sq: torch.Tensor = field(init=False)
    velocity_sq: torch.Tensor = field(init=False)  # tr(Z^T Z)
    velocity_target: torch.Tensor = field(init=False)  # tr(Z^T Y)
    count: int = 0

    def __post_init__(self) -> None:
        self.gram = torch.zeros(self.dim + 1, self.dim + 1, dtype=torch.float64)
        self.cross = torch.zeros(self.dim + 1, self.dim, dtype=torch.float64)
        self.velocity_cross = torch.zeros(self.dim + 1, self.dim, dtype=torch.float64)
        self.target_sq = torch.zeros((), dtype=torch.float64)
        self.velocity_sq = torch.zeros((), dtype=torch.float64)
        self.velocity_target = torch.zeros((), dtype=torch.float64)

    def add(self, delta_in: torch.Tensor, residual_target: torch.Tensor, gap: float,
            velocity_term: torch.Tensor | None = None) -> None:
        """Add rows of shape (..., D) with step gap ``gap``; ``velocity_term`` is ``gap * v`` (or None: 0)."""
        x = delta_in.reshape(-1, self.dim).double().cpu()
        y = residual_target.reshape(-1, self.dim).double().cpu()
        features = torch.cat([x, torch.full((x.shape[0], 1), float(gap), dtype=torch.float64)], dim=1)
        self.gram += features.T @ features
        self.cross += features.T @ y
        self.target_sq += (y * y).sum()
        if velocity_term is not None:
            z = velocity_term.reshape(-1, self.dim).double().cpu()
            self.velocity_cross += features.T @ z
            self.velocity_sq += (z * z).sum()
            self.velocity_target += (z * y).sum()
        self.count += x.shape[0]

    def error(self, coefficients: torch.Tensor, gain: float = 0.0) -> float:
        """Sum of squared errors of ``Y - [X, gap] @ coefficients - gain * Z`` over all rows added."""
        a = coefficients.double()
        value = (self.target_sq - 2 * (a * self.cross).sum() + (a * (self.gram @ a)).sum()
                 - 2 * gain * self.velocity_target + 2 * gain * (a * self.velocity_cross).sum()
                 + gain * gain * self.velocity_sq)
        return float(value.clamp_min(0.0))

    def solve(self, ridge: float, rank: int | None,
              fixed_gain: float | None = None) -> tuple[torch.Tensor, float, torch.Tensor | None, torch.Tensor | None]:
        """Ridge solution ``(A, gamma)``; with ``rank`` also the reduced-rank factors of A's D x D part.

        Returns ``(coefficients, gamma, u, v)``; ``coefficients`` is already the rank-reduced map when
        ``rank`` is given, so its error is the error of what is stored. ``gamma`` is ``fixed_gain`` when
        given (``A`` then fits what the velocity term leaves), else it comes from the Schur complement
        of the joint problem (0 when no velocity term was seen).
        """
        d = self.dim
        scale = torch.diagonal(self.gram)[:d].mean().clamp_min(1e-12)
        penalty = torch.eye(d + 1, dtype=torch.float64) * ridge * scale
        penalty[d, d] = ridge * self.gram[d, d].clamp_min(1e-12)
        system = self.gram + penalty
        solved_y = torch.linalg.solve(system, self.cross)
        gain = 0.0
        if float(self.velocity_sq) > 0 and fixed_gain is not None:
            gain = float(fixed_gain)
            a = solved_y - gain * torch.linalg.solve(system, self.velocity_cross)
        elif float(self.velocity_sq) > 0:
            solved_z = torch.linalg.solve(system, self.velocity_cross)
            numerator = self.velocity_target - (self.velocity_cross * solved_y).sum()
            denominator = self.velocity_sq - (self.velocity_cross * solved_z).sum()
            gain = float(numerator / (denominator * (1 + ridge)).clamp_min(1e-12))
            a = solved_y - gain * solved_z
        else:
            a = solved_y
        if rank is None or rank >= d:
            return a, gain, None, None
        # reduced-rank regression: project the fitted values onto their top principal directions
        fitted_cov = a[:d].T @ self.gram[:d, :d] @ a[:d]
        _, vecs = torch.linalg.eigh(fitted_cov)
        top = vecs[:, -rank:]  # (D, r)
        u = a[:d] @ top  # (D, r)
        v = top.T  # (r, D)
        reduced = a.clone()
        reduced[:d] = u @ v
        return reduced, gain, u, v


@dataclass
class ApproximatorSet:
    """Every linear map of one model plus the calibration facts stored with them.

    ``maps`` are keyed ``"block{l}.image"``, ``"block{l}.text"`` and ``"stack.image"`` (the static
    tokens' whole-stack path). ``block_scales`` (L, P) scale each block's tolerance by its typical
    per-step input change (mean 1). ``metadata`` holds the phase count, TeaCache's rescaling
    polynomial, the calibrated default ``CacheParams`` and the held-out fit report.
    """

    num_phases: int = 1
    maps: dict[str, LinearApproximator] = field(default_factory=dict)
    block_scales: torch.Tensor | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def fitted(self) -> bool:
        return any(not m.is_identity for m in self.maps.values())

    def get(self, name: str) -> LinearApproximator:
        return self.maps.get(name) or LinearApproximator()

    def block_scale(self, block: int, phase: int) -> float:
        if self.block_scales is None:
            return 1.0
        return float(self.block_scales[block, min(phase, self.block_scales.shape[1] - 1)])

    def to(self, device: torch.device, dtype: torch.dtype) -> "ApproximatorSet":
        maps = {k: m.to(device, dtype) for k, m in self.maps.items()}
        return ApproximatorSet(self.num_phases, maps, self.block_scales, dict(self.metadata))

    def save(self, path: str | Path) -> None:
        """Write the maps and metadata to a safetensors file."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        for name, m in self.maps.items():
            for part in ("correction", "u", "v", "bias", "velocity_gain"):
                value = getattr(m, part)
                if value is not None:
                    tensors[f"{name}.{part}"] = value.detach().float().contiguous().cpu()
        if self.block_scales is not None:
            tensors["block_scales"] = self.block_scales.float().contiguous()
        meta = {"num_phases": str(self.num_phases), "metadata": json.dumps(self.metadata)}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "ApproximatorSet":
        from safetensors import safe_open

        maps: dict[str, LinearApproximator] = {}
        block_scales = None
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            for key in f.keys():
                if key == "block_scales":
                    block_scales = f.get_tensor(key)
                    continue
                name, part = key.rsplit(".", 1)
                setattr(maps.setdefault(name, LinearApproximator()), part, f.get_tensor(key))
        return cls(int(meta.get("num_phases", "1")), maps, block_scales, json.loads(meta.get("metadata", "{}")))


def default_calibration_path(transformer: torch.nn.Module) -> Path | None:
    """Where the calibration of a transformer loaded with ``from_pretrained`` lives, if anywhere."""
    source = getattr(getattr(transformer, "config", None), "_name_or_path", None)
    if not source:
        return None
    path = Path(source) / CALIBRATION_FILENAME
    return path if path.is_file() else None
