"""Scripted experts for gymnasium's classic-control tasks, derived from the tasks' physics.

No learning: each controller is a few lines of control theory, so the experts are reproducible
and fast. Their measured mean returns are recorded in every dataset card.

* CartPole-v1: discrete-time LQR on the linearised cart-pole, bang-bang on the sign of the force.
* Acrobot-v1: energy pumping, torque in the direction of the second joint's velocity relative to
  the first link, which adds energy to the swing until the tip clears the bar.
* MountainCar-v0 / MountainCarContinuous-v0: push in the direction of motion (energy pumping).
* Pendulum-v1: energy-shaping swing-up, switching to a PD controller near the upright position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from datasets_build.collector import StatelessExpert

# CartPole-v1 physics (gymnasium.envs.classic_control.cartpole)
CARTPOLE_GRAVITY = 9.8
CARTPOLE_CART_MASS = 1.0
CARTPOLE_POLE_MASS = 0.1
CARTPOLE_HALF_LENGTH = 0.5
CARTPOLE_FORCE = 10.0
CARTPOLE_DT = 0.02
# LQR weights: keep the pole upright first (angle), then the cart near the centre
CARTPOLE_Q = np.diag([1.0, 1.0, 100.0, 10.0])
CARTPOLE_R = np.array([[0.1]])
RICCATI_ITERATIONS = 2000

# MountainCar: from rest, start by pushing left unless the car starts left of this position
MOUNTAINCAR_START_LEFT_OF = -0.45

# Pendulum-v1 physics: theta'' = 3 g / (2 l) sin(theta) + 3 / (m l^2) u, theta = 0 upright
PENDULUM_GRAVITY = 10.0
PENDULUM_MAX_TORQUE = 2.0
PENDULUM_UPRIGHT_ENERGY = 1.5 * PENDULUM_GRAVITY  # energy (per unit inertia) at rest upright
PENDULUM_SWING_GAIN = 1.0
PENDULUM_CATCH_COS = 0.85  # switch to PD once cos(theta) exceeds this
PENDULUM_KP = 12.0
PENDULUM_KD = 2.5


def _cartpole_lqr_gain() -> np.ndarray:
    """LQR gain K (u = -K s) of the cart-pole linearised around upright, by Riccati iteration."""
    total_mass = CARTPOLE_CART_MASS + CARTPOLE_POLE_MASS
    denom = CARTPOLE_HALF_LENGTH * (4.0 / 3.0 - CARTPOLE_POLE_MASS / total_mass)
    theta_acc_theta = CARTPOLE_GRAVITY / denom
    theta_acc_force = -1.0 / (total_mass * denom)
    pole = CARTPOLE_POLE_MASS * CARTPOLE_HALF_LENGTH / total_mass
    x_acc_theta = -pole * theta_acc_theta
    x_acc_force = 1.0 / total_mass - pole * theta_acc_force
    a_cont = np.array([[0, 1, 0, 0], [0, 0, x_acc_theta, 0], [0, 0, 0, 1], [0, 0, theta_acc_theta, 0]])
    b_cont = np.array([[0.0], [x_acc_force], [0.0], [theta_acc_force]])
    a, b = np.eye(4) + CARTPOLE_DT * a_cont, CARTPOLE_DT * b_cont  # Euler, as the env integrates
    p = CARTPOLE_Q.copy()
    for _ in range(RICCATI_ITERATIONS):
        k = np.linalg.solve(CARTPOLE_R + b.T @ p @ b, b.T @ p @ a)
        p = CARTPOLE_Q + a.T @ p @ (a - b @ k)
    return np.linalg.solve(CARTPOLE_R + b.T @ p @ b, b.T @ p @ a)[0]


class CartPoleLQR(StatelessExpert):
    def __init__(self, num_envs: int = 1):
        self.gain = _cartpole_lqr_gain()

    def act(self, observations: np.ndarray, envs: Sequence[gym.Env]) -> list[Any]:
        force = -np.asarray(observations, dtype=np.float64) @ self.gain
        return list((force > 0).astype(np.int64))  # 1 pushes right


class AcrobotEnergyPump(StatelessExpert):
    """Torque along the velocity of the second joint: the actuated joint always does positive work,
    which pumps energy into the double pendulum until the tip clears the bar."""

    def __init__(self, num_envs: int = 1):
        pass

    def act(self, observations: np.ndarray, envs: Sequence[gym.Env]) -> list[Any]:
        d_theta2 = np.asarray(observations, dtype=np.float64)[:, 5]
        return list((1 + np.sign(d_theta2)).astype(np.int64))  # actions 0, 1, 2 = torque -1, 0, +1


class MountainCarPump(StatelessExpert):
    """Accelerate in the direction of motion; from rest, start by backing up the left hill."""

    def __init__(self, num_envs: int = 1, continuous: bool = False):
        self.continuous = continuous

    def act(self, observations: np.ndarray, envs: Sequence[gym.Env]) -> list[Any]:
        obs = np.asarray(observations, dtype=np.float64)
        position, velocity = obs[:, 0], obs[:, 1]
        # at rest (the start), back up the nearer slope first: left unless already left of the valley
        push_right = np.where(velocity == 0, position < MOUNTAINCAR_START_LEFT_OF, velocity > 0)
        if self.continuous:
            return [np.array([1.0 if r else -1.0], dtype=np.float32) for r in push_right]
        return list(np.where(push_right, 2, 0).astype(np.int64))


class PendulumSwingUp(StatelessExpert):
    """Energy shaping far from upright, PD control near it."""

    def __init__(self, num_envs: int = 1):
        pass

    def act(self, observations: np.ndarray, envs: Sequence[gym.Env]) -> list[Any]:
        obs = np.asarray(observations, dtype=np.float64)
        cos_t, sin_t, velocity = obs[:, 0], obs[:, 1], obs[:, 2]
        theta = np.arctan2(sin_t, cos_t)
        energy = 0.5 * velocity**2 + PENDULUM_UPRIGHT_ENERGY * cos_t
        swing = PENDULUM_SWING_GAIN * (PENDULUM_UPRIGHT_ENERGY - energy) * np.sign(velocity + 1e-6)
        catch = -PENDULUM_KP * theta - PENDULUM_KD * velocity
        torque = np.where(cos_t > PENDULUM_CATCH_COS, catch, swing)
        torque = np.clip(torque, -PENDULUM_MAX_TORQUE, PENDULUM_MAX_TORQUE).astype(np.float32)
        return [t.reshape(1) for t in torque]
