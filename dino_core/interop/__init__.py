"""Other codebases' files: the reference DINO's checkpoints and key layout (``reference``,
``reference_keys``), Meta's DINOv2/DINOv3 backbones, and this project's backbone export
(``export``). Import from the module that defines a name; nothing is re-exported here.
"""
