"""qlib.widgets: explorers and ``interact`` without Output widgets; lessons' widget cells never hang.

Reference: ``ipywidgets.interact`` (same call: controls for a function's arguments, its output
below them) and jupyter/nbclient#312 (a headless client that waits for a cell's reply on the
shell socket while its Output-widget stand-in sends on that socket can wait forever; see
``qlib.grading``). The notebook test executes every widget cell of the lessons, verbatim,
REPEATS times in one kernel with a short per-cell timeout, and records every message the
client sends to the kernel: a widget cell must send none (only the execute requests), which
removes the hang's trigger. A control cell with ``ipywidgets.interact`` shows that the spy
does see the messages an Output widget makes the client send.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from queue import Empty

import jupytext
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nbformat  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from qlib import grading, widgets  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REPEATS = 20
CELL_TIMEOUT = 20  # seconds: one redraw takes well under a second; a hang fails fast

# The globals each lesson's widget cell reads, as small stand-ins (the lessons compute them from
# trained models, which takes minutes). The widget cell itself runs verbatim.
SETUP = {
    "00_welcome": """
import ipywidgets as ipw
from qlib import measure, models
from qlib.widgets import interact
model = models.create("cnn16")
""",
    "01_numbers_and_precision": "from qlib import widgets",
    "02_linear_quantization": """
import torch
from qlib import widgets
gen = torch.Generator().manual_seed(0)
tensors = {"weights": torch.randn(2000, generator=gen) * 0.1,
           "ReLU activations": torch.randn(2000, generator=gen).relu()}
w3 = torch.randn(500, generator=gen) * 0.2
""",
    "03_calibration": """
import math
import ipywidgets as ipw
import matplotlib.pyplot as plt
import torch
from qlib import viz
from qlib.observers import make_observer
from qlib.qparams import quant_range
from qlib.quantize import dequantize, fake_quantize
from qlib.widgets import interact
OBSERVERS = ("minmax", "moving_average", "percentile", "mse", "entropy")
gen = torch.Generator().manual_seed(0)
batches = {name: [torch.randn(64, 50, generator=gen).relu() for _ in range(2)] for name in ("3", "7")}
acts = {name: torch.cat(b) for name, b in batches.items()}
layers = dict.fromkeys(batches)
ranges = {}
""",
    "05_quantization_aware_training": """
import ipywidgets as ipw
import matplotlib.pyplot as plt
import torch
from qlib.lsq import lsq_gradients
from qlib.quantize import fake_quantize
from qlib.widgets import interact
w_demo = torch.randn(4096, generator=torch.Generator().manual_seed(1))
""",
}
# Cells of a lesson that define what its widget cell calls (run verbatim, before it).
SETUP["16_quantizing_transformers"] = """
import ipywidgets as ipw
import matplotlib.pyplot as plt
import torch
from qlib.llm import gptq, smoothquant, stats, w8a8, weight_only
from qlib.widgets import interact
gen = torch.Generator().manual_seed(0)
big = torch.nn.Module()  # stands in for the lesson's model with planted outliers
big.blocks = torch.nn.ModuleList([torch.nn.Module(), torch.nn.Module()])
big.blocks[1].attn = torch.nn.Module()
big.blocks[1].attn.q = torch.nn.Linear(128, 128)
acts_big = torch.randn(64, 128, generator=gen)
acts_big[:, 7] *= 20
name = "blocks.2.fc1"
w = torch.randn(512, 128, generator=gen) * 0.05
acts = {name: torch.randn(64, 128, generator=gen)}
"""

DEFINITIONS = {"03_calibration": ["def calibrated_range("]}


def lesson_cells(name: str) -> list[str]:
    nb = jupytext.read(ROOT / "lessons" / f"{name}.py")
    return [c.source for c in nb.cells if c.cell_type == "code"]


def widget_cells(name: str) -> list[str]:
    """The cells of a lesson that build a widget: an ``interact(`` or an ``..._explorer(`` call."""
    return [s for s in lesson_cells(name)
            if any(line.lstrip().startswith(("interact(", "widgets.interact(", "ipw.interact("))
                   or "_explorer(" in line for line in s.splitlines())]


# ---------------------------------------------------------------------- library, no kernel

def test_render_collects_printout_and_figures_and_closes_them():
    def draw(n=3):
        print("n is", n)
        fig, ax = plt.subplots()
        ax.plot(range(n))
        plt.show()  # shows nothing inside render: the figure is collected

    text, pngs = widgets.render(draw, n=5)
    assert text == "n is 5\n"
    assert len(pngs) == 1 and pngs[0].startswith(b"\x89PNG")
    assert plt.get_fignums() == []


def test_render_shows_an_exception_as_its_traceback():
    text, pngs = widgets.render(lambda: 1 / 0)
    assert "ZeroDivisionError" in text and pngs == []


def test_interact_redraws_on_change_without_output_widgets():
    import ipywidgets as ipw

    def show(bits=8, label="x"):
        print(f"{label}: {bits} bits")
        if bits < 4:
            plt.figure()

    box = widgets.interact(show, bits=ipw.IntSlider(value=8, min=2, max=8), label=["x", "y"])
    controls, pictures, text = box.children
    bits, label = controls.children
    assert label.description == "label" and "x: 8 bits" in text.value and pictures.children == ()
    bits.value = 3
    assert "x: 3 bits" in text.value and len(pictures.children) == 1
    label.value = "y"
    assert "y: 3 bits" in text.value
    assert plt.get_fignums() == []

    def walk(w):
        yield w
        for child in getattr(w, "children", ()):
            yield from walk(child)

    assert not any(isinstance(w, ipw.Output) for w in walk(box))
    assert not any(isinstance(w, ipw.Output) for w in walk(widgets.quantization_explorer(torch.randn(100))))


def test_interact_rejects_bad_arguments():
    with pytest.raises(TypeError, match="function"):
        widgets.interact(3)
    with pytest.raises(ValueError, match="control for bits"):
        widgets.interact(lambda bits: bits, bits=object())


class _MissedWakeUp:
    """A shell channel whose blocking wait misses the message (the zmq edge consumed elsewhere):
    with ``timeout=None`` it would sleep forever; a finite wait sees a message that arrived."""

    def __init__(self, arrives_after: float):
        self.arrival = time.monotonic() + arrives_after

    async def get_msg(self, timeout=None):
        if timeout is None:
            await asyncio.sleep(3600)
        if time.monotonic() >= self.arrival:  # the non-blocking check at the start of a poll
            return {"msg_type": "execute_reply"}
        await asyncio.sleep(timeout)
        raise Empty


def test_sliced_polls_recover_a_missed_wake_up():
    channel = _MissedWakeUp(arrives_after=0.15)
    get = grading.sliced_get_msg(channel.get_msg, slice_s=0.05)
    start = time.monotonic()
    msg = asyncio.run(asyncio.wait_for(get(timeout=None), 5))
    assert msg["msg_type"] == "execute_reply" and time.monotonic() - start < 1


def test_sliced_polls_keep_the_timeout():
    get = grading.sliced_get_msg(_MissedWakeUp(arrives_after=60).get_msg, slice_s=0.05)
    start = time.monotonic()
    with pytest.raises(Empty):
        asyncio.run(get(timeout=0.3))
    assert 0.25 < time.monotonic() - start < 2
    with pytest.raises(ValueError, match="slice_s"):
        grading.sliced_get_msg(get, slice_s=0)


# ---------------------------------------------------------------------- lessons, in a kernel

class SpyRunner(grading.NotebookRunner):
    """Records the type of every message the client sends to the kernel on the shell channel."""

    sent: list

    async def async_start_new_kernel_client(self):
        kc = await super().async_start_new_kernel_client()
        self.sent = []
        send = kc.shell_channel.send

        def spy(msg):
            self.sent.append(msg["header"]["msg_type"])
            return send(msg)

        kc.shell_channel.send = spy
        return kc


@pytest.mark.parametrize("name", sorted(SETUP))
def test_every_widget_lesson_has_its_widget_cell_found(name):
    assert widget_cells(name), f"no widget cell found in lessons/{name}.py"
    for marker in DEFINITIONS.get(name, []):
        assert any(marker in s for s in lesson_cells(name)), (name, marker)


def test_every_lesson_with_widgets_is_covered():
    uses = {p.stem for p in (ROOT / "lessons").glob("*.py")
            if "interact(" in p.read_text() or "_explorer(" in p.read_text()}
    assert uses <= set(SETUP)


@pytest.mark.notebook
def test_widget_cells_run_repeatedly_without_hang_and_send_nothing_back():
    cells, labels = [], []
    for name, setup in SETUP.items():
        cells.append(setup)
        labels.append(f"{name} setup")
        for marker in DEFINITIONS.get(name, []):
            found = [s for s in lesson_cells(name) if marker in s]
            cells += found
            labels += [f"{name} definitions"] * len(found)
        for source in widget_cells(name):
            cells += [source] * REPEATS
            labels += [f"{name} widget"] * REPEATS
    control = "import ipywidgets\nipywidgets.interact(lambda k=1: print(k), k=3);"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in cells + [control]])
    runner = SpyRunner(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                       resources={"metadata": {"path": str(ROOT / "lessons")}})
    start = time.perf_counter()
    per_lesson: dict[str, float] = {}
    with runner.setup_kernel():
        for index, cell in enumerate(nb.cells[:-1]):
            t0 = time.perf_counter()
            runner.execute_cell(cell, index)  # CellTimeoutError on a hang
            lesson = labels[index].split()[0]
            per_lesson[lesson] = per_lesson.get(lesson, 0.0) + time.perf_counter() - t0
            assert set(runner.sent) <= {"kernel_info_request", "execute_request"}, \
                (labels[index], runner.sent)
        seconds = time.perf_counter() - start
        runner.sent.clear()
        runner.execute_cell(nb.cells[-1], len(nb.cells) - 1)
        control_sent = list(runner.sent)
    print(f"\n[widget cells] {len(cells)} cells, each widget cell {REPEATS} times, in {seconds:.1f} s: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in per_lesson.items()))
    for cell, label in zip(nb.cells, labels):
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, (label, errors)
    assert "comm_msg" in control_sent  # the spy sees what an Output widget makes the client send
