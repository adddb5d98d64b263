"""rlkit-diffusion: text-to-image diffusion alignment as reinforcement learning.

The library: the policy, the MDP core, the algorithm contract, the worlds, the rewards, the one training loop and
the one evaluation. It imports nothing from ``algos``, ``envs`` or ``benchmarks`` (``import envs`` registers the
gymnasium environment ``rlkit_diffusion/Denoising-v0``).
"""

__version__ = "0.1.0"
