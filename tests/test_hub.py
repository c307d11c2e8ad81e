"""Hub pushes, intercepted at the huggingface_hub boundary: what lands loads; a failing Hub never hurts a run."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub
import pytest

from generalist import GeneralistForCausalLM, GeneralistTokenizer, integrity
from generalist.hub import HubPusher, model_card, push_folder
from generalist.training.checkpoints import checkpoint_dirs
from generalist.training.run_folder import RunFolder


class FakeHub:
    """Stands in for the Hub: ``upload_folder`` copies into ``root/<repo_id>``; the first ``failures`` raise."""

    def __init__(self, root: Path, failures: int = 0):
        self.root, self.failures = root, failures
        self.created: list[str] = []
        self.uploads: list[str] = []
        self.attempts = 0

    def install(self, monkeypatch) -> None:
        hub = self

        def create_repo(self, repo_id, **kwargs):
            hub.created.append(repo_id)
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, *, folder_path, repo_id, commit_message=None, ignore_patterns=None, **kwargs):
            hub.attempts += 1
            if hub.attempts <= hub.failures:
                raise ConnectionError(f"simulated Hub outage (attempt {hub.attempts})")
            dest = hub.root / repo_id
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(folder_path, dest, ignore=shutil.ignore_patterns(*(ignore_patterns or [])))
            hub.uploads.append(commit_message)
            return f"https://huggingface.co/{repo_id}/commit/0"

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)


@pytest.fixture
def pushing_run(tiny_flags, train_in_process):
    """``pushing_run(out, **overrides)``: 6 steps in this process, pushing every checkpoint (3, 6) and the end."""

    def run(out: Path, **overrides) -> dict:
        return train_in_process(*tiny_flags(out, run_name="hubrun", total_steps=6, save_every=3, eval_every=3,
                                            log_every=2, run_eval=False, push_to_hub=True,
                                            hub_model_id="someone/tiny-generalist", hub_backoff_s=0.01, **overrides))

    return run


def test_pushed_repo_loads_with_from_pretrained(pushing_run, tmp_path, monkeypatch):
    hub = FakeHub(tmp_path / "hub")
    hub.install(monkeypatch)
    summary = pushing_run(tmp_path / "runs")
    assert hub.created and set(hub.created) == {"someone/tiny-generalist"}
    assert hub.uploads[-1] == "final model, step 6" and all(ok for _, ok in summary["hub_pushes"])
    repo = tmp_path / "hub" / "someone/tiny-generalist"
    model = GeneralistForCausalLM.from_pretrained(repo)
    tok = GeneralistTokenizer.from_pretrained(repo)
    assert model.config.layout == tok.layout and {"Box-v0", "Disc-v0"} <= set(tok.task_specs)
    card = (repo / "README.md").read_text()
    assert "tiny_captions" in card and "| held-out |" in card and "python train.py" in card
    assert "--push_to_hub" in card
    assert not (repo / "state").exists()  # optimizer state stays local
    assert integrity.verify(repo) is None  # and the manifest that ships lists only what ships


def test_failed_pushes_are_retried_and_never_cost_the_local_checkpoint(pushing_run, tmp_path, monkeypatch):
    hub = FakeHub(tmp_path / "hub", failures=2)  # the first push needs two retries
    hub.install(monkeypatch)
    summary = pushing_run(tmp_path / "runs")
    assert summary["steps"] == 6 and hub.attempts >= 3
    assert all(ok for _, ok in summary["hub_pushes"])
    assert GeneralistForCausalLM.from_pretrained(tmp_path / "hub" / "someone/tiny-generalist") is not None


def test_a_hub_that_is_down_for_good_leaves_the_run_and_its_checkpoints_intact(pushing_run, tmp_path, monkeypatch):
    hub = FakeHub(tmp_path / "hub", failures=10**9)
    hub.install(monkeypatch)
    summary = pushing_run(tmp_path / "runs", hub_retries=1)
    assert summary["steps"] == 6 and not any(ok for _, ok in summary["hub_pushes"])
    run = RunFolder(tmp_path / "runs" / "hubrun")
    assert [p.name for p in checkpoint_dirs(run.checkpoints)] == ["step_00000003", "step_00000006"]
    GeneralistForCausalLM.from_pretrained(run.model)
    assert not run.hub_staging.exists()


def test_push_folder_backs_off_exponentially_and_reports_failure(tmp_path, monkeypatch):
    hub = FakeHub(tmp_path / "hub", failures=10**9)
    hub.install(monkeypatch)
    waits: list[float] = []
    (tmp_path / "m").mkdir()
    assert not push_folder(tmp_path / "m", "a/b", retries=3, backoff_s=0.5, sleep=waits.append)
    assert waits == [0.5, 1.0, 2.0] and hub.attempts == 4


def test_model_card_has_mixture_metrics_and_reproduce_command():
    card = model_card(model_id="u/m", mixture={"text": 1.0, "control-core": 3.0},
                      metrics={"train": {"text": 2.5, "action": 1.25}}, reproduce="python train.py --lr 0.1",
                      summary={"steps": 10}, tasks=["CartPole-v1"])
    assert card.startswith("---\nlibrary_name: transformers")
    assert "| control-core | 75.0% |" in card and "| train | 1.25 | 2.5 |" in card
    assert "python train.py --lr 0.1" in card and "`CartPole-v1`" in card


def test_a_pushed_checkpoint_ships_a_manifest_of_what_it_ships(tmp_path, monkeypatch):
    """The training state stays local, so the pushed manifest drops it; the checkpoint's own keeps it."""
    hub = FakeHub(tmp_path / "hub")
    hub.install(monkeypatch)
    ckpt = tmp_path / "step_00000001"
    (ckpt / "state").mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"w" * 10)
    (ckpt / "state" / "optimizer.bin").write_bytes(b"o" * 10)
    integrity.write_manifest(ckpt)
    pusher = HubPusher("a/b", tmp_path / "staging", backoff_s=0.01)
    pusher.submit(ckpt, "step 1")
    assert pusher.close() == [("step 1", True)]
    assert integrity.verify(tmp_path / "hub" / "a/b") is None
    assert set(integrity.read_manifest(tmp_path / "hub" / "a/b")) == {"model.safetensors"}
    assert set(integrity.read_manifest(ckpt)) == {"model.safetensors", "state/optimizer.bin"}
    assert integrity.verify(ckpt) is None
