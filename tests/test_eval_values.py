"""eval.values: the planner's value readout, teacher-forced on held-out episodes, against the truth; eval.returns:
whether a Decision Transformer reads its target."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from gymnasium import spaces

from datasets_build.common import TASK_SPECS
from datasets_build.episodes import SHARDS_DIR, episode_features
from eval import missions, returns, values
from generalist import GeneralistConfig, GeneralistForCausalLM, TaskSpec
from tests.conftest import TINY_LLAMA, train_briefly, with_task_spec

SPEC = TaskSpec.from_spaces("Countdown-v0", spaces.Box(0.0, 1.0, (1,), np.float32), spaces.Discrete(2),
                            return_scale=0.1, discount=0.9)


def countdown(n: int, seed: int = 0) -> list[dict]:
    """Episodes of 2-12 steps whose observation is the fraction of the episode left: reward 1 a step, then the
    episode terminates, so the discounted value of every step is a function of its observation."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        t = int(rng.integers(2, 13))
        left = (np.arange(t, 0, -1) / 12.0).astype(np.float32)[:, None]
        out.append({"task": SPEC.name, "source": "expert" if rng.random() < 0.5 else "random",
                    "observations": {"observation": left}, "actions": {"action": rng.integers(0, 2, t)},
                    "rewards": np.ones(t, np.float32), "terminated": True, "truncated": False})
    return out


def write(eps: list[dict], folder, spec: TaskSpec = SPEC) -> None:
    rows = {"task": [e["task"] for e in eps], "source": [e["source"] for e in eps], "seed": list(range(len(eps))),
            "rewards": [e["rewards"] for e in eps], "terminated": [True] * len(eps), "truncated": [False] * len(eps),
            "episode_return": [float(e["rewards"].sum()) for e in eps],
            **{k: [e["observations"][k] for e in eps] for k in eps[0]["observations"]},
            **{k: [e["actions"][k] for e in eps] for k in eps[0]["actions"]}}
    datasets.Dataset.from_dict(rows, features=episode_features(spec)).save_to_disk(str(folder / SHARDS_DIR / "00000"))
    (folder / TASK_SPECS).write_text(json.dumps({spec.name: spec.to_dict()}))


@pytest.fixture(scope="module")
def checkpoints(tok, tmp_path_factory):
    """A tiny model trained (seconds) on unconditioned countdown episodes, and the same model untrained."""
    folder = tmp_path_factory.mktemp("values")
    write(countdown(40), folder / "countdown")
    local = with_task_spec(tok, SPEC)
    torch.manual_seed(0)
    model = GeneralistForCausalLM(GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=dict(TINY_LLAMA)))
    model.save_pretrained(folder / "untrained")
    local.save_pretrained(folder / "untrained")
    train, rng = countdown(200, seed=1), np.random.default_rng(0)
    train_briefly(model, lambda: local.collate([local.encode_episode(SPEC, e["observations"], e["actions"],
                                                                     e["rewards"], condition_on_return=False,
                                                                     terminated=True)
                                                for e in rng.choice(train, 16)]), 120)
    model.save_pretrained(folder / "trained")
    local.save_pretrained(folder / "trained")
    return folder



def test_values_of_a_trained_model_follow_the_truth_and_an_untrained_ones_do_not(checkpoints):
    out = checkpoints / "results"
    record = values.main(["--model", str(checkpoints / "trained"), str(checkpoints / "untrained"),
                          "--dataset", "countdown", "--data_root", str(checkpoints), "--context_steps", "2",
                          "--within", "3", "--out", str(out), "--name", "countdown"])
    trained, untrained = (record["models"][str(checkpoints / name)]["Countdown-v0"]
                          for name in ("trained", "untrained"))
    assert trained["episodes"] == 4 and trained["terminated_episodes"] == 4  # every 10th of 40 is held out
    assert trained["value"]["pearson"] > 0.9 and trained["value"]["nmae"] < 0.5
    assert trained["eos_auroc"] > 0.9 and trained["fall_auroc"] > 0.9
    assert untrained["value"]["nmae"] > 1.0 and (untrained["value"]["pearson"] or 0.0) < 0.9
    saved = json.loads((out / "values_countdown.json").read_text())
    assert saved["models"][str(checkpoints / "trained")]["Countdown-v0"]["steps"] == trained["steps"]
    assert (out / "values_countdown.png").stat().st_size > 0


COIN = TaskSpec.from_spaces("Coin-v0", spaces.Box(-1.0, 1.0, (2,), np.float32), spaces.Discrete(2), return_scale=1.0)


def coin(n: int, seed: int, action_pays: bool) -> list[dict]:
    """One-step episodes with a random action; the reward is the action (``action_pays``: the return says which
    action was taken) or an independent coin (the return says nothing about it)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = int(rng.integers(0, 2))
        r = float(a if action_pays else rng.integers(0, 2))
        out.append({"task": COIN.name, "source": "mixed", "observations": {"observation": rng.uniform(-1, 1, (1, 2))
                                                                             .astype(np.float32)},
                    "actions": {"action": np.array([a])}, "rewards": np.array([r], np.float32)})
    return out


def trained_model(tok, folder, batch) -> None:
    """A tiny model trained 150 steps on ``batch()``, saved with ``tok`` to ``folder``."""
    torch.manual_seed(0)
    model = GeneralistForCausalLM(GeneralistConfig(vocab_layout=tok.layout.to_dict(), text_config=dict(TINY_LLAMA)))
    train_briefly(model, batch, 150)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def test_the_return_probe_sees_a_dt_that_reads_its_target_and_one_that_cannot(tok, tmp_path):
    local = with_task_spec(tok, COIN)
    gains = {}
    for action_pays in (True, False):
        folder = tmp_path / f"pays_{action_pays}"
        write(coin(100, 0, action_pays), folder / "coin", COIN)
        train, rng = coin(400, 1, action_pays), np.random.default_rng(0)
        trained_model(local, folder / "model", lambda train=train, rng=rng: local.collate(
            [local.encode_episode(**e) for e in rng.choice(train, 16)]))
        record = returns.main(["--model", str(folder / "model"), "--dataset", "coin", "--data_root", str(folder),
                               "--out", str(folder), "--name", "coin"])
        gains[action_pays] = record["models"][str(folder / "model")]["Coin-v0"]["all"]["gain_nats"]
        assert json.loads((folder / "returns_coin.json").read_text())["models"]
    assert gains[True] > 0.3  # log 2 = 0.69 nats if the return decided the action completely
    assert abs(gains[False]) < 0.1


SAY = TaskSpec.from_spaces("Say-v0", spaces.Dict({"mission": spaces.Text(16),
                                                  "x": spaces.Box(0.0, 1.0, (1,), np.float32)}), spaces.Discrete(2))


def say(n: int, seed: int, obeys: bool) -> list[dict]:
    """3-step episodes told "go left" or "go right": the actor goes where it is told (``obeys``) or anywhere."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        right = bool(rng.random() < 0.5)
        actions = np.full(3, int(right)) if obeys else rng.integers(0, 2, 3)
        out.append({"task": SAY.name, "source": "expert", "rewards": np.ones(3, np.float32), "terminated": True,
                    "observations": {"observation.mission": np.array(["go right" if right else "go left"] * 3),
                                     "observation.x": rng.random((3, 1)).astype(np.float32)},
                    "actions": {"action": actions}})
    return out


def test_the_mission_probe_sees_a_policy_that_reads_its_mission_and_one_that_cannot(tok, tmp_path):
    local = with_task_spec(tok, SAY)
    gains = {}
    for obeys in (True, False):
        folder = tmp_path / f"obeys_{obeys}"
        write(say(60, 0, obeys), folder / "say", SAY)
        train, rng = say(400, 1, obeys), np.random.default_rng(0)
        trained_model(local, folder / "model", lambda train=train, rng=rng: local.collate(
            [local.encode_episode(SAY, e["observations"], e["actions"], e["rewards"], condition_on_return=False)
             for e in rng.choice(train, 16)]))
        record = missions.main(["--model", str(folder / "model"), "--dataset", "say", "--data_root", str(folder),
                                "--out", str(folder)])
        gains[obeys] = record["models"][str(folder / "model")]["Say-v0"]
        assert json.loads((folder / "missions_say.json").read_text())["models"]
    assert gains[True]["gain_nats_first_step"] > 0.3  # log 2 = 0.69 nats if the mission decides the action
    assert abs(gains[False]["gain_nats"]) < 0.1
