"""Multi-crop augmentation: per image in DataLoader workers (``per_image``), or for a whole
batch on any device (``batched``), from fixed canvases (``canvas``) or full images (``full``),
with the box sampler (``boxes``) and the photometric ops (``ops``) it is made of.

Import from the module that defines a name; this package re-exports nothing, so a test that
patches a name patches the one the code reads.
"""
