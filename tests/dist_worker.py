"""One training process of the distributed tests: run as
`torchrun --nproc-per-node N tests/dist_worker.py ...` (or directly, for the single-process reference run)."""

import argparse
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peftloop.callbacks import Callback  # noqa: E402
from peftloop.config import LoraConfig, TrainConfig  # noqa: E402
from peftloop.inject import inject_lora  # noqa: E402
from peftloop.train import train  # noqa: E402
from tests.helpers import StopAt, tiny_model, toy_examples  # noqa: E402


class DieAt(Callback):
    """Rank 1 is killed outright (no cleanup, no exception) when it finishes this step."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, state, metrics):
        if state.global_step == self.step and int(os.environ.get("RANK", "0")) == 1:
            os.kill(os.getpid(), signal.SIGKILL)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--output-dir", required=True)
    p.add_argument("--strategy", default="auto")
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=6)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--stop-at", type=int, default=0)
    p.add_argument("--die-at", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()

    model = tiny_model(seed=0)
    torch.manual_seed(0)
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                                  modules_to_save=["lm_head"]))
    data = toy_examples(22, seed=5)  # 22: the last global micro-batch of each epoch is ragged
    callbacks = [StopAt(args.stop_at)] if args.stop_at else []
    callbacks += [DieAt(args.die_at)] if args.die_at else []
    config = TrainConfig(output_dir=args.output_dir, strategy=args.strategy,
                         micro_batch_size=args.micro_batch_size, grad_accum=args.grad_accum,
                         max_steps=args.max_steps, save_every=args.save_every,
                         learning_rate=1e-2, warmup_steps=1, lr_scheduler="cosine", weight_decay=0.01,
                         resume_from_checkpoint=True if args.resume else None, progress_bar=False)
    result = train(model, data, data[:6], config, callbacks=callbacks)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"RESULT step={result.global_step} loss={result.train_loss:.6f} "
              f"eval={result.metrics['eval_loss']:.6f}")


if __name__ == "__main__":
    main()
