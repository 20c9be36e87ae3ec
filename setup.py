"""Builds csrc/ (the C++ rollout buffer) into minirlhf._rollout.

MINIRLHF_SANITIZE=1 builds it under AddressSanitizer + UndefinedBehaviorSanitizer
(for the sanitizer test run in .ci/run; load it with LD_PRELOAD=$(gcc -print-file-name=libasan.so)).
"""
import os
from pathlib import Path

from setuptools import setup

ext_modules = []
if Path("csrc/bindings.cpp").exists():
    from pybind11.setup_helpers import Pybind11Extension

    sanitize = os.environ.get("MINIRLHF_SANITIZE") == "1"
    flags = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
             "-fno-sanitize-recover=undefined"] if sanitize else ["-O3"]
    ext_modules.append(
        Pybind11Extension(
            "minirlhf._rollout",
            sorted(str(p) for p in Path("csrc").glob("*.cpp")),
            include_dirs=["csrc"],
            cxx_std=17,
            # -pthread: the loops run on std::threads (glibc < 2.34 keeps them in libpthread)
            extra_compile_args=flags + ["-pthread"],
            extra_link_args=["-pthread"] + (["-fsanitize=address,undefined"] if sanitize else []),
        )
    )

setup(ext_modules=ext_modules)
