"""nbgrader helpers for instructors: a submission that kills its kernel is still graded.

nbgrader interrupts a cell that runs past ``c.Execute.timeout`` and records an error in a
cell that raises, so those submissions are graded as usual. A cell that kills the Python
process itself (``os._exit``, a segfault, running out of memory) makes nbclient raise
``DeadKernelError`` and nbgrader drops the whole submission. ``ResilientExecute`` records
the death in that cell, marks the cells after it as not run, and hands the notebook on:
tests that passed before the crash keep their points, the rest score zero, and the batch
goes on. ``nbgrader_config.py`` installs it in place of nbgrader's ``Execute``.
"""

from __future__ import annotations

from nbclient.exceptions import DeadKernelError
from nbformat import NotebookNode
from nbgrader.preprocessors import Execute


def error_output(ename: str, evalue: str) -> NotebookNode:
    return NotebookNode(output_type="error", ename=ename, evalue=evalue,
                        traceback=[f"{ename}: {evalue}"])


class ResilientExecute(Execute):
    """nbgrader's Execute, except that a dead kernel fails the remaining cells, not the grading."""

    def preprocess(self, nb, resources=None, km=None):
        self._kernel_dead = False
        try:
            return super().preprocess(nb, resources, km)
        except DeadKernelError:  # raised again while shutting the dead kernel down
            if not self._kernel_dead:
                raise
            return self.nb, self.resources

    def preprocess_cell(self, cell, resources, index):
        if cell.cell_type != "code":
            return cell, self.resources
        if self._kernel_dead:
            cell.outputs = [error_output("KernelDied", "not run: the kernel died in an earlier cell")]
            return cell, self.resources
        try:
            return super().preprocess_cell(cell, resources, index)
        except DeadKernelError:
            self._kernel_dead = True
            self.log.warning("The kernel died in cell %d; the cells after it are marked not run",
                             index)
            cell.outputs.append(error_output("KernelDied", "the kernel died while running this cell "
                                             "(os._exit, a segfault or out of memory?)"))
            return cell, self.resources
