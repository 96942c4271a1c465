"""kvwire: move hybrid-model KV caches between GPUs over ordinary TCP."""

from setuptools import find_packages, setup

setup(
    name="kvwire",
    version="0.1.0",
    description="Fast, verified, safe KV-cache transfer for hybrid-attention LLMs over multi-lane TCP",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["kvwire", "kvwire.*"]),
    package_data={"kvwire": ["py.typed", "codec/presets/*.json", "prfaas/*.toml", "testing/wanemu.c",
                             "testing/wanemu_*.h"]},
    install_requires=["numpy>=1.24", "msgpack>=1.0", "xxhash>=3.0"],
    extras_require={
        # torch is pinned to the release whose CPU build ships with these machines: a bare "torch"
        # pulls a multi-GB CUDA build.
        "torch": ["torch==2.13.0"],
        "cuda": ["cupy-cuda12x>=13"],
        "transformers": ["torch==2.13.0", "transformers>=5.17,<5.25"],
        "test": ["pytest>=8", "hypothesis>=6.100", "pytest-timeout>=2.3", "ruff>=0.6", "mypy>=1.10",
                 "matplotlib>=3.7", "transformers>=5.17,<5.25", "zfec>=1.5"],
        "bench": ["pytest-benchmark>=4", "matplotlib>=3.7"],
        # tail parity (kvwire.codec.parity): Reed-Solomon over GF(2^8) from zfec, Tahoe-LAFS's well-kept C
        # erasure coder (a numpy table-lookup coder runs ~0.3 GB/s here, too slow for a layer's tail)
        "fec": ["zfec>=1.5"],
        # the PrfaaS reference deployment (kvwire.prfaas.node/nodeclient/config and the router's front door):
        # a well-kept ASGI stack (starlette + uvicorn) and HTTP client (httpx) instead of hand-written HTTP,
        # the official openai client for the front door's tests, prometheus_client for /metrics, tomli to read
        # the TOML deployment config on Python 3.10 (3.11+ has tomllib)
        "prfaas": ["torch==2.13.0", "transformers>=5.17,<5.25", "starlette>=0.37", "uvicorn>=0.29",
                   "httpx>=0.27", "openai>=1.0", "prometheus_client>=0.20", "tomli>=2.0; python_version < '3.11'"],
    },
    entry_points={
        "console_scripts": ["kvwire-bench=kvwire.bench:main"],
        # SGLang loads it at start: --disaggregation-transfer-backend kvwire (kvwire/adapters/sglang.py)
        "sglang.srt.plugins": ["kvwire=kvwire.adapters.sglang:register"],
    },
    classifiers=["Programming Language :: Python :: 3", "Typing :: Typed"],
)
