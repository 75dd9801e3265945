"""One benchmark configuration in one process: a LoRA job trained by one system, timed step by step.

    python -m benchmarks.run_one --system peftloop|trainer|handloop --base DIR --dtype fp32|bf16 \
        --steps 7 --out result.json [--parity]
    python -m benchmarks.run_one --workload chat --system peftloop_packed --base DIR --dtype bf16 \
        --examples 48 --out result.json

The synthetic job (``--workload synthetic``, the default): the base weights in DIR, LoRA r=16
(alpha 32, dropout 0.05) on q,k,v,o,gate,up,down, 256-token sequences with every token labelled
(learnable: ``benchmarks.workload.synthetic_examples``), micro-batch 4 x accumulation 2, AdamW
(torch's fused kernel) at 2e-4 with a linear schedule, clipping at 1.0, ``--steps`` steps. Systems:
peftloop, the Trainer + peft, a plain loop over the peft model.

The realistic workload (``--workload chat``): the same LoRA job for one epoch over ``--examples``
instruction records of ``benchmarks.workload.chat_examples`` (realistic lengths, prompts masked),
8 examples per optimizer step (micro-batch 4 x accumulation 2), through each system's real data path:

- ``peftloop_packed``: ``peftloop.records.pack`` (position ids restart per example) into rows of
  the fewest tokens (at least ``--max-seq-len``) that give no more rows than the padded runs have
  micro-batches, one row per micro-batch x 2: about 4 examples a row, the padded runs' number of
  steps (the row length and examples per step are reported);
- ``peftloop_padded``: peftloop's padded micro-batches with ``group_by_length`` (its best padded setting);
- ``trainer_padded``: the Trainer with a collator padding to the longest in the batch (labels -100);
- ``trainer_grouped``: the same with ``train_sampling_strategy="group_by_length"`` (``group_by_length=True``
  before transformers 5);
- ``trainer_flattening``: ``transformers.DataCollatorWithFlattening`` (padding-free: one row per
  micro-batch, position ids restarting per example).

A step is timed from the end of one optimizer step to the end of the next (the first from the
call that starts training). The peak RSS is the process's own (``ru_maxrss``), imports included,
for every system alike.

``--parity`` changes the synthetic job for the loss-curve comparison: fp32, no dropout, the same
initial adapter for every system (PEFT's init with seed 0, non-zero B so the first steps move), no
shuffling, and every step's loss recorded.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
from functools import partial
from pathlib import Path

import torch

from benchmarks.workload import chat_examples, length_stats, synthetic_examples

SEQ_LEN, MICRO_BATCH, GRAD_ACCUM = 256, 4, 2
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR, MAX_GRAD_NORM = 2e-4, 1.0
PAD_ID = 0


def make_data(n_examples: int, vocab: int) -> list[dict]:
    """The synthetic job's sequences: SEQ_LEN tokens, all labelled, learnable (seed 0)."""
    return synthetic_examples(n_examples, SEQ_LEN, vocab, seed=0)


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
        self.label_tokens_seen: list[int] = []  # after each step, where the system reports it

    def tick(self) -> None:
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now


# ---------------------------------------------------------------------------------------------
# The three systems


def run_peftloop(args, data, clock: StepClock, losses: list[float], *, packed: bool = False,
                 grouped: bool = False, counter: list[int] | None = None):
    """peftloop's own loop. The chat workload goes through its real data path: ``pack`` (rows of
    max_seq_len tokens, one per micro-batch) or padded micro-batches grouped by length."""
    from peftloop.callbacks import Callback
    from peftloop.checkpoint import load_adapter
    from peftloop.config import LoraConfig, TrainConfig
    from peftloop.data import SFTDataset, collate
    from peftloop.inject import inject_lora
    from peftloop.models import load_pretrained
    from peftloop.records import pack
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
            clock.label_tokens_seen.append(state.tokens_seen)

    def counting_collate(examples):
        batch = collate(examples, pad_id=PAD_ID)
        if counter is not None:
            counter[0] += batch["input_ids"].numel()  # tokens computed on, padding included
        return batch

    if packed:  # rows of ~MICRO_BATCH examples, so that a step holds as many examples as a padded one
        data = list(pack(data, packed_row_tokens(data, args.max_seq_len)))
    dataset = SFTDataset(data, group_by_length=grouped)
    one_epoch = args.workload == "chat"
    config = TrainConfig(output_dir=str(args.workdir / "peftloop"), grad_accum=GRAD_ACCUM,
                         micro_batch_size=1 if packed else MICRO_BATCH,  # a packed row holds ~4 examples
                         max_steps=0 if one_epoch else args.steps, num_epochs=1, learning_rate=LR,
                         max_grad_norm=MAX_GRAD_NORM, lr_scheduler="linear", precision=args.dtype,
                         shuffle=not args.parity, progress_bar=False, log_every=10**9,
                         device="cpu" if not torch.cuda.is_available() else "auto")
    clock.last = time.perf_counter()
    train(model, dataset, config=config, callbacks=[Clock()], collate_fn=counting_collate)


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


def packed_row_tokens(data: list[dict], max_seq_len: int) -> int:
    """peftloop's packed row length here: the shortest (from max_seq_len, the longest example, up)
    that packs the examples into no more rows than the padded runs have micro-batches, so that a
    step holds as many examples as theirs on average (and the epoch as many steps)."""
    from peftloop.records import pack

    rows_wanted = math.ceil(len(data) / MICRO_BATCH)
    budget = max(max_seq_len, math.ceil(sum(len(e["input_ids"]) for e in data) / rows_wanted))
    while sum(1 for _ in pack(data, budget)) > rows_wanted:
        budget = math.ceil(budget * 1.02)
    return budget


def pad_to_longest(features: list[dict]) -> dict[str, torch.Tensor]:
    """The Trainer's usual padding collator (``DataCollatorForSeq2Seq`` without a tokenizer): pad on
    the right to the longest example of the batch, input_ids with PAD_ID, labels with -100."""
    longest = max(len(f["input_ids"]) for f in features)
    batch = {"input_ids": torch.full((len(features), longest), PAD_ID, dtype=torch.long),
             "labels": torch.full((len(features), longest), -100, dtype=torch.long),
             "attention_mask": torch.zeros((len(features), longest), dtype=torch.long)}
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        batch["input_ids"][i, :n] = torch.as_tensor(f["input_ids"])
        batch["labels"][i, :n] = torch.as_tensor(f["labels"])
        batch["attention_mask"][i, :n] = 1
    return batch


def run_trainer(args, data, clock: StepClock, losses: list[float], *, collator=None,
                sampling: str = "random", counter: list[int] | None = None):
    """transformers.Trainer + peft, given its best settings: base loaded in bf16 with bf16=True.
    ``collator``: None for the synthetic job (all sequences one length), else the chat workload's;
    ``sampling``: the Trainer's train_sampling_strategy ("group_by_length" groups by length)."""
    import transformers

    # padding-free: one row per micro-batch, position ids restart per example; transformers then masks
    # attention block-diagonally (sdpa too) when there is no KV cache, as under the Trainer (use_cache=False)
    if collator == "flattening":
        collator = transformers.DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    model = _peft_model(args)

    window_loss, window_labels = [0.0], [0]

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            clock.tick()
            losses.append(window_loss[0])  # the Trainer logs losses rounded to 4 digits: keep our own
            clock.label_tokens_seen.append(window_labels[0] + (clock.label_tokens_seen or [0])[-1])
            window_loss[0], window_labels[0] = 0.0, 0

    class Dataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return {k: torch.tensor(v) for k, v in data[i].items()}

    class Trainer(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if counter is not None:
                counter[0] += inputs["input_ids"].numel()  # tokens computed on, padding included
            window_labels[0] += int((inputs["labels"][..., 1:] != -100).sum())
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            window_loss[0] += float((loss[0] if return_outputs else loss).detach())
            return loss

        def _get_train_sampler(self, *a, **k):
            # the parity run feeds examples in order, as peftloop's shuffle=False does
            return (torch.utils.data.SequentialSampler(self.train_dataset) if args.parity
                    else super()._get_train_sampler(*a, **k))

    schedule = {"max_steps": args.steps} if args.workload == "synthetic" else {"num_train_epochs": 1}
    targs = transformers.TrainingArguments(
        output_dir=str(args.workdir / "trainer"), use_cpu=not torch.cuda.is_available(),
        per_device_train_batch_size=MICRO_BATCH, gradient_accumulation_steps=GRAD_ACCUM, learning_rate=LR,
        max_grad_norm=MAX_GRAD_NORM, lr_scheduler_type="linear", logging_steps=1, **schedule,
        save_strategy="no", report_to=[], bf16=args.dtype == "bf16", dataloader_num_workers=0, seed=0,
        disable_tqdm=True, optim="adamw_torch_fused", weight_decay=0.0, train_sampling_strategy=sampling)
    trainer = Trainer(model=model, args=targs, train_dataset=Dataset(), callbacks=[Clock()],
                      data_collator=collator)
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
CHAT_SYSTEMS = {
    "peftloop_packed": partial(run_peftloop, packed=True),
    "peftloop_padded": partial(run_peftloop, grouped=True),
    "trainer_padded": partial(run_trainer, collator=pad_to_longest),
    "trainer_grouped": partial(run_trainer, collator=pad_to_longest, sampling="group_by_length"),
    "trainer_flattening": partial(run_trainer, collator="flattening"),
}


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def run_synthetic(args, vocab: int) -> dict:
    data = make_data(args.steps * MICRO_BATCH * GRAD_ACCUM, vocab)
    clock, losses = StepClock(), []
    SYSTEMS[args.system](args, data, clock, losses)
    measured = clock.times[args.warmup:] if len(clock.times) > args.warmup else clock.times
    step = median(measured)
    return {"steps": args.steps, "step_times_s": clock.times, "median_step_s": step,
            "tokens_per_s": SEQ_LEN * MICRO_BATCH * GRAD_ACCUM / step, "losses": losses}


def run_chat(args, vocab: int) -> dict:
    """One epoch over the chat examples; throughput = the epoch's tokens / the epoch's time."""
    data = chat_examples(args.examples, vocab, args.max_seq_len, seed=0)
    stats = length_stats(data)
    clock, losses, counter = StepClock(), [], [0]
    CHAT_SYSTEMS[args.system](args, data, clock, losses, counter=counter)
    epoch = sum(clock.times)
    measured = clock.times[args.warmup:] if len(clock.times) > args.warmup else clock.times
    return {"workload": "chat", "examples": stats["examples"], "steps": len(clock.times),
            "examples_per_step": stats["examples"] / max(len(clock.times), 1),
            "step_times_s": clock.times, "median_step_s": median(measured), "epoch_s": epoch,
            "label_tokens": stats["label_tokens"], "real_tokens": stats["tokens"],
            "processed_tokens": counter[0],
            "label_tokens_per_s": stats["label_tokens"] / epoch, "real_tokens_per_s": stats["tokens"] / epoch,
            "losses": losses, "label_tokens_seen": clock.label_tokens_seen, "max_seq_len": args.max_seq_len,
            "packed_row_tokens": packed_row_tokens(data, args.max_seq_len)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--system", choices=sorted(SYSTEMS) + sorted(CHAT_SYSTEMS), required=True)
    p.add_argument("--workload", choices=["synthetic", "chat"], default="synthetic")
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--steps", type=int, default=7, help="synthetic: optimizer steps")
    p.add_argument("--examples", type=int, default=48, help="chat: examples in the epoch")
    p.add_argument("--max-seq-len", type=int, default=1024, help="chat: length cap and packed row length")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--parity", action="store_true")
    p.add_argument("--adapter", type=Path, help="start from this PEFT adapter (the parity run)")
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    systems = SYSTEMS if args.workload == "synthetic" else CHAT_SYSTEMS
    if args.system not in systems:
        p.error(f"--system {args.system} is not a {args.workload} system: {', '.join(systems)}")
    if args.parity and args.workload != "synthetic":
        p.error("--parity runs the synthetic job")
    args.dropout = 0.0 if args.parity else 0.05
    if args.threads:
        torch.set_num_threads(args.threads)
    vocab = json.loads((args.base / "config.json").read_text())["vocab_size"]

    start = time.perf_counter()
    result = run_synthetic(args, vocab) if args.workload == "synthetic" else run_chat(args, vocab)
    result.update({
        "system": args.system, "dtype": args.dtype, "warmup": args.warmup,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "wall_s": time.perf_counter() - start, "threads": torch.get_num_threads(),
    })
    if any(not math.isfinite(x) for x in result["losses"]):
        result["error"] = "non-finite loss"
    args.out.write_text(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
