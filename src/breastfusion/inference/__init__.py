"""The inference core: what training, cached features, prediction and explanation share.

`runtime` (device, precision, memory layout), `instances` (the unit the network sees),
`images` (preprocessed images and the screening of refused ones), `batches` (an instance's
tensors), `encode` (images -> backbone features, under one precision policy), `networks`
(a network rebuilt from saved weights) and `layout` (the run folder's file names).
`training/`, `predict/` and `explain/` depend on this package; it depends on none of them.
"""
