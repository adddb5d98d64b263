"""Generic reward models (PickScore, HPSv2, CLIP score, aesthetic, JPEG), one file per reward, all following
`rlkit_diffusion.rewards.base.RewardModel`. A world's own rewards live with the world (the shapes world's gold and
proxy rewards: `rlkit_diffusion.worlds.shapes.gold`, `rlkit_diffusion.worlds.shapes.proxy`)."""
