"""Logit parity with transformers, per model family (needs the 'ref' extra).

    python benchmarks/model_parity.py

For each tiny checkpoint of tests/hf_builders.py (every family and switch peftloop supports,
random weights, biases and norms, written by transformers), the max |logit difference| between
peftloop's model and transformers' (eager attention) on the same inputs, in fp32: two rows of 12
tokens, without padding, and with the first row left-padded by 3 (compared on real tokens only).
tests/test_model_parity.py asserts < 1e-4; this prints the measured figures and writes
benchmarks/results/model_parity.md, quoted in docs/models.md.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    import torch
    import transformers

    from peftloop.models import load_pretrained
    from tests.hf_builders import FAMILIES, build_checkpoint, load_reference
    from tests.test_model_parity import inputs

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, family in enumerate(FAMILIES):
            folder = build_checkpoint(Path(tmp) / family, family, seed=i)
            ours, theirs = load_pretrained(folder), load_reference(folder)
            ids, mask, positions = inputs(ours.config.vocab_size)
            with torch.no_grad():
                plain = (ours(ids) - theirs(ids).logits).abs().max().item()
                padded = (ours(ids, attention_mask=mask, position_ids=positions)
                          - theirs(ids, attention_mask=mask, position_ids=positions).logits)[mask.bool()].abs().max().item()
                scale = theirs(ids).logits.abs().max().item()
            model_type, _, switches = FAMILIES[family]
            rows.append((family, model_type, switches, plain, padded, scale))
            print(f"{family:14s} {model_type:8s} max |diff| {plain:.2e} (left-padded {padded:.2e}), |logits| <= {scale:.1f}")
    lines = ["# Logit parity with transformers (fp32)", "",
             f"transformers {transformers.__version__}, torch {torch.__version__}; {time.strftime('%Y-%m-%d')}. "
             "Command: `python benchmarks/model_parity.py`.", "",
             "| checkpoint | model_type | switches | max abs diff | left-padded | max abs logit |",
             "|---|---|---|---:|---:|---:|"]
    for family, model_type, switches, plain, padded, scale in rows:
        shown = ", ".join(f"{k}={v}" for k, v in switches.items() if k != "rope_parameters")
        if "rope_parameters" in switches:
            shown = "llama3 rope scaling" + (", " + shown if shown else "")
        lines.append(f"| {family} | {model_type} | {shown or '-'} | {plain:.1e} | {padded:.1e} | {scale:.1f} |")
    out = ROOT / "benchmarks" / "results" / "model_parity.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
