"""Generation speed end to end, float against quantized, on Llama-3-8B shapes (issue 16, item 2).

Makes a Llama-3-8B-shaped checkpoint of random BF16 weights (``--layers`` decoder layers of the
real shapes, the real 128256-token vocabulary; the tokenizer is only used for the prompt's ids, so
stories260K's small one serves), quantizes it with lowbit (RTN, ``--schemes``, on ``--device``),
then runs ``lowbit bench`` on the float model and each quantized one: prefill and decode tokens
per second with a KV cache, peak memory, each model in a fresh process, ratios against the float
model measured in the same run.

    python bench/bench_decode.py --device cuda --layers 32 --work /tmp/decode --out bench/results/decode_h100
    python bench/bench_decode.py --device cpu --layers 2 --hidden 1024 --prompt 64 --tokens 16   # a small CPU run
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def make_model(out: Path, layers: int, hidden: int, inter: int, heads: int, kv_heads: int, vocab: int,
               tokenizer: Path, device: str, seed: int = 0) -> Path:
    """A Llama checkpoint of random BF16 weights (N(0, 0.02), norms 1), made on ``device``, one shard per layer."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=device).manual_seed(seed)
    hd = hidden // heads

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device) * 0.02).to(torch.bfloat16).cpu()

    wmap: dict[str, str] = {}

    def shard(name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        wmap.update(dict.fromkeys(tensors, name))

    shard("embed.safetensors", {"model.embed_tokens.weight": rnd(vocab, hidden)})
    for i in range(layers):
        p = f"model.layers.{i}."
        ones = torch.ones(hidden, dtype=torch.bfloat16)
        shard(f"layer-{i:03d}.safetensors", {
            p + "input_layernorm.weight": ones, p + "post_attention_layernorm.weight": ones.clone(),
            p + "self_attn.q_proj.weight": rnd(heads * hd, hidden), p + "self_attn.k_proj.weight": rnd(kv_heads * hd, hidden),
            p + "self_attn.v_proj.weight": rnd(kv_heads * hd, hidden), p + "self_attn.o_proj.weight": rnd(hidden, heads * hd),
            p + "mlp.gate_proj.weight": rnd(inter, hidden), p + "mlp.up_proj.weight": rnd(inter, hidden),
            p + "mlp.down_proj.weight": rnd(hidden, inter)})
    shard("head.safetensors", {"model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                               "lm_head.weight": rnd(vocab, hidden)})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}, indent=1))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv_heads, "head_dim": hd, "hidden_act": "silu", "max_position_embeddings": 8192,
           "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
           "bos_token_id": 1, "eos_token_id": 2, "attention_bias": False, "mlp_bias": False}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in tokenizer.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


def main(argv: list[str] | None = None) -> None:
    from paths import STORIES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=None, help="default 3.5 x hidden (14336 for 4096)")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--schemes", nargs="+", default=["W4A16", "W8A16"])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tokenizer", default=str(STORIES))
    ap.add_argument("--work", default="/tmp/lowbit-decode-bench")
    ap.add_argument("--out", default=None, help="folder for results.json, table.txt and the plot")
    a = ap.parse_args(argv)
    from lowbit.api import quantize
    from lowbit.core.presets import preset
    from lowbit.eval.speed import BenchSettings, bench, format_bench, plot_bench
    from lowbit.recipe import Recipe

    work = Path(a.work)
    inter = a.intermediate or int(a.hidden * 3.5)
    heads = max(1, a.hidden // 128)
    t0 = time.perf_counter()
    src = make_model(work / "float", a.layers, a.hidden, inter, heads, max(1, heads // 4), a.vocab, Path(a.tokenizer),
                     a.device)
    print(f"made {src} in {time.perf_counter() - t0:.1f} s", flush=True)
    models = [str(src)]
    for name in a.schemes:
        out = work / name
        if out.exists():
            shutil.rmtree(out)
        t0 = time.perf_counter()
        quantize(src, out, method="rtn", recipe=Recipe(preset(name, "--schemes").weights), device=a.device)
        print(f"quantized {name} in {time.perf_counter() - t0:.1f} s", flush=True)
        models.append(str(out))
    settings = BenchSettings(prompt=a.prompt, tokens=a.tokens, device=a.device, threads=a.threads)
    results = bench(models, settings)
    desc = (f"Llama-3-8B shapes ({a.layers} layers, hidden {a.hidden}, vocab {a.vocab}), {a.device} "
            f"({torch.cuda.get_device_name() if a.device.startswith('cuda') else 'CPU'}), torch {torch.__version__}, "
            f"eager PyTorch (no CUDA graphs), prompt {a.prompt}, {a.tokens} tokens generated")
    table = desc + "\n" + format_bench(results)
    print(table, flush=True)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.txt").write_text(table + "\n")
        (out / "results.json").write_text(json.dumps({"setup": desc, "results": [r.as_dict() for r in results]},
                                                     indent=1))
        plot_bench(results, out / "decode.png")


if __name__ == "__main__":
    main()
