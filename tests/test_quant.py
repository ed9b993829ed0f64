"""lora_edu.quant: the NF4 table, packing, blockwise error bounds, double quantisation, and
the 4-bit LoRA layer against a full-precision layer holding the same (dequantised) weights."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lora_edu.lora import LoraConfig, LoRALinear, count_parameters
from lora_edu.quant import (
    QLORA_MERGES, DoubleQuantizedAbsmax, Linear4bit, LoRALinear4bit, QuantizedTensor,
    double_quantize, fp4_codebook, inject_lora_4bit, int4_codebook, loftq_init, max_half_gap,
    merge_qlora, merge_qlora_layer, nf4_codebook, pack_4bit, quantize_blockwise, quantize_nf4,
    unpack_4bit,
)

# bitsandbytes' NF4 table (bitsandbytes/functional.py, get_4bit_type("nf4"); the same literals
# are in csrc/kernels.cu), the values QLoRA's NF4 is defined by in practice.
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]

CODEBOOKS = {"nf4": nf4_codebook, "int4": int4_codebook, "fp4": fp4_codebook}
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


# --------------------------------------------------------------------------- codebooks

def test_nf4_matches_the_published_table():
    ours = nf4_codebook().double()
    published = torch.tensor(PUBLISHED_NF4, dtype=torch.float64)
    assert ours.shape == (16,) and nf4_codebook().dtype == torch.float32
    assert (ours - published).abs().max() < 1e-6


def test_nf4_is_asymmetric_with_an_exact_zero():
    cb = nf4_codebook()
    assert torch.all(cb[1:] > cb[:-1])
    assert cb[0] == -1 and cb[-1] == 1
    assert (cb == 0).sum() == 1
    assert (cb < 0).sum() == 7 and (cb > 0).sum() == 8


def test_nf4_bins_have_equal_probability_mass_on_each_side():
    # The positive codes are quantiles at evenly spaced probabilities, so the N(0,1) CDF of
    # consecutive unnormalised codes advances in equal steps.
    cb = nf4_codebook().double()
    scale = torch.special.ndtri(torch.tensor(0.9677083, dtype=torch.float64))
    cdf = torch.special.ndtr(cb[cb > 0] * scale)
    steps = cdf[1:] - cdf[:-1]
    assert torch.allclose(steps, steps.mean().expand_as(steps), atol=1e-6)


def test_int4_and_fp4_codebooks():
    assert torch.allclose(int4_codebook() * 7, torch.arange(-7.0, 8.0))
    fp4 = fp4_codebook()
    assert fp4.numel() == 16 and torch.all(fp4[1:] >= fp4[:-1])
    magnitudes = (fp4.abs() * 6).unique()
    assert torch.allclose(magnitudes, torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6]))


@pytest.mark.parametrize("name", CODEBOOKS)
def test_max_half_gap_is_attained_by_a_midpoint(name):
    cb = CODEBOOKS[name]()
    gaps = (cb[1:] - cb[:-1]) / 2
    assert max_half_gap(cb) == pytest.approx(float(gaps.max()))
    x = (cb[:-1] + cb[1:])[gaps.argmax()] / 2
    assert (cb - x).abs().min() == pytest.approx(max_half_gap(cb), abs=1e-7)


# --------------------------------------------------------------------------- packing

@given(st.lists(st.integers(0, 15), min_size=0, max_size=200).filter(lambda v: len(v) % 2 == 0))
@settings(max_examples=60, deadline=None)
def test_pack_unpack_round_trip(values):
    codes = torch.tensor(values, dtype=torch.uint8)
    packed = pack_4bit(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == codes.numel() // 2
    assert torch.equal(unpack_4bit(packed), codes)


@given(st.lists(st.integers(0, 255), min_size=1, max_size=100))
@settings(max_examples=40, deadline=None)
def test_unpack_pack_round_trip_on_every_byte(values):
    packed = torch.tensor(values, dtype=torch.uint8)
    assert torch.equal(pack_4bit(unpack_4bit(packed)), packed)


def test_pack_puts_the_first_code_in_the_high_nibble():
    assert pack_4bit(torch.tensor([0x1, 0xA, 0xF, 0x0], dtype=torch.uint8)).tolist() == [0x1A, 0xF0]


@pytest.mark.parametrize("codes, error", [
    (torch.tensor([1, 2, 3], dtype=torch.uint8), ValueError),      # odd length
    (torch.tensor([1, 16], dtype=torch.uint8), ValueError),        # not 4-bit
    (torch.tensor([1, 2], dtype=torch.int64), TypeError),          # wrong dtype
    (torch.zeros(2, 2, dtype=torch.uint8), TypeError),             # not 1-D
])
def test_pack_refuses_bad_codes(codes, error):
    with pytest.raises(error, match="codes"):
        pack_4bit(codes)


# --------------------------------------------------------------------------- quantisation

def _blockwise_bound(W: torch.Tensor, q: QuantizedTensor) -> torch.Tensor:
    """Per element: c_block · max_half_gap, plus float32 rounding of the product."""
    c = q.constants()
    per_element = c.repeat_interleave(q.block_size)[: W.numel()].view(W.shape)
    return per_element * max_half_gap(q.codebook) * (1 + 1e-6) + 1e-7


@pytest.mark.parametrize("name", CODEBOOKS)
@given(rows=st.integers(1, 40), cols=st.integers(1, 70), log_scale=st.floats(-6, 4),
       block_size=st.sampled_from([2, 8, 64, 128]), seed=st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_error_is_within_half_the_largest_gap_of_each_block(name, rows, cols, log_scale,
                                                            block_size, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 10.0 ** log_scale
    q = quantize_blockwise(W, CODEBOOKS[name](), block_size)
    W_hat = q.dequantize()
    assert W_hat.shape == W.shape and W_hat.dtype == W.dtype
    assert torch.all((W - W_hat).abs() <= _blockwise_bound(W, q))


def test_the_bound_is_tight_and_each_block_keeps_its_absmax_exactly():
    W = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    q = quantize_nf4(W)
    err = (W - q.dequantize()).abs()
    bound = _blockwise_bound(W, q)
    assert (err / bound).max() > 0.8  # close to the worst case somewhere, so not a loose bound
    # The value that defines a block's absmax maps onto the code ±1 and comes back exactly.
    blocks = W.flatten().view(-1, 64)
    arg = blocks.abs().argmax(dim=1)
    recovered = q.dequantize().flatten().view(-1, 64).gather(1, arg[:, None])
    assert torch.equal(recovered, blocks.gather(1, arg[:, None]))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dequantize_returns_a_tensor_like_W(dtype):
    W = torch.randn(3, 5, 7).to(dtype)
    W_hat = quantize_nf4(W, block_size=8).dequantize()
    assert W_hat.shape == W.shape and W_hat.dtype == dtype
    assert quantize_nf4(W).dequantize(torch.float32).dtype == torch.float32


def test_quantising_the_dequantised_tensor_changes_nothing():
    W = torch.randn(32, 48, generator=torch.Generator().manual_seed(1))
    q = quantize_nf4(W)
    q2 = quantize_nf4(q.dequantize())
    assert torch.equal(q.packed, q2.packed)
    assert torch.equal(q.dequantize(), q2.dequantize())


def test_zeros_stay_exactly_zero_and_W_is_not_modified():
    W = torch.randn(4, 64)
    W[1] = 0.0
    W[2, ::3] = 0.0
    before = W.clone()
    W_hat = quantize_nf4(W).dequantize()
    assert torch.equal(W, before)
    assert torch.all(W_hat[W == 0] == 0)


def test_padding_when_the_block_size_does_not_divide():
    W = torch.randn(5, 13)  # 65 values: one full block of 64 and one of 1
    q = quantize_nf4(W, block_size=64)
    assert q.packed.numel() == 64  # 128 padded codes, two per byte
    assert q.constants().numel() == 2
    assert q.dequantize().shape == W.shape
    # The lone value in the last block is its own absmax, so it is recovered exactly.
    assert q.dequantize().flatten()[-1] == W.flatten()[-1]


def test_refusing_a_block_size_that_does_not_divide_when_pad_is_false():
    with pytest.raises(ValueError, match=r"block_size=64 does not divide W.numel\(\)=65.*pad=True"):
        quantize_nf4(torch.randn(5, 13), pad=False)
    assert quantize_nf4(torch.randn(2, 64), pad=False).dequantize().shape == (2, 64)


@pytest.mark.parametrize("W, error, words", [
    (torch.arange(64), TypeError, "floating-point"),
    (torch.ones(64, dtype=torch.bool), TypeError, "floating-point"),
    (torch.ones(64, dtype=torch.uint8), TypeError, "floating-point"),
    ([1.0, 2.0], TypeError, "torch.Tensor"),
    (torch.empty(0), ValueError, "empty"),
    (torch.tensor([1.0, float("nan")]), ValueError, "inf or NaN"),
    (torch.tensor([1.0, float("inf")]), ValueError, "inf or NaN"),
])
def test_quantize_refuses_bad_tensors(W, error, words):
    with pytest.raises(error, match=words):
        quantize_nf4(W, block_size=2)


@pytest.mark.parametrize("block_size, error", [(63, ValueError), (0, ValueError),
                                               (-64, ValueError), (64.0, TypeError),
                                               (True, TypeError)])
def test_quantize_refuses_bad_block_sizes(block_size, error):
    with pytest.raises(error, match="block_size"):
        quantize_nf4(torch.randn(128), block_size=block_size)


@pytest.mark.parametrize("codebook, error", [
    (torch.tensor([-1.0, 1.0, 0.0]), ValueError),         # not sorted
    (torch.linspace(-2, 2, 16), ValueError),              # not scaled to [-1, 1]
    (torch.linspace(-1, 1, 17), ValueError),              # does not fit 4 bits
    (torch.tensor([-1, 0, 1]), TypeError),                # integer
])
def test_quantize_refuses_bad_codebooks(codebook, error):
    with pytest.raises(error, match="codebook"):
        quantize_blockwise(torch.randn(64), codebook)


# --------------------------------------------------------------------------- double quantisation

def test_constant_overhead_without_and_with_double_quantisation():
    W = torch.randn(256, 64 * 16)  # 4096 blocks of 64 = 16 groups of 256 blocks, no padding
    assert quantize_nf4(W).constant_bits_per_parameter() == 0.5
    q = quantize_nf4(W, double_quant=True)
    # 8/64 for the FP8 constants + 32/(64·256) for their scales + one fp32 mean.
    expected = 8 / 64 + 32 / (64 * 256) + 32 / W.numel()
    assert q.constant_bits_per_parameter() == pytest.approx(expected, rel=1e-12)
    assert round(q.constant_bits_per_parameter(), 3) == 0.127
    assert q.bits_per_parameter() == pytest.approx(4 + expected, rel=1e-12)


@given(n=st.integers(1, 2000), seed=st.integers(0, 2**16), block_size=st.sampled_from([4, 256]))
@settings(max_examples=30, deadline=None)
def test_double_quantised_constants_have_fp8_relative_precision(n, seed, block_size):
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(n, generator=g) * 3 + 0.01  # absmax constants are positive
    dq = double_quantize(c, block_size)
    c_hat = dq.dequantize()
    assert c_hat.shape == c.shape
    # E4M3 has 3 mantissa bits: relative rounding error ≤ 2^-4 of |c − mean|, and subnormals
    # (below 2^-6 of the scale unit) are spaced 2^-9 apart.
    dev = (c - dq.offset).abs()
    scale = dq.scales.repeat_interleave(block_size)[:n]
    bound = torch.maximum(dev * 2.0 ** -4, scale * 2.0 ** -10) * (1 + 1e-5) + 1e-7
    assert torch.all((c - c_hat).abs() <= bound)


def test_weight_error_with_double_quantisation_adds_the_constant_error():
    W = torch.randn(128, 256, generator=torch.Generator().manual_seed(3))
    q = quantize_nf4(W, double_quant=True)
    assert isinstance(q.absmax, DoubleQuantizedAbsmax)
    c = W.flatten().view(-1, 64).abs().amax(dim=1)
    c_err = (q.constants() - c).abs()
    bound = (c * max_half_gap(nf4_codebook()) + c_err).repeat_interleave(64).view(W.shape)
    assert torch.all((W - q.dequantize()).abs() <= bound * (1 + 1e-6) + 1e-7)


def test_nf4_beats_int4_and_fp4_on_normal_weights():
    W = torch.randn(256, 256, generator=torch.Generator().manual_seed(4))
    mse = {name: ((W - quantize_blockwise(W, cb()).dequantize()) ** 2).mean().item()
           for name, cb in CODEBOOKS.items()}
    assert mse["nf4"] < mse["fp4"] and mse["nf4"] < mse["int4"]


# --------------------------------------------------------------------------- layers

def _pair(in_f=96, out_f=80, r=4, double_quant=True, bias=True, seed=0):
    """A LoRALinear4bit and a LoRALinear over an nn.Linear holding the dequantised weight."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_f, out_f, bias=bias)
    q4 = LoRALinear4bit(Linear4bit.from_linear(linear, double_quant=double_quant), r=r,
                        lora_alpha=2 * r, init_lora_weights=False)  # B ≠ 0: the branch counts
    full = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        full.weight.copy_(q4.base.quantized_weight.dequantize())
        if bias:
            full.bias.copy_(linear.bias)
    ref = LoRALinear(full, r=r, lora_alpha=2 * r)
    with torch.no_grad():
        ref.lora_A.copy_(q4.lora_A)
        ref.lora_B.copy_(q4.lora_B)
    return q4, ref


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_4bit_layer_equals_a_full_precision_layer_with_the_dequantised_weights(double_quant, bias):
    q4, ref = _pair(double_quant=double_quant, bias=bias)
    x = torch.randn(3, 7, 96)
    x4, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out4, out = q4(x4), ref(x_ref)
    assert out4.shape == (3, 7, 80)
    assert torch.allclose(out4, out, rtol=0, atol=1e-6)
    out4.square().sum().backward()
    out.square().sum().backward()
    for name in ("lora_A", "lora_B"):
        assert torch.allclose(getattr(q4, name).grad, getattr(ref, name).grad, atol=1e-5)
    assert torch.allclose(x4.grad, x_ref.grad, atol=1e-5)  # through Ŵ0, dequantised again


def test_the_dequantised_weight_is_not_kept_for_the_backward_pass():
    q4, _ = _pair(in_f=128, out_f=96)

    def naive(x: torch.Tensor) -> torch.Tensor:  # what plain autograd would do
        return torch.nn.functional.linear(x, q4.base.weight)

    saved = {}
    for name, layer in (("4bit", q4), ("naive", naive)):
        sizes: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: sizes.append(t.numel()) or t, lambda t: t):
            layer(torch.randn(4, 128, requires_grad=True)).sum().backward()
        saved[name] = sizes
    assert 96 * 128 in saved["naive"]  # Ŵ0 (as its transpose) is kept for ∂L/∂x
    assert max(saved["4bit"]) < 96 * 128  # only x and the small A, B products


def test_base_weight_gets_no_gradient_and_the_quantised_storage_is_4bit():
    q4, _ = _pair()
    trainable = {n for n, p in q4.named_parameters() if p.requires_grad}
    assert {"lora_A", "lora_B"} <= trainable
    assert not any(isinstance(b, torch.Tensor) and b.requires_grad for b in q4.buffers())
    assert q4.base.packed.dtype == torch.uint8 and q4.base.packed.numel() == 96 * 80 // 2


def test_bf16_compute_keeps_lora_in_fp32_and_stays_close():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    layer = LoRALinear4bit(Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16), r=4,
                           init_lora_weights=False)
    assert layer.lora_A.dtype == torch.float32 and layer.lora_B.dtype == torch.float32
    x = torch.randn(8, 64)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    with torch.no_grad():
        exact = (x @ layer.base.quantized_weight.dequantize().T + linear.bias
                 + x @ layer.delta_weight().T)
    assert torch.allclose(out.float(), exact, rtol=0.02, atol=0.05)
    out.float().sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad.dtype == torch.float32


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_training_under_autocast_works_for_every_compute_dtype(compute_dtype):
    torch.manual_seed(0)
    model = inject_lora_4bit(Tiny(), LoraConfig(r=4, target_modules=["q", "v"]),
                             compute_dtype=compute_dtype)
    x = torch.randn(8, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().pow(2).mean()
    loss.backward()
    assert model.q.lora_B.grad is not None and model.q.lora_B.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.dtype == torch.float32


def test_merge_is_refused_and_merged_linear_reproduces_the_layer():
    q4, _ = _pair()
    with pytest.raises(NotImplementedError, match="merged_linear"):
        q4.merge()
    x = torch.randn(5, 96)
    assert torch.allclose(q4.merged_linear()(x), q4(x), atol=1e-5)


def test_layers_refuse_bad_input():
    with pytest.raises(TypeError, match="Linear4bit"):
        LoRALinear4bit(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="2-D"):
        Linear4bit(quantize_nf4(torch.randn(2, 4, 8)))
    with pytest.raises(TypeError, match="nn.Linear"):
        Linear4bit.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="compute_dtype"):
        Linear4bit.from_linear(nn.Linear(64, 2), compute_dtype=torch.int8)


# --------------------------------------------------------------------------- the model level

class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(64, 64)
        self.v = nn.Linear(64, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.v(torch.relu(self.q(x)))))


def test_inject_lora_4bit_replaces_targets_and_trains_only_lora():
    torch.manual_seed(0)
    model = Tiny()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"])
    inject_lora_4bit(model, cfg)
    assert isinstance(model.q, LoRALinear4bit) and isinstance(model.v, LoRALinear4bit)
    assert type(model.head) is nn.Linear
    trainable, _ = count_parameters(model)
    assert trainable == 2 * 4 * (64 + 64)
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())


def test_injected_model_starts_at_the_quantised_base():
    torch.manual_seed(0)
    model = Tiny()
    expected = copy.deepcopy(model)
    with torch.no_grad():
        for name in ("q", "v"):
            layer = getattr(expected, name)
            layer.weight.copy_(quantize_nf4(layer.weight, double_quant=True).dequantize())
    inject_lora_4bit(model, LoraConfig(r=4, target_modules=["q", "v"]))
    x = torch.randn(6, 64)
    assert torch.allclose(model(x), expected(x), atol=1e-6)


def test_inject_lora_4bit_leaves_the_model_unchanged_on_error():
    model = Tiny()
    with torch.no_grad():
        model.v.weight[0, 0] = float("nan")  # q would quantise fine, v fails
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="inf or NaN"):
        inject_lora_4bit(model, LoraConfig(target_modules=["q", "v"]))
    assert type(model.q) is nn.Linear and type(model.v) is nn.Linear
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.allclose(before[k], after[k], rtol=0, atol=0, equal_nan=True) for k in before)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="matches no module"):
        inject_lora_4bit(model, LoraConfig(target_modules=["nope"]))
    with pytest.raises(TypeError, match="LoraConfig"):
        inject_lora_4bit(model, {"r": 8})


def test_state_dict_round_trip_reproduces_outputs():
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, target_modules=["q", "v"], init_lora_weights=False)
    a = inject_lora_4bit(Tiny(), cfg)
    torch.manual_seed(1)
    b = inject_lora_4bit(Tiny(), cfg)
    x = torch.randn(3, 64)
    assert not torch.allclose(a(x), b(x))  # different seeds: different weights and adapters
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x))


def test_an_adapter_trained_on_a_4bit_base_loads_into_a_full_precision_model(tmp_path):
    from lora_edu.adapters import load_adapter, save_adapter

    torch.manual_seed(0)
    base_weights = Tiny().state_dict()
    cfg = LoraConfig(r=4, target_modules=["q", "v"], init_lora_weights=False)
    four = Tiny()
    four.load_state_dict(base_weights)
    inject_lora_4bit(four, cfg)
    save_adapter(four, tmp_path)
    full = Tiny()
    full.load_state_dict(base_weights)
    load_adapter(full, tmp_path)
    for name in ("q", "v"):
        assert isinstance(getattr(full, name), LoRALinear)
        assert not isinstance(getattr(full, name), LoRALinear4bit)
        for factor in ("lora_A", "lora_B"):
            assert torch.equal(getattr(getattr(full, name), factor),
                               getattr(getattr(four, name), factor))


# --------------------------------------------------------------------------- LoftQ

def _fro(M: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(M))


def test_loftq_error_falls_with_iterations_and_beats_plain_quantisation():
    torch.manual_seed(0)
    W = torch.randn(96, 160) * 0.02
    plain = _fro(W - quantize_nf4(W).dequantize())
    res = loftq_init(W, r=8, num_iters=5, scaling=2.0)
    assert res.quantization_error == pytest.approx(plain, rel=1e-6)
    assert len(res.errors) == 5
    assert res.errors[0] < plain
    assert all(b < a for a, b in zip(res.errors, res.errors[1:]))
    # The reported error is the one of the returned tensors: W ≈ Q + s·B A.
    rebuilt = res.quantized.dequantize() + 2.0 * res.lora_B @ res.lora_A
    assert _fro(W - rebuilt) == pytest.approx(res.errors[-1], rel=1e-5)


def test_loftq_with_one_iteration_is_plain_quantisation_plus_the_residual_svd():
    from lora_edu.linalg import low_rank_approx

    torch.manual_seed(1)
    W = torch.randn(64, 128)
    res = loftq_init(W, r=4, num_iters=1)
    plain = quantize_nf4(W)
    assert torch.equal(res.quantized.packed, plain.packed)
    residual = W - plain.dequantize()
    assert torch.allclose(res.lora_B @ res.lora_A, low_rank_approx(residual, 4), atol=1e-5)
    # Eckart–Young: no rank-4 correction of this Q does better.
    assert res.errors[0] == pytest.approx(_fro(residual - low_rank_approx(residual, 4)),
                                          rel=1e-5)


def test_loftq_shapes_dtypes_scaling_and_W_untouched():
    torch.manual_seed(2)
    W = (torch.randn(48, 80) * 0.05).to(torch.bfloat16)
    before = W.clone()
    r1 = loftq_init(W, r=6, num_iters=2, scaling=1.0)
    r4 = loftq_init(W, r=6, num_iters=2, scaling=4.0)
    assert torch.equal(W, before)
    assert r1.lora_A.shape == (6, 80) and r1.lora_B.shape == (48, 6)
    assert r1.lora_A.dtype == r1.lora_B.dtype == torch.float32
    assert r1.quantized.shape == W.shape and r1.quantized.dequantize().dtype == torch.bfloat16
    # The factors are for the layer's scaling: s·B A does not depend on s.
    assert torch.allclose(4.0 * r4.lora_B @ r4.lora_A, r1.lora_B @ r1.lora_A, atol=1e-6)
    assert torch.allclose(r4.lora_A, r1.lora_A / 2) and torch.allclose(r4.lora_B, r1.lora_B / 2)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(W=torch.randn(64)), TypeError, "2-D"),
    (dict(W=torch.ones(8, 8, dtype=torch.int32)), TypeError, "floating-point"),
    (dict(W=torch.full((8, 8), float("nan"))), ValueError, "inf or NaN"),
    (dict(r=0), ValueError, "1 <= r"),
    (dict(r=17), ValueError, "min"),
    (dict(r=2.0), TypeError, "int"),
    (dict(num_iters=0), ValueError, "num_iters"),
    (dict(num_iters=1.5), TypeError, "num_iters"),
    (dict(scaling=-1.0), ValueError, "scaling"),
    (dict(scaling=float("inf")), ValueError, "scaling"),
])
def test_loftq_refuses_bad_input(kwargs, error, words):
    args = dict(W=torch.randn(16, 32), r=4)
    args.update(kwargs)
    with pytest.raises(error, match=words):
        loftq_init(args.pop("W"), **args)


def test_inject_lora_4bit_with_loftq_starts_closer_to_the_full_precision_model():
    torch.manual_seed(0)
    full = Tiny()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"])
    standard = inject_lora_4bit(copy.deepcopy(full), cfg)
    loftq = inject_lora_4bit(copy.deepcopy(full), cfg, loftq_iters=3)
    x = torch.randn(32, 64)
    with torch.no_grad():
        ref = full(x)
        gap_standard = (standard(x) - ref).norm()
        gap_loftq = (loftq(x) - ref).norm()
    assert gap_loftq < gap_standard
    for name in ("q", "v"):
        layer = getattr(loftq, name)
        expected = loftq_init(getattr(full, name).weight, 4, 3, scaling=2.0, double_quant=True)
        assert torch.equal(layer.base.packed, expected.quantized.packed)
        assert torch.allclose(layer.lora_A, expected.lora_A)
        assert layer.lora_B.abs().sum() > 0  # LoftQ does not start at B = 0
    trainable, _ = count_parameters(loftq)
    assert trainable == 2 * 4 * (64 + 64)
    with pytest.raises(ValueError, match="loftq_iters"):
        inject_lora_4bit(copy.deepcopy(full), cfg, loftq_iters=-1)


# --------------------------------------------------------------------------- merging

def _trained_qlora(double_quant=True, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(96, 80)
    layer = LoRALinear4bit(Linear4bit.from_linear(linear, double_quant=double_quant), r=4,
                           lora_alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.05)  # as if trained
    return linear, layer


def test_merging_into_the_dequantised_base_reproduces_the_unmerged_layer():
    linear, layer = _trained_qlora()
    x = torch.randn(7, 96)
    exact = merge_qlora_layer(layer, "dequantized", dtype=torch.float32)
    assert type(exact) is nn.Linear
    assert torch.allclose(exact(x), layer(x), atol=1e-5)
    half = merge_qlora_layer(layer)  # the default: 16-bit storage
    assert half.weight.dtype == torch.bfloat16
    expected = (layer.base.weight.float() + layer.delta_weight()).to(torch.bfloat16)
    assert torch.equal(half.weight, expected)
    assert torch.equal(half.bias, linear.bias.to(torch.bfloat16))
    assert not any(p.requires_grad for p in half.parameters())


def test_merging_into_the_original_weight():
    linear, layer = _trained_qlora()
    merged = merge_qlora_layer(layer, "original", original_weight=linear.weight)
    assert merged.weight.dtype == torch.float32
    assert torch.allclose(merged.weight, linear.weight + layer.delta_weight(), atol=1e-7)
    # It differs from the unmerged model by exactly W0 − Ŵ0, the quantisation error.
    x = torch.randn(5, 96)
    with torch.no_grad():
        gap = merged(x) - layer(x)
        assert torch.allclose(gap, x @ (linear.weight - layer.base.weight).T, atol=1e-5)


@pytest.mark.parametrize("double_quant", [False, True])
def test_merging_then_requantising(double_quant):
    linear, layer = _trained_qlora(double_quant=double_quant)
    re4 = merge_qlora_layer(layer, "requantized")
    assert isinstance(re4, Linear4bit) and re4.double_quant == double_quant
    target = layer.base.quantized_weight.dequantize(torch.float32) + layer.delta_weight()
    expected = quantize_nf4(target, double_quant=double_quant).dequantize()
    assert torch.equal(re4.weight, expected)
    # A zero adapter requantises Ŵ0 to itself (without double quantisation, exactly).
    if not double_quant:
        with torch.no_grad():
            layer.lora_B.zero_()
        assert torch.equal(merge_qlora_layer(layer, "requantized").weight, layer.base.weight)


def test_merge_qlora_layer_refuses_bad_input():
    linear, layer = _trained_qlora()
    with pytest.raises(TypeError, match="LoRALinear4bit"):
        merge_qlora_layer(LoRALinear(nn.Linear(4, 4), r=2))
    with pytest.raises(ValueError, match="into must be one of"):
        merge_qlora_layer(layer, "fp8")
    with pytest.raises(ValueError, match="needs original_weight"):
        merge_qlora_layer(layer, "original")
    with pytest.raises(ValueError, match="shape"):
        merge_qlora_layer(layer, "original", original_weight=torch.randn(96, 80))
    with pytest.raises(TypeError, match="floating-point"):
        merge_qlora_layer(layer, "original", original_weight=torch.ones(80, 96, dtype=torch.int8))
    with pytest.raises(ValueError, match="only used with"):
        merge_qlora_layer(layer, "dequantized", original_weight=linear.weight)
    with pytest.raises(ValueError, match="not used with into='requantized'"):
        merge_qlora_layer(layer, "requantized", dtype=torch.float16)
    with pytest.raises(ValueError, match="floating-point torch.dtype"):
        merge_qlora_layer(layer, dtype=torch.int8)
    assert set(QLORA_MERGES) == {"dequantized", "original", "requantized"}


def test_merge_qlora_replaces_every_layer_and_keeps_the_outputs():
    torch.manual_seed(0)
    full = Tiny()
    model = inject_lora_4bit(copy.deepcopy(full), LoraConfig(r=4, target_modules=["q", "v"]))
    with torch.no_grad():
        model.q.lora_B.normal_(std=0.05)
        model.v.lora_B.normal_(std=0.05)
    x = torch.randn(6, 64)
    with torch.no_grad():
        before = model(x)
    for into, kwargs in [("dequantized", dict(dtype=torch.float32)),
                         ("original", dict(original=full)),
                         ("original", dict(original={"q": full.q.weight, "v": full.v.weight})),
                         ("requantized", {})]:
        merged = merge_qlora(copy.deepcopy(model), into, **kwargs)
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        assert not hasattr(merged, "lora_config")
        expected = Linear4bit if into == "requantized" else nn.Linear
        assert type(merged.q) is expected and type(merged.v) is expected
        with torch.no_grad():
            out = merged(x)
        if into == "dequantized":
            assert torch.allclose(out, before, atol=1e-5)
        else:
            assert not torch.allclose(out, before, atol=1e-5)


def test_merge_qlora_leaves_the_model_unchanged_on_error():
    torch.manual_seed(0)
    full = Tiny()
    model = inject_lora_4bit(copy.deepcopy(full), LoraConfig(r=4, target_modules=["q", "v"]))
    # q would merge, v has no original weight: nothing may be replaced.
    with pytest.raises(ValueError, match="no weight for 'v'"):
        merge_qlora(model, "original", original={"q": full.q.weight})
    assert isinstance(model.q, LoRALinear4bit) and isinstance(model.v, LoRALinear4bit)
    with pytest.raises(ValueError, match="needs original="):
        merge_qlora(model, "original")
    with pytest.raises(ValueError, match="only used with"):
        merge_qlora(model, "dequantized", original=full)
    with pytest.raises(TypeError, match="nn.Module or a dict"):
        merge_qlora(model, "original", original=[full.q.weight])
    with pytest.raises(ValueError, match="no module 'q'"):
        merge_qlora(model, "original", original=nn.Sequential())
    with pytest.raises(ValueError, match="no LoRALinear4bit"):
        merge_qlora(full)
    assert isinstance(model.q, LoRALinear4bit) and isinstance(model.v, LoRALinear4bit)


def test_quantize_modules_stores_more_layers_in_4bit_without_adapters():
    torch.manual_seed(0)
    model = Tiny()
    head_weight = model.head.weight.detach().clone()
    inject_lora_4bit(model, LoraConfig(r=4, target_modules=["q"]),
                     quantize_modules=["q", "v", "head"])
    assert isinstance(model.q, LoRALinear4bit)
    assert type(model.v) is Linear4bit and type(model.head) is Linear4bit
    assert torch.equal(model.head.weight, quantize_nf4(head_weight, double_quant=True)
                       .dequantize())
    trainable, _ = count_parameters(model)
    assert trainable == 4 * (64 + 64)
    with pytest.raises(ValueError, match="quantize_modules: .*matches no module"):
        inject_lora_4bit(Tiny(), LoraConfig(r=4, target_modules=["q"]),
                         quantize_modules=["nope"])


# ----------------------------------------------------------------- chapter 13's sweep helpers

def _qlora_sweep():
    """benchmarks/qlora_sweep.py, imported as a module."""
    from conftest import import_benchmark

    return import_benchmark("qlora_sweep")


def _gpt_with_lora(config: LoraConfig) -> nn.Module:
    """The toy GPT with LoRA per ``config`` and B nonzero, as if trained."""
    from lora_edu.lora import inject_lora, lora_layers
    from lora_edu.models import load_pretrained

    model, _ = load_pretrained("gpt-cpu")
    inject_lora(model, config)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(std=0.01)
    return model


def test_the_control_puts_the_fp32_adapters_unchanged_on_the_nf4_base() -> None:
    """benchmarks/qlora_sweep.transplant: same A and B, base in NF4, nothing else trained."""
    from lora_edu.lora import lora_layers
    from lora_edu.quant import Linear4bit, LoRALinear4bit

    qs = _qlora_sweep()
    s = qs.setup()
    fp32 = _gpt_with_lora(LoraConfig(r=8, lora_alpha=16, target_modules=qs.ALL_LINEAR))
    moved = qs.transplant(s, fp32)
    trained = dict(fp32.named_modules())
    layers = [(n, m) for n, m in moved.named_modules() if isinstance(m, LoRALinear4bit)]
    assert len(layers) == len(list(lora_layers(fp32)))
    for name, layer in layers:
        assert isinstance(layer.base, Linear4bit)
        assert torch.equal(layer.lora_A, trained[name].lora_A)
        assert torch.equal(layer.lora_B, trained[name].lora_B)


def test_the_qv_control_moves_only_the_qv_adapters_onto_an_all_nf4_base() -> None:
    """qlora_sweep.transplant(kind=QV[1]): adapters on q and v only, every block linear in NF4."""
    from lora_edu.lora import lora_layers
    from lora_edu.quant import Linear4bit, LoRALinear4bit

    qs = _qlora_sweep()
    s = qs.setup()
    _, targets, r, _ = s.kinds[qs.QV[0]]
    fp32 = _gpt_with_lora(LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
    moved = qs.transplant(s, fp32, qs.QV[1])
    trained = dict(fp32.named_modules())
    adapted = {n for n, m in moved.named_modules() if isinstance(m, LoRALinear4bit)}
    assert adapted == {n for n, _ in lora_layers(fp32)}
    assert {n.rpartition(".")[2] for n in adapted} == {"q", "v"}
    for name, m in moved.named_modules():
        if name.rpartition(".")[2] in qs.ALL_LINEAR and name not in adapted:
            assert isinstance(m, Linear4bit), name          # quantised, with no adapter
    for name in adapted:
        layer = dict(moved.named_modules())[name]
        assert torch.equal(layer.lora_A, trained[name].lora_A)
        assert torch.equal(layer.lora_B, trained[name].lora_B)
