"""Depo: multi-hop retrieval over a directed cycle the model can no longer see.

Token layout (T = 360 with the defaults, windows of L = 75):

    edges     positions 0..299: the cycle's n edges in shuffled order, 4 tokens each
              `x -> y ;`, then <pad> up to 4 * max_nodes tokens                       no loss
    queries   positions 300..359: 10 queries, 6 tokens each `? k=K x : y .`
              where y is the node K hops after x                   target at ':' is y

Nodes are n distinct tokens drawn from a pool of `node_pool` names (n ~ U[min_nodes, max_nodes]),
so names carry no position. K is drawn per query from `k_values` (training: 1..16) or, for the
validation split, from `eval_k_values` (default 1, 2, 4, 8, 16); the meta lists K per query, in the
order of the supervised positions.
"""

from __future__ import annotations

import numpy as np

from sleepscale.data.sample import IGNORE_INDEX, Sample
from sleepscale.data.tokenizer import SymbolVocabulary

VERSION = "1"
EDGE_TOKENS = 4
QUERY_TOKENS = 6


class DepoTask:
    name = "depo"

    def __init__(
        self,
        k_values=tuple(range(1, 17)),
        eval_k_values=(1, 2, 4, 8, 16),
        min_nodes: int = 20,
        max_nodes: int = 75,
        queries: int = 10,
        node_pool: int = 100,
    ):
        if not 2 <= min_nodes <= max_nodes <= node_pool:
            raise ValueError("need 2 <= min_nodes <= max_nodes <= node_pool")
        if not k_values or not eval_k_values or min(*k_values, *eval_k_values) < 1:
            raise ValueError("k values must be non-empty lists of hops >= 1")
        self.k_values, self.eval_k_values = [int(k) for k in k_values], [int(k) for k in eval_k_values]
        self.min_nodes, self.max_nodes, self.queries, self.node_pool = min_nodes, max_nodes, queries, node_pool
        max_k = max(*self.k_values, *self.eval_k_values)
        self.vocabulary = SymbolVocabulary(
            ["<pad>", "->", ";", "?", ":", "."] + [f"k={k}" for k in range(1, max_k + 1)] + [f"n{i}" for i in range(node_pool)]
        )
        self.sequence_length = EDGE_TOKENS * max_nodes + QUERY_TOKENS * queries

    def params(self) -> dict:
        return {
            "k_values": self.k_values, "eval_k_values": self.eval_k_values, "min_nodes": self.min_nodes,
            "max_nodes": self.max_nodes, "queries": self.queries, "node_pool": self.node_pool,
        }

    def for_validation(self) -> DepoTask:
        params = self.params() | {"k_values": self.eval_k_values}
        return DepoTask(**params)

    def sample(self, rng: np.random.Generator) -> Sample:
        v = self.vocabulary
        n = int(rng.integers(self.min_nodes, self.max_nodes + 1))
        cycle = rng.choice(self.node_pool, size=n, replace=False)  # cycle[i] -> cycle[i + 1]
        node = [v[f"n{i}"] for i in cycle]
        edges = [[node[i], v["->"], node[(i + 1) % n], v[";"]] for i in rng.permutation(n)]
        edge_region = np.full(EDGE_TOKENS * self.max_nodes, v.pad_id)
        edge_region[: EDGE_TOKENS * n] = np.ravel(edges)

        query_ids, query_targets, hops, answers = [], [], [], []
        for _ in range(self.queries):
            k = int(rng.choice(self.k_values))
            start = int(rng.integers(n))
            answer = node[(start + k) % n]
            query_ids += [v["?"], v[f"k={k}"], node[start], v[":"], answer, v["."]]
            query_targets += [IGNORE_INDEX] * 3 + [answer] + [IGNORE_INDEX] * 2
            hops.append(k)
            answers.append(v.symbols[answer])
        input_ids = np.concatenate([edge_region, query_ids])
        targets = np.concatenate([np.full(edge_region.shape, IGNORE_INDEX), query_targets])
        return Sample(input_ids, targets, {"task": self.name, "difficulty": {"k": hops}, "answer": answers, "nodes": n})
