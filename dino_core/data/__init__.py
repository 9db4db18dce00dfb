"""Image sources and batching: the procedural shapes set, local image folders, and the
multi-crop collate function."""

from dino_core.data.collate import collate_multicrop
from dino_core.data.copydays import ProceduralCopydays, read_copydays
from dino_core.data.davis import DavisVideos, write_davis
from dino_core.data.folder import IMAGE_EXTENSIONS, ImageFolder, load_rgb
from dino_core.data.instances import InstanceSet
from dino_core.data.procedural import CLASSES, ProceduralShapes, masks_root, write_image_folder
from dino_core.data.roxford import load_revisited
from dino_core.data.video import ProceduralVideos, Video

__all__ = [
    "CLASSES",
    "DavisVideos",
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "InstanceSet",
    "ProceduralCopydays",
    "ProceduralShapes",
    "ProceduralVideos",
    "Video",
    "collate_multicrop",
    "load_revisited",
    "load_rgb",
    "masks_root",
    "read_copydays",
    "write_davis",
    "write_image_folder",
]
