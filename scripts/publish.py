#!/usr/bin/env python
"""Export checkpoint folders for the Hugging Face Hub, and optionally upload them.

A checkpoint folder (`checkpoints/<name>/`: config.json, model.safetensors, README.md model card) holds no code; it
loads with the Auto classes after `import hf_koopman`. The export copies it and adds the model package's modelling
files and a complete `auto_map`, so that users without hf_koopman load it with `trust_remote_code=True`
(`hf_koopman.models.publishing.export_for_hub`).

Usage:
    python scripts/publish.py checkpoints/reynet-mutag --output-dir hub/             # writes hub/reynet-mutag/
    python scripts/publish.py checkpoints/* --output-dir hub/ --push-to-hub-org ORG   # uploads ORG/<name> too

Uploading needs a Hub token (`hf auth login`) and network; without them the exported folders stay local.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="checkpoint folders (config.json + model.safetensors)")
    p.add_argument("--output-dir", required=True, help="each checkpoint is exported to OUTPUT_DIR/<folder name>/")
    p.add_argument("--push-to-hub-org", default=None, help="upload each export as ORG/<folder name>")
    p.add_argument("--overwrite", action="store_true",
                   help="clear an export folder that already holds files (everything in it would be uploaded)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    from hf_koopman.models.publishing import export_for_hub

    out_root = Path(args.output_dir)
    written, failed, refused = [], [], []
    for checkpoint in map(Path, args.checkpoints):
        name = checkpoint.resolve().name  # "." is the folder it names
        repo_id = f"{args.push_to_hub_org}/{name}" if args.push_to_hub_org else None
        try:
            folder = export_for_hub(checkpoint, out_root / name, push_to_hub=repo_id, overwrite=args.overwrite)
        except RuntimeError as err:  # the upload failed; the folder is written, the other checkpoints still run
            print(f"{checkpoint}: {err}", file=sys.stderr)
            failed.append(checkpoint)
            continue
        except (OSError, ValueError) as err:  # not a checkpoint, an export folder in the way: the message names the fix
            print(f"{checkpoint}: error: {err}", file=sys.stderr)
            refused.append(checkpoint)
            continue
        print(f"{checkpoint} -> {folder}")  # the log says whether the upload happened
        written.append(folder)
    problems = [f"{len(failed)} of {len(args.checkpoints)} uploads failed: {', '.join(map(str, failed))}"] if failed else []
    if refused:
        problems.append(f"{len(refused)} of {len(args.checkpoints)} checkpoints not exported (see above): "
                        f"{', '.join(map(str, refused))}")
    if problems:
        raise SystemExit("; ".join(problems))
    return written


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    main(sys.argv[1:])
