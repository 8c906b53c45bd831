"""The ranking engine of :func:`dmlfast.evaluation.retrieval_metrics`: each query's canonical rank of
its first same-label reference (Recall@K) and its top-R precisions (MAP@R, R-Precision), exactly.

Ranking contract
----------------
References are ranked for each query by decreasing *canonical similarity* and, among equal
canonical similarities, by increasing reference index. The canonical similarity is the float64
dot product of the prepared float32 vectors (L2-normalised, or sign-binarised to +-1 with
``binary=True``), summed by a fixed pairwise tree, so equal vectors always score equal.

The backends only produce float32 candidate lists whose similarities are within
``tolerance = 2 * d * 2**-24 * max|q| * max|r|`` of the canonical one (the standard bound for a
float32 dot product, whatever the summation order). Wherever two candidates lie within that
tolerance of each other, or of the end of the candidate list, the decision is taken on canonical
similarities (recomputed for those pairs only, or for the whole row when the candidate list is
too short). The metrics therefore do not depend on the backend, on how it forms its candidate
lists, on its tie order or on its rounding.

Candidate lists
---------------
* ``"faiss"``: the top ``k`` of an exact k-NN search (:mod:`.knn`), ``k`` = the deepest rank
  needed (largest K of Recall@K, largest R) plus a margin.
* ``"torch"``: threshold collection. The float32 similarity matrix is computed tile by tile
  (only the diagonal and upper-triangle tiles when the queries are their own references, each
  off-diagonal tile serving its rows and its columns) and every reference whose similarity
  reaches a per-query cut is kept. The cut is the lower of (a) a proven lower bound of the R-th
  best similarity (the R-th best within the first tile of the query's row block, or the worst
  positive) minus a margin, and (b) the best positive's similarity minus a margin, raised to
  the similarity of rank ~THRESHOLD_FLOOR_FACTOR x (largest K) estimated from that tile. So
  the list holds the top R and everything ranked above the first positive, unless that
  positive lies deeper than the estimate, in which case the query is either provably ranked
  beyond the largest K or decided on a full row as above. No top-k selection over all
  references is needed. ``chunk_size`` is the tile side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .knn import default_chunk_size, ieee_float32_matmul, progress_bar, resolve_backend, search

SEARCH_MARGIN = 32
CANONICAL_PAIRS_PER_BATCH = 8192
FAISS_CPU_CHUNK = 4096
FULL_ROW_CHUNK_DIVISOR = 8  # full-row batches also hold float64 and mask copies of the similarity block
TILE_SIZE = 4096  # torch backend: a float32 tile of TILE_SIZE x TILE_SIZE similarities (64 MiB)
THRESHOLD_FLOOR_FACTOR = 2.0  # keep references down to the estimated rank FACTOR x (largest K)
THRESHOLD_MARGIN = 5.0  # cuts lie this many tolerances below the float32 bound they derive from
RESOLVE_BUDGET = 1 << 22  # padded (query, candidate) entries per _resolve batch of the torch backend
POSITIVE_PAIRS_LIMIT = 1 << 24  # above this many (query, positive) pairs, cuts use the sample only


def similarity_tolerance(query: torch.Tensor, reference: torch.Tensor) -> float:
    """Bound on |float32 dot - exact dot|: 2 * d * 2**-24 * max row norm of query * of reference."""
    max_query_norm = float(query.double().norm(dim=1).max())
    max_reference_norm = float(reference.double().norm(dim=1).max())
    return 2.0 * query.shape[1] * 2.0**-24 * max_query_norm * max_reference_norm


def canonical_similarities(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Row-wise float64 dot products of two ``[P, D]`` float32 tensors, summed by a fixed pairwise tree.

    Every product is exact in float64 and the summation order depends only on D, so the result
    for a pair of rows does not depend on the batch, the device or the caller.
    """
    products = left.double()
    products.mul_(right)
    width = products.shape[1]
    padded_width = 1 << (width - 1).bit_length()
    if padded_width != width:
        products = F.pad(products, (0, padded_width - width))
    while products.shape[1] > 1:
        half = products.shape[1] // 2
        products[:, :half].add_(products[:, half:])
        products = products[:, :half]
    return products[:, 0]


@dataclass
class RankingProblem:
    """Per-query first-match rank (for Recall@K) and top-R precision figures, computed exactly."""

    query: torch.Tensor
    reference: torch.Tensor
    query_codes: torch.Tensor
    reference_codes: torch.Tensor
    relevant_counts: torch.Tensor
    exclude_self: bool
    recall_depth: int
    needs_top_r: bool
    tolerance: float

    def solve(self, backend: str, chunk_size: int | None, progress: bool | None):
        """Returns ``(first_match_rank, average_precision_at_r, r_precision)`` per query (CPU tensors).

        ``first_match_rank`` is the 0-based canonical rank of the first same-label reference; it
        is only exact below ``recall_depth`` (larger values mean "not in the top recall_depth").
        """
        num_queries = self.query.shape[0]
        num_references = self.reference.shape[0]
        self.first_match_rank = torch.full((num_queries,), num_references, dtype=torch.int64)
        self.average_precision = torch.zeros(num_queries, dtype=torch.float64)
        self.r_precision = torch.zeros(num_queries, dtype=torch.float64)
        if not bool((self.relevant_counts > 0).any()):
            return self.first_match_rank, self.average_precision, self.r_precision
        max_relevant = int(self.relevant_counts.max()) if self.needs_top_r else 0
        depth = max(self.recall_depth, max_relevant, 1)
        k = min(num_references, depth + (1 if self.exclude_self else 0) + SEARCH_MARGIN)
        concrete_backend = resolve_backend(backend, self.query.device, k)
        if concrete_backend == "torch":
            unresolved = self._solve_by_thresholds(chunk_size or TILE_SIZE, progress)
            self._resolve_with_full_rows(unresolved, chunk_size or default_chunk_size(num_references))
            return self.first_match_rank, self.average_precision, self.r_precision
        if chunk_size is None:
            use_faiss_cpu = concrete_backend == "faiss" and self.query.device.type == "cpu"
            chunk_size = FAISS_CPU_CHUNK if use_faiss_cpu else default_chunk_size(num_references)

        unresolved = []
        everything_retrieved = k == num_references
        for first_row, similarities, indices in search(self.query, self.reference, k, concrete_backend, chunk_size, progress):
            rows = torch.arange(first_row, first_row + similarities.shape[0], device=self.query.device)
            if everything_retrieved:
                boundary = torch.full_like(similarities[:, 0], -math.inf)
            else:
                boundary = similarities.min(dim=1).values
            unresolved.append(self._resolve(rows, similarities, indices, boundary, sorted_candidates=True))
        self._resolve_with_full_rows(torch.cat(unresolved), chunk_size)
        return self.first_match_rank, self.average_precision, self.r_precision

    def _positive_similarities(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query, the best and the worst float32 similarity of its same-label references.

        Queries without a match get (-inf, +inf); when there are more than POSITIVE_PAIRS_LIMIT
        (query, positive) pairs, every query gets (-inf, -inf), i.e. no information.
        """
        device = self.query.device
        num_queries = self.query.shape[0]
        best = torch.full((num_queries,), -math.inf, dtype=torch.float32, device=device)
        worst = torch.full((num_queries,), math.inf, dtype=torch.float32, device=device)
        num_codes = int(max(self.query_codes.max(), self.reference_codes.max())) + 1
        per_code = torch.bincount(self.reference_codes, minlength=num_codes)
        pairs_per_query = per_code[self.query_codes]
        total = int(pairs_per_query.sum())
        if total > POSITIVE_PAIRS_LIMIT:
            return best, torch.full_like(worst, -math.inf)
        by_code = torch.argsort(self.reference_codes, stable=True)
        code_starts = torch.cumsum(per_code, 0) - per_code
        query_of_pair = torch.repeat_interleave(torch.arange(num_queries, device=device), pairs_per_query)
        first_pair = torch.cumsum(pairs_per_query, 0) - pairs_per_query
        offset = torch.arange(total, device=device) - first_pair[query_of_pair]
        reference_of_pair = by_code[code_starts[self.query_codes[query_of_pair]] + offset]
        if self.exclude_self:
            keep = reference_of_pair != query_of_pair
            query_of_pair, reference_of_pair = query_of_pair[keep], reference_of_pair[keep]
        for first in range(0, query_of_pair.numel(), CANONICAL_PAIRS_PER_BATCH):
            queries = query_of_pair[first : first + CANONICAL_PAIRS_PER_BATCH]
            values = (self.query[queries] * self.reference[reference_of_pair[first : first + CANONICAL_PAIRS_PER_BATCH]]).sum(1)
            best.scatter_reduce_(0, queries, values, "amax")
            worst.scatter_reduce_(0, queries, values, "amin")
        return best, worst

    def _block_cuts(self, rows: slice, similarities: torch.Tensor, best_positive, worst_positive) -> torch.Tensor:
        """The float32 similarity from which the torch backend keeps references for ``rows`` (+inf: none).

        ``similarities`` are the rows' float32 similarities to a sample of the references (the
        first tile of their row block), -inf where the reference is the query itself. Every bound
        below holds for float32 similarities from any kernel, since each lies within the
        tolerance t of the exact one; the cuts sit THRESHOLD_MARGIN * t below them.
        * top R: the R-th best similarity is at least the R-th best of any R references: of the
          sample, or the worst of the R positives. The top R (and its 2t band) are kept.
        * first positive: everything above or within 2t of the best positive is kept, unless the
          floor (the sample's similarity of estimated rank THRESHOLD_FLOOR_FACTOR x largest K) is
          higher; the floor only bounds the work, correctness never depends on it.
        """
        num_references = self.reference.shape[0]
        sample_size = similarities.shape[1]
        relevant = self.relevant_counts[rows]
        margin = THRESHOLD_MARGIN * self.tolerance
        valid_references = num_references - (1 if self.exclude_self else 0)
        floor_rank = 0
        if self.recall_depth:
            floor_rank = math.ceil(THRESHOLD_FLOOR_FACTOR * self.recall_depth * sample_size / valid_references)
            floor_rank = min(sample_size, max(1, floor_rank))
        max_relevant = int(relevant.max()) if self.needs_top_r else 0
        depth = min(sample_size, max(floor_rank, max_relevant, 1))
        values = torch.topk(similarities, depth, dim=1, sorted=True).values
        cuts = torch.full_like(values[:, 0], math.inf)
        if self.recall_depth:
            cuts = torch.maximum(best_positive[rows] - margin, values[:, floor_rank - 1])
        if self.needs_top_r:
            sample_r_th = values.gather(1, (relevant - 1).clamp(0, depth - 1).unsqueeze(1)).squeeze(1)
            sample_r_th = torch.where(relevant <= depth, sample_r_th, -math.inf)
            cuts = torch.minimum(cuts, torch.maximum(sample_r_th, worst_positive[rows]) - margin)
        return torch.where(relevant > 0, cuts, math.inf)

    def _solve_by_thresholds(self, tile: int, progress: bool | None) -> torch.Tensor:
        """Torch backend: collect each query's references at or above its cut, tile by tile, and
        resolve them; returns the queries whose lists turned out too short (for full rows).

        The first tile of each row block (the diagonal tile when the queries are their own
        references, else the one of the first references) is the sample its cuts come from; with
        query == reference the diagonal tiles are done first, then each upper-triangle tile
        (i, j) serves rows i against references j and rows j against references i.
        """
        device = self.query.device
        num_queries, num_references = self.query.shape[0], self.reference.shape[0]
        best_positive, worst_positive = self._positive_similarities()
        cuts = torch.full((num_queries,), math.inf, dtype=torch.float32, device=device)
        symmetric = self.exclude_self
        num_blocks = -(-num_queries // tile)
        kept = [[] for _ in range(num_blocks)]  # per row block: (rows, references, similarities) pieces
        buffer = torch.empty(min(tile, num_queries) * min(tile, num_references), dtype=torch.float32, device=device)
        mask_buffer = torch.empty(buffer.shape, dtype=torch.bool, device=device)

        def similarities_of(first_row, first_column):
            queries = self.query[first_row : first_row + tile]
            references = self.reference[first_column : first_column + tile]
            shape = (queries.shape[0], references.shape[0])
            similarities = torch.mm(queries, references.t(), out=buffer[: shape[0] * shape[1]].view(shape))
            if symmetric and first_column == first_row:
                similarities.fill_diagonal_(-math.inf)
            return similarities

        def keep(similarities, tile_cuts, first_row, first_column, transposed):
            mask = mask_buffer[: similarities.numel()].view(similarities.shape)
            torch.ge(similarities, tile_cuts, out=mask)
            if mask.device.type == "cpu":  # numpy's flatnonzero is several times faster than torch.nonzero here
                flat = torch.from_numpy(np.flatnonzero(mask.numpy()))
            else:
                flat = torch.nonzero(mask.view(-1)).flatten()
            values = similarities.view(-1)[flat]
            tile_rows, tile_columns = flat // similarities.shape[1], flat % similarities.shape[1]
            if transposed:
                tile_rows, tile_columns = tile_columns, tile_rows
                first_row, first_column = first_column, first_row
            # rows are stored relative to their block, references as int32 (M < 2**31)
            kept[first_row // tile].append((tile_rows.to(torch.int32), (tile_columns + first_column).to(torch.int32), values))

        def first_tile(first_row, first_column):
            similarities = similarities_of(first_row, first_column)
            rows = slice(first_row, first_row + similarities.shape[0])
            cuts[rows] = self._block_cuts(rows, similarities, best_positive, worst_positive)
            keep(similarities, cuts[rows].unsqueeze(1), first_row, first_column, False)

        unresolved = [torch.zeros(0, dtype=torch.int64, device=device)]
        bar = progress_bar(num_queries, progress, "torch similarity tiles")
        with ieee_float32_matmul():
            if symmetric:
                for first_row in range(0, num_queries, tile):
                    first_tile(first_row, first_row)
            for first_row in range(0, num_queries, tile):
                if not symmetric:
                    first_tile(first_row, 0)
                for first_column in range(first_row + tile if symmetric else tile, num_references, tile):
                    similarities = similarities_of(first_row, first_column)
                    keep(similarities, cuts[first_row : first_row + tile].unsqueeze(1), first_row, first_column, False)
                    if symmetric:
                        column_cuts = cuts[first_column : first_column + tile].unsqueeze(0)
                        keep(similarities, column_cuts, first_row, first_column, True)
                # every tile touching this row block is done (earlier blocks' tiles served it as columns)
                pieces, kept[first_row // tile] = kept[first_row // tile], None
                unresolved.append(self._resolve_kept(first_row, min(tile, num_queries - first_row), pieces, cuts))
                if bar is not None:
                    bar.update(min(tile, num_queries - first_row))
        if bar is not None:
            bar.close()
        return torch.cat(unresolved)

    def _resolve_kept(self, first_row: int, num_rows: int, pieces, cuts) -> torch.Tensor:
        """Resolve one row block's kept references, in padded batches of queries with similar
        counts (at most RESOLVE_BUDGET padded entries, or one query); returns the queries that
        need full rows."""
        device = self.query.device
        block_rows = torch.cat([piece[0] for piece in pieces]).to(torch.int64)
        order = torch.argsort(block_rows, stable=True)
        counts = torch.bincount(block_rows, minlength=num_rows)
        del block_rows
        # a sentinel at the end keeps the gathers below in range
        references_kept = torch.cat([torch.cat([piece[1] for piece in pieces])[order], torch.zeros(1, dtype=torch.int32, device=device)])
        values_kept = torch.cat([torch.cat([piece[2] for piece in pieces])[order], torch.full((1,), -math.inf, device=device)])
        del order, pieces
        last = values_kept.numel() - 1
        starts = torch.cumsum(counts, 0) - counts
        matched = torch.nonzero(self.relevant_counts[first_row : first_row + num_rows] > 0).flatten()
        matched = matched[torch.argsort(counts[matched], stable=True)]
        sorted_counts = counts[matched].tolist()
        unresolved = [matched[:0]]
        first = 0
        while first < len(sorted_counts):
            low, high = first + 1, len(sorted_counts)  # the longest batch within the budget, at least one query
            while low < high:
                middle = (low + high + 1) // 2
                if (middle - first) * max(sorted_counts[middle - 1], 1) <= RESOLVE_BUDGET:
                    low = middle
                else:
                    high = middle - 1
            end = low
            local = matched[first:end]
            rows = local + first_row
            row_counts = counts[local]
            width = max(int(row_counts.max()), int(self.relevant_counts[rows].max()), 1)
            positions = torch.arange(width, device=device)
            present = positions.unsqueeze(0) < row_counts.unsqueeze(1)
            at = torch.where(present, starts[local].unsqueeze(1) + positions, last)
            unresolved.append(self._resolve(rows, values_kept[at], references_kept[at], cuts[rows], present))
            first = end
        return torch.cat(unresolved)

    def _resolve_with_full_rows(self, rows: torch.Tensor, chunk_size: int) -> None:
        """Queries whose candidate list was too short: rank them against every reference."""
        num_references = self.reference.shape[0]
        full_chunk = min(chunk_size, max(1, default_chunk_size(num_references) // FULL_ROW_CHUNK_DIVISOR))
        with ieee_float32_matmul():
            for first in range(0, rows.numel(), full_chunk):
                batch = rows[first : first + full_chunk]
                similarities = self.query[batch] @ self.reference.t()
                indices = torch.arange(num_references, device=self.query.device).expand(batch.numel(), -1)
                boundary = torch.full_like(similarities[:, 0], -math.inf)
                still_unresolved = self._resolve(batch, similarities, indices, boundary)
                assert still_unresolved.numel() == 0, "a full similarity row always resolves"

    def _canonical(self, rows: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Canonical similarities where ``mask`` is set (``rows[i]`` vs ``indices[i, j]``), -inf elsewhere."""
        scores = torch.full(indices.shape, -math.inf, dtype=torch.float64, device=indices.device)
        mask_rows, mask_columns = torch.nonzero(mask, as_tuple=True)
        query_rows = rows[mask_rows]
        reference_rows = indices[mask_rows, mask_columns]
        values = torch.empty(mask_rows.numel(), dtype=torch.float64, device=indices.device)
        for first in range(0, mask_rows.numel(), CANONICAL_PAIRS_PER_BATCH):
            part = slice(first, first + CANONICAL_PAIRS_PER_BATCH)
            values[part] = canonical_similarities(self.query[query_rows[part]], self.reference[reference_rows[part]])
        scores[mask_rows, mask_columns] = values
        return scores

    def _resolve(self, rows, similarities, indices, boundary, present=None, sorted_candidates=False) -> torch.Tensor:
        """Fill the outputs for ``rows`` from their candidates; return the rows that need full rows.

        ``boundary[i]`` is an upper bound of the float32 similarity of every reference missing
        from row i's candidates (-inf when the candidates are all references). ``present``
        (default: all) marks the real candidates of a padded list. ``sorted_candidates``: the
        lists are sorted by decreasing similarity (a k-NN search), so each row is first resolved
        on a prefix of max R + 1 + SEARCH_MARGIN columns, whose boundary is the larger of
        ``boundary`` and the best valid similarity after the prefix (an upper bound whatever the
        order); only the rows that prefix does not settle are resolved again on the whole list.
        """
        indices = indices.to(torch.int64)
        similarities = similarities.to(torch.float32)
        if self.exclude_self:
            valid = indices != rows.unsqueeze(1)
        else:
            valid = torch.ones_like(indices, dtype=torch.bool)
        if present is not None:
            valid &= present
        relevant = self.relevant_counts[rows]
        width = int(relevant.max()) + 1 + SEARCH_MARGIN
        if not sorted_candidates or width >= similarities.shape[1]:
            return rows[self._resolve_rows(rows, similarities, indices, valid, boundary)]
        after_prefix = torch.where(valid[:, width:], similarities[:, width:], -math.inf).max(dim=1).values
        prefix = slice(0, width)
        unsettled = self._resolve_rows(rows, similarities[:, prefix], indices[:, prefix], valid[:, prefix],
                                       torch.maximum(boundary, after_prefix))
        again = torch.nonzero(unsettled).flatten()
        if again.numel() == 0:
            return rows[:0]
        needs_full_rows = self._resolve_rows(rows[again], similarities[again], indices[again], valid[again], boundary[again])
        return rows[again][needs_full_rows]

    def _resolve_rows(self, rows, similarities, indices, valid, boundary) -> torch.Tensor:
        """:meth:`_resolve` on one candidate list per row; returns the mask of the rows it could not settle."""
        positive = valid & (self.reference_codes[indices] == self.query_codes[rows].unsqueeze(1))
        relevant = self.relevant_counts[rows]
        needs_full_rows = torch.zeros_like(rows, dtype=torch.bool)
        if self.recall_depth:
            needs_full_rows |= self._first_match_ranks(rows, similarities, indices, valid, positive, relevant, boundary)
        if self.needs_top_r:
            needs_full_rows |= self._top_r_precisions(rows, similarities, indices, valid, positive, relevant, boundary)
        return needs_full_rows

    def _first_match_ranks(self, rows, similarities, indices, valid, positive, relevant, boundary) -> torch.Tensor:
        """Canonical rank of each query's first same-label reference (exact below ``recall_depth``).

        With b the best float32 similarity of a retrieved positive and t the tolerance: candidates
        above b + 2t surely precede it, those below b - 2t surely do not; the band in between is
        decided on canonical similarities. Returns the rows whose band may reach past the list.
        """
        two_tolerance = 2.0 * self.tolerance
        has_match = relevant > 0
        retrieved_positive = positive.any(dim=1)
        best_positive = torch.where(positive, similarities, -math.inf).max(dim=1).values
        surely_above = valid & (similarities > (best_positive + two_tolerance).unsqueeze(1))
        num_surely_above = surely_above.sum(dim=1)
        band_reaches_boundary = boundary >= best_positive - two_tolerance
        num_above_boundary = (valid & (similarities > (boundary + two_tolerance).unsqueeze(1))).sum(dim=1)

        exact_rows = has_match & retrieved_positive & ~band_reaches_boundary
        deep_with_positive = has_match & retrieved_positive & band_reaches_boundary
        deep_without_positive = has_match & ~retrieved_positive
        lower_bound = torch.where(retrieved_positive, num_surely_above, num_above_boundary)
        surely_deep = (deep_with_positive | deep_without_positive) & (lower_bound >= self.recall_depth)
        needs_full_rows = (deep_with_positive | deep_without_positive) & ~surely_deep

        band = valid & exact_rows.unsqueeze(1) & ~surely_above
        band &= similarities >= (best_positive - two_tolerance).unsqueeze(1)
        band &= (band.sum(dim=1) > 1).unsqueeze(1)
        canonical = self._canonical(rows, indices, band)
        positive_band = band & positive
        best_canonical = torch.where(positive_band, canonical, -math.inf).max(dim=1).values.unsqueeze(1)
        no_index = torch.iinfo(torch.int64).max
        first_positive_index = torch.where(positive_band & (canonical == best_canonical), indices, no_index)
        first_positive_index = first_positive_index.min(dim=1).values.unsqueeze(1)
        precedes = band & ((canonical > best_canonical) | ((canonical == best_canonical) & (indices < first_positive_index)))
        exact_rank = num_surely_above + precedes.sum(dim=1)  # a lone band entry is the positive itself

        rank = torch.where(exact_rows, exact_rank, lower_bound)
        settled = exact_rows | surely_deep
        self.first_match_rank[rows[settled].cpu()] = rank[settled].cpu()
        return needs_full_rows

    def _top_r_precisions(self, rows, similarities, indices, valid, positive, relevant, boundary) -> torch.Tensor:
        """MAP@R and R-Precision from each query's canonical top-R references.

        With c the R-th best float32 similarity, the canonical top R lies among candidates at or
        above c - 2t. Candidates more than 2t away from both float32 neighbours keep their float32
        order; runs of closer ones are re-ranked on canonical similarities. Returns the rows whose
        threshold may reach past the candidate list.
        """
        has_match = relevant > 0
        if not bool(has_match.any()):
            return torch.zeros_like(has_match)
        ranked_similarities = torch.where(valid, similarities, -math.inf)
        deepest = int(relevant.max())
        top_values = torch.topk(ranked_similarities, deepest, dim=1, sorted=True).values
        r_th_best = top_values.gather(1, (relevant - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        threshold = r_th_best - 2.0 * self.tolerance
        needs_full_rows = has_match & (boundary >= threshold)
        exact_rows = has_match & ~needs_full_rows
        if not bool(exact_rows.any()):
            return needs_full_rows

        candidates = valid & exact_rows.unsqueeze(1) & (similarities >= threshold.unsqueeze(1))
        width = int(candidates.sum(dim=1).max())
        top = torch.topk(torch.where(candidates, similarities, -math.inf), width, dim=1, sorted=True)
        columns, candidate_similarities = top.indices, top.values
        candidate_mask = candidates.gather(1, columns)
        candidate_indices = indices.gather(1, columns)
        close_to_next = candidate_mask[:, 1:] & (candidate_similarities[:, :-1] - candidate_similarities[:, 1:] <= 2.0 * self.tolerance)
        no_neighbour = torch.zeros_like(candidate_mask[:, :1])
        clustered = torch.cat([close_to_next, no_neighbour], dim=1) | torch.cat([no_neighbour, close_to_next], dim=1)
        canonical = self._canonical(rows, candidate_indices, clustered)
        sort_key = torch.where(clustered, canonical, candidate_similarities.double())
        no_index = torch.iinfo(torch.int64).max
        by_index = torch.sort(torch.where(candidate_mask, candidate_indices, no_index), dim=1, stable=True).indices
        by_score = torch.sort(sort_key.gather(1, by_index), dim=1, descending=True, stable=True).indices
        order = by_index.gather(1, by_score)
        relevance = (positive.gather(1, columns) & candidate_mask).gather(1, order)

        positions = torch.arange(1, width + 1, device=relevance.device)
        within_r = positions.unsqueeze(0) <= relevant.unsqueeze(1)
        hits = (relevance & within_r).to(torch.float64)
        precision_at_i = hits.cumsum(dim=1) / positions
        denominator = relevant.clamp(min=1).to(torch.float64)
        average_precision = (precision_at_i * hits).sum(dim=1) / denominator
        r_precision = hits.sum(dim=1) / denominator
        settled_rows = rows[exact_rows].cpu()
        self.average_precision[settled_rows] = average_precision[exact_rows].cpu()
        self.r_precision[settled_rows] = r_precision[exact_rows].cpu()
        return needs_full_rows
