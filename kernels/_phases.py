"""Polyphase plan: turns up-sample -> pad -> correlate -> down-sample into stride-1 taps.

One dimension of every resampling op here is

    out[m] = sum_k v[m * down + k] * g[k],    v = pad(zero_insert(x, up), pad0, pad1),

with `g` the correlation taps. Writing m = up * i + q (output phase q) and reading x through its
`down` input phases x_r[j] = x[down * j + r], every term becomes x_r[i + o] * g[k] for static
(k, r, o). The kernels therefore only need stride-1 shifted loads and multiply-adds: no zero is
inserted, no sample is read and thrown away, and the same plan drives the FIR filter (scalar taps)
and the convolution (matrix taps). Everything here is static Python run at trace time.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from ._args import output_size


@dataclasses.dataclass(frozen=True)
class Plan1D:
    """The taps of one dimension. `taps[q]` lists (k, r, o) with o >= 0 (the input is pre-padded)."""

    up: int
    down: int
    out_size: int  # true output length
    out_per_phase: int  # ceil(out_size / up): rows computed for every output phase
    lead: int  # input phase samples of zero padding placed before x
    taps: tuple[tuple[tuple[int, int, int], ...], ...]
    halo: int  # max offset o: extra input rows a tile of outputs reads

    def input_length(self, rows: int) -> int:
        """Phase length needed to compute `rows` outputs per phase."""
        return rows + self.halo


def plan_1d(in_size: int, up: int, down: int, pad0: int, pad1: int, num_taps: int, name: str) -> Plan1D:
    out_size = output_size(in_size, up, down, pad0, pad1, num_taps, name)
    out_per_phase = -(-out_size // up)
    raw = []
    for q in range(up):
        phase = []
        for k in range(num_taps):
            t = q * down + k - pad0  # position in the zero-inserted signal, relative to x
            if t % up:
                continue  # lands on an inserted zero
            e = t // up  # x index offset: s = down * i + e
            phase.append((k, e % down, e // down))
        raw.append(phase)
    offsets = [o for phase in raw for (_, _, o) in phase]
    lead = max(0, -min(offsets)) if offsets else 0
    taps = tuple(tuple((k, r, o + lead) for (k, r, o) in phase) for phase in raw)
    halo = max((o for phase in taps for (_, _, o) in phase), default=0)
    return Plan1D(up, down, out_size, out_per_phase, lead, taps, halo)


def split_phases(x: jax.Array, plan_y: Plan1D, plan_x: Plan1D, rows: int, cols: int) -> jax.Array:
    """[N, H, W, C] -> [N, Dy*Dx, Jy, Jx, C]: zero-padded input phases, long enough for `rows` x `cols`.

    Phase index r = ry * Dx + rx holds x[Dy * j + ry - Dy * lead_y, Dx * i + rx - Dx * lead_x].
    """
    n, h, w, c = x.shape
    jy, jx = plan_y.input_length(rows), plan_x.input_length(cols)
    dy, dx = plan_y.down, plan_x.down
    y0, x0 = dy * plan_y.lead, dx * plan_x.lead
    # lax.pad crops on negative widths, so one call both pads and trims to the exact length.
    x = jax.lax.pad(x, jnp.zeros((), x.dtype),
                    [(0, 0, 0), (y0, dy * jy - h - y0, 0), (x0, dx * jx - w - x0, 0), (0, 0, 0)])
    if dy == 1 and dx == 1:
        return x[:, None]
    x = x.reshape(n, jy, dy, jx, dx, c).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(n, dy * dx, jy, jx, c)


def merge_phases(y: jax.Array, plan_y: Plan1D, plan_x: Plan1D) -> jax.Array:
    """[N, My, Uy, Mx, Ux, C] (padded tiles allowed) -> [N, out_y, out_x, C]. The reshape is free."""
    n, my, uy, mx, ux, c = y.shape
    y = y.reshape(n, my * uy, mx * ux, c)
    return y[:, : plan_y.out_size, : plan_x.out_size]


def round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def tap_table(plan_y: Plan1D, plan_x: Plan1D) -> list[tuple[int, int, list[tuple[int, int, int, int, int]]]]:
    """Per output phase (qy, qx): the 2-D taps (ky, kx, r, oy, ox)."""
    table = []
    for qy in range(plan_y.up):
        for qx in range(plan_x.up):
            taps = [(ky, kx, ry * plan_x.down + rx, oy, ox)
                    for (ky, ry, oy) in plan_y.taps[qy] for (kx, rx, ox) in plan_x.taps[qx]]
            table.append((qy, qx, taps))
    return table


def transpose_padding(in_size: int, out_size: int, up: int, down: int, pad0: int, taps: int) -> tuple[int, int]:
    """Padding of the transposed op (up <-> down, filter flipped) that maps the output grid back onto x."""
    return taps - pad0 - 1, in_size * up - out_size * down + pad0 - up + 1


__all__ = ["Plan1D", "plan_1d", "split_phases", "merge_phases", "round_up", "tap_table",
           "transpose_padding"]
