"""The over-optimisation monitor: its series by hand, each warning firing on a synthetic sequence
built to trigger it (at the iteration worked out by hand) and silent on a healthy run, the live
monitor on the progress bar / stderr, and its place in every PPO run's metrics and report."""
import json
import math

import pytest
import torch

from minirlhf import monitor
from minirlhf.monitor import Monitor, Thresholds, check, repeated_token_share, scan, slope

TH = Thresholds(window=5, gold_drop=3.0, entropy_ratio=0.25, kl_accel=2.0, kl_growth=0.1)


def healthy(n=40):
    """KL rises and levels off near 1.5, entropy drifts down 20%, RM score and gold rise together
    (gold every 5 iterations, SE 0.1), with a small deterministic wobble."""
    rows = []
    for t in range(1, n + 1):
        wobble = 0.02 * math.sin(1.7 * t)
        row = {"step": t, "kl_to_ref": 1.5 * (1 - math.exp(-t / 8)) + wobble, "entropy": 1.0 - 0.2 * t / n + wobble,
               "rm_score": 1.0 - math.exp(-t / 10) + wobble, "response_len": 12.0}
        if t % 5 == 0:
            row.update(gold=2.0 + 1.0 * (1 - math.exp(-t / 10)) + wobble, gold_se=0.1)
        rows.append(row)
    return rows


def test_repeated_token_share_by_hand():
    # EOS = 2, padding 0. Sequence 0: 5 6 5 7 EOS -> the second 5 repeats: 1 of 4 tokens.
    # Sequence 1: 8 8 8 EOS -> 2 of 3. Sequence 2: only EOS -> nothing counted. Share 3 / 7.
    tokens = torch.tensor([[5, 6, 5, 7, 2], [8, 8, 8, 2, 0], [2, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]]).bool()
    assert repeated_token_share(tokens, mask, eos_id=2) == pytest.approx(3 / 7)
    # padding that equals an earlier token is not counted; no token at all -> 0
    assert repeated_token_share(torch.tensor([[4, 4]]), torch.tensor([[True, False]]), eos_id=2) == 0.0
    assert repeated_token_share(torch.tensor([[2]]), torch.tensor([[True]]), eos_id=2) == 0.0


def test_slope_by_hand():
    # y = 0.6 0.65 0.7 0.75 1.25 at x = 12..16: Σ(x − 14)·y = −1.2 − 0.65 + 0.75 + 2.5 = 1.4, Σ(x − 14)² = 10
    assert slope([12, 13, 14, 15, 16], [0.6, 0.65, 0.7, 0.75, 1.25]) == pytest.approx(0.14)


def test_healthy_run_raises_no_warning():
    rows = healthy()
    assert scan(rows, TH) == []
    m = Monitor(TH)
    for r in rows:
        assert "warning" not in m.observe(r["step"], {k: v for k, v in r.items() if k != "step"})


def test_reward_hacking_fires_when_gold_falls_while_rm_rises():
    # gold at 5..30: 1.0 2.0 2.5 2.4 2.0 1.5, SE 0.1 each: the best is 2.5 (iteration 15); a fall
    # of 3 SE is 3·√(0.1² + 0.1²) = 0.424: 20 falls 0.1 (no), 25 falls 0.5 = 3.54 SE (yes)
    rows = healthy(30)
    for r, g in zip([r for r in rows if "gold" in r], (1.0, 2.0, 2.5, 2.4, 2.0, 1.5)):
        r["gold"] = g
    for r in rows:
        r["rm_score"] = 0.05 * r["step"]  # keeps rising
    alarms = scan(rows, TH)
    assert [(a.kind, a.iteration) for a in alarms] == [("reward_hacking", 25)]
    assert "gold 2.50 at iteration 15 -> 2.00 at 25 (3.5 SE lower)" in alarms[0].message
    # the RM score over the window ending at 15 (steps 11..15) was 0.65, at 25 it is 1.15
    assert "rose 0.65 -> 1.15" in alarms[0].message
    # the same fall of gold with the RM score falling too is not reward hacking
    for r in rows:
        r["rm_score"] = 2.0 - 0.05 * r["step"]
    assert scan(rows, TH) == []
    # the same fall within the noise (SE 0.3: 3 SE = 1.27, more than the fall of 1.0 at 30) does not fire
    for r in rows:
        r["rm_score"] = 0.05 * r["step"]
        if "gold" in r:
            r["gold_se"] = 0.3
    assert scan(rows, TH) == []


def test_entropy_collapse_fires_at_the_window_worked_out_by_hand():
    # entropy 1.0 for iterations 1..10, 0.1 from 11: the mean of the last 5 is below 0.25·1.0
    # only when all 5 are 0.1 (four give (0.4 + 1)/5 = 0.28), i.e. at iteration 15
    rows = healthy(25)
    for r in rows:
        r["entropy"] = 1.0 if r["step"] <= 10 else 0.1
    alarms = scan(rows, TH)
    assert [(a.kind, a.iteration) for a in alarms] == [("entropy_collapse", 15)]
    assert "0.100 nats/token" in alarms[0].message and "10% of the first iteration's 1.000" in alarms[0].message


def test_kl_acceleration_fires_when_growth_speeds_up():
    # KL grows 0.05/iteration up to 15, then 0.5/iteration. At 16 the last window (12..16) has
    # slope 0.14 (test_slope_by_hand), the one before (7..11) 0.05: 0.14 > 0.1 and > 2·0.05
    rows = healthy(25)
    for r in rows:
        t = r["step"]
        r["kl_to_ref"] = 0.05 * t if t <= 15 else 0.75 + 0.5 * (t - 15)
    alarms = scan(rows, TH)
    assert [(a.kind, a.iteration) for a in alarms] == [("kl_acceleration", 16)]
    assert "+0.140 nats/iteration" in alarms[0].message and "+0.050 over the 5 before" in alarms[0].message


def test_kl_leaving_zero_in_the_first_window_is_not_acceleration():
    # the policy starts at the reference: KL flat at 0 for 5 iterations, then 0.2/iteration, then
    # level. The first window is never the baseline, so this never compares 6..10 against 1..5.
    rows = healthy(30)
    for r in rows:
        t = r["step"]
        r["kl_to_ref"] = 0.0 if t <= 5 else min(0.2 * (t - 5), 1.0)
    assert scan(rows, TH) == []
    assert check(rows[:10], TH) == []
    # with the first window as a baseline the rule would fire at 10: slope 0.2 over 6..10 against 0 over 1..5
    kl = [(r["step"], r["kl_to_ref"]) for r in rows]
    assert slope(*zip(*kl[:5])) == 0.0 and slope(*zip(*kl[5:10])) == pytest.approx(0.2)


def test_live_monitor_warns_once_on_stderr_and_on_every_active_iteration(capsys):
    rows = healthy(25)
    for r in rows:
        r["entropy"] = 1.0 if r["step"] <= 10 else 0.1
    m = Monitor(TH)
    shown = {}
    for r in rows:
        extras = m.observe(r["step"], {k: v for k, v in r.items() if k != "step"})
        shown[r["step"]] = extras.get("warning")
        last = [(x["step"], x["kl_to_ref"]) for x in rows[max(0, r["step"] - 5):r["step"]]]
        assert extras.get("kl_growth") == (pytest.approx(slope(*zip(*last))) if len(last) > 1 else None)
    assert all(shown[t] is None for t in range(1, 15))
    assert all(shown[t] == monitor.LABELS["entropy_collapse"] for t in range(15, 26))
    err = capsys.readouterr().err
    assert err.count("warning at iteration 15: entropy collapsed") == 1
    # a resumed run starts from the logged history: the warning already fired is not printed again
    m2 = Monitor(TH, history=rows[:20])
    m2.observe(21, {k: v for k, v in rows[20].items() if k != "step"})
    assert "warning" not in capsys.readouterr().err


def test_every_ppo_run_logs_the_monitor_and_reports_it(tiny_run):
    from minirlhf.config import PRESETS

    run_dir, summary = tiny_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"ppo"' in line and '"event"' not in line]
    assert all(0.0 <= r["repeat_frac"] <= 1.0 for r in rows)
    assert all("kl_growth" in r for r in rows[1:]) and "kl_growth" not in rows[0]
    assert all(("gold_se" in r) == ("gold" in r) for r in rows)
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["monitor_warnings"] == [{"kind": a.kind, "iteration": a.iteration, "message": a.message}
                                           for a in scan(rows, Thresholds.of(PRESETS["tiny"]().ppo))]
    assert "### Over-optimisation monitor" in (run_dir / "report.md").read_text()
    assert (run_dir / "monitor.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
