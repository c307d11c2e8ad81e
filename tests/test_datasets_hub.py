"""Datasets on the 🤗 Hub, intercepted at the huggingface_hub boundary: push, reload, train identically."""

from __future__ import annotations

import datasets
import huggingface_hub
import pytest

from datasets_build.__main__ import main as datasets_main
from tests.test_hub import FakeHub


@pytest.fixture
def hub(tmp_path, monkeypatch) -> FakeHub:
    fake = FakeHub(tmp_path / "hub")
    fake.install(monkeypatch)
    return fake


def test_a_pushed_dataset_has_its_task_specs_a_card_with_metadata_and_loads_with_datasets(hub, data_root):
    for name in ("tiny_box", "tiny_text", "tiny_captions"):
        datasets_main(["push", "--dataset", name, "--repo_id", f"someone/{name}", "--out", str(data_root)])
    box = hub.root / "someone/tiny_box"
    assert (box / "task_specs.json").read_text() == (data_root / "tiny_box" / "task_specs.json").read_text()
    card = huggingface_hub.DatasetCard.load(box / "README.md")
    assert card.data.task_categories == ["reinforcement-learning"] and card.data.license == "apache-2.0"
    assert card.data.size_categories == ["n<1K"] and "Box-v0" in card.data.tags
    assert card.data.generalist["reference_returns"]["Box-v0"].keys() == {"expert_return", "random_return"}
    episodes = datasets.load_dataset(str(box), split="train")  # the card's `configs` is what the Hub reads
    assert len(episodes) == 6 and {"observation", "action", "rewards", "task"} <= set(episodes.column_names)
    assert datasets.get_dataset_config_names(str(box)) == ["default", "Box-v0"]  # and one config per task
    assert set(datasets.load_dataset(str(box), "Box-v0", split="train")["task"]) == {"Box-v0"}
    text = datasets.load_dataset(str(hub.root / "someone/tiny_text"))
    assert set(text) == {"train", "validation"} and len(text["train"]) == 40
    captions = huggingface_hub.DatasetCard.load(hub.root / "someone/tiny_captions" / "README.md")
    assert captions.data.task_categories == ["image-to-text"]


def test_a_pushed_then_reloaded_mixture_trains_identically(hub, data_root, tiny_flags, train_in_process, tmp_path):
    names = ("tiny_text", "tiny_captions", "tiny_box", "tiny_disc")
    for name in names:
        datasets_main(["push", "--dataset", name, "--repo_id", f"someone/{name}", "--out", str(data_root)])
    local = train_in_process(*tiny_flags(tmp_path / "runs", run_name="local", total_steps=4, run_eval=False))
    from_hub = train_in_process(*tiny_flags(tmp_path / "runs", run_name="hub", total_steps=4, run_eval=False,
                                            mixture=",".join(f"someone/{n}=1" for n in names)))
    assert sorted(hub.downloads) == sorted(f"someone/{n}" for n in names)
    assert {"action", "text", "caption"} <= set(local["final"]["held-out"])
    assert from_hub["final"] == local["final"]  # the same sequences, the same losses, train and held-out
