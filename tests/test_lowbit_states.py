"""Storage policy (emoq.states): quantization error bounds, zero-free second moments, sizes,
small-tensor fallback and portable export/import."""

import io

import pytest
import torch

from emoq.states import BLOCK_SIZE, StateStorage, is_lowbit, parts, precision_of, qmap, state_bytes

LOWBIT = ["8bit", "4bit", "fp8"]


def half_gap(precision: str, signed: bool) -> float:
    """Worst rounding error of a map, as a fraction of the block maximum: half the largest gap
    between adjacent codes (fp8 e4m3: half an ulp at the top binade, 32/448/2)."""
    if precision == "fp8":
        return 16.0 / 448.0
    values = sorted(qmap(precision, signed))
    return max(b - a for a, b in zip(values, values[1:])) / 2


def wide_range(n: int, signed: bool, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.logspace(-8, 0, n).view(-1)[torch.randperm(n, generator=g)]
    return x if signed else x.square()


@pytest.mark.parametrize("precision", LOWBIT)
@pytest.mark.parametrize("signed", [True, False])
def test_roundtrip_error_within_the_maps_half_gap(precision, signed):
    st = StateStorage(precision, min_lowbit_size=0)
    x = wide_range(64 * 256, signed)
    s = st.zeros(x.shape, signed=signed, device="cpu")
    assert is_lowbit(s) and precision_of(s) == precision
    st.store(s, x)
    y = st.load(s)
    block = BLOCK_SIZE[precision]
    if signed:
        err = (y - x).view(-1, block).abs()
        bound = half_gap(precision, True) * x.view(-1, block).abs().amax(1, keepdim=True)
    else:  # stored as sqrt(x): the bound holds in sqrt space
        err = (y.sqrt() - x.sqrt()).view(-1, block).abs()
        bound = half_gap(precision, False) * x.sqrt().view(-1, block).amax(1, keepdim=True)
        if precision != "fp8":  # zero-free: values below the smallest code read as that code
            bound = bound.clamp_min(min(qmap(precision, False)) * x.sqrt().view(-1, block).amax(1, keepdim=True))
    assert bool((err <= bound * (1 + 1e-5) + 1e-30).all()), float((err / bound).max())


@pytest.mark.parametrize("precision", LOWBIT)
def test_second_moment_never_dequantizes_to_zero(precision):
    # One huge entry per block and the rest spread over 20 decades: a map with a zero code
    # (torchao's 8-bit unsigned map, fp8) rounds the smallest to 0 -> m / (0 + eps) explodes.
    st = StateStorage(precision, min_lowbit_size=0)
    x = torch.logspace(-20, 0, 4096)
    x[::256] = 1.0
    x[100] = 0.0  # a true zero too
    s = st.zeros(x.shape, signed=False, device="cpu")
    st.store(s, x)
    assert bool((st.load(s) > 0).all())
    fresh = st.zeros((4096,), signed=False, device="cpu")  # freshly allocated zeros too
    assert bool((st.load(fresh) > 0).all())


def test_maps_used():
    # 8-bit: torchao's dynamic-tree maps, the unsigned one with 0 replaced (zero-free).
    from torchao.optim.subclass_8bit import get_qmap_signed, get_qmap_unsigned

    assert qmap("8bit", True) == tuple(get_qmap_signed())
    assert qmap("8bit", False)[1:] == tuple(get_qmap_unsigned())[1:] and qmap("8bit", False)[0] > 0
    assert min(qmap("4bit", False)) > 0


@pytest.mark.parametrize("precision,want", [("8bit", 1 + 4 / 256), ("4bit", 0.5 + 4 / 128), ("fp8", 1 + 4 / 256),
                                            ("bf16", 2.0), ("fp32", 4.0)])
def test_bytes_per_element(precision, want):
    st = StateStorage(precision)
    n = 1024 * 1024
    states = [st.zeros((1024, 1024), signed=s, device="cpu") for s in (True, False)]
    # the 256/16-entry map is shared by all states of one optimizer: count it out
    got = [(state_bytes(s) - (parts(s)[2].numel() * 4 if is_lowbit(s) and parts(s)[2] is not None else 0)) / n
           for s in states]
    assert got == [pytest.approx(want)] * 2


@pytest.mark.parametrize("precision", LOWBIT)
def test_small_tensor_fallback(precision):
    st = StateStorage(precision)  # default min_lowbit_size = 4096
    assert st.min_lowbit_size == 4096
    assert not is_lowbit(st.zeros((4095 // 256 * 256,), signed=True, device="cpu"))
    assert is_lowbit(st.zeros((16, 256), signed=True, device="cpu"))
    assert not is_lowbit(st.zeros((4096 + 1,), signed=True, device="cpu"))  # not a multiple of the block
    small = st.zeros((8, 16), signed=False, device="cpu")
    assert small.dtype == torch.float32 and not is_lowbit(small)
    assert is_lowbit(StateStorage(precision, min_lowbit_size=0).zeros((256,), signed=True, device="cpu"))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="state_precision"):
        StateStorage("int3")
    with pytest.raises(ValueError, match="min_lowbit_size"):
        StateStorage("8bit", min_lowbit_size=-1)


@pytest.mark.parametrize("src", LOWBIT)
@pytest.mark.parametrize("dst", ["fp32", "bf16", "8bit", "4bit", "fp8"])
@pytest.mark.parametrize("signed", [True, False])
def test_portable_export_import(src, dst, signed):
    """Saved at `src`, loaded at `dst`: the loaded value is the saved dequantized value, exactly
    for fp32, and within `dst`'s own rounding bound otherwise. Same precision: bit-exact."""
    a = StateStorage(src, min_lowbit_size=0)
    x = wide_range(16 * 256, signed, seed=1)
    s = a.zeros(x.shape, signed=signed, device="cpu")
    a.store(s, x)
    saved = a.load(s)
    buf = io.BytesIO()
    torch.save({"s": a.export(s)}, buf)
    buf.seek(0)
    value = torch.load(buf, weights_only=True)["s"]
    b = StateStorage(dst, min_lowbit_size=0)
    loaded = b.load(b.import_(value, signed=signed, device="cpu"))
    if dst == "fp32" or dst == src:
        assert torch.equal(loaded, saved)
    elif dst == "bf16":
        assert torch.equal(loaded, saved.bfloat16().float())
    else:
        block = BLOCK_SIZE[dst]
        ref, out = (saved, loaded) if signed else (saved.sqrt(), loaded.sqrt())
        bound = half_gap(dst, signed) * ref.view(-1, block).abs().amax(1, keepdim=True)
        if dst != "fp8" and not signed:
            bound = bound.clamp_min(min(qmap(dst, False)) * ref.view(-1, block).amax(1, keepdim=True))
        assert bool(((out - ref).view(-1, block).abs() <= bound * (1 + 1e-5) + 1e-30).all())


@pytest.mark.parametrize("precision", LOWBIT)
def test_lowbit_to_fp32_and_back(precision):
    # 8bit -> fp32 checkpoint -> 8bit. Dequantized values sit on map points, so the trip back is
    # exact except in blocks whose largest magnitude is negative (the signed maps' most negative
    # code is not -1, so the block scale shrinks and values re-round): error within one rounding.
    for signed in (True, False):
        a = StateStorage(precision, min_lowbit_size=0)
        s = a.zeros((4096,), signed=signed, device="cpu")
        a.store(s, wide_range(4096, signed, seed=2))
        before = a.load(s)
        as_fp32 = StateStorage("fp32").import_(a.export(s), signed=signed, device="cpu")
        assert torch.equal(as_fp32, before)
        after = a.load(a.import_(as_fp32, signed=signed, device="cpu"))
        block = BLOCK_SIZE[precision]
        ref, out = (before, after) if signed else (before.sqrt(), after.sqrt())
        bound = half_gap(precision, signed) * ref.view(-1, block).abs().amax(1, keepdim=True)
        assert bool(((out - ref).view(-1, block).abs() <= bound * (1 + 1e-5)).all())
        if not signed:
            torch.testing.assert_close(after, before, rtol=1e-6, atol=0)  # unsigned maps end at 1.0


def test_checkpoint_is_the_state_size():
    st = StateStorage("8bit")
    s = st.zeros((256, 256), signed=True, device="cpu")
    exported = st.export(s)
    n_bytes = exported["codes"].numel() * exported["codes"].element_size() + exported["scale"].numel() * 4
    assert n_bytes == 256 * 256 + 4 * 256 * 256 // 256
    assert all(v.numel() <= 2 for k, v in exported.items() if k not in ("codes", "scale"))  # 3 small header tensors
    assert StateStorage.saved_layout(exported) == ("8bit", True, (256, 256))


@pytest.mark.parametrize("precision", ["8bit", "4bit"])
@pytest.mark.parametrize("signed", [True, False])
def test_fast_encoding_gives_torchaos_codes(precision, signed):
    # The table lookup replaces torchao's binary search; the codes must be torchao's except
    # within one fp32 rounding of a rounding threshold (a handful in a million).
    from torchao.optim.quant_utils import quantize_4bit_with_qmap, quantize_8bit_with_qmap, scale_tensor

    from emoq.states import encode, encode_table

    values = qmap(precision, signed)
    table = encode_table(values)
    assert table is not None
    x = wide_range(1 << 20, signed, seed=3)
    x = x if signed else x.sqrt()
    scaled, _ = scale_tensor(x, BLOCK_SIZE[precision])
    q = torch.tensor(values)
    ref = (quantize_8bit_with_qmap if precision == "8bit" else quantize_4bit_with_qmap)(scaled, q)
    got = encode(scaled, table)
    differ = ref != got
    assert int(differ.sum()) <= 10
    if differ.any():  # and where they differ, both codes are as near as each other (a tie)
        d_ref = (q[ref[differ].long()] - scaled[differ]).abs()
        d_got = (q[got[differ].long()] - scaled[differ]).abs()
        torch.testing.assert_close(d_got, d_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("precision", LOWBIT)
@pytest.mark.parametrize("shape", [(8, 256), (3, 512)])
def test_zero_state_equals_quantized_zeros(precision, shape):
    # An unsigned (sqrt-stored) zero state is filled with one block's codes and scale (no fp32
    # copy of the whole tensor: on the 49152 x 576 embedding the first step's peak was 1.4 GB over
    # the states): the same bytes as quantizing a whole tensor of zeros. Signed ones read as zero.
    from emoq.states import quantize_parts_

    st = StateStorage(precision, min_lowbit_size=0)
    s = st.zeros(shape, signed=False, device="cpu")
    codes, scale, qmap_t = parts(s)
    want_codes, want_scale = torch.zeros_like(codes), torch.zeros_like(scale)
    quantize_parts_(precision, False, want_codes, want_scale, qmap_t, torch.zeros(shape))
    assert torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8))
    assert torch.equal(scale, want_scale)
    assert torch.equal(st.load(st.zeros(shape, signed=True, device="cpu")), torch.zeros(shape))


def _special_blocks(signed: bool) -> torch.Tensor:
    """16 blocks of 256: zeros, -0, subnormals, values around the 1e-12 scale floor, +-inf among
    normals, a NaN, values near fp32's largest, and a wide random range."""
    tiny = torch.finfo(torch.float32).tiny
    x = wide_range(16 * 256, True, seed=11).view(16, 256).clone()
    x[0] = 0.0
    x[1] = -0.0
    x[1, ::3] = 0.0
    x[2] = torch.linspace(-3, 3, 256) * tiny / 8  # subnormals
    x[3] = torch.tensor([1e-12, 9.999999e-13, 1.0000001e-12, -1e-12]).repeat(64)
    x[4, ::17] = float("inf")
    x[4, 5::17] = -float("inf")
    x[5, 100] = float("nan")
    x[6] = torch.linspace(-3.4e38, 3.4e38, 256, dtype=torch.float64).float()
    x[7] = torch.linspace(-1, 1, 256)
    return (x if signed else x.abs() * torch.where(torch.arange(256) % 5 == 0, -1.0, 1.0)).reshape(-1)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("compiled", [False, True])
def test_blockwise_8bit_quantization_equals_torchaos_composition(signed, compiled):
    # quantize_8bit + scale_8bit (the clip taken after the block max, and for unsigned states the
    # square root of the largest value rather than the largest square root, so that a compiled step
    # reads each block once) give the codes and scales of the composition they replace: saturate,
    # sqrt for unsigned states, torchao's scale_tensor, the table encode; bit for bit, NaN, -0,
    # subnormals, infinities and blocks of zeros included, eager and compiled.
    from torchao.optim.quant_utils import scale_tensor

    from emoq.arith import sqrt
    from emoq.kernels import COMPILE_OPTIONS
    from emoq.states import FP32_MAX, encode, encode_table, quantize_8bit, scale_8bit

    values = qmap("8bit", signed)
    table, q = encode_table(values), torch.tensor(values)
    x = _special_blocks(signed)

    def ours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes, peak = quantize_8bit(signed, x, 16, q, table)
        return codes.reshape(-1), scale_8bit(signed, peak).reshape(-1)

    codes, scale = (torch.compile(ours, **COMPILE_OPTIONS) if compiled else ours)(x)
    y = x.clamp(-FP32_MAX, FP32_MAX) if signed else sqrt(x.clamp(0.0, FP32_MAX))
    scaled, want_scale = scale_tensor(y, 256)
    assert torch.equal(codes, encode(scaled, table))
    nan = want_scale.isnan()  # NaN where the block holds one (its payload may differ)
    assert torch.equal(scale.isnan(), nan) and bool(nan[5]) and int(nan.sum()) == 1
    assert torch.equal(scale[~nan].view(torch.int32), want_scale[~nan].view(torch.int32))
    assert float(scale[0]) == float(scale[1]) == float(torch.tensor(1e-12))
