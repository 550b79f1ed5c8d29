"""The compiled state core, `dataflow.core._native` (dataflow/core/native.py says what it
does); everything else about the package is in pyproject.toml.

No contraction of multiply-adds into FMA and no fast maths: every float must round exactly
as the pure-Python reference's does.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "dataflow.core._native",
            sources=["dataflow/core/_native.c"],  # includes ryu/d2s.c
            include_dirs=["dataflow/core"],
            depends=["dataflow/core/ryu/d2s.c"],
            extra_compile_args=["-O2", "-ffp-contract=off", "-fno-fast-math"],
        )
    ]
)
