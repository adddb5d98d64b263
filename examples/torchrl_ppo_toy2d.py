"""PPO from TorchRL on the toy2d denoising MDP: an off-the-shelf RL library learning on ``envs.torchrl``.

    python examples/torchrl_ppo_toy2d.py [--iterations 13] [--num-envs 128] [--seed 0]

Everything RL here is TorchRL's own: the env is `envs.torchrl.DenoisingTorchRLEnv` (a native ``EnvBase`` over the
batched MDP core), the actor a ``ProbabilisticActor`` whose Gaussian is the policy's denoising step
(`envs.torchrl.StepDistribution`: loc = μ_θ(x_t, t, c), scale = σ_t), data come from TorchRL's ``Collector`` and the
loss is ``ClipPPOLoss``. What is DDPO-specific (Black et al. 2023, DDPO_IS) is only the advantage:

1. one batch = one episode of N = 20 denoising steps in each of ``num_envs`` envs; the reward r(c, x_0) arrives at
   the last step, undiscounted, so every step of an episode gets the episode's return;
2. advantage A = (r − mean_batch r) / (std_batch r + 1e-6), clipped to ±5, the same for every step of the episode
   (no critic: ``ClipPPOLoss(critic_network=None)`` reads the ``advantage`` key);
3. steps with σ_t < ``min_std`` (the last, σ ≈ 0.01) are left out of the loss, as in the project's DDPO on toy2d:
   their likelihood ratio is dominated by noise;
4. each batch is split into ``minibatches`` PPO updates (clip ε = 0.2 on summed 2-D log-probs).

At the end the trained policy is scored by the project's evaluation (`rlkit_diffusion.evaluate.evaluate`): win rate
vs the base model on the toy reward, same captions and initial noises, with a bootstrap 95% interval.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from tensordict.nn import TensorDictModule
from torchrl.collectors import Collector
from torchrl.modules import IndependentNormal, ProbabilisticActor
from torchrl.objectives import ClipPPOLoss

from envs.torchrl import DenoisingTorchRLEnv, StepDistribution
from rlkit_diffusion.evaluate import EvalConfig, evaluate
from rlkit_diffusion.worlds import build_world


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iterations", type=int, default=13, help="collected batches (one episode per env each)")
    p.add_argument("--num-envs", type=int, default=128, help="episodes per batch (the env's batch size)")
    p.add_argument("--minibatches", type=int, default=4, help="PPO updates per batch")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--clip-epsilon", type=float, default=0.2)
    p.add_argument("--min-std", type=float, default=0.05, help="leave out steps with σ_t below this (detail 3)")
    p.add_argument("--eval-samples", type=int, default=256, help="evaluation samples per prompt")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    world = build_world("toy2d", seed=args.seed)
    base = copy.deepcopy(world.policy)  # the base model, for the evaluation
    env = DenoisingTorchRLEnv(world, num_envs=args.num_envs, reward="proxy")
    env.set_seed(args.seed)

    # The actor: the policy's Gaussian step π_θ(x_{t-1} | x_t, c) = N(loc, scale²), log-prob summed over (x, y).
    net = TensorDictModule(
        StepDistribution(world.policy, world, env.prompts),
        in_keys=["x", "t", "t_prev", "prompt"],
        out_keys=["loc", "scale"],
    )
    actor = ProbabilisticActor(
        net,
        in_keys=["loc", "scale"],
        spec=env.action_spec,
        distribution_class=IndependentNormal,
        return_log_prob=True,
    )
    loss_module = ClipPPOLoss(actor, critic_network=None, clip_epsilon=args.clip_epsilon, entropy_bonus=False)
    optim = torch.optim.AdamW(world.policy.eps_model.parameters(), lr=args.lr, weight_decay=0.0)

    frames = args.num_envs * env.core.horizon
    collector = Collector(
        env,
        actor,
        frames_per_batch=frames,
        total_frames=frames * args.iterations,
        auto_register_policy_transforms=False,
    )
    t0 = time.perf_counter()
    for it, batch in enumerate(collector):  # batch: (num_envs, N) transitions, one episode per env
        returns = batch["next", "reward"].sum(dim=1, keepdim=True)  # (B, 1, 1): r(c, x_0), undiscounted
        adv = (returns - returns.mean()) / (returns.std() + 1e-6)  # detail 2
        batch["advantage"] = adv.clamp(-5.0, 5.0).expand_as(batch["next", "reward"]).contiguous()
        data = batch.reshape(-1)  # (B·N,) transitions
        data = data[data["scale"][:, 0] >= args.min_std]  # detail 3
        perm = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(args.seed * 1000 + it))
        for idx in perm.chunk(args.minibatches):  # detail 4
            loss = loss_module(data[idx])["loss_objective"]
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(world.policy.eps_model.parameters(), 1.0)
            optim.step()
        collector.update_policy_weights_()
        print(f"iteration {it + 1}/{args.iterations}: mean reward {returns.mean():.3f}", flush=True)
    collector.shutdown()
    train_s = time.perf_counter() - t0

    world.policy.eval()
    m = evaluate(world, world.policy, base, EvalConfig(samples_per_prompt=args.eval_samples, heldout=False))
    result = {
        "win_rate_vs_base": m["win_rate_vs_base"],
        "win_rate_vs_base_ci_low": m["win_rate_vs_base_ci_low"],
        "win_rate_vs_base_ci_high": m["win_rate_vs_base_ci_high"],
        "reward_base": m["gold_reward_base"],
        "reward_trained": m["gold_reward_trained"],
        "train_s": train_s,
    }
    print(
        f"TorchRL ClipPPOLoss on toy2d: win rate vs base {result['win_rate_vs_base']:.1%} "
        f"[95% CI {result['win_rate_vs_base_ci_low']:.1%}, {result['win_rate_vs_base_ci_high']:.1%}], "
        f"reward {result['reward_base']:.3f} -> {result['reward_trained']:.3f} ({train_s:.0f} s of training)"
    )
    return result


if __name__ == "__main__":
    main()
