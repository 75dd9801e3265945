"""Gradient checkpointing per decoder layer: the same loss and gradients as without it, with a
frozen base and frozen embeddings, plain or offloaded, LoRA, DoRA and QLoRA; less kept in memory."""

import pytest
import torch

from peftloop.config import ConfigError, LoraConfig, ModelConfig, TrainConfig
from peftloop.inject import inject_lora
from peftloop.models import enable_gradient_checkpointing
from peftloop.models.checkpointing import OffloadedCheckpoint
from peftloop.nf4 import quantize_model
from peftloop.train import train
from tests.helpers import tiny_model, toy_examples

TOKENS = torch.randint(3, 61, (3, 11), generator=torch.Generator().manual_seed(0))
LABELS = TOKENS.clone()
LABELS[:, :4] = -100

VARIANTS = {
    "lora_dropout": dict(lora=dict(lora_dropout=0.2)),
    "dora_dropout": dict(lora=dict(use_dora=True, lora_dropout=0.2)),
    "qlora": dict(lora=dict(lora_dropout=0.1), quantize=True),
    "lm_head_trained": dict(lora=dict(modules_to_save=["lm_head"])),
}


def _model(variant: dict):
    model = tiny_model(seed=3)
    if variant.get("quantize"):
        quantize_model(model)
    torch.manual_seed(4)
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                                  **variant["lora"]))
    assert not model.model.embed_tokens.weight.requires_grad  # the input of layer 0 needs no grad
    return model.train()


def _loss_and_grads(model, seed=11):
    torch.manual_seed(seed)  # the dropout masks
    loss = model(TOKENS, labels=LABELS)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
@pytest.mark.parametrize("offload", [False, True], ids=["checkpoint", "offload"])
def test_checkpointing_gives_identical_gradients(variant, offload):
    plain_loss, plain = _loss_and_grads(_model(VARIANTS[variant]))
    model = enable_gradient_checkpointing(_model(VARIANTS[variant]), offload=offload)
    assert model.is_gradient_checkpointing and model.model.offload_activations == offload
    loss, checkpointed = _loss_and_grads(model)
    assert torch.equal(loss, plain_loss)
    assert checkpointed.keys() == plain.keys() and len(plain) > 0
    for name, grad in plain.items():
        assert torch.equal(checkpointed[name], grad), name  # the same ops on the same values, replayed


def _saved_bytes(model) -> int:
    """Bytes autograd keeps for the backward pass (outside checkpointed regions, which keep theirs
    by recomputation)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(TOKENS, labels=LABELS)
    return total


@pytest.mark.parametrize("offload", [False, True], ids=["checkpoint", "offload"])
def test_checkpointing_keeps_far_less_for_the_backward_pass(offload):
    model = _model(VARIANTS["lora_dropout"])
    without = _saved_bytes(model)
    enable_gradient_checkpointing(model, offload=offload)
    with_checkpointing = _saved_bytes(model)
    assert with_checkpointing < 0.25 * without, (with_checkpointing, without)


def test_no_checkpointing_in_eval_or_without_grad():
    model = enable_gradient_checkpointing(_model(VARIANTS["lora_dropout"]))
    calls = []
    original = torch.utils.checkpoint.checkpoint
    torch.utils.checkpoint.checkpoint = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        with torch.no_grad():
            model(TOKENS)
        model.eval()
        model(TOKENS)
        assert not calls
        model.train()
        model(TOKENS)
        assert len(calls) == model.config.num_hidden_layers
    finally:
        torch.utils.checkpoint.checkpoint = original
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing


def test_offloaded_checkpoint_returns_parameter_gradients_without_an_input_gradient():
    layer = torch.nn.Linear(5, 3)
    x = torch.randn(4, 5)  # no grad: a frozen embedding's output
    y = OffloadedCheckpoint.apply(layer, x, *layer.parameters())
    assert y.requires_grad
    y.sum().backward()
    torch.testing.assert_close(layer.weight.grad, torch.ones(3, 1) * x.sum(0))
    torch.testing.assert_close(layer.bias.grad, torch.full((3,), 4.0))


def test_the_loop_trains_the_same_with_checkpointing(tmp_path):
    """Two optimizer steps through train() with and without checkpointing: the same adapter, bit for bit."""
    data = toy_examples(16, seed=5)
    config = dict(max_steps=2, micro_batch_size=4, grad_accum=2, learning_rate=1e-2, progress_bar=False,
                  log_every=1)
    results = []
    for checkpointing in (False, True):
        model = _model(VARIANTS["lora_dropout"])
        if checkpointing:
            enable_gradient_checkpointing(model)
        config["output_dir"] = str(tmp_path / str(checkpointing))
        result = train(model, data, config=TrainConfig(**config))
        results.append((result.train_loss, {n: p.detach().clone() for n, p in model.named_parameters()
                                            if p.requires_grad}))
    (loss_a, params_a), (loss_b, params_b) = results
    assert loss_a == loss_b
    for name, value in params_a.items():
        assert torch.equal(value, params_b[name]), name


def test_transformers_models_use_their_own_non_reentrant_switch():
    transformers = pytest.importorskip("transformers",
                                       reason="the 'ref' extra (transformers) is not installed")
    config = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    inject_lora(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.train()
    lora_A = model.model.layers[0].self_attn.q_proj.lora_A.weight
    expected = torch.autograd.grad(model(TOKENS).logits.sum(), lora_A)
    enable_gradient_checkpointing(model)
    assert model.is_gradient_checkpointing
    got = torch.autograd.grad(model(TOKENS).logits.sum(), lora_A)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="offload=True needs a peftloop model"):
        enable_gradient_checkpointing(model, offload=True)


def test_offload_without_checkpointing_is_a_config_error():
    with pytest.raises(ConfigError, match="needs model.gradient_checkpointing"):
        ModelConfig(name_or_path="x", offload_activations=True)
