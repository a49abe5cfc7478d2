#!/usr/bin/env python3
"""The public-domain texts of tests/fixtures/perplexity: the King James Version of Genesis
(the perplexity text, 50k SmolLM2 tokens) and of Exodus 1-20 (calibration text for Wanda
pruning), from Debian's bible-kjv-text 4.38 through its `bible` program:

    apt-get install bible-kjv bible-kjv-text && python3 tests/gen/kjv_texts.py

Verse references are dropped; each chapter starts with a "CHAPTER n" line."""
import os
import re
import subprocess

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "perplexity")


def book(title, ref, prefix, path):
    raw = subprocess.run(["bible", "-f", ref], capture_output=True, text=True, check=True).stdout
    out, chap = [title, ""], None
    for line in raw.splitlines():
        m = re.match(prefix + r"(\d+):(\d+) (.*)", line)
        if not m:
            raise SystemExit(f"unexpected line: {line!r}")
        c = int(m.group(1))
        if c != chap:
            if chap is not None:
                out.append("")
            out += [f"CHAPTER {c}", ""]
            chap = c
        out.append(m.group(3).strip())
    with open(os.path.join(OUT, path), "w") as f:
        f.write("\n".join(out) + "\n")


book("THE FIRST BOOK OF MOSES, CALLED GENESIS", "Ge1:1-50:26", "Ge", "kjv-genesis.txt")
book("THE SECOND BOOK OF MOSES, CALLED EXODUS", "Ex1:1-20:26", "Exo?", "kjv-exodus-1-20.txt")
