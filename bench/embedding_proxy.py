"""How continuous inputs are embedded, measured on a stand-in small enough to run in minutes.

The question (``GeneralistConfig.bin_embeddings``): does giving every mu-law bin of an *input* value
its own learned row (Gato's lookup) help or hurt a policy that must act on small differences of
value, next to embedding the value only by where its bin lies (the value features)? The stand-in: an
MLP clones the scripted Pendulum expert (``datasets_build.experts.classic.PendulumSwingUp``) from
its observations, tokenised as the model tokenises them (1,024 mu-law bins), and predicts the
action's bin with a cross-entropy, as the transformer does; greedy actions are the predicted median.
Half the training episodes are played with noisy actions and labelled with the expert's (DART, as
the control datasets). Each variant is trained with 2 seeds and played 10 episodes::

    python bench/embedding_proxy.py                  # about 5 minutes on one core

Variants: ``bins+features`` (ours: per-bin rows initialised as the model's, std 0.02, plus the
value features), ``features`` (value features only, ``bin_embeddings=False``) and ``bins`` (per-bin
rows only, Gato). It is a proxy, not the transformer: ``README.md`` says which results it was used for.
"""

from __future__ import annotations

import argparse

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F

from datasets_build.experts.classic import PendulumSwingUp
from generalist.tokenizer import mu_law_decode, mu_law_encode

BINS = 1024
CENTRES = mu_law_decode((np.arange(BINS) + 0.5) / (BINS / 2) - 1)  # (BINS,) value of each bin


def to_bins(x: np.ndarray) -> np.ndarray:
    return np.clip(((np.clip(mu_law_encode(x), -1, 1) + 1) / 2 * BINS).astype(int), 0, BINS - 1)


def expert_data(episodes: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) observations and (N,) expert actions; odd episodes act with Gaussian noise (DART labels)."""
    rng, env, expert = np.random.default_rng(seed), gym.make("Pendulum-v1"), PendulumSwingUp()
    obs_list, act_list = [], []
    for i in range(episodes):
        obs, _ = env.reset(seed=1000 + i)
        for _ in range(200):
            action = float(expert.act(obs[None], [env])[0][0])
            obs_list.append(obs)
            act_list.append(action)
            executed = np.clip(action + (2 * noise * rng.standard_normal() if i % 2 else 0.0), -2, 2)
            obs, *_ = env.step(np.array([executed], np.float32))
    env.close()
    return np.asarray(obs_list, np.float32), np.asarray(act_list, np.float32)


class Policy(torch.nn.Module):
    """Three binned inputs -> embedding (per-bin rows and/or value features) -> MLP -> action-bin logits."""

    def __init__(self, variant: str, width: int = 64, features: int = 6):
        super().__init__()
        self.variant, self.features = variant, features
        self.rows = torch.nn.Embedding(3 * BINS, width)
        torch.nn.init.normal_(self.rows.weight, std=0.02 if variant == "bins+features" else 1.0)
        self.proj = torch.nn.Linear(1 + 2 * features, width, bias=variant == "features")
        torch.nn.init.normal_(self.proj.weight, std=0.02)
        self.mlp = torch.nn.Sequential(torch.nn.LayerNorm(3 * width), torch.nn.Linear(3 * width, 128),
                                       torch.nn.GELU(), torch.nn.Linear(128, 128), torch.nn.GELU(),
                                       torch.nn.Linear(128, BINS))

    def forward(self, bins: torch.Tensor) -> torch.Tensor:  # (B, 3) bin ids -> (B, BINS)
        z = 0.0
        if self.variant != "features":
            z = self.rows(bins + torch.arange(3) * BINS)  # (B, 3, W)
        if self.variant != "bins":
            c = (bins + 0.5) / (BINS / 2) - 1.0  # (B, 3) place on the mu-law axis
            angles = c[..., None] * torch.pi * 2.0 ** torch.arange(self.features)
            z = z + self.proj(torch.cat([c[..., None], angles.sin(), angles.cos()], -1))
        return self.mlp(z.flatten(1))


def train(variant: str, obs: np.ndarray, actions: np.ndarray, steps: int, seed: int) -> Policy:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    policy = Policy(variant)
    optimizer = torch.optim.Adam(policy.parameters(), 2e-3)
    x, y = torch.from_numpy(to_bins(obs)), torch.from_numpy(to_bins(actions))
    for _ in range(steps):
        idx = torch.from_numpy(rng.integers(0, len(x), 256))
        loss = F.cross_entropy(policy(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return policy.eval()


@torch.no_grad()
def play(policy: Policy, episodes: int) -> float:
    env, returns = gym.make("Pendulum-v1"), []
    for i in range(episodes):
        obs, _ = env.reset(seed=i)
        total = 0.0
        for _ in range(200):
            p = policy(torch.from_numpy(to_bins(obs[None]))).softmax(-1)[0].numpy()
            action = np.clip(CENTRES[np.searchsorted(np.cumsum(p), 0.5)], -2, 2)  # the predicted median
            obs, reward, *_ = env.step(np.array([action], np.float32))
            total += reward
        returns.append(total)
    env.close()
    return float(np.mean(returns))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--variants", nargs="+", default=["bins+features", "features", "bins"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    obs, actions = expert_data(60, noise=0.3, seed=0)
    print(f"expert data: {len(obs)} steps; expert return over the same reset seeds: "
          f"{play_expert(args.episodes):.0f}")
    for variant in args.variants:
        scores = [play(train(variant, obs, actions, args.steps, seed), args.episodes) for seed in range(args.seeds)]
        print(f"{variant:>14}: mean return per seed {' / '.join(f'{s:.0f}' for s in scores)}", flush=True)


def play_expert(episodes: int) -> float:
    env, expert, returns = gym.make("Pendulum-v1"), PendulumSwingUp(), []
    for i in range(episodes):
        obs, _ = env.reset(seed=i)
        total = 0.0
        for _ in range(200):
            obs, reward, *_ = env.step(expert.act(obs[None], [env])[0])
            total += reward
        returns.append(total)
    env.close()
    return float(np.mean(returns))


if __name__ == "__main__":
    main()
