"""Build the bundled Amazon sample (lib/profilerec/sample_data/amazon-industrial-sample).

    python scripts/make_sample.py [--source ../shared/data/amazon-industrial] [--users 300]

Keeps a deterministic set of users (first in stable-hash order) with ALL their rows in all three
splits, and only the items those rows reference, in the same folder format, so the Amazon
adapter reads it unchanged. The result is checked by loading it with that adapter.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

from profilerec.data.datasets.amazon import load
from profilerec.data.datasets.common import sample_user_ids

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SOURCE = os.path.join(HERE, "..", "..", "shared", "data", "amazon-industrial")
DEFAULT_TARGET = os.path.join(HERE, "..", "lib", "profilerec", "sample_data", "amazon-industrial-sample")
SPLITS = ("train", "valid", "test")


def read_rows(path: str) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--source", default=DEFAULT_SOURCE)
    parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--users", type=int, default=250)  # ~1 MB with descriptions kept
    args = parser.parse_args()

    rows = {split: read_rows(os.path.join(args.source, f"{split}.csv")) for split in SPLITS}
    users = sample_user_ids((r["user_id"] for split in SPLITS for r in rows[split]), args.users)
    kept = {split: [r for r in rows[split] if r["user_id"] in users] for split in SPLITS}
    referenced = {i for split in SPLITS for r in kept[split] for i in r["history"].split() + [r["item_id"]]}

    os.makedirs(args.target, exist_ok=True)
    for split in SPLITS:
        with open(os.path.join(args.target, f"{split}.csv"), "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["user_id", "history", "item_id"], lineterminator="\n")
            writer.writeheader()
            writer.writerows(kept[split])
    n_items = 0
    with open(os.path.join(args.source, "items.jsonl"), encoding="utf-8") as src, \
            open(os.path.join(args.target, "items.jsonl"), "w", encoding="utf-8") as dst:
        for line in src:
            if line.strip() and str(json.loads(line)["item_id"]) in referenced:
                dst.write(line if line.endswith("\n") else line + "\n")
                n_items += 1

    data = load(args.target)  # the sample must read back exactly, with no invalid rows
    size = sum(os.path.getsize(os.path.join(args.target, f)) for f in os.listdir(args.target))
    counts = {split: len(kept[split]) for split in SPLITS}
    assert data.split_counts() == counts, (data.split_counts(), counts)
    assert data.items.num_rows == n_items == len(referenced) and data.invalid.total == 0
    print(f"{len(users)} users, {n_items} items, rows {counts}, {data.events.num_rows} events, "
          f"{size / 1e6:.2f} MB in {os.path.normpath(args.target)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
