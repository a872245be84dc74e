"""lowbit's GGUF mixes as per-tensor SHA-256 digests, for byte comparison on another machine.

The IQ1-IQ3 encoders are slow on a small CPU and fast on a GPU, and llama.cpp (the reference)
may not be installed where the GPU is.  This script writes lowbit's file for every requested
mix (on ``--device``), records the SHA-256 of each tensor's data, the file size and bits per
weight, and deletes the file; ``bench/gguf_quality.py --ours-digests FILE`` then compares the
digests with llama.cpp's files made from the same F16 base and the same imatrix (the base's
digest is recorded too, so a different base is detected).

    python bench/gguf_digests.py --model SOURCE.gguf --imatrix-file imatrix.gguf \\
        --mixes IQ2_XXS,IQ3_S --device cuda --out digests.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
import warnings
from pathlib import Path


def tensor_digests(path: Path) -> dict[str, str]:
    from lowbit.gguf.reader import GGUFFile

    f = GGUFFile(path)
    return {t.name: hashlib.sha256(memoryview(f.data(t.name)).cast("B")).hexdigest() for t in f.tensors}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="any source lowbit loads")
    ap.add_argument("--mixes", required=True)
    ap.add_argument("--imatrix", choices=["no", "yes", "both"], default="both")
    ap.add_argument("--imatrix-file", default=None, help="imatrix to use (needed for --imatrix yes/both)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--work", default="/tmp/lowbit-gguf-digests")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    import torch

    from lowbit.errors import LowbitError
    from lowbit.gguf.convert import quantize_to_gguf
    from lowbit.gguf.reader import inspect_gguf

    warnings.simplefilter("ignore")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    base = work / f"{Path(a.model).stem}-base-F16.gguf"
    if not base.exists():
        quantize_to_gguf(a.model, base, "F16")
    res: dict = {"model": Path(a.model).name, "device": a.device or "cpu",
                 "device_name": torch.cuda.get_device_name() if (a.device or "").startswith("cuda") else "cpu",
                 "base_digests": tensor_digests(base), "rows": []}
    out = Path(a.out)
    if out.exists():
        old = json.loads(out.read_text())
        if old.get("base_digests") == res["base_digests"]:
            res["rows"] = old["rows"]
    done = {(r["mix"], r["imatrix"]) for r in res["rows"]}
    variants = [(m.strip().upper(), im) for m in a.mixes.split(",") if m.strip()
                for im in ((False,) if a.imatrix == "no" else (True,) if a.imatrix == "yes" else (False, True))]
    for mix, use_im in variants:
        if (mix, use_im) in done:
            continue
        path = work / f"lowbit-{mix}{'-imat' if use_im else ''}.gguf"
        t = time.time()
        row: dict = {"mix": mix, "imatrix": use_im}
        try:
            quantize_to_gguf(base, path, mix, imatrix_path=a.imatrix_file if use_im else None, overwrite=True,
                             device=a.device)
        except LowbitError as e:
            row["refused"] = str(e)
        else:
            row["seconds"] = time.time() - t
            row["size_mib"] = path.stat().st_size / 2**20
            row["bpw"] = inspect_gguf(path)["bits_per_weight"]
            row["digests"] = tensor_digests(path)
            path.unlink()
        res["rows"].append(row)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(out)
        print(f"{mix:8s} imatrix={use_im!s:5s} " + (f"refused: {row['refused'][:80]}" if "refused" in row
              else f"{row['seconds']:.1f}s {row['bpw']:.3f} bpw"), flush=True)


if __name__ == "__main__":
    main()
