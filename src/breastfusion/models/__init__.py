"""Networks of the method: backbones, ArcFace, attention, branches, fusion.

Models never touch the file system except through `backbones.load_weights`,
which reads a local weights file that a user or a package provides.
"""
