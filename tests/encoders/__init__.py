"""Pixel-encoder tests. `import model` first: it installs the torchvision shim that `import timm` needs."""

import model  # noqa: F401
