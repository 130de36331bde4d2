"""Grading throughput: how long real ``nbgrader autograde`` takes per submission, lab by lab.

For each lab a scratch course is built (``nbgrader_config.py`` and the lab's source, the lab
registered with ``generate_assignment``) and ``N`` submissions of each kind are autograded
with ``qlib.grading.autograde_parallel`` (``make grade``'s command; ``--jobs`` processes, as
root inside the grading sandbox when it can run):

- ``solution``: the solution notebook's answers in the release (every check runs and passes);
- ``release``: the untouched release (every answer raises ``NotImplementedError``);
- ``partial``: the solution with every other answer left as released (checks pass and fail).

Reported per lab: ``seconds_per_submission`` (the wall time of the whole autograde divided by
the number of submissions, so the grading processes' own start is included) and
``class_of_100_min`` (100 submissions at that rate); ``cpu_s_per_submission`` (CPU seconds of
the grading processes, sandbox launchers and kernels, per submission) and
``class_of_100_min_idle`` (100 submissions at that CPU cost spread over ``min(jobs, cores)``
cores: what an idle machine of this kind takes, the load of other users taken out); and where
the time goes, read from the
cell timings nbclient writes into each autograded notebook: ``kernel_and_grader_s`` (the
wall time per submission outside any cell: kernel start, nbgrader's own work), ``imports_s``
(the lab's first code cells, up to the first answer: ``import torch``, qlib, data, models),
``answers_s`` (the student's cells) and ``checks_s`` (the graded test cells, hidden tests
included). Target: 100 submissions of any lab in at most 10 minutes on a 2-core CPU, judged from CPU
time (an idle machine); the slowest lab's wall time as measured is recorded in ``measured_wall``
with the load averages.

The header records the machine's load average before and after: on a shared machine a
high load stretches every number here (the committed run says what it ran beside).

    python benchmarks/grading.py --n 3 --jobs 2          # every lab, 9 submissions each
    python benchmarks/grading.py --n 1 --labs lab00_warmup lab04_qat --out /tmp/g.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS_DIR, header, target_lines, write  # noqa: E402
from qlib.grading import autograde_parallel  # noqa: E402
from qlib.sandbox import sandbox_problem  # noqa: E402

LABS = sorted(p.name for p in (ROOT / "solutions").iterdir() if p.name.startswith("lab"))
KINDS = ("solution", "release", "partial")
TARGET_MIN = 10.0
NBGRADER = str(Path(sys.executable).parent / "nbgrader")


def run_nbgrader(course: Path, *args: str) -> None:
    import subprocess

    out = subprocess.run([NBGRADER, *args], cwd=course, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"nbgrader {' '.join(args)} failed:\n{out.stderr[-3000:]}")


def answer_ids(nb) -> list[str]:
    return [c.metadata["nbgrader"]["grade_id"] for c in nb.cells
            if c.cell_type == "code" and c.metadata.get("nbgrader", {}).get("solution")]


def submissions(release, solution, kind: str):
    """The release with the solution's answers: all of them, none, or every other one."""
    ids = answer_ids(solution)
    take = {"solution": set(ids), "release": set(), "partial": set(ids[::2])}[kind]
    source = {c.metadata["nbgrader"]["grade_id"]: c.source for c in solution.cells
              if c.metadata.get("nbgrader", {}).get("grade_id") in take}
    nb = nbformat.from_dict(release)
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid in source:
            cell.source = source[gid]
    return nb


CORES = os.cpu_count() or 1


class CpuMeter:
    """CPU seconds (user + system) of every process below this one while it runs: the
    grading processes, the sandbox launchers and the kernels.

    A thread reads ``/proc/<pid>/stat`` of each descendant every ``period`` seconds and keeps
    the last value per process (a process's final fraction of a period is missed). Counting
    what the kernel reports for finished children is not enough: a kernel killed at shutdown
    is never waited for by its parent, and its time would be lost.
    """

    def __init__(self, period: float = 0.2):
        import threading

        self.period, self.seen, self.running = period, {}, True
        self.tick = os.sysconf("SC_CLK_TCK")
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        me = os.getpid()
        while self.running:
            parents, stats = {}, {}
            for entry in os.scandir("/proc"):
                if entry.name.isdigit():
                    try:
                        with open(f"/proc/{entry.name}/stat") as f:
                            fields = f.read().rsplit(")", 1)[1].split()
                    except OSError:
                        continue
                    pid = int(entry.name)
                    parents[pid] = int(fields[1])
                    stats[pid] = (fields[19], int(fields[11]) + int(fields[12]))  # starttime, utime + stime
            for pid, (start, ticks) in stats.items():
                p, hops = parents.get(pid), 0
                while p not in (None, 0, 1, me) and hops < 50:
                    p, hops = parents.get(p), hops + 1
                if p == me and pid != me:
                    self.seen[(pid, start)] = ticks
            time.sleep(self.period)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return sum(self.seen.values()) / self.tick


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def time_split(nb) -> dict[str, float]:
    """Seconds spent in the imports (code cells before the first answer), answers and checks."""
    split = {"imports_s": 0.0, "answers_s": 0.0, "checks_s": 0.0}
    seen_answer = False
    for cell in nb.cells:
        timing = cell.metadata.get("execution", {})
        if cell.cell_type != "code" or "iopub.status.busy" not in timing:
            continue
        meta = cell.metadata.get("nbgrader", {})
        seen_answer = seen_answer or bool(meta.get("solution"))
        key = "checks_s" if meta.get("grade") else "answers_s" if seen_answer else "imports_s"
        split[key] += _ts(timing["iopub.status.idle"]) - _ts(timing["iopub.status.busy"])
    return split


def scores(course: Path, lab: str, students: list[str]) -> dict[str, list[float]]:
    """{student: [autograded score, max score]} from the gradebook (a sanity check: the
    solution's copies must get every automatic point, the release's none)."""
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        out = {}
        for student in students:
            sub = gb.find_submission(lab, student)
            out[student] = [sub.code_score, sub.max_code_score]
        return out


def grade_lab(lab: str, n: int, jobs: int, log) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"grading-{lab}-") as tmp:
        course = Path(tmp)
        shutil.copy(ROOT / "nbgrader_config.py", course)
        shutil.copytree(ROOT / "solutions" / lab, course / "solutions" / lab,
                        ignore=shutil.ignore_patterns("*.py", ".ipynb_checkpoints"))
        run_nbgrader(course, "generate_assignment", lab, "--force", "--log-level=WARN")
        release = nbformat.read(course / "labs" / lab / f"{lab}.ipynb", as_version=4)
        solution = nbformat.read(ROOT / "solutions" / lab / f"{lab}.ipynb", as_version=4)
        students = [f"{kind}{i}" for kind in KINDS for i in range(n)]
        for student in students:
            target = course / "submitted" / student / lab
            target.mkdir(parents=True)
            nbformat.write(submissions(release, solution, student.rstrip("0123456789")), target / f"{lab}.ipynb")
        start, meter = time.perf_counter(), CpuMeter()
        autograde_parallel(course, lab, jobs, "--log-level=WARN", nbgrader=NBGRADER)
        wall, cpu = time.perf_counter() - start, meter.stop()
        marks = scores(course, lab, students)
        splits = [time_split(nbformat.read(course / "autograded" / s / lab / f"{lab}.ipynb", as_version=4))
                  for s in students]
    per = wall / len(students)
    in_cells = [sum(s.values()) for s in splits]  # per submission: seconds inside its cells
    parts = {k: sum(s[k] for s in splits) / len(splits) for k in splits[0]}
    # cells of `jobs` submissions run at once: per submission, the wall time outside cells is
    # what is left of jobs * per after the cells
    parts["kernel_and_grader_s"] = max(0.0, jobs * per - sum(parts.values()))
    cpu_per = cpu / len(students)
    row = {"submissions": len(students), "wall_s": wall, "seconds_per_submission": per,
           "class_of_100_min": 100 * per / 60, "cpu_s_per_submission": cpu_per,
           "class_of_100_min_idle": 100 * cpu_per / min(jobs, CORES) / 60,
           **{k: round(v, 3) for k, v in parts.items()},
           "cells_s": {"mean": sum(in_cells) / len(in_cells), "min": min(in_cells), "max": max(in_cells),
                       "n": len(in_cells), "values": in_cells},
           "solution_full_marks": all(marks[s][0] == marks[s][1] > 0 for s in students if s.startswith("solution")),
           "release_no_marks": all(marks[s][0] == 0 for s in students if s.startswith("release")),
           "scores": marks}
    log(f"{lab:28s} {len(students):3d} subs  {per:6.2f} s/sub  class of 100: {row['class_of_100_min']:5.1f} min "
        f"(idle machine: {row['class_of_100_min_idle']:5.1f} min, {cpu_per:.1f} CPU s/sub)  "
        + "  ".join(f"{k} {v:.2f}" for k, v in parts.items()))
    return row


def table(result: dict) -> str:
    lines = [f"{'lab':28s} {'s/sub':>7s} {'100 subs (min)':>15s} {'CPU s/sub':>10s} {'100 idle (min)':>15s} "
             f"{'kernel+grader':>14s} {'imports':>8s} {'answers':>8s} {'checks':>8s}"]
    for lab, r in result["labs"].items():
        lines.append(f"{lab:28s} {r['seconds_per_submission']:7.2f} {r['class_of_100_min']:15.1f} "
                     f"{r['cpu_s_per_submission']:10.2f} {r['class_of_100_min_idle']:15.1f} "
                     f"{r['kernel_and_grader_s']:14.2f} {r['imports_s']:8.2f} {r['answers_s']:8.2f} {r['checks_s']:8.2f}")
    return "\n".join(lines + target_lines(result["targets"]))


def explain_limit(result: dict) -> None:
    """A missed target gets ``limit``: where the slowest lab's time goes (issue 14 accepts a
    measured, explained limit where nbgrader cannot reach the target)."""
    target = result["targets"][0]
    if target["met"]:
        return
    worst = max(result["labs"], key=lambda lab: result["labs"][lab][target["key"]])
    row = result["labs"][worst]
    parts = {k: row[k] for k in ("kernel_and_grader_s", "imports_s", "answers_s", "checks_s")}
    dominant = max(parts, key=parts.get)
    target["limit"] = {
        "lab": worst, "seconds_per_part": parts, "dominant": dominant,
        "reading": {"answers_s": "the answer cells themselves (the lab's own computation: a faster "
                                 "grader cannot remove it, only a lighter lab)",
                    "checks_s": "the graded checks (lighter fast-mode checks would cut it)",
                    "imports_s": "the imports and set-up cells",
                    "kernel_and_grader_s": "kernel start and nbgrader's own work (more processes "
                                           "would cut it)"}[dominant]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=3, help="submissions of each kind per lab (default 3)")
    parser.add_argument("--jobs", type=int, default=2, help="grading processes (default 2, as make grade)")
    parser.add_argument("--labs", nargs="*", default=LABS, help="labs to grade (default all)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "grading.json")
    args = parser.parse_args(argv)
    if args.n < 1 or args.jobs < 1:
        raise SystemExit("--n and --jobs must be at least 1")
    unknown = sorted(set(args.labs) - set(LABS))
    if unknown:
        raise SystemExit(f"unknown labs {unknown}; the labs are {LABS}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # "fast" is this benchmark's own small version (fewer than 3 submissions of each kind); the
    # labs themselves always run as a class is graded (nbgrader_config.py: QLIB_FAST=1 by default).
    result = header("grading", seeds=[], fast=args.n < 3)
    result["settings"] = {"n_per_kind": args.n, "kinds": list(KINDS), "jobs": args.jobs,
                          "labs_qlib_fast": os.environ.get("QLIB_FAST", "1"),
                          "sandbox": sandbox_problem() is None, "target_min_per_100": TARGET_MIN}
    result["load_before"] = list(os.getloadavg())
    result["labs"] = {lab: grade_lab(lab, args.n, args.jobs, log=lambda s: print(s, flush=True)) for lab in args.labs}
    result["load_after"] = list(os.getloadavg())
    # The target is judged on CPU time (what an idle 2-core machine needs); the wall time of this
    # run is recorded beside the load averages, as a measurement, not as the target: on a shared
    # machine it says more about the other users than about grading.
    worst = max(result["labs"], key=lambda lab: result["labs"][lab]["class_of_100_min_idle"])
    value = result["labs"][worst]["class_of_100_min_idle"]
    result["targets"] = [{"name": f"100 submissions of the slowest lab ({worst}), minutes, from CPU time, on an "
                                  f"idle machine, at most {TARGET_MIN:g}",
                          "key": "class_of_100_min_idle", "value": value, "threshold": TARGET_MIN,
                          "met": value <= TARGET_MIN}]
    explain_limit(result)
    slowest_wall = max(result["labs"], key=lambda lab: result["labs"][lab]["class_of_100_min"])
    result["measured_wall"] = {"lab": slowest_wall,
                               "class_of_100_min": result["labs"][slowest_wall]["class_of_100_min"],
                               "load_before": result["load_before"], "load_after": result["load_after"]}
    print()
    print(table(result))
    print(f"\nwrote {write(result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
