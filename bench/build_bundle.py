"""Build the random-weight bundles the recorded benchmarks ran on (nothing can be downloaded here).

    python bench/build_bundle.py tiny-finers-sizes OUT   # tiny Qwen2.5-VL stages at 1920x1080 / 512x512, tiny SAM at 1024
    python bench/build_bundle.py 0.5b-shaped OUT         # Qwen2.5-0.5B-shaped text tower (both stages), GSE 448x252, LPR 224x224

OUT/bundle is the bundle; OUT/hf-* and OUT/sam.pth are its source checkpoints (the reference
side of `finers-rt bench --reference` loads them from the bundle manifest).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from finers_rt.export.bundle import export_bundle
from finers_rt.export.checkpoints import make_random_qwen25vl
from finers_rt.export.sam_configs import make_random_sam_checkpoint, resolve_sam_config

SAM_SMALL = {"encoder_embed_dim": 64, "encoder_depth": 2, "encoder_num_heads": 2,
             "encoder_global_attn_indexes": [1], "prompt_embed_dim": 64, "decoder_mlp_dim": 128,
             "decoder_num_heads": 2, "iou_head_hidden_dim": 64, "mask_in_chans": 8}

RECIPES = {
    "tiny-finers-sizes": {"spec": "tiny", "sam_image_size": 1024, "gse_size_wh": None, "lpr_size_wh": None},
    "0.5b-shaped": {"spec": "0.5b-shaped", "sam_image_size": 256, "gse_size_wh": (448, 252),
                    "lpr_size_wh": (224, 224)},
}


def main(name: str, out: str) -> None:
    recipe = RECIPES[name]
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    start = time.time()
    (root / "sam.json").write_text(json.dumps({**SAM_SMALL, "image_size": recipe["sam_image_size"]}))
    sam = make_random_sam_checkpoint(root / "sam.pth", resolve_sam_config("vit_b", root / "sam.json"), seed=0)
    gse = make_random_qwen25vl(root / "hf-gse", recipe["spec"], seed=0)
    lpr = gse if recipe["spec"] != "tiny" else make_random_qwen25vl(root / "hf-lpr", recipe["spec"], seed=1)
    export_bundle(gse, lpr, sam, root / "bundle", sam_config=root / "sam.json",
                  gse_size_wh=recipe["gse_size_wh"], lpr_size_wh=recipe["lpr_size_wh"],
                  log=lambda m: print(f"[{time.time() - start:6.0f} s] {m}", flush=True))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in RECIPES:
        sys.exit(f"usage: python bench/build_bundle.py {{{'|'.join(RECIPES)}}} OUT_DIR")
    main(sys.argv[1], sys.argv[2])
