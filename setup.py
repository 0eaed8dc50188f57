"""Build hook for the one C extension; everything else lives in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "shm._atomics",
            sources=["shm/_atomics.c"],
            extra_compile_args=[
                "-O2",
                "-std=c11",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-ffp-contract=off",
            ],
        )
    ]
)
