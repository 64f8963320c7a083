"""Push-T with Diffusion Policy's conventions, over the `gym-pusht` simulator.

The task: a round agent (the end effector) pushes a T-shaped block onto a fixed T-shaped goal region on a 512 x 512
table. The simulator (pymunk physics, 100 Hz, PD control towards the commanded agent position at 10 Hz) is
`gym_pusht.envs.PushTEnv`; this wrapper changes only what Diffusion Policy's evaluation depends on:

* reset(seed) draws the initial state from `np.random.RandomState(seed)`, in this order (`dp_reset_state`):
      agent x, agent y = randint(50, 450) x2;  block x, block y = randint(100, 400) x2;  angle = randn() * 2 pi - pi
  (gym-pusht's own reset uses its gymnasium generator and a uniform angle: other initial states for the same seed).
* restoring a state sets the block's angle BEFORE its position. The block's centre of gravity is not its origin, so
  setting the angle afterwards rotates the body about the centre of gravity and moves its origin: gym-pusht's order
  puts the block ~90 px away from the recorded demonstration states (measured in ../shared/data/README.md).
* observation: the state (agent x, agent y, block x, block y, block angle mod 2 pi), float64 [5];
  reward: clip(coverage / 0.95, 0, 1) with coverage = area(goal n block) / area(goal);
  the episode ends once coverage > 0.95 or after `max_steps` (300) steps.

The policy contract (drifting/policy/model.py), as in Diffusion Policy:

    obs     (B, T_o, D_o)   the last T_o = 2 observations, oldest first, D_o = 5 (raw units, as above)
    action  (B, T_a, D_a)   the next T_a = 8 commanded agent positions (pixels), D_a = 2, executed in order

Timeline for T_o = 2, prediction horizon H = 16, T_a = 8 (o: observation given, a: action predicted, x: executed):

    step     t-1  t   t+1 ... t+7  t+8 ... t+14
    obs       o   o
    chunk     a   a    a  ...  a    a  ...  a        (16 actions; the first is aligned with observation t-1)
    execute       x    x  ...  x                     (actions t .. t+7, i.e. chunk[1:9]); then observe again
"""

from __future__ import annotations

import numpy as np

MAX_STEPS = 300  # Diffusion Policy's evaluation horizon (10 Hz: 30 s)
SUCCESS_COVERAGE = 0.95
OBS_DIM, ACTION_DIM = 5, 2


def dp_reset_state(seed: int) -> np.ndarray:
    """Diffusion Policy's initial state for `seed`: [agent x, agent y, block x, block y, block angle] (float64)."""
    rs = np.random.RandomState(seed)
    # the order of the draws is part of the protocol: changing it changes every test episode
    return np.array([rs.randint(50, 450), rs.randint(50, 450), rs.randint(100, 400), rs.randint(100, 400),
                     rs.randn() * 2 * np.pi - np.pi], dtype=np.float64)


def reward_from_coverage(coverage: float) -> float:
    return float(np.clip(coverage / SUCCESS_COVERAGE, 0.0, 1.0))


class PushT:
    """One Push-T episode at a time: `reset(seed=...)` or `reset(state=...)`, then `step(action)`.

    step(action [2] in pixels) -> (obs [5], reward, done, info {"coverage", "is_success", "steps"}).
    Not a gymnasium.Env subclass on purpose: the evaluation loop needs only these two calls, and a TimeLimit wrapper
    would hide the 300-step rule that the protocol fixes.
    """

    def __init__(self, max_steps: int = MAX_STEPS, render_size: int = 96):
        from gym_pusht.envs import PushTEnv  # optional dependency (the `policy` extra): imported only when used

        self._env = PushTEnv(obs_type="state", render_mode="rgb_array", observation_width=render_size,
                             observation_height=render_size)
        self.max_steps = max_steps
        self.steps = 0
        self.done = True

    # -- state ---------------------------------------------------------------------------------------------------------

    def reset(self, seed: int | None = None, state: np.ndarray | None = None) -> np.ndarray:
        """Start an episode from Diffusion Policy's seeded draw, or from an explicit state [5]. Returns obs [5]."""
        if (seed is None) == (state is None):
            raise ValueError("reset: give exactly one of seed= or state=")
        if seed is not None:
            state = dp_reset_state(seed)
        self._env.reset(seed=seed)  # builds a fresh physics space (its own random draw is overwritten below)
        self._set_state(np.asarray(state, dtype=np.float64))
        self.steps, self.done = 0, False
        return self.obs()

    def _set_state(self, state: np.ndarray) -> None:
        """Place agent and block exactly at `state`, angle before position (see the module docstring).

        Relies on gym-pusht's `agent`, `block` and `space` attributes; this is the one place that touches them.
        """
        env = self._env
        env._setup()  # a fresh space: no velocities or contacts left over from gym-pusht's own reset
        env.agent.position = (float(state[0]), float(state[1]))
        env.block.angle = float(state[4])
        env.block.position = (float(state[2]), float(state[3]))
        env.space.step(env.dt)  # one physics step makes the placement take effect, as in the original environment

    def obs(self) -> np.ndarray:
        """[agent x, agent y, block x, block y, block angle mod 2 pi], float64."""
        return np.asarray(self._env.get_obs(), dtype=np.float64)

    def coverage(self) -> float:
        return float(self._env._get_coverage())

    # -- dynamics ------------------------------------------------------------------------------------------------------

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, dict]:
        """Command the agent towards `action` (pixels) for one control step (10 physics steps)."""
        if self.done:
            raise RuntimeError("step: the episode is over; call reset first")
        _, _, _, _, info = self._env.step(np.asarray(action, dtype=np.float64))
        coverage = float(info["coverage"])
        self.steps += 1
        success = coverage > SUCCESS_COVERAGE
        self.done = success or self.steps >= self.max_steps
        return self.obs(), reward_from_coverage(coverage), self.done, {"coverage": coverage, "is_success": success,
                                                                      "steps": self.steps}

    def render(self) -> np.ndarray:
        """An RGB frame (uint8 [H, W, 3]) for videos."""
        return self._env.render()

    def close(self) -> None:
        self._env.close()
