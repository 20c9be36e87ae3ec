"""Metrics rows: a restarted stage's curve shows its latest run only."""
from minirlhf.metrics import Metrics, read_metrics, stage_history


def test_stage_history_keeps_the_latest_run(tmp_path):
    m = Metrics(tmp_path)
    m.log("ppo", 0, event="start")
    for step in (1, 2, 3):
        m.log("ppo", step, reward=step)           # first run, deleted and restarted fresh
    m.log("ppo", 0, event="start")
    for step in (1, 2, 3, 4):
        m.log("ppo", step, reward=10 + step)      # killed after step 4, last checkpoint at step 2
    m.log("ppo", 2, event="start")
    for step in (3, 4, 5):
        m.log("ppo", step, reward=20 + step)      # the resumed run
    m.log("rm", 1, loss=0.5)
    assert [(r["step"], r["reward"]) for r in stage_history(tmp_path, "ppo")] == [
        (1, 11), (2, 12), (3, 23), (4, 24), (5, 25)]
    assert len(read_metrics(tmp_path)) == 14 and len(read_metrics(tmp_path, "rm")) == 1
