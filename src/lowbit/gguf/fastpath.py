"""GGUF -> GGUF on the CPU without importing torch, when the C quantizers serve every tensor.

``lowbit quantize model.gguf --to Q4_K_M`` used to spend seconds importing torch and transformers
before its first block (transformers to build the model skeleton its tensors are checked against,
torch for the block encoders). :func:`quantize` takes the same route as
:func:`lowbit.gguf.convert.quantize_to_gguf` (same plan, same checks, same writer, same bytes) and
returns ``None``, having written nothing, where it cannot serve the request without torch:

* the source is not a GGUF file, or ``LOWBIT_NATIVE=0``, or the C library is not built;
* a planned type has no C quantizer (:func:`lowbit.gguf.writer.native_can_quantize`: TQ/FP4 types,
  BF16 output, and the IQ1-IQ3 types until they have C code);
* a tensor must be dequantized from a quantized type first (a requantized file);
* the tensor check would depend on transformers' defaults (a Qwen3 or Gemma-3 file without
  ``attention.key_length``).

The check of the tensors against the architecture (:func:`check_gguf_tensors`) is the one
:func:`lowbit.models.validate.check_gguf_tensors` makes, written out per family from the validated
hyper-parameters instead of read from transformers' model skeleton; ``tests/test_gguf_notorch.py``
checks that the two expect the same tensors, and that a ``lowbit quantize`` process taking this
path never imports torch (``python -X importtime -m lowbit.cli quantize ...`` shows it too).
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType as T

from ..errors import LowbitError
from ..models.validate import Expected, check_tensors
from . import mixes, native
from .hparams import GGUFHParams, validate_hparams
from .reader import GGUFFile
from .writer import native_can_quantize

__all__ = ["quantize", "expected_gguf_tensors", "check_gguf_tensors"]


class _NeedsTorch(Exception):
    """This request needs the torch path (nothing was written)."""


def expected_gguf_tensors(hp: GGUFHParams, names: Sequence[str]) -> Expected:
    """The GGUF tensors (names, PyTorch-order shapes) of a model of ``hp``, as transformers'
    skeleton of the config made from the same metadata has them (``names``: the file's tensors,
    for the choices the converter makes: llama's optional attention biases, tied embeddings)."""
    fam = hp.family
    if not hp.explicit_head_dim and fam in ("qwen3", "gemma3"):  # transformers' default head_dim applies
        raise _NeedsTorch
    e, v, f, hd = hp.n_embd, hp.n_vocab, hp.n_ff, hp.head_dim
    q, kv = hp.n_head * hd, hp.n_head_kv * hd
    exp = Expected()
    exp.required.update({"token_embd.weight": (v, e), "output_norm.weight": (e,)})
    exp.optional["output.weight"] = (v, e)  # absent when tied (a present one is checked all the same)
    layer: dict[str, tuple[int, ...]] = {
        "attn_norm.weight": (e,), "attn_q.weight": (q, e), "attn_k.weight": (kv, e), "attn_v.weight": (kv, e),
        "attn_output.weight": (e, q), "ffn_norm.weight": (e,), "ffn_gate.weight": (f, e), "ffn_up.weight": (f, e),
        "ffn_down.weight": (e, f),
    }
    if fam == "qwen2" or (fam == "llama" and "blk.0.attn_q.bias" in names):
        layer.update({"attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,)})
        if fam == "llama":
            layer["attn_output.bias"] = (e,)
    if fam in ("qwen3", "gemma3"):
        layer.update({"attn_q_norm.weight": (hd,), "attn_k_norm.weight": (hd,)})
    if fam == "gemma3":
        layer.update({"post_attention_norm.weight": (e,), "post_ffw_norm.weight": (e,)})
    if fam not in ("llama", "qwen2", "qwen3", "gemma3"):
        raise _NeedsTorch
    for i in range(hp.n_layer):
        exp.required.update({f"blk.{i}.{k}": s for k, s in layer.items()})
    exp.ignore = (re.compile(r"^rope_freqs\.weight$"),)
    return exp


def check_gguf_tensors(f: GGUFFile, path: Path) -> None:
    """The metadata against the tensors, then the tensors against the architecture, without torch."""
    shapes: Mapping[str, Sequence[int]] = {t.name: t.shape for t in f.tensors}
    hp = validate_hparams(f.kv, shapes, path)
    check_tensors(expected_gguf_tensors(hp, list(shapes)), shapes, hp.arch, lambda _n: path, path)


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return path.is_file() and fh.read(4) == b"GGUF"
    except OSError:
        return False


def quantize(model: Any, out: str | Path, to: str, *, imatrix: str | Path | None = None, pure: bool = False,
             tensor_types: Sequence[str] = (), output_tensor_type: str | None = None,
             token_embedding_type: str | None = None, overwrite: bool = False,
             report: dict[str, Any] | None = None) -> Path | None:
    """:func:`~lowbit.gguf.convert.quantize_to_gguf` of a GGUF file without torch; ``None`` (nothing
    written) where the torch path is needed. Errors in the input are raised as the torch path raises them."""
    path = Path(str(model))
    if os.environ.get("LOWBIT_NATIVE", "1") == "0" or not native.enabled() or not _is_gguf(path):
        return None
    from .sources import _gguf_source

    try:
        mixname = mixes.normalize_mix(to)
        src = _gguf_source(path, tensor_check=check_gguf_tensors)
        from .plan import plan_source

        types = plan_source(src, mixname, pure, output_tensor_type, token_embedding_type, tensor_types,
                            imatrix is not None)
    except _NeedsTorch:
        return None
    except LowbitError:
        return None  # the torch path reports it, in its own words
    for name, t in types.items():
        st = src.source_types[name]
        if t == st:
            continue  # copied byte for byte
        if st not in (T.F32, T.F16, T.BF16) or not native_can_quantize(t):
            return None
    from .convert import quantize_to_gguf

    try:
        return quantize_to_gguf(src, out, mixname, imatrix_path=imatrix, pure=pure,
                                output_tensor_type=output_tensor_type, token_embedding_type=token_embedding_type,
                                tensor_types=list(tensor_types), overwrite=overwrite, report=report)
    except OSError as exc:  # as lowbit.api.quantize words a full disk
        if exc.errno == errno.ENOSPC:
            raise LowbitError(out, "no space left on device while writing; nothing was written "
                                   "(free some space or write to another disk)") from None
        raise
