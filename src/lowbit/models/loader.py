"""One entry point for every model source: HF folder, GGUF file, ``hf:org/name``, demo name.

``resolve`` turns any source into a Hugging Face folder (GGUF files are dequantized once into
lowbit's cache); ``load`` builds the transformers model from it without random initialisation
and fills it tensor by tensor from the lazy :class:`Checkpoint`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import LowbitError
from .architectures import MODEL_TYPES
from .cache import cache_dir
from .checkpoint import Checkpoint, read_json
from .demo import DEMOS, demo_gguf
from .gguf_source import content_digest, convert_gguf_to_hf
from .hub import hub_snapshot
from .spec import check_spec, remember_conversion
from .validate import check_checkpoint, config_errors, validate_hf_config

SUPPORTED_MODEL_TYPES = MODEL_TYPES  # lowbit.models.architectures: the one table of supported families
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from and the Hugging Face folder that now holds it."""

    spec: str
    kind: str  # "hf" | "gguf" | "hub" | "demo" | "quantized"
    hf_dir: Path
    gguf_path: Path | None = None

    def __post_init__(self) -> None:
        if self.gguf_path is not None:  # messages about the converted folder name the user's source
            remember_conversion(self.hf_dir, self.spec)

    @property
    def quantization_config(self) -> dict[str, Any] | None:
        return read_config(self.hf_dir).get("quantization_config")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    config: Any
    source: ModelSource


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.exists():
        raise LowbitError(folder, "not a model folder (no config.json)")
    cfg = read_json(path, "config.json", strict=False)
    if not isinstance(cfg, dict):
        raise LowbitError(path, "config.json is not a JSON object")
    return cfg


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _gguf_to_folder(path: Path) -> Path:
    """The Hugging Face folder converted from a GGUF file, cached under the file's content digest
    (a file changed anywhere, even at the same size, is converted again); reuse is announced."""
    digest = content_digest(path)
    out = cache_dir() / "models" / f"{path.stem}-{digest[:24]}"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        warnings.warn(f"{path}: reusing its converted copy {out} (same content, sha256 {digest[:12]}...)",
                      stacklevel=2)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    return convert_gguf_to_hf(path, out, sha256=digest)


def resolve(source: str | Path | ModelSource) -> ModelSource:
    """Turn a source (path, GGUF, ``hf:org/name`` or demo name) into a Hugging Face folder."""
    if isinstance(source, ModelSource):
        return source
    spec = str(source)
    if spec in DEMOS:
        gguf_path = demo_gguf(spec)
        return ModelSource(spec, "demo", _gguf_to_folder(gguf_path), gguf_path)
    if spec.startswith("hf:"):
        folder = hub_snapshot(spec[3:])
        validate_hf_config(read_config(folder), folder / "config.json")
        return ModelSource(spec, "hub", folder)
    check_spec(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        cfg = read_config(path)
        validate_hf_config(cfg, path / "config.json")  # values only; the tensors are checked where they are used
        kind = "quantized" if "quantization_config" in cfg and not _float_with_kv(cfg) else "hf"
        return ModelSource(spec, kind, path)
    if path.suffix == ".gguf" or is_gguf(path):
        if not is_gguf(path):
            raise LowbitError(path, "not a GGUF file (bad magic bytes)")
        return ModelSource(spec, "gguf", _gguf_to_folder(path), path)
    raise LowbitError(path, "not a model: expected a Hugging Face folder, a .gguf file, hf:ORG/NAME or a demo name")


def _float_with_kv(cfg: dict[str, Any]) -> bool:
    """Float weights with an FP8 KV cache (compressed-tensors ``dense`` + ``kv_cache_scheme``): a float
    model (kind ``hf``) whose ``self_attn.k_scale`` / ``v_scale`` eval applies (:mod:`lowbit.eval.numerics`)."""
    from ..formats.kv_cache import is_float_with_kv

    return is_float_with_kv(cfg.get("quantization_config"))


class _WithoutKVScales:
    """A checkpoint's names and shapes less its KV-cache scales, for :func:`check_checkpoint`."""

    def __init__(self, ckpt: Checkpoint) -> None:
        from ..formats.kv_cache import is_kv_scale

        self.ckpt, self.folder, self._skip = ckpt, ckpt.folder, is_kv_scale

    def keys(self) -> list[str]:
        return [n for n in self.ckpt.keys() if not self._skip(n)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and not self._skip(name) and name in self.ckpt

    def shape(self, name: str) -> Any:
        return self.ckpt.shape(name)

    def file_of(self, name: str) -> Any:
        return self.ckpt.file_of(name)


def check_architecture(folder: Path, cfg: dict[str, Any]) -> str:
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise LowbitError(
            folder / "config.json",
            f"unsupported architecture {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})",
        )
    return str(model_type)


def build_empty_model(folder: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The transformers model for ``folder``'s config, with weights on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = read_config(folder)
    check_architecture(folder, cfg)
    cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
    with config_errors(folder / "config.json"):  # a value transformers refuses: one line naming the file
        config = AutoConfig.for_model(**cfg)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    return model.eval()


def fill_model(model: torch.nn.Module, tensors: dict[str, torch.Tensor] | Checkpoint, where: Path,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
    """Assign tensors to a meta-device model by name; tied and buffer tensors are rebuilt."""
    names = tensors.keys()
    params = dict(model.named_parameters())
    missing = [n for n in params if n not in names]
    tied = getattr(model.config, "tie_word_embeddings", False)
    if missing and not (tied and missing == ["lm_head.weight"]):
        raise LowbitError(where, f"checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
    for name in params:
        if name not in names:
            continue
        t = tensors.get(name) if isinstance(tensors, Checkpoint) else tensors[name]
        if t.shape != params[name].shape:
            raise LowbitError(where, f"tensor {name} has shape {tuple(t.shape)}, the config expects {tuple(params[name].shape)}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise LowbitError(where, f"tensor {name} has NaN or Inf values")
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(module, attr, torch.nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False))
    if tied:
        model.tie_weights()
    _materialize_buffers(model, device)


def _materialize_buffers(model: torch.nn.Module, device: str | torch.device) -> None:
    """Rebuild modules whose buffers the meta device left empty (rotary embeddings)."""
    for name, module in list(model.named_modules()):
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        if hasattr(module, "scalar_embed_scale"):  # Gemma's scaled embeddings
            module.embed_scale = torch.tensor(module.scalar_embed_scale, device=device)
            continue
        if not type(module).__name__.endswith("RotaryEmbedding"):
            raise LowbitError(None, f"cannot rebuild the buffers of {name} ({type(module).__name__})")
        fresh = type(module)(module.config).to(device)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, fresh)


def load_tokenizer(folder: Path, gguf: Path | None = None) -> Any:
    """The model's tokenizer. For a model that came from a GGUF file (``gguf``, else the file named
    in the folder's ``lowbit_source.json``, which outputs quantized from it carry too) text is
    tokenized by llama.cpp's own tokenizer of that file when llama-cpp-python is installed
    (:func:`lowbit.gguf.llamacpp.gguf_tokenizer`), so token ids are llama.cpp's."""
    from transformers import AutoTokenizer

    from ..gguf.llamacpp import gguf_tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001
            raise LowbitError(folder, f"could not load the tokenizer ({exc.__class__.__name__})") from None
    if gguf is None:
        gguf = _source_gguf(folder)
    return gguf_tokenizer(tok, gguf)


def _source_gguf(folder: Path) -> Path | None:
    """The GGUF file a converted folder (or an output quantized from one) came from, if recorded."""
    import json

    try:
        rec = json.loads((Path(folder) / "lowbit_source.json").read_text())
    except (OSError, ValueError):
        return None
    g = rec.get("gguf") if isinstance(rec, dict) else None
    return Path(g) if isinstance(g, str) else None


def load(source: str | Path | ModelSource, dtype: torch.dtype = torch.float32,
         device: str | torch.device = "cpu") -> LoadedModel:
    """Load any source as a float transformers model (quantized outputs are dequantized)."""
    src = resolve(source)
    tensors: Any
    if src.kind == "quantized":
        from ..formats import read_checkpoint  # a lowbit or third-party quantized checkpoint

        weights, floats, _ = read_checkpoint(src.hf_dir)
        tensors = {**floats, **{name: qw.dequantize() for name, qw in weights.items()}}
    else:
        tensors = Checkpoint(src.hf_dir)
    model = build_empty_model(src.hf_dir, dtype)
    if isinstance(tensors, Checkpoint):  # names and shapes against the architecture, before reading any
        kv = _float_with_kv(read_config(src.hf_dir))  # fill_model takes only the model's parameters
        check_checkpoint(model.config, _WithoutKVScales(tensors) if kv else tensors, src.gguf_path, model=model)
    fill_model(model, tensors, src.hf_dir, dtype, device)
    return LoadedModel(model, load_tokenizer(src.hf_dir, src.gguf_path), model.config, src)
