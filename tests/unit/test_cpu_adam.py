"""zray.ops CPU Adam: the compiled step against its plain-PyTorch reference and against
torch.optim.Adam / AdamW; every ISA against the scalar body; CPUAdam; the fallback.

With ZRAY_REQUIRE_EXT=1 (CI sets it) a missing or broken `zray._C` fails the compiled-path
tests instead of skipping them, so a build regression cannot pass silently.

[Note: what "relative error 1e-6" means here]
Kernel and reference perform the same float32 operations in the same order, but torch's own CPU
kernels may fuse a multiply and an add (lerp, addcmul) where zray's never do, so a few elements
differ by an ulp or so. Elementwise relative error is meaningless where a sum nearly cancels (an
exp_avg or a param that crosses zero: one ulp of the terms is a large fraction of the result),
so `_assert_close` bounds |got - want| by 1e-6 x (|want| + max|want|): relative to the element
where it is large, to the tensor's scale where it cancels. The 16-bit outputs and the ISA /
thread comparisons are checked bit for bit.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import warnings
import zlib
from types import ModuleType

import pytest
import torch

from zray import ops
from zray.ops import _extension

REQUIRE_EXT = os.environ.get("ZRAY_REQUIRE_EXT", "") == "1"

GRAD_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OUT_DTYPES = [None, torch.bfloat16, torch.float16]
# Not multiples of the vector widths (8 / 16) nor of each other, plus one length that spans two
# OpenMP chunks (65,536 elements) with a ragged last one.
LENGTHS = [0, 1, 7, 15, 16, 17, 33, 1023, 100_003]
# (adamw_mode, weight_decay): both modes with decay on and off.
DECAYS = [(True, 0.0), (True, 0.1), (False, 0.0), (False, 0.1)]
RTOL = 1e-6
HYPER = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8}
GRAD_SCALE = 0.37  # not a power of two, so the multiply rounds


@pytest.fixture(scope="module")
def ext() -> ModuleType:
    """The compiled extension; skips (or fails under ZRAY_REQUIRE_EXT=1) when it is not built."""
    loader = _extension.EXTENSION
    if not loader.provides(ops.cpu_adam.KERNEL):
        message = (
            f"zray._C is not built or lacks adam_step ({loader.error}). "
            "Build it with `pip install -e .`"
        )
        if REQUIRE_EXT:
            pytest.fail(message)
        pytest.skip(message)
    return loader._load()


def _isas(ext: ModuleType) -> list[str]:
    return list(ext.build_info()["isa_supported"])


def _gen(seed: int | str) -> torch.Generator:
    """A generator seeded from the test's parameters: fresh inputs per case, reproducible."""
    if isinstance(seed, str):
        seed = zlib.crc32(seed.encode())
    return torch.Generator().manual_seed(seed)


def _grad(n: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    # Magnitudes over ~4 decades (x * e^N(0,1)), inside float16's range even after / 0.37.
    x = torch.randn(n, generator=g, dtype=torch.float64)
    x *= torch.exp(torch.randn(n, generator=g, dtype=torch.float64))
    return x.to(dtype)


def _state(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A param and moments as after some steps: exp_avg of both signs, exp_avg_sq >= 0."""
    param = torch.randn(n, generator=g)
    exp_avg = 0.1 * torch.randn(n, generator=g)
    exp_avg_sq = 0.01 * torch.rand(n, generator=g) ** 2
    return param, exp_avg, exp_avg_sq


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """|got - want| <= RTOL * (|want| + max|want|), elementwise (see the note at the top);
    inf and nan where the reference has them."""
    assert got.dtype == want.dtype and got.shape == want.shape, what
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: nan positions differ"
    inf = torch.isinf(want)
    assert torch.equal(got[inf], want[inf]), f"{what}: inf positions differ"
    finite = torch.isfinite(want)
    g, w = got[finite].double(), want[finite].double()
    if w.numel() == 0:
        return
    err = (g - w).abs()
    bound = RTOL * (w.abs() + w.abs().max())
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), (
        f"{what}: element {worst}: got {g[worst].item()!r}, want {w[worst].item()!r}, "
        f"error {err[worst].item():.3g} > bound {bound[worst].item():.3g}"
    )


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (nan patterns included) of two float tensors of one dtype."""
    as_int = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    return a.dtype == b.dtype and torch.equal(a.view(as_int[a.dtype]), b.view(as_int[b.dtype]))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a 16-bit tensor, to compare without float semantics (nan != nan)."""
    return t.view(torch.int16)


def _assert_rounded_exactly(out: torch.Tensor, param: torch.Tensor) -> None:
    """out holds param rounded to out.dtype to nearest-even, as torch's own cast does."""
    want = param.to(out.dtype)  # torch's float32 -> bf16 / fp16 conversion: nearest-even
    nan = torch.isnan(param)
    assert torch.equal(torch.isnan(out), nan)
    assert torch.equal(_bits(out)[~nan], _bits(want)[~nan])


# ---- compiled kernel == reference ----------------------------------------------------------


def test_kernel_listed_in_report(ext: ModuleType) -> None:
    report = ops.kernel_report()
    info = report["build_info"]
    assert report["kernels"]["adam_step"] == "compiled"
    assert report["isa"]["adam_step"] == info["isa_selected"]
    assert info["isa_selected"] in info["isa_supported"]
    assert info["adam_chunk_elements"] % 16 == 0  # every chunk but the last is whole vectors
    if sys.platform == "linux" and os.uname().machine == "x86_64":
        assert {"scalar", "avx2", "avx512f"} <= set(info["isa_compiled"])


@pytest.mark.parametrize(("adamw_mode", "weight_decay"), DECAYS, ids=lambda v: str(v))
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES, ids=str)
@pytest.mark.parametrize("n", LENGTHS)
def test_step_matches_reference(
    ext: ModuleType,
    n: int,
    grad_dtype: torch.dtype,
    out_dtype: torch.dtype | None,
    adamw_mode: bool,
    weight_decay: float,
) -> None:
    gen = _gen(f"{n} {grad_dtype} {out_dtype} {adamw_mode} {weight_decay}")
    param, exp_avg, exp_avg_sq = _state(n, gen)
    got = [param.clone(), exp_avg.clone(), exp_avg_sq.clone()]
    want = [param.clone(), exp_avg.clone(), exp_avg_sq.clone()]
    for step in (1, 2, 3):  # several steps in a row, a fresh gradient each
        grad = _grad(n, grad_dtype, gen)
        grad_before = grad.clone()
        out_got = None if out_dtype is None else torch.full((n,), 7.0, dtype=out_dtype)
        out_want = None if out_dtype is None else torch.empty(n, dtype=out_dtype)
        kwargs = {
            **HYPER,
            "step": step,
            "weight_decay": weight_decay,
            "adamw_mode": adamw_mode,
            "grad_scale": GRAD_SCALE,
        }
        ops.adam_step(*got[:1], grad, *got[1:], out=out_got, **kwargs)
        ops.adam_step_reference(*want[:1], grad, *want[1:], out=out_want, **kwargs)
        assert torch.equal(grad, grad_before), "the gradient must not be modified"
        for name, a, b in zip(("param", "exp_avg", "exp_avg_sq"), got, want, strict=True):
            _assert_close(a, b, f"step {step} {name}")
        if out_got is not None:
            _assert_rounded_exactly(out_got, got[0])
            _assert_rounded_exactly(out_want, want[0])


@pytest.mark.parametrize(
    ("betas", "step"),
    [((0.9, 0.999), 10_000), ((0.3, 0.99), 1), ((0.5, 0.5), 2), ((0.0, 0.0), 1)],
    ids=["late-step", "beta1-below-half", "beta1-half", "betas-zero"],
)
@pytest.mark.parametrize("adamw_mode", [True, False])
def test_other_hyperparameters_match_reference(
    ext: ModuleType, betas: tuple[float, float], step: int, adamw_mode: bool
) -> None:
    # beta1 <= 0.5 takes torch's other lerp formula (weight >= 0.5); a late step has bias
    # corrections ~1; betas 0 make Adam sign-like.
    gen = _gen(step)
    param, exp_avg, exp_avg_sq = _state(4099, gen)
    grad = _grad(4099, torch.bfloat16, gen)
    got = [param.clone(), exp_avg.clone(), exp_avg_sq.clone()]
    want = [param.clone(), exp_avg.clone(), exp_avg_sq.clone()]
    out_got = torch.empty(4099, dtype=torch.float16)
    kwargs = {"lr": 3e-3, "betas": betas, "eps": 1e-6, "weight_decay": 0.05, "step": step}
    ops.adam_step(got[0], grad, got[1], got[2], adamw_mode=adamw_mode, out=out_got, **kwargs)
    ops.adam_step_reference(want[0], grad, want[1], want[2], adamw_mode=adamw_mode, **kwargs)
    for name, a, b in zip(("param", "exp_avg", "exp_avg_sq"), got, want, strict=True):
        _assert_close(a, b, name)
    _assert_rounded_exactly(out_got, got[0])


@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES, ids=str)
def test_nonfinite_gradients_propagate_like_reference(
    ext: ModuleType, grad_dtype: torch.dtype
) -> None:
    # The engine skips the step on overflow, but the kernel must not hide inf / nan either.
    gen = _gen(5)
    param, exp_avg, exp_avg_sq = _state(1000, gen)
    grad = _grad(1000, grad_dtype, gen)
    grad[[0, 17, 999]] = math.inf
    grad[[3, 500]] = -math.inf
    grad[[8, 33]] = math.nan
    got = [param.clone(), exp_avg.clone(), exp_avg_sq.clone()]
    want = [param.clone(), exp_avg.clone(), exp_avg_sq.clone()]
    out = torch.empty(1000, dtype=torch.bfloat16)
    kwargs = {**HYPER, "step": 1, "weight_decay": 0.1}
    ops.adam_step(got[0], grad, got[1], got[2], out=out, **kwargs)
    ops.adam_step_reference(want[0], grad, want[1], want[2], **kwargs)
    for name, a, b in zip(("param", "exp_avg", "exp_avg_sq"), got, want, strict=True):
        _assert_close(a, b, name)
    assert torch.isnan(got[0][[0, 3, 8]]).all()
    _assert_rounded_exactly(out, got[0])


# ---- every ISA and thread count computes the same bits -------------------------------------


@pytest.mark.parametrize(("adamw_mode", "weight_decay"), DECAYS[1:], ids=lambda v: str(v))
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES, ids=str)
def test_every_isa_gives_the_scalar_bits(
    ext: ModuleType,
    grad_dtype: torch.dtype,
    out_dtype: torch.dtype | None,
    adamw_mode: bool,
    weight_decay: float,
) -> None:
    # 130,001 elements: two whole chunks, a ragged third, and a tail under every vector width.
    n = 130_001
    gen = _gen(11)
    start = _state(n, gen)
    grads = [_grad(n, grad_dtype, gen) for _ in range(2)]
    results = {}
    for isa in _isas(ext):
        bufs = [t.clone() for t in start]
        out = None if out_dtype is None else torch.empty(n, dtype=out_dtype)
        for step, grad in enumerate(grads, start=1):
            ops.adam_step(
                bufs[0],
                grad,
                bufs[1],
                bufs[2],
                step=step,
                weight_decay=weight_decay,
                adamw_mode=adamw_mode,
                grad_scale=GRAD_SCALE,
                out=out,
                isa=isa,
                **HYPER,
            )
        results[isa] = [*bufs, *([] if out is None else [out])]
    scalar = results.pop("scalar")
    for isa, tensors in results.items():
        for a, b in zip(tensors, scalar, strict=True):
            assert _same_bits(a, b), isa


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_unaligned_output_gives_the_same_bits(ext: ModuleType, out_dtype: torch.dtype) -> None:
    # An aligned 16-bit output takes streaming stores, an unaligned one (a view one element
    # in) ordinary stores: both must write the same values.
    n = 70_001
    gen = _gen(14)
    start = _state(n, gen)
    grad = _grad(n, torch.float16, gen)
    for isa in _isas(ext):
        outs = []
        for offset in (0, 1):
            p, m, v = (t.clone() for t in start)
            out = torch.empty(n + offset, dtype=out_dtype)[offset:]
            assert out.data_ptr() % 16 == 2 * offset  # torch allocates 64-byte aligned
            ops.adam_step(p, grad, m, v, step=1, out=out, isa=isa, **HYPER)
            outs.append(out.clone())
        assert _same_bits(outs[0], outs[1]), isa


def test_same_bits_for_every_thread_count(ext: ModuleType) -> None:
    n = 300_007
    gen = _gen(12)
    start = _state(n, gen)
    grad = _grad(n, torch.bfloat16, gen)
    code = ext.DTYPE_CODES
    results = []
    for threads in (1, 2, 3, 5):
        p, m, v = (t.clone() for t in start)
        out = torch.empty(n, dtype=torch.bfloat16)
        ext.adam_step(
            p.data_ptr(),
            grad.data_ptr(),
            code["bfloat16"],
            m.data_ptr(),
            v.data_ptr(),
            n,
            1.0,
            1e-3,
            0.9,
            0.999,
            1e-8,
            0.01,
            True,
            grad_scale=0.5,
            out=out.data_ptr(),
            out_dtype=code["bfloat16"],
            num_threads=threads,
        )
        results.append((p, m, v, out))
    for other in results[1:]:
        assert all(_same_bits(a, b) for a, b in zip(results[0], other, strict=True))


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_output_rounds_like_torch_for_hard_values(
    ext: ModuleType, out_dtype: torch.dtype
) -> None:
    # lr = 0 with zero gradient and moments leaves param bit for bit (p + (-0 * 0) / eps), so
    # the 16-bit output is the conversion alone: check it on ties, subnormals, the overflow edge.
    gen = _gen(13)

    def bits(hi: torch.Tensor, lo: torch.Tensor | int) -> torch.Tensor:
        return ((hi << 16) | lo).view(torch.float32)  # int32 arithmetic: no overflow

    hi = torch.randint(-(2**15), 2**15, (200_000,), generator=gen, dtype=torch.int32)
    lo = torch.randint(0, 2**16, (200_000,), generator=gen, dtype=torch.int32)
    values = [bits(hi, lo)]  # random bit patterns: every exponent, some nans
    for low in (0x7FFF, 0x8000, 0x8001, 0x0001, 0xFFFF):  # bf16: ties and their neighbours
        values.append(bits(hi[:20_000], low))
    # Every finite float16, the midpoints between neighbours (ties), and one float32 ulp either
    # side; then the overflow edge (65520 rounds to inf) and the subnormal floor.
    fp16 = torch.arange(0, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    ulp = torch.nextafter(fp16, torch.tensor(math.inf)) - fp16
    values += [
        fp16,
        ((fp16[:-1].double() + fp16[1:].double()) / 2).float(),
        fp16 + ulp,
        fp16 - ulp,
        torch.tensor([65504.0, 65519.99, 65520.0, 65536.0, 2.0**-24, 2.0**-25, 2.0**-26]),
    ]
    finite16 = torch.cat(values[-5:])
    values += [-finite16, torch.tensor([math.inf, -math.inf, 0.0, -0.0, math.nan])]
    params = torch.cat(values)
    n = params.numel()
    zeros = torch.zeros(n)
    for isa in _isas(ext):
        p = params.clone()
        out = torch.empty(n, dtype=out_dtype)
        ops.adam_step(
            p,
            zeros,
            zeros.clone(),
            zeros.clone(),
            step=1,
            lr=0.0,
            betas=(0.9, 0.999),
            eps=1e-8,
            out=out,
            isa=isa,
        )
        finite = ~torch.isnan(params)
        assert torch.equal(p[finite].view(torch.int32), params[finite].view(torch.int32)), isa
        _assert_rounded_exactly(out, params)


# ---- CPUAdam == torch.optim.Adam / AdamW ---------------------------------------------------


def _model_params(seed: int) -> list[torch.Tensor]:
    gen = _gen(seed)
    shapes = [(37, 19), (1023,), (16,), (1,), (3, 5, 7), (70_001,)]
    return [torch.randn(s, generator=gen) for s in shapes]


@pytest.mark.parametrize(("adamw_mode", "weight_decay"), DECAYS, ids=lambda v: str(v))
def test_cpu_adam_matches_torch_over_ten_steps(
    ext: ModuleType, adamw_mode: bool, weight_decay: float
) -> None:
    init = _model_params(21)
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]

    def groups(ps: list[torch.nn.Parameter]) -> list[dict[str, object]]:
        # Two groups with their own lr and decay, as a decay / no-decay split would have.
        return [
            {"params": ps[:3]},
            {"params": ps[3:], "lr": 3e-3, "weight_decay": weight_decay / 2},
        ]

    opt = ops.CPUAdam(groups(ours), lr=1e-2, weight_decay=weight_decay, adamw_mode=adamw_mode)
    torch_cls = torch.optim.AdamW if adamw_mode else torch.optim.Adam
    ref = torch_cls(groups(theirs), lr=1e-2, weight_decay=weight_decay, foreach=False)
    gen = _gen(22)
    for step in range(1, 11):
        for a, b in zip(ours, theirs, strict=True):
            grad = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            _assert_close(a.detach(), b.detach(), f"step {step} param {i}")
            sa, sb = opt.state[a], ref.state[b]
            assert sa["step"].dtype == sb["step"].dtype == torch.float32
            assert sa["step"].shape == () and sa["step"].item() == sb["step"].item() == step
            _assert_close(sa["exp_avg"], sb["exp_avg"], f"step {step} exp_avg {i}")
            _assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], f"step {step} exp_avg_sq {i}")


def test_cpu_adam_state_dict_round_trips_with_torch(ext: ModuleType) -> None:
    # Checkpoints are interchangeable: ours -> torch AdamW -> ours continues identically.
    init = _model_params(31)
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    opt = ops.CPUAdam(ours, lr=1e-2, weight_decay=0.1)
    gen = _gen(32)
    for _ in range(3):
        for p in ours:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    ref = torch.optim.AdamW(theirs, lr=1.0, foreach=False)
    # Deep copies, as a checkpoint on disk is: load_state_dict keeps the very tensors it gets.
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert ref.param_groups[0]["lr"] == 1e-2

    back = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt2 = ops.CPUAdam(back, lr=1.0, adamw_mode=False)
    opt2.load_state_dict(copy.deepcopy(ref.state_dict()))
    assert opt2.param_groups[0]["adamw_mode"] is True  # restored from the saved group

    for p, q, r in zip(ours, theirs, back, strict=True):
        grad = torch.randn(p.shape, generator=gen)
        p.grad, q.grad, r.grad = grad.clone(), grad.clone(), grad.clone()
    opt.step()
    ref.step()
    opt2.step()
    for p, q, r in zip(ours, theirs, back, strict=True):
        _assert_close(p.detach(), q.detach(), "ours vs torch after reload")
        assert torch.equal(p, r), "a round trip through torch's format must change nothing"
        assert opt2.state[r]["step"].item() == 4.0

    # The decay rule travels both ways: torch.optim.Adam (L2) carries decoupled_weight_decay,
    # which becomes adamw_mode here, and torch.optim.Adam loading ours keeps our rule.
    adam = torch.optim.Adam([torch.nn.Parameter(torch.ones(3))], weight_decay=0.1)
    plain = ops.CPUAdam([torch.nn.Parameter(torch.ones(3))])
    plain.load_state_dict(adam.state_dict())
    assert plain.param_groups[0]["adamw_mode"] is False
    saved = copy.deepcopy(opt.state_dict())
    adam.load_state_dict(
        {"state": {}, "param_groups": [{**saved["param_groups"][0], "params": [0]}]}
    )
    assert adam.param_groups[0]["decoupled_weight_decay"] is True


def test_cpu_adam_loads_deepspeed_int_step(ext: ModuleType) -> None:
    # DeepSpeedCPUAdam's state keeps `step` as an int; loading converts it to torch's tensor.
    p = torch.nn.Parameter(torch.ones(3))
    state = {
        "state": {0: {"step": 5, "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}},
        "param_groups": [
            {
                "lr": 0.1,
                "betas": (0.9, 0.999),
                "eps": 1e-8,
                "weight_decay": 0.0,
                "adamw_mode": True,
                "params": [0],
            }
        ],
    }
    opt = ops.CPUAdam([p])
    opt.load_state_dict(state)
    step = opt.state[p]["step"]
    assert torch.is_tensor(step) and step.dtype == torch.float32 and step.item() == 5.0
    p.grad = torch.ones(3)
    opt.step()
    assert opt.state[p]["step"].item() == 6.0


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES, ids=str)
def test_step_fused_equals_scaling_then_step(
    ext: ModuleType, grad_dtype: torch.dtype, out_dtype: torch.dtype | None
) -> None:
    # The fused offload step is exactly: widen, scale (one float32 multiply), step, round.
    init = _model_params(41)
    fused = [t.clone() for t in init]
    plain = [torch.nn.Parameter(t.clone()) for t in init]
    opt_fused = ops.CPUAdam(fused, lr=1e-2, weight_decay=0.1)
    opt_plain = ops.CPUAdam(plain, lr=1e-2, weight_decay=0.1)
    gen = _gen(42)
    for _ in range(3):
        grads = [_grad(t.numel(), grad_dtype, gen) for t in init]  # flat, as offload buffers are
        outs: list[torch.Tensor | None] | None = None
        if out_dtype is not None:
            outs = [torch.empty(t.numel(), dtype=out_dtype) for t in init]
            outs[1] = None  # no copy wanted for this one
        opt_fused.step_fused(grads, grad_scale=GRAD_SCALE, out_lowp=outs)
        for p, g in zip(plain, grads, strict=True):
            p.grad = (g.float() * GRAD_SCALE).view(p.shape)
        opt_plain.step()
        for i, (a, b) in enumerate(zip(fused, plain, strict=True)):
            assert torch.equal(a, b.detach()), i
            assert torch.equal(opt_fused.state[a]["exp_avg"], opt_plain.state[b]["exp_avg"])
            if outs is not None and outs[i] is not None:
                _assert_rounded_exactly(outs[i], a.flatten())


# ---- input checks ----------------------------------------------------------------------------


def _bufs(n: int = 8) -> dict[str, torch.Tensor]:
    return {"param": torch.ones(n), "grad": torch.ones(n), "m": torch.zeros(n), "v": torch.zeros(n)}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"param": torch.ones(8, dtype=torch.float64)}, "param dtype: got torch.float64"),
        ({"grad": torch.ones(8, dtype=torch.int32)}, "grad dtype: got torch.int32"),
        ({"m": torch.zeros(8, dtype=torch.bfloat16)}, "exp_avg dtype: got torch.bfloat16"),
        ({"v": torch.zeros(16)}, "exp_avg_sq has 16 elements"),
        ({"grad": torch.ones(4, 4).t()}, "grad must be contiguous"),
        ({"grad": torch.ones(9)}, "grad has 9 elements"),
        ({"m": torch.zeros(8, device="meta")}, "exp_avg device: got meta"),
        ({"out": torch.empty(8)}, "out dtype: got torch.float32"),
        ({"out": torch.empty(7, dtype=torch.bfloat16)}, "out has 7 elements"),
        ({"step": 0}, "step: got 0"),
        ({"step": math.nan}, "step: got nan"),
    ],
    ids=[
        "param-f64",
        "grad-int",
        "m-bf16",
        "v-numel",
        "grad-strided",
        "grad-numel",
        "meta",
        "out-f32",
        "out-numel",
        "step-0",
        "step-nan",
    ],
)
def test_adam_step_rejects_bad_input(change: dict[str, object], match: str) -> None:
    b = {**_bufs(), "out": None, "step": 1, **change}
    for fn in (ops.adam_step, ops.adam_step_reference):
        with pytest.raises(ValueError, match=match):
            fn(b["param"], b["grad"], b["m"], b["v"], step=b["step"], out=b["out"], **HYPER)


def test_extension_rejects_bad_arguments(ext: ModuleType) -> None:
    t = torch.ones(4)
    good = (t.data_ptr(), t.data_ptr(), 0, t.data_ptr(), t.data_ptr(), 4, 1.0, 1e-3, 0.9, 0.9)
    tail = (1e-8, 0.0, True)
    with pytest.raises(ValueError, match="dtype: got code 9"):
        ext.adam_step(*good[:2], 9, *good[3:], *tail)
    with pytest.raises(ValueError, match="numel: got -1"):
        ext.adam_step(*good[:5], -1, *good[6:], *tail)
    with pytest.raises(ValueError, match="step: got 0"):
        ext.adam_step(*good[:6], 0.0, *good[7:], *tail)
    with pytest.raises(ValueError, match="grad: got a null pointer"):
        ext.adam_step(good[0], 0, *good[2:], *tail)
    with pytest.raises(ValueError, match="out_dtype: got 0"):
        ext.adam_step(*good, *tail, out=t.data_ptr(), out_dtype=0)
    with pytest.raises(ValueError, match="out: got a null pointer"):
        ext.adam_step(*good, *tail, out=0, out_dtype=1)
    with pytest.raises(ValueError, match="isa: got 'sse9'"):
        ext.adam_step(*good, *tail, isa="sse9")
    ext.adam_step(0, 0, 0, 0, 0, 0, 1.0, 1e-3, 0.9, 0.9, *tail)  # nothing to do, nothing read


def test_cpu_adam_rejects_bad_arguments() -> None:
    p = torch.nn.Parameter(torch.ones(4))
    with pytest.raises(ValueError, match="lr: got -1"):
        ops.CPUAdam([p], lr=-1)
    with pytest.raises(ValueError, match=r"betas\[1\]: got 1.0"):
        ops.CPUAdam([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match=r"weight_decay: got -0\.1"):
        ops.CPUAdam([p], weight_decay=-0.1)
    with pytest.raises(ValueError, match=r"\['params'\]\[0\] dtype: got torch.bfloat16"):
        ops.CPUAdam([torch.ones(4, dtype=torch.bfloat16)])
    opt = ops.CPUAdam([p, torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="grads: got 1 tensors; expected 2"):
        opt.step_fused([torch.ones(4)])
    with pytest.raises(ValueError, match="out_lowp: got 1 tensors; expected 2"):
        opt.step_fused([torch.ones(4), torch.ones(2)], out_lowp=[torch.ones(4)])


# ---- fallback when the extension is missing -------------------------------------------------


def test_fallback_warns_once_and_is_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = _extension._Extension("zray._C_not_built_for_this_test")
    monkeypatch.setattr(_extension, "EXTENSION", missing)
    gen = _gen(51)
    param, m, v = _state(1023, gen)
    grad = _grad(1023, torch.bfloat16, gen)
    want = [param.clone(), m.clone(), v.clone()]
    got = [param.clone(), m.clone(), v.clone()]
    out_got, out_want = (torch.empty(1023, dtype=torch.bfloat16) for _ in range(2))
    kwargs = {**HYPER, "step": 1, "weight_decay": 0.1, "grad_scale": 0.5}
    opt = ops.CPUAdam([torch.nn.Parameter(param.clone())])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # count every warn() call, not just the first per place
        ops.adam_step(got[0], grad, got[1], got[2], out=out_got, **kwargs)
        opt.step_fused([grad], grad_scale=0.5)
        opt.step_fused([grad], grad_scale=0.5)
    fallbacks = [w for w in caught if "zray._C_not_built_for_this_test" in str(w.message)]
    assert len(fallbacks) == 1, [str(w.message) for w in caught]
    assert issubclass(fallbacks[0].category, RuntimeWarning)
    ops.adam_step_reference(want[0], grad, want[1], want[2], out=out_want, **kwargs)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(_bits(out_got), _bits(out_want))
    with pytest.raises(ValueError, match=r"isa: got 'avx2', but zray\._C is not built"):
        ops.adam_step(got[0], grad, got[1], got[2], isa="avx2", **kwargs)

    report = ops.kernel_report()
    assert report["kernels"]["adam_step"] == "reference"
    assert report["isa"]["adam_step"] == "reference"


def test_stale_extension_without_adam_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    # An extension that imports but predates this kernel (e.g. not rebuilt after a pull).
    old_build = ModuleType("zray_test_stale_adam_ext")
    old_build.build_info = lambda: {"isa_selected": "avx2"}  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, old_build.__name__, old_build)
    monkeypatch.setattr(_extension, "EXTENSION", _extension._Extension(old_build.__name__))
    p = torch.nn.Parameter(torch.ones(5))
    p.grad = torch.ones(5)
    with pytest.warns(RuntimeWarning, match="built without `adam_step`"):
        ops.CPUAdam([p], lr=0.1).step()
    assert torch.allclose(p.detach(), torch.full((5,), 0.9))  # first Adam step: p - lr * sign
    report = ops.kernel_report()
    assert report["kernels"]["adam_step"] == "reference"
    assert report["isa"]["adam_step"] == "reference"
