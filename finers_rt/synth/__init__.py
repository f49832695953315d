"""Synthetic FineRS-style benchmark: cluttered high-resolution scenes with many tiny objects.

`generate_scene(seed, index, size_wh)` builds one scene in memory (image + FineRS-4k
annotation records); `generate_dataset(out_dir, n, seed, size_wh, workers)` writes
`OUT_DIR/annotations.json` and `OUT_DIR/images/*.jpg`. numpy + opencv + pillow only.
"""

from finers_rt.synth.objects import COLORS, PATTERNS, SHAPES
from finers_rt.synth.questions import ATTRIBUTE_MIX, QTYPE_MIX, REGIONS
from finers_rt.synth.scene import generate_scene, generate_scene_objects, image_name, scene_objects
from finers_rt.synth.writer import SynthSummary, generate_dataset, parse_size_wh

__all__ = ["COLORS", "PATTERNS", "SHAPES", "ATTRIBUTE_MIX", "QTYPE_MIX", "REGIONS",
           "generate_scene", "generate_scene_objects", "image_name", "scene_objects", "SynthSummary", "generate_dataset", "parse_size_wh"]
