"""Pieces shared by the checkpoint writers and readers: source files, tensors, config.json.

Every writer produces a Hugging Face folder: ``config.json`` (the source config plus a
``quantization_config``), one ``model.safetensors`` (or shards with an index), and the
tokenizer / generation files copied unchanged from the source folder.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..core.quantized import QuantizedWeight
from ..errors import LowbitError

#: Files never copied from the source folder (weights, the config we rewrite, stale indexes).
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".onnx", ".lock")
_SKIP_NAMES = {
    "config.json",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "quantize_config.json",
    "quant_config.json",
    "README.md",
}

#: safetensors metadata written by every writer (fixed, so output bytes are reproducible).
SAFETENSORS_METADATA = {"format": "pt"}

#: Shard size limit for ``model-0000x-of-0000y.safetensors`` files (also the most tensor
#: bytes a writer holds in memory).
MAX_SHARD_BYTES = 2 * 1024**3

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float": torch.float32,
    "half": torch.float16,
}


def module_of(weight_name: str) -> str:
    """``model.layers.0.mlp.up_proj.weight`` -> ``model.layers.0.mlp.up_proj``."""
    if not weight_name.endswith(".weight"):
        raise LowbitError(weight_name, "quantized tensors must be named '<module>.weight'")
    return weight_name[: -len(".weight")]


def load_config(folder: Path) -> dict[str, Any]:
    """The ``config.json`` of a Hugging Face folder as a dict."""
    path = folder / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LowbitError(path, "missing (not a Hugging Face model folder)") from None
    except json.JSONDecodeError as exc:
        raise LowbitError(path, f"not valid JSON ({exc.msg} at line {exc.lineno})") from None


def model_dtype(config: Mapping[str, Any]) -> torch.dtype:
    """The float dtype a config declares (``dtype`` or the older ``torch_dtype``); float32 if none."""
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return _DTYPES.get(str(name).replace("torch.", ""), torch.float32)


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Deterministic JSON: sorted keys, two-space indent, trailing newline."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer, generation config and other small non-weight files; returns their names."""
    copied = []
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.name in _SKIP_NAMES or f.name.endswith(_SKIP_SUFFIXES):
            continue
        shutil.copyfile(f, dst / f.name)
        copied.append(f.name)
    return copied


class ShardWriter:
    """Safetensors shards written as they fill, so at most one shard of tensors is in memory.

    Tensors join the current shard in the order they are added; when the next one would take
    it past ``max_shard_bytes`` (default :data:`MAX_SHARD_BYTES`) the shard is written to a
    temporary file (a tensor larger than the limit gets a shard of its own). :meth:`finish`
    writes one ``model.safetensors`` when everything fit in one shard, else renames the shards
    to ``model-0000i-of-0000N.safetensors`` and writes ``model.safetensors.index.json``.
    """

    def __init__(self, folder: Path, max_shard_bytes: int | None = None,
                 metadata: Callable[[list[str]], dict[str, str]] | None = None) -> None:
        self.folder = folder
        #: extra safetensors metadata of a shard from the names written so far (torchao's per-tensor JSON)
        self.metadata = metadata
        self.max_shard_bytes = MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []  # written shard files and their tensor names
        self._names: set[str] = set()
        self._total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise LowbitError(name, "two tensors of the checkpoint have this name (a float tensor clashes with a "
                              "quantized tensor's)")
        t = tensor.detach().cpu().contiguous()
        nbytes = t.numel() * t.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        ptr = t.untyped_storage().data_ptr()
        if any(p.untyped_storage().data_ptr() == ptr for p in self._pending.values()):
            t = t.clone()  # e.g. one act-order g_idx shared by q/k/v: safetensors wants separate storage
        self._names.add(name)
        self._pending[name] = t
        self._pending_bytes += nbytes
        self._total += nbytes

    def _flush(self) -> None:
        path = self.folder / f".shard-{len(self._shards):05d}.partial"
        save_file(self._pending, str(path), metadata=self._metadata())
        self._shards.append((path, sorted(self._pending)))
        self._pending = {}
        self._pending_bytes = 0

    def _metadata(self) -> dict[str, str]:
        if self.metadata is None:
            return SAFETENSORS_METADATA
        return {**SAFETENSORS_METADATA, **self.metadata(sorted(self._names))}

    def finish(self) -> list[str]:
        """Write what is left and name the files; returns the weight file names."""
        if not self._shards:
            save_file(self._pending, str(self.folder / "model.safetensors"), metadata=self._metadata())
            self._pending = {}
            return ["model.safetensors"]
        if self._pending:
            self._flush()
        files = []
        weight_map = {}
        for i, (path, names) in enumerate(self._shards, 1):
            fname = f"model-{i:05d}-of-{len(self._shards):05d}.safetensors"
            path.rename(self.folder / fname)
            files.append(fname)
            weight_map.update(dict.fromkeys(names, fname))
        write_json(self.folder / "model.safetensors.index.json",
                   {"metadata": {"total_size": self._total}, "weight_map": dict(sorted(weight_map.items()))})
        return files


def linear_modules(config: Mapping[str, Any], source: Path | None = None) -> list[str]:
    """Names of every ``nn.Linear`` in the model a config describes (built on the meta device).

    When transformers cannot build the architecture, falls back (with a warning) to the 2-D
    ``*.weight`` tensors of ``source`` that are not embeddings or norms, plus ``lm_head``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_dict = {k: v for k, v in config.items() if k != "quantization_config"}
    model_type = cfg_dict.pop("model_type", None)
    try:
        if model_type is None:
            raise ValueError("config.json has no model_type")
        cfg = AutoConfig.for_model(model_type, **cfg_dict)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception as exc:  # noqa: BLE001 - any architecture transformers cannot build
        if source is None:
            raise LowbitError("config.json", f"cannot tell which modules are linear layers ({exc})") from None
        import warnings

        from ..models.checkpoint import Checkpoint

        warnings.warn(f"transformers cannot build this architecture ({exc}); guessing the linear layers "
                      "from 2-D weight names for the ignore lists", stacklevel=3)
        ckpt = Checkpoint(source)
        names = {n[: -len(".weight")] for n in ckpt.keys()
                 if n.endswith(".weight") and len(ckpt.shape(n)) == 2 and not re.search(r"embed|norm|wte|wpe", n)}
        if config.get("tie_word_embeddings"):
            names.add("lm_head")
        return sorted(names)
    return sorted(name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear))


@contextlib.contextmanager
def decoding(where: str) -> Iterator[None]:
    """Turn whatever goes wrong while decoding ``where`` (a module or tensor) into a :class:`LowbitError`.

    Bad checkpoint input shows up as shape or dtype errors deep in torch; the user gets one line
    naming the module instead of a traceback. Errors that already name their place pass through.
    """
    try:
        yield
    except LowbitError as exc:
        if exc.where is not None:
            raise
        raise LowbitError(where, exc.problem) from None
    except (ValueError, KeyError, IndexError, TypeError, RuntimeError) as exc:
        raise LowbitError(where, f"cannot be decoded: {type(exc).__name__}: {exc}") from None


def check_weight(name: str, qw: QuantizedWeight) -> None:
    """Internal consistency of one :class:`QuantizedWeight` (codes range, shapes, symmetric zeros)."""
    s = qw.scheme
    if s.type != "int" or qw.zero is None:
        raise LowbitError(name, f"{s.describe()} weights are not an integer grid with zero points")
    out_f, in_f = qw.codes.shape
    if qw.codes.numel() and (int(qw.codes.min()) < 0 or int(qw.codes.max()) > s.qmax):
        raise LowbitError(name, f"codes outside [0, {s.qmax}] for {s.bits}-bit")
    if s.granularity == "tensor":
        expected = (1, 1)
    elif s.granularity == "channel":
        expected = (out_f, 1)
    elif s.granularity != "group":
        raise LowbitError(name, f"{s.describe()}: {s.granularity} scales are not supported by this format")
    else:
        if in_f % s.group_size:
            raise LowbitError(name, f"group size {s.group_size} does not divide the {in_f} input columns")
        expected = (out_f, in_f // s.group_size)
    if tuple(qw.scale.shape) != expected:
        raise LowbitError(name, f"scale has shape {tuple(qw.scale.shape)}, expected {expected} for {s.describe()}")
    if s.symmetric and not bool((qw.zero == s.mid).all()):
        raise LowbitError(name, f"symmetric scheme but zero points differ from {s.mid}")
    z = qw.zero
    if bool((z != torch.round(z)).any()) or float(z.min()) < 0 or float(z.max()) > s.qmax:
        raise LowbitError(name, f"zero points must be integers in [0, {s.qmax}]")
    if qw.g_idx is not None:
        n_groups = qw.scale.shape[1]
        if int(qw.g_idx.min()) < 0 or int(qw.g_idx.max()) >= n_groups:
            raise LowbitError(name, f"g_idx values must lie in [0, {n_groups})")


def zero_points(qw: QuantizedWeight) -> torch.Tensor:
    """The integer grid's zero points (a :class:`LowbitError` for schemes without them)."""
    if qw.zero is None:
        raise LowbitError(None, f"{qw.scheme.describe()} weights have no zero points")
    return qw.zero


def per_channel(qw: QuantizedWeight) -> QuantizedWeight:
    """A per-tensor weight rewritten exactly as per-channel (its one scale repeated per row)."""
    from ..core.scheme import PER_CHANNEL

    if qw.scheme.granularity != "tensor":
        return qw
    zero = zero_points(qw)
    out_f = qw.codes.shape[0]
    scheme = replace(qw.scheme, group_size=PER_CHANNEL, strategy=None)
    return QuantizedWeight(qw.codes, qw.scale.reshape(1, 1).expand(out_f, 1).clone(),
                           zero.reshape(1, 1).expand(out_f, 1).clone(), scheme, None)


def trivial_g_idx(qw: QuantizedWeight) -> bool:
    """True when ``g_idx`` is absent or equals the default ``column // group_size`` mapping."""
    if qw.g_idx is None:
        return True
    in_f = qw.codes.shape[1]
    n_groups = qw.scale.shape[1]
    default = torch.arange(in_f) // (in_f // n_groups) if n_groups > 1 else torch.zeros(in_f, dtype=torch.int64)
    return bool((qw.g_idx.to(torch.int64).cpu() == default).all())


def pad_columns(codes: torch.Tensor, multiple: int) -> torch.Tensor:
    """Right-pad the last dimension with zeros to a multiple of ``multiple``."""
    n = codes.shape[-1]
    extra = (-n) % multiple
    if not extra:
        return codes
    return torch.nn.functional.pad(codes, (0, extra))


def exact_regex(module: str) -> str:
    """An anchored regex matching exactly one module name."""
    return "^" + re.escape(module) + "$"


#: vLLM fuses these sibling projections into one layer (its ``packed_modules_mapping``).
VLLM_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def fused_aliases(selected: set[str], linears: list[str]) -> list[str]:
    """vLLM's fused layer names (``...qkv_proj``, ``...gate_up_proj``) whose parts are all in ``selected``.

    Name-based rules (GPTQ ``dynamic``, AWQ ``modules_to_not_convert``) are matched by vLLM
    against fused layer names, so a rule about every part must also name the fused layer.
    """
    present = set(linears)
    out = []
    for fused, parts in VLLM_FUSED.items():
        for m in sorted(present):
            parent, _, leaf = m.rpartition(".")
            if leaf != parts[0]:
                continue
            members = [f"{parent}.{p}" for p in parts]
            if all(x in present for x in members) and all(x in selected for x in members):
                out.append(f"{parent}.{fused}")
    return sorted(out)


def warn_issues(issues: list[str], message: str) -> list[str]:
    """One warning: ``message``, then the first three issues and a count of the rest."""
    if issues:
        more = f" (and {len(issues) - 3} more)" if len(issues) > 3 else ""
        warnings.warn(f"{message}: {'; '.join(issues[:3])}{more}", stacklevel=4)
    return issues


#: vLLM marlin_utils: the kernel's minimum tile sizes and the group sizes it supports.
MARLIN_MIN_N = 64
MARLIN_MIN_K = 128
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)


def marlin_shape_issues(qw: QuantizedWeight, tensor_parallel: int = 1) -> list[str]:
    """Group-size and shape reasons why a Marlin kernel would not take ``qw`` (per tensor-parallel shard)."""
    out_f, in_f = qw.codes.shape
    why = []
    if qw.scheme.group_size not in MARLIN_GROUP_SIZES:
        why.append(f"group size {qw.scheme.group_size} (needs -1/32/64/128)")
    if (out_f // tensor_parallel) % MARLIN_MIN_N or out_f % tensor_parallel:
        why.append(f"out={out_f} not divisible by {MARLIN_MIN_N}")
    if (in_f // tensor_parallel) % MARLIN_MIN_K or in_f % tensor_parallel:
        why.append(f"in={in_f} not divisible by {MARLIN_MIN_K}")
    return why
