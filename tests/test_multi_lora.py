"""The multi-adapter layer (peftloop.multi_lora), inject_many and the per-adapter adapter format.

The yardstick everywhere is K single-adapter models: adapter k of a multi-adapter layer or model,
on the rows routed to it, must compute what a ``LoRALinear`` (a model from ``inject_lora``)
holding adapter k computes on those rows alone, forward and every gradient, dropout included
(drawn from adapter k's own RNG state exactly as the single model draws from the global one)."""

from __future__ import annotations

import copy

import pytest
import torch

from peftloop.adapter_format import (
    adapter_parameters_of,
    adapter_state_dict,
    adapter_state_dict_of,
    load_adapter_state_dict_of,
)
from peftloop.checkpoint import load_adapter, write_adapter
from peftloop.config import LoraConfig
from peftloop.inject import inject_lora, inject_many
from peftloop.kernels import backend, triton_available
from peftloop.kernels._dispatch import interpreting
from peftloop.lora import LoRALinear
from peftloop.models import enable_gradient_checkpointing
from peftloop.multi_lora import (
    AdapterSpec,
    LoRAAdapter,
    MultiLoRALinear,
    RowRouting,
    multi_lora_layers,
    set_routing,
)
from peftloop.nf4 import NF4Linear, quantize_model
from peftloop.train import seed_everything
from tests.helpers import TOKENS, tiny_model
from tests.helpers import base_dir as base_dir  # fixture

needs_triton = pytest.mark.skipif(not (triton_available() and (torch.cuda.is_available() or interpreting())),
                                  reason="no Triton")
SPECS = [AdapterSpec(3, 6.0, 0.3), AdapterSpec(5, 4.0, 0.1, use_rslora=True), AdapterSpec(1, 2.0, 0.5)]
SEGMENTS = [(1, 0, 3), (0, 3, 5), (2, 6, 9)]  # row 5 belongs to no adapter
SEEDS = [11, 12, 13]
CONFIGS = [
    LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules="all-linear", init_lora_weights=False),
    LoraConfig(r=2, lora_alpha=3, lora_dropout=0.0, use_rslora=True, target_modules="all-linear",
               init_lora_weights=False, rank_pattern={"v_proj": 3}),
    LoraConfig(r=6, lora_alpha=6, lora_dropout=0.4, target_modules="all-linear", init_lora_weights=False,
               alpha_pattern={"o_proj": 2.0}),
]


# The fused batch and a single adapter's rows go through the same formulas, but the model's
# matmuls (the base GEMM, attention) run over 6 rows instead of 1-2, so BLAS blocks and sums them
# in another order: fp32 rounding differences of ~1e-7 relative, compounded over two layers and
# their backward pass. Measured: at most 1.8e-6 of a tensor's largest element; 1e-5 leaves ~5x
# headroom, far below the O(1) error of a wrong mask, scaling or owner.
MODEL_RTOL = 1e-5


def assert_close_at_scale(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= MODEL_RTOL * max(scale, 1e-12), f"{what}: error {err:.3g} at scale {scale:.3g}"


def _states(seeds):
    return {k: torch.Generator().manual_seed(s).get_state() for k, s in enumerate(seeds)}


def _layer_and_singles(base, specs=SPECS, seeds=SEEDS):
    """A MultiLoRALinear on ``base`` and, per adapter, a LoRALinear on a copy of it holding the same
    (random, non-identity) A and B."""
    adapters, singles = [], []
    for spec, seed in zip(specs, seeds):
        torch.manual_seed(seed)
        adapters.append(LoRAAdapter(base.in_features, base.out_features, spec, init_lora_weights=False))
        torch.manual_seed(seed)
        singles.append(LoRALinear(copy.deepcopy(base), spec.r, spec.lora_alpha, spec.lora_dropout,
                                  spec.use_rslora, init_lora_weights=False))
    return MultiLoRALinear(base, adapters), singles


# ---------------------------------------------------------------------------------------------
# The layer


@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_an_adapter_is_drawn_as_a_lora_linear_draws_its_factors(init):
    base = torch.nn.Linear(13, 7)
    for spec in SPECS:
        torch.manual_seed(5)
        adapter = LoRAAdapter(13, 7, spec, init_lora_weights=init)
        after = torch.get_rng_state()
        torch.manual_seed(5)
        single = LoRALinear(copy.deepcopy(base), spec.r, spec.lora_alpha, spec.lora_dropout, spec.use_rslora,
                            init_lora_weights=init)
        assert torch.equal(adapter.lora_A.weight, single.lora_A.weight)
        assert torch.equal(adapter.lora_B.weight, single.lora_B.weight)
        assert adapter.scaling == single.scaling
        assert torch.equal(after, torch.get_rng_state())


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("quantized", [False, True], ids=["plain", "nf4"])
def test_routed_rows_with_dropout_equal_three_lora_linears_on_their_rows(quantized, impl):
    """K = 3, dropout on, rng_states from three seeds: each segment's outputs and gradients equal
    a LoRALinear's on those rows with the global RNG seeded the same way; the states advance as
    the global one does; the row in no segment gets the base alone. On the kernels (interpreted
    on a CPU) the single layers draw a seed where the torch path draws a mask: the same holds."""
    base = torch.nn.Linear(32, 24)
    if quantized:
        base = NF4Linear.from_linear(base)
    layer, singles = _layer_and_singles(base)
    layer.train()
    x = torch.randn(9, 4, 32, requires_grad=True)
    states = _states([7, 8, 9])
    set_routing(layer, RowRouting(SEGMENTS, states))
    with backend(impl):
        y = layer(x)
        g = torch.randn_like(y)
        y.backward(g)
    for k, start, end in SEGMENTS:
        x_k = x.detach()[start:end].clone().requires_grad_()
        torch.manual_seed(7 + k)
        with backend(impl):
            y_k = singles[k].train()(x_k)
            y_k.backward(g[start:end])
        assert torch.equal(states[k], torch.get_rng_state()), f"adapter {k}'s RNG state"
        torch.testing.assert_close(y[start:end], y_k, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(x.grad[start:end], x_k.grad, rtol=1e-6, atol=1e-6)
        for name in ("lora_A", "lora_B"):
            mine = getattr(layer.adapters[k], name).weight.grad
            torch.testing.assert_close(mine, getattr(singles[k], name).weight.grad, rtol=1e-6, atol=1e-6)
            assert mine.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(y[5], base(x[5]), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(x.grad[5], g[5] @ (base.dequantize() if quantized else base.weight),
                                   rtol=1e-6, atol=1e-6)
    assert all(p.grad is None for p in base.parameters())


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_lengths_draw_each_segments_dropout_for_its_unpadded_rows(impl):
    """Rows right-padded along dim 1 to one length (train_many's fused batch), with
    ``RowRouting.lengths``: on its first lengths[k] positions, segment k's outputs and gradients
    equal a LoRALinear's on the unpadded rows x[start:end, :lengths[k]] with the global RNG seeded
    as adapter k's state (the same mask: the torch path's, or on the kernels the single op's seed
    as a stored mask; adapter 1 is not trimmed and keeps the seed path), the states advance as the
    global one does, and the pad positions are all kept (scaled by 1/(1-p)). The upstream gradient
    is zero at the pads, as in a model, where nothing reads a pad's output (tests/test_train_many.py)."""
    base = torch.nn.Linear(32, 24)
    layer, singles = _layer_and_singles(base)
    layer.train()
    x = torch.randn(9, 6, 32, requires_grad=True)
    lengths = {0: 4, 1: 6, 2: 1}
    g = torch.randn(9, 6, 24)
    for k, start, end in SEGMENTS:
        g[start:end, lengths[k]:] = 0.0
    states = _states([7, 8, 9])
    set_routing(layer, RowRouting(SEGMENTS, states, lengths))
    with backend(impl):
        y = layer(x)
        y.backward(g)
    for k, start, end in SEGMENTS:
        n = lengths[k]
        x_k = x.detach()[start:end, :n].clone().requires_grad_()
        torch.manual_seed(7 + k)
        with backend(impl):
            y_k = singles[k].train()(x_k)
            y_k.backward(g[start:end, :n])
        assert torch.equal(states[k], torch.get_rng_state()), f"adapter {k}'s RNG state"
        torch.testing.assert_close(y[start:end, :n], y_k, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(x.grad[start:end, :n], x_k.grad, rtol=1e-6, atol=1e-6)
        for name in ("lora_A", "lora_B"):
            mine = getattr(layer.adapters[k], name).weight.grad
            torch.testing.assert_close(mine, getattr(singles[k], name).weight.grad, rtol=1e-6, atol=1e-6)
        with torch.no_grad(), backend(impl):  # every element kept, scaled by 1/(1-p) as kept ones are
            pads = x[start:end, n:]
            kept = base(pads) + (singles[k].eval()(pads) - base(pads)) / (1.0 - SPECS[k].lora_dropout)
        torch.testing.assert_close(y[start:end, n:], kept, rtol=1e-5, atol=1e-5)


def test_lengths_do_not_trim_a_2d_input_and_must_fit():
    """A 2-D input has no sequence dim: lengths leave its draws as they are. A length longer than
    dim 1 is refused."""
    layer, _ = _layer_and_singles(torch.nn.Linear(8, 6))
    layer.train()
    x = torch.randn(9, 8)
    outputs = []
    for lengths in (None, {0: 0, 1: 1, 2: 5}):
        set_routing(layer, RowRouting(SEGMENTS, _states([1, 2, 3]), lengths))
        outputs.append(layer(x))
    assert torch.equal(outputs[0], outputs[1])
    set_routing(layer, RowRouting(SEGMENTS, _states([1, 2, 3]), {2: 4}))
    with pytest.raises(ValueError, match=r"lengths\[2\]=4 is not within x's dim 1 \(3\)"):
        layer(torch.randn(9, 3, 8))


def test_dropout_is_off_in_eval_mode_and_draws_nothing():
    layer, singles = _layer_and_singles(torch.nn.Linear(8, 6))
    layer.eval()
    states = _states([1, 2, 3])
    before = {k: s.clone() for k, s in states.items()}
    set_routing(layer, RowRouting(SEGMENTS, states))
    x = torch.randn(9, 8)
    y = layer(x)
    for k, start, end in SEGMENTS:
        torch.testing.assert_close(y[start:end], singles[k].eval()(x[start:end]), rtol=1e-6, atol=1e-6)
        assert torch.equal(states[k], before[k])


def test_bf16_autocast_matches_lora_linear_under_autocast():
    layer, singles = _layer_and_singles(torch.nn.Linear(16, 12))
    set_routing(layer, RowRouting(SEGMENTS))
    x = torch.randn(9, 2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer.eval()(x)
        assert y.dtype == torch.bfloat16
        for k, start, end in SEGMENTS:
            torch.testing.assert_close(y[start:end], singles[k].eval()(x[start:end]), rtol=0, atol=2e-2)


def test_one_adapter_runs_without_routing_and_several_need_it():
    single, _ = _layer_and_singles(torch.nn.Linear(8, 6), SPECS[:1], SEEDS[:1])
    assert single(torch.randn(2, 8)).shape == (2, 6)
    layer, _ = _layer_and_singles(torch.nn.Linear(8, 6))
    with pytest.raises(RuntimeError, match="set_routing"):
        layer(torch.randn(9, 8))


def test_the_layer_refuses_what_it_cannot_hold():
    with pytest.raises(TypeError, match="nn.Linear or NF4Linear"):
        MultiLoRALinear(torch.nn.Conv1d(2, 2, 1), [])
    with pytest.raises(ValueError, match="adapter 0 maps 5 -> 6"):
        MultiLoRALinear(torch.nn.Linear(8, 6), [LoRAAdapter(5, 6, SPECS[0])])
    with pytest.raises(ValueError, match="PiSSA/OLoRA"):
        LoRAAdapter(8, 6, SPECS[0], init_lora_weights="pissa")


# ---------------------------------------------------------------------------------------------
# inject_many


def _single(base, k, configs=CONFIGS, seeds=SEEDS):
    model = copy.deepcopy(base)
    seed_everything(seeds[k])
    inject_lora(model, configs[k])
    return model


@pytest.mark.parametrize("quantized", [False, True], ids=["plain", "nf4"])
def test_inject_many_draws_adapter_k_as_seed_everything_then_inject_lora(quantized):
    base = tiny_model(seed=3)
    if quantized:
        base = quantize_model(base)
    multi = copy.deepcopy(base)
    outer = torch.get_rng_state()
    states = inject_many(multi, CONFIGS, SEEDS)
    assert torch.equal(outer, torch.get_rng_state()), "inject_many left the caller's RNG state as it was"
    layers = multi_lora_layers(multi)
    assert layers and all(isinstance(m.base_layer, NF4Linear) == quantized for m in layers.values())
    for k in range(len(CONFIGS)):
        single = _single(base, k)
        assert torch.equal(states[k], torch.get_rng_state()), f"adapter {k}: the RNG state after its init"
        mine, theirs = adapter_state_dict_of(multi, k), adapter_state_dict(single)
        assert list(mine) == list(theirs)
        for key in theirs:
            assert torch.equal(mine[key], theirs[key]), key
        assert multi.lora_configs[k] == single.lora_config
        params = adapter_parameters_of(multi, k)
        assert [p.data_ptr() for p in params] == [t.data_ptr() for t in mine.values()]
    trainable = {id(p) for p in multi.parameters() if p.requires_grad}
    assert trainable == {id(p) for k in range(3) for p in adapter_parameters_of(multi, k)}


def test_inject_many_refuses_configs_it_cannot_share():
    model = tiny_model()
    targets = ["q_proj", "v_proj"]
    plain = LoraConfig(r=2, target_modules=targets)
    other = r"configs\[1\] targets other modules"
    cases = [
        ([plain, LoraConfig(r=2, target_modules=["q_proj"])], other + ".*target_modules"),
        ([plain, LoraConfig(target_modules=targets, exclude_modules=["model.layers.0.self_attn.v_proj"])],
         other + ".*exclude_modules"),
        ([plain, LoraConfig(target_modules=targets, use_dora=True)], r"configs\[1\] uses DoRA"),
        ([LoraConfig(target_modules=["q_proj"], init_lora_weights="pissa")], r"configs\[0\] uses init_lora"),
        ([LoraConfig(target_modules=["q_proj"], init_lora_weights="olora")], "PiSSA/OLoRA"),
        ([LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"])], "modules_to_save"),
        ([LoraConfig(target_modules=["lm_head"])], "output head"),
        ([plain, LoraConfig(target_modules=["nothing"])], r"configs\[1\]: target_modules"),
    ]
    for configs, message in cases:
        with pytest.raises(ValueError, match=message):
            inject_many(copy.deepcopy(model), configs, list(range(len(configs))))
    with pytest.raises(ValueError, match="one seed per config"):
        inject_many(model, [plain], [1, 2])
    for inject in (lambda m: inject_lora(m, LoraConfig(target_modules=["k_proj"])),
                   lambda m: inject_many(m, [plain], [0])):
        adapted = copy.deepcopy(model)
        inject(adapted)
        with pytest.raises(ValueError, match="already has LoRA layers"):
            inject_many(adapted, [plain], [0])


# ---------------------------------------------------------------------------------------------
# The adapter format of one adapter


def test_load_adapter_state_dict_of_round_trips_and_checks_keys_and_shapes():
    base = tiny_model(seed=3)
    multi = copy.deepcopy(base)
    inject_many(multi, CONFIGS, SEEDS)
    donor = _single(base, 1, seeds=[0, 99, 0])  # adapter 1's shapes, other values
    tensors = {n: t.detach().clone() for n, t in adapter_state_dict(donor).items()}
    load_adapter_state_dict_of(multi, 1, tensors)
    for key, value in adapter_state_dict(donor).items():
        assert torch.equal(adapter_state_dict_of(multi, 1)[key], value)
    assert not torch.equal(adapter_state_dict_of(multi, 0)[key], adapter_state_dict_of(multi, 1)[key])
    wrong_shape = adapter_state_dict(_single(base, 0))  # adapter 0's rank 4 where adapter 1 has 2
    with pytest.raises(ValueError, match="has shape"):
        load_adapter_state_dict_of(multi, 1, wrong_shape)
    with pytest.raises(KeyError, match="missing"):
        load_adapter_state_dict_of(multi, 1, dict(list(adapter_state_dict(donor).items())[:2]))
    with pytest.raises(IndexError, match="adapters 0..2"):
        adapter_state_dict_of(multi, 3)


def test_write_adapter_of_one_adapter_loads_as_that_single_adapter(tmp_path):
    base = tiny_model(seed=3)
    multi = copy.deepcopy(base)
    inject_many(multi, CONFIGS, SEEDS)
    k = 2
    write_adapter(tmp_path / "a", {n: t.detach().cpu() for n, t in adapter_state_dict_of(multi, k).items()},
                  multi.lora_configs[k])
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "a")
    set_routing(multi, RowRouting([(k, 0, TOKENS.shape[0])]))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(TOKENS), multi.eval()(TOKENS), rtol=0, atol=1e-6)


@pytest.mark.slow  # ~12 s: transformers and peft build two models
def test_peft_loads_one_adapter_of_a_multi_adapter_model(tmp_path, base_dir):
    peft = pytest.importorskip("peft", reason="the 'ref' extra (peft) is not installed")
    from peftloop.models import load_pretrained
    from tests.hf_builders import load_reference

    multi = load_pretrained(base_dir)
    inject_many(multi, CONFIGS, SEEDS)
    for k in (0, 1):
        tensors = {n: t.detach().cpu() for n, t in adapter_state_dict_of(multi, k).items()}
        write_adapter(tmp_path / str(k), tensors, multi.lora_configs[k])
        theirs = peft.PeftModel.from_pretrained(load_reference(base_dir), tmp_path / str(k)).eval()
        set_routing(multi, RowRouting([(k, 0, TOKENS.shape[0])]))
        with torch.no_grad():
            expected = multi.eval()(TOKENS)
            assert not torch.allclose(expected, load_reference(base_dir)(TOKENS).logits, atol=1e-3)
            torch.testing.assert_close(theirs(TOKENS).logits, expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# A whole model: one fused batch of three adapters' rows against three single-adapter models


@pytest.mark.parametrize("quantized, checkpointing", [(False, None), (True, None), (False, "recompute"),
                                                      (False, "offload")],
                         ids=["plain", "nf4", "plain-checkpointed", "plain-offloaded"])
def test_a_fused_batch_equals_three_single_adapter_models(quantized, checkpointing):
    """Dropout on (two of the three adapters). With activation checkpointing the decoder layers run
    twice, the second time inside the backward pass: the recomputation must draw the masks of the
    first run and leave the adapters' RNG states where the first run left them."""
    base = tiny_model(seed=5)
    if quantized:
        base = quantize_model(base)
    multi = copy.deepcopy(base)
    states = dict(enumerate(inject_many(multi, CONFIGS, SEEDS)))
    if checkpointing:
        enable_gradient_checkpointing(multi, offload=checkpointing == "offload")
    tokens = torch.randint(3, 61, (6, 7), generator=torch.Generator().manual_seed(0))
    segments = [(2, 0, 2), (0, 2, 3), (1, 4, 6)]  # row 3: the base alone
    set_routing(multi, RowRouting(segments, states))
    logits = multi.train()(tokens)
    g = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    (logits * g).sum().backward()
    for k, start, end in segments:
        single = _single(base, k)  # the global RNG is where train() alone would draw dropout from
        logits_k = single.train()(tokens[start:end])
        (logits_k * g[start:end]).sum().backward()
        assert torch.equal(states[k], torch.get_rng_state()), f"adapter {k}: dropout draws"
        assert_close_at_scale(logits[start:end], logits_k, f"logits of adapter {k}")
        theirs = {n: p.grad for n, p in adapter_state_dict(single).items()}
        mine = {n: p.grad for n, p in adapter_state_dict_of(multi, k).items()}
        assert list(mine) == list(theirs)
        for name in theirs:
            assert_close_at_scale(mine[name], theirs[name], name)
    with torch.no_grad():
        base_row = base.eval()(tokens[3:4])
    torch.testing.assert_close(logits[3:4], base_row, rtol=1e-5, atol=1e-5)
