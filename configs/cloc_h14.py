"""CLOC ViT-H/14 at 336 px, the paper's recipe."""

from cloc_jax.config import paper_config, parse_arg


def get_config(arg: str | None = None):
    arg = parse_arg(arg, batch_size=32_768, image_size=336)
    c = paper_config("H/14", arg.image_size, dict(width=1024, depth=24, heads=16, mlp_dim=4096), embed_dim=1024)
    c.batch_size = arg.batch_size
    return c
