"""One benchmark configuration in one process: a LoRA job trained by one system, timed step by step.

    python -m benchmarks.run_one --system peftloop|trainer|handloop --base DIR --dtype fp32|bf16 \
        --steps 7 --out result.json [--parity]

Every system trains the same job: the base weights in DIR, LoRA r=16 (alpha 32) on
q,k,v,o,gate,up,down, random tokens (seed 0, labels = inputs), micro-batch 4 x accumulation 2,
AdamW (torch's fused kernel) at 2e-4 with a linear schedule, clipping at 1.0. A step is timed
from the end of one optimizer step to the end of the next. The peak RSS is the process's own
(``ru_maxrss``), imports included, for every system alike.

``--parity`` changes the job for the loss-curve comparison: fp32, no dropout, the same initial
adapter for every system (PEFT's init with seed 0, non-zero B so the first steps move), no
shuffling, and every step's loss recorded.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
from pathlib import Path

import torch

SEQ_LEN, MICRO_BATCH, GRAD_ACCUM = 256, 4, 2
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR, MAX_GRAD_NORM = 2e-4, 1.0


def make_data(n_examples: int, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (n_examples, SEQ_LEN), generator=g)
    return [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]


def initial_adapter(base: Path, out: Path, dropout: float) -> Path:
    """PEFT's LoRA init (seed 0) saved once, so every system starts from the same tensors. B gets
    small random values so that the adapter matters from step 1."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(0)
    config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=TARGETS,
                             task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 1e-3)
    model.save_pretrained(out)
    return out


class StepClock:
    """Wall time of every optimizer step (end of one step to the end of the next)."""

    def __init__(self):
        self.last = time.perf_counter()
        self.times: list[float] = []

    def tick(self) -> None:
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now


# ---------------------------------------------------------------------------------------------
# The three systems


def run_peftloop(args, data, clock: StepClock, losses: list[float]):
    from peftloop.callbacks import Callback
    from peftloop.checkpoint import load_adapter
    from peftloop.config import LoraConfig, TrainConfig
    from peftloop.inject import inject_lora
    from peftloop.models import load_pretrained
    from peftloop.train import train

    model = load_pretrained(args.base, dtype=args.dtype)
    if args.adapter:
        load_adapter(model, args.adapter, is_trainable=True)
    else:
        inject_lora(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=args.dropout, target_modules=TARGETS))

    class Clock(Callback):
        def on_step_end(self, state, metrics):
            clock.tick()
            losses.append(metrics["loss"])

    config = TrainConfig(output_dir=str(args.workdir / "peftloop"), micro_batch_size=MICRO_BATCH,
                         grad_accum=GRAD_ACCUM, max_steps=args.steps, learning_rate=LR,
                         max_grad_norm=MAX_GRAD_NORM, lr_scheduler="linear", precision=args.dtype,
                         shuffle=not args.parity, progress_bar=False, log_every=10**9,
                         device="cpu" if not torch.cuda.is_available() else "auto")
    clock.last = time.perf_counter()
    train(model, data, config=config, callbacks=[Clock()])


def _peft_model(args):
    import peft
    import transformers

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(args.base, dtype=dtype)
    if args.adapter:
        return peft.PeftModel.from_pretrained(model, args.adapter, is_trainable=True)
    config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=args.dropout, target_modules=TARGETS,
                             task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def run_trainer(args, data, clock: StepClock, losses: list[float]):
    """transformers.Trainer + peft, given its best settings: base loaded in bf16 with bf16=True."""
    import transformers

    model = _peft_model(args)

    window_loss = [0.0]

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            clock.tick()
            losses.append(window_loss[0])  # the Trainer logs losses rounded to 4 digits: keep our own
            window_loss[0] = 0.0

    class Dataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return {k: torch.tensor(v) for k, v in data[i].items()}

    class Trainer(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            window_loss[0] += float((loss[0] if return_outputs else loss).detach())
            return loss

        def _get_train_sampler(self, *a, **k):
            # the parity run feeds examples in order, as peftloop's shuffle=False does
            return (torch.utils.data.SequentialSampler(self.train_dataset) if args.parity
                    else super()._get_train_sampler(*a, **k))

    targs = transformers.TrainingArguments(
        output_dir=str(args.workdir / "trainer"), use_cpu=not torch.cuda.is_available(),
        per_device_train_batch_size=MICRO_BATCH, gradient_accumulation_steps=GRAD_ACCUM, learning_rate=LR,
        max_grad_norm=MAX_GRAD_NORM, lr_scheduler_type="linear", max_steps=args.steps, logging_steps=1,
        save_strategy="no", report_to=[], bf16=args.dtype == "bf16", dataloader_num_workers=0, seed=0,
        disable_tqdm=True, optim="adamw_torch_fused", weight_decay=0.0)
    trainer = Trainer(model=model, args=targs, train_dataset=Dataset(), callbacks=[Clock()])
    clock.last = time.perf_counter()
    trainer.train()


def run_handloop(args, data, clock: StepClock, losses: list[float]):
    """A plain hand-written loop over the same peft model: token-normalised accumulation, clip, step."""
    model = _peft_model(args)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, fused=True, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (args.steps - s) / args.steps))
    order = (torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist() if not args.parity
             else list(range(len(data))))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    clock.last = time.perf_counter()
    for step in range(args.steps):
        window = [order[(step * GRAD_ACCUM + m) * MICRO_BATCH:(step * GRAD_ACCUM + m + 1) * MICRO_BATCH]
                  for m in range(GRAD_ACCUM)]
        batches = [torch.tensor([data[i]["input_ids"] for i in idx]) for idx in window]
        tokens = sum(b[:, 1:].numel() for b in batches)
        total = 0.0
        for ids in batches:
            with autocast:
                logits = model(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                     ids[:, 1:].flatten(), reduction="sum") / tokens
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
        clock.tick()


SYSTEMS = {"peftloop": run_peftloop, "trainer": run_trainer, "handloop": run_handloop}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--system", choices=sorted(SYSTEMS), required=True)
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--parity", action="store_true")
    p.add_argument("--adapter", type=Path, help="start from this PEFT adapter (the parity run)")
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.dropout = 0.0 if args.parity else 0.05
    if args.threads:
        torch.set_num_threads(args.threads)
    config = json.loads((args.base / "config.json").read_text())
    data = make_data(args.steps * MICRO_BATCH * GRAD_ACCUM, config["vocab_size"])

    clock, losses = StepClock(), []
    start = time.perf_counter()
    SYSTEMS[args.system](args, data, clock, losses)
    measured = clock.times[args.warmup:] if len(clock.times) > args.warmup else clock.times
    median = sorted(measured)[len(measured) // 2]
    result = {
        "system": args.system, "dtype": args.dtype, "steps": args.steps, "warmup": args.warmup,
        "step_times_s": clock.times, "median_step_s": median,
        "tokens_per_s": SEQ_LEN * MICRO_BATCH * GRAD_ACCUM / median,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "losses": losses, "wall_s": time.perf_counter() - start, "threads": torch.get_num_threads(),
    }
    if any(not math.isfinite(x) for x in losses):
        result["error"] = "non-finite loss"
    args.out.write_text(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
