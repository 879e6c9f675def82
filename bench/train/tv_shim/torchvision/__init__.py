"""A stand-in for the few torchvision pieces diffusers' DreamBooth scripts use, for machines without
torchvision (the CPU development box). bench/train/peer.py puts it on the path only when
``import torchvision`` fails; the GPU image has the real package."""

__version__ = "0.0-shim"
