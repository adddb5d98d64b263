"""The `shapes` world (16x16 text-to-image on a CPU), one module per piece; imports only point down this list:

* `render`: scenes and the vectorised renderer;
* `captions`: the caption grammar (templates, paraphrases, held-out combinations, parser);
* `text_encoder`: the frozen MiniLM sentence encoder (the UNet's cross-attention context);
* `gold`: the hidden gold reward, measured from pixels;
* `pairs`: Pick-a-Pic-format preference pairs labelled by the gold reward;
* `proxy`: the learned rewards (PickScore-like proxy, CLIP score, aesthetic) and their loading;
* `proxy_train`: their training;
* `base_model`: the base UNet (architecture, scheduler, pretraining);
* `world`: `build_shapes`, `build_shapes_flow` (the flow-matching base, same everything else) and the base-model
  sampler;
* `prepare`: the stages of ``python -m benchmarks.prepare world=shapes`` (and ``world=shapes_flow``).
"""

from rlkit_diffusion.worlds.shapes.world import (
    ShapesFlowWorldConfig,
    ShapesWorldConfig,
    base_sampler,
    build_shapes,
    build_shapes_flow,
)

__all__ = ["ShapesFlowWorldConfig", "ShapesWorldConfig", "base_sampler", "build_shapes", "build_shapes_flow"]
