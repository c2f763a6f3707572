"""Build the built-in default model: stories260K exported to ONNX, inside the package.

    python scripts/build_default_model.py [--checkpoint ../shared/models/stories260K]

Writes maxact/data/stories260K/ (model.onnx, tokenizer files, NOTICE). Needs the export extra.
"""

import argparse
import shutil
import tempfile
from pathlib import Path

from maxact.exporters.hf import export_checkpoint

HERE = Path(__file__).resolve().parent.parent
DEST = HERE / "maxact" / "data" / "stories260K"
KEEP = ("model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=str(HERE.parent / "shared" / "models" / "stories260K"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        export_checkpoint(args.checkpoint, tmp)
        DEST.mkdir(parents=True, exist_ok=True)
        for name in KEEP:
            shutil.copyfile(Path(tmp) / name, DEST / name)
    shutil.copyfile(Path(args.checkpoint) / "PROVENANCE.md", DEST / "NOTICE")
    print(f"wrote {DEST}")


if __name__ == "__main__":
    main()
