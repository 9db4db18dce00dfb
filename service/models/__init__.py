"""Backbones read through the service's storage: of checkpoints, run folders, exported files
and the reference's and Meta's files (``backbones``), and the frozen teacher of distillation
with its DINO head (``teacher``). Below ``train`` and ``evaluate``, which both read them."""
