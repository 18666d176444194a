from pathlib import Path

from setuptools import setup

# What the model needs: loading, forward, exits, generation, calibration, `fit_halting` and `ADNetTrainer`.
CORE = [
    "torch>=2.4",
    "transformers>=5.0,<6",
    "accelerate>=1.0",  # Transformers' Trainer needs it
    "safetensors>=0.4",
    "huggingface_hub>=1.0",
    "numpy>=1.24",
]
EXTRAS = {
    # the example scripts and benchmarks: local data files and images, plots
    "examples": ["datasets>=3.0", "pillow>=9.1", "matplotlib>=3.7"],
    "onnx": ["onnx>=1.17", "onnxruntime>=1.20", "onnxscript>=0.3"],
    "peft": ["peft>=0.17"],
    # the documentation site: MkDocs with the Material theme, the API reference generated from the docstrings
    "docs": ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.27"],
}
# the tests also compare the metrics with scikit-learn's and scipy's, fuzz with Hypothesis, run the docs' code
# blocks (mktestdocs), build the site and lint with ruff
EXTRAS["dev"] = sorted(
    {
        *EXTRAS["examples"],
        *EXTRAS["onnx"],
        *EXTRAS["peft"],
        *EXTRAS["docs"],
        "mktestdocs>=0.2",
        "pytest>=8",
        "hypothesis>=6.100",
        "scikit-learn>=1.0",
        "scipy>=1.7",
        "ruff>=0.8",
    }
)

setup(
    name="adnet-hf",
    version="0.1.0",
    description="ADNet (Adaptive Computation Time Neural Network) for Hugging Face Transformers",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    # `adnet_examples`: what the example scripts and benchmarks share, beside them in examples/
    packages=["adnet_hf", "adnet_examples"],
    package_dir={"adnet_examples": "examples/adnet_examples"},
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require=EXTRAS,
    license="Apache-2.0",
)
