"""Image sources and batching: the procedural shapes set, local image folders, and the
multi-crop collate function."""

from dino_core.data.collate import collate_multicrop
from dino_core.data.folder import IMAGE_EXTENSIONS, ImageFolder, load_rgb
from dino_core.data.procedural import CLASSES, ProceduralShapes, masks_root, write_image_folder

__all__ = [
    "CLASSES",
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "ProceduralShapes",
    "collate_multicrop",
    "load_rgb",
    "masks_root",
    "write_image_folder",
]
