# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% tags=["colab-setup"]
# Setup: on Google Colab this installs qlib from the course repository;
# anywhere else (JupyterLab from `make lab`) it does nothing.
import subprocess, sys
REPO = "https://github.com/qdm-course/quantization-course@main"
if "google.colab" in sys.modules:
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "qlib @ git+" + REPO],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("Could not install qlib from " + REPO + " (is the repository public, and is "
                           "this its address?). For a fork: run `make sync REPO=owner/name` and commit, "
                           "or edit REPO in this cell.\n" + r.stderr[-800:])

# %% [markdown]
# # 01 · Numbers and precision: float32, float16, bfloat16, int8, int4
#
# **What you will learn**
# - how a floating-point number is stored (sign, exponent, mantissa), by decoding the bits
#   yourself and checking against PyTorch;
# - the range and the precision of float32, float16, bfloat16, float8, int8 and int4, read
#   from `torch.finfo` / `torch.iinfo`;
# - why floats have a *relative* precision and integers an *absolute* one (the spacing of
#   representable numbers), and why integers therefore need a **scale**;
# - what casting a trained model's weights to each format costs in error and in accuracy;
# - **non-uniform** grids for weights: k-means codebooks (Han et al. 2016) and NormalFloat
#   (NF4, Dettmers et al. 2023), against the uniform grid, by error and by accuracy at 2-4 bits;
# - what fewer bits buy: bytes (measured, with 2- and 4-bit codes packed into bytes) and time
#   (measured side by side, as ratios).

# %%
import copy
import math
import statistics

import matplotlib.pyplot as plt
import torch

from qlib import data, measure, models, nonuniform, packing, runtime, viz, widgets
from qlib.qparams import qparams_for, quant_range
from qlib.quantize import fake_quantize
from qlib.train import evaluate

FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2]


def short(dtype):
    return str(dtype).removeprefix("torch.")


print("torch", torch.__version__, "| CPU capability:", torch.backends.cpu.get_cpu_capability(),
      "| fast mode:", runtime.fast())

# %% [markdown]
# ## 1. How a float is stored
#
# A float with $e$ exponent bits and $m$ mantissa bits stores a sign bit $s$, a biased
# exponent $E$ and a fraction $M$ (an integer of $m$ bits):
#
# $$ x = (-1)^s \cdot \left(1 + \frac{M}{2^m}\right) \cdot 2^{E - \text{bias}}, \qquad \text{bias} = 2^{e-1} - 1 $$
#
# except when $E = 0$: then the leading 1 is dropped, $x = (-1)^s \cdot \frac{M}{2^m} \cdot 2^{1-\text{bias}}$
# (*subnormal* numbers, which fill the gap down to zero). The exponent gives **range**, the
# mantissa gives **precision**. `torch.finfo` tells us `eps` $= 2^{-m}$, so we can read $m$
# and $e$ off it:

# %%
def field_bits(dtype):
    """(sign, exponent, mantissa) bit counts of a float dtype, from torch.finfo."""
    info = torch.finfo(dtype)
    m = round(-math.log2(info.eps))
    return 1, info.bits - 1 - m, m


layouts = {short(dt): field_bits(dt) for dt in FLOATS}
layouts.update({"int8": (1, 0, 7), "int4": (1, 0, 3)})
viz.plot_bit_layout(layouts)
plt.show()

# %% [markdown]
# float16 and bfloat16 both have 16 bits, split differently: bfloat16 keeps float32's 8
# exponent bits (same range) and only 7 mantissa bits; float16 has 5 and 10. The two
# float8 formats are the same trade-off at 8 bits (`e4m3` for weights and activations,
# `e5m2` for gradients). Integers have no exponent at all.
#
# **Build it.** Decode the bits ourselves: view the float's memory as an integer, cut out
# the three fields with shifts and masks, and apply the formula.

# %%
INT_VIEW = {32: torch.int32, 16: torch.int16, 8: torch.uint8}


def fields(x):
    """Sign, biased exponent and mantissa fields of a float tensor (int64 tensors)."""
    _, e, m = field_bits(x.dtype)
    bits = torch.finfo(x.dtype).bits
    raw = x.view(INT_VIEW[bits]).to(torch.int64) & ((1 << bits) - 1)  # the bit pattern, unsigned
    return raw >> (bits - 1), (raw >> m) & ((1 << e) - 1), raw & ((1 << m) - 1)


def decode(x):
    """The exact value of every element of a float tensor, from its bits (float64)."""
    _, e, m = field_bits(x.dtype)
    bias = 2 ** (e - 1) - 1
    sign, E, M = fields(x)
    frac = M.double() / 2**m
    normal = (1 + frac) * torch.exp2((E - bias).double())
    subnormal = frac * 2.0 ** (1 - bias)
    value = torch.where(E == 0, subnormal, normal)
    return torch.where(sign == 1, -value, value)


s, E, M = fields(torch.tensor([0.1]))
print(f"0.1 in float32: sign {s.item()}, exponent {E.item():08b} (E={E.item()}), "
      f"mantissa {M.item():023b}")
print("decoded:", decode(torch.tensor([0.1])).item(), " (0.1 itself is not representable)")

# %% [markdown]
# **Check it against PyTorch**: random bit patterns in every format, decoded by us and by
# PyTorch (`x.double()`), must agree exactly (infinities and NaNs left out).

# %%
gen = torch.Generator().manual_seed(0)
for dt in FLOATS:
    bits = torch.finfo(dt).bits
    low, high = (0, 256) if bits == 8 else (-(2 ** (bits - 1)), 2 ** (bits - 1))
    raw = torch.randint(low, high, (20000,), generator=gen).to(INT_VIEW[bits])
    x = raw.view(dt)
    x = x[torch.isfinite(x.float())]
    assert torch.equal(decode(x), x.double()), dt
    # qlib's float explorer cuts the same fields
    b = widgets.float_bits(x[0].item(), dt)
    s, E, M = fields(x[:1])
    assert (int(b["sign"], 2), int(b["exponent"], 2), int(b["mantissa"], 2)) == (s.item(), E.item(), M.item())
    print(f"{short(dt):14s} {len(x):6d} random finite values decoded exactly")

# %% [markdown]
# Type a number and see how each format stores it (sign, exponent, mantissa) and how far the
# stored value is from what you typed:

# %%
widgets.float_format_explorer(0.1)

# %% [markdown]
# ## 2. Range and precision: `torch.finfo` and `torch.iinfo`
#
# - `max`: the largest finite number; beyond it, overflow (to `inf`, or NaN/saturation in float8).
# - `smallest_normal` (`tiny`) and the smallest subnormal `tiny * eps`: below it, underflow to 0.
# - `eps`: the gap between 1.0 and the next number, $2^{-m}$; the *relative* precision.
#   About $-\log_{10}(\text{eps})$ significant decimal digits.
#
# We also derive `max` from the bit layout: the largest exponent ($E = 2^e - 2$, since all
# ones is reserved for inf/NaN) and a full mantissa. `float8_e4m3fn` ("fn": finite, no inf)
# reuses the all-ones exponent and reserves only one mantissa pattern for NaN.

# %%
def derived_max(dtype):
    _, e, m = field_bits(dtype)
    bias = 2 ** (e - 1) - 1
    if dtype == torch.float8_e4m3fn:
        return (2 - 2 * 2.0**-m) * 2.0 ** (2**e - 1 - bias)
    return (2 - 2.0**-m) * 2.0 ** (2**e - 2 - bias)


print(f"{'format':14s} {'bits':>4s} {'max':>10s} {'smallest normal':>16s} {'smallest subnormal':>19s} "
      f"{'eps':>10s} {'digits':>6s}")
for dt in FLOATS:
    info = torch.finfo(dt)
    assert derived_max(dt) == info.max, dt
    print(f"{short(dt):14s} {info.bits:4d} {info.max:10.3g} {info.smallest_normal:16.3g} "
          f"{info.smallest_normal * info.eps:19.3g} {info.eps:10.3g} {-math.log10(info.eps):6.1f}")

print(f"\n{'format':14s} {'bits':>4s} {'min':>12s} {'max':>12s} {'values':>12s}  step")
for dt in [torch.int32, torch.int16, torch.int8, torch.uint8]:
    info = torch.iinfo(dt)
    print(f"{short(dt):14s} {info.bits:4d} {info.min:12d} {info.max:12d} {info.max - info.min + 1:12d}  1")
for bits, signed in [(4, True), (4, False), (2, True)]:
    qmin, qmax = quant_range(bits, signed)  # torch has no 4-bit storage dtype; qlib gives the range
    print(f"{('int' if signed else 'uint') + str(bits):14s} {bits:4d} {qmin:12d} {qmax:12d} {qmax - qmin + 1:12d}  1")

# %% [markdown]
# What those limits mean in practice, measured:

# %%
big, small = torch.tensor([70000.0, 1e-8])
print("70000 in float16:", big.half().item(), "| in bfloat16:", big.bfloat16().item())
print("1e-8  in float16:", small.half().item(), "| in bfloat16:", small.bfloat16().item())
one_plus = torch.tensor(1 + 2.0**-8)
print(f"1 + 2^-8 = {one_plus.item()} in float16: {one_plus.half().item()}, in bfloat16: {one_plus.bfloat16().item()}")

# Adding 1.0 again and again in float16: the sum stalls once the gap between numbers exceeds 1.
total = torch.tensor(0.0, dtype=torch.float16)
for i in range(runtime.pick(4000, 3000)):
    total = total + torch.tensor(1.0, dtype=torch.float16)
print(f"1.0 added {i + 1} times in float16: {total.item()} "
      f"(the gap above {2 ** (field_bits(torch.float16)[2] + 1)} is 2)")

# %% [markdown]
# That last line is why low-precision arithmetic **accumulates in a wider format**: int8
# products are summed in int32, float16/bfloat16 products in float32.
#
# ## 3. Spacing of representable numbers vs magnitude
#
# The gap from a float to the next one is one *unit in the last place*: $2^{E - \text{bias} - m}$
# (with $E = 1$ for subnormals). It grows with the magnitude, so the **relative** gap stays
# near `eps`. We compute it from the fields and check it against `torch.nextafter`.

# %%
def gap(x):
    """Distance from each element of a float tensor to the next representable number."""
    _, e, m = field_bits(x.dtype)
    bias = 2 ** (e - 1) - 1
    _, E, _ = fields(x)
    return torch.exp2((E.clamp(min=1) - bias - m).double())


for dt in [torch.float32, torch.bfloat16, torch.float16]:  # nextafter has no float8 kernel
    x = torch.randn(1000, generator=gen).mul(100).to(dt).abs()
    x = x[x < torch.finfo(dt).max]
    assert torch.equal(gap(x), torch.nextafter(x, torch.tensor(math.inf, dtype=dt)).double() - x.double())
print("gap() agrees with torch.nextafter")

magnitudes = torch.logspace(-9, 6, runtime.pick(3000, 1000), dtype=torch.float64)
spacing = {}
for dt in FLOATS:
    x = magnitudes.to(dt)
    ok = (magnitudes <= torch.finfo(dt).max) & (x != 0)
    spacing[short(dt)] = torch.where(ok, gap(x), torch.nan)
for bits in (8, 4):  # integers with a scale that puts the grid on [-1, 1]
    qmax = quant_range(bits)[1]
    spacing[f"int{bits}, scale 1/{qmax}"] = torch.where(magnitudes <= 1, torch.tensor(1 / qmax), torch.nan)

fig, axes = plt.subplots(1, 2, figsize=(12, 4))
viz.plot_spacing(magnitudes, spacing, ax=axes[0])
viz.plot_spacing(magnitudes, spacing, ax=axes[1], relative=True)
axes[1].set_ylim(1e-8, 10)
plt.show()

for dt in FLOATS:
    info = torch.finfo(dt)
    x = magnitudes[(magnitudes >= info.smallest_normal) & (magnitudes <= info.max)].to(dt)
    rel = gap(x) / x.double()
    print(f"{short(dt):14s} relative gap in the normal range: {rel.min():.3g} .. {rel.max():.3g} "
          f"(eps/2 = {info.eps / 2:.3g}, eps = {info.eps:.3g})")

# %% [markdown]
# Floats spend bits on **range**: the same relative precision from $10^{-5}$ to $10^{4}$.
# A scaled integer grid is **uniform**: a constant absolute gap, fine near the top of its
# range, useless far below it, and nothing beyond it. So an integer format needs a *scale*
# that puts its grid where the data lives, which is what lesson 02 is about. Trained weights
# live in a narrow range (below), so one scale per tensor covers them; but inside that range
# they are **bell-shaped**, most of them near 0, and a uniform grid spends as many levels on
# the sparse tails as on the crowded centre. At 8 bits that costs nothing; at 4 bits and
# below it does, and section 5 builds grids whose levels follow the weights instead:

# %%
model = models.pretrained("cnn16", seed=0)
layers = {name: m for name, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
for name, layer in layers.items():
    w = layer.weight.detach()
    print(f"layer {name:3s} {str(tuple(w.shape)):15s} max|w| {w.abs().max():.3f}   "
          f"median|w| {w.abs().median():.4f}   min|w| {w.abs().min():.2e}")

# %% [markdown]
# ## 4. Casting a trained model's weights
#
# We cast the weights of every conv and linear layer of `cnn16` to each format and back to
# float32, and measure the relative error $\lVert w - \hat w \rVert / \lVert w \rVert$. Integers
# need a scale: here the simplest one, qlib's symmetric per-tensor scale (largest magnitude at the
# top of the grid; lesson 02 derives it and better ones).

# %%
def int_round_trip(w, bits):
    scale, zero_point = qparams_for(w, bits, symmetric=True)
    return fake_quantize(w, scale, zero_point, *quant_range(bits, signed=True))


CASTS = {short(dt): (lambda w, dt=dt: w.to(dt).float()) for dt in FLOATS[1:]}
CASTS.update({"int8": lambda w: int_round_trip(w, 8), "int4": lambda w: int_round_trip(w, 4)})

rel_error, zeroed = {k: [] for k in CASTS}, {k: 0 for k in CASTS}
for name, layer in layers.items():
    w = layer.weight.detach()
    for k, cast in CASTS.items():
        w_hat = cast(w)
        rel_error[k].append(((w - w_hat).norm() / w.norm()).item())
        zeroed[k] += int(((w_hat == 0) & (w != 0)).sum())

viz.plot_grouped_bars([f"layer {n}" for n in layers], rel_error, logy=True,
                      ylabel="relative error ||w - ŵ|| / ||w||", title="casting cnn16's weights")
plt.show()

n_weights = sum(layer.weight.numel() for layer in layers.values())
for k in CASTS:
    print(f"{k:14s} mean relative error {statistics.mean(rel_error[k]):.2e}, "
          f"{zeroed[k]:5d} of {n_weights} nonzero weights became 0")

# %% [markdown]
# And what the model thinks of it: test accuracy with all conv/linear weights cast.

# %%
digits16 = data.load_digits(16)


def with_weights(model, cast):
    """A copy of ``model`` whose conv/linear weights went through ``cast``."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
                layer.weight.copy_(cast(layer.weight))
    return model


accuracy = {"float32": evaluate(model, digits16.test)}
for k, cast in CASTS.items():
    accuracy[k] = evaluate(with_weights(model, cast), digits16.test)
for k, acc in accuracy.items():
    print(f"{k:14s} {acc:5.1f}%  ({acc - accuracy['float32']:+.1f} points)")
image = 100 / len(digits16.test)
print(f"(one test image = {image:.2f} points)")
# what the next paragraph says: 8 bits cost at most two test images, int4 costs more than that
assert all(abs(accuracy[k] - accuracy["float32"]) <= 2 * image + 1e-9 for k in CASTS if k != "int4")
assert accuracy["float32"] - accuracy["int4"] > 2 * image

# %% [markdown]
# Down to 8 bits (floats or int8) the difference is at most a test image or two, which is
# noise; int4 with one scale per tensor costs several points. The rest of the course is about
# making 4 bits (and fewer) work. A first lever is the *shape* of the grid.
#
# ## 5. Non-uniform grids: k-means codebooks and NormalFloat
#
# A $b$-bit weight format does not have to be a uniform grid: store, per weight, the
# **index** of one of $2^b$ levels, and the levels once per tensor (or per block). Which levels
# minimize the mean squared error? For a value $w$ rounded to its nearest level $c_j$, the
# best levels satisfy two conditions at once (Lloyd 1957; Max 1960): every value goes to its
# nearest level, and every level is the **mean** of the values that go to it. Alternating the
# two is **Lloyd's algorithm**, i.e. k-means in one dimension; each step can only lower the MSE.
# For a bell-shaped distribution the fixed point has levels **denser near 0**. Two formats:
#
# - **k-means codebook** (Han et al. 2016, *Deep Compression*): $2^b$ levels per tensor found by
#   k-means on the tensor's own weights (`nonuniform.kmeans_codebook`, started from a uniform
#   grid over $[\min, \max]$, Han et al.'s best initialization);
# - **NormalFloat** (Dettmers et al. 2023, *QLoRA*): fixed levels at quantiles of a normal
#   distribution, with an exact 0, for blocks of 64 weights each scaled by its absmax
#   (`nonuniform.normal_float_codebook`; NF4 is its 4-bit version, bit for bit bitsandbytes' table).
#
# **Build it**: Lloyd's algorithm in a few lines, checked against qlib's (which is the same
# algorithm, made fast by sorting the values once and using prefix sums).

# %%
def my_kmeans(w, bits, rounds=1000):
    """1-D k-means (Lloyd): levels start uniform over [min, max]; returns the sorted levels."""
    v = w.flatten().double()
    levels = torch.linspace(v.min().item(), v.max().item(), 2**bits, dtype=torch.float64)
    for _ in range(rounds):
        nearest = torch.bucketize(v, (levels[1:] + levels[:-1]) / 2)  # index of the nearest level
        means = torch.zeros_like(levels).index_add_(0, nearest, v) / torch.bincount(nearest, minlength=2**bits)
        new = torch.where(torch.isnan(means), levels, means).sort().values  # an empty level stays
        if torch.equal(new, levels):
            break
        levels = new
    return levels.float()


w7 = layers["7"].weight.detach()
for bits in (2, 3):
    mine, ref = my_kmeans(w7, bits), nonuniform.kmeans_codebook(w7, bits)
    assert torch.allclose(mine, ref, rtol=1e-5, atol=1e-7), (mine, ref)
    print(f"{bits}-bit k-means levels of layer 7:", [round(c, 4) for c in ref.tolist()])
print("NF4 levels (QLoRA):", [round(c, 4) for c in nonuniform.nf4_codebook().tolist()])

# %% [markdown]
# Look at the levels over the weights of layer 7 at 3 bits: the uniform grid (per tensor,
# symmetric), the k-means levels and the NF3 levels (scaled here by the tensor's absmax; the
# real format scales each block of 64).

# %%
bits = 3
w_abs = w7.abs().max()
grids = {"uniform (per tensor)": torch.arange(-4, 4) * qparams_for(w7, bits, symmetric=True)[0],
         "k-means": nonuniform.kmeans_codebook(w7, bits),
         "NF3 x absmax": nonuniform.normal_float_codebook(bits) * w_abs}
fig, axes = plt.subplots(len(grids), 1, figsize=(10, 5), sharex=True)
for ax, (name, levels) in zip(axes, grids.items()):
    ax.hist(w7.flatten(), bins=120, color="tab:gray", alpha=0.5)
    for c in levels:
        ax.axvline(c, color="tab:red", lw=1)
    ax.set_title(f"{name}: {len(levels)} levels", fontsize=9)
plt.tight_layout()
plt.show()

# %% [markdown]
# **Measure** the relative error of all of cnn16's conv/linear weights at 2, 3 and 4 bits, four
# ways: the uniform grid per tensor (section 4), the uniform grid with absmax blocks of 64 (the
# same scales NF uses, so that only the *shape* of the grid differs), k-means per tensor and
# NormalFloat with blocks of 64.

# %%
NONUNIFORM = {
    "uniform, per tensor": int_round_trip,
    "uniform, blocks of 64": lambda w, b: nonuniform.blockwise_fake_quantize(w, nonuniform.uniform_codebook(b), 64),
    "k-means, per tensor": lambda w, b: nonuniform.codebook_quantize(w, nonuniform.kmeans_codebook(w, b)),
    "NormalFloat, blocks of 64": lambda w, b: nonuniform.blockwise_fake_quantize(
        w, nonuniform.normal_float_codebook(b), 64),
}
NU_BITS = (2, 3, 4)


def model_rel_mse(model, method, bits):
    """sum ||w - w_hat||^2 / sum ||w||^2 over all conv/linear weights of model."""
    err = total = 0.0
    for layer in model.modules():
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
            w = layer.weight.detach()
            err += (w - NONUNIFORM[method](w, bits)).pow(2).sum().item()
            total += w.pow(2).sum().item()
    return err / total


rel_mse = {m: [model_rel_mse(model, m, b) for b in NU_BITS] for m in NONUNIFORM}
print(f"{'relative MSE of the weights':28s} " + " ".join(f"{b:>9d} bits" for b in NU_BITS))
for m, errs in rel_mse.items():
    print(f"{m:28s} " + " ".join(f"{e:14.4f}" for e in errs))
# the claims of the next paragraph, on this model
for i, b in enumerate(NU_BITS):
    assert rel_mse["k-means, per tensor"][i] < min(rel_mse[m][i] for m in NONUNIFORM if m != "k-means, per tensor")
for i, b in enumerate((2, 3)):
    assert rel_mse["NormalFloat, blocks of 64"][i] < rel_mse["uniform, blocks of 64"][i]

# %% [markdown]
# By the error of the weights, k-means levels win at every width: they are fitted to this
# tensor. NormalFloat beats the uniform grid with the same block scales at 2 and 3 bits, where
# the shape of the grid matters most; at 4 bits the two are close on these small layers (NF4 is
# tuned for the near-normal weights of large language models, and a block of 64 values is a
# rough sample of a bell). Now the accuracy: every conv/linear weight of cnn16 replaced by its
# quantized version (activations stay float32), on the zoo's seeds (all three in full mode).

# %%
nu_seeds = runtime.pick([0, 1, 2], [0])
nu_acc = {m: {b: [] for b in NU_BITS} for m in NONUNIFORM}
for seed in nu_seeds:
    net = models.pretrained("cnn16", seed=seed)
    for m, quant in NONUNIFORM.items():
        for b in NU_BITS:
            nu_acc[m][b].append(evaluate(with_weights(net, lambda w, q=quant, b=b: q(w.detach(), b)), digits16.test))
print(f"test accuracy of cnn16, mean [min, max] over seeds {nu_seeds} (float32: "
      f"{statistics.mean(evaluate(models.pretrained('cnn16', seed=s), digits16.test) for s in nu_seeds):.1f}%)")
print(f"{'':28s} " + " ".join(f"{b:>17d} bits" for b in NU_BITS))
for m in NONUNIFORM:
    print(f"{m:28s} " + " ".join(f"{statistics.mean(a):5.1f} [{min(a):5.1f}, {max(a):5.1f}]"
                                 for a in (nu_acc[m][b] for b in NU_BITS)))
# the claims of the next paragraph, seed by seed
others = [m for m in NONUNIFORM if m != "k-means, per tensor"]
assert any(nu_acc["k-means, per tensor"][4][i] < max(nu_acc[m][4][i] for m in others) for i in range(len(nu_seeds)))
assert all(a < 50 for m in NONUNIFORM for a in nu_acc[m][2])
assert all(b > a for a, b in zip(nu_acc["uniform, per tensor"][4], nu_acc["uniform, blocks of 64"][4]))

# %% [markdown]
# Read it with care. Accuracy follows the weight error only roughly: the error of the weights
# is not the loss. k-means, the best by weight error, is not the most accurate at 4 bits (on
# at least one seed): a codebook fitted per tensor has no exact 0 and no symmetry, so it can
# shift a channel's mean, which the batch norm after it does not expect; and the seeds
# disagree by many points at 3 bits. What holds on every seed here: at 2 bits nothing works
# without retraining (lesson 05), and at 4 bits uniform blocks of 64 keep more accuracy than
# one uniform scale per tensor: small blocks follow the weights' local range.
#
# Non-uniform weights cost something at run time: a level is a table lookup, so the product
# runs in floats (or a lookup-table kernel) after decoding, not on integer units. That is why
# they are used where **memory** is the bottleneck (weights of large language models, QLoRA),
# while integer grids are used where arithmetic must be cheap (lessons 02-04).
#
# ## 6. Memory: bytes per format
#
# A tensor's bytes are `numel * element_size()`. torch has no 4-bit dtype: 4-bit codes are
# **packed** two per byte. Build the packing and check that it round-trips, and that it writes
# the same bytes as `qlib.packing` (first code in the low nibble, as bitsandbytes and GGUF do):

# %%
def pack_int4(q):
    """Pack signed 4-bit codes (int8 tensor, values -8..7, even length) two per uint8 byte."""
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)  # two's complement nibble
    return u[0::2] | (u[1::2] << 4)


def unpack_int4(packed):
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=1).flatten().to(torch.int16)
    return torch.where(nibbles >= 8, nibbles - 16, nibbles).to(torch.int8)


q = torch.randint(-8, 8, (1000,), generator=gen, dtype=torch.int8)
assert torch.equal(unpack_int4(pack_int4(q)), q)
assert torch.equal(pack_int4(q), packing.pack(q, 4, signed=True))
print(f"1000 int4 codes: {pack_int4(q).numel()} bytes packed "
      f"(measure.tensor_bytes says {measure.tensor_bytes(1000, 4)})")

w = torch.cat([layer.weight.detach().flatten() for layer in layers.values()])
sizes = {short(dt): w.to(dt).numel() * w.to(dt).element_size() for dt in FLOATS}
sizes["int8"] = w.numel() * torch.int8.itemsize
sizes["int4 (packed)"] = packing.pack(torch.zeros(w.numel(), dtype=torch.int8), 4, signed=True).numel()
sizes["int2 (packed)"] = packing.pack(torch.zeros(w.numel(), dtype=torch.int8), 2, signed=True).numel()
for k, nbytes in sizes.items():
    print(f"{k:14s} {nbytes:7d} bytes  ({sizes['float32'] / nbytes:.0f}x smaller than float32)")
print("all parameters of cnn16 at 32 / 16 / 8 / 4 bits:",
      [measure.model_size_bytes(model, b) for b in (32, 16, 8, 4)], "bytes")

# %% [markdown]
# (A real int8 or int4 model also stores one scale per tensor or per channel: a few hundred
# bytes here.) The formats of section 5 store more beside the codes: k-means a codebook of $2^b$
# float32 levels per tensor, NormalFloat one float32 absmax per block of 64 weights (0.5 bits
# per weight; QLoRA quantizes those absmax values again to 8 bits, "double quantization"). The
# indices are packed with `qlib.packing` (3-bit indices in 4-bit fields: 3 does not divide 8).
# Bits per weight, everything included, for cnn16's conv/linear weights:

# %%
def packed_bytes(method, bits):
    """(index bytes, side-information bytes) of all conv/linear weights of cnn16 in a format."""
    field = 4 if bits == 3 else bits
    index = side = 0
    for layer in layers.values():
        wl = layer.weight.detach()
        if method.startswith("k-means"):
            codes = nonuniform.codebook_encode(wl, nonuniform.kmeans_codebook(wl, bits))
            side += 4 * 2**bits                                   # the float32 codebook
        elif "blocks" in method:
            cb = nonuniform.normal_float_codebook(bits) if "Normal" in method else nonuniform.uniform_codebook(bits)
            codes, absmax = nonuniform.blockwise_quantize(wl, cb, 64)
            side += 4 * absmax.numel()                            # one float32 absmax per block
        else:
            codes = torch.zeros(wl.numel(), dtype=torch.uint8)    # the codes' values do not change the size
            side += 4                                             # one float32 scale
        packed = packing.pack(codes, field)
        assert torch.equal(packing.unpack(packed, field, codes.shape), codes.to(torch.uint8))
        index += packed.numel()
    return index, side


n_w = w.numel()
print(f"{'format':28s} " + " ".join(f"{b:>12d} bits" for b in NU_BITS) + "   (bits per weight; float32 = 32)")
for m in NONUNIFORM:
    cells = []
    for b in NU_BITS:
        index, side = packed_bytes(m, b)
        cells.append(f"{8 * (index + side) / n_w:17.2f}")
    print(f"{m:28s}" + "".join(cells))

# ## 7. Compute: time, measured side by side
#
# Timings on a shared machine drift, so we time the candidates **interleaved** (one call of
# each in turn, repeated), on **one thread** (a thread waiting for a busy core distorts
# everything), and report the median of each as a **ratio** to float32. First a memory-bound
# operation (copying a tensor into a buffer: time follows the bytes moved), then a
# compute-bound one (a matrix product, where only hardware with fast low-precision units gains).

# %% [markdown]
# `qlib.measure.side_by_side` does exactly that: warm-up calls, then rounds that call every
# candidate once in turn, on one thread, and the median of each. Lesson 00 times its matrix
# product with the same helper and the same sizes, with the casts done before the clock starts
# (only the operation is timed), so the two lessons measure the same thing.

# %%
n = runtime.pick(2**24, 2**22)
copies = {k: torch.ones(n, dtype=dt) for k, dt in
          [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16), ("int8", torch.int8)]}
buffers = {k: torch.empty_like(t) for k, t in copies.items()}
copy_times = measure.side_by_side({k: (lambda k=k: buffers[k].copy_(copies[k])) for k in copies},
                                  repeats=runtime.pick(15, 9))

size = runtime.pick(512, 256)
a, b = torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)
a_i8 = torch.randint(-128, 128, (size, size), generator=gen, dtype=torch.int8)
b_i8 = torch.randint(-128, 128, (size, size), generator=gen, dtype=torch.int8)
matmuls = {"float32": lambda: a @ b}
for k, dt in [("bfloat16", torch.bfloat16), ("float16", torch.float16)]:
    matmuls[k] = lambda x=a.to(dt), y=b.to(dt): x @ y
try:
    torch._int_mm(a_i8, b_i8)  # int8 x int8 -> int32; not every build/device has it
    matmuls["int8"] = lambda: torch._int_mm(a_i8, b_i8)
except RuntimeError as err:
    print("no int8 matmul kernel here:", err)
mm_times = measure.side_by_side(matmuls, repeats=runtime.pick(10, 5))

print(f"{'':10s} {'copy of ' + str(n) + ' elements':>30s}   {'matmul ' + str(size) + 'x' + str(size):>30s}")
for k in copies:
    line = f"{k:10s} {copy_times[k] * 1e3:8.2f} ms, speed-up {copy_times['float32'] / copy_times[k]:5.2f}x"
    if k in mm_times:
        line += f"   {mm_times[k] * 1e3:8.2f} ms, speed-up {mm_times['float32'] / mm_times[k]:5.2f}x"
    print(line)

viz.plot_grouped_bars(list(copies), {
    "copy (memory-bound)": [copy_times["float32"] / copy_times[k] for k in copies],
    "matmul (compute-bound)": [mm_times["float32"] / mm_times[k] if k in mm_times else math.nan for k in copies],
}, ylabel="speed-up over float32 (x, log)", logy=True,
    title="speed-up over float32 on this machine, measured side by side")
plt.axhline(1, color="gray", lw=1)
plt.show()

# %% [markdown]
# Read the ratios, not the milliseconds. Copies speed up roughly with the bytes saved on any
# machine. Matrix products only speed up where the hardware has low-precision units
# (GPU tensor cores, CPUs with AVX-512 VNNI/BF16 or AMX) *and* PyTorch has a kernel for them;
# on a CPU without them, bfloat16, float16 and int8 products can be *slower* than float32,
# because float32 has the most optimized kernels. Lesson 04 comes back to this with a whole
# network in integer arithmetic, and lesson 09 writes the int8 matrix product in Triton
# (`qlib.kernels`: on a GPU, or in Triton's interpreter on the CPU).
#
# ## Summary
# - A float is sign, exponent (range) and mantissa (precision); `torch.finfo` gives
#   `max`, `smallest_normal`, `eps`. float16 trades range for precision; bfloat16 keeps
#   float32's range with 8 significant bits; float8 keeps about one decimal digit.
# - Floats have constant **relative** spacing, integers constant **absolute** spacing: an
#   integer format needs a scale that fits the data's range.
# - On a trained CNN, 16-bit floats, float8 and int8 (one scale per tensor) cost next to no
#   accuracy; int4 with that simple scale does.
# - Trained weights are bell-shaped: at 4 bits and below a uniform grid is not MSE-optimal.
#   k-means codebooks (Lloyd's algorithm) and NormalFloat levels put more levels near 0 and
#   lower the weight error; accuracy follows only roughly, and the levels cost a table
#   lookup at run time, so they serve memory-bound weights.
# - Fewer bits mean proportionally fewer bytes once codes are packed (two 4-bit codes a
#   byte), plus the scales or codebooks. Speed depends on the hardware: measure it,
#   side by side, as ratios.
#
# **Exercises**
# 1. Decode by hand the float16 bits that the explorer shows for `-2.5` and for `65504`.
#    Which float16 number comes right after 2048?
# 2. Which of the formats above can represent 0.1 more precisely: bfloat16 or float8_e4m3fn
#    scaled by 100 (store 10.0, divide by 100 afterwards)? Measure it.
# 3. Repeat section 4 with `res16` and `mlp`. Which model suffers most at int4? Look at its
#    `max|w|` vs `median|w|`.
# 4. In section 2, sum 4000 ones in bfloat16. Where does it stall, and why there?
# 5. Time the matmul at 128, 256 and 1024 (change `size`). Does the float32/int8 ratio change
#    with the size? Why might small products be dominated by overhead?
# 6. In section 5, give NormalFloat blocks of 16, 64 and 256 weights (`blockwise_fake_quantize(w,
#    cb, block_size)`): how do the weight error and the bits per weight change? Where is the
#    best trade-off at 3 bits?
# 7. Start k-means from `init="density"` and `init="random"` (several seeds) at 2 bits. Do
#    they reach the same levels as the linear start? Lloyd's algorithm finds a local optimum:
#    which start gives the lowest MSE?
