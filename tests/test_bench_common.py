"""bench.common's measurements."""

import os

import pytest
import torch

import emoq
from bench import common

pytestmark = pytest.mark.compiled  # small same-shape parameters are stacked on the compiled path


def test_state_bytes_counts_stacked_states_whole():
    # Small same-shape parameters share one stacked state buffer (each state a view of it): the
    # buffer counts once and whole. It counted only the first member's view before, so the QLoRA
    # e2e table showed 0.3 MB of EmoSens states for millions of LoRA values.
    params = [torch.nn.Parameter(torch.randn(8, 64)) for _ in range(5)]
    n = sum(p.numel() for p in params)
    common.set_grads(params)
    opt = emoq.EmoSens(params)  # fp32 m and v
    opt.step(loss=1.0)
    assert all(v._base is not None for st in opt.state.values() for v in st.values())  # stacked views
    assert common.state_bytes(opt) == 2 * 4 * n
    adamw = torch.optim.AdamW(params, lr=1e-3)
    adamw.step()
    assert common.state_bytes(adamw) == 2 * 4 * n + 4 * len(params)  # exp_avg, exp_avg_sq, step


def test_pulse_report_without_the_plotted_optimizers_writes_its_table(tmp_path, capsys, monkeypatch):
    # A cache holding only research candidates (e.g. a QLoRA run of three candidate specs) crashed
    # the report in the plot (an unbound local), after the JSON but before the tables.
    import json

    # importing bench.pulse_study sets EMOQ_COMPILE=0 for its runs: undone after this test, so
    # the tests after it keep the compiled default path
    monkeypatch.setenv("EMOQ_COMPILE", os.environ.get("EMOQ_COMPILE", "1"))
    from bench.pulse_report import report
    from bench.pulse_study import cache_path

    path = cache_path("qlora", tmp_path)
    path.parent.mkdir(parents=True)
    runs = [{"task": "qlora", "spec": spec, "seed": 0, "test_loss": loss, "train_loss": loss, "diverged": False,
             "skipped_steps": 0, "seconds": 1.0, "curve": [3.0, loss], "etas": [1e-4, 2e-4]}
            for spec, loss in [("EmoCats fp32 cand:adaptive,target=0.01 scope=1", 2.9),
                               ("EmoTion fp32 cand:adaptive,target=0.01 scope=1", 2.92)]]
    path.write_text("".join(json.dumps(r) + "\n" for r in runs))
    summary = report("qlora", [0], tmp_path)
    out = capsys.readouterr().out
    assert "no plot" in out and "EmoCats fp32 cand:adaptive,target=0.01 scope=1" in out
    assert summary["best_adamw"] is None  # no AdamW run: the ratios to it are NaN, not an error
    assert json.loads((tmp_path / "pulse_qlora.json").read_text())["results"].keys() == {r["spec"] for r in runs}
    assert not (tmp_path / "pulse_qlora.png").exists()


@pytest.mark.parametrize("family, spec", [("EmoSens", "anchor,beta=1"), ("EmoCats", "anchor,beta=1"),
                                          ("EmoCats", "polyak,c=0.2,target=-0.01"),
                                          ("EmoSens", "twophase,hold=-0.01")])
def test_candidates_that_restate_the_library_pulse_step_like_it(family, spec, batch):
    # The study's tables read these candidates as "the library's pulse with one thing changed";
    # with nothing changed they must be the library's pulse to the last bit (parameters and eta).
    from bench import pulse_candidates
    from tests.conftest import make_net, train

    runs = []
    for candidate in (None, spec):
        net = make_net()
        opt = getattr(emoq, family)(net.parameters(), pulse="adaptive")
        if candidate is not None:
            pulse_candidates.install(opt, candidate)
        losses = train(net, opt, batch, 12)
        runs.append((losses, opt.pulse, [p.detach().clone() for p in net.parameters()]))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][2], runs[1][2]))


def test_anchor_candidate_moves_its_anchor_toward_x(batch):
    from bench import pulse_candidates
    from emoq.probe import STATE_NAME, STRIDE
    from tests.conftest import make_net, train

    net = make_net()
    opt = emoq.EmoSens(net.parameters(), pulse="adaptive")
    pulse_candidates.install(opt, "anchor,beta=0.25")
    train(net, opt, batch, 3)
    p = next(net.parameters())
    anchor, x = opt.state[p][STATE_NAME].clone(), p.detach().reshape(-1)[::STRIDE].clone()
    train(net, opt, batch, 1, start=3)  # measures at x, then steps
    torch.testing.assert_close(opt.state[p][STATE_NAME], 0.25 * anchor + 0.75 * x)


def test_twophase_candidate_holds_on_its_second_target_after_the_first_overshoot():
    from bench.pulse_candidates import twophase_variant

    pulse = twophase_variant(hold=0.0, beta=0.5)()  # Adam kind: grows on cos + 0.01 until crossed
    assert pulse._growth(0.1) == pytest.approx(0.11)
    assert pulse._growth(0.0) == pytest.approx(0.01)  # average 0.05: not crossed yet
    assert pulse._growth(-0.5) == pytest.approx(-0.5)  # average -0.225 < -0.01: crossed, target 0 now
    assert pulse._growth(0.1) == pytest.approx(0.1)  # stays crossed though the average is back up
    assert pulse._growth(-0.005) == pytest.approx(-0.005)


def test_step_breakdown_times_every_row_and_restores_the_step():
    # The probe skips phases of the stacked step by patching emoq: every row is timed and the real
    # step is back afterwards (a later step equals an untouched optimizer's).
    from bench import step_breakdown
    from emoq.optim import base

    real = (base.Unit.stack, base.sum_of_squares)
    shapes = lambda: [torch.nn.Parameter(torch.randn(8, 64)) for _ in range(6)]  # noqa: E731
    got = step_breakdown.breakdown("EmoSens", rounds=2, params_fn=shapes)
    assert set(got) == set(step_breakdown.PHASES) and all(t > 0 for t in got.values())
    assert (base.Unit.stack, base.sum_of_squares) == real


def test_interleaved_timing_steps_every_optimizer_round_robin(monkeypatch):
    from bench import speed

    order = []
    real_step = common.step
    monkeypatch.setattr(common, "step", lambda opt, i: order.append((type(opt).__name__, i)) or real_step(opt, i))
    makers = {"adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3), "cats": lambda ps: emoq.EmoCats(ps),
              "broken": lambda ps: 1 / 0}
    shapes = lambda: [torch.nn.Parameter(torch.randn(8, 64)) for _ in range(6)]  # noqa: E731
    got = speed.time_interleaved(makers, shapes, steps=3, warmup=1)
    assert list(got) == ["adamw", "cats", "broken"] and "ZeroDivisionError" in got["broken"]["error"]
    assert all(len(got[n]["times_s"]) == 3 and got[n]["median_s"] > 0 for n in ("adamw", "cats"))
    assert order[2:] == [("AdamW", 1), ("EmoCats", 1), ("AdamW", 2), ("EmoCats", 2), ("AdamW", 3), ("EmoCats", 3)]


def test_armijo_harness_library_mode_is_the_library_run():
    # bench/armijo.py's loop (its own copy of Task.run's) gives the library's pulse the same run:
    # the ratios its other modes act on are measured around the real step.
    from bench import armijo
    from bench.tasks import Digits

    task = Digits()
    task.steps = 40
    ours = armijo.run_task(task, 100, "library")
    theirs = task.run(lambda ps: emoq.EmoSens(ps, pulse="adaptive"), 100)
    assert ours["test_loss"] == theirs.test_loss
    veto = armijo.run_task(task, 100, "veto:c=0.65")
    assert len(veto["ratio_deciles"]) == 10 and all(-10 < r < 10 for r in veto["ratio_deciles"])


def test_armijo_ratio_is_one_for_a_linear_loss_and_a_low_ratio_vetoes_growth():
    from bench import armijo

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64))
    a = torch.randn(64)
    opt = emoq.EmoSens([w], pulse="adaptive", weight_decay=0.0)
    ctl = armijo.Armijo(opt, "veto:c=0.65")
    for _ in range(3):
        opt.zero_grad()
        loss = 10.0 + torch.dot(a, w)
        loss.backward()
        ctl.step(loss.item(), lambda: 10.0 + torch.dot(a, w), lambda loss=loss: opt.step(loss=loss))
    assert ctl.ratios == pytest.approx([1.0] * 3, abs=1e-4)  # the loss is linear along any step
    pulse = armijo.Veto(1.0, 1e-10, (1e-6, 1e-7), rule_kind="adam")
    aligned = (1.0, 1.0, 1.0, 1.0)  # cos = 1: the library's rule grows eta
    etas = []
    for ratio in (None, None, 0.1, 0.1, 0.9):
        pulse.ratio_avg = ratio
        etas.append(pulse.update(1.0, aligned))  # a flat loss: no back-off
    assert etas[1] > etas[0] and etas[2] == etas[3] == etas[1] and etas[4] > etas[3]


@pytest.mark.parametrize("mode", ["veto:c", "veto:c=abc", "bogus", "veto:up=1", "veto:c=nan"])
def test_armijo_modes_are_checked_before_any_run(mode, tmp_path):
    from bench import armijo

    out = tmp_path / "runs.jsonl"
    with pytest.raises(ValueError, match="mode"):
        armijo.main(["--task", "digits", "--seeds", "100", "--modes", "library", mode, "--out", str(out)])
    assert not out.exists()  # nothing ran, nothing written
