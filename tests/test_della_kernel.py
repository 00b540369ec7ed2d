"""The fused della / della_linear kernel (csrc/cpu/della.cpp via backends/cpu/della.py) against
the float32 reference (fastmerge/methods/della.py): identical keep masks, values within
test_ops.py's tolerances (byte-identical for N <= 4 models, where torch sums over the models in
order too, unless an L1 sum's float64 order moves a rescale factor by one float32 ulp), the same
bytes in any chunking, the pipeline (torch-free CLI, TorchKernels) and merge_tensors."""
from __future__ import annotations

import json
import math

import pytest
import torch
from engine_util import cli_merge_without_torch, load_dir, write_yaml
from safetensors.torch import save_file

from fastmerge.backends.cpu.della import kernel_for, merge_in_memory, torch_buffer, torch_codes
from fastmerge.methods.core import Job
from fastmerge.methods.della import DELLA, DELLA_LINEAR, della_mask, row_length
from fastmerge.pipeline.native import core

pytestmark = pytest.mark.skipif(core() is None or not hasattr(core(), "della"),
                                reason="fastmerge._core (with della) is not built")

TOLERANCE = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2.0 ** -23}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1,), (5,), (1, 1), (4, 1), (3, 7), (7, 301), (2, 3, 5), (1, 66000)]
METHODS = {"della": DELLA, "della_linear": DELLA_LINEAR}


def _inputs(shape, dtype, case, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = []
    for i in range(n):
        d = 0.01 * torch.randn(shape, generator=g)
        if case == "ties":        # few distinct |d|: ranks decided by the column
            d = torch.round(d * 300) / 300
        elif case == "zero":
            d = torch.zeros(shape)
        elif case == "equal":
            d = torch.full(shape, 0.005 * (i + 1))
        models.append(base + d)
    return base.to(dtype), [m.to(dtype) for m in models]


def _params(case, n=2):
    p = {"weight": [0.7, -0.4, 0.5][:n], "density": [0.4, 0.65, 0.5][:n],
         "epsilon": [0.1, 0.2, 0.15][:n], "lambda": 0.9}
    if case == "dense":
        p["density"] = [1.0, 0.0, 1.0][:n]
    elif case == "eps0":
        p["epsilon"] = [0.0] * n
    elif case == "negeps":
        p["epsilon"] = [-0.1, -0.2, -0.15][:n]
    elif case == "norescale":
        p["rescale"] = False
    elif case == "normalize":
        p["normalize"] = True
    return p


def _job(method, shape, params, n, name="model.w", seed=3):
    return Job(tuple(shape), method.schema.resolve(params, n), name, seed, True, n)


def _chunks(base, models, rows_per_chunk):
    """(buffers, codes, offset, numel) chunks of whole rows of the flat tensors."""
    codes = torch_codes()
    length = row_length(base.shape)
    flat = [base.reshape(-1)] + [m.reshape(-1) for m in models]
    step = rows_per_chunk * length
    for s in range(0, base.numel(), step):
        e = min(base.numel(), s + step)
        yield (torch_buffer(flat[0][s:e]), codes[base.dtype],
               [torch_buffer(f[s:e]) for f in flat[1:]], [codes[m.dtype] for m in models], s,
               e - s)


def _run(method, job, base, models, out_dtype, rows_per_chunk=None, keep_masks=True):
    k = kernel_for(method, job, 2)
    k.keep_masks = keep_masks
    rows = rows_per_chunk or max(1, base.numel() // row_length(base.shape))
    k.reduce(list(_chunks(base, models, rows)))
    out = torch.empty(base.numel(), dtype=out_dtype)
    buf = out.view(torch.uint8).numpy()
    size = out.element_size()
    for ch in _chunks(base, models, rows):
        off, numel = ch[4], ch[5]
        k.apply(ch, buf[off * size:(off + numel) * size], torch_codes()[out_dtype])
    return out.reshape(base.shape), k


def _kernel_masks(k, numel):
    """The keep masks the reduce pass kept, [n, numel] bool."""
    wpr = (k.row_len + 63) // 64
    words = torch.frombuffer(bytearray(k.mask), dtype=torch.int64).view(k.n, k.rows, wpr)
    bits = (words[..., None] >> torch.arange(64)) & 1
    return bits.reshape(k.n, k.rows, wpr * 64)[..., :k.row_len].reshape(k.n, numel).bool()


def _assert_close(got, ref, dtype):
    tol = TOLERANCE[dtype] * ref.float().abs() + 1e-6 * (ref.float().abs().max() + 1)
    assert ((got.float() - ref.float()).abs() <= tol).all()


CASES = ["plain", "ties", "zero", "equal", "dense", "eps0", "negeps", "norescale", "normalize"]
LONG_ROW = (1, 66000)
# every dtype x shape x case, but the long row (slow in the reference) once per method and tie
# case, in float32
GRID = [(dtype, shape, case) for dtype in DTYPES for shape in SHAPES for case in CASES
        if shape != LONG_ROW or (case in ("plain", "ties") and dtype == torch.float32)]


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("dtype,shape,case", GRID, ids=str)
def test_kernel_matches_reference(method, dtype, shape, case):
    m = METHODS[method]
    base, models = _inputs(shape, dtype, "plain" if case in _params_cases() else case)
    params = _params(case)
    job = _job(m, shape, params, 2)
    got, k = _run(m, job, base, models, dtype)
    ref = m.merge(base, models, params, name=job.name, seed=job.seed).to(dtype)
    _assert_close(got, ref, dtype)
    if k.mask is not None:   # the masks themselves: the reference's della_mask, bit for bit
        numel = base.numel()
        masks = _kernel_masks(k, numel)
        for i in range(2):
            d = models[i].reshape(-1).float() - base.reshape(-1).float()
            want = della_mask(d, 0, k.row_len, k.density[i], k.epsilon[i], job.seed, job.name, i)
            assert torch.equal(masks[i], want), i


@pytest.mark.parametrize("row", [127, 128, 1027, 4099])
@pytest.mark.parametrize("case", ["plain", "ties"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_masks_of_rows_ranked_in_lanes(row, case, dtype):
    """Rows of 128+ columns are ranked by the four-lane sort (della.cpp, radix_sort_lanes), on
    32-bit items where the varying |d| bits and the columns fit (bf16 task values), else on
    64-bit ones (float32): the reference's masks, bit for bit, at lengths on either side of the
    switch and not divisible by 4."""
    base, models = _inputs((3, row), dtype, case)
    params = _params("plain")
    job = _job(DELLA, base.shape, params, 2)
    _, k = _run(DELLA, job, base, models, dtype)
    masks = _kernel_masks(k, base.numel())
    for i in range(2):
        d = models[i].reshape(-1).float() - base.reshape(-1).float()
        want = della_mask(d, 0, k.row_len, k.density[i], k.epsilon[i], job.seed, job.name, i)
        assert torch.equal(masks[i], want), i


def _params_cases():
    return ("dense", "eps0", "negeps", "norescale", "normalize")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_byte_identical_to_reference_for_few_models(method):
    """N <= 4: the same float32 operations in the same order as the reference."""
    m = METHODS[method]
    for n in (1, 2, 3):
        base, models = _inputs((9, 513), torch.float32, "plain", n=n, seed=n)
        params = _params("plain", n)
        job = _job(m, base.shape, params, n)
        got, _ = _run(m, job, base, models, torch.float32)
        ref = m.merge(base, models, params, name=job.name, seed=job.seed)
        assert torch.equal(got, ref), n


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_same_bytes_in_any_chunking_and_without_kept_masks(method, dtype):
    m = METHODS[method]
    base, models = _inputs((13, 257), dtype, "ties", n=3)
    params = _params("plain", 3)
    job = _job(m, base.shape, params, 3)
    whole, k = _run(m, job, base, models, dtype)
    for rows in (1, 2, 5):
        got, kr = _run(m, job, base, models, dtype, rows_per_chunk=rows)
        assert kr.scale == k.scale
        assert torch.equal(_bytes(got), _bytes(whole)), rows
    again, kr = _run(m, job, base, models, dtype, rows_per_chunk=4, keep_masks=False)
    assert kr.mask is None and torch.equal(_bytes(again), _bytes(whole))


def _bytes(t):
    return t.reshape(-1).view(torch.uint8)


def test_rescale_factors_are_the_references():
    base, models = _inputs((11, 97), torch.float32, "plain")
    params = _params("plain")
    job = _job(DELLA, base.shape, params, 2)
    _, k = _run(DELLA, job, base, models, torch.float32)
    from fastmerge.methods.core import Chunk
    flat = Chunk(0, base.reshape(-1).float(), [x.reshape(-1).float() for x in models])
    ref = DELLA.reduce(job, [flat])
    assert torch.allclose(torch.tensor(k.scale, dtype=torch.float32), ref, rtol=2.0 ** -22)


def test_nonfinite_input_names_tensor_and_model():
    base, models = _inputs((3, 8), torch.float32, "plain")
    models[1][2, 3] = math.nan
    job = _job(DELLA, base.shape, _params("plain"), 2, name="layer.w")
    with pytest.raises(ValueError, match="tensor 'layer.w': model 1 contains 1 NaN/Inf"):
        _run(DELLA, job, base, models, torch.float32)


def test_merge_tensors_takes_the_kernel(monkeypatch):
    from fastmerge import merge_tensors
    base, models = _inputs((6, 40), torch.bfloat16, "plain")
    params = _params("plain")
    got = merge_tensors(base, models, "della", parameters=params, tensor_name="w", seed=4)
    ref = DELLA.merge(base, models, params, name="w", seed=4).to(torch.bfloat16)
    _assert_close(got, ref, torch.bfloat16)
    job = _job(DELLA, base.shape, params, 2, name="w", seed=4)
    assert merge_in_memory(DELLA, job, base, models, torch.bfloat16, 2) is not None
    monkeypatch.setattr(DELLA, "merge", lambda *a, **kw: pytest.fail("the reference ran"))
    merge_tensors(base, models, "della", parameters=params, tensor_name="w", seed=4)


# ------------------------------------------------------------------------ the pipeline
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("della_ckpts")
    g = torch.Generator().manual_seed(0)
    shapes = {"embed.weight": (40, 24), "layers.0.w": (24, 70), "layers.0.norm": (24,),
              "layers.1.w": (3, 5, 7)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    paths = {}
    for name in ("base", "ft0", "ft1"):
        sd = {k: (v if name == "base" else v + 0.01 * torch.randn(v.shape, generator=g))
              .to(torch.bfloat16) for k, v in base.items()}
        d = root / name
        d.mkdir()
        save_file(sd, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
        paths[name] = str(d)
    return paths


def _cfg(ckpts, method):
    return {"merge_method": method, "base_model": ckpts["base"], "dtype": "bfloat16",
            "parameters": {"lambda": 0.9},
            "models": [{"model": ckpts["ft0"], "parameters": {"weight": 0.6, "density": 0.5,
                                                              "epsilon": 0.2}},
                       {"model": ckpts["ft1"], "parameters": {"weight": 0.5, "density": 0.3,
                                                              "epsilon": 0.1}}]}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_pipeline_cli_torch_and_chunks_agree_with_reference(ckpts, tmp_path, method):
    from fastmerge import merge_checkpoints
    yml = write_yaml(tmp_path / "m.yml", _cfg(ckpts, method))
    r = cli_merge_without_torch(yml, tmp_path / "cli", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    cli = load_dir(tmp_path / "cli")
    merge_checkpoints(_cfg(ckpts, method), tmp_path / "torch", backend="cpu")
    merge_checkpoints(_cfg(ckpts, method), tmp_path / "chunks", backend="cpu",
                      max_chunk_elems=70)
    for other in ("torch", "chunks"):
        got = load_dir(tmp_path / other)
        assert all(torch.equal(got[k], cli[k]) for k in cli), other
    base, fts = load_dir(ckpts["base"]), [load_dir(ckpts[f]) for f in ("ft0", "ft1")]
    params = {"weight": [0.6, 0.5], "density": [0.5, 0.3], "epsilon": [0.2, 0.1],
              "lambda": 0.9}
    for k in cli:
        ref = METHODS[method].merge(base[k], [f[k] for f in fts], params, name=k, seed=0)
        _assert_close(cli[k], ref.to(torch.bfloat16), torch.bfloat16)
