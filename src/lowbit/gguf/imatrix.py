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

Names are GGUF tensor names (``blk.0.attn_q.weight``).  Collection mirrors llama-imatrix:
the text is tokenized once (with BOS when the model adds one), cut into ``ctx``-token chunks
whose first token is replaced by BOS, every token of a chunk counts, and only ``blk.*``
weights are collected (not ``output.weight``).  MoE expert weights get one row of sums and
one count per expert.
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


def hf_to_gguf_linear_name(module_name: str, arch: str) -> str | None:
    """GGUF weight name of a transformers Linear module (``model.layers.3.mlp.down_proj``)."""
    return gguf_tensor_name(module_name + ".weight", arch)


def collect(model, token_chunks, arch: str, process_output: bool = False, progress=None) -> IMatrix:
    """Run ``model`` (a transformers causal LM) over ``token_chunks`` (lists of ids) and collect
    sum of squared inputs and token counts of every Linear layer mapped to a GGUF name."""
    import torch

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for mname, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        if mname.endswith("lm_head"):
            gname = "output.weight" if process_output else None
        else:
            gname = hf_to_gguf_linear_name(mname, arch)
        if gname is None or not (gname.startswith("blk.") or gname == "output.weight"):
            continue

        def hook(m, inputs, _out, gname=gname):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            s = (x * x).sum(0)
            if gname in sums:
                sums[gname] += s
            else:
                sums[gname] = s
            counts[gname] = counts.get(gname, 0) + x.shape[0]

        hooks.append(mod.register_forward_hook(hook))
    if not hooks:
        raise LowbitError(None, "the model has no Linear layers to collect an importance matrix from")
    n = 0
    try:
        with torch.inference_mode():
            it = progress(token_chunks) if progress else token_chunks
            for chunk in it:
                ids = torch.tensor([chunk], dtype=torch.long)
                model(input_ids=ids, use_cache=False)
                n += 1
    finally:
        for h in hooks:
            h.remove()
    im = IMatrix(chunk_count=n, chunk_size=len(token_chunks[0]) if token_chunks else 512)
    for k, s in sums.items():
        im.sums[k] = s.cpu().numpy().reshape(1, -1)
        im.counts[k] = np.array([float(counts[k])])
    return im


def text_chunks(tokenizer, text: str, ctx: int, chunks: int | None, add_bos: bool, bos_id: int | None,
                where: str | Path | None = None):
    """Tokenize like llama-imatrix: whole text once (BOS first when the model adds one), then
    consecutive ``ctx`` windows with their first token replaced by BOS (``where``: the text's
    file, named in the error when the text is shorter than one chunk)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if add_bos and bos_id is not None:
        ids = [bos_id] + list(ids)
    k = len(ids) // ctx
    if chunks is not None:
        k = min(k, int(chunks))
    if k < 1:
        raise LowbitError(where, f"calibration text has {len(ids)} tokens, fewer than one chunk of {ctx}")
    out = []
    for i in range(k):
        c = list(ids[i * ctx:(i + 1) * ctx])
        if add_bos and bos_id is not None:
            c[0] = bos_id
        out.append(c)
    return out


def _gguf_arch(config, where=None) -> str:
    """The GGUF architecture whose tensor names an importance matrix of this model uses."""
    return str(by_model_type(getattr(config, "model_type", ""), where, gguf=True).gguf_arch)


def _add_bos(source, tokenizer) -> bool:
    """Whether llama.cpp would add BOS: the GGUF's tokenizer.ggml.add_bos_token if any, else the
    HF tokenizer's behaviour."""
    gp = getattr(source, "gguf_path", None)
    if gp:
        from .reader import validate_gguf

        v = validate_gguf(gp).kv.get("tokenizer.ggml.add_bos_token")
        if isinstance(v, bool):
            return v
        model = validate_gguf(gp).kv.get("tokenizer.ggml.model")
        return model in ("llama",)
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def compute_imatrix(source, text_path, out_path, ctx: int = 512, chunks: int | None = None,
                    overwrite: bool = False, process_output: bool = False) -> Path:
    """Compute llama.cpp's importance matrix for ``source`` on the text in ``text_path``.

    ``ctx``: tokens per chunk (llama-imatrix's default 512); ``chunks``: at most this many
    chunks (default all).  Output format by suffix: ``.dat`` legacy, anything else GGUF."""
    from ..models import load, resolve
    from ..progress import track

    out = check_output_path(out_path, overwrite)
    tp = Path(text_path)
    if not tp.is_file():
        raise LowbitError(tp, "no such text file")
    text = tp.read_text(encoding="utf-8", errors="replace")
    ms = resolve(source)
    lm = load(ms)
    arch = _gguf_arch(lm.config, source)
    tok = lm.tokenizer
    token_chunks = text_chunks(tok, text, ctx, chunks, _add_bos(ms, tok), tok.bos_token_id, where=tp)
    im = collect(lm.model, token_chunks, arch, process_output,
                 progress=lambda it: track(it, desc="imatrix", total=len(token_chunks), unit="chunk"))
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
