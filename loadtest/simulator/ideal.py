"""The prefix-cache hit-rate ceiling of a workload on a fleet: `ideal_cache_hit_rate`."""

from __future__ import annotations

from collections.abc import Sequence


class IdealPrefixCache:
    """The hit rate of a fleet whose router is clairvoyant and whose caches never evict.

    What is computed, per request, in the order requests reach an engine (the order their prefill
    could first use a block): with vLLM's token-based definition, `queries += prompt tokens` and
    `hits += block_size x` the number of leading prompt blocks whose chained hash was seen before,
    capped, as in the engine, at `(prompt tokens - 1) // block_size` blocks (the last prompt token
    is always recomputed to sample). A block counts as seen once an earlier request had it in its
    prompt, or once an earlier turn of the session computed it (its prompt plus every generated
    token but the last: what the engine caches when the turn finishes). So per distinct block, the
    first occurrence misses and every later one hits.

    Why it is a ceiling: a real replica can hit a block only if a request that reached that
    replica earlier computed it, which makes it "seen before" here; a real fleet can only do worse
    (the holder of a block was not chosen, the block was evicted, or it is spread over replicas).
    It counts neither fleet size nor cache capacity, so it need not be reachable: it says how far
    a policy is from perfect, not that perfect is possible.
    """

    def __init__(self, block_size: int) -> None:
        self._block_size = block_size
        self._seen: set[int] = set()
        self.queries = 0
        self.hits = 0

    def store(self, hashes: Sequence[int]) -> None:
        """Blocks an engine computed (e.g. a finished turn's answer): later requests hit them."""
        self._seen.update(hashes)

    def observe(self, hashes: Sequence[int], num_prompt_tokens: int) -> None:
        """A request reached an engine: count its query and ideal hits, then remember its blocks."""
        seen = self._seen
        limit = min((num_prompt_tokens - 1) // self._block_size, len(hashes))
        hit = 0
        # Chained hashes: a seen block implies its whole prefix was seen, so the hits are a run.
        while hit < limit and hashes[hit] in seen:
            hit += 1
        self.queries += num_prompt_tokens
        self.hits += hit * self._block_size
        seen.update(hashes)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0
