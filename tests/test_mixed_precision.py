"""Mixed precision to a budget (``lowbit quantize --to auto``): the allocator (never over the budget,
optimal on small cases against brute force, deterministic, more sensitive -> at least as many bytes), the
bad budgets' one-line errors, the Fisher prediction against the KL measured with one tensor quantized
(:mod:`lowbit.eval.diagnose`'s machinery), and a stories260K file that follows the choice and loads in
llama-cpp-python. The comparison with llama.cpp's mixes is bench/mixed_precision.py."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.mix.allocate import Item, allocate

STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"
needs_stories = pytest.mark.skipif(not STORIES.exists(), reason="stories260K not present")


def _random_items(rng: np.random.Generator, n: int, k: int) -> list[Item]:
    items = []
    for i in range(n):
        sizes = np.sort(rng.integers(10, 1000, size=k))
        costs = np.sort(rng.random(k))[::-1] * rng.uniform(0.1, 10)
        items.append(Item(f"t{i}", tuple(int(s) for s in sizes), tuple(float(c) for c in costs)))
    return items


def _total(items: list[Item], pick: list[int], what: str) -> float:
    return sum(getattr(it, what)[j] for it, j in zip(items, pick, strict=True))


def test_allocation_never_over_and_optimal_on_small_cases() -> None:
    rng = np.random.default_rng(0)
    for _ in range(30):
        items = _random_items(rng, 5, 4)
        lo, hi = sum(min(it.sizes) for it in items), sum(max(it.sizes) for it in items)
        budget = int(rng.integers(lo, hi + 1))
        pick = allocate(items, budget)
        assert _total(items, pick, "sizes") <= budget
        best = min(_total(items, list(p), "costs") for p in itertools.product(range(4), repeat=5)
                   if _total(items, list(p), "sizes") <= budget)
        assert _total(items, pick, "costs") <= best + 1e-9  # exact: the sizes fit the resolution


def test_allocation_with_coarse_units_is_never_over_and_deterministic() -> None:
    rng = np.random.default_rng(1)
    items = _random_items(rng, 60, 8)
    lo, hi = sum(min(it.sizes) for it in items), sum(max(it.sizes) for it in items)
    for budget in (lo, lo + 1, (lo + hi) // 2, hi - 1, hi):
        pick = allocate(items, budget, resolution=97)  # units of many bytes: rounded up, then filled
        assert _total(items, pick, "sizes") <= budget
        assert allocate(items, budget, resolution=97) == pick
    pick = allocate(items, hi)
    assert [it.sizes[j] for it, j in zip(items, pick, strict=True)] == [max(it.sizes) for it in items]


def test_more_sensitive_tensor_gets_at_least_as_many_bytes() -> None:
    sizes = (100, 150, 200, 300)
    curve = (1.0, 0.4, 0.1, 0.01)
    for factor in (1.5, 3.0, 10.0):
        items = [Item("calm", sizes, curve), Item("touchy", sizes, tuple(factor * c for c in curve)),
                 Item("calm2", sizes, curve)]
        for budget in range(300, 901, 25):
            pick = allocate(items, budget)
            assert sizes[pick[1]] >= max(sizes[pick[0]], sizes[pick[2]]), (factor, budget, pick)


def test_allocation_refusals() -> None:
    items = [Item("a", (10, 20), (1.0, 0.5))]
    with pytest.raises(LowbitError, match="below the smallest"):
        allocate(items, 9)
    with pytest.raises(LowbitError, match="NaN"):
        allocate([Item("a", (10, 20), (1.0, float("nan")))], 15)


@pytest.fixture(scope="module")
def stories_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lowbit.mix.gguf_auto import measure
    from lowbit.mix.sensitivity import FisherSettings

    path = tmp_path_factory.mktemp("auto") / "sensitivity.json"
    measure(STORIES, settings=FisherSettings(ctx=64, chunks=2)).save(path)
    return path


@needs_stories
def test_bad_budgets_are_one_line_errors(stories_table: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from lowbit.mix.gguf_auto import Table, budget_bytes

    table = Table.load(stories_table)
    for bad, what in (({"target_bpw": 1.0}, "below the smallest"), ({"target_bpw": 40.0}, "above the largest"),
                      ({"target_size": "1KB"}, "below the smallest"), ({"target_size": "1GB"}, "above the largest")):
        with pytest.raises(LowbitError, match=what) as e:
            budget_bytes(table, **bad)  # type: ignore[arg-type]
        assert "\n" not in str(e.value)
    with pytest.raises(LowbitError, match="not a size"):
        budget_bytes(table, target_size="four gigabytes")
    with pytest.raises(LowbitError, match="one budget"):
        budget_bytes(table)
    rc = main(["quantize", str(STORIES), "--to", "auto", "--target-bpw", "2", "--sensitivity", str(stories_table),
               "-o", str(tmp_path / "x.gguf")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "--target-bpw: 2.0 is below the smallest file" in err[0]
    assert main(["quantize", str(STORIES), "--to", "Q4_0", "--target-bpw", "5", "-o", str(tmp_path / "y.gguf")]) == 1
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()


@needs_stories
def test_auto_file_follows_the_choice_within_budget_and_loads_in_llamacpp(stories_table: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from lowbit.gguf.reader import GGUFFile
    from lowbit.mix.gguf_auto import Table, budget_bytes, choose

    table = Table.load(stories_table)
    out = tmp_path / "auto.gguf"
    rc = main(["--quiet", "quantize", str(STORIES), "--to", "auto", "--target-bpw", "7.6",
               "--sensitivity", str(stories_table), "-o", str(out), "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["auto"]["bits_per_weight"] <= 7.6 and result["bits_per_weight"] <= 7.6
    f = GGUFFile(out)
    written = {t.name: t.type for t in f.tensors}
    chosen = choose(table, budget_bytes(table, target_bpw=7.6))
    assert all(written[n] == t for n, t in chosen.items())
    assert len(set(chosen.values())) >= 3  # a real mix, not one type
    assert 8 * sum(t.nbytes for t in f.tensors) / sum(t.n_elements for t in f.tensors) <= 7.6
    size = out.stat().st_size
    out2 = tmp_path / "by-size.gguf"
    assert main(["--quiet", "quantize", str(STORIES), "--to", "auto", "--target-size", str(size),
                 "--sensitivity", str(stories_table), "-o", str(out2)]) == 0
    assert out2.stat().st_size <= size
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, verbose=False, logits_all=True)
    toks = llm.tokenize(b"Once upon a time")
    llm.eval(toks)
    assert np.isfinite(np.asarray(llm.scores[: len(toks)])).all()


@needs_stories
def test_fisher_prediction_matches_the_kl_of_one_quantized_tensor() -> None:
    """The allocator's cost of a tensor (Fisher x squared error) against the KL measured with only that
    tensor quantized (diagnose's one-tensor swap), on the same text: within a factor of 2."""
    import torch
    from gguf import GGMLQuantizationType as T

    from lowbit.eval.diagnose import _kl, _log_probs, _Swap
    from lowbit.gguf.writer import dequantize_bytes, quantize_array
    from lowbit.mix.sensitivity import FisherSettings, calibration_chunks, fisher_diagonal, predicted_kl
    from lowbit.models import load

    loaded = load(STORIES)
    chunks = calibration_chunks(loaded.tokenizer, FisherSettings(ctx=128, chunks=4))
    fisher = fisher_diagonal(loaded.model, chunks, seed=0)
    params = dict(loaded.model.named_parameters())
    ref_lp = _log_probs(loaded.model, chunks, 0, 4)
    for name in ("model.layers.1.mlp.gate_proj.weight", "model.layers.3.self_attn.v_proj.weight",
                 "model.embed_tokens.weight"):
        w = params[name].detach().float()
        wq = torch.from_numpy(dequantize_bytes(quantize_array(w.numpy(), T.Q4_0), T.Q4_0, tuple(w.shape)))
        with _Swap(params, {name: wq})([name]):
            measured = _kl(ref_lp, _log_probs(loaded.model, chunks, 0, 4))
        pred = predicted_kl(fisher[name], w, wq)
        assert 0.5 < pred / measured < 2.0, (name, pred, measured)


@needs_stories
def test_hf_auto_checkpoint_within_budget_with_several_config_groups(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors import safe_open

    from lowbit.mix.hf_auto import measure
    from lowbit.mix.sensitivity import FisherSettings
    from lowbit.models import load

    table = tmp_path / "hf-sensitivity.json"
    measure(STORIES, FisherSettings(ctx=64, chunks=2)).save(table)
    out = tmp_path / "auto-ct"
    assert main(["--quiet", "quantize", str(STORIES), "--scheme", "auto", "--target-bpw", "7.5", "--sensitivity",
                 str(table), "-o", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    payload = 0
    for f in out.glob("*.safetensors"):
        with safe_open(f, "pt") as s:
            for k in s.keys():
                t = s.get_tensor(k)
                payload += t.numel() * t.element_size()
    assert payload == result["auto"]["tensor_bytes"]  # the size model is the format's exact layout
    assert 8 * payload / result["size"]["params"] <= 7.5
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert len({g["weights"]["num_bits"] for g in groups.values()}) >= 2
    assert np.isfinite(load(out).model(input_ids=__import__("torch").tensor([[1, 2, 3]])).logits.detach().numpy()).all()
    assert main(["quantize", str(STORIES), "--scheme", "auto", "--target-bpw", "7.5", "--to", "auto",
                 "-o", str(tmp_path / "x")]) == 1
    assert main(["quantize", str(STORIES), "--scheme", "auto", "--sensitivity", str(table), "--target-bpw", "99",
                 "-o", str(tmp_path / "x")]) == 1
    assert "above the largest" in capsys.readouterr().err
