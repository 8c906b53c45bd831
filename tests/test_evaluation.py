"""Tests of dmlfast.evaluation.retrieval_metrics against a brute-force numpy oracle and hand-made examples."""

import math

import numpy as np
import pytest
import torch

import dmlfast.evaluation.clustering as clustering
import dmlfast.evaluation.knn as knn
import dmlfast.evaluation.ranking as ranking
from dmlfast.evaluation import available_backends, normalized_mutual_information, retrieval_metrics
from dmlfast.evaluation.clustering import torch_kmeans
from dmlfast.evaluation.metrics import canonical_similarities

BACKENDS = available_backends()
RANKING = ("recall", "map@r", "r_precision")
requires_faiss = pytest.mark.skipif("faiss" not in BACKENDS, reason="faiss is not installed")


def prepare(vectors, binary):
    vectors = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
    if binary:
        return torch.where(vectors >= 0, 1.0, -1.0).double().numpy()
    return torch.nn.functional.normalize(vectors, dim=1).double().numpy()


def oracle(query, query_labels, reference=None, reference_labels=None, ks=(1, 2, 4, 8), binary=False):
    """Brute force: full (-similarity, index) sort of every reference for every query."""
    self_reference = reference is None
    if self_reference:
        reference, reference_labels = query, query_labels
    q, r = prepare(query, binary), prepare(reference, binary)
    similarities = (q[:, None, :] * r[None, :, :]).sum(-1)  # elementwise: equal rows give equal sums
    hits = {k: [] for k in ks}
    average_precisions, r_precisions, without_match = [], [], 0
    for i in range(len(q)):
        indices = np.arange(len(r))
        scores = similarities[i]
        if self_reference:
            indices, scores = indices[indices != i], scores[indices != i]
        ranked = indices[np.lexsort((indices, -scores))]
        relevant = np.asarray(reference_labels)[ranked] == query_labels[i]
        num_relevant = int(relevant.sum())
        if num_relevant == 0:
            without_match += 1
            continue
        for k in ks:
            hits[k].append(relevant[:k].any())
        top = relevant[:num_relevant]
        precision_at_i = np.cumsum(top) / np.arange(1, num_relevant + 1)
        average_precisions.append((precision_at_i * top).sum() / num_relevant)
        r_precisions.append(top.mean())
    expected = {f"recall@{k}": float(np.mean(v)) for k, v in hits.items()}
    expected.update({"map@r": float(np.mean(average_precisions)), "r_precision": float(np.mean(r_precisions))})
    expected.update({"num_queries": len(q), "queries_without_match": without_match})
    return expected


def clustered_set(seed, num_samples=400, dim=16, num_classes=50, duplicate_every=7):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, num_samples)
    embeddings = rng.normal(size=(num_classes, dim))[labels] + 1.2 * rng.normal(size=(num_samples, dim))
    embeddings[::duplicate_every] = embeddings[3]  # exact duplicates, mostly with other labels
    return embeddings.astype(np.float32), labels


def assert_matches(actual, expected):
    assert set(expected) <= set(actual)
    for name, value in expected.items():
        assert actual[name] == pytest.approx(value, abs=1e-12), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_self_retrieval_matches_oracle(backend, binary, seed):
    embeddings, labels = clustered_set(seed)
    result = retrieval_metrics(embeddings, labels, metrics=RANKING, backend=backend, binary=binary)
    assert_matches(result, oracle(embeddings, labels, binary=binary))


@pytest.mark.parametrize("backend", BACKENDS)
def test_query_gallery_mode_matches_oracle(backend):
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(40, 12))
    gallery_labels = rng.integers(0, 30, 300)  # classes 30..39 have no gallery entry
    gallery = centres[gallery_labels] + rng.normal(size=(300, 12))
    query_labels = rng.integers(0, 40, 120)
    query = centres[query_labels] + rng.normal(size=(120, 12))
    ks = (1, 10, 20, 30, 40, 50)
    result = retrieval_metrics(query, query_labels, ks=ks, reference=gallery, reference_labels=gallery_labels,
                               metrics=RANKING, backend=backend)
    expected = oracle(query, query_labels, gallery, gallery_labels, ks=ks)
    assert expected["queries_without_match"] > 0
    assert_matches(result, expected)


def test_backends_agree_exactly_on_duplicates_and_ties():
    embeddings, labels = clustered_set(2, num_samples=600, duplicate_every=3)
    results = [
        retrieval_metrics(embeddings, labels, ks=(1, 5, 50), metrics=RANKING, backend=backend, binary=binary, chunk_size=chunk)
        for backend in BACKENDS
        for binary in (False,)
        for chunk in (None, 37)
    ]
    assert all(result == results[0] for result in results)
    binary_results = [retrieval_metrics(embeddings, labels, metrics=RANKING, backend=b, binary=True) for b in BACKENDS]
    assert all(result == binary_results[0] for result in binary_results)


def test_hand_made_five_point_example():
    # p1 duplicates p0 with another label; p2 ties p0, p1, p4 exactly (similarity 0); p3 ties p0, p1, p2.
    embeddings = [[1, 0], [1, 0], [0, 1], [1, 1], [-1, 0]]
    labels = [0, 1, 0, 1, 0]
    # Rankings (ties by lower index): q0: 1 3 2 4, q1: 0 3 2 4, q2: 3 0 1 4, q3: 0 1 2 4, q4: 2 3 0 1.
    # Relevance:                      q0: 0 0 1 1, q1: 0 1 0 0, q2: 0 1 0 1, q3: 0 1 0 0, q4: 1 0 1 0.
    # R = 2, 1, 2, 1, 2. AP@R = 0, 0, (1/2)/2, 0, 1/2; R-Precision = 0, 0, 1/2, 0, 1/2.
    expected = {
        "recall@1": 1 / 5,
        "recall@2": 4 / 5,
        "recall@4": 5 / 5,
        "map@r": (0.25 + 0.5) / 5,
        "r_precision": (0.5 + 0.5) / 5,
        "num_queries": 5,
        "queries_without_match": 0,
    }
    for backend in BACKENDS:
        result = retrieval_metrics(embeddings, labels, ks=(1, 2, 4), metrics=RANKING, backend=backend)
        assert_matches(result, expected)


def test_own_row_is_excluded_by_index_so_duplicates_still_count():
    embeddings = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    for backend in BACKENDS:
        result = retrieval_metrics(embeddings, [7, 7, 8, 8], ks=(1,), metrics=RANKING, backend=backend)
        assert result["recall@1"] == 1.0 and result["map@r"] == 1.0


def test_exact_ties_are_broken_by_lower_reference_index():
    query = np.array([[1.0, 0.0]])
    gallery = np.array([[2.0, 0.0], [1.0, 0.0], [0.5, 0.0]])  # all equal after L2 normalisation
    for backend in BACKENDS:
        def recall_at_1(gallery_labels):
            return retrieval_metrics(query, [1], ks=(1,), reference=gallery, reference_labels=gallery_labels,
                                     metrics=("recall",), backend=backend)["recall@1"]
        assert recall_at_1([1, 0, 0]) == 1.0
        assert recall_at_1([0, 1, 1]) == 0.0


def test_classes_with_one_sample_are_counted_and_left_out():
    embeddings, labels = clustered_set(3, num_samples=200)
    labels = labels.copy()
    labels[:10] = np.arange(1000, 1010)  # ten singleton classes
    result = retrieval_metrics(embeddings, labels, metrics=RANKING)
    expected = oracle(embeddings, labels)
    assert expected["queries_without_match"] >= 10
    assert_matches(result, expected)


def test_no_query_with_a_match_gives_nan():
    result = retrieval_metrics(np.eye(3), [0, 1, 2], ks=(1,), metrics=RANKING)
    assert result["queries_without_match"] == 3
    assert all(math.isnan(result[name]) for name in ("recall@1", "map@r", "r_precision"))


@pytest.fixture
def full_row_queries(monkeypatch):
    """The number of queries of each call that ranks queries against every reference."""
    counts = []
    original = ranking.RankingProblem._resolve_with_full_rows

    def spy(self, rows, chunk_size):
        counts.append(rows.numel())
        return original(self, rows, chunk_size)

    monkeypatch.setattr(ranking.RankingProblem, "_resolve_with_full_rows", spy)
    return counts


@pytest.mark.parametrize("backend", BACKENDS)
def test_short_candidate_lists_fall_back_to_full_rows(monkeypatch, full_row_queries, backend):
    # faiss: k-NN lists without margin; torch: its floor at estimated rank 2 x 3 is above many first positives
    embeddings, labels = clustered_set(4, num_samples=300, dim=6, duplicate_every=2)
    monkeypatch.setattr(ranking, "SEARCH_MARGIN", 0)
    for binary in (False, True):
        result = retrieval_metrics(embeddings, labels, ks=(1, 3), metrics=RANKING, binary=binary, backend=backend)
        assert_matches(result, oracle(embeddings, labels, ks=(1, 3), binary=binary))
    assert sum(full_row_queries) > 0


@pytest.mark.parametrize("self_reference", [True, False])
def test_threshold_collection_falls_back_to_full_rows(monkeypatch, full_row_queries, self_reference):
    # a floor of estimated rank ~1 cuts the lists above most first positives: full rows decide
    embeddings, labels = clustered_set(4, num_samples=300, dim=6, duplicate_every=2)
    monkeypatch.setattr(ranking, "THRESHOLD_FLOOR_FACTOR", 0.01)
    gallery = {} if self_reference else {"reference": embeddings[100:], "reference_labels": labels[100:]}
    for binary in (False, True):
        for chunk in (None, 64):
            result = retrieval_metrics(embeddings[:100] if gallery else embeddings, labels[:100] if gallery else labels,
                                       ks=(1, 3, 30), metrics=RANKING, binary=binary, backend="torch", chunk_size=chunk, **gallery)
            expected = (oracle(embeddings[:100], labels[:100], embeddings[100:], labels[100:], ks=(1, 3, 30), binary=binary)
                        if gallery else oracle(embeddings, labels, ks=(1, 3, 30), binary=binary))
            assert_matches(result, expected)
    assert sum(full_row_queries) > 0


def test_threshold_collection_without_positive_pairs_bound(monkeypatch):
    # too many (query, positive) pairs: cuts come from the tile sample alone, metrics unchanged
    embeddings, labels = clustered_set(5, num_samples=500, num_classes=4)
    expected = retrieval_metrics(embeddings, labels, ks=(1, 10, 100), metrics=RANKING, backend="torch", chunk_size=70)
    monkeypatch.setattr(ranking, "POSITIVE_PAIRS_LIMIT", 10)
    assert retrieval_metrics(embeddings, labels, ks=(1, 10, 100), metrics=RANKING, backend="torch", chunk_size=70) == expected
    assert_matches(expected, oracle(embeddings, labels, ks=(1, 10, 100)))


def test_metrics_selection_returns_only_requested_keys():
    embeddings, labels = clustered_set(0, num_samples=100)
    result = retrieval_metrics(embeddings, labels, ks=(1, 5), metrics=("map@r",))
    assert set(result) == {"map@r", "num_queries", "queries_without_match"}
    result = retrieval_metrics(embeddings, labels, ks=(5, 1), metrics=("recall",))
    assert list(result)[:2] == ["recall@1", "recall@5"]


def test_torch_tensor_input_and_string_labels():
    embeddings, labels = clustered_set(1, num_samples=120)
    names = np.array([f"class-{label}" for label in labels])
    from_tensor = retrieval_metrics(torch.from_numpy(embeddings).double(), torch.from_numpy(labels), metrics=RANKING)
    from_strings = retrieval_metrics(embeddings, names, metrics=RANKING)
    assert from_tensor == from_strings


def test_torch_backend_works_without_faiss(monkeypatch):
    monkeypatch.setattr(knn, "import_faiss", lambda: None)
    embeddings, labels = clustered_set(0, num_samples=150)
    assert available_backends() == ("torch",)
    result = retrieval_metrics(embeddings, labels, metrics=RANKING + ("nmi",))
    assert_matches(result, oracle(embeddings, labels))
    assert 0.0 <= result["nmi"] <= 1.0
    with pytest.raises(ValueError, match="needs the faiss package"):
        retrieval_metrics(embeddings, labels, backend="faiss")


def test_nmi_is_one_for_separated_clusters_and_deterministic():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 25)
    embeddings = 10 * np.eye(8)[labels] + 0.01 * rng.normal(size=(100, 8))
    first = retrieval_metrics(embeddings, labels, metrics=("nmi",), seed=3)
    assert first["nmi"] == pytest.approx(1.0)
    noisy = rng.normal(size=(100, 8))
    assert retrieval_metrics(noisy, labels, metrics=("nmi",))["nmi"] == retrieval_metrics(noisy, labels, metrics=("nmi",))["nmi"]


def test_nmi_is_one_for_separated_clusters_without_faiss(monkeypatch):
    # torch_kmeans used to seed with random distinct rows: with seed=3 two seeds fell in one cluster
    monkeypatch.setattr(clustering, "import_faiss", lambda: None)
    monkeypatch.setattr(knn, "import_faiss", lambda: None)
    test_nmi_is_one_for_separated_clusters_and_deterministic()


def test_torch_kmeans_plus_plus_seeds_are_deterministic_and_spread():
    labels = np.repeat(np.arange(6), 10)
    embeddings = torch.from_numpy(50 * np.eye(6)[labels] + np.random.default_rng(2).normal(size=(60, 6))).float()
    for seed in range(5):
        rows = clustering._kmeans_plus_plus_rows(embeddings, 6, torch.Generator().manual_seed(seed))
        assert sorted(labels[rows.numpy()]) == list(range(6))  # one seed per far-apart cluster
        assert torch.equal(rows, clustering._kmeans_plus_plus_rows(embeddings, 6, torch.Generator().manual_seed(seed)))
    duplicates = torch.zeros(5, 3)  # fewer distinct rows than clusters: no error
    assert len(set(torch_kmeans(duplicates, 4).tolist())) == 1


def test_torch_kmeans_recovers_separated_clusters():
    labels = np.repeat(np.arange(5), 20)
    embeddings = torch.from_numpy(20 * np.eye(6)[labels] + np.random.default_rng(1).normal(size=(100, 6))).float()
    assignments = torch_kmeans(embeddings, 5, seed=0).numpy()
    assert normalized_mutual_information(labels, assignments) > 0.9
    assert np.array_equal(assignments, torch_kmeans(embeddings, 5, seed=0).numpy())


def test_torch_kmeans_seeds_with_random_rows_beyond_the_kmeans_plus_plus_budget(monkeypatch):
    def refuse(*args):
        raise AssertionError("k-means++ must not run beyond its budget")

    labels = np.repeat(np.arange(5), 20)
    embeddings = torch.from_numpy(20 * np.eye(6)[labels] + np.random.default_rng(1).normal(size=(100, 6))).float()
    monkeypatch.setattr(clustering, "KMEANS_PLUS_PLUS_MAX_PAIRS", 100 * 5 - 1)
    monkeypatch.setattr(clustering, "_kmeans_plus_plus_rows", refuse)
    assignments = torch_kmeans(embeddings, 5, seed=0)
    assert assignments.shape == (100,) and int(assignments.min()) >= 0 and int(assignments.max()) < 5
    assert torch.equal(assignments, torch_kmeans(embeddings, 5, seed=0))


def test_normalized_mutual_information_matches_definition():
    truth, predicted = [0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 1, 1]
    # H(truth) = ln 3, H(pred) = H(1/3, 2/3), I = H(pred) since pred is a function of truth.
    h_truth = math.log(3)
    h_pred = -(1 / 3) * math.log(1 / 3) - (2 / 3) * math.log(2 / 3)
    assert normalized_mutual_information(truth, predicted) == pytest.approx(h_pred / ((h_truth + h_pred) / 2))
    assert normalized_mutual_information([1, 1, 1], [0, 0, 0]) == 1.0
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 7, 500), rng.integers(0, 5, 500)
    assert normalized_mutual_information(a, b) == pytest.approx(sklearn_metrics.normalized_mutual_info_score(a, b))


def test_canonical_similarities_do_not_depend_on_the_batch():
    rng = np.random.default_rng(0)
    left = torch.from_numpy(rng.normal(size=(50, 37)).astype(np.float32))
    right = torch.from_numpy(rng.normal(size=(50, 37)).astype(np.float32))
    whole = canonical_similarities(left, right)
    one_by_one = torch.cat([canonical_similarities(left[i : i + 1], right[i : i + 1]) for i in range(50)])
    assert torch.equal(whole, one_by_one)
    assert torch.allclose(whole, (left.double() * right.double()).sum(1), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"ks": (1, 10)}, ValueError, r"ks must not exceed the number of references: k=10 requested, only 4 other queries"),
        ({"ks": (0,)}, ValueError, "positive integers"),
        ({"labels": [0, 1, 0, 1]}, ValueError, "embeddings has 5 rows, labels has 4"),
        ({"embeddings": np.zeros((0, 3)), "labels": []}, ValueError, "embeddings must not be empty"),
        ({"embeddings": np.zeros(5)}, ValueError, "2-D"),
        ({"embeddings": np.array([[0, 1]] * 4 + [[np.nan, 1]])}, ValueError, "embeddings must be finite: 1 row"),
        ({"embeddings": np.array([[0, 1]] * 4 + [[np.inf, 1]])}, ValueError, "first is row 4"),
        ({"reference": np.ones((3, 2))}, ValueError, "reference was given without reference_labels"),
        ({"reference": np.ones((3, 3)), "reference_labels": [0, 1, 2]}, ValueError, "embeddings has 2 columns, reference has 3"),
        ({"reference": np.ones((3, 2)), "reference_labels": [0, 1]}, ValueError, "reference has 3 rows, reference_labels has 2"),
        ({"reference": np.ones((3, 2)), "reference_labels": [0, 1, 2], "ks": (4,)}, ValueError, "only 3 reference rows"),
        ({"metrics": ("recall", "accuracy")}, ValueError, "metrics must be"),
        ({"backend": "annoy"}, ValueError, "backend must be"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"embeddings": np.array([["a", "b"]] * 5)}, TypeError, "embeddings must be numeric"),
    ],
)
def test_invalid_inputs_raise_clear_errors(kwargs, error, message):
    arguments = {"embeddings": np.random.default_rng(0).normal(size=(5, 2)), "labels": [0, 1, 0, 1, 0], "ks": (1,)}
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        retrieval_metrics(arguments.pop("embeddings"), arguments.pop("labels"), **arguments)


def test_labels_of_mixed_types_are_an_error_not_one_class():
    """numpy turns [1, "1"] into two equal strings: the two classes used to be merged silently."""
    x = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    with pytest.raises(TypeError, match=r"labels mixes numbers \(e.g. 1\) and text \(e.g. '1'\)"):
        retrieval_metrics(x, [1, "1", 2, 2], ks=(1,))
    with pytest.raises(TypeError, match="labels mixes numbers"):
        retrieval_metrics(x, np.array([1, "1", 2, 2], dtype=object), ks=(1,))
    with pytest.raises(TypeError, match=r"labels hold numbers \(e.g. \[1\]\) and reference_labels hold text \(e.g. \['1'\]\)"):
        retrieval_metrics(x, np.array([1, 1, 2, 2]), ks=(1,), reference=x, reference_labels=["1", "1", "2", "2"])
    same = retrieval_metrics(x, ["a", "a", "b", "b"], ks=(1,), reference=x, reference_labels=np.array(["a", "a", "b", "b"]))
    assert same["num_queries"] == 4  # one kind on both sides is fine
