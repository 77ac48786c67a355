"""The adapter analysis against numbers known in advance: updates built with chosen singular
values, every metric checked against numpy's SVD of the dense ΔW, planted intruder dimensions,
and hand-made records for the profile and the rank recommendation."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import yaml

from qlora_pipeline.analysis import intruders, profile, recommend, spectrum
from qlora_pipeline.core.layout import parse_layer
from qlora_pipeline.report.adapters import grid
from qlora_pipeline.models.adapter_file import Update

OUT, IN, R = 64, 48, 8
S_TRUE = (3.0, 0.5)


def orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64)).Q


def rank2_update(scaling: float, mixed: bool, seed: int = 0) -> Update:
    """ΔW = scaling·U·diag(S_TRUE)·Vᵀ inside an r = 8 adapter. Mixed: B = [U·diag(s) | noise]·M
    and A = M⁻¹·[Vᵀ; 0] with a random invertible M, so that B has full rank 8, A rank 2, and
    neither shows the spectrum."""
    gen = torch.Generator().manual_seed(seed)
    U, V = orthonormal(OUT, 2, gen), orthonormal(IN, 2, gen)
    B = torch.zeros(OUT, R, dtype=torch.float64)
    B[:, :2] = U * torch.tensor(S_TRUE, dtype=torch.float64)
    A = torch.zeros(R, IN, dtype=torch.float64)
    A[:2] = V.T
    if mixed:
        B[:, 2:] = torch.randn(OUT, R - 2, generator=gen, dtype=torch.float64)
        M = torch.randn(R, R, generator=gen, dtype=torch.float64) + 3 * torch.eye(R)
        B, A = B @ M, torch.linalg.inv(M) @ A
    return Update(A.float(), B.float(), scaling, False)


def exact_delta(update: Update) -> np.ndarray:
    """scaling·B·A in float64 from the stored factors: Update.delta()'s float32 product adds
    rounding noise of ~1e-7 in every direction, which moves the entropy effective rank by
    ~1e-5 (each tiny singular value adds -p·log p)."""
    dense = update.scaling * (update.B.double() @ update.A.double()).numpy()
    return dense.T if update.fan_in_fan_out else dense


def reference_metrics(dense: np.ndarray) -> dict:
    """The metrics written out from numpy's SVD of the dense matrix, independently."""
    s = np.linalg.svd(dense.astype(np.float64), compute_uv=False)
    total = float(np.sum(s ** 2))
    p = s / s.sum()
    p = p[p > 0]
    cumulative = np.cumsum(s ** 2) / total
    return {"singular_values": s, "fro": math.sqrt(total), "spectral": float(s[0]),
            "stable_rank": total / s[0] ** 2,
            "effective_rank": float(np.exp(-np.sum(p * np.log(p)))),
            "rank_90": int(np.argmax(cumulative >= 0.9 - 1e-12)) + 1,
            "rank_99": int(np.argmax(cumulative >= 0.99 - 1e-12)) + 1}


def assert_matches(found: dict, S: list[float], expected: dict) -> None:
    n = len(S)
    np.testing.assert_allclose(S, expected["singular_values"][:n], atol=1e-5)
    # numpy's values beyond those returned are zero up to rounding.
    assert np.all(np.abs(expected["singular_values"][n:]) < 1e-5)
    for key in ("fro", "spectral", "stable_rank", "effective_rank"):
        assert found[key] == pytest.approx(expected[key], abs=1e-5), key
    assert (found["rank_90"], found["rank_99"]) == (expected["rank_90"], expected["rank_99"])


@pytest.mark.parametrize("scaling, mixed", [(1.0, False), (2.0, True)])
def test_low_rank_svd_matches_dense_svd(scaling, mixed):
    update = rank2_update(scaling, mixed)
    U, S, V = spectrum.low_rank_svd(update.A, update.B, update.scaling)
    assert U.shape == (OUT, R) and S.shape == (R,) and V.shape == (IN, R)
    assert S.dtype == torch.float32
    dense = update.delta()
    torch.testing.assert_close(U @ torch.diag(S) @ V.T, dense, atol=1e-5, rtol=0)
    np.testing.assert_allclose(S[:2].numpy(), [scaling * s for s in S_TRUE], atol=1e-5)
    assert torch.all(S[:-1] >= S[1:])

    found = spectrum.metrics(S)
    assert_matches(found, S.tolist(), reference_metrics(exact_delta(update)))
    # And the numbers known in advance: S = scaling·(3, 0.5).
    s1, s2 = (scaling * s for s in S_TRUE)
    assert found["fro"] == pytest.approx(math.hypot(s1, s2), abs=1e-5)
    assert found["stable_rank"] == pytest.approx(9.25 / 9, abs=1e-5)
    p = np.array([3.0, 0.5]) / 3.5
    # 1e-4: rounding the mixed factors to float32 leaves six singular values of ~1e-7, real
    # directions of the stored update, each adding -p·log p ≈ 3e-7 to the entropy.
    assert found["effective_rank"] == pytest.approx(math.exp(-np.sum(p * np.log(p))), abs=1e-4)
    assert (found["rank_90"], found["rank_99"]) == (1, 2)  # 9/9.25 = 0.973
    assert all(type(found[k]) is float for k in ("fro", "spectral", "stable_rank"))
    assert all(type(found[k]) is int for k in ("rank_90", "rank_99"))


def test_layer_metrics_with_base():
    update = rank2_update(2.0, True)
    base = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(1))
    found = spectrum.layer_metrics(update, base)
    assert found["rank"] == R and len(found["singular_values"]) == R
    assert_matches(found, found["singular_values"], reference_metrics(exact_delta(update)))
    expected = np.linalg.norm(update.delta().numpy()) / np.linalg.norm(base.numpy())
    assert found["relative_norm"] == pytest.approx(float(expected), rel=1e-5)
    assert found["intruders"] is None
    without = spectrum.layer_metrics(update)
    assert without["relative_norm"] is None and without["intruders"] is None
    with_intruders = spectrum.layer_metrics(update, base, {"k": 4, "reference": 10})
    assert with_intruders["intruders"]["k"] == 4
    assert with_intruders["intruders"]["reference"] == 10


def test_energy_share_names_follow_the_energies():
    found = spectrum.metrics(torch.tensor([3.0, 0.5]), energies=(0.5, 0.97, 1.0))
    assert (found["rank_50"], found["rank_97"], found["rank_100"]) == (1, 1, 2)  # 9/9.25


def test_zero_update_gives_zeros_not_nan():
    update = rank2_update(1.0, False)
    update.B = torch.zeros_like(update.B)
    U, S, V = spectrum.low_rank_svd(update.A, update.B, update.scaling)
    assert torch.equal(S, torch.zeros(R))
    assert torch.isfinite(U).all() and torch.isfinite(V).all()
    found = spectrum.layer_metrics(update, torch.randn(OUT, IN))
    for key in ("fro", "spectral", "stable_rank", "effective_rank", "rank_90", "rank_99",
                "relative_norm"):
        assert found[key] == 0 and not math.isnan(found[key]), key
    assert found["singular_values"] == [0.0] * R
    assert spectrum.metrics(torch.zeros(0))["rank_90"] == 0


def test_fan_in_fan_out_gives_the_same_singular_values():
    plain = rank2_update(2.0, True)
    transposed = Update(plain.A, plain.B, plain.scaling, fan_in_fan_out=True)
    assert transposed.delta().shape == (IN, OUT)  # stored as [in×out], as Conv1D does
    found = spectrum.layer_metrics(transposed, torch.randn(IN, OUT))
    np.testing.assert_allclose(found["singular_values"],
                               spectrum.layer_metrics(plain)["singular_values"], atol=1e-6)
    assert_matches(found, found["singular_values"],
                   reference_metrics(exact_delta(transposed)))
    with pytest.raises(ValueError, match="shape"):
        spectrum.layer_metrics(transposed, torch.randn(OUT, IN))


def test_dora_layer_uses_the_dense_update():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(32, 24, generator=gen)
    A, B = torch.randn(4, 24, generator=gen), torch.randn(32, 4, generator=gen) * 0.1
    # PEFT initialises m to W0's row norms; training moved it.
    magnitude = torch.linalg.norm(base, dim=1) * (1 + 0.2 * torch.rand(32, generator=gen))
    update = Update(A, B, 0.5, False, magnitude)
    found = spectrum.layer_metrics(update, base)
    dense = (update.apply(base) - base).numpy()
    expected = reference_metrics(dense)
    assert len(found["singular_values"]) == 24  # every one of min(out, in)
    assert_matches(found, found["singular_values"], expected)
    assert found["rank_90"] > 4  # the magnitude's rescaling is not low-rank
    with pytest.raises(ValueError, match="DoRA"):
        spectrum.layer_metrics(update)


def planted(base: torch.Tensor, reference: int, scale: float, gen: torch.Generator,
            inside: bool = False, top: torch.Tensor | None = None) -> torch.Tensor:
    """scale·u·vᵀ with u orthogonal to base's top-`reference` left singular vectors `top`
    (computed when not given), or with inside, u = the top one."""
    if top is None:
        top = torch.linalg.svd(base.double(), full_matrices=False).U[:, :reference]
    if inside:
        u = top[:, 0]
    else:
        x = torch.randn(base.shape[0], generator=gen, dtype=torch.float64)
        u = x - top @ (top.T @ x)
        u = u / torch.linalg.norm(u)
    v = torch.randn(base.shape[1], generator=gen, dtype=torch.float64)
    return (scale * torch.outer(u, v / torch.linalg.norm(v))).float()


def test_planted_intruder_is_counted():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(64, 48, generator=gen)  # top singular value about 15
    # 30 > 15: the planted direction becomes the top one rather than mixing into the base's
    # near-degenerate ones.
    delta = planted(base, 20, 30.0, gen)
    found = intruders.count(base, delta, k=10, reference=20)
    assert found["count"] >= 1
    assert found["max_similarity"][0] < 0.3
    assert (found["k"], found["reference"], found["threshold"]) == (10, 20, 0.5)
    assert len(found["max_similarity"]) == 10
    # The same change along the base's own top direction intrudes on nothing.
    assert intruders.count(base, planted(base, 20, 30.0, gen, inside=True), 10, 20)["count"] == 0
    unchanged = intruders.count(base, torch.zeros_like(base), k=10, reference=20)
    assert unchanged["count"] == 0
    np.testing.assert_allclose(unchanged["max_similarity"], 1.0, atol=1e-4)


def test_k_and_reference_are_clipped():
    base = torch.randn(12, 6)
    found = intruders.count(base, torch.zeros_like(base), k=10, reference=40)
    assert (found["k"], found["reference"], found["count"]) == (6, 6, 0)
    assert intruders.top_left_singular_vectors(base, 10).shape == (12, 6)


def large_weight(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A 1500×1200 weight (the randomized path) with a decaying spectrum, as trained weights
    have (a flat one has no well-defined top singular vectors for any method to find), and a
    basis of its top-60 left singular subspace up to the noise."""
    U, V = orthonormal(1500, 60, gen), orthonormal(1200, 60, gen)
    s = 100 * 0.9 ** torch.arange(60, dtype=torch.float64)
    noise = 0.01 * torch.randn(1500, 1200, generator=gen, dtype=torch.float64)
    return (U @ torch.diag(s) @ V.T + noise).float(), U


def test_randomized_path_is_reproducible_and_leaves_the_rng(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    base, top = large_weight(gen)
    calls = []
    lowrank = torch.svd_lowrank
    monkeypatch.setattr(torch, "svd_lowrank", lambda *a, **kw: calls.append(1) or lowrank(*a, **kw))
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = intruders.count(base, torch.zeros_like(base))
    assert calls, "a 1500×1200 weight should take the svd_lowrank path"
    assert torch.equal(torch.get_rng_state(), state)
    assert first["count"] == 0
    torch.manual_seed(2)  # the caller's random state does not change the result
    assert intruders.count(base, torch.zeros_like(base)) == first
    delta = planted(base, 40, 200.0, gen, top=top)
    assert intruders.count(base, delta, k=10, reference=40)["count"] >= 1


@pytest.mark.parametrize("key, expected", [
    ("model.layers.12.self_attn.q_proj.weight", (12, "q_proj")),
    ("model.layers.12.self_attn.q_proj", (12, "q_proj")),
    ("gpt_neox.layers.3.attention.query_key_value.weight", (3, "query_key_value")),
    ("transformer.h.5.attn.c_attn.weight", (5, "c_attn")),
    ("model.layers.0.mlp.experts.7.w1.weight", (0, "w1")),
    ("lm_head.weight", (None, "lm_head")),
    ("model.embed_tokens", (None, "embed_tokens")),
])
def test_parse_layer(key, expected):
    assert parse_layer(key) == expected


def test_depth_band_thirds():
    bands = [profile.depth_band(i, 30) for i in range(30)]
    assert bands == ["shallow"] * 10 + ["middle"] * 10 + ["deep"] * 10
    assert [profile.depth_band(i, 2) for i in range(2)] == ["shallow", "middle"]
    with pytest.raises(ValueError):
        profile.depth_band(30, 30)


def record(S: list[float], fro: float, eff: float, relative: float | None = None,
           intruder_count: int | None = None) -> dict:
    return {"rank": len(S), "singular_values": S, "fro": fro, "effective_rank": eff,
            "stable_rank": 2 * eff, "rank_90": round(eff), "relative_norm": relative,
            "intruders": None if intruder_count is None else {"count": intruder_count}}


RECORDS = {
    "model.layers.0.self_attn.q_proj.weight": record([2.0, 1.0], 1.0, 1.0, 0.1, 2),
    "model.layers.0.mlp.down_proj.weight": record([1.0, 1.0], 2.0, 2.0),
    "model.layers.5.self_attn.q_proj.weight": record([4.0, 1.0], 3.0, 3.0, 0.3, 0),
    "model.layers.8.self_attn.q_proj.weight": record([0.0, 0.0], 0.0, 0.0, 0.0, 1),
}


def test_summarize_means():
    found = profile.summarize(RECORDS, num_layers=9)  # bands: 0 shallow, 5 middle, 8 deep
    assert found["layers"] == 4
    assert list(found["by_module"]) == ["down_proj", "q_proj"]
    q = found["by_module"]["q_proj"]
    assert q["layers"] == 3
    assert q["fro"] == pytest.approx(4 / 3)
    assert q["effective_rank"] == pytest.approx(4 / 3)
    assert q["stable_rank"] == pytest.approx(8 / 3)
    assert q["rank_90"] == pytest.approx(4 / 3)
    assert q["relative_norm"] == pytest.approx(0.4 / 3)
    assert q["intruders"] == pytest.approx(1.0)
    down = found["by_module"]["down_proj"]
    assert (down["relative_norm"], down["intruders"]) == (None, None)
    assert list(found["by_depth"]) == ["shallow", "middle", "deep"]
    shallow = found["by_depth"]["shallow"]
    assert shallow["layers"] == 2 and shallow["fro"] == pytest.approx(1.5)
    # Means over the layers that have the metric: down_proj has no base measures.
    assert shallow["relative_norm"] == pytest.approx(0.1) and shallow["intruders"] == 2
    # q_proj: mean of (1, 0.5) and (1, 0.25); layer 8's zero update has no shape.
    assert found["spectra"]["q_proj"] == pytest.approx([1.0, 0.375])
    assert found["spectra"]["down_proj"] == pytest.approx([1.0, 1.0])


def test_grid_layout():
    layers, modules, matrix = grid(RECORDS, "fro")
    assert (layers, modules) == ([0, 5, 8], ["down_proj", "q_proj"])
    assert matrix == [[2.0, 1.0], [None, 3.0], [None, 0.0]]
    assert grid(RECORDS, "intruders")[2] == [[None, 2], [None, 0], [None, 1]]


def spectral_record(S: list[float]) -> dict:
    values = torch.tensor(S)
    return {"rank": len(S), "singular_values": S, **spectrum.metrics(values)}


def adapter_records(extra: dict | None = None) -> dict:
    pad = [0.0] * 6
    records = {
        "model.layers.0.self_attn.q_proj.weight": spectral_record([3.0, 0.5] + pad),  # 1
        "model.layers.0.self_attn.v_proj.weight": spectral_record([1.0] * 4 + [0.0] * 4),  # 4
        "model.layers.1.self_attn.q_proj.weight": spectral_record([2.0, 1.0] + pad),  # 4/5: 2
        "model.layers.1.self_attn.v_proj.weight": spectral_record([0.0] * 8),  # at least 1
    }
    return {**records, **(extra or {})}


def test_recommend_ranks_and_snippet():
    found = recommend.recommend(adapter_records(), r=8)
    assert found["per_layer"] == {"model.layers.0.self_attn.q_proj": 1,
                                  "model.layers.0.self_attn.v_proj": 4,
                                  "model.layers.1.self_attn.q_proj": 2,
                                  "model.layers.1.self_attn.v_proj": 1}
    assert found["uniform"] == 4
    assert found["histogram"] == {1: 2, 2: 1, 4: 1}
    assert (found["saturated"], found["warning"]) == ([], None)
    assert (found["energy"], found["r"]) == (0.9, 8)
    pattern = {"model.layers.0.self_attn.q_proj": 1, "model.layers.1.self_attn.q_proj": 2,
               "model.layers.1.self_attn.v_proj": 1}
    assert yaml.safe_load(found["snippet"]) == {"lora": {"r": 4, "rank_pattern": pattern}}
    assert found["snippet"].startswith("lora:\n  r: 4\n  rank_pattern:\n")
    # PEFT's matching (peft.utils.other.get_pattern_key; importing PEFT takes seconds) gives
    # each key its own layer and no other.
    for name in found["per_layer"]:
        keys = [key for key in pattern if re.match(rf"(.*\.)?({key})$", name)]
        assert keys == ([name] if name in pattern else [])
    assert recommend.recommend(adapter_records(), r=8, energy=0.99)["per_layer"][
        "model.layers.0.self_attn.q_proj"] == 2  # 9/9.25 < 0.99


def test_flat_spectrum_is_saturated():
    flat = {"model.layers.2.mlp.up_proj.weight": spectral_record([0.7] * 8)}
    found = recommend.recommend(adapter_records(flat), r=8)
    assert found["saturated"] == ["model.layers.2.mlp.up_proj"]
    assert found["per_layer"]["model.layers.2.mlp.up_proj"] == 8
    assert found["uniform"] == 8
    assert "1 of 5 layers" in found["warning"] and "too small" in found["warning"]


def test_recommend_from_layer_metrics():
    records = {"model.layers.0.self_attn.q_proj.weight":
               spectrum.layer_metrics(rank2_update(2.0, True))}
    found = recommend.recommend(records, r=R)
    assert found["per_layer"] == {"model.layers.0.self_attn.q_proj": 1}
    assert yaml.safe_load(found["snippet"]) == {"lora": {"r": 1, "rank_pattern": {}}}
    with pytest.raises(ValueError):
        recommend.recommend({}, r=8)
