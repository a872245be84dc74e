"""Importance matrices ("imatrix") as llama.cpp defines them, computed with our own forward pass.

For every weight matrix ``W`` (``y = W x``) the importance of input column ``j`` is the mean of
``x_j**2`` over the calibration tokens.  llama.cpp stores the *sum* of squares and the token
count separately:

* GGUF format (llama-imatrix's default): ``general.type = "imatrix"``,
  ``imatrix.datasets`` (string array), ``imatrix.chunk_count``, ``imatrix.chunk_size`` and,
  per weight, F32 tensors ``<name>.in_sum2`` (``[n_mat, cols]``, ``n_mat`` = experts or 1) and
  ``<name>.counts`` (``[n_mat, 1]``).
* legacy ``.dat``: int32 entry count; per entry int32 name length, name, int32 ``ncall``,
  int32 value count, float32 values = ``sum / count * ncall``; then int32 chunk count and
  int32 length + dataset file name.

Names are GGUF tensor names (``blk.0.attn_q.weight``).  Collection follows llama-imatrix
(tools/imatrix/imatrix.cpp, with its defaults ``-b 2048 -ub 512``):

* the text is tokenized once as llama.cpp tokenizes it (BOS first when the vocabulary adds one;
  llama.cpp's own tokenizer for GGUF sources, :mod:`lowbit.gguf.llamacpp`) and cut into
  ``ctx``-token chunks whose first token is replaced by BOS;
* llama-imatrix decodes ``n_seq = 2048 // ctx`` chunks at a time as parallel sequences, which
  llama.cpp splits into micro-batches of at most 512 tokens (an equal number from every
  sequence when there are several); a matmul whose input has fewer than 16 rows is not
  collected, so the tokens of a short micro-batch (e.g. 3 chunks of 512: three of 510 tokens,
  then one of 6) are not counted (:func:`counted_tokens`);
* only ``blk.*`` weights are collected (``output.weight`` with ``process_output``); counts add
  the rows of every collected matmul; ``imatrix.chunk_count`` is the largest count divided by
  ``ctx`` (llama-imatrix's ``m_last_chunk``);
* the model runs as llama.cpp runs it: for a GGUF source each linear's input is rounded to its
  weight type's activation format (:mod:`lowbit.runtime.emulate`; the statistics see the input
  before rounding, as llama-imatrix's eval callback sees the F32 activations).

MoE expert weights get one row of sums and one count per expert.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import LowbitError
from ..fileio import atomic_file, check_output_path
from ..models.architectures import by_model_type
from .names import gguf_tensor_name


@dataclass
class IMatrix:
    """Raw statistics: name -> sums ``[n_mat, cols]`` (float64) and counts ``[n_mat]``."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 512

    def values(self) -> dict[str, np.ndarray]:
        """Per-column importance (sum / count), flattened over experts, as llama-quantize uses it;
        experts never routed to get 1.0."""
        out = {}
        for name, s in self.sums.items():
            c = self.counts[name].astype(np.float64)
            v = np.where(c[:, None] > 0, s / np.maximum(c[:, None], 1), 1.0)
            out[name] = v.astype(np.float32).reshape(-1)
        return out


# ---------------------------------------------------------------------------------------------
# files


def save_imatrix(im: IMatrix, path: str | Path, overwrite: bool = False, legacy: bool | None = None) -> Path:
    """Write ``im`` in llama.cpp's GGUF format, or the legacy format when ``legacy`` is true
    (default: legacy iff the name ends in ``.dat``)."""
    out = check_output_path(path, overwrite)
    if legacy is None:
        legacy = out.suffix.lower() == ".dat"
    with atomic_file(out, overwrite=overwrite) as tmp:
        (_save_legacy if legacy else _save_gguf)(im, tmp)
    return out


def _save_gguf(im: IMatrix, path: Path) -> None:
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFValueType as V

    from .writer import KV, PlannedTensor, write_gguf

    kvs = [KV("general.type", V.STRING, "imatrix"),
           KV("imatrix.datasets", V.ARRAY, list(im.datasets), V.STRING),
           KV("imatrix.chunk_count", V.UINT32, int(im.chunk_count)),
           KV("imatrix.chunk_size", V.UINT32, int(im.chunk_size))]
    planned, data = [], {}
    for name in sorted(im.sums):
        s = np.asarray(im.sums[name], dtype=np.float32)
        c = np.asarray(im.counts[name], dtype=np.float32).reshape(-1, 1)
        planned.append(PlannedTensor(f"{name}.in_sum2", s.shape, T.F32))
        planned.append(PlannedTensor(f"{name}.counts", c.shape, T.F32))
        data[f"{name}.in_sum2"] = s
        data[f"{name}.counts"] = c
    # llama.cpp's imatrix files carry no general.architecture key; gguf-py always adds one,
    # which llama.cpp ignores when reading an imatrix.
    write_gguf(path, "imatrix", kvs, planned, lambda p: data[p.name])


def _save_legacy(im: IMatrix, path: Path) -> None:
    chunk = max(1, int(im.chunk_size))
    with open(path, "wb") as f:
        names = [n for n in sorted(im.sums) if np.asarray(im.counts[n]).max() > 0]
        f.write(struct.pack("<i", len(names)))
        for name in names:
            s = np.asarray(im.sums[name], dtype=np.float64)
            c = np.asarray(im.counts[name], dtype=np.float64).reshape(-1)
            ncall = int((c.max() + chunk - 1) // chunk)
            vals = np.where(c[:, None] > 0, s / np.maximum(c[:, None], 1), 1.0) * ncall
            nb = name.encode()
            f.write(struct.pack("<i", len(nb)) + nb + struct.pack("<ii", ncall, vals.size))
            f.write(vals.astype("<f4").tobytes())
        f.write(struct.pack("<i", int(im.chunk_count)))
        ds = (im.datasets[-1] if im.datasets else "").encode()
        f.write(struct.pack("<i", len(ds)) + ds)


def load_imatrix(path: str | Path) -> tuple[IMatrix, bool]:
    """Read an imatrix file (GGUF or legacy .dat, detected by magic); returns (data, is_legacy).

    A legacy file holds only ``sum/count*ncall``: it is returned as sums = value * chunk_size
    and counts = ncall * chunk_size (chunk_size 512 assumed), which keeps ``values()`` exact."""
    p = Path(path)
    if not p.is_file():
        raise LowbitError(p, "no such imatrix file")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _load_gguf(p), False
    return _load_legacy(p), True


def _load_gguf(p: Path) -> IMatrix:
    from .reader import GGUFFile

    f = GGUFFile(p)
    meta = f.kv
    try:
        im = IMatrix(datasets=[str(d) for d in meta.get("imatrix.datasets") or []],
                     chunk_count=int(meta.get("imatrix.chunk_count") or 0),
                     chunk_size=int(meta.get("imatrix.chunk_size") or 512))
    except (TypeError, ValueError) as e:
        raise LowbitError(p, f"bad imatrix.* metadata ({e})") from None
    for t in f.tensors:
        if not t.name.endswith(".in_sum2"):
            continue
        name = t.name[: -len(".in_sum2")]
        ct = f.by_name.get(f"{name}.counts")
        if ct is None:
            raise LowbitError(p, f"imatrix entry {name} has sums but no counts")
        s = f.array(t.name).reshape(-1, t.ne[0])
        c = f.array(ct.name).reshape(-1)
        if c.size != s.shape[0]:
            raise LowbitError(p, f"imatrix entry {name}: {s.shape[0]} sum rows but {c.size} counts")
        im.sums[name] = s.astype(np.float64)
        im.counts[name] = c.astype(np.float64)
    if not im.sums:
        raise LowbitError(p, "GGUF file holds no imatrix entries (*.in_sum2 tensors)")
    return im


def _load_legacy(p: Path) -> IMatrix:
    buf = p.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > len(buf):
            raise LowbitError(p, "truncated imatrix file")
        v = struct.unpack_from(fmt, buf, pos)
        pos += n
        return v

    (n_entries,) = take("<i")
    if not 0 < n_entries < 1_000_000:
        raise LowbitError(p, f"not an imatrix file (entry count {n_entries})")
    im = IMatrix(chunk_size=512)
    for _ in range(n_entries):
        (ln,) = take("<i")
        if not 0 < ln < 4096:
            raise LowbitError(p, f"bad name length {ln}")
        name = bytes(take(f"<{ln}s")[0]).decode(errors="replace")
        ncall, nval = take("<ii")
        if not 0 < nval <= 1 << 28 or pos + 4 * nval > len(buf):
            raise LowbitError(p, f"entry {name}: bad value count {nval}")
        vals = np.frombuffer(buf, dtype="<f4", count=nval, offset=pos).astype(np.float64)
        pos += 4 * nval
        ncall = max(int(ncall), 0)
        if ncall > 0:
            im.sums[name] = (vals * im.chunk_size).reshape(1, -1)
            im.counts[name] = np.array([ncall * im.chunk_size], dtype=np.float64)
        else:  # llama.cpp uses the values as they are when ncall is 0
            im.sums[name] = vals.reshape(1, -1)
            im.counts[name] = np.array([1.0])
    if pos + 4 <= len(buf):
        (im.chunk_count,) = take("<i")
        if pos + 4 <= len(buf):
            (ln,) = take("<i")
            if 0 < ln <= len(buf) - pos:
                im.datasets = [bytes(take(f"<{ln}s")[0]).decode(errors="replace")]
    return im


def load_imatrix_values(path: str | Path) -> dict[str, np.ndarray]:
    """Per-column importance vectors from a file, normalised as llama-quantize does."""
    return load_imatrix(path)[0].values()


# ---------------------------------------------------------------------------------------------
# computing


#: llama-imatrix's defaults: logical batch (``-b``), micro-batch (``-ub``), smallest collected matmul
N_BATCH, N_UBATCH, MIN_ROWS = 2048, 512, 16


def counted_tokens(n_chunks: int, ctx: int, n_batch: int = N_BATCH, n_ubatch: int = N_UBATCH,
                   min_rows: int = MIN_ROWS):
    """``[n_chunks, ctx]`` bool: the tokens llama-imatrix counts.

    llama-imatrix decodes ``n_seq = max(1, n_batch // ctx)`` chunks per call, as parallel
    sequences (one KV-cache stream each), in ``ceil(ctx / n_batch)`` calls per group of chunks.
    llama.cpp cuts each call into micro-batches of ``floor(n_ubatch / g)`` tokens of each of the
    ``g`` sequences at a time (``n_ubatch`` consecutive tokens when there is one), then what is
    left of each (``llama_batch_allocr::split_equal`` / ``split_simple``). A matmul on fewer than
    ``min_rows`` rows (tokens of the micro-batch) is not collected."""
    import torch

    keep = torch.ones(n_chunks, ctx, dtype=torch.bool)
    n_seq = max(1, n_batch // ctx)
    n_batch = min(n_batch, n_seq * ctx)
    for g0 in range(0, n_chunks, n_seq):
        g = min(n_seq, n_chunks - g0)
        step = max(1, n_ubatch // g)
        for start in range(0, ctx, n_batch):
            end = min(ctx, start + n_batch)
            for u in range(start, end, step):
                length = min(step, end - u)
                if g * length < min_rows:
                    keep[g0 : g0 + g, u : u + length] = False
    return keep


def collect(source, chunks, arch: str, process_output: bool = False, device: str = "cpu",
            emulate: str | None = None) -> IMatrix:
    """Sum of squared inputs and token counts of every linear weight of ``source`` (mapped to its
    GGUF name) over the token ``chunks`` (``[k, ctx]``), one decoder layer in memory at a time.

    Each chunk runs through the layer engine as its own batch; the tokens llama-imatrix would not
    count (:func:`counted_tokens`) are left out of the statistics. ``process_output`` also
    collects ``output.weight`` (the final norm's outputs). ``emulate``: ``"llama.cpp"`` rounds
    each linear's input as llama.cpp does for the GGUF source's weight types, ``"none"`` keeps
    float32, ``None`` (default) is ``"llama.cpp"`` for GGUF sources and ``"none"`` otherwise.
    """
    import torch
    from transformers import AutoConfig

    from ..models import Checkpoint, resolve
    from ..models.calibration import CalibrationData
    from ..models.engine import stream_quantize
    from ..models.statistics import Importance, StatisticsHandler

    src = resolve(source)
    config = AutoConfig.from_pretrained(str(src.hf_dir))
    setup = _layer_setup(src, emulate)
    if setup is not None:  # llama.cpp's F16 KV cache too
        from ..runtime.emulate import register_f16_kv_attention

        config._attn_implementation = register_f16_kv_attention()
    handler = StatisticsHandler(lambda cols, dev: Importance(cols, dev), "importance", layer_setup=setup)
    ids = torch.as_tensor(chunks, dtype=torch.long)
    count = counted_tokens(int(ids.shape[0]), int(ids.shape[1]))
    data = CalibrationData(ids, None, "imatrix text", count_mask=None if bool(count.all()) else count)
    outer = {"lm_head.weight": None} if process_output else None
    stream_quantize(config, Checkpoint(src.hf_dir), data, handler, device=device, batch_size=1, outer=outer,
                    desc="imatrix")
    ctx = int(ids.shape[1])
    im = IMatrix(chunk_count=int(count.sum(1).sum()) // ctx, chunk_size=ctx)
    for hf_name in sorted(handler.collected):
        stat = handler.collected[hf_name]
        gname = "output.weight" if hf_name == "lm_head.weight" else gguf_tensor_name(hf_name, arch)
        if gname is None or not (gname.startswith("blk.") or gname == "output.weight"):
            continue
        assert isinstance(stat, Importance) and stat.sum2 is not None
        im.sums[gname] = stat.sum2.cpu().numpy().reshape(1, -1)
        im.counts[gname] = np.array([float(stat.count)])
    if not im.sums:
        raise LowbitError(src.spec, "the model has no linear layers to collect an importance matrix from")
    return im


def _layer_setup(src, emulate: str | None):
    """The engine's per-layer set-up that rounds linear inputs as llama.cpp does for ``src``'s GGUF
    weight types (None when not emulating)."""
    if emulate is None:
        emulate = "llama.cpp" if getattr(src, "gguf_path", None) is not None else "none"
    if emulate == "none":
        return None
    if emulate != "llama.cpp":
        raise LowbitError("--emulate", f"unknown runtime to emulate {emulate!r} (llama.cpp or none)")
    if getattr(src, "gguf_path", None) is None:
        raise LowbitError(src.spec, "--emulate llama.cpp applies to GGUF files (each weight's GGML type decides "
                                    "how llama.cpp rounds that matmul's input)")
    from ..models.layers import full_weight_name
    from ..runtime.emulate import gguf_activation_formats, gguf_block_mins, install, uninstall

    formats = gguf_activation_formats(src.gguf_path)
    mins = gguf_block_mins(src.gguf_path)

    def setup(ctx):
        mods = {}
        for rel, mod in ctx.layer.named_modules():
            full = full_weight_name(ctx.adapter, ctx.index, rel) if rel else None
            if full is not None:
                mods[full[: -len(".weight")] if full.endswith(".weight") else full] = mod
        changed = install(mods, {k: v for k, v in formats.items() if k in mods}, mins)
        return lambda: uninstall(changed)

    return setup


def _gguf_arch(config, where=None) -> str:
    """The GGUF architecture whose tensor names an importance matrix of this model uses."""
    return str(by_model_type(getattr(config, "model_type", ""), where, gguf=True).gguf_arch)


def _add_bos(source, tokenizer) -> bool:
    """Whether llama.cpp would add BOS: the GGUF's tokenizer.ggml.add_bos_token if any, else the
    HF tokenizer's behaviour."""
    from ..text import model_adds_bos

    vocab = getattr(tokenizer, "llamacpp_vocab", None)
    if vocab is not None:  # llama.cpp's own tokenizer of the file: its add_bos
        return bool(vocab.add_bos)
    gp = getattr(source, "gguf_path", None)
    if gp:
        from .reader import validate_gguf

        kv = validate_gguf(gp).kv
        v = kv.get("tokenizer.ggml.add_bos_token")
        if isinstance(v, bool):
            return v
        return kv.get("tokenizer.ggml.model") in ("llama",)
    return model_adds_bos(tokenizer)


def compute_imatrix(source, text_path, out_path, ctx: int = 512, chunks: int | None = None,
                    overwrite: bool = False, process_output: bool = False, device: str = "cpu",
                    emulate: str | None = None) -> Path:
    """Compute llama.cpp's importance matrix for ``source`` on the text in ``text_path``, as
    llama-imatrix computes it (see the module's docstring).

    The text is tokenized once (BOS first when llama.cpp would add it; llama.cpp's own tokenizer
    for GGUF sources) and cut into ``ctx``-token chunks whose first token is BOS (llama-imatrix's
    rule, :func:`lowbit.text.make_chunks`); ``chunks``: at most this many (default all). The
    model runs one decoder layer at a time (:func:`collect`, ``emulate`` as there), so memory
    stays about one layer plus the chunks' activations.
    Output format by suffix: ``.dat`` legacy, anything else GGUF."""
    from transformers import AutoConfig

    from ..models import resolve
    from ..models.loader import load_tokenizer
    from ..text import make_chunks, read_text, tokenize

    out = check_output_path(out_path, overwrite)
    tp = Path(text_path)
    text = read_text(tp)
    ms = resolve(source)
    arch = _gguf_arch(AutoConfig.from_pretrained(str(ms.hf_dir)), source)
    tok = load_tokenizer(ms.hf_dir, ms.gguf_path)
    add_bos = _add_bos(ms, tok)
    tokens = tokenize(tok, text, where=str(tp), add_bos=add_bos)
    if tokens.numel() < ctx:
        raise LowbitError(tp, f"calibration text has {tokens.numel()} tokens, fewer than one chunk of {ctx}")
    token_chunks = make_chunks(tokens, ctx, tok.bos_token_id if add_bos else None, chunks)
    im = collect(ms, token_chunks, arch, process_output, device=device, emulate=emulate)
    im.datasets = [str(tp)]
    return save_imatrix(im, out, overwrite=overwrite)


def relative_difference(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per-entry ``||a - b|| / ||b||`` over entries both hold."""
    out = {}
    for k in sorted(set(a) & set(b)):
        x, y = np.asarray(a[k], np.float64).ravel(), np.asarray(b[k], np.float64).ravel()
        if x.shape != y.shape:
            out[k] = float("inf")
            continue
        out[k] = float(np.linalg.norm(x - y) / max(float(np.linalg.norm(y)), 1e-30))
    return out
