"""What a world is: everything an algorithm needs, built once so that every algorithm gets the same copy.

A `World` bundles the policy (network + scheduler maths), the frozen prompt encoder, the reward models, the prompt
splits, the preference pairs and the decoder from the diffusion space to images. ``benchmarks/run.py`` builds it
through `build_world`; algorithms never call ``from_pretrained`` themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from torch import Tensor

from rlkit_diffusion.policy import Cond, DiffusionPolicy, SampleOutput


def ddim_scheduler(num_train_timesteps: int, beta_schedule: str) -> DDIMScheduler:
    """The DDIM scheduler of the worlds trained here (toy2d, shapes): ε-prediction, ``beta_schedule`` over
    ``num_train_timesteps``, no clipping, ᾱ_final = ᾱ_0 (as Stable Diffusion: every step stays stochastic),
    leading timestep spacing."""
    return DDIMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        clip_sample=False,
        set_alpha_to_one=False,
        timestep_spacing="leading",
    )


def flow_scheduler(num_train_timesteps: int) -> FlowMatchEulerDiscreteScheduler:
    """The rectified-flow schedule of the flow worlds trained here (toy2d_flow, shapes_flow): σ linear in the step
    (shift 1) over ``num_train_timesteps`` training grid points."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=1.0)


class PromptEncoder(Protocol):
    """A frozen text encoder: prompts → conditioning for the ε-model."""

    def __call__(self, prompts: list[str]) -> Cond: ...

    def uncond(self, n: int) -> Cond:
        """The unconditional ("empty prompt") conditioning for classifier-free guidance, batch n."""
        ...


class PairSource(Protocol):
    """Preference pairs (c, x^w, x^l) in the diffusion space (latents for SD, pixels for shapes)."""

    def next_batch(self, batch_size: int) -> tuple[list[str], Tensor, Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class World:
    """A text-to-sample task.

    Attributes:
        name: the registry name (`rlkit_diffusion.worlds.WORLDS`): ``toy2d``, ``toy2d_flow``, ``shapes``,
            ``shapes_flow``, ``sd15``, ``sdxl`` or ``sd3``.
        policy: the trainable `DiffusionPolicy` (a `FlowMatchingPolicy` for the flow worlds), at its base weights.
        encoder: the frozen prompt encoder.
        sample_shape: shape of one x_0 in the diffusion space, e.g. (2,) or (3, 16, 16) or (4, 64, 64).
        rewards: reward models by name; ``gold`` (if any) is for evaluation and labelling only.
        train_prompts / heldout_prompts: prompt splits (held-out ones are never trained on).
        pairs / val_pairs: preference-pair sources for the off-policy algorithms (None if the world has none).
        decode: x_0 in diffusion space → what rewards score (images in [0, 1], or points for toy2d).
        encode: the inverse map for data (images → diffusion space), e.g. the VAE encoder; identity by default.
        guidance_scale: classifier-free guidance used by sampling in this world (1 = none).
        optimum: toy2d only — draws from the KL-optimal p*(x|c) ∝ p_ref(x|c) exp(r(x,c)/β): ``(prompts, β) → x``.
        distance: toy2d only — sample distance between two point clouds (energy distance).
        extras: anything world-specific (e.g. caption metadata for diversity).
    """

    name: str
    policy: DiffusionPolicy
    encoder: PromptEncoder
    sample_shape: tuple[int, ...]
    rewards: dict[str, Any]
    train_prompts: list[str]
    heldout_prompts: list[str]
    pairs: PairSource | None = None
    val_pairs: PairSource | None = None
    decode: Callable[[Tensor], Tensor] = lambda x: x
    encode: Callable[[Tensor], Tensor] = lambda x: x
    guidance_scale: float = 1.0
    optimum: Callable[[list[str], float], Tensor] | None = None
    distance: Callable[[Tensor, Tensor], float] | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.policy.alphas_cumprod.device

    def uncond(self, n: int) -> Cond:
        """Unconditional conditioning when the world uses guidance, else None."""
        return self.encoder.uncond(n) if self.guidance_scale != 1.0 else None

    def denoise(self, policy: DiffusionPolicy, x_T: Tensor, cond: Cond, **sample_kwargs: Any) -> SampleOutput:
        """THE sampling loop (`DiffusionPolicy.sample`) wired to this world: its guidance scale and unconditional
        conditioning. ``sample_kwargs`` go to ``sample`` (``schedule``, ``generator``, ``grad``, ``k``, ...).

        The MDP's rollout (`rlkit_diffusion.mdp.DenoisingCore.rollout`) and the world builders' own samplers (the
        shapes pair zoo, toy2d's tilted optimum) all sample through here, so there is one wiring of the loop."""
        return policy.sample(
            x_T, cond, uncond=self.uncond(x_T.shape[0]), guidance_scale=self.guidance_scale, **sample_kwargs
        )

    def reward(self, name: str):
        if name not in self.rewards:
            raise KeyError(f"world {self.name!r} has no reward {name!r}; available: {sorted(self.rewards)}")
        return self.rewards[name]


class ShardedPairs:
    """One rank's share of a `PairSource` under data parallelism.

    Every rank holds the same seeded source and draws the GLOBAL batch (``batch_size × num_shards`` pairs); rank r
    keeps rows ``[r·batch_size, (r+1)·batch_size)``. The union over ranks is therefore exactly the batch a single
    process would draw with ``num_shards`` times the per-process batch (DDP equivalence), every rank's source stays
    at the same position, and a checkpoint written by rank 0 resumes every rank.
    """

    def __init__(self, source: PairSource, rank: int, num_shards: int):
        self.source, self.rank, self.num_shards = source, rank, num_shards

    def next_batch(self, batch_size: int) -> tuple[list[str], Tensor, Tensor]:
        prompts, x_w, x_l = self.source.next_batch(batch_size * self.num_shards)
        rows = slice(self.rank * batch_size, (self.rank + 1) * batch_size)
        return list(prompts[rows]), x_w[rows], x_l[rows]

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)


def shard_pairs(pairs: PairSource | None, rank: int, num_shards: int) -> PairSource | None:
    """`ShardedPairs` for ``num_shards`` > 1; a source with its own ``shard(rank, num_shards)`` (the SD worlds' latent
    pairs, which then VAE-encode only their own slice) shards itself."""
    if pairs is None or num_shards == 1:
        return pairs
    if hasattr(pairs, "shard"):
        return pairs.shard(rank, num_shards)
    return ShardedPairs(pairs, rank, num_shards)
