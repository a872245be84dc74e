"""SqueezeLLM-style non-uniform quantization: a Fisher-weighted k-means lookup table per output row.

Sensitivity is the Fisher diagonal as SqueezeLLM takes it: the squared gradient of the model's
next-token loss with respect to every weight, summed over the calibration sequences (one
gradient per sequence, squared, then summed). It is computed before the layers are quantized,
with about one decoder layer in memory (:func:`fisher_diagonal`):

1. forward, layer by layer: each layer's inputs for every sequence are written to a scratch
   folder, the layer is freed;
2. the final norm and ``lm_head`` give each sequence's loss and its gradient at the last hidden
   state;
3. backward, layer by layer from the top: the layer is loaded again, run on its saved inputs
   with autograd, the incoming gradient pushed through it; the squared gradients of its linear
   weights are added up and written to the scratch folder, and the gradient at its input is
   what the layer below receives.

Why the true next-token loss rather than a layer-local proxy: a layer's own output error is
zero at the float weights (so is its gradient), and the Gauss-Newton of a layer's output sees
nothing of how the rest of the network uses it; the backward stream costs one forward and one
backward pass of the model with the same one-layer memory bound as the engine, plus the saved
inputs on disk (``sequences x tokens x hidden x 4`` bytes per layer).

Then each linear's rows are clustered by :func:`lowbit.core.lut.weighted_kmeans` (``2**bits``
centroids, deterministic), optionally after taking a fraction of outliers into a sparse float
matrix (dense-and-sparse: ``outliers`` by magnitude, ``sensitive`` by Fisher; SqueezeLLM's paper
uses 0.45% and 0.05%). Schemes: ``LUT4`` / ``LUT3`` (``codebook="learned"``, per channel).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lowbit.core.lut import ITERS, outlier_mask, split_outliers, weighted_kmeans
from lowbit.core.quantized import QuantizedWeight
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.fileio import atomic_file
from lowbit.models.adapters import set_weight
from lowbit.models.layers import LayerContext, LayerResult

from ._common import Rules, keeps_float, layer_weights, rules_fingerprint, scheme_lookup
from .registry import Method, register_method

#: how values are weighted in the k-means (``weighting``): the Fisher diagonal, or all equally
WEIGHTINGS = ("fisher", "none")


def lut_quantize(w: torch.Tensor, scheme: QuantScheme, fisher: torch.Tensor | None = None, outliers: float = 0.0,
                 sensitive: float = 0.0, iters: int = ITERS, where: str | None = None) -> QuantizedWeight:
    """One 2-D weight as per-row lookup tables weighted by ``fisher`` (``None``: equal weights)."""
    why = SqueezeLLM().supports(scheme)
    if why is not None:
        raise LowbitError(where, why)
    for name, frac in (("outliers", outliers), ("sensitive", sensitive)):
        if not 0.0 <= frac < 0.5:
            raise LowbitError(where, f"{name} must be a fraction in [0, 0.5), got {frac}")
    w = w.detach().float()
    if fisher is not None:
        fisher = fisher.to(w.device).float()
    mask = outlier_mask(w, fisher, outliers, sensitive) if (outliers or sensitive) else None
    dense_w, f = w, fisher
    if mask is not None:  # outliers leave the clustering (value 0, weight 0), as SqueezeLLM removes them
        dense_w = torch.where(mask, torch.zeros_like(w), w)
        f = torch.where(mask, torch.zeros_like(w), torch.ones_like(w) if f is None else f)
    lut, codes = weighted_kmeans(dense_w, f, scheme.bits, iters=iters, where=where)
    extra: dict[str, torch.Tensor] = {}
    if mask is not None:
        codes, extra = split_outliers(w, lut, codes, mask)
    scale = torch.ones(w.shape[0], 1, dtype=torch.float32, device=w.device)
    return QuantizedWeight(codes, scale, None, scheme, codebook=lut, extra=extra)


# --- the Fisher diagonal, one layer in memory --------------------------------------------------


def _linears(adapter: Any, layer: torch.nn.Module, index: int) -> list[str]:
    from lowbit.models.adapters import is_expert_slot

    names = [n for g in adapter.sequential_for(layer) for n in g]
    if any(is_expert_slot(adapter, n) for n in names):
        raise LowbitError(f"layer {index}", "squeezellm: routed experts (MoE) are not supported")
    return names


def fisher_diagonal(config: Any, ckpt: Any, calib: Any, folder: Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, lm_head: bool = False) -> int:
    """Write the Fisher diagonal of every decoder-layer linear to ``folder/fisher_{i:03d}.safetensors``
    (layer-relative names; ``fisher_outer.safetensors`` holds ``lm_head.weight`` when ``lm_head``);
    returns the number of layers. See the module doc."""
    from lowbit.models.adapters import get_submodule
    from lowbit.models.capture import capture_all_layer_args, free_outer, layer_stack, materialise_outer
    from lowbit.models.layers import free_layer, load_layer_weights, run_layer
    from lowbit.progress import bar

    device = torch.device(device)
    adapter, model, layers = layer_stack(config)
    n_layers = len(layers)
    materialise_outer(adapter, model, ckpt, device, dtype)
    ids_list, masks, kwargs, hidden = [], [], [], []
    for ids, m in calib.batches(1):  # one sequence at a time: one gradient per sequence
        ids, m = ids.to(device), None if m is None else m.to(device)
        h, kws = capture_all_layer_args(adapter, model, ids, m)
        ids_list.append(ids)
        masks.append(m)
        kwargs.append(kws)
        hidden.append(h)
    free_outer(adapter, model)
    for p in model.parameters():
        p.requires_grad_(False)

    progress = bar(2 * n_layers, desc=f"fisher {n_layers} layers", unit="layer")
    for i in range(n_layers):  # forward: save each layer's inputs
        save_file({str(s): h.contiguous().cpu() for s, h in enumerate(hidden)}, str(folder / f"inputs_{i:03d}.safetensors"))
        layer = layers[i]
        load_layer_weights(adapter, layer, ckpt, i, device, dtype)
        _linears(adapter, layer, i)
        with torch.no_grad():
            hidden = [run_layer(layer, h, kw[i]) for h, kw in zip(hidden, kwargs)]
        free_layer(layer)
        progress.update(1)

    grads, head_fisher = _head_gradients(model, adapter, config, ckpt, hidden, ids_list, masks, device, dtype, lm_head)
    if head_fisher is not None:
        save_file({"lm_head.weight": head_fisher.cpu()}, str(folder / "fisher_outer.safetensors"))
    del hidden

    for i in reversed(range(n_layers)):  # backward: push the gradient down, square the weights' gradients
        layer = layers[i]
        load_layer_weights(adapter, layer, ckpt, i, device, dtype)
        for p in layer.parameters():
            p.requires_grad_(False)
        names = _linears(adapter, layer, i)
        params = {n: get_submodule(layer, n).weight for n in names}
        for p in params.values():
            p.requires_grad_(True)
        acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        inputs = load_file(str(folder / f"inputs_{i:03d}.safetensors"), device=str(device))
        for s in range(len(grads)):
            x = inputs[str(s)].requires_grad_(True)
            with torch.enable_grad():
                out = run_layer(layer, x, kwargs[s][i])
                out.backward(grads[s])
            for n, p in params.items():
                if p.grad is not None:
                    acc[n].add_(p.grad.float().square())
                    p.grad = None
            assert x.grad is not None
            grads[s] = x.grad.detach()
        (folder / f"inputs_{i:03d}.safetensors").unlink()
        save_file({n: a.cpu().contiguous() for n, a in acc.items()}, str(folder / f"fisher_{i:03d}.safetensors"))
        for p in params.values():
            p.requires_grad_(False)
        free_layer(layer)
        progress.update(1)
    progress.close()
    return n_layers


def _head_gradients(model: Any, adapter: Any, config: Any, ckpt: Any, hidden: list[torch.Tensor],
                    ids_list: list[torch.Tensor], masks: list[torch.Tensor | None], device: torch.device,
                    dtype: torch.dtype, lm_head: bool) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Each sequence's mean next-token loss through the final norm and ``lm_head``: the gradients at
    the last hidden states, and (``lm_head``) the summed squared gradients of ``lm_head``'s weight."""
    from lowbit.models.adapters import get_submodule

    norm = get_submodule(model, adapter.norm)
    norm.to_empty(device=device)
    with torch.no_grad():
        for name, p in norm.named_parameters():
            p.copy_(ckpt.get(f"{adapter.norm}.{name}").to(device, dtype))
            p.requires_grad_(False)
    key = "lm_head.weight" if "lm_head.weight" in ckpt else f"{adapter.embed}.weight"  # tied embeddings
    head = ckpt.get(key).to(device, dtype).requires_grad_(lm_head)
    text_config = getattr(config, "text_config", config)
    cap = getattr(text_config, "final_logit_softcapping", None)
    grads: list[torch.Tensor] = []
    head_fisher = torch.zeros_like(head) if lm_head else None
    for h, ids, m in zip(hidden, ids_list, masks):
        x = h.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = F.linear(norm(x), head).float()
            if cap:
                logits = torch.tanh(logits / cap) * cap
            labels = ids[:, 1:].clone()
            if m is not None:
                labels[m[:, 1:] == 0] = -100
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
            loss.backward()
        assert x.grad is not None
        grads.append(x.grad.detach())
        if head_fisher is not None and head.grad is not None:
            head_fisher.add_(head.grad.float().square())
            head.grad = None
    norm.to_empty(device="meta")
    return grads, head_fisher


def _fisher_key(config: Any, ckpt: Any, calib: Any, dtype: torch.dtype, lm_head: bool) -> str:
    """What a kept Fisher diagonal depends on: the model (config and tensor shapes), the calibration tokens."""
    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    h.update(json.dumps(sorted((n, list(ckpt.shape(n))) for n in ckpt.keys())).encode())
    h.update(calib.input_ids.to(torch.int64).contiguous().numpy().tobytes())
    if calib.attention_mask is not None:
        h.update(calib.attention_mask.to(torch.int64).contiguous().numpy().tobytes())
    h.update(f"{dtype} {lm_head}".encode())
    return h.hexdigest()


@dataclass
class _Kept:
    """A folder the user keeps (``fisher_dir``), seen like a :class:`~lowbit.models.store.ScratchDir`."""

    path: Path


# --- the handler ---------------------------------------------------------------------------------


@dataclass
class SqueezeLLMHandler:
    """Per-row lookup tables for every linear of the layer, weighted by the Fisher diagonal of :meth:`prepare`."""

    scheme: QuantScheme
    rules: Rules = None
    outliers: float = 0.0
    sensitive: float = 0.0
    weighting: str = "fisher"
    iters: int = ITERS
    #: a folder keeping the Fisher diagonal between runs (same model, calibration tokens and plan: reused)
    fisher_dir: str | None = None
    propagate: str = "quantized"
    needs_inputs: bool = False  # the Fisher pass reads the calibration data, the layers do not
    _folder: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise LowbitError("squeezellm", f"unknown weighting {self.weighting!r} (choose from {', '.join(WEIGHTINGS)})")
        for name in ("outliers", "sensitive"):
            if not 0.0 <= float(getattr(self, name)) < 0.5:
                raise LowbitError("squeezellm", f"{name} must be a fraction in [0, 0.5), got {getattr(self, name)}")
        if self.sensitive and self.weighting == "none":
            raise LowbitError("squeezellm", "sensitive outliers need the Fisher sensitivity")

    @property
    def wants_calibration(self) -> bool:
        return self.weighting == "fisher"

    def fingerprint(self) -> dict[str, Any]:
        return {"method": "squeezellm", "scheme": self.scheme, "rules": rules_fingerprint(self.rules),  # not fisher_dir
                "outliers": self.outliers, "sensitive": self.sensitive, "weighting": self.weighting,
                "iters": self.iters}

    def prepare(self, config: Any, ckpt: Any, calib: Any, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> None:
        """The Fisher pass over the whole model (one layer in memory) before the layers are quantized."""
        if self.weighting != "fisher":
            return
        if calib is None:
            raise LowbitError("calibration", "squeezellm's Fisher sensitivity needs calibration data")
        from lowbit.models.store import ScratchDir

        lookup = scheme_lookup(self.scheme, self.rules)
        lm_head = lookup("lm_head.weight") is not None
        if self.fisher_dir is None:
            self._folder = ScratchDir("lowbit-fisher-")
            fisher_diagonal(config, ckpt, calib, self._folder.path, device, dtype, lm_head=lm_head)
            return
        folder = Path(self.fisher_dir)
        key = _fisher_key(config, ckpt, calib, dtype, lm_head)
        stamp = folder / "fisher.json"
        self._folder = _Kept(folder)
        if stamp.exists() and json.loads(stamp.read_text()).get("key") == key:
            return
        folder.mkdir(parents=True, exist_ok=True)
        fisher_diagonal(config, ckpt, calib, folder, device, dtype, lm_head=lm_head)
        with atomic_file(stamp, overwrite=True) as tmp:  # written last: the folder is complete
            tmp.write_text(json.dumps({"key": key}) + "\n")

    def _fisher(self, file: str) -> dict[str, torch.Tensor]:
        if self.weighting != "fisher":
            return {}
        if self._folder is None:
            raise LowbitError("squeezellm", "no Fisher diagonal: run through the pipeline (prepare) or pass weighting='none'")
        path = Path(self._folder.path) / file
        return load_file(str(path)) if path.exists() else {}

    def round(self, w: torch.Tensor, scheme: QuantScheme, fisher: torch.Tensor | None, where: str) -> QuantizedWeight:
        return lut_quantize(w, scheme, fisher, self.outliers, self.sensitive, self.iters, where=where)

    def process(self, ctx: LayerContext) -> LayerResult:
        res = LayerResult()
        lookup = scheme_lookup(self.scheme, self.rules)
        fisher = self._fisher(f"fisher_{ctx.index:03d}.safetensors")
        for name, w, full, scheme in layer_weights(ctx, lookup):
            qw = self.round(w, scheme, fisher.get(name), full)
            set_weight(ctx.adapter, ctx.layer, name, qw.dequantize(w.dtype))
            res.weights[name] = qw.to("cpu")
        return res

    def quantize_linear(self, name: str, w: torch.Tensor, scheme: QuantScheme, inputs: list[torch.Tensor] | None,
                        masks: list[torch.Tensor | None]) -> QuantizedWeight | None:
        if keeps_float(scheme, w, name):
            return None
        fisher = self._fisher("fisher_outer.safetensors").get(name)
        if fisher is None and self.weighting == "fisher":
            warnings.warn(f"{name}: no Fisher diagonal; clustered with equal weights", stacklevel=2)
        return self.round(w, scheme, fisher, name)


@register_method
class SqueezeLLM(Method):
    """SqueezeLLM: per-row lookup tables by Fisher-weighted k-means (calibrated; --scheme LUT4/LUT3, --outliers)"""

    name = "squeezellm"
    calibrated = True
    calibration_default = (32, 512)
    options = ("outliers", "sensitive", "weighting", "iters", "fisher_dir")

    def handler(self, scheme: QuantScheme, rules: Rules, act_order: bool | str | None = None,
                **options: Any) -> SqueezeLLMHandler:
        if act_order not in (None, False, "off"):
            raise LowbitError("squeezellm", "act_order applies to GPTQ only")
        unknown = set(options) - set(self.options)
        if unknown:
            raise LowbitError("squeezellm", f"unknown option(s) {', '.join(sorted(unknown))} "
                              f"(choose from {', '.join(self.options)})")
        return SqueezeLLMHandler(scheme, rules=rules, **options)

    def supports(self, scheme: QuantScheme) -> str | None:
        if scheme.type != "codebook" or scheme.codebook != "learned":
            return (f"squeezellm learns a lookup table per output row (--scheme LUT4 or LUT3), "
                    f"not {scheme.describe()}")
        if scheme.granularity != "channel":
            return f"squeezellm's tables are per output row (per channel), not {scheme.granularity}"
        if not 2 <= scheme.bits <= 8:
            return f"squeezellm tables have 2 to 8 bits, not {scheme.bits}"
        if scheme.dynamic or scheme.activations is not None:
            return "squeezellm quantizes weights only (static)"
        return None
