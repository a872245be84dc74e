"""The W8A8 GEMM kernels (scaled-mm-fp8, int-mm-w8a8) against the fake-quant reference.

On the CPU the registry picks the reference for every layer; the kernels' selection rules (the
shapes torch._scaled_mm / torch._int_mm accept, which layers they take) are checked with a CUDA
device named but not used, and their arithmetic is checked by calling the kernels' functions on
CPU tensors (torch's CPU build has both GEMMs). The CUDA tests run the kernels through the
registry and skip without a GPU.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lowbit.core.floatq import quantize_fp8, quantize_int
from lowbit.core.presets import preset
from lowbit.core.scheme import QuantScheme
from lowbit.runtime import QuantLinear
from lowbit.runtime.activations import fake_quantize_input, quantize_rows, rows_quantizable
from lowbit.runtime.kernels import KERNELS, select
from lowbit.runtime.kernels import scaled_mm_fp8 as fp8_module
from lowbit.runtime.kernels._w8a8 import int_mm_accepts, int_mm_rows, scaled_mm_accepts
from lowbit.runtime.kernels.int_mm_w8a8 import int8_layer, int_mm_w8a8
from lowbit.runtime.kernels.scaled_mm_fp8 import fp8_layer, scaled_mm_fp8

FP8_TOKEN = QuantScheme(8, 0, strategy="token", dynamic=True, type="float")
FP8_TENSOR_DYN = QuantScheme(8, 0, dynamic=True, type="float")
FP8_STATIC = QuantScheme(8, 0, type="float")
INT8_TOKEN = QuantScheme(8, 0, True, strategy="token", dynamic=True)
INT8_STATIC = QuantScheme(8, 0, True)
FP8_W_CHANNEL = QuantScheme(8, -1, type="float")
FP8_W_TENSOR = QuantScheme(8, 0, type="float")
INT8_W = QuantScheme(8, -1, True)


def _x(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    x.reshape(-1, shape[-1])[0] = 0  # a zero token: scale 1
    x.reshape(-1, shape[-1])[-1, :4] = torch.tensor([40.0, -40.0, 1e-3, -0.0])  # beyond a static scale's range
    return x.to(dtype)


def _layer(wscheme: QuantScheme, ascheme: QuantScheme, out_f: int = 48, in_f: int = 64, bias: bool = True,
           seed: int = 1, dtype: torch.dtype = torch.bfloat16) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g).to(dtype)
    qw = (quantize_fp8 if wscheme.type == "float" else quantize_int)(w, wscheme, dtype)
    b = torch.randn(out_f, generator=g) if bias else None
    scale = None if ascheme.dynamic else torch.tensor([0.02])
    return QuantLinear.from_quantized(qw, b, ascheme, scale)


def _reference(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    layer.kernel = "torch"
    try:
        return layer(x)
    finally:
        layer.kernel = None


# ----------------------------------------------------------------------------- input rounding


@pytest.mark.parametrize("scheme", [FP8_TOKEN, FP8_TENSOR_DYN, FP8_STATIC, INT8_TOKEN, INT8_STATIC])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_rows_is_the_reference_rounding_bit_for_bit(scheme, dtype):
    x = _x((9, 64), dtype)
    scale = torch.tensor([0.02])
    codes, s = quantize_rows(x, scheme, scale)
    assert codes.dtype == (torch.float8_e4m3fn if scheme.type == "float" else torch.int8)
    assert s.dtype == torch.float32 and s.shape == ((9, 1) if scheme.granularity == "token" else (1, 1))
    assert torch.equal(codes.float() * s, fake_quantize_input(x.float(), scheme, scale))


def test_rows_quantizable_is_what_the_gemms_take():
    assert all(rows_quantizable(s) for s in (FP8_TOKEN, FP8_TENSOR_DYN, FP8_STATIC, INT8_TOKEN, INT8_STATIC))
    refused = [
        QuantScheme(8, 128, strategy="group", dynamic=True, type="float"),  # FP8_BLOCK's groups of 128
        QuantScheme(8, 0, False, strategy="token", dynamic=True),  # asymmetric int8
        QuantScheme(4, 0, True, strategy="token", dynamic=True),  # int4
        QuantScheme(8, 0, strategy="token", dynamic=True, type="float", float_format="e5m2"),
    ]
    assert not any(rows_quantizable(s) for s in refused)


# ----------------------------------------------------------------------------- selection rules


def test_shape_rules_of_the_gemms():
    # torch._scaled_mm: K and N multiples of 16 (any M); torch._int_mm: multiples of 8, M > 16 (padded)
    for k, n in ((4096, 4096), (4096, 14336), (14336, 4096), (576, 1536), (16, 16)):
        assert scaled_mm_accepts(k, n) and int_mm_accepts(k, n)
    for k, n in ((40, 48), (64, 40), (64, 24)):
        assert not scaled_mm_accepts(k, n) and int_mm_accepts(k, n)
    for k, n in ((4096, 12), (12, 4096), (0, 16), (100, 64)):
        assert not scaled_mm_accepts(k, n) and not int_mm_accepts(k, n)
    assert [int_mm_rows(m) for m in (1, 7, 16, 17, 33, 512)] == [32, 32, 32, 17, 33, 512]


def test_both_kernels_are_registered_above_the_reference():
    assert KERNELS.get("scaled-mm-fp8").priority > 0 and KERNELS.get("int-mm-w8a8").priority > 0


@pytest.mark.parametrize("name", ["FP8", "FP8_DYNAMIC", "W8A8"])
def test_the_cpu_runs_the_reference(name):
    p = preset(name)
    layer = _layer(p.weights, p.input_activations)
    assert select(layer, torch.randn(3, 64, dtype=torch.bfloat16)).name == "torch"


def test_which_layers_each_kernel_takes(monkeypatch):
    monkeypatch.setattr(fp8_module, "_fp8_capable", lambda index: True)  # a CUDA device named, never touched
    cuda = torch.device("cuda", 0)
    fp8, int8 = KERNELS.get("scaled-mm-fp8"), KERNELS.get("int-mm-w8a8")

    def takes(kernel, layer, shape=(2, 5, 64), dtype=torch.bfloat16):  # noqa: ANN001
        return kernel.supports(layer, cuda, shape, dtype)

    for ws, a in ((FP8_W_CHANNEL, FP8_TOKEN), (FP8_W_TENSOR, FP8_STATIC), (FP8_W_CHANNEL, FP8_STATIC),
                  (FP8_W_TENSOR, FP8_TENSOR_DYN)):
        layer = _layer(ws, a)
        assert fp8_layer(layer) and takes(fp8, layer) and not takes(int8, layer)
        assert not takes(fp8, layer, (2, 0, 64))  # no rows
        assert not takes(fp8, layer, dtype=torch.float64)
        assert not fp8.supports(layer, torch.device("cpu"), (2, 64), torch.bfloat16)
    assert not takes(fp8, _layer(FP8_W_CHANNEL, FP8_TOKEN, out_f=40))  # N not a multiple of 16
    assert not takes(fp8, _layer(FP8_W_CHANNEL, FP8_TOKEN, in_f=40), (2, 40))  # K
    monkeypatch.setattr(fp8_module, "_fp8_capable", lambda index: False)  # before sm89
    assert not takes(fp8, _layer(FP8_W_CHANNEL, FP8_TOKEN))

    for a in (INT8_TOKEN, INT8_STATIC):
        layer = _layer(INT8_W, a)
        assert int8_layer(layer) and takes(int8, layer) and not takes(fp8, layer)
        assert takes(int8, layer, (1, 64)) and takes(int8, layer, (700, 64))  # decode rows are padded
    assert takes(int8, _layer(INT8_W, INT8_TOKEN, out_f=40, in_f=24), (3, 24))  # multiples of 8 suffice
    assert not takes(int8, _layer(INT8_W, INT8_TOKEN, out_f=44))

    # left to the reference: weight-only, per-group activations, block weights, int4 weights, asymmetric inputs
    block = QuantScheme(8, 0, strategy="block", block=(16, 16), type="float")
    group = QuantScheme(8, 16, strategy="group", dynamic=True, type="float")
    others = [
        QuantLinear.from_quantized(quantize_fp8(torch.randn(48, 64), FP8_W_CHANNEL, torch.bfloat16)),
        _layer(block, group), _layer(FP8_W_CHANNEL, group), _layer(QuantScheme(4, 32, True), INT8_TOKEN),
        _layer(INT8_W, QuantScheme(8, 0, False, strategy="token", dynamic=True)),
        _layer(INT8_W, FP8_TOKEN), _layer(FP8_W_CHANNEL, INT8_TOKEN),
    ]
    for layer in others:
        assert not takes(fp8, layer) and not takes(int8, layer), layer.describe()


# ----------------------------------------------------------------------------- arithmetic (CPU GEMMs)


def _close(y: torch.Tensor, ref: torch.Tensor) -> None:
    """Within the rounding of the output's dtype (the reference rounds scaled inputs and weights first)."""
    assert y.dtype == ref.dtype and y.shape == ref.shape
    eps = 4e-6 if ref.dtype == torch.float32 else 2 * torch.finfo(ref.dtype).eps
    err = (y.float() - ref.float()).abs().max().item()
    assert err <= eps * ref.float().abs().max().item() + 1e-6, err


@pytest.mark.parametrize("wscheme, ascheme", [(FP8_W_CHANNEL, FP8_TOKEN), (FP8_W_TENSOR, FP8_STATIC),
                                              (FP8_W_CHANNEL, FP8_STATIC), (FP8_W_TENSOR, FP8_TENSOR_DYN),
                                              (INT8_W, INT8_TOKEN), (INT8_W, INT8_STATIC)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (2, 9, 64), (40, 64)])
def test_kernel_arithmetic_equals_the_reference(wscheme, ascheme, dtype, shape):
    layer = _layer(wscheme, ascheme, bias=len(shape) == 3)
    run = scaled_mm_fp8 if wscheme.type == "float" else int_mm_w8a8
    x = _x(shape, dtype, seed=len(shape))
    _close(run(layer, x), _reference(layer, x))


def test_fp8_unit_scales_then_scaling_equals_the_reference(monkeypatch):
    monkeypatch.setattr(fp8_module, "ROWWISE", False)  # tensor-wise GEMM with scales 1, float32 sums, then scale_rows
    for ws, a in ((FP8_W_CHANNEL, FP8_TOKEN), (FP8_W_TENSOR, FP8_TOKEN), (FP8_W_CHANNEL, FP8_STATIC)):
        layer = _layer(ws, a)
        x = _x((2, 9, 64), torch.bfloat16)
        _close(scaled_mm_fp8(layer, x), _reference(layer, x))


def test_rounding_pads_rows_with_zeros():
    from lowbit.runtime.kernels._rows_triton import quantize_rows_fast

    x = _x((5, 64))
    for scheme in (INT8_TOKEN, FP8_TOKEN, INT8_STATIC):
        q, s = quantize_rows_fast(x, scheme, torch.tensor([0.02]), rows=32)
        q0, s0 = quantize_rows(x, scheme, torch.tensor([0.02]))
        assert q.shape == (32, 64) and q.dtype == q0.dtype and torch.equal(q[:5].float(), q0.float())
        assert not q[5:].float().any() and torch.equal(s[:5], s0) and bool((s[5:] == 1).all())


def test_the_cached_weight_follows_the_layer():
    layer = _layer(INT8_W, INT8_TOKEN)
    x = _x((20, 64))
    before = int_mm_w8a8(layer, x)
    layer.scales.mul_(2)  # an in-place edit bumps the version: the cache is remade
    _close(int_mm_w8a8(layer, x), _reference(layer, x))
    assert not torch.allclose(before, int_mm_w8a8(layer, x))
    fp8 = _layer(FP8_W_CHANNEL, FP8_TOKEN)
    scaled_mm_fp8(fp8, x)
    fp8.qweight = fp8.qweight.float().neg().to(torch.float8_e4m3fn)  # a new tensor
    _close(scaled_mm_fp8(fp8, x), _reference(fp8, x))


# ----------------------------------------------------------------------------- CUDA

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("scheme", [FP8_TOKEN, FP8_STATIC, INT8_TOKEN, INT8_STATIC])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 4096), (17, 14336), (130, 576)])
def test_cuda_fused_input_rounding_is_the_torch_code_bit_for_bit(scheme, dtype, shape):
    from lowbit.runtime.kernels._rows_triton import fast_rows, quantize_rows_fast

    x = _x(shape, dtype, seed=shape[0]).cuda()
    scale = torch.tensor([0.02], device="cuda")
    codes, s = quantize_rows_fast(x, scheme, scale)
    ref_codes, ref_s = quantize_rows(x, scheme, scale)
    assert codes.dtype == ref_codes.dtype
    assert torch.equal(codes.view(torch.int8), ref_codes.view(torch.int8)) and torch.equal(s, ref_s)
    if importlib.util.find_spec("triton") is not None:
        assert fast_rows(x, scheme), "the Triton kernel failed and was turned off (see the warning)"


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("acc_dtype, m", [(torch.int32, 1), (torch.int32, 40), (torch.float32, 7)])
def test_cuda_scaling_launch_is_the_torch_code_bit_for_bit(dtype, acc_dtype, m, monkeypatch):
    from lowbit.runtime.kernels import _rows_triton

    g = torch.Generator().manual_seed(m)
    rows = max(m, 32)
    acc = (torch.randint(-(2**20), 2**20, (rows, 3000), generator=g) if acc_dtype == torch.int32
           else torch.randn(rows, 3000, generator=g) * 1e3).to(acc_dtype).cuda()
    sa, sb, bias = torch.rand(rows, 1).cuda(), torch.rand(1, 3000).cuda(), torch.randn(3000).cuda().to(dtype)
    for per_row in (sa, sa[:1, :1].contiguous()):
        for b in (None, bias):
            y = _rows_triton.scale_rows(acc, per_row, sb, b, m, dtype)
            if importlib.util.find_spec("triton") is not None:
                assert _rows_triton.ENABLED, "the Triton scaling kernel failed or differed and was turned off"
            monkeypatch.setattr(_rows_triton, "ENABLED", False)
            ref = _rows_triton.scale_rows(acc, per_row, sb, b, m, dtype)
            monkeypatch.setattr(_rows_triton, "ENABLED", True)
            assert torch.equal(y, ref)


@cuda
@pytest.mark.parametrize("name", ["FP8", "FP8_DYNAMIC", "W8A8"])
@pytest.mark.parametrize("m", [1, 16, 17, 130])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_kernels_match_the_reference(name, m, dtype):
    p = preset(name)
    kernel = "int-mm-w8a8" if name == "W8A8" else "scaled-mm-fp8"
    if kernel == "scaled-mm-fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need compute capability 8.9")
    layer = _layer(p.weights, p.input_activations, out_f=256, in_f=512).cuda()
    x = _x((m, 512), dtype, seed=m).cuda()
    assert select(layer, x).name == kernel
    _close(layer(x), _reference(layer, x))


# ----------------------------------------------------------------------------- whole checkpoints


@pytest.fixture(scope="module")
def w8a8_checkpoints(tmp_path_factory, stories_dir):
    import lowbit.api as lb
    from lowbit.recipe import Recipe

    out = {}
    for name in ("FP8_DYNAMIC", "W8A8"):
        out[name] = lb.quantize(stories_dir, tmp_path_factory.mktemp("w8a8") / name,
                                recipe=Recipe(scheme=preset(name).scheme))
    return out


@pytest.mark.parametrize("name", ["FP8_DYNAMIC", "W8A8"])
def test_load_quantized_applies_the_declared_input_quantization(w8a8_checkpoints, name):
    """The runtime's layers quantize their inputs as the checkpoint declares: the logits equal eval's
    (the dequantized model with the fake-quant hooks of lowbit.eval.numerics) exactly."""
    from lowbit.eval.numerics import apply
    from lowbit.models.loader import load
    from lowbit.runtime import load_quantized

    path = w8a8_checkpoints[name]
    model, _ = load_quantized(path)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.input_scheme == preset(name).input_activations for m in layers)
    ref = load(path).model
    assert apply(ref, path)
    ids = torch.tensor([[1, 400, 20, 30, 55, 7, 90, 300, 2, 5]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    if torch.cuda.is_available():  # the 64-wide attention projections run the kernels, the 172-wide MLP the reference
        model, _ = load_quantized(path, device="cuda", dtype=torch.bfloat16)  # (.to(bf16) would cast FP8 codes)
        kernel = "int-mm-w8a8" if name == "W8A8" else "scaled-mm-fp8"
        x = torch.randn(20, 64, device="cuda", dtype=torch.bfloat16)
        q = model.model.layers[0].self_attn.q_proj
        if kernel == "int-mm-w8a8" or torch.cuda.get_device_capability() >= (8, 9):
            assert select(q, x).name == kernel
        with torch.no_grad():
            logits = model(ids.cuda()).logits.float().cpu()
        expect = ref(ids).logits
        assert (logits - expect).abs().max() <= 0.05 * expect.abs().max()
