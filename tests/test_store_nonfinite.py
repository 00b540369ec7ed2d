"""The NaN/Inf count that the CPU kernels take in their store, on the output bits written
(csrc/cpu/fm_cpu_block.h store_block, merge_avx512.h fast_store, della.cpp's apply), against a
second pass over the written bytes (_core.count_nonfinite): over output dtypes, model dtypes,
combines, odd sizes, block and work-item boundaries, values that overflow float16 only, and both
the AVX-512 block path and the generic code. And that the native pipeline takes that count: the
separate pass (report.nonfinite_in) is not called, the error messages stay the same."""
from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from fastmerge import abi
from fastmerge.methods import resolve_spec
from fastmerge.methods.core import Job
from fastmerge.methods.della import DELLA
from fastmerge.output.report import NonFiniteOutput
from fastmerge.pipeline.native import core, merge_natively
from fastmerge.planning.planner import plan_rows
from fastmerge.recipe.config import load_config

pytestmark = pytest.mark.skipif(core() is None or not hasattr(core(), "set_merge_fast_path"),
                                reason="fastmerge._core is not built")

ST = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
CODES = {"F32": abi.DTYPE_FLOAT32, "F16": abi.DTYPE_FLOAT16, "BF16": abi.DTYPE_BFLOAT16}
# odd sizes, one block (512) and its neighbours, two work items of 65536 elements (two threads)
SIZES = [1, 33, 512, 1000, 65536 + 700]
METHODS = {
    "task_arithmetic": {},
    "ties": {"density": 0.6, "normalize": False},
    "dare_ties": {"density": 0.6, "normalize": False},
    "breadcrumbs": {"density": 0.6, "gamma": 0.01},
    "consensus_ties": {"density": 0.6, "normalize": False},
    "linear": {"normalize": False},
}


def _buf(t):
    return t.reshape(-1).contiguous().view(torch.uint8).numpy()


def _positions(numel):
    """Where the large values go: the first element, block and work-item boundaries, the last."""
    return sorted({p for p in (0, 31, 32, 511, 512, 513, 65535, 65536, numel - 1) if p < numel})


def _inputs(numel, n, dtype, value, seed=0):
    """base + small task vectors, ``value`` at _positions in every model (the base 0 there)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=g)
    at = _positions(numel)
    base[at] = 0.0
    models = []
    for _ in range(n):
        m = base + 0.01 * torch.randn(numel, generator=g)
        m[at] = value
        models.append(m.to(dtype))
    return base.to(dtype), models


def _core_merge(method, base, models, out_st, offset=0):
    """CoreKernels' fused pass over one chunk: (the output with the store's count, its bytes)."""
    from fastmerge.pipeline.core_kernels import BytesChunk, CoreKernels
    k = CoreKernels()
    k.nthreads = 2
    numel = models[0].numel()
    with_base = method != "linear"
    ch = BytesChunk(_buf(base) if with_base else None, [_buf(m) for m in models],
                    ST[base.dtype] if with_base else None, [ST[m.dtype] for m in models],
                    offset, numel)
    spec = resolve_spec(method, len(models), **METHODS[method])
    plan = plan_rows(spec, numel, "model.layers.0.w", k, lambda: [ch])
    out, bad = k.merge(ch, plan, out_st, 0)
    assert not any(bad)
    return out, bytes(out.data)


def _pass_over(data: bytes, st: str):
    count, first = core().count_nonfinite(data, CODES[st])
    return None if count == 0 else (count, first)


@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("out_st", ["F32", "BF16", "F16"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_store_count_equals_a_pass_over_the_output(method, out_st, model_dtype):
    lib = core()
    for n in (1, 3):
        # 7e4 in total overflows float16 only; 3e38 every dtype (float16 models cannot hold it)
        values = [1.0, 7e4 / n] + ([3e38] if model_dtype != torch.float16 else [])
        for value in values:
            if model_dtype == torch.float16 and value > 65504:
                continue
            for numel in SIZES:
                if (value == 1.0 and numel != 1000) or (n == 1 and numel > 1000):
                    continue   # the all-finite case and one model: fewer sizes (time)
                base, models = _inputs(numel, n, model_dtype, value, seed=numel)
                got = {}
                for fast in (True, False):
                    old = lib.set_merge_fast_path(fast)
                    try:
                        out, data = _core_merge(method, base, models, out_st, offset=3 * fast)
                    finally:
                        lib.set_merge_fast_path(old)
                    assert out.nonfinite == _pass_over(data, out_st), (n, value, numel, fast)
                    got[fast] = out.nonfinite
                if method in ("task_arithmetic", "linear") and value != 1.0 and \
                        (out_st == "F16" or (value == 3e38 and n > 1)):
                    # every large value kept: each one overflows what is written
                    assert got[True] == (len(_positions(numel)), 0), (n, value, numel)
                if value == 1.0:
                    assert got[True] is None


def test_fast_path_counts_what_rounding_to_bf16_overflows():
    """A float32 result below the float32 maximum that rounds up to bf16 Inf: the AVX-512 path
    (bf16 models and output, a block of 512) counts it as the generic code does."""
    lib = core()
    numel = 1024
    base = torch.zeros(numel, dtype=torch.bfloat16)
    big = torch.tensor(3.3895e38, dtype=torch.bfloat16)   # the largest finite bf16
    models = [torch.zeros(numel, dtype=torch.bfloat16) for _ in range(2)]
    for m in models:
        m[[7, 600, 1023]] = big
    for fast in (True, False):
        old = lib.set_merge_fast_path(fast)
        try:
            out, data = _core_merge("task_arithmetic", base, models, "BF16")
        finally:
            lib.set_merge_fast_path(old)
        assert out.nonfinite == (3, 7) == _pass_over(data, "BF16")


def test_float16_bound():
    """float32 results either side of float16's rounding bound (65520 rounds to Inf, the float32
    below it to 65504): exactly those at or above it counted, in any block position."""
    numel = 1100
    base = torch.zeros(numel)
    model = torch.zeros(numel)
    below = torch.tensor(65520.0).nextafter(torch.tensor(0.0)).item()
    values = {5: below, 6: 65520.0, 511: -65520.0, 512: -below, 1099: float(65504)}
    for at, v in values.items():
        model[at] = v
    out, data = _core_merge("task_arithmetic", base, [model], "F16")
    written = torch.frombuffer(bytearray(data), dtype=torch.float16)
    assert out.nonfinite == (2, 6) == _pass_over(data, "F16")
    assert written[5] == 65504 and written[512] == -65504 and torch.isinf(written[[6, 511]]).all()


def test_nan_from_finite_inputs_is_counted():
    """lambda 0 times an overflowed sum is NaN: counted too (exponent all ones)."""
    from fastmerge.pipeline.core_kernels import BytesChunk, CoreKernels
    k = CoreKernels()
    base, models = _inputs(700, 2, torch.float32, 3e38)
    ch = BytesChunk(_buf(base), [_buf(m) for m in models], "F32", ["F32", "F32"], 0, 700)
    spec = resolve_spec("task_arithmetic", 2, lambda_=0.0)
    plan = plan_rows(spec, 700, "w", k, lambda: [ch])
    for st, dtype in (("F32", torch.float32), ("BF16", torch.bfloat16), ("F16", torch.float16)):
        out, _ = k.merge(ch, plan, st, 1)
        written = torch.frombuffer(bytearray(out.data), dtype=dtype)
        assert torch.isnan(written).sum() == len(_positions(700))
        assert out.nonfinite == _pass_over(bytes(out.data), st) == (len(_positions(700)), 0)


@pytest.mark.parametrize("out_st", ["F32", "BF16", "F16"])
@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_della_store_count(out_st, model_dtype):
    from fastmerge.backends.cpu.della import kernel_for
    for shape in [(1,), (3, 7), (5, 301), (2, 40000)]:
        numel = shape[0] * shape[1] if len(shape) == 2 else shape[0]
        for value in (1.0, 3.5e4, 3e38):
            if model_dtype == torch.float16 and value > 65504:
                continue
            base, models = _inputs(numel, 2, model_dtype, value, seed=numel)
            params = {"weight": [1.0, 1.0], "density": [1.0, 1.0], "epsilon": [0.0, 0.0],
                      "lambda": 1.0, "normalize": False}
            job = Job(shape, DELLA.schema.resolve(params, 2), "model.w", 0, True, 2)
            k = kernel_for(DELLA, job, 2)
            ch = (_buf(base), CODES[ST[model_dtype]], [_buf(m) for m in models],
                  [CODES[ST[model_dtype]]] * 2, 0, numel)
            k.reduce([ch])
            out = bytearray(numel * (4 if out_st == "F32" else 2))
            count, first = k.apply(ch, out, CODES[out_st])
            want = _pass_over(bytes(out), out_st)
            assert (None if count == 0 else (count, first)) == want, (shape, value)
            if value == 3e38 or (value == 3.5e4 and out_st == "F16"):
                assert want == (len(_positions(numel)), 0), (shape, value)


# ----------------------------------------------------------------------------- the pipeline
BIG = "model.layers.0.mlp.weight"


def _checkpoints(root, value, dtype=torch.float32, bad_at=(12, 3)):
    paths = {}
    g = torch.Generator().manual_seed(1)
    base = torch.randn(16, 32)
    for name in ("base", "m0", "m1"):
        w = base.clone() if name == "base" else base + 0.01 * torch.randn(16, 32, generator=g)
        if name != "base":
            w[bad_at] = value
        d = root / name
        d.mkdir()
        save_file({BIG: w.to(dtype), "model.norm.weight": torch.ones(32, dtype=dtype)},
                  str(d / "model.safetensors"))
        paths[name] = str(d)
    return paths


def _config(tmp_path, paths, method, **extra):
    each = {"parameters": {"weight": 1.0}} if method.startswith("della") else {}
    raw = {"merge_method": method, "base_model": paths["base"],
           "models": [{"model": paths["m0"], **each}, {"model": paths["m1"], **each}], **extra}
    path = tmp_path / f"{method}.yml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(str(path))


@pytest.fixture
def no_second_pass(monkeypatch):
    """report.nonfinite_in (the pass over an output chunk's bytes) fails if called."""
    def fail(*_):
        raise AssertionError("the output was checked by a second pass")
    import fastmerge.output.report as report
    import fastmerge.pipeline.core_kernels as core_kernels
    monkeypatch.setattr(report, "nonfinite_in", fail)
    monkeypatch.setattr(core_kernels, "nonfinite_in", fail)


@pytest.mark.parametrize("method,extra", [
    ("task_arithmetic", {}),
    ("ties", {"parameters": {"density": 0.5}}),
    ("dare_ties", {"parameters": {"density": 0.5}}),
    ("model_stock", {}),
    ("slerp", {"parameters": {"t": 0.3}}),
    ("della", {"parameters": {"density": 0.5, "epsilon": 0.1}}),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_native_merge_takes_the_store_count(tmp_path, no_second_pass, method, extra, dtype):
    paths = _checkpoints(tmp_path, 0.5, dtype)
    if method == "slerp":
        extra = {**extra, "models": [{"model": paths["base"]}, {"model": paths["m0"]}]}
    out = tmp_path / "out"
    merge_natively(_config(tmp_path, paths, method, **extra), out)
    got = load_file(str(next(out.glob("*.safetensors"))))[BIG]
    assert got.dtype == dtype and torch.isfinite(got.float()).all()


@pytest.mark.parametrize("method", ["task_arithmetic", "della_linear"])
def test_overflow_error_from_the_store_count(tmp_path, no_second_pass, method):
    """The same message as the separate pass gave (tests/test_nonfinite_output.py): the count
    and the first element of the chunk (element 12 * 32 + 3, in the chunk [384, 416))."""
    paths = _checkpoints(tmp_path, 4e4)
    extra = {"dtype": "float16"}
    if method == "della_linear":
        extra["parameters"] = {"density": 1.0, "epsilon": 0.0, "normalize": False}
    cfg = _config(tmp_path, paths, method, **extra)
    with pytest.raises(NonFiniteOutput, match=rf"tensor '{BIG}'.* 1 NaN/Inf value\(s\) among "
                                              rf"elements \[384, 416\), the first at element "
                                              rf"{12 * 32 + 3}\b.*float16"):
        merge_natively(cfg, tmp_path / "out", max_chunk_elems=32)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("out_st", ["BF16", "F16"])
@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_first_index_when_the_first_work_item_is_finite(method, out_st):
    """The NaN/Inf values only in later work items (65536 elements each, two threads), the
    earliest in the last one a thread takes: the count's first index is the smallest, on both
    the AVX-512 block path and the generic code (the other tests put one at element 0)."""
    lib = core()
    numel = 4 * 65536 + 123
    for at in ([3 * 65536 + 1, 65536 + 700], [131071], [65536 + 5, 2 * 65536 + 9]):
        g = torch.Generator().manual_seed(len(at))
        base = torch.randn(numel, generator=g)
        models = []
        for _ in range(2):
            m = base + 0.01 * torch.randn(numel, generator=g)
            m[at] = base[at] + 3e38
            models.append(m.to(torch.bfloat16))
        for fast in (True, False):
            old = lib.set_merge_fast_path(fast)
            try:
                out, data = _core_merge(method, base.to(torch.bfloat16), models, out_st)
            finally:
                lib.set_merge_fast_path(old)
            assert out.nonfinite == _pass_over(data, out_st) == (len(at), min(at)), (at, fast)
