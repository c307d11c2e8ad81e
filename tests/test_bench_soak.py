"""bench/agent_soak.py plays a long batched run through the Agent and reports memory and time drift."""

from __future__ import annotations

from bench import agent_soak


def test_soak_slides_the_window_restarts_episodes_and_reports_drift(tmp_path, capsys):
    plot = tmp_path / "soak.png"
    # 2 envs x 230 decisions: Pendulum episodes (200 steps) end and restart, and a 64-token context
    # slides every few steps
    agent_soak.main(agent_soak.Args(decisions=230, num_envs=2, every=46, context_length=64, threads=1, plot=plot))
    out = capsys.readouterr().out
    assert "2 episodes ended" in out and "window slid" in out and "drift" in out
    assert out.count("RSS") >= 5 and plot.stat().st_size > 0


def test_training_soak_reads_memory_and_step_time_from_the_run(tiny_flags, train_in_process, tmp_path, capsys):
    """Every run logs the trainer's and workers' RSS; bench/train_soak.py turns a run's CSV into the drift figures."""
    from bench import train_soak

    train_in_process(*tiny_flags(tmp_path, run_name="r", total_steps=12, num_workers=1, run_eval=False))
    plot = tmp_path / "train_soak.png"
    code = train_soak.main(train_soak.Args(run=tmp_path / "r", plot=plot))
    out = capsys.readouterr().out
    assert "12 steps, 12 records" in out and "drift" in out and plot.stat().st_size > 0
    steps, rss, ms = train_soak.curves(train_soak.RunFolder(tmp_path / "r"))
    assert list(steps) == list(range(1, 13)) and (rss > 50).all() and (ms > 0).all() and code in (0, 1)
