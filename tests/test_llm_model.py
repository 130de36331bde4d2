"""qlib.llm.model and qlib.llm.corpus: the char-level transformer, its corpus and generation.

References: the attention is checked against ``torch.nn.functional.scaled_dot_product_attention``
(``is_causal=True``); the corpus against the bytes of the standard library files read directly;
the shipped weights against the perplexity ``qlib/weights/train_charlm.py`` recorded in charlm.json.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from qlib.llm import corpus, evaluate, model as charlm

SMALL = charlm.CharLMConfig(width=32, layers=2, heads=4, context=16)


def test_attention_matches_sdpa():
    g = torch.Generator().manual_seed(torch.randint(2**31, (1,)).item() % 2**31)
    attn = charlm.CausalSelfAttention(32, 4, 16)
    x = torch.randn(3, 10, 32, generator=g)
    split = lambda y: y.view(3, 10, 4, 8).transpose(1, 2)  # noqa: E731
    ref = F.scaled_dot_product_attention(split(attn.q(x)), split(attn.k(x)), split(attn.v(x)), is_causal=True)
    ref = attn.proj(ref.transpose(1, 2).reshape(3, 10, 32))
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-6)


def test_causal_no_peeking():
    m = charlm.create(0, SMALL).eval()
    t = torch.randint(0, 256, (1, 12))
    t2 = t.clone()
    t2[0, 8:] = (t2[0, 8:] + 1) % 256
    torch.testing.assert_close(m(t)[:, :8], m(t2)[:, :8])


def test_create_seeded_and_shapes():
    a, b = charlm.create(3, SMALL), charlm.create(3, SMALL)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert a(torch.zeros(2, 5, dtype=torch.long)).shape == (2, 5, 256)
    with pytest.raises(TypeError, match="int64"):
        a(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="sequence length"):
        a(torch.zeros(1, 17, dtype=torch.long))


def test_encode_decode_roundtrip():
    text = "def f(x):\n    return x * 2  # é\n"
    assert corpus.decode(corpus.encode(text)) == text
    with pytest.raises(TypeError):
        corpus.encode(b"bytes")


def test_corpus_is_the_stdlib_split_by_file():
    data = corpus.load()
    first = (corpus.stdlib_dir() / corpus.TRAIN_FILES[0]).read_bytes()
    assert bytes(data.train[:len(first)].tolist()) == first
    assert not set(corpus.TRAIN_FILES) & set(corpus.VAL_FILES)
    assert data.val.numel() > 50_000 and data.train.numel() > 10 * data.val.numel()


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="heapq.py not found"):
        corpus.read_files(["heapq.py"], root=tmp_path)


def test_windows_and_batches():
    data = torch.arange(100)
    w = corpus.windows(data, 9)
    assert w.shape == (11, 10) and torch.equal(w[1, :2], torch.tensor([9, 10]))
    x, y = corpus.random_batch(data, 4, 9, torch.Generator().manual_seed(0))
    assert torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match="fewer than one window"):
        corpus.windows(data[:5], 9)


def test_generate_is_seeded_and_greedy_is_argmax():
    m = charlm.create(1, SMALL).eval()
    a = charlm.generate(m, "def ", 12, temperature=1.0, seed=5)
    assert a == charlm.generate(m, "def ", 12, temperature=1.0, seed=5)
    greedy = charlm.generate(m, "ab", 1)
    assert greedy == corpus.decode(m(corpus.encode("ab")[None])[0, -1].argmax()[None])
    with pytest.raises(ValueError, match="temperature"):
        charlm.generate(m, "x", 3, temperature=-1)


def test_shipped_weights_reach_recorded_perplexity():
    info = charlm.charlm_info()
    if info["python"].rsplit(".", 1)[0] != corpus.python_version().rsplit(".", 1)[0]:
        pytest.skip("perplexities were recorded on another Python's standard library")
    val = corpus.load().val
    for seed in charlm.SEEDS:
        ppl = evaluate.perplexity(charlm.pretrained(seed), val, limit=64)
        full = info["seeds"][str(seed)]["val_ppl"]
        assert ppl < 8.0 and abs(ppl / full - 1) < 0.15  # 64 of ~790 windows
    with pytest.raises(ValueError, match="seed"):
        charlm.pretrained(7)


def test_weights_paths_and_recipes():
    assert charlm.weights_path(1).name == "charlm_s1.pt"
    assert charlm.weights_path(0, "long").name == "charlm_long_s0.pt"
    with pytest.raises(ValueError, match="recipe"):
        charlm.pretrained(0, recipe="longer")


def test_long_recipe_logs_an_emergence_curve(tmp_path, monkeypatch):
    from qlib.weights import train_charlm

    monkeypatch.setattr(charlm, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setitem(train_charlm.RECIPES, "long", {**train_charlm.RECIPES["long"], "steps": 5,
                                                       "log_every": 2, "warmup": 2, "probe_windows": 2,
                                                       "ppl_windows": 4})
    assert train_charlm.RECIPES["default"]["weight_decay"] > 0 == train_charlm.RECIPES["long"]["weight_decay"]
    gen = torch.Generator().manual_seed(0)
    data = corpus.Corpus(torch.randint(0, 256, (4000,), generator=gen),
                         torch.randint(0, 256, (400,), generator=gen), "test")
    rec = train_charlm.train_one(0, data, SMALL, "long", {})
    assert [p["step"] for p in rec["curve"]] == [0, 2, 4, 5] and rec["steps_done"] == 5
    assert set(rec["curve"][-1]["summary"]) >= {"ln1", "ln2", "gelu", "resid", "int8_columns"}
    assert (tmp_path / "charlm_long_s0.pt").exists()
    stored = torch.load(tmp_path / "charlm_long_s0.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in stored.values() if v.is_floating_point())


def test_three_seeds_of_the_long_recipe_are_shipped():
    """Like the default recipe, the long one ships a model per seed (benchmarks/llm_outliers.py
    reports their spread), each with its emergence curve recorded in charlm.json."""
    long = charlm.charlm_info()["recipes"]["long"]
    assert sorted(long["seeds"]) == [str(s) for s in charlm.SEEDS]
    for seed in charlm.SEEDS:
        assert charlm.weights_path(seed, "long").exists(), seed
        rec = long["seeds"][str(seed)]
        assert rec["steps_done"] == long["settings"]["steps"] and "stopped_at" not in rec, seed
        steps = [p["step"] for p in rec["curve"]]
        every = long["settings"]["log_every"]
        assert steps == list(range(0, rec["steps_done"], every)) + [rec["steps_done"]], seed


@pytest.mark.parametrize("seed", charlm.SEEDS)
def test_long_weights_reach_recorded_perplexity(seed):
    info = charlm.charlm_info()
    long = info.get("recipes", {}).get("long")
    if long is None or str(seed) not in long["seeds"] or not charlm.weights_path(seed, "long").exists():
        pytest.skip(f"the long-trained model of seed {seed} is not shipped")
    if long["python"].rsplit(".", 1)[0] != corpus.python_version().rsplit(".", 1)[0]:
        pytest.skip("perplexities were recorded on another Python's standard library")
    rec = long["seeds"][str(seed)]
    steps = [p["step"] for p in rec["curve"]]
    assert steps == sorted(steps) and steps[-1] == rec["steps_done"]
    ppl = evaluate.perplexity(charlm.pretrained(seed, recipe="long"), corpus.load().val, limit=64)
    assert ppl == pytest.approx(rec["curve"][-1]["val_ppl_64"], rel=1e-3)
