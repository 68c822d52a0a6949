"""8 simulated CPU devices, so meshes are tested for real; set before jax is imported anywhere."""

import os
import sys
import tempfile

# The CPU backend's concurrency-optimised scheduler can order the collectives of a multi-axis mesh
# differently on different simulated devices and deadlock them (seen on (2, 2, 2)); launch/tpu.py
# sets the same flag. Eight simulated devices on a busy 2-core machine can keep a collective waiting
# longer than XLA's default 40 s before it aborts the process, hence a longer timeout; a true deadlock
# still aborts its worker within 5 minutes (xdist reports the test) rather than hanging the run.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_cpu_enable_concurrency_optimized_scheduler=false"
    + " --xla_cpu_collective_call_terminate_timeout_seconds=300"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One XLA compilation cache per test run, shared by the xdist workers and the processes tests launch (they
# inherit the environment): many tests compile the same tiny step (measured: the SIGKILL test's three runs
# take 105 s instead of 135 s). Per run, so a run never reuses another run's executables.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"cloc_jax_xla_cache_{_RUN}"))

import pytest  # noqa: E402 (after the environment jax reads at import)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs/ is a folder of files, not an installed package


def tiny_config(name: str = "cloc_tiny", **overrides):
    """A tiny config (cloc_tiny, umg_tiny, ...) shrunk further for unit tests: 32 px images, short
    texts, 8-device data parallel."""
    from cloc_jax.config import load_config_file, set_dotted

    c = load_config_file(os.path.join(ROOT, "configs", f"{name}.py"))
    c.image_size = 32
    c.batch_size = 16
    c.num_steps = 8
    c.tokenizer.update(context_length=24, region_context_length=24)
    c.data.update(train_size=4096, heldout_size=40, max_regions=3, eval_max_regions=4)
    c.optim.warmup_steps = 2
    c.log_every = 4
    c.eval_every = 0
    c.eval_batch_size = 16
    c.checkpoint_every = 2
    return set_dotted(c, overrides)


def make_vit(out_dim: int = 16, scan: bool = True, **image):
    """A bare ViT image tower: `image` are `ImageSpec` fields, the rest the spec's defaults."""
    from cloc_jax.models.build import tower_settings
    from cloc_jax.models.spec import ImageSpec, ModelSpec
    from cloc_jax.models.vit import ViT

    return ViT(ImageSpec(**image), tower_settings(ModelSpec(embed_dim=out_dim, scan=scan)))


@pytest.fixture
def config():
    return tiny_config()


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """name -> a tiny randomly initialised export of configs/<name>.py, made once per test process."""
    from tests.evaluate_helpers import write_tiny_export

    made = {}

    def get(name: str = "cloc_tiny") -> str:
        if name not in made:
            made[name] = write_tiny_export(str(tmp_path_factory.mktemp("exports") / name), name)
        return made[name]

    return get


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """After each test file, drop JAX's in-memory caches of traced and compiled programs: an xdist worker runs
    dozens of files, and without this it grew past 8 GiB, which two workers and the processes tests launch
    cannot share in 24 GiB. Later files recompile what they use (the on-disk cache above keeps that cheap)."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
