"""Build an n-gram datastore (a suffix array over a tokenized corpus):
python scripts/build_datastore.py [--pair P] [--corpus C] [--split S] [--out DIR]

With no arguments: the standard library's train split, tokenized with the demo pair's tokenizer
(the pair is built first if missing), into checkpoints/datastores/demo/ (configs/datastore/demo.yaml).
"""

import sys
from pathlib import Path

from sprinter.config import parse_config
from sprinter.data.datastore import DatastoreConfig, build_datastore
from sprinter.errors import run_cli

DEFAULT = Path(__file__).resolve().parent.parent / "configs" / "datastore" / "demo.yaml"


def main(argv=None) -> None:
    cfg = parse_config(DatastoreConfig, argv, "Build an n-gram datastore: a suffix array over a tokenized corpus.",
                       default_config=DEFAULT)
    manifest = build_datastore(cfg)
    size = sum(f["bytes"] for f in manifest["files"].values())
    print(f"datastore {cfg.out}/: {manifest['tokens']:,} tokens from {manifest['documents']:,} documents, "
          f"{size / 2**20:.1f} MiB; built in: tokenize {manifest['seconds']['tokenize']} s, "
          f"suffix array {manifest['seconds']['suffix_array']} s")


if __name__ == "__main__":
    sys.exit(run_cli(main))
