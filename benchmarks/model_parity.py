"""Logit parity with transformers, per model family (needs the 'ref' extra).

    python -m benchmarks.model_parity

For each tiny checkpoint of tests/hf_builders.py (every family and switch peftloop supports,
random weights, biases and norms, written by transformers), the max |logit difference| between
peftloop's model and transformers' (eager attention) on the same inputs, in fp32: two rows of 12
tokens, without padding, and with the first row left-padded by 3 (compared on real tokens only).
tests/test_model_parity.py asserts < 1e-4; this prints the measured figures and writes
benchmarks/results/model_parity-<machine>-<date>.{json,md}, quoted in docs/models.md.
Run it from the repository root (it imports the builders from tests/).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchmarks.common import markdown_table, write_results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args()

    import torch

    from peftloop.models import load_pretrained
    from tests.hf_builders import FAMILIES, build_checkpoint, load_reference
    from tests.test_model_parity import inputs

    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, family in enumerate(FAMILIES):
            folder = build_checkpoint(Path(tmp) / family, family, seed=i)
            ours, theirs = load_pretrained(folder), load_reference(folder)
            ids, mask, positions = inputs(ours.config.vocab_size)
            with torch.no_grad():
                plain = (ours(ids) - theirs(ids).logits).abs().max().item()
                padded = ((ours(ids, attention_mask=mask, position_ids=positions)
                           - theirs(ids, attention_mask=mask, position_ids=positions).logits)[mask.bool()]
                          .abs().max().item())
                scale = theirs(ids).logits.abs().max().item()
            model_type, _, switches = FAMILIES[family]
            records.append({"checkpoint": family, "model_type": model_type, "switches": switches,
                            "max_abs_diff": plain, "left_padded_max_abs_diff": padded,
                            "max_abs_logit": scale})
            print(f"{family:14s} {model_type:8s} max |diff| {plain:.2e} (left-padded {padded:.2e}), "
                  f"|logits| <= {scale:.1f}")
    if args.no_save:
        return 0

    rows = []
    for r in records:
        shown = ", ".join(f"{k}={v}" for k, v in r["switches"].items() if k != "rope_parameters")
        if "rope_parameters" in r["switches"]:
            shown = "llama3 rope scaling" + (", " + shown if shown else "")
        rows.append((r["checkpoint"], r["model_type"], shown or "-", f"{r['max_abs_diff']:.1e}",
                     f"{r['left_padded_max_abs_diff']:.1e}", f"{r['max_abs_logit']:.1f}"))
    body = markdown_table(["checkpoint", "model_type", "switches", "max abs diff", "left-padded",
                           "max abs logit"], rows, align="lllrrr")
    write_results("model_parity", records, title="Logit parity with transformers (fp32)", body=body,
                  libraries=("transformers", "torch"),
                  meta={"method": "max |logit difference|, peftloop vs transformers (eager attention), fp32, "
                                  "2 x 12 tokens, unpadded and with the first row left-padded by 3"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
