"""Every kind of file lowbit writes, made through the command line, reduced to content digests.

Used by ``tests/test_digests.py`` to prove that refactors keep the written bytes: the digests in
``tests/digests.json`` were made by this script before the architecture redesign (issue 9) and
every later version must reproduce them on the same machine type. Run it directly to print the
digests of the current code::

    python tests/digest_cases.py [--only NAME ...] > digests.json

What is hashed: every tensor (name, dtype, shape, bytes) of every safetensors file and the
``quantization_config`` of HF outputs; every tensor (name, type, shape, bytes) and every metadata
key of GGUF outputs except those holding paths of this run (``quantize.imatrix.file``, ``.dataset``,
``imatrix.datasets``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import struct
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("LOWBIT_SHARED", HERE.parents[0].parent / "shared"))
STORIES = SHARED / "models" / "stories260K"
WIKITEXT = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"

# paths that name this run's files, not content
VOLATILE_KEYS = {"quantize.imatrix.file", "quantize.imatrix.dataset", "imatrix.datasets"}


def make_synthetic_llama(folder: Path) -> Path:
    """A 2-layer llama whose rows are multiples of 256 (so every K and IQ type applies).

    Seeded random weights with a few outlier columns; stories260K's tokenizer (512 tokens).
    """
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((STORIES / "config.json").read_text())
    cfg.update(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
               head_dim=64, num_hidden_layers=2, tie_word_embeddings=False)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in ("tokenizer.json", "tokenizer_config.json", "tok512.model", "generation_config.json"):
        shutil.copy(STORIES / f, folder / f)
    g = torch.Generator().manual_seed(1234)
    h, ff, v, hd = 256, 512, 512, 64
    shapes = {"model.embed_tokens.weight": (v, h), "lm_head.weight": (v, h), "model.norm.weight": (h,)}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (4 * hd, h), p + "self_attn.k_proj.weight": (2 * hd, h),
            p + "self_attn.v_proj.weight": (2 * hd, h), p + "self_attn.o_proj.weight": (h, 4 * hd),
            p + "mlp.gate_proj.weight": (ff, h), p + "mlp.up_proj.weight": (ff, h),
            p + "mlp.down_proj.weight": (h, ff),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    tensors = {}
    for name, shape in sorted(shapes.items()):
        if len(shape) == 1:
            tensors[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            w = torch.randn(shape, generator=g) * 0.05
            cols = torch.randint(0, shape[1], (3,), generator=g)
            w[:, cols] *= 8.0  # outlier input channels
            tensors[name] = w
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


# --- digests -------------------------------------------------------------------------------------


def _safetensors_digest(path: Path, h: "hashlib._Hash") -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    for name in sorted(k for k in header if k != "__metadata__"):
        e = header[name]
        a, b = e["data_offsets"]
        h.update(f"{name}|{e['dtype']}|{e['shape']}|".encode())
        h.update(hashlib.sha256(data[base + a : base + b]).digest())


def folder_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        _safetensors_digest(f, h)
    cfg = json.loads((folder / "config.json").read_text())
    h.update(json.dumps(cfg.get("quantization_config"), sort_keys=True).encode())
    return h.hexdigest()


def gguf_digest(path: Path) -> str:
    from lowbit.gguf.reader import GGUFFile

    f = GGUFFile(path)
    h = hashlib.sha256()
    for key, vtype, value, sub in f.kv_entries():
        if key in VOLATILE_KEYS:
            continue
        if hasattr(value, "tolist"):
            value = value.tolist()
        h.update(json.dumps([key, int(vtype), value, None if sub is None else int(sub)], default=str).encode())
    for t in f.tensors:
        h.update(f"{t.name}|{int(t.type)}|{list(t.shape)}|".encode())
        h.update(hashlib.sha256(bytes(memoryview(f.data(t.name)))).digest())
    return h.hexdigest()


# --- the cases -----------------------------------------------------------------------------------

# IQ types whose torch encoders take tens of seconds here: pinned too, run with LOWBIT_SLOW_TESTS=1
SLOW = {"gguf-iq2_s-imatrix", "gguf-iq1_s-imatrix", "gguf-iq1_m-imatrix", "gguf-iq2_xs-imatrix"}


def cases(syn: str, imat: str, syn_f16: str, calib: str) -> dict[str, list[str]]:
    CALIB = ["--samples", "8", "--seq-len", "64", "--calib", calib]
    s = str(STORIES)
    out: dict[str, list[str]] = {
        # round-to-nearest, HF formats
        "rtn-ct-w4g32": ["quantize", syn, "--bits", "4", "--group-size", "32"],
        "rtn-ct-w8-channel": ["quantize", syn, "--bits", "8", "--group-size", "-1"],
        "rtn-ct-rules": ["quantize", s, "--bits", "3", "--group-size", "32", "--asym", "--mse-clip", "--group-fallback",
                         "--override", "down_proj=bits:8,group:-1", "--keep", r"layers\.0\."],
        "rtn-gptqfmt": ["quantize", syn, "--format", "gptq", "--bits", "4", "--group-size", "64"],
        "rtn-awqfmt": ["quantize", syn, "--format", "awq", "--bits", "4", "--group-size", "32", "--asym"],
        # GPTQ in every act-order mode, every format
        "gptq-static-ct": ["quantize", syn, "--method", "gptq", "--bits", "4", "--group-size", "32", *CALIB],
        "gptq-dynamic-gptqfmt": ["quantize", syn, "--method", "gptq", "--act-order", "dynamic", "--format", "gptq",
                                 "--bits", "4", "--group-size", "32", "--asym", *CALIB],
        "gptq-off-ct": ["quantize", syn, "--method", "gptq", "--act-order", "off", "--bits", "3", "--group-size", "-1",
                        *CALIB],
        "gptq-static-gptqfmt": ["quantize", syn, "--method", "gptq", "--format", "gptq", "--bits", "8",
                                "--group-size", "128", *CALIB],
        "gptq-stories-ct": ["quantize", s, "--method", "gptq", "--bits", "4", "--group-size", "4", *CALIB],
        # AWQ
        "awq-awqfmt": ["quantize", syn, "--method", "awq", "--format", "awq", "--bits", "4", "--group-size", "32",
                       "--asym", *CALIB],
        "awq-ct": ["quantize", syn, "--method", "awq", "--bits", "4", "--group-size", "64", *CALIB],
        "awq-stories-ct": ["quantize", s, "--method", "awq", "--bits", "4", "--group-size", "4", "--asym", *CALIB],
        # GGUF: float, plain mixes, mixes with an importance matrix, options, a GGUF source
        "gguf-stories-q8_0": ["quantize", s, "--to", "Q8_0"],
        "gguf-f16": ["quantize", syn, "--to", "F16"],
    }
    for mix in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_S", "Q6_K",
                "IQ4_NL", "IQ4_XS"):
        out[f"gguf-{mix.lower()}"] = ["quantize", syn, "--to", mix]
    for mix in ("Q4_K_M", "Q3_K_S", "Q2_K_S", "IQ4_XS", "IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S",
                "IQ1_S", "IQ1_M"):
        out[f"gguf-{mix.lower()}-imatrix"] = ["quantize", syn, "--to", mix, "--imatrix", imat]
    out["gguf-q4_k_m-pure"] = ["quantize", syn, "--to", "Q4_K_M", "--pure"]
    out["gguf-q4_0-options"] = ["quantize", syn, "--to", "Q4_0", "--tensor-type", "ffn_down=q8_0",
                                "--output-tensor-type", "q6_k", "--token-embedding-type", "q5_k"]
    out["gguf-from-gguf-q4_k_m"] = ["quantize", syn_f16, "--to", "Q4_K_M", "--imatrix", imat]
    # calibrated codes in GGUF blocks
    out["gguf-gptq-q4_0"] = ["quantize", syn, "--method", "gptq", "--bits", "4", "--group-size", "32",
                             "--format", "gguf", "--to", "Q4_0", *CALIB]
    out["gguf-gptq-q4_k"] = ["quantize", syn, "--method", "gptq", "--format", "gguf", "--to", "Q4_K", *CALIB]
    out["gguf-awq-q4_1"] = ["quantize", syn, "--method", "awq", "--bits", "4", "--group-size", "32", "--asym",
                            "--format", "gguf", "--to", "Q4_1", *CALIB]
    return out


def run_cases(workdir: Path, only: set[str] | None = None,
              log: Callable[[str], None] | None = None) -> dict[str, str]:
    """Make every case's output under ``workdir``; returns ``{case: digest}``."""
    from lowbit.cli import main

    warnings.simplefilter("ignore")
    workdir.mkdir(parents=True, exist_ok=True)
    syn = make_synthetic_llama(workdir / "syn")
    calib = workdir / "calib.txt"  # a slice of WikiText-2: tokenized in a moment, unlike the 1 MB pydoc set
    calib.write_text(WIKITEXT.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    digests: dict[str, str] = {}
    imat = workdir / "syn-imatrix.gguf"
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["--quiet", "imatrix", str(syn), "--text", str(WIKITEXT), "--ctx", "64", "--chunks", "8",
                   "-o", str(imat)])
    if rc != 0:
        raise RuntimeError("imatrix failed")
    digests["imatrix"] = gguf_digest(imat)
    syn_f16 = workdir / "syn-f16.gguf"
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["--quiet", "quantize", str(syn), "--to", "F16", "-o", str(syn_f16)])
    if rc != 0:
        raise RuntimeError("F16 conversion failed")
    slow = os.environ.get("LOWBIT_SLOW_TESTS") == "1"
    for name, argv in cases(str(syn), str(imat), str(syn_f16), str(calib)).items():
        if (only and name not in only) or (not only and name in SLOW and not slow):
            continue
        gguf = "--to" in argv or "gguf" in argv
        out = workdir / (name + (".gguf" if gguf else ""))
        with contextlib.redirect_stdout(io.StringIO()):
            rc = main(["--quiet", *argv, "-o", str(out)])
        if rc != 0:
            raise RuntimeError(f"case {name} failed with exit code {rc}")
        digests[name] = gguf_digest(out) if gguf else folder_digest(out)
        if log:
            log(f"{name}: {digests[name]}")
    return digests


if __name__ == "__main__":
    import tempfile

    only = set(sys.argv[sys.argv.index("--only") + 1 :]) if "--only" in sys.argv else None
    with tempfile.TemporaryDirectory(prefix="lowbit-digests-") as tmp:
        result = run_cases(Path(tmp), only, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(json.dumps(result, indent=1, sort_keys=True))
