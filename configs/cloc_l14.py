"""CLOC ViT-L/14 at 336 px, the paper's recipe (1024 TPU v5p chips, batch 32,768)."""

from cloc_jax.config import paper_config, parse_arg


def get_config(arg: str | None = None):
    arg = parse_arg(arg, batch_size=32_768, image_size=336)
    c = paper_config("L/14", arg.image_size, dict(width=768, depth=12, heads=12, mlp_dim=3072), embed_dim=768)
    c.batch_size = arg.batch_size
    return c
