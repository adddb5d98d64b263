"""Environment adapters over the library's denoising MDP (`rlkit_diffusion.mdp`).

Importing this package registers the gymnasium environment ``rlkit_diffusion/Denoising-v0``::

    import gymnasium as gym
    import envs  # registers rlkit_diffusion/Denoising-v0

    env = gym.make("rlkit_diffusion/Denoising-v0", world="toy2d")
"""

import gymnasium as _gym

if "rlkit_diffusion/Denoising-v0" not in _gym.registry:
    _gym.register(id="rlkit_diffusion/Denoising-v0", entry_point="envs.denoising:DenoisingEnv")
