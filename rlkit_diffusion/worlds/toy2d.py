"""The ``toy2d`` world: 2-D points, a few named conditions, an analytic reward and a KNOWN optimum.

* Condition ("prompt") ``"angle D"`` is the direction φ = D degrees; the encoder maps it to (cos φ, sin φ), so
  unseen angles are an open vocabulary. Train angles: 0, 60, ..., 300. Held-out angles: 30, 90, ..., 330.
* Data p_data(x | φ): an equal mixture of three isotropic Gaussians (std 0.12) on the unit circle at angles
  φ, φ + 120°, φ + 240°.
* Reward r(x, φ) = −‖x − u(φ)‖² with u(φ) = (cos φ, sin φ): the mode at φ is preferred.
* Reference p_ref: the pretrained MLP ε-model (close to p_data, not equal to it).
* KL-optimal policy of eq. 5: p*(x | c) ∝ p_ref(x | c) exp(r(x, c)/β) (eq. 6), drawn by importance resampling of
  many reference samples; `energy_distance` scores a policy's samples against it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from rlkit_diffusion.checkpoint import atomic_write
from rlkit_diffusion.policy import DiffusionPolicy, FlowMatchingPolicy
from rlkit_diffusion.worlds.base import World, ddim_scheduler, flow_scheduler

TRAIN_ANGLES = [0, 60, 120, 180, 240, 300]
HELDOUT_ANGLES = [30, 90, 150, 210, 270, 330]
MODE_STD = 0.12
ASSET = Path(__file__).parent / "assets" / "toy2d_base.safetensors"
FLOW_ASSET = Path(__file__).parent / "assets" / "toy2d_flow_base.safetensors"
NUM_TRAIN_TIMESTEPS = 1000
_PROMPT = re.compile(r"^\s*angle\s+(-?\d+(?:\.\d+)?)\s*$")


def prompt(angle: float) -> str:
    return f"angle {angle:g}"


def parse_angle(p: str) -> float:
    """Degrees of an ``"angle D"`` prompt; a clear error otherwise."""
    m = _PROMPT.match(p)
    if not m:
        raise ValueError(f"toy2d prompt must look like 'angle 30', got {p!r}")
    return float(m.group(1))


class Toy2dEncoder:
    """Prompt → (cos φ, sin φ). Frozen and exact, so held-out angles are encoded like training ones."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._cache: dict[str, tuple[float, float]] = {}

    def __call__(self, prompts: list[str]) -> Tensor:
        for p in set(prompts) - self._cache.keys():
            phi = math.radians(parse_angle(p))
            self._cache[p] = (math.cos(phi), math.sin(phi))
        return torch.tensor([self._cache[p] for p in prompts], device=self.device)  # (B, 2)

    def uncond(self, n: int) -> Tensor:
        return torch.zeros(n, 2, device=self.device)


class Toy2dReward:
    """r(x, φ) = −‖x − u(φ)‖². Differentiable (DRaFT can backpropagate through it)."""

    name = "toy2d"
    differentiable = True

    def __init__(self, encoder: Toy2dEncoder):
        self.encoder = encoder

    def __call__(self, x: Tensor, prompts: list[str]) -> Tensor:
        u = self.encoder(prompts).to(x)  # (B, 2)
        return -((x - u) ** 2).sum(dim=1)  # (B,)


def sample_data(cond: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Draw x ~ p_data(x | φ) for each row of ``cond`` (B, 2) → (B, 2)."""
    b = cond.shape[0]
    phi = torch.atan2(cond[:, 1], cond[:, 0])
    k = torch.randint(0, 3, (b,), generator=generator, device=cond.device)
    ang = phi + k * (2 * math.pi / 3)
    centre = torch.stack([ang.cos(), ang.sin()], dim=1)
    return centre + MODE_STD * torch.randn(b, 2, generator=generator, device=cond.device)


class EpsMLP(nn.Module):
    """ε_θ(x_t, t, c) for 2-D points: [x_t, sinusoidal(t), c] → MLP → ε (toy2d_flow: the same MLP predicts v at
    t = σ·T)."""

    def __init__(self, hidden: int = 128, time_dim: int = 32, cond_dim: int = 2, depth: int = 3):
        super().__init__()
        self.time_dim = time_dim
        layers: list[nn.Module] = []
        width = 2 + time_dim + cond_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(hidden, 2))
        self.net = nn.Sequential(*layers)

    def time_embedding(self, t: Tensor) -> Tensor:
        half = self.time_dim // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device) / half)
        arg = t.float()[:, None] / NUM_TRAIN_TIMESTEPS * 1000.0 * freqs[None] / 10.0
        return torch.cat([arg.sin(), arg.cos()], dim=1)  # (B, time_dim)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        h = torch.cat([x_t, self.time_embedding(t).to(x_t.dtype), cond.to(x_t.dtype)], dim=1)
        return self.net(h)  # (B, 2)


def make_scheduler() -> DDIMScheduler:
    """Linear-β DDIM scheduler, no clipping, ᾱ_final = ᾱ_0 (as Stable Diffusion: every step stays stochastic)."""
    return ddim_scheduler(NUM_TRAIN_TIMESTEPS, "linear")


def make_flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The rectified-flow schedule of toy2d_flow: σ linear in the step (shift 1), T = 1000 training grid points."""
    return flow_scheduler(NUM_TRAIN_TIMESTEPS)


def pretrain(
    steps: int = 4000, batch_size: int = 1024, lr: float = 2e-3, seed: int = 0, flow: bool = False
) -> dict[str, Tensor]:
    """Fit the base model to p_data with the diffusion loss (eq. 2, ω = 1) — ε-prediction, or (``flow``) the
    flow-matching regression ‖(ε − x_0) − v_θ(x_σ, σ)‖² on the same draws. ~15 s on 2 CPU cores."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = EpsMLP()
    policy = FlowMatchingPolicy(model, make_flow_scheduler()) if flow else DiffusionPolicy(model, make_scheduler())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in tqdm(range(steps), desc="pretrain toy2d", leave=False):
        # Conditions drawn from the whole circle (not just the training angles), so held-out angles are in range.
        phi = torch.rand(batch_size, generator=g) * 2 * math.pi
        cond = torch.stack([phi.cos(), phi.sin()], 1)
        x0 = sample_data(cond, g)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch_size,), generator=g)
        target = policy.training_target(x0, noise, t)  # ε itself for the ε-model
        loss = ((policy.model_output(policy.add_noise(x0, noise, t), t, cond) - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def save_base(path: Path = ASSET, **kwargs) -> Path:
    """Pretrain and write the base weights (``python -m benchmarks.prepare world=toy2d`` / ``world=toy2d_flow``
    with ``flow=True``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = pretrain(**kwargs)
    name = "toy2d_flow" if kwargs.get("flow") else "toy2d"
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={"world": name, "recipe": repr(kwargs)}))


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance 2E‖X−Y‖ − E‖X−X'‖ − E‖Y−Y'‖ ≥ 0 (0 iff the distributions agree)."""
    x, y = x.double(), y.double()
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


class Toy2dPairs:
    """Infinite stream of preference pairs: x^a, x^b ~ p_data(·|c), labelled by a Bradley–Terry draw on r (eq. 3).

    P(x^a ≻ x^b | c) = σ((r(x^a, c) − r(x^b, c)) / temperature). ``labeler`` overrides r (AI feedback).
    """

    def __init__(self, encoder, reward, prompts: list[str], seed: int = 0, temperature: float = 1.0):
        self.encoder, self.reward, self.prompts = encoder, reward, list(prompts)
        self.temperature = float(temperature)
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self, batch_size: int) -> tuple[list[str], Tensor, Tensor]:
        g = self.generator
        idx = torch.randint(0, len(self.prompts), (batch_size,), generator=g)
        prompts = [self.prompts[i] for i in idx.tolist()]
        cond = self.encoder(prompts).cpu()
        xa, xb = sample_data(cond, g), sample_data(cond, g)
        margin = (self.reward(xa, prompts) - self.reward(xb, prompts)) / self.temperature
        a_wins = torch.rand(batch_size, generator=g) < torch.sigmoid(margin)
        xw = torch.where(a_wins[:, None], xa, xb)
        xl = torch.where(a_wins[:, None], xb, xa)
        dev = self.encoder.device
        return prompts, xw.to(dev), xl.to(dev)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class TiltedOptimum:
    """Draws from p*(x|c) ∝ p_ref(x|c) exp(r(x,c)/β) by importance resampling of a pool of reference samples."""

    def __init__(self, world: World, prompts: list[str], pool: int = 4096, seed=0):
        self.reward = world.reward("gold")
        self.pool: dict[str, Tensor] = {}
        g = torch.Generator(device=world.device).manual_seed(seed)
        with torch.no_grad():  # one batched rollout for all prompts, through the world's wiring of the loop
            cond = world.encoder([p for p in prompts for _ in range(pool)])
            x_T = torch.randn(cond.shape[0], 2, generator=g, device=cond.device)
            x0 = world.denoise(world.policy, x_T, cond, generator=g).x0  # (len(prompts) * pool, 2) ~ p_ref
        for i, p in enumerate(prompts):
            self.pool[p] = x0[i * pool : (i + 1) * pool]
        self.generator = torch.Generator().manual_seed(seed + 1)
        self._weights: dict[tuple[str, float], Tensor] = {}

    def weights(self, prompt: str, beta: float) -> Tensor:
        """Self-normalised importance weights exp(r/β) / Σ exp(r/β) over the prompt's reference pool."""
        key = (prompt, float(beta))
        if key not in self._weights:
            pool = self.pool[prompt]
            logw = self.reward(pool, [prompt] * len(pool)).double().cpu() / beta
            self._weights[key] = torch.softmax(logw, 0)
        return self._weights[key]

    def __call__(self, prompts: list[str], beta: float) -> Tensor:
        """One draw from p*(·|c) per prompt. (B, 2)"""
        out = torch.empty(len(prompts), 2, device=next(iter(self.pool.values())).device)
        for p in set(prompts):
            rows = [i for i, q in enumerate(prompts) if q == p]
            out[rows] = self.samples(p, len(rows), beta)
        return out

    def samples(self, prompt: str, n: int, beta: float) -> Tensor:
        """n draws from p*(·|c) by multinomial resampling of the reference pool. (n, 2)"""
        i = torch.multinomial(self.weights(prompt, beta), n, replacement=True, generator=self.generator)
        return self.pool[prompt][i]


def build_toy2d(
    *,
    device: str | torch.device = "cpu",
    weights: str | Path | None = None,
    num_inference_steps: int = 20,
    eta: float = 1.0,
    seed: int = 0,
    label_temperature: float = 1.0,
    optimum_pool: int = 4096,
) -> World:
    """Build the toy2d world (loads the shipped base weights; trains and caches them if the file is missing).

    ``weights``: a safetensors file of the ε-MLP, or a directory holding ``model.safetensors`` (an exported run)."""
    model = _load_base(weights, ASSET, "toy2d", device)
    policy = DiffusionPolicy(model, make_scheduler(), sampler="ddim", eta=eta, num_inference_steps=num_inference_steps)
    return _toy2d_world("toy2d", policy, device, seed, label_temperature, optimum_pool)


def build_toy2d_flow(
    *,
    device: str | torch.device = "cpu",
    weights: str | Path | None = None,
    num_inference_steps: int = 20,
    sampler: str = "sde",
    noise_level: float = 0.7,
    seed: int = 0,
    label_temperature: float = 1.0,
    optimum_pool: int = 4096,
) -> World:
    """toy2d with a flow-matching base (`FlowMatchingPolicy`, same MLP, data, reward, pairs and prompts): the
    ε-UNet-vs-flow comparison on a task whose KL-optimal target is known. ``sampler``: ``sde`` (Gaussian policy,
    noise level a = ``noise_level``) or ``ode`` (deterministic Euler)."""
    model = _load_base(weights, FLOW_ASSET, "toy2d_flow", device)
    policy = FlowMatchingPolicy(
        model,
        make_flow_scheduler(),
        sampler=sampler,
        noise_level=noise_level,
        num_inference_steps=num_inference_steps,
    )
    return _toy2d_world("toy2d_flow", policy, device, seed, label_temperature, optimum_pool)


def _load_base(weights: str | Path | None, default: Path, name: str, device) -> EpsMLP:
    """The base MLP from ``weights`` (or the shipped file, pretrained and cached when missing)."""
    path = Path(weights) if weights else default
    if path.is_dir():  # an exported model directory (python -m benchmarks.export)
        path = path / "model.safetensors"
    if not path.exists():
        if weights:
            raise FileNotFoundError(f"{name} weights not found: {path}")
        save_base(path, flow=name == "toy2d_flow")
    model = EpsMLP()
    try:
        model.load_state_dict(load_file(str(path)))
    except RuntimeError as e:
        raise ValueError(f"{name} weights {path} do not match the EpsMLP architecture: {e}") from None
    return model.to(torch.device(device))


def _toy2d_world(name: str, policy: DiffusionPolicy, device, seed: int, label_temperature: float, pool: int) -> World:
    device = torch.device(device)
    policy.to(device)
    encoder = Toy2dEncoder(device)
    reward = Toy2dReward(encoder)
    train_prompts = [prompt(a) for a in TRAIN_ANGLES]
    heldout_prompts = [prompt(a) for a in HELDOUT_ANGLES]
    world = World(
        name=name,
        policy=policy,
        encoder=encoder,
        sample_shape=(2,),
        rewards={"gold": reward, "proxy": reward},
        train_prompts=train_prompts,
        heldout_prompts=heldout_prompts,
        pairs=Toy2dPairs(encoder, reward, train_prompts, seed=seed, temperature=label_temperature),
        val_pairs=Toy2dPairs(encoder, reward, train_prompts, seed=seed + 10_000, temperature=label_temperature),
        distance=energy_distance,
    )
    world.optimum = TiltedOptimum(world, train_prompts + heldout_prompts, pool=pool, seed=seed)
    return world
