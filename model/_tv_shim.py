"""Make ``import torchvision`` (and therefore ``import timm``) work with a CPU build of torch.

PyPI only ships CUDA builds of torchvision 0.28; its ``_C`` extension links ``libtorch_cuda.so``
and fails to load against ``torch==2.13.0+cpu``. torchvision then dies at import time registering
fake kernels for ``torchvision::nms``, whose schema was never defined. We try to load the real
extension first; only if that fails do we define the two schemas torchvision needs at import time.
The C++ ops themselves (nms, roi_align, torchvision.io decoding) stay unavailable: the project
decodes images with OpenCV and never calls them.

Imported first by ``model/__init__.py``, so every process that imports the model (Ray workers,
DataLoader workers, DeepSpeed ranks) gets it before timm.
"""

from __future__ import annotations

import glob
import importlib.util
import os

_DONE = False


def install() -> None:
    global _DONE
    if _DONE:
        return
    _DONE = True
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    libs = []
    for loc in spec.submodule_search_locations:
        libs += glob.glob(os.path.join(loc, "_C*.so"))
    for lib in libs:
        try:
            torch.ops.load_library(lib)
            return  # the real extension loads: nothing to stub
        except (OSError, RuntimeError):
            continue
    try:
        lib = torch.library.Library("torchvision", "DEF")  # noqa: F841 - kept alive below
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        globals()["_LIB"] = lib
    except RuntimeError:
        pass  # already defined by an earlier import


install()
