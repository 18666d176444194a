from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="adnet-hf",
    version="0.1.0",
    description="ADNet (Adaptive Computation Time Neural Network) for Hugging Face Transformers",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["adnet_hf", "adnet_hf.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "accelerate>=1.0",
        "datasets>=3.0",
        "evaluate>=0.4",
        "scikit-learn>=1.0",
        "scipy>=1.7",
        "safetensors>=0.4",
        "huggingface_hub>=1.0",
        "pillow>=9.1",  # data_adnet reads images (Image.Transpose needs 9.1)
    ],
    extras_require={
        "dev": ["pytest>=8", "matplotlib>=3.7", "hypothesis>=6.100", "onnx>=1.17", "onnxruntime>=1.20",
                "onnxscript>=0.3", "peft>=0.17"],
        "bench": ["matplotlib>=3.7"],
        "onnx": ["onnx>=1.17", "onnxruntime>=1.20", "onnxscript>=0.3"],
        "peft": ["peft>=0.17"],
    },
    license="Apache-2.0",
)
