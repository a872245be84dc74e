"""Render bench/results/quality_calibrated.jsonl as the Markdown table bench/results/quality_calibrated.md."""
import json
rows = [json.loads(l) for l in open("bench/results/quality_calibrated.jsonl")]
seen = {}
for r in rows:
    seen[(r["scheme"], r["method"], r["calib"].split()[0] if r["method"] != "rtn" else "-")] = r
order = ["int3 asym g64", "int3 asym per-channel", "int4 asym g64", "int4 asym per-channel"]
out = ["# SmolLM2-135M-Instruct (from the Q4_1 GGUF, dequantized to float32): WikiText-2 test, 8 x 512-token chunks (second half of each chunk scored)",
       "", "Float model: PPL 24.497. KL = mean KL(float || quantized) per scored token; top-1 = agreement of the argmax token.",
       "Calibration 16 x 256 tokens: `pydoc` = Python's pydoc_data.topics; `selfgen` = 24 sequences sampled from the model itself (bench/selfgen_calibration.py, ~3.5k distinct tokens). AWQ scale search on 8 of the 16 samples.", "",
       "| scheme | method | calibration | PPL | KL | top-1 | quantize s (busy 2-core CPU) |", "|---|---|---|---|---|---|---|"]
for sch in order:
    for key in sorted(k for k in seen if k[0] == sch):
        r = seen[key]
        cal = "-" if r["method"] == "rtn" else ("selfgen" if "selfgen" in r["calib"] else "pydoc")
        out.append(f"| {sch} | {r['method']} | {cal} | {r['ppl']:.2f} | {r['kl']:.3f} | {r['top1']:.3f} | {r['quant_s']} |")
open("bench/results/quality_calibrated.md", "w").write("\n".join(out) + "\n")
print("\n".join(out))
