"""End to end: one forward + backward of a LoRA-injected Llama with the kernels (interpreted
on a CPU) equals the same step with every op on its plain-torch reference.

The model calls ``rms_norm``, ``apply_rope``, ``swiglu`` and ``linear_cross_entropy``; every
LoRA layer calls ``lora_linear``. Under ``backend("triton")`` all of them run the Triton
kernels, under ``backend("reference")`` the references, with no change to the model.
"""

import pytest
import torch
from kernel_utils import DEVICE, IMPLS, run
from tolerances import assert_close, assert_no_less_accurate

from peftloop.config import LoraConfig
from peftloop.inject import inject_lora
from peftloop.models.llama import LlamaConfig, LlamaForCausalLM

VOCAB, BATCH, SEQ = 67, 2, 6


def _model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", modules_to_save=["lm_head"])
    inject_lora(model, config)
    with torch.no_grad():  # B starts at zero; make the adapters non-trivial so dA is non-zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    return model.to(DEVICE)


def _batch():
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = input_ids.clone()
    labels[0, :2] = -100  # a masked prompt
    labels[1, -1] = -100
    return input_ids.to(DEVICE), labels.to(DEVICE)


def _step(impl, autocast_dtype=None):
    model = _model()
    input_ids, labels = _batch()
    enabled = autocast_dtype is not None
    with torch.autocast(DEVICE.type, dtype=autocast_dtype or torch.float32, enabled=enabled):
        loss = run(impl, model, input_ids, labels=labels)
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return loss, dict(zip(names, grads))


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
def test_model_step_with_kernels_equals_reference_step(impl):
    loss, grads = _step(impl)
    ref_loss, ref_grads = _step("reference")
    assert grads.keys() == ref_grads.keys()
    assert any("lora_A" in n for n in grads) and any("lm_head" in n for n in grads)
    assert_close(loss, ref_loss, torch.float32, "loss")
    for name, g in grads.items():
        assert g.abs().sum() > 0, f"{name}: zero gradient"
        assert_close(g, ref_grads[name], torch.float32, f"d {name}")


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
def test_model_step_under_bf16_autocast(impl):
    """Under bf16 autocast every op casts like the plain torch op would. Through the layer
    the bf16 rounding compounds, so the gradients are held to the reference's own bf16 error
    against the fp32 step (tolerances.assert_no_less_accurate); the loss, an fp32 sum over
    bf16 logits, to the bf16 entry of the table."""
    loss, grads = _step(impl, torch.bfloat16)
    ref_loss, ref_grads = _step("reference", torch.bfloat16)
    _, exact_grads = _step("reference")
    assert_close(loss, ref_loss, torch.bfloat16, "loss")
    for name, g in grads.items():
        assert g.dtype == torch.float32  # trainable parameters stay fp32
        assert_no_less_accurate(g, ref_grads[name], exact_grads[name], f"d {name}")
