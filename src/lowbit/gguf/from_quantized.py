"""Calibrated codes (GPTQ, AWQ, RTN) written as GGUF blocks without choosing them again.

A :class:`~lowbit.core.quantized.QuantizedWeight` already holds integer codes and per-group
scales. Where a llama.cpp block type can hold that grid exactly, the codes are stored as they
are and only the block scale (and minimum) are rounded to fp16:

* ``Q4_0`` ``x = (q - 8) * d``: 4-bit symmetric codes, ``d = scale``.
* ``Q4_1`` ``x = q * d + m``: 4-bit codes (either symmetry), ``d = scale``, ``m = -zero * scale``.
* ``Q8_0`` ``x = i8 * d``: 8-bit symmetric codes, ``i8 = code - 128``, ``d = scale``.

Every 32-column block must lie inside one quantization group: group sizes that are multiples
of 32, per-channel and per-tensor grids fit; act-order ``g_idx`` fits only where it keeps each
block in one group (static groups), otherwise :class:`LowbitError`.

* ``Q4_K`` ``x = d*sc*q - dmin*m`` per 32 values (6-bit ``sc``, ``m`` under fp16 ``d``,
  ``dmin`` per 256): the grid must already be a Q4_K grid. :func:`kquant_grid` takes it from
  llama.cpp's own Q4_K encoding of the float weight; GPTQ given that grid
  (``gptq_quantize(grid=...)``, handler option ``grid="Q4_K"``) only re-chooses the codes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ..core.quantized import QuantizedModel, QuantizedWeight
from ..errors import LowbitError
from ..models.architectures import find_gguf_arch
from ._blockops import fp16_bytes, fp16_round
from .convert import quantize_to_gguf
from .names import gguf_tensor_name, permute_rotary
from .quants import _pack_nibbles, parse_qtype
from .sources import Source, hf_to_gguf_layout
from .writer import PlannedTensor

BLOCK = 32

# qtype -> (bits, symmetric schemes allowed, asymmetric schemes allowed)
_GRIDS: dict[T, tuple[int, bool, bool]] = {T.Q4_0: (4, True, False), T.Q4_1: (4, True, True), T.Q8_0: (8, True, False),
                                           T.Q4_K: (4, False, True)}
KQUANT_GRIDS = ("Q4_K",)  # types whose grid GPTQ can be given (kquant_grid)
QK_K = 256

SUPPORTED = tuple(t.name for t in _GRIDS)


def _check_scheme(qw: QuantizedWeight, qt: T, where: str) -> None:
    """Raise unless ``qw``'s grid can be stored as ``qt`` blocks as it is."""
    if qt not in _GRIDS:
        raise LowbitError(where, f"{qt.name} cannot hold calibrated codes (supported: {', '.join(SUPPORTED)})")
    bits, sym_ok, asym_ok = _GRIDS[qt]
    s = qw.scheme
    fits = s.bits == bits and (sym_ok if s.symmetric else asym_ok)
    gs_ok = s.group_size <= 0 or s.group_size % BLOCK == 0
    if not (fits and gs_ok):
        need = f"{bits}-bit {'symmetric' if not asym_ok else 'symmetric or asymmetric'}, group size a multiple of {BLOCK}"
        raise LowbitError(where, f"scheme {s.describe()} does not fit GGUF {qt.name} (needs {need})")
    blk = QK_K if qt == T.Q4_K else BLOCK
    if qw.codes.shape[1] % blk:
        raise LowbitError(where, f"row length {qw.codes.shape[1]} is not a multiple of the {qt.name} block size {blk}")
    if qt == T.Q4_K and s.group_size != BLOCK:
        raise LowbitError(where, f"scheme {s.describe()} does not fit GGUF Q4_K (needs groups of {BLOCK}: "
                                 "quantize with grid='Q4_K')")
    if int(qw.codes.min()) < 0 or int(qw.codes.max()) > s.qmax:
        raise LowbitError(where, f"codes outside [0, {s.qmax}] for scheme {s.describe()}")


def _block_params(qw: QuantizedWeight, qt: T, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block ``scale`` and ``zero`` (float32 ``[rows, n_blocks]``); raises where a block spans groups."""
    out_f, in_f = qw.codes.shape
    nb = in_f // BLOCK
    if qw.zero is None:
        raise LowbitError(where, f"GGUF {qt.name} blocks hold integer grids with zero points, not {qw.scheme.describe()}")
    if qw.scale.numel() == 1:
        s = qw.scale.float().reshape(1, 1).expand(out_f, nb)
        return s, qw.zero.float().reshape(1, 1).expand(out_f, nb)
    groups = qw.column_groups().reshape(nb, BLOCK)
    if not bool((groups == groups[:, :1]).all()):
        raise LowbitError(where, f"act-order g_idx puts columns of one {BLOCK}-element block in different groups; "
                          f"GGUF {qt.name} blocks are contiguous (quantize with act_order=False or static groups)")
    first = groups[:, 0]
    return qw.scale.float()[:, first], qw.zero.float()[:, first]


def _fp16_checked(v: torch.Tensor, what: str, where: str) -> torch.Tensor:
    """``v`` as fp16 bytes ``[..., 2]``; raises when a value overflows fp16."""
    if not bool(torch.isfinite(v.to(torch.float16)).all()):
        raise LowbitError(where, f"{what} overflows fp16 (max |{what}| = {float(v.abs().max()):g})")
    return fp16_bytes(v)


def blocks_from_quantized(qw: QuantizedWeight, qtype, name: str = "weight") -> torch.Tensor:
    """Encode ``qw``'s codes as GGUF ``qtype`` blocks: uint8 ``[rows, bytes_per_row]``.

    The codes are kept; block scales (and Q4_1 minimums) are rounded to fp16. ``name`` only
    labels errors. Raises :class:`LowbitError` when the scheme or ``g_idx`` does not fit.
    """
    qt = parse_qtype(qtype)
    where = f"tensor {name}"
    _check_scheme(qw, qt, where)
    scale, zero = _block_params(qw, qt, where)
    rows, in_f = qw.codes.shape
    if qt == T.Q4_K:
        return _q4_k_blocks(qw.codes, scale, zero, where)
    q = qw.codes.to(torch.int32).reshape(rows * (in_f // BLOCK), BLOCK)
    d = _fp16_checked(scale.reshape(-1), "scale", where)
    if qt == T.Q4_0:
        if not bool((zero == 8).all()):
            raise LowbitError(where, "Q4_0 needs zero points of 8 (symmetric 4-bit grid)")
        blocks = torch.cat([d, _pack_nibbles(q)], dim=1)
    elif qt == T.Q4_1:
        m = _fp16_checked((-zero * scale).reshape(-1), "zero * scale", where)
        blocks = torch.cat([d, m, _pack_nibbles(q)], dim=1)
    else:
        if not bool((zero == 128).all()):
            raise LowbitError(where, "Q8_0 needs zero points of 128 (symmetric 8-bit grid)")
        blocks = torch.cat([d, (q - 128).to(torch.int8).view(torch.uint8)], dim=1)
    return blocks.reshape(rows, -1).contiguous()


def _six_bit(v: torch.Tensor, where: str, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-super-block values ``[N, 8]`` of the form ``fp16(d) * k`` (k in 0..63) -> (d, k).

    The largest value is ``d * kmax``; ``kmax`` is tried from 63 down (63 without an imatrix)."""
    vmax = v.amax(dim=1)
    d_out = torch.zeros_like(vmax)
    k_out = torch.zeros_like(v)
    done = vmax <= 0
    for kmax in range(63, 0, -1):
        d = fp16_round(vmax / kmax)
        k = torch.round(v / torch.where(d > 0, d, 1.0).unsqueeze(1))
        fits = (k >= 0).all(1) & (k <= 63).all(1) & ((d.unsqueeze(1) * k - v).abs() <= 1e-5 * v.abs() + 1e-30).all(1)
        new = fits & ~done & (d > 0)
        d_out = torch.where(new, d, d_out)
        k_out = torch.where(new.unsqueeze(1), k, k_out)
        done = done | new
        if bool(done.all()):
            break
    if not bool(done.all()) or bool((v < 0).any()):
        raise LowbitError(where, f"the {what} are not a Q4_K grid (6-bit multiples of an fp16 super-block value); "
                                 "quantize with grid='Q4_K'")
    return d_out, k_out.to(torch.int32)


def _q4_k_blocks(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, where: str) -> torch.Tensor:
    from .kquants import _pack_4bit_pairs, _pack_scales_k4

    rows, in_f = codes.shape
    n = rows * (in_f // QK_K)
    sc = scale.float().reshape(n, 8)
    mn = (zero.float() * scale.float()).reshape(n, 8)
    d, ls = _six_bit(sc, where, "scales")
    dmin, lm = _six_bit(mn, where, "minimums")
    q = codes.to(torch.int32).reshape(n, QK_K)
    out = torch.cat([_fp16_checked(d, "scale", where), _fp16_checked(dmin, "minimum", where),
                     _pack_scales_k4(ls, lm), _pack_4bit_pairs(q)], dim=1)
    return out.reshape(rows, -1).contiguous()


def kquant_grid(weight: torch.Tensor, qtype: str = "Q4_K", imatrix: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's grid for ``weight`` (``[out, in]``, ``in`` a multiple of 256) as ``(scale, minimum)``.

    Each ``[out, in / 32]``: the sub-block scale ``d * sc`` and minimum ``dmin * m`` exactly as
    the dequantizer computes them, taken from lowbit's (llama.cpp-identical) encoding of the
    float weight, with or without an importance matrix. Sub-blocks whose 6-bit scale rounded to
    0 get scale ``d`` (``sc`` = 1): still a Q4_K grid, and one that can hold codes.
    """
    from .kquants import _f16_field, _unpack_scales_k4
    from .quants import quantize

    qt = parse_qtype(qtype)
    if qt != T.Q4_K:
        raise LowbitError(qtype, f"no calibrated grid for {qt.name} (supported: {', '.join(KQUANT_GRIDS)})")
    rows, in_f = weight.shape
    if in_f % QK_K:
        raise LowbitError(qtype, f"row length {in_f} is not a multiple of {QK_K}")
    blocks = quantize(weight.detach().float().cpu(), qt, imatrix).reshape(-1, 144)
    d = _f16_field(blocks, 0).unsqueeze(1)
    dmin = _f16_field(blocks, 2).unsqueeze(1)
    s6, m6 = _unpack_scales_k4(blocks[:, 4:16])
    s6 = torch.where((s6 == 0) & (d > 0), 1, s6)
    scale = (d * s6.float()).reshape(rows, in_f // BLOCK)
    minimum = (dmin * m6.float()).reshape(rows, in_f // BLOCK)
    return scale, minimum


def permute_quantized(qw: QuantizedWeight, n_head: int) -> QuantizedWeight:
    """``qw`` with its rows in llama.cpp's rotary order (rows are whole, so this is exact)."""
    if qw.scale.numel() == 1:
        return QuantizedWeight(permute_rotary(qw.codes, n_head), qw.scale, qw.zero, qw.scheme, qw.g_idx)
    return QuantizedWeight(permute_rotary(qw.codes, n_head), permute_rotary(qw.scale, n_head),
                           permute_rotary(qw.zero, n_head), qw.scheme, qw.g_idx)


def _gguf_layout(qw: QuantizedWeight, gname: str, arch: str, n_head: int, n_kv: int) -> QuantizedWeight:
    """``qw`` in llama.cpp's layout for GGUF tensor ``gname`` (q/k rows permuted where the family needs it)."""
    family = find_gguf_arch(arch)
    if family is not None and family.rotary_permute and gname.endswith("attn_q.weight"):
        return permute_quantized(qw, n_head)
    if family is not None and family.rotary_permute and gname.endswith("attn_k.weight"):
        return permute_quantized(qw, n_kv)
    return qw


def _by_gguf_name(qm: QuantizedModel, arch: str) -> tuple[dict[str, str], dict[str, str]]:
    """GGUF name -> HF name of ``qm.weights`` and of ``qm.float_overrides`` (values are read on use)."""
    weights: dict[str, str] = {}
    floats: dict[str, str] = {}
    for table, out in ((qm.weights, weights), (qm.float_overrides, floats)):
        for hf in table:
            g = gguf_tensor_name(hf, arch)
            if g is None:
                raise LowbitError(hf, f"quantized tensor has no GGUF name for {arch}")
            out[g] = hf
    return weights, floats


def quantized_to_gguf(source, qm: QuantizedModel, out_path, qtype: str = "Q4_0", overwrite: bool = False,
                      token_embedding_type: str | None = None, output_tensor_type: str | None = None,
                      imatrix_path=None, tensor_types: list[str] | tuple[str, ...] = (),
                      report: dict | None = None) -> Path:
    """Write ``source`` as a pure ``qtype`` GGUF whose linear weights are ``qm``'s codes.

    ``imatrix_path`` and ``tensor_types`` (``PATTERN=TYPE``) apply as in :func:`quantize_to_gguf`
    to every tensor that does not hold calibrated codes (fallback types, ``output.weight``,
    tensors a pattern types otherwise), and the importance matrix is recorded in the file's
    ``quantize.imatrix.*`` keys.

    Tensors of ``qm.weights`` planned as ``qtype`` keep their codes (:func:`blocks_from_quantized`);
    those the plan types otherwise (rows not a multiple of 32: llama.cpp's fallback types) are
    encoded from ``qm``'s dequantized values. ``qm.float_overrides`` (AWQ-folded norms) replace
    the source's tensors; everything else is written as :func:`quantize_to_gguf` writes it
    (``token_embedding_type``/``output_tensor_type`` as there, e.g. ``"f16"``). Atomic output.
    """
    qt = parse_qtype(qtype)
    if qt not in _GRIDS:
        raise LowbitError(out_path, f"{qt.name} cannot hold calibrated codes (supported: {', '.join(SUPPORTED)})")
    cache: dict[str, tuple[dict[str, str], dict[str, str]]] = {}

    def tables(src: Source) -> tuple[dict[str, str], dict[str, str]]:
        if "t" not in cache:
            cache["t"] = _by_gguf_name(qm, src.arch)
        return cache["t"]

    def encoded(t: PlannedTensor, src: Source) -> np.ndarray | None:
        hf = tables(src)[0].get(t.name)
        if hf is None or t.qtype != qt:
            return None
        hp = src.hparams
        qw = _gguf_layout(qm.weights[hf], t.name, src.arch, hp.n_head, hp.n_head_kv)
        return blocks_from_quantized(qw, qt, t.name).numpy()

    def values(name: str, src: Source) -> np.ndarray | None:
        weights, floats = tables(src)
        if name in weights:
            w = qm.weights[weights[name]].dequantize().numpy()
        elif name in floats:
            w = qm.float_overrides[floats[name]].float().numpy()
        else:
            return None
        hp = src.hparams
        return np.ascontiguousarray(hf_to_gguf_layout(name, w, src.arch, hp.n_head, hp.n_head_kv), dtype=np.float32)

    mix = "Q4_K_M" if qt == T.Q4_K else qt.name  # with pure=True: Q4_K everywhere it fits
    return quantize_to_gguf(source, out_path, mix, pure=True, overwrite=overwrite,
                            token_embedding_type=token_embedding_type, output_tensor_type=output_tensor_type,
                            imatrix_path=imatrix_path, tensor_types=tensor_types, values=values, encoded=encoded,
                            report=report)
