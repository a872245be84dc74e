"""Optional: our GPTQ / AWQ files read by transformers + optimum + GPTQModel (a real third-party reader).

GPTQModel pins other numpy / torchao versions, so it lives in a separate environment: set
``LOWBIT_GPTQMODEL_PYTHON`` to that environment's python (created with
``python -m venv --system-site-packages`` and ``pip install gptqmodel optimum -c constraints.txt``).
Skipped otherwise.
"""

from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

from lowbit import formats
from lowbit.core.scheme import QuantScheme
from lowbit.runtime import load_quantized

from formats_util import SRC, make_model, needs_model, synthetic_model, rtn_weights

PYTHON = os.environ.get("LOWBIT_GPTQMODEL_PYTHON")
SCRIPT = Path(__file__).parent / "external" / "gptqmodel_reader.py"

pytestmark = [
    needs_model,
    pytest.mark.slow,
    pytest.mark.skipif(not PYTHON or not Path(PYTHON).exists(), reason="set LOWBIT_GPTQMODEL_PYTHON to a python with gptqmodel"),
]

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
CASES = {
    "gptq_w4_sym_g32": ("gptq", lambda: rtn_weights(QuantScheme(4, 32, True), ATTN)),
    "gptq_w4_sym_g32_actorder": ("gptq", lambda: synthetic_model(QuantScheme(4, 32, True), seed=7, g_idx=True)),
    "gptq_w8_sym_channel": ("gptq", lambda: rtn_weights(QuantScheme(8, -1, True), ATTN)),
    "gptq_w3_asym_g32": ("gptq", lambda: synthetic_model(QuantScheme(3, 32, False), seed=3, min_zero=1)),
    "awq_w4_g32": ("awq", lambda: rtn_weights(QuantScheme(4, 32, False), ATTN)),
}


def test_gptqmodel_reads_our_checkpoints(tmp_path):
    folders = {}
    for key, (fmt, make) in CASES.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            folders[key] = formats.save(make_model(make()), SRC, tmp_path / key, fmt)
    out = tmp_path / "external.pt"
    proc = subprocess.run([PYTHON, str(SCRIPT), str(out), *map(str, folders.values())],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = torch.load(out)
    for key, folder in folders.items():
        r = results[str(folder)]
        print(f"{key}: read by {', '.join(r['kinds']) or 'no dequantizing module'}"
              f"{' + dequantize_gemm' if 'dequantize_gemm' in r else ''}")
        ours = formats.read(folder)
        theirs = dict(r["dequantized"])
        theirs.update(r.get("dequantize_gemm", {}))
        assert theirs, f"{key}: the external reader exposed no dequantized weights ({r['kinds']})"
        for name, w in theirs.items():
            mine = ours[name].dequantize()
            # their dequantization runs in float16: allow its rounding, nothing more
            tol = 2e-3 * float(mine.abs().max())
            assert float((w.t() - mine).abs().max()) <= tol, (key, name)
        model, _ = load_quantized(folder)
        with torch.no_grad():
            ids = model.generate(r["prompt"], max_new_tokens=12, do_sample=False)
        assert torch.equal(ids, r["ids"]), key
