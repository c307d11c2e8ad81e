"""Datasets read as streams: a local parquet (Hub-layout) folder opened with ``streaming=True`` trains like
any dataset, its sequences depend only on ``(seed, rank, index)``, and a resumed run continues exactly."""

from __future__ import annotations

import copy
import csv
import pickle
import shutil

import pytest

from datasets_build.hub import hub_layout
from datasets_build.streaming import StreamedSource, streamed_sources
from generalist.packing import ControlSource, Mixture, PackingConfig, TextSource
from generalist.training.run_folder import RunFolder


@pytest.fixture(scope="module")
def parquet_root(data_root, tmp_path_factory):
    """The synthetic control and text datasets in the Hub layout (parquet under data/), beside each other."""
    root = tmp_path_factory.mktemp("parquet")
    for name in ("tiny_box", "tiny_text"):
        hub_layout(data_root / name, root / name)
    return root


def test_a_streamed_dataset_packs_from_a_sliding_window_deterministically(parquet_root, tok):
    train, held_out, specs = streamed_sources("tiny_box", parquet_root, seed=3, window=8, advance_every=2)
    assert set(specs) == {"Box-v0"} and isinstance(train, StreamedSource)
    tok = copy.copy(tok)
    tok.task_specs = dict(specs)
    cfg = PackingConfig(seq_len=64)
    first = Mixture([train], [1.0], tok, cfg)
    seqs = [first.sequence(seed=3, rank=0, index=i)[0]["input_ids"].tolist() for i in range(20)]
    assert train.rows_read == 8 + 19 // 2  # the window, then one new episode every advance_every sequences
    window = train.at(0, 19)
    assert isinstance(window, ControlSource) and len(window.episodes) == 8
    resumed = Mixture([streamed_sources("tiny_box", parquet_root, seed=3, window=8, advance_every=2)[0]], [1.0],
                      tok, cfg)
    assert [resumed.sequence(3, 0, i)[0]["input_ids"].tolist() for i in (13, 19)] == [seqs[13], seqs[19]]  # ahead
    assert first.sequence(3, 0, 4)[0]["input_ids"].tolist() == seqs[4]  # and back (the stream restarts)
    copied = Mixture([pickle.loads(pickle.dumps(train))], [1.0], tok, cfg)  # as a spawned DataLoader worker gets it
    assert copied.sequence(3, 0, 17)[0]["input_ids"].tolist() == seqs[17]
    other_seed = streamed_sources("tiny_box", parquet_root, seed=4, window=8, advance_every=2)[0]
    assert Mixture([other_seed], [1.0], tok, cfg).sequence(3, 0, 0)[0]["input_ids"].tolist() != seqs[0]  # by seed
    # held-out rows are every 10th of the split, the others train: no episode in both
    train_eps = {e["rewards"].tobytes() for e in StreamedSource.at(train, 0, 0).episodes}
    held_eps = {e["rewards"].tobytes() for e in held_out.at(0, 0).episodes}
    assert held_eps and not train_eps & held_eps
    text_train, _, text_specs = streamed_sources("tiny_text", parquet_root, seed=0, window=4)
    assert text_specs == {} and isinstance(text_train.at(0, 0), TextSource)


def losses(run: RunFolder) -> dict[int, float]:
    with run.train_csv.open() as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


def test_training_on_a_stream_resumes_with_the_same_losses(parquet_root, tiny_flags, train_in_process, tmp_path):
    """``--stream``: the parquet folders are streamed, and a run resumed from its step-3 checkpoint (its later
    one removed, as if it had been killed) continues with the uninterrupted run's losses."""
    flags = dict(mixture="tiny_box=1,tiny_text=1", data_root=parquet_root, total_steps=6, save_every=3,
                 eval_every=3, run_eval=False, stream_window=16)
    summary = train_in_process(*tiny_flags(tmp_path, run_name="whole", **flags), "--stream")
    assert summary["steps"] == 6
    whole = RunFolder(tmp_path / "whole")
    shutil.copytree(whole.root, tmp_path / "split")
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "step_00000006")
    train_in_process(*tiny_flags(tmp_path, run_name="split", **flags), "--stream", "--resume")
    again = losses(RunFolder(tmp_path / "split"))
    assert sorted(again) == list(range(1, 7))
    assert [again[s] for s in (4, 5, 6)] == pytest.approx([losses(whole)[s] for s in (4, 5, 6)], rel=1e-5)
