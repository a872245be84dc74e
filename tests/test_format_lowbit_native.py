"""The one-file format ``lowbit``: any scheme round-trips exactly, and lowbit's runtime loads it."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from lowbit import api, formats
from lowbit.core.quantized import QuantizedModel, QuantizedWeight
from lowbit.core.scheme import QuantScheme
from lowbit.models import Checkpoint
from lowbit.recipe import Recipe
from paths import STORIES


def test_every_kind_of_weight_round_trips(tmp_path: Path) -> None:
    ck = Checkpoint(STORIES)
    q, k, v = (f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv")
    wq = ck.get(q).float()
    fp8 = (wq / 0.01).to(torch.float8_e4m3fn)
    codes = torch.randint(0, 16, tuple(ck.get(k).shape))
    weights = {
        q: QuantizedWeight(fp8, torch.full((64, 1), 0.01), None, QuantScheme(8, -1, type="float")),
        k: QuantizedWeight(codes, torch.rand(codes.shape[0], 1), None, QuantScheme(4, -1, type="codebook", codebook="learned"),
                           codebook=torch.randn(codes.shape[0], 16)),
        v: QuantizedWeight(torch.randint(0, 8, tuple(ck.get(v).shape)), torch.rand(32, 8), torch.full((32, 8), 4.0),
                           QuantScheme(3, 8, True)),
    }
    out = formats.save(QuantizedModel(weights, {}, {}, "test"), STORIES, tmp_path / "o", format="lowbit")
    assert formats.detect_format(out) == "lowbit"
    back = formats.read(out)
    for name, qw in weights.items():
        assert back[name].scheme == qw.scheme and torch.equal(back[name].dequantize(), qw.dequantize())


def test_runtime_loads_it_like_the_same_weights_in_compressed_tensors(tmp_path: Path) -> None:
    from lowbit.models import load

    recipe = Recipe(scheme=QuantScheme(4, 4, False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = api.quantize(STORIES, tmp_path / "native", recipe=recipe, format="lowbit")
        b = api.quantize(STORIES, tmp_path / "ct", recipe=recipe, format="compressed-tensors")
    ids = torch.arange(1, 33).reshape(1, -1)
    with torch.no_grad():
        la, lb = load(a).model(input_ids=ids).logits, load(b).model(input_ids=ids).logits
    assert torch.equal(la, lb)
