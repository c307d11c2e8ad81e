"""``bench/decode.py`` runs its whole main path (tiny sizes, seconds), so that the benchmark cannot
silently break again when the Agent, a mode or the engine changes under it (it once imported a
helper that no longer existed); and its reference hook reads the harnesses' last lines."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
import tyro

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    """``bench/decode.py`` as a module."""
    try:
        yield _load("decode")
    finally:
        sys.modules.pop("bench_decode", None)


def _load(name: str):
    """``bench/<name>.py`` as a module (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    """1 thread: a 2-thread torch on a busy 2-core machine waits on every op (several-fold slower);
    ``main`` sets the process's thread count, which is restored after."""
    threads = torch.get_num_threads()
    yield 1
    torch.set_num_threads(threads)


def _fake_harness(folder: Path, name: str, ms: float) -> None:
    (folder / f"{name}.py").write_text(f"print('warming up')\nprint('{name}_ms_per_decision={ms}')\n")


def test_quick_run_prints_every_figure(bench, tmp_path, capsys, one_thread):
    # JAT runs before ours (50 ms a decision) and again after (40 ms: the machine got faster)
    (tmp_path / "jat_reference.py").write_text(
        "from pathlib import Path\nrun = Path(__file__).with_suffix('.runs')\n"
        "n = int(run.read_text()) if run.exists() else 0\nrun.write_text(str(n + 1))\n"
        "print(f'jat_reference_ms_per_decision={50.0 if n == 0 else 40.0}')\n")
    _fake_harness(tmp_path, "tt_reference", 70_000.0)
    _fake_harness(tmp_path, "faster_tt_reference", 30_000.0)
    # the static decoder eager: compiling it (ten programs, ~2.5 min in a fresh CI) is tested in test_static_beams
    bench.main(bench.Args(quick=True, tt_uncached=True, with_references=tmp_path, threads=one_thread,
                          decision_dtypes=("float32", "bfloat16"), tt_decoders=("static", "engine")))
    out = capsys.readouterr().out
    for figure in ("flat_in_context_ratio=", "cache_speedup_at_", "batched_speedup=", "tt_agent_s_per_decision=",
                   "tt_uncached_s_per_decision=", "tt_reference_s_per_decision=70.00",
                   "faster_tt_reference_s_per_decision=30.00", "batched_speedup_ceiling=", "tt_floor_s=",
                   "tt_reference speedup[bfloat16 model",  # a bfloat16 model plans too, with its own ratios
                   "batched_speedup[bfloat16]=", "flat_in_context_ratio[bfloat16]="):  # and decides, when asked
        assert figure in out, figure
    # each reference decision is followed by ours on every model dtype (1 round x 2 references x 1 decision)
    assert re.search(r"ours, float32 model, \S+: median [0-9.]+ s over 2 decisions", out)
    assert re.search(r"ours, bfloat16 model, \S+: median [0-9.]+ s over 2 decisions", out)
    # JAT's figure comes from this run's harness, before and after ours: the ratio is to the faster, 1000 / 40 ms
    assert "JAT before ours 50.0 ms, after 40.0 ms per decision" in out
    for dtype in ("float32", "bfloat16"):  # the model timed in both weight dtypes, each against JAT's float32
        per_s = float(re.search(rf"jat_size_4env_decisions_per_s\[{dtype}\]=([0-9.]+) vs JAT \(float32\) 25.0/s",
                                out).group(1))
        ratio = re.search(rf"\[{dtype}\]=.*vs_jat=([0-9.]+)x", out).group(1)
        assert float(ratio) == pytest.approx(per_s / 25, abs=0.01)


def test_no_jat_ratio_without_a_measured_jat_figure(bench, capsys, one_thread):
    bench.main(bench.Args(quick=True, uncached=False, skip_tt=True, threads=one_thread))
    out = capsys.readouterr().out
    assert "vs_jat" not in out and "JAT not measured in this run" in out


def test_failed_reference_gives_no_figure(bench, tmp_path, capsys):
    (tmp_path / "jat_reference.py").write_text("import sys\nsys.exit('no mirror')\n")
    args = bench.Args(with_references=tmp_path)
    assert bench.run_reference(args, "jat_reference.py", []) is None
    assert bench.run_reference(args, "missing.py", []) is None
    assert "no mirror" in capsys.readouterr().out


def test_cli_takes_hyphens_and_underscores(bench):
    args = tyro.cli(bench.Args, args=["--quick", "--jat-ms", "57.3", "--with_references", "/x"],
                    use_underscores=True)
    assert args.quick and args.jat_ms == 57.3 and args.with_references == Path("/x")


def test_the_floor_counts_what_a_forward_does(bench):
    """FLOPs of matrix products and of torch's fused CPU attention (whose formula bench/roofline.py adds),
    and the KV bytes a feed attends to: the whole cache after it, per layer keys and values."""
    from roofline import count_flops

    q, k, v = torch.randn(2, 4, 16, 32), torch.randn(2, 4, 100, 32), torch.randn(2, 4, 100, 32)
    assert count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)) == 4 * 2 * 4 * 16 * 100 * 32
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4
    from generalist import GeneralistTokenizer

    tok = GeneralistTokenizer.default()
    model = bench.seeded_model(tok)
    engine = bench.Engine(model)
    state = engine.new_state(3)
    ids = torch.full((3, 5), tok.bos_id)
    read = bench.count_kv_reads(engine, lambda: (engine.feed(state, ids), engine.feed(state, ids[:, :2])))
    text = model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    per_token = text.num_hidden_layers * 2 * 3 * text.num_key_value_heads * head_dim * 4  # layers, K+V, rows, float32
    assert read == per_token * (5 + 7)
    assert "_feed" not in vars(engine)  # the wrapper is gone after the call


def test_tt_bound_forward_computes_the_llama_forward(capsys, one_thread):
    """``bench/tt_bound.py`` times an idealised forward; its bound means something only if that forward is the
    model's: fed a 🤗 Llama's weights, its keys and one new token, it gives that Llama's next-token logits. Then
    its main path runs (eager only: compiling takes ~30 s) and prints the bound."""
    from transformers import LlamaConfig, LlamaForCausalLM

    bound = _load("tt_bound")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         initializer_range=0.3)  # weights large enough that attention is far from uniform
    model = LlamaForCausalLM(config).eval()
    shared, own_slots, slot = 6, 4, 2
    embeds = torch.randn(1, shared + 1, 32)
    with torch.inference_mode():
        expected = model(inputs_embeds=embeds).logits[0, -1]
        cache = model(inputs_embeds=embeds[:, :shared], use_cache=True).cache
        cos, sin = model.model.rotary_emb(embeds, torch.tensor([[shared]]))
        layers, head, norm = bound.llama_weights(model)
        keys = [layer.keys[0] for layer in cache.layers]  # (H, S, d): what every beam shares
        values = [layer.values[0] for layer in cache.layers]
        own = [torch.randn(1, 4, own_slots, 8) for _ in range(4)]  # garbage in the masked slots
        mask = torch.full((own_slots,), float("-inf"))
        mask[slot] = 0.0
        got = bound.decode_forward(embeds[0, -1:], layers, head, norm, cos[0], sin[0], keys, values, own[:2],
                                   own[2:], mask, torch.tensor([slot]))[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    capsys.readouterr()
    bound.main(tyro.cli(bound.Args, args=["--threads", "1", "--dtypes", "float32", "--no_compiled", "--trials", "1",
                                          "--calls", "1", "--reference_s", "40"]))
    out = capsys.readouterr().out
    assert re.search(r"tt_forwards_bound_s\[float32,eager\]=[\d.]+, [\d.]+x the original planner", out), out
