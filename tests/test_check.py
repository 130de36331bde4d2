"""qlib.check and qlib.check.core: self-checks pass right answers, explain wrong ones without
crashing, and leave the student's notebook as they found it.

Reference: the lab00 questions' written answers; ``torch.get_rng_state`` for the isolation.
"""

from __future__ import annotations

import pytest
import torch

from qlib import check


def test_right_answers_pass(capsys):
    check.lab00.size_in_bytes(lambda n, b: (n * b + 7) // 8)
    check.lab00.size_in_bytes_hidden(lambda n, b: (n * b + 7) // 8)
    check.lab00.cast_error(lambda w: (w.half().float() - w).abs().max().item())
    check.lab00.cast_error_hidden(lambda w: (w.half().float() - w).abs().max().item())
    check.lab00.fits_fp16(lambda x: torch.isfinite(x.half()))
    check.lab00.fits_fp16_hidden(lambda x: torch.isfinite(x.half()))
    assert capsys.readouterr().out.count("PASS") == 6


def test_wrong_answer_says_what_was_expected():
    with pytest.raises(AssertionError, match=r"size_in_bytes\(3, 4\): expected 2, got 1"):
        check.lab00.size_in_bytes(lambda n, b: n * b // 8)
    with pytest.raises(AssertionError, match="65504"):
        check.lab00.fits_fp16(lambda x: x.abs() < 65504)


def test_student_exception_is_reported_not_crashed():
    def broken(n, b):
        return n / 0
    with pytest.raises(check.CheckFailed, match="raised ZeroDivisionError"):
        check.lab00.size_in_bytes(broken)


def test_unimplemented_says_so():
    with pytest.raises(check.CheckFailed, match="not implemented yet"):
        check.lab00.cast_error(check.not_implemented)


def test_expect_close_and_equal_messages():
    with pytest.raises(check.CheckFailed, match="expected shape"):
        check.expect_close(torch.zeros(2), torch.zeros(3), "x")
    with pytest.raises(check.CheckFailed, match="expected a torch.Tensor"):
        check.expect_equal([1, 2], torch.tensor([1, 2]), "x")
    check.expect_close(1.0 + 1e-9, 1.0, "x")


def rng_untouched(fn) -> bool:
    """Whether ``fn()`` leaves torch's global generator where it was."""
    torch.manual_seed(123)
    before = torch.get_rng_state()
    fn()
    return torch.equal(before, torch.get_rng_state())


def test_checks_leave_the_students_random_state_alone(capsys):
    """Regression: lab06's distill_step check called torch.manual_seed, and lab00's hidden checks
    drew from the global generator, so a test cell shifted every later random draw of the notebook."""
    from qlib.check import lab06
    from qlib.distill import kd_loss

    def distill_step(student, teacher, x, optimizer, T):
        with torch.no_grad():
            t = teacher(x)
        loss = kd_loss(student(x), t, T)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    assert rng_untouched(lambda: check.lab00.cast_error_hidden(lambda w: (w.half().float() - w).abs().max().item()))
    assert rng_untouched(lambda: check.lab00.fits_fp16_hidden(lambda x: torch.isfinite(x.half())))
    assert rng_untouched(lambda: lab06.distill_step(distill_step))
    assert capsys.readouterr().out.count("PASS") == 3


def test_visible_checks_are_reproducible():
    seen = []

    def recording(w):
        seen.append(torch.randn(3))  # the student's own unseeded draw
        return (w.half().float() - w).abs().max().item()
    check.lab00.cast_error(recording)
    check.lab00.cast_error(recording)
    assert torch.equal(seen[0], seen[1])


def test_as_number_accepts_one_number_only():
    assert check.as_number(torch.tensor([2.5]), "x") == 2.5
    assert check.as_number(3, "x") == 3.0
    with pytest.raises(check.CheckFailed, match=r"x: expected one number .* shape \(2,\)"):
        check.as_number(torch.zeros(2), "x")
    with pytest.raises(check.CheckFailed, match="expected a number, got str"):
        check.as_number("1", "x")
    with pytest.raises(check.CheckFailed, match="expected a number, got True"):
        check.as_number(True, "x")
    with pytest.raises(check.CheckFailed, match="expected a finite number, got nan"):
        check.as_number(float("nan"), "x")
    assert check.as_number(float("inf"), "x", finite=False) == float("inf")


def test_form_checks_say_what_was_expected():
    with pytest.raises(check.CheckFailed, match=r"f: expected a pair \(scale, zero_point\), got int 3"):
        check.expect_pair(3, "f", "(scale, zero_point)")
    with pytest.raises(check.CheckFailed, match="f: expected a tensor of codes, got list"):
        check.expect_tensor([1], "f", kind="a tensor of codes")
    with pytest.raises(check.CheckFailed, match=r"f: expected a float32 tensor, got torch.float64"):
        check.expect_tensor(torch.zeros(2, dtype=torch.float64), "f", dtype=torch.float32)
    with pytest.raises(check.CheckFailed, match=r"f: expected shape \(3,\), got \(2,\)"):
        check.expect_tensor(torch.zeros(2), "f", shape=(3,))


def test_first_difference_and_first_hint():
    got, want = torch.tensor([1, 2, 3, 4]), torch.tensor([1, 0, 3, 0])
    assert check.first_difference(got, want) == (2, 1)
    assert check.first_difference(want, want) == (0, 0)
    hints = [("not this", torch.tensor([0, 0, 0, 0])), ("this one", torch.tensor([1.0, 2.0, 3.0, 4.0]))]
    assert check.first_hint(got, hints) == "this one"
    assert check.first_hint(want, hints) == ""
    assert check.first_hint(torch.tensor([1, 2]), hints) == ""  # another shape never matches


def test_model_inspection_helpers():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    before = check.snapshot(model)
    assert check.changed_entries(model, before) == []
    model.train()(torch.randn(4, 2))  # training mode: BatchNorm updates its statistics
    assert "1.running_mean" in check.changed_entries(model, before)
    handle = model[0].register_forward_hook(lambda *a: None)
    assert check.hooks_left(model)
    handle.remove()
    assert not check.hooks_left(model)
    x = torch.randn(3, 2)
    seen_in = check.layer_activations(model.eval(), "1", [x, x])
    seen_out = check.layer_activations(model, "0", [x], output=True)
    assert seen_in.shape == (6, 2) and torch.allclose(seen_out, model[0](x).detach())
    assert not check.hooks_left(model)


def test_unknown_lab_is_a_clear_attribute_error():
    with pytest.raises(AttributeError, match=r"no checks for lab99 \(expected qlib/check/lab99.py\)"):
        check.lab99  # noqa: B018


def test_a_failing_check_shows_its_message_not_a_traceback():
    """Reference: IPython's set_custom_exc; the cell must still end in an error (nbgrader: no points)."""
    from IPython.core.interactiveshell import InteractiveShell

    from qlib import check

    shell = InteractiveShell.instance()
    shown = []
    shell._showtraceback = lambda etype, value, stb: shown.append(stb)
    assert check.friendly_failures(shell)
    result = shell.run_cell("from qlib.check import CheckFailed\nraise CheckFailed('expected 3, got 4')")
    assert isinstance(result.error_in_exec, check.CheckFailed)  # still an error
    assert shown == [["FAIL  expected 3, got 4", check.RUN_ALL_NOTE]]
    # a real check's message carries its own "FAIL  <name>:" prefix: shown once, not twice
    # (seen as "FAIL  FAIL  size_in_bytes: ..." in nbgrader's Validate dialog)
    shown.clear()
    shell.run_cell("from qlib import check\ncheck.lab00.size_in_bytes(lambda n, b: 0)")
    assert len(shown) == 1 and shown[0][0].startswith("FAIL  size_in_bytes") and "FAIL  FAIL" not in shown[0][0]
    InteractiveShell.clear_instance()
