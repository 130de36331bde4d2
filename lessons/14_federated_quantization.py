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
# # 14 · Federated learning with quantized updates
#
# **What you will learn**
# - why **federated learning** needs quantization: every round, every client sends a whole
#   model update uplink, over the slowest link of the system (a phone's upload, a hospital's
#   firewall), and trains on a device with little memory;
# - a **quantized update codec**: the update $d = w_k - w$ in 8, 4 or 2 bits, with
#   **stochastic rounding** (unbiased) vs round-to-nearest, and **error feedback**; bytes
#   counted exactly;
# - **non-IID clients**: a Dirichlet label split, and what it does to FedAvg;
# - FedAvg run by **Flower**'s simulation engine, the framework that also runs on real devices;
# - **QAT in the clients** vs PTQ after, and **data-free calibration on the server**, which
#   never sees a training example.
#
# Federated averaging (McMahan et al., 2017): each round the server sends the global weights
# $w$; client $k$ trains a copy on its own $n_k$ examples and returns the update $d_k$; the
# server sets $w \leftarrow w + \sum_k \frac{n_k}{n} \hat d_k$ where $\hat d_k$ is what arrived.

# %%
import ipywidgets as ipw
import matplotlib.pyplot as plt
import torch
from IPython.display import display

from qlib import data, models, runtime
from qlib.federated import codec, fedavg, flower, partition, server
from qlib.qparams import PerChannel, PerTensor
from qlib.train import evaluate, format_spread

torch.set_num_threads(runtime.pick(2, 1))  # fast mode (tests) runs beside other work: one thread, no spin-waiting
SEED = 0
print("fast mode:", runtime.fast(), "| Flower installed:", flower.available())

# %% [markdown]
# ## 1. The codec, built from scratch
#
# An update is centred on zero, so a **symmetric** code suffices: $q_{max} = 2^{b-1}-1$,
# $s = \max|d| / q_{max}$ (one scale per tensor, or per output channel), and
#
# - nearest: $q = \mathrm{round}(d/s)$;
# - stochastic: $q = \lfloor d/s + u \rfloor$, $u \sim U[0,1)$: rounds $v = d/s$ up with
#   probability $v - \lfloor v \rfloor$, so $\mathbb E[q] = v$.
#
# We write both, then check them against `qlib.federated.codec`.

# %%
def my_encode(d, bits, rounding, g=None):
    qmax = 2 ** (bits - 1) - 1
    scale = d.abs().max() / qmax
    v = d * (1 / scale)
    q = torch.round(v) if rounding == "nearest" else torch.floor(v + torch.rand(d.shape, generator=g))
    return q.clamp(-qmax, qmax).to(torch.int8), scale


d = torch.randn(1000, generator=torch.Generator().manual_seed(SEED)) * 0.01
for bits in (8, 4, 2):
    q, s = my_encode(d, bits, "nearest")
    assert torch.equal(q, codec.encode(d, bits, PerTensor(), "nearest").codes)
    q, s = my_encode(d, bits, "stochastic", torch.Generator().manual_seed(1))
    assert torch.equal(q, codec.encode(d, bits, PerTensor(), "stochastic", torch.Generator().manual_seed(1)).codes)
print("my codec == qlib.federated.codec for 8, 4 and 2 bits, nearest and stochastic")

# %% [markdown]
# **Unbiased?** Average 2000 stochastic 2-bit draws of the same update and compare with
# nearest rounding: nearest sends every entry smaller than $s/2$ as 0, every time.

# %%
g = torch.Generator().manual_seed(SEED)
many = codec.encode(d.expand(2000, -1).contiguous(), 2, PerChannel(0), "stochastic", g)
mean_sr = codec.decode(many).mean(0)
near = codec.decode(codec.encode(d, 2, PerTensor(), "nearest"))
print(f"mean |error| over 2000 draws, stochastic: {(mean_sr - d).abs().mean():.2e}   nearest: {(near - d).abs().mean():.2e}")
fig, ax = plt.subplots(figsize=(5, 3.5))
ax.scatter(d[:200].numpy(), near[:200].numpy(), s=8, label="nearest (one draw = every draw)")
ax.scatter(d[:200].numpy(), mean_sr[:200].numpy(), s=8, label="stochastic, mean of 2000 draws")
ax.plot([d.min().item(), d.max().item()], [d.min().item(), d.max().item()], "k--", lw=0.8)
ax.set_xlabel("update entry d"); ax.set_ylabel("what the server gets on average"); ax.legend(fontsize=8)
plt.tight_layout(); plt.show()

# %% [markdown]
# **Bytes.** Codes are packed $8/b$ to a byte, plus a float32 scale per tensor or channel.
# For one update of the digits MLP:

# %%
model = models.create("mlp", seed=SEED)
params = {k: v.detach() for k, v in model.named_parameters()}
n = sum(p.numel() for p in params.values())
print(f"fp32: {codec.update_bytes(codec.encode_update(params, None)):,} bytes ({n:,} parameters)")
for bits in (8, 4, 2):
    for gran in (PerTensor(), PerChannel(0)):
        enc = codec.encode_update(params, bits, gran, "nearest")
        print(f"{bits} bits, {type(gran).__name__:10s}: {codec.update_bytes(enc):7,} bytes")

# %% [markdown]
# ## 2. Clients that do not look alike: a Dirichlet split
#
# For every class, the shares of the clients are drawn from $\mathrm{Dir}(\alpha)$. Small
# $\alpha$: each client sees a few classes; large $\alpha$: every client sees the global mix.

# %%
d8 = data.load_digits(8)
y = d8.train.tensors[1]
fig, axes = plt.subplots(1, 3, figsize=(11, 2.8))
for ax, alpha in zip(axes, (0.1, 1.0, 100.0)):
    h = partition.label_histogram(y, partition.dirichlet_partition(y, 4, alpha, seed=SEED), 10)
    ax.imshow(h, cmap="Blues"); ax.set_title(f"alpha = {alpha}")
    ax.set_xlabel("class"); ax.set_ylabel("client")
plt.tight_layout(); plt.show()

# %% [markdown]
# ## 3. FedAvg on Flower
#
# `qlib.federated.flower.simulate` wraps the client step and the aggregation in a Flower
# `ClientApp` and a `FedAvg` strategy and runs them with `flwr.simulation.run_simulation`
# (on Ray). Starting Ray takes tens of seconds on a busy 2-core machine, so in fast mode the
# same rounds run through `fedavg.run_rounds`, the in-process driver over the very same
# functions (a test checks that both give the same model bit for bit).

# %%
ROUNDS = runtime.pick(10, 3)
clients = partition.client_datasets(d8.train, partition.dirichlet_partition(y, 2, 0.5, seed=SEED))
cfg = fedavg.FedConfig(rounds=ROUNDS, bits=4, rounding="stochastic", seed=SEED)
global_model = models.create("mlp", seed=SEED)
if flower.available() and not runtime.fast():
    hist = flower.simulate(global_model, clients, cfg, evaluate=lambda m: evaluate(m, d8.test))
    print(f"Flower simulation: {hist['wall_s']:.1f} s")
else:
    hist = fedavg.run_rounds(global_model, clients, cfg, evaluate=lambda m: evaluate(m, d8.test))
for r, (a, b) in enumerate(zip(hist["acc"], hist["bytes"]), 1):
    print(f"round {r:2d}: accuracy {a:5.1f} %   uplink so far {b:>9,} bytes")

# %% [markdown]
# ## 4. Accuracy vs bytes
#
# `benchmarks/federated.py` ran 4 clients for 20 rounds, IID and non-IID (alpha 0.3), with
# fp32, 8-, 4- and 2-bit updates, three seeds. Accuracy after each round, mean over seeds,
# against the cumulative uplink bytes:

# %%
bench = runtime.benchmark_result("federated")
if bench is not None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, split in zip(axes, ("iid", "noniid")):
        for name, r in bench["updates"][split].items():
            per_round = r["bytes_per_round"]
            xs = [per_round * (i + 1) for i in range(len(r["acc_per_round_mean"]))]
            ax.plot(xs, r["acc_per_round_mean"], marker=".", label=name)
        ax.set_xscale("log"); ax.set_title(split); ax.set_xlabel("uplink bytes (all clients)")
    axes[0].set_ylabel("test accuracy %"); axes[1].legend(fontsize=7)
    plt.tight_layout(); plt.show()
    print(f"{'split':7s} {'update':16s} {'accuracy mean [min, max]':>26s} {'bytes':>11s}")
    for split, rows in bench["updates"].items():
        for name, r in rows.items():
            a = r["accuracy"]
            print(f"{split:7s} {name:16s} {format_spread(a, width=12, bounds_width=0)} {r['total_bytes']:>11,}")
    if bench.get("flower"):
        print(f"\nFlower simulation (2 clients, 2 rounds): {bench['flower']['wall_s']:.1f} s wall, "
              f"same model as in process: {bench['flower']['same_model_as_in_process']}")

# %% [markdown]
# ## 5. QAT in the clients vs PTQ after; calibration on a server without data
#
# The server must quantize the global model for deployment but holds no data. FedAvg
# averaged the clients' BatchNorm running statistics into the global model, so the server can
# synthesize calibration inputs that match them (ZeroQ, lesson 06). Compare with noise and
# with real digits (which the server could not have had), and with clients that trained with
# 3-bit weight QAT:

# %%
if bench is not None:
    for kind, rows in bench["qat_vs_ptq"].items():
        print(kind)
        for k, v in rows.items():
            a = v["accuracy"]
            print(f"   {k:18s} {format_spread(a, bounds_width=0)}")

# %% [markdown]
# The same on the model we just trained, live:

# %%
sets = server.calibration_sets(global_model, (1, 8, 8), real=[d8.train.tensors[0][:128]],
                               num_samples=64, steps=runtime.pick(50, 20), seed=SEED)
print(f"fp32 global model: {evaluate(global_model, d8.test):.1f} %")
for source, batches in sets.items():
    print(f"{source:9s} W4A4: {evaluate(server.quantize_global(global_model, batches, 4, 4), d8.test):5.1f} %")

# %% [markdown]
# ## 6. Explore: clients, alpha and update bits
#
# Move a slider; the run (in process, 3 rounds) starts when you press the button.

# %%
w_clients = ipw.IntSlider(value=4, min=2, max=8, description="clients")
w_alpha = ipw.FloatLogSlider(value=0.3, base=10, min=-1, max=2, description="alpha")
w_bits = ipw.Dropdown(options=[("fp32", None), ("8", 8), ("4", 4), ("2", 2)], value=4, description="bits")
w_go = ipw.Button(description="run 3 rounds")
out = ipw.Output()


def run_widget(_=None):
    with out:
        out.clear_output()
        parts = partition.dirichlet_partition(y, w_clients.value, w_alpha.value, seed=SEED)
        cl = partition.client_datasets(d8.train, parts)
        m = models.create("mlp", seed=SEED)
        h = fedavg.run_rounds(m, cl, fedavg.FedConfig(rounds=3, bits=w_bits.value, seed=SEED),
                              evaluate=lambda mm: evaluate(mm, d8.test))
        print(f"accuracy per round {[round(a, 1) for a in h['acc']]}, uplink {h['bytes'][-1]:,} bytes")


w_go.on_click(run_widget)
display(ipw.VBox([ipw.HBox([w_clients, w_alpha, w_bits, w_go]), out]))
run_widget()

# %% [markdown]
# ## Summary
#
# - An update quantized to 8 bits costs about 4x fewer bytes than fp32, 2 bits about 11x
#   (the per-channel scales are the rest). With IID clients FedAvg reaches the same accuracy
#   within the spread over seeds; with non-IID clients at 2 bits, look at the *min* over
#   seeds in the table: one bad round at the end is enough to pull a seed down.
# - Stochastic rounding is unbiased; nearest rounding is not, but its bias is bounded by
#   $s/2$; error feedback re-sends what nearest rounding dropped.
# - Non-IID clients cost accuracy and stability, with or without quantization.
# - A server without data can still calibrate: the BN statistics travel with the weights.
#
# **Exercises**
# 1. Set `error_feedback=True` with 2-bit nearest updates and alpha 0.1: does it close the gap?
# 2. Send the BatchNorm running statistics quantized too (edit a copy of `client_update`):
#    what happens to the running variance at 2 bits, and why did qlib send them in fp32?
# 3. Run `flower.simulate` with 4 clients and time it against `fedavg.run_rounds`.
