"""The reference itself: hand-computed cases for every method, and the properties of
docs/semantics.md."""

import pytest
import torch
from helpers import make_finetunes

import fastmerge as fm
from fastmerge import reference as R
from fastmerge.methods import band_counts, resolve_spec, top_k_count

B = torch.zeros(6)
M1 = torch.tensor([3.0, -1.0, 0.5, -4.0, 2.0, 0.0])
M2 = torch.tensor([-1.0, -2.0, 1.0, 1.0, 2.0, 0.0])


def ref(method, models=(M1, M2), base=B, **kw):
    spec = resolve_spec(method, len(models), **kw)
    return R.merge(base, list(models), spec, dtype=torch.float64, out_dtype=torch.float64)


def close(a, b):
    return torch.allclose(a, torch.tensor(b, dtype=torch.float64), atol=1e-12)


def test_linear():
    assert close(ref("linear", weights=[1, 3]), [0.0, -1.75, 0.875, -0.25, 2.0, 0.0])
    assert close(ref("linear", weights=[1, 3], normalize=False),
                 [0.0, -7.0, 3.5, -1.0, 8.0, 0.0])


def test_task_arithmetic():
    assert close(ref("task_arithmetic", weights=[1, 0.5], lambda_=2),
                 [5.0, -4.0, 2.0, -7.0, 6.0, 0.0])
    assert close(ref("task_arithmetic", normalize=True), [1.0, -1.5, 0.75, -1.5, 2.0, 0.0])


def test_magnitude_prune_keeps_ties():
    # n=6, d=0.5 -> k=3. |M1| = 3,1,.5,4,2,0 -> T=2: keep 3,-4,2. |M2| = 1,2,1,1,2,0 -> T=1:
    # k-th largest is 1 and all four 1's are kept with the two 2's -> everything nonzero kept.
    assert close(ref("magnitude_prune", models=(M1,), density=0.5), [3.0, 0, 0, -4.0, 2.0, 0])
    assert close(ref("magnitude_prune", models=(M2,), density=0.5), M2.tolist())


def test_ties_by_hand():
    # trimmed: s1 = [3,0,0,-4,2,0], s2 = [-1,-2,1,1,2,0]; votes = [2,-2,1,-3,4,0]
    # elected = [+,-,+,-,+,+]; agreeing: [3], [-2], [1], [-4], [2,2], none
    out = ref("ties", density=0.5)
    assert close(out, [3.0, -2.0, 1.0, -4.0, 2.0, 0.0])
    # weights [1, 0.5]: u2 = [-.5,-1,.5,.5,1,0]; votes = [2.5,-1,.5,-3.5,3,0]
    out = ref("ties", density=0.5, weights=[1, 0.5], normalize=False)
    assert close(out, [3.0, -1.0, 0.5, -4.0, 3.0, 0.0])
    out = ref("ties", density=0.5, weights=[1, 0.5])  # divide by agreeing weights
    assert close(out, [3.0, -2.0, 1.0, -4.0, 2.0, 0.0])


def test_ties_count_election_and_peft_mode():
    a, b, c = torch.tensor([5.0]), torch.tensor([-1.0]), torch.tensor([-1.0])
    z = torch.zeros(1)
    assert close(ref("ties", models=(a, b, c), base=z), [5.0])                 # sum: +3
    assert close(ref("ties", models=(a, b, c), base=z, election="count"), [-1.0])
    # peft: elect on unweighted, divide by the number agreeing
    out = ref("ties", models=(a, b, c), base=z, weights=[0.1, 1, 1], elect_on="unweighted",
              normalize="count")
    assert close(out, [0.5])
    out = ref("ties", models=(a, b, c), base=z, weights=[0.1, 1, 1])           # weighted: -1.5
    assert close(out, [-1.0])


def test_dare_matches_its_mask():
    spec = resolve_spec("dare_linear", 1, density=0.5, seed=3)
    t = torch.arange(1.0, 101.0)
    out = R.merge(torch.zeros(100), [t], spec, tensor_name="w", dtype=torch.float64,
                  out_dtype=torch.float64)
    mask = fm.dare_mask((100,), 0.5, seed=3, tensor_name="w", model_index=0)
    assert torch.equal(out, (t * mask * 2.0).double())          # kept values times 1/d


def test_breadcrumbs_band_by_hand():
    t = torch.arange(1.0, 11.0)  # n=10, d=0.5, g=0.2: n_top=2 -> drop 10,9; keep 8..4
    out = ref("breadcrumbs", models=(t,), base=torch.zeros(10), density=0.5, gamma=0.2)
    assert close(out, [0, 0, 0, 4, 5, 6, 7, 8, 0, 0])
    assert band_counts(0.5, 0.2, 10) == (2, 7)
    # gamma + density > 1: the dropped top shrinks so that floor(d n) stay
    assert band_counts(0.9, 0.3, 10) == (1, 10)
    # n_top = 0: no upper bound (mergekit zeroes everything here; fastmerge keeps the band)
    out = ref("breadcrumbs", models=(t,), base=torch.zeros(10), density=0.3, gamma=0.0)
    assert close(out, [0, 0, 0, 0, 0, 0, 0, 8, 9, 10])


def test_consensus_by_hand():
    # t1 = [1, 1], t2 = [1, -1], t3 = [1, 0.1]; t_mtl = [3, 0.1]
    ts = [torch.tensor([1.0, 1.0]), torch.tensor([1.0, -1.0]), torch.tensor([1.0, 0.1])]
    # element 0: |1| > 0.6*|3-1| = 1.2? no for all -> 0 votes -> dropped
    # element 1: |1| > .6*|.1-1|=.54 yes; |-1| > .6*1.1=.66 yes; |.1| > 0 yes -> 3 votes
    out = ref("consensus_ta", models=ts, base=torch.zeros(2), consensus_lambda=0.6)
    assert close(out, [0.0, 0.1])
    out = ref("consensus_ta", models=ts, base=torch.zeros(2), consensus_lambda=0.3)
    assert close(out, [3.0, 0.1])                       # 0.3*2 = .6 < 1: 3 votes


def test_ota_and_ffg_by_hand():
    t1, t2 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    v1, v2 = torch.tensor([4.0, 1.0]), torch.tensor([1.0, 4.0])
    spec = resolve_spec("ota", 2, eps=0.0)
    out = R.merge(torch.zeros(2), [t1, t2], spec, second_moments=[v1, v2], dtype=torch.float64,
                  out_dtype=torch.float64)
    # P = sqrt(v): [2,1], [1,2]; merged = (2*1 + 1*3)/3, (1*2 + 2*-2)/3
    assert close(out, [5 / 3, -2 / 3])
    spec = resolve_spec("ffg", 1, density=0.5)
    out = R.merge(torch.zeros(2), [t1], spec, second_moments=[v1], dtype=torch.float64,
                  out_dtype=torch.float64)
    assert close(out, [1.0, 2.0])  # scores t^2 v = 4, 4: k=1, T=4, the tie keeps both
    assert close(R.merge(torch.zeros(2), [t2], spec, second_moments=[v2], dtype=torch.float64,
                         out_dtype=torch.float64), [0.0, -2.0])  # scores 9, 16


def test_rescales():
    t = torch.tensor([4.0, -1.0, 1.0, 2.0])  # |t|_1 = 8; top-2 keeps 4, 2 (6)
    out = ref("magnitude_prune", models=(t,), base=torch.zeros(4), density=0.5, rescale="l1")
    assert close(out, [4 * 8 / 6, 0, 0, 2 * 8 / 6])
    out = ref("magnitude_prune", models=(t,), base=torch.zeros(4), density=0.5,
              rescale="inverse_density")
    assert close(out, [8.0, 0, 0, 4.0])


def test_lines_scales_the_update():
    out = ref("task_arithmetic", lines_factor=0.25, lambda_=2.0)
    assert close(out, (0.5 * (M1 + M2)).tolist())
    assert fm.lines_factor(3, 4, 0.5, 1.0) == 1.5
    assert fm.lines_factor(None, 4, 0.5, 1.0) == 0.5
    assert fm.block_index("model.layers.10.mlp.up_proj.weight") == 10
    assert fm.block_index("model.layers.1.mlp.up") == 1
    assert fm.block_index("model.mylayers.1.mlp") is None  # anchored: no substring matches
    assert fm.block_index("model.layers.10.mlp") == 10
    assert fm.block_index("model.embed_tokens.weight") is None


# ----------------------------------------------------------------------------- properties
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_density_one_is_task_arithmetic(dtype):
    base, models, _ = make_finetunes((50, 7), 3, ("bf16", "fp32"))
    ta = ref("task_arithmetic", models=models, base=base)
    for method in ("magnitude_prune", "breadcrumbs", "dare_linear"):
        assert torch.equal(ref(method, models=models, base=base, density=1.0, gamma=0.0), ta)


def test_ties_one_model_is_trimmed_task_arithmetic():
    base, models, _ = make_finetunes((300,), 1)
    assert torch.allclose(ref("ties", models=models, base=base, density=0.2),
                          ref("magnitude_prune", models=models, base=base, density=0.2))


def test_every_threshold_tie_kept():
    t = torch.tensor([2.0, 1.0, 1.0, 1.0, 1.0, 0.5])
    out = ref("magnitude_prune", models=(t,), base=torch.zeros(6), density=0.34)  # k = 2
    assert close(out, [2.0, 1.0, 1.0, 1.0, 1.0, 0.0])


def test_thresholds_from_chunks_equal_whole():
    base, models, _ = make_finetunes((1001,), 1, seed=4)
    whole = fm.magnitude_threshold(models[0], density=0.1, base=base, backend="torch")
    t = (models[0].float() - base.float()).abs()
    assert whole == R.kth_largest(t, top_k_count(0.1, 1001))
    from fastmerge.backends import get_backend
    from fastmerge.planning.selection import Chunk, level0, select
    be = get_backend("torch", "cpu")

    def src():
        return [Chunk(base[a:b], [models[0][a:b]], (), a)
                for a, b in ((0, 3), (3, 700), (700, 1001))]
    hist = level0(be, 1, 0, src)
    assert select(be, hist, [(0, top_k_count(0.1, 1001))], 0, src).thresholds[0] == whole


def test_float32_and_float64_reference_agree():
    base, models, _ = make_finetunes((40, 40), 3)
    spec = resolve_spec("ties", 3, density=0.3)
    a = R.merge(base, models, spec, out_dtype=torch.float64)
    b = R.merge(base, models, spec, dtype=torch.float64, out_dtype=torch.float64)
    assert torch.allclose(a, b, atol=1e-6)


def test_nan_inf_rejected_naming_tensor():
    m = M1.clone()
    m[2] = float("inf")
    with pytest.raises(ValueError, match="model 1 for tensor 'layer.w'.*NaN/Inf"):
        R.merge(B, [M2, m], resolve_spec("ties", 2), tensor_name="layer.w")


def test_empty_ish_and_single_element():
    one = ref("ties", models=(torch.tensor([2.0]),), base=torch.tensor([1.0]), density=0.01)
    assert close(one, [2.0])  # k = max(1, floor(.01)) = 1
    assert top_k_count(0.01, 1) == 1 and top_k_count(0.0, 5) == 0 and top_k_count(1.0, 5) == 5
