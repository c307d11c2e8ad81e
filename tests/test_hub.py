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
    """Stands in for the Hub: ``upload_folder`` adds or replaces files in ``root/<repo_id>`` (never deletes
    others, as the real call); ``snapshot_download`` returns that folder; the first ``failures`` uploads raise."""

    def __init__(self, root: Path, failures: int = 0):
        self.root, self.failures = root, failures
        self.created: list[str] = []
        self.uploads: list[str] = []
        self.downloads: list[str] = []
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
            shutil.copytree(folder_path, hub.root / repo_id, ignore=shutil.ignore_patterns(*(ignore_patterns or [])),
                            dirs_exist_ok=True)
            hub.uploads.append(commit_message)
            return f"https://huggingface.co/{repo_id}/commit/0"

        def snapshot_download(repo_id, revision=None, repo_type=None, **kwargs):
            hub.downloads.append(repo_id)
            if not (hub.root / repo_id).is_dir():
                raise huggingface_hub.errors.RepositoryNotFoundError(f"404: {repo_id}")
            return str(hub.root / repo_id)

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


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
    data = huggingface_hub.ModelCard(card).data
    assert (data.library_name, data.pipeline_tag, data.license) == ("transformers", "reinforcement-learning",
                                                                    "apache-2.0")
    assert "CartPole-v1" in data.tags and "not measured yet" in card
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


def test_hub_round_trip_push_evaluate_from_the_hub_and_scores_land_in_the_card(pushing_run, tmp_path, monkeypatch):
    """train -> push -> ``eval.control --model user/name --update_card`` -> the card on the Hub has the scores."""
    from eval import control

    hub = FakeHub(tmp_path / "hub")
    hub.install(monkeypatch)
    pushing_run(tmp_path / "runs")
    repo_id = "someone/tiny-generalist"
    monkeypatch.chdir(tmp_path)  # results of a Hub checkpoint go to ./eval/<user>--<name>
    summary = control.main(["--model", repo_id, "--mode", "gato", "--tasks", "CartPole-v1", "--episodes", "2",
                            "--device", "cpu", "--update_card"])
    assert hub.downloads == [repo_id] and hub.uploads[-1] == "eval.control: rollout scores in the model card"
    assert (tmp_path / "eval" / "someone--tiny-generalist" / "control_gato.json").is_file()
    repo = hub.root / repo_id
    card = huggingface_hub.ModelCard.load(repo / "README.md")
    assert card.data.pipeline_tag == "reinforcement-learning" and "CartPole-v1" in card.data.tags
    (result,) = card.data.eval_results
    mean = summary["results"][0]["mean_return"]
    assert (result.dataset_name, result.metric_type, result.task_type) == ("CartPole-v1", "mean_reward",
                                                                            "reinforcement-learning")
    assert result.metric_value.startswith(f"{mean:.2f} +/- ")
    assert f"| CartPole-v1 | mean return, gato mode | {mean:.2f}" in card.text and "tiny_captions" in card.text
    assert integrity.verify(repo) is None  # the card is outside the manifest: updating it damages nothing
    GeneralistForCausalLM.from_pretrained(repo)
    # a second evaluation in another mode adds to the card; the same mode again replaces its row
    control.main(["--model", repo_id, "--mode", "gato", "--tasks", "CartPole-v1", "--episodes", "1", "--update_card"])
    assert len(huggingface_hub.ModelCard.load(repo / "README.md").data.eval_results) == 1


def test_a_hub_id_that_cannot_be_downloaded_is_named(tmp_path, monkeypatch):
    from eval.checkpoint import load_checkpoint

    FakeHub(tmp_path / "hub").install(monkeypatch)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="someone/missing: no such local folder, and the 🤗 Hub repo"):
        load_checkpoint("someone/missing")


def test_a_stalled_upload_is_abandoned_and_neither_holds_up_training_nor_the_next_push(pushing_run, tmp_path,
                                                                                        monkeypatch, caplog):
    """The first upload call blocks (a stalled connection): it is abandoned after --hub_timeout_s with a
    warning, training goes on meanwhile, and the later pushes (step 6, the final model) land."""
    import threading
    import time

    hub = FakeHub(tmp_path / "hub")
    hub.install(monkeypatch)
    landing, release = huggingface_hub.HfApi.upload_folder, threading.Event()
    calls = []

    def stalling_upload(self, **kwargs):
        calls.append(kwargs["commit_message"])
        if len(calls) == 1:
            release.wait(60)  # blocks like a dead connection (released at the end of the test)
        return landing(self, **kwargs)

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", stalling_upload)
    t0 = time.perf_counter()
    try:
        summary = pushing_run(tmp_path / "runs", hub_timeout_s=1.0)
    finally:
        release.set()
    assert time.perf_counter() - t0 < 45
    pushes = dict(summary["hub_pushes"])
    assert pushes["step 3"] is None and pushes["final model, step 6"] is True
    assert "final model, step 6" in hub.uploads and "did not finish within 1 s: abandoned" in caplog.text
    GeneralistForCausalLM.from_pretrained(tmp_path / "hub" / "someone/tiny-generalist")
