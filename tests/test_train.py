"""The training loop: exact resume, atomic checkpoints, divergence guard, budgets."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rlkit_diffusion.algorithm import AlgoContext, AlgorithmDefaults
from rlkit_diffusion.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from rlkit_diffusion.mdp import DenoisingCore
from rlkit_diffusion.reference import Reference
from rlkit_diffusion.train import BudgetConfig, DivergenceError, TrainConfig, train
from rlkit_diffusion.worlds.toy2d import build_toy2d
from tests.helpers import run_toy

FAST = ["algo=dpo", "train.batch_size=32", "eval.samples_per_prompt=8", "eval.heldout=false", "eval.bootstrap=50"]


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    straight, d1 = run_toy(tmp_path, [*FAST, "train.steps=12", "train.checkpoint_every=6"], "straight")
    half, d2 = run_toy(tmp_path, [*FAST, "train.steps=6"], "half")
    extend = [*FAST, "train.steps=12", f"resume={d2}", "resume_override=[train.steps]"]  # a finished run, extended
    resumed, _ = run_toy(tmp_path, extend, "ignored")
    a = load_file(str(latest_checkpoint(d1 / "checkpoints") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(d2 / "checkpoints") / "model.safetensors"))
    assert latest_checkpoint(d2 / "checkpoints").name == "step_00000012"
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["gold_reward_trained"] == straight["gold_reward_trained"]
    assert resumed["updates"] == 12


def test_checkpoint_is_atomic_and_pickle_free(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    first = save_checkpoint(tmp_path, 1, model=model, optimizer=opt, state={"note": torch.arange(3)})
    # A write that dies half way leaves only a .tmp directory behind: `latest` still names the first checkpoint.
    (tmp_path / "step_00000002.tmp").mkdir()
    (tmp_path / "step_00000002.tmp" / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == first
    ck = load_checkpoint(first)
    assert torch.equal(ck["model"]["weight"], model.weight.detach())
    assert torch.equal(ck["state"]["note"], torch.arange(3))
    assert json.loads((first / "state.json").read_text())["step"] == 1
    second = save_checkpoint(tmp_path, 2, model=model)
    assert latest_checkpoint(tmp_path) == second and not (tmp_path / "step_00000002.tmp").exists()


class _NaNAfter(AlgorithmDefaults):
    """A loss that becomes NaN at a given optimizer step."""

    name = "nan_after"

    def __init__(self, bad_step: int):
        self.bad_step, self.calls = bad_step, 0

    def collect(self):
        return torch.randn(8, 2, generator=self.ctx.generator)

    def loss(self, x):
        self.calls += 1
        out = self.ctx.policy.model_output(x, torch.full((8,), 10), self.ctx.world.encoder(["angle 0"] * 8))
        loss = out.pow(2).mean()
        return {"loss": loss * float("nan") if self.calls == self.bad_step else loss}


def _ctx(world):
    return AlgoContext(
        world=world,
        policy=world.policy,
        base=Reference(world.policy, "frozen"),
        env=DenoisingCore(world),
        batch_size=8,
        generator=torch.Generator().manual_seed(0),
    )


def test_divergence_guard_stops_with_step_and_checkpoint(tmp_path):
    world = build_toy2d(optimum_pool=8)
    cfg = TrainConfig(steps=10, checkpoint_every=2, log_every=1)
    with pytest.raises(DivergenceError, match=r"optimizer step 4 .*step_00000002"):
        train(_NaNAfter(4), _ctx(world), cfg, run_dir=tmp_path, progress=False)
    assert "optimizer step 4" in (tmp_path / "STOPPED").read_text()


def test_divergence_guard_can_skip_and_count():
    world = build_toy2d(optimum_pool=8)
    out = train(_NaNAfter(3), _ctx(world), TrainConfig(steps=5, on_nonfinite="skip"), progress=False)
    assert out["skipped_steps"] == 1 and out["updates"] == 5


def test_nfe_budget_stops_the_loop():
    world = build_toy2d(optimum_pool=8)
    ctx = _ctx(world)
    out = train(_NaNAfter(-1), ctx, TrainConfig(steps=1000), budget=BudgetConfig("nfe", 40), progress=False)
    assert out["train_nfe"] == 40 and out["updates"] == 5  # 8 samples per step
    with pytest.raises(ValueError, match="budget.kind"):
        train(_NaNAfter(-1), _ctx(world), TrainConfig(), budget=BudgetConfig("epochs", 1), progress=False)


def test_eval_points_fall_at_budget_fractions_of_any_kind():
    """``eval_points=4`` evaluates when 1/4, 2/4, 3/4 and all of the budget are spent — in NFEs here, 8 per step."""
    world = build_toy2d(optimum_pool=8)
    ctx = _ctx(world)
    calls = []

    def eval_fn(update: int) -> dict:
        calls.append(update)
        ctx.policy.counter["nfe"] += 1000  # an evaluation samples with the policy: not charged to the budget
        return {}

    cfg = TrainConfig(steps=1000, eval_points=4)
    out = train(_NaNAfter(-1), ctx, cfg, budget=BudgetConfig("nfe", 80), progress=False, eval_fn=eval_fn)
    assert calls == [3, 5, 8, 10]  # NFE 24 ≥ 20, 40 ≥ 40, 64 ≥ 60, 80 ≥ 80
    assert out["train_nfe"] == 80 and out["updates"] == 10


def test_learning_curve_evaluations_leave_training_alone(tmp_path):
    """A run with 3 curve evaluations ends exactly where the same run without them does (the evaluation draws from
    its own generators), and its curve rows hold the training split only (no held-out split, no implicit accuracy)."""
    import json

    from tests.helpers import run_toy

    small = ["algo=ddpo", "train.steps=6", "eval.samples_per_prompt=8", "eval.bootstrap=50", "eval.max_prompts=6"]
    small += ["eval.implicit_pairs=16", "eval.implicit_draws=2", "report=false"]
    a, _ = run_toy(tmp_path, small, name="a")
    b, b_dir = run_toy(tmp_path, [*small, "train.eval_points=3"], name="b")
    for key in ("gold_reward_trained", "win_rate_vs_base", "kl_to_ref", "heldout_win_rate_vs_base"):
        assert a[key] == b[key], key
    rows = [json.loads(line) for line in (b_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [r for r in rows if "eval/gold_reward_trained" in r]
    assert len(curve) == 3 and all("eval/kl_to_ref" in r and "eval/win_rate_vs_base" in r for r in curve)
    assert not any(k.startswith(("eval/heldout_", "eval/implicit")) for r in curve for k in r)
