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
