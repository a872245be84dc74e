"""Read lowbit GPTQ / AWQ checkpoints with transformers + optimum + GPTQModel (run in an env that has them).

Usage: python gptqmodel_reader.py OUT.pt CHECKPOINT_DIR...
For each folder: load with ``AutoModelForCausalLM.from_pretrained(device_map="cpu")``, record
every quantized module's ``dequantize_weight()`` (``[in, out]``, before any forward pass
repacks it) and the greedy continuation of a fixed prompt; for AWQ folders also run
GPTQModel's AutoAWQ-derived ``dequantize_gemm`` on the raw tensors.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

results = {}
for folder in map(Path, sys.argv[2:]):
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    deq, kinds = {}, set()
    for name, mod in model.named_modules():
        if hasattr(mod, "qweight") and hasattr(mod, "dequantize_weight"):
            kinds.add(type(mod).__name__)
            deq[name + ".weight"] = mod.dequantize_weight().float().detach().clone()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    entry = {"dequantized": deq, "kinds": sorted(kinds), "prompt": ids, "ids": out}
    q = json.loads((folder / "config.json").read_text())["quantization_config"]
    if q["quant_method"] == "awq":
        from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

        t = load_file(str(folder / "model.safetensors"))
        entry["dequantize_gemm"] = {
            k[: -len(".qweight")] + ".weight": dequantize_gemm(
                t[k], t[k[: -len("qweight")] + "qzeros"], t[k[: -len("qweight")] + "scales"], q["bits"], q["group_size"]
            ).float()
            for k in t
            if k.endswith(".qweight")
        }
    results[str(folder)] = entry
    print(folder.name, sorted(kinds), len(deq), flush=True)
torch.save(results, sys.argv[1])
