from setuptools import find_packages, setup

setup(
    name="cloc_jax",
    version="0.1.0",
    description="Region-aware CLIP pretraining (CLOC, UMG-CLIP) in JAX for TPU pods, GPUs and CPUs",
    packages=find_packages(include=["cloc_jax", "cloc_jax.*"]),
    package_data={
        "cloc_jax.data": ["scenes_words.txt", "segmentation_classes.json"],
        "cloc_jax.evals": ["imagenet.json"],
    },
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.8",
        "flax>=0.11",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "array_record>=0.5",
        "tensorflow-datasets>=4.9",
        "importlib_resources",  # tfds imports it for some builders (ImageNet's) without declaring it
        "pillow>=10",
        "msgpack>=1.0",
        "ml_collections>=1.0",
        "einops>=0.8",
        "absl-py",
        "numpy",
        "tqdm",
        "psutil",  # host memory: a run that cannot fit says so before it starts
        "tensorboardX",
        "sentencepiece",
        # weight interchange (cloc_jax/convert/): transformers' configs and tokenizers, safetensors files,
        # ftfy for open_clip's text cleaning
        "transformers>=4.40",
        "safetensors>=0.4",
        "ftfy>=6",
        "pycocotools>=2.0.7",  # masks: COCO polygons and RLE
    ],
    extras_require={
        # libtpu (through jax[tpu]) lets the tests compile for TPU topologies on a machine without TPUs.
        # Pseudo-labelling: Apache Beam runs the pipeline, NLTK chunks noun phrases (transformers + torch
        # run OWLv2; torch is left to the user, it comes in CPU and GPU builds).
        "annotate": ["apache-beam>=2.50", "nltk>=3.8", "transformers>=4.40"],
        "test": [
            "pytest>=8",
            "pytest-xdist>=3",
            "pytest-timeout>=2.3",
            "ruff>=0.6",
            "hypothesis>=6",
            # Reference models for the weight tests: open_clip_torch brings torch, torchvision and timm. pip takes
            # torch 2.14.1 (a CUDA build, ~5 GB, from this machine's disk in ~80 s) because torchvision has no
            # CPU build matching the 200 MB torch 2.13.0+cpu here; the tests run it on the CPU.
            "open_clip_torch>=3.0",
            "jax[tpu]",
            "apache-beam>=2.50",
            "nltk>=3.8",
            # colabs/: CI executes the notebooks headless (tests/colabs/test_notebooks.py); they draw with matplotlib
            "nbclient>=0.10",
            "ipykernel>=6",
            "matplotlib>=3.8",
        ],
        "tpu": ["jax[tpu]"],
        "gpu": ["jax[cuda12]"],
    },
)
